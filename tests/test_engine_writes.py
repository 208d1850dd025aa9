"""When what we owe Yate is written: a burst read is handled in slices, each slice's lines
written before the next slice is decoded (Engine.SLICE), so Yate gets answers while we work on
the rest of the burst; what an asyncio Task woken by a read writes leaves in the loop pass the
Task runs in."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from yate_sipgen import protocol as p
from yate_sipgen.engine import Engine
from yate_sipgen.message import Message


def _burst(count: int, body: str = "x" * 600) -> bytes:
    return b"".join(p.yate_message_line(Message("sip.message", {"n": str(i), "xsip_body": body}),
                                        f"0xb.{i}", 1700000000) for i in range(count))


def _answered(writes: list[bytes]) -> list[str]:
    return [p.parse_script_line(raw).id for w in writes for raw in w.split(b"\n")
            if raw.startswith(b"%%<message:")]


def _run(data: bytes | list[bytes]) -> list[bytes]:
    async def go() -> list[bytes]:
        eng = Engine()
        eng.add_handler("sip.message", lambda m: True)
        writes: list[bytes] = []
        eng.attach(writes.append)
        writes.clear()  # the installs
        for chunk in data if isinstance(data, list) else [data]:
            eng.feed(chunk)
        return writes
    return asyncio.run(go())


def test_a_burst_is_answered_slice_by_slice_in_order_and_once():
    data = _burst(100)
    assert len(data) > 4 * Engine.SLICE
    writes = _run(data)
    assert _answered(writes) == [f"0xb.{i}" for i in range(100)]
    assert len(writes) >= 4  # one per slice, not one per read
    per_line = len(data) // 100
    for w in writes[:-1]:  # a slice ends after the line that crosses SLICE bytes
        lines = w.count(b"\n")
        assert Engine.SLICE // per_line <= lines <= Engine.SLICE // per_line + 1


def test_a_read_cut_inside_a_line_loses_nothing():
    data = _burst(60)
    cut = Engine.SLICE * 2 + 123  # inside a line, past two slices
    writes = _run([data[:cut], data[cut:]])
    assert _answered(writes) == [f"0xb.{i}" for i in range(60)]


def test_a_line_longer_than_a_slice_is_not_cut():
    data = _burst(3, body="y" * (Engine.SLICE + 500))
    writes = _run(data)
    assert _answered(writes) == ["0xb.0", "0xb.1", "0xb.2"]


def test_what_a_task_woken_by_a_read_writes_leaves_in_the_pass_it_runs_in():
    async def go() -> tuple[int, int, list[bytes]]:
        eng = Engine()

        async def handler(msg: Message) -> bool:  # an ordinary Task (not inline)
            answer = await eng.dispatch(Message("call.route", {"called": "bob"}))
            msg["code"] = answer.get("code") or "?"
            return True

        eng.add_handler("sip.message", handler)
        writes: list[bytes] = []
        passes = [0]
        written_at: list[int] = []

        def write(data: bytes) -> None:
            writes.append(data)
            written_at.append(passes[0])

        loop = asyncio.get_running_loop()

        def tick() -> None:  # counts the loop's passes
            passes[0] += 1
            loop.call_soon(tick)

        eng.attach(write)
        eng.feed(p.yate_message_line(Message("sip.message", {}), "0xt.1", 1700000000))
        for _ in range(5):  # the Task starts and dispatches its call.route
            await asyncio.sleep(0)
        route = p.parse_script_line(writes[-1].split(b"\n")[0])
        assert route.message.name == "call.route"
        tick()
        start = passes[0]
        eng.feed(p.yate_answer_line(Message("call.route", {"code": "200"}), route.message.id,
                                    True))  # wakes the Task
        for _ in range(5):
            await asyncio.sleep(0)
        return start, written_at[-1], writes

    start, at, writes = asyncio.run(go())
    assert _answered(writes[-1:]) == ["0xt.1"]
    assert at - start <= 1  # the pass the woken Task ran in, not one more


@settings(max_examples=40, deadline=None)
@given(bodies=st.lists(st.integers(0, 3 * Engine.SLICE // 2), min_size=1, max_size=30),
       cuts=st.lists(st.integers(1, 4 * Engine.SLICE), max_size=12))
def test_any_chunking_of_the_input_writes_the_same_lines_in_the_same_order(bodies, cuts):
    data = b"".join(p.yate_message_line(Message("sip.message", {"n": str(i), "xsip_body": "b" * n}),
                                        f"0xc.{i}", 1700000000) for i, n in enumerate(bodies))
    chunks, at = [], 0
    for c in cuts:  # reads of any size, cut anywhere (inside lines too)
        if at >= len(data):
            break
        chunks.append(data[at:at + c])
        at += c
    chunks.append(data[at:])
    writes = _run([c for c in chunks if c])
    assert _answered(writes) == [f"0xc.{i}" for i in range(len(bodies))]
    assert all(w.endswith(b"\n") for w in writes)  # a write never ends inside a line
