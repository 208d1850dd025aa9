"""Deferred handlers and Jobs: the engine's callback path (no coroutine per message).

The engine runs in-process, attached to a list instead of a pipe; Yate's side is played with
the protocol module's Yate-side line builders, and what the engine writes is read back with
Yate's own rules (:func:`protocol.parse_script_line`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from yate_sipgen import protocol as p
from yate_sipgen.engine import Engine, Job
from yate_sipgen.errors import DispatchCancelled, DispatchTimeout
from yate_sipgen.message import Message


class Wire:
    """An engine attached to a list, with Yate's side of the conversation."""

    def __init__(self, **engine_args: Any) -> None:
        self.engine = Engine(**engine_args)
        self.out: list[bytes] = []
        self._n = 0

    def attach(self) -> None:
        self.engine.attach(self.out.append)
        self.lines()  # the installs

    def relay(self, log: list[str], cls: Any = None, boom: str = "", **kw: Any) -> None:
        """Handle sip.message with a :class:`Relay` (or ``cls``) job, then attach."""
        cls = cls or Relay
        self.engine.add_handler("sip.message", lambda m: cls(self.engine, m, log, boom).start(),
                                deferred=True, **kw)
        self.attach()

    def lines(self) -> list[Any]:
        data = b"".join(self.out)
        self.out.clear()
        return [p.parse_script_line(raw) for raw in data.split(b"\n") if raw]

    def request(self, name: str = "sip.message", **params: str) -> str:
        self._n += 1
        mid = f"0xy.{self._n}"
        self.engine.feed(p.yate_message_line(Message(name, params), mid, 1700000000))
        return mid

    def answer(self, dispatched: Any, handled: bool = True, retval: str = "",
               **params: str) -> None:
        msg = Message(dispatched.message.name, params, retval)
        self.engine.feed(p.yate_answer_line(msg, dispatched.message.id, handled))

    def split(self, lines: list[Any]) -> tuple[list[p.Answer], list[Any]]:
        answers = [x for x in lines if isinstance(x, p.Answer)]
        return answers, [x for x in lines if isinstance(x, p.MessageReceived)]


class Relay(Job):
    """route, then send, then answer with the send's code (a miniature RelayJob)."""

    __slots__ = ("log", "boom")

    def __init__(self, engine: Engine, msg: Message, log: list[str], boom: str = "") -> None:
        Job.__init__(self, engine, msg)
        self.log = log
        self.boom = boom

    def run(self) -> None:
        if self.boom == "run":
            raise RuntimeError("in run")
        self.wait(Message("call.route", {"called": self.msg.get("called") or ""}),
                  self.routed, timeout=5)

    def routed(self, answer: Message | None, exc: BaseException | None) -> None:
        self.log.append(f"routed {None if answer is None else answer.retval} {type(exc).__name__}")
        if exc is not None:
            self.msg["code"] = "503" if isinstance(exc, DispatchTimeout) else "500"
            self.finish()
            return
        if self.boom == "routed":
            raise RuntimeError("in routed")
        self.wait(Message("xsip.generate", {"uri": answer.retval}), self.sent, timeout=5)

    def sent(self, answer: Message | None, exc: BaseException | None) -> None:
        self.msg["code"] = answer.get("code") if answer is not None else "408"
        self.finish()

    def release(self) -> None:
        self.log.append("release")


def _scenario(fn: Any) -> None:
    asyncio.run(asyncio.wait_for(fn(), 10))


def test_deferred_handler_deciding_at_once_is_answered_at_once() -> None:
    async def go() -> None:
        w = Wire()
        w.engine.add_handler("sip.message", lambda m: m.__setitem__("code", "403") or True,
                             deferred=True)
        w.attach()
        mid = w.request(called="bob")
        answers, sent = w.split(w.lines())
        assert sent == []
        assert [(a.id, a.handled, dict(a.changes)) for a in answers] == [
            (mid, True, {"code": "403"})]
        assert w.engine.in_progress == 0

    _scenario(go)


def test_job_goes_on_from_each_answer_within_the_same_read_and_answers_once() -> None:
    async def go() -> None:
        w = Wire()
        log: list[str] = []
        w.relay(log)
        mid = w.request(called="bob")
        answers, (route,) = w.split(w.lines())
        assert answers == [] and route.message.name == "call.route"
        assert w.engine.in_progress == 1
        w.answer(route, retval="sip/sip:bob@10.0.0.1")
        answers, (gen,) = w.split(w.lines())  # the next dispatch left with the same write
        assert gen.message.get("uri") == "sip/sip:bob@10.0.0.1"
        w.answer(gen, code="200")
        answers, sent = w.split(w.lines())
        assert [(a.id, dict(a.changes)) for a in answers] == [(mid, {"code": "200"})]
        assert sent == [] and log == ["routed sip/sip:bob@10.0.0.1 NoneType"]
        assert w.engine.in_progress == 0 and w.engine._flows == 0
        w.answer(gen, code="500")  # a second answer to the same dispatch changes nothing
        assert w.lines() == []

    _scenario(go)


@pytest.mark.parametrize("where", ["run", "routed"])
def test_job_that_raises_is_released_and_answered_as_a_failure(where: str) -> None:
    async def go() -> None:
        w = Wire()
        log: list[str] = []
        w.relay(log, boom=where)
        mid = w.request(called="bob")
        if where == "routed":
            _, (route,) = w.split(w.lines())
            w.answer(route, retval="sip/x")
        answers, _ = w.split(w.lines())
        assert [(a.id, a.handled, dict(a.changes)) for a in answers] == [
            (mid, True, {"code": "500"})]  # sip.*: handled with a code, never a 405
        assert log[-1] == "release" and log.count("release") == 1
        assert w.engine.stats.events["handler_error"] == 1
        assert w.engine.in_progress == 0 and w.engine._flows == 0

    _scenario(go)


def test_job_still_waiting_at_the_answer_deadline_is_released_and_its_late_answer_ignored(
        ) -> None:
    async def go() -> None:
        w = Wire(answer_within=0.05)
        log: list[str] = []
        w.relay(log)
        mid = w.request(called="bob")
        _, (route,) = w.split(w.lines())
        await asyncio.sleep(0.15)
        answers, _ = w.split(w.lines())
        assert [(a.id, dict(a.changes)) for a in answers] == [(mid, {"code": "500"})]
        assert log == ["release"]
        w.answer(route, retval="sip/x")  # too late: nobody waits for it any more
        assert w.lines() == [] and log == ["release"]
        assert w.engine.in_progress == 0 and w.engine._futures == {}

    _scenario(go)


def test_job_gets_the_dispatch_timeout_from_its_callback() -> None:
    async def go() -> None:
        w = Wire()
        log: list[str] = []

        class Quick(Relay):
            def run(self) -> None:
                self.wait(Message("call.route", {}), self.routed, timeout=0.01)

        w.relay(log, cls=Quick)
        mid = w.request()
        await asyncio.sleep(0.2)
        answers, _ = w.split(w.lines())
        assert log == ["routed None DispatchTimeout"]
        assert [(a.id, dict(a.changes)) for a in answers] == [(mid, {"code": "503"})]

    _scenario(go)


def test_connection_closing_releases_a_waiting_job_without_calling_it_back() -> None:
    async def go() -> None:
        w = Wire()
        log: list[str] = []
        w.relay(log)
        w.request()
        w.engine.detach()
        assert log == ["release"]
        assert w.engine.in_progress == 0 and w.engine._flows == 0

    _scenario(go)


def test_job_handed_over_to_a_coroutine_is_answered_by_it() -> None:
    async def go() -> None:
        w = Wire()
        gate = w.engine.new_waiter()

        class Slow(Job):
            def run(self) -> None:
                self.hand_over(self.rest())

            async def rest(self) -> bool:
                await gate
                self.msg["code"] = "202"
                return True

        w.engine.add_handler("sip.message", lambda m: Slow(w.engine, m).start(),
                             deferred=True)
        w.attach()
        mid = w.request()
        assert w.lines() == [] and w.engine.in_progress == 1
        w.engine.runq.active = True  # as inside the engine's own callbacks
        gate.set_result(None)
        w.engine.runq.active = False
        w.engine.flush()
        answers, _ = w.split(w.lines())
        assert [(a.id, dict(a.changes)) for a in answers] == [(mid, {"code": "202"})]
        assert w.engine.in_progress == 0 and w.engine._flows == 0

    _scenario(go)


def test_job_waiting_for_a_gate_goes_on_when_it_is_set() -> None:
    async def go() -> None:
        w = Wire()
        gates: list[Any] = []

        class Queued(Job):
            def run(self) -> None:
                g = w.engine.new_waiter()
                gates.append(g)
                self.wait_for(g, self.through)

            def through(self, _none: None, exc: BaseException | None) -> None:
                self.msg["code"] = "200" if exc is None else "500"
                self.finish()

        w.engine.add_handler("sip.message", lambda m: Queued(w.engine, m).start(),
                             deferred=True)
        w.attach()
        first, second = w.request(), w.request()
        gates[1].set_result(None)  # set from outside the engine: goes on in the next pass
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        answers, _ = w.split(w.lines())
        assert [a.id for a in answers] == [second]
        gates[0].set_exception(DispatchCancelled("gone"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        answers, _ = w.split(w.lines())
        assert [(a.id, dict(a.changes)) for a in answers] == [(first, {"code": "500"})]

    _scenario(go)


def test_deferred_handler_after_another_handler_runs_only_when_that_one_declines() -> None:
    async def go() -> None:
        w = Wire()
        log: list[str] = []
        seen: list[str] = []

        async def first(m: Message) -> bool:
            seen.append(m.get("called") or "")
            if m.get("called") == "echo":
                m["code"] = "200"
                return True
            return False

        w.engine.add_handler("sip.message", first, priority=10)
        w.relay(log, priority=50)
        echo = w.request(called="echo")
        bob = w.request(called="bob")
        for _ in range(3):
            await asyncio.sleep(0)
        answers, sent = w.split(w.lines())
        assert seen == ["echo", "bob"]
        assert [(a.id, dict(a.changes)) for a in answers] == [(echo, {"code": "200"})]
        (route,) = sent
        w.answer(route, retval="sip/b")
        _, (gen,) = w.split(w.lines())
        w.answer(gen, code="486")
        answers, _ = w.split(w.lines())
        assert [(a.id, dict(a.changes)) for a in answers] == [(bob, {"code": "486"})]
        assert w.engine.in_progress == 0

    _scenario(go)


def test_deferred_handler_that_raises_is_answered_as_a_failure() -> None:
    async def go() -> None:
        w = Wire()

        def bad(m: Message) -> bool:
            raise ValueError("bug")

        w.engine.add_handler("sip.message", bad, deferred=True)
        w.attach()
        mid = w.request()
        answers, _ = w.split(w.lines())
        assert [(a.id, a.handled, dict(a.changes)) for a in answers] == [
            (mid, True, {"code": "500"})]
        assert w.engine.stats.events["handler_error"] == 1

    _scenario(go)


def test_async_function_cannot_be_a_deferred_handler() -> None:
    async def h(m: Message) -> bool:
        return True

    with pytest.raises(ValueError):
        Engine().add_handler("sip.message", h, deferred=True)
