"""The MESSAGE relay's callback lane (RelayJob) behaves exactly as the coroutine path.

Each example plays one scenario twice against the real MESSAGE feature, in-process (an App
attached to a list): once as shipped, where a RelayJob routes, sends and answers by itself
whenever nothing makes it wait, and once with the lane's own delivery switched off, so every
delivery goes through the feature's coroutine (``_after_lookup``). Yate's side answers the
dispatches in an order hypothesis chooses, with the routes and SIP codes it chooses; several
messages to one recipient queue behind its lock (RFC 3428 §8). The answers to the senders,
and what is sent to each recipient, in order, must be the same.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc_harness import running_app

from yate_sipgen import protocol as p
from yate_sipgen.message import Message

CONF = """
[general]
state_dir={state}
timeout=10000
[message]
domains=example.com
sender_rate=100000
sender_burst=100000
"""

#: (route answer, xsip.generate code) per message; no store-worthy failure (the store's own
#: thread would make the two runs' timing differ, and it is not the lane's business).
ROUTES = st.sampled_from(["sip", "sip", "sip", "unknown", "fork"])
CODES = st.sampled_from(["200", "200", "200", "486", "404", "603"])
SCENARIO = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), ROUTES, CODES),
                    min_size=1, max_size=8)


def _sip_message(i: int, sender: int, rcpt: int) -> Message:
    return Message("sip.message", [
        ("called", f"bob{rcpt}"), ("caller", f"alice{sender}"), ("username", f"alice{sender}"),
        ("domain", "example.com"), ("antiloop", "19"), ("ip_host", "127.0.0.1"),
        ("sip_uri", f"sip:bob{rcpt}@example.com"),
        ("sip_from", f"<sip:alice{sender}@example.com>;tag=t{i}"),
        ("sip_to", f"<sip:bob{rcpt}@example.com>"), ("sip_callid", f"c{i}@h"),
        ("xsip_type", "text/plain"), ("xsip_body", f"message {i}")])


async def _play(tmp: Path, scenario: list[tuple[int, int, str, str]], order: list[int],
                lane: bool) -> list[tuple[str, ...]]:
    async with running_app(tmp, CONF) as (app, out):
        return await _steps(app, out, scenario, order, lane)


async def _steps(app: Any, out: list[bytes], scenario: list[tuple[int, int, str, str]],
                 order: list[int], lane: bool) -> list[tuple[str, ...]]:
    eng = app.engine
    feature = app.feature("message")
    if not lane:
        feature._sends_itself = lambda route, state: False  # every delivery by coroutine
    out.clear()
    seen: list[tuple[str, ...]] = []
    pending: list[Message] = []
    ids = {}
    data = b"".join(p.yate_message_line(_sip_message(i, s, r), f"0x1.{i}", 1700000000)
                    for i, (s, r, _, _) in enumerate(scenario))
    for i in range(len(scenario)):
        ids[f"0x1.{i}"] = i
    eng.feed(data)
    steps = idle = 0
    while idle < 50:
        for raw in b"".join(out).split(b"\n"):
            if not raw:
                continue
            ev = p.parse_script_line(raw)
            if isinstance(ev, p.Answer):
                seen.append(("answer", str(ids[ev.id]), dict(ev.changes).get("code", "")))
            elif isinstance(ev, p.MessageReceived):
                m = ev.message
                if m.name == "xsip.generate":
                    seen.append(("send", m.get("uri") or "", m.get("xsip_body") or ""))
                pending.append(m)
        out.clear()
        if not pending:  # background work (a fork's tasks) may still be on its way
            idle += 1
            await asyncio.sleep(0.001 if idle > 5 else 0)
            continue
        idle = 0
        m = pending.pop(order[steps % len(order)] % len(pending))
        steps += 1
        if m.name == "call.route":
            called = m.get("called") or ""
            kind = _route_kind(m, scenario)
            if kind == "sip":
                ans = Message("call.route", {"oconnection_id": "general"},
                              f"sip/sip:{called}@127.0.0.1:5062")
            elif kind == "fork":
                ans = Message("call.route", {"callto.1": f"sip/sip:{called}@127.0.0.1:5062",
                                             "callto.2": f"sip/sip:{called}@127.0.0.2:5062"},
                              "fork")
            else:
                ans = Message("call.route", {})
            eng.feed(p.yate_answer_line(ans, m.id, kind != "unknown"))
        elif m.name == "xsip.generate":
            body = m.get("xsip_body") or ""
            code = scenario[int(body.split()[-1])][3]
            eng.feed(p.yate_answer_line(Message("xsip.generate", {"code": code}), m.id, True))
        else:
            eng.feed(p.yate_answer_line(m, m.id, False))
        for _ in range(3):
            await asyncio.sleep(0)
    # the counters the status line shows (delivered, rejected<code>, ...) and the engine's
    seen.append(("counters", repr(sorted(+app.stats.feature("message"))),
                 repr(sorted(+eng.stats.codes)), str(feature._live), str(eng.in_progress)))
    return seen


def _route_kind(m: Message, scenario: list[tuple[int, int, str, str]]) -> str:
    """Routes depend on the recipient (Yate's routing knows users, not messages)."""
    called = m.get("called") or ""
    rcpt = int(called[3:])
    kinds = [route for _, r, route, _ in scenario if r == rcpt]
    return kinds[0]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SCENARIO, st.lists(st.integers(0, 7), min_size=1, max_size=12))
def test_relay_lane_answers_and_sends_as_the_coroutine_path_does(
        tmp_path_factory: Any, scenario: list[tuple[int, int, str, str]], order: list[int]
        ) -> None:
    a = tmp_path_factory.mktemp("lane")
    b = tmp_path_factory.mktemp("coro")
    with_lane = asyncio.run(_play(a, scenario, order, lane=True))
    without = asyncio.run(_play(b, scenario, order, lane=False))
    # per recipient, in order: what was sent to it and what its senders were answered (a
    # fork runs in asyncio Tasks, so how two recipients' events interleave is the loop's)
    assert _by_recipient(with_lane, scenario) == _by_recipient(without, scenario)
    assert with_lane[-1][-2:] == ("0", "0")  # nothing left running
    answers = [x for x in with_lane if x[0] == "answer"]
    assert sorted(int(x[1]) for x in answers) == list(range(len(scenario)))  # each once


def _by_recipient(seen: list[tuple[str, ...]], scenario: list[tuple[int, int, str, str]]
                  ) -> dict[int, list[tuple[str, ...]]]:
    out: dict[int, list[tuple[str, ...]]] = {}
    for x in seen:
        if x[0] == "counters":
            out[-1] = [x]
            continue
        i = int(x[1] if x[0] == "answer" else x[2].split()[-1])
        out.setdefault(scenario[i][1], []).append(x)
    return out
