"""Coroutines driven straight from the input, without an asyncio Task per message.

The hot path (a relayed MESSAGE) awaits two answers from Yate. With a Task per message, each
answer costs a Future, a ``call_soon`` and a pass of the event loop before the handler goes on.
Here the handler coroutine is stepped by a :class:`Flow` instead, and what it awaits from Yate
is a :class:`Waiter`: when Yate's answer is decoded, the waiting flow is resumed right there,
inside the same read, and its next line leaves with the same write.

* A :class:`Waiter` is awaitable from a Flow *and* from an ordinary asyncio Task (it follows
  asyncio's future protocol: ``_asyncio_future_blocking``, ``add_done_callback``,
  ``get_loop``, ``result``, ``cancel``), so code awaiting it runs the same either way.
* A Flow may await anything a Task may await that is a future (``asyncio`` futures, tasks,
  gathers, ``run_in_executor``, ``asyncio.sleep``); it resumes through the event loop then.
  It has no ``asyncio.current_task()``: code that needs one (``asyncio.timeout``, and
  ``asyncio.wait_for`` from Python 3.12) must not run in a Flow -- the engine runs handlers in
  Flows only when they are registered ``inline=True``.
* Flows made ready by a Waiter are run from one :class:`RunQueue`, in order and without
  recursion: a flow that releases a gate another flow waits on does not run that flow inside
  its own frame.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

_PENDING, _DONE, _CANCELLED = 0, 1, 2


class RunQueue:
    """Flows ready to go on. Drained at once when set ready from the engine's own callbacks
    (reading Yate's lines, its timers); from anywhere else (another Task), on the loop's next
    pass, so a Flow never runs inside a foreign Task."""

    __slots__ = ("_ready", "_running", "_scheduled", "_loop", "active", "after", "woke_task")

    def __init__(self, after: Callable[[], None] | None = None) -> None:
        self.after = after  # run after a drain the loop scheduled (the engine's flush)
        self._ready: deque[tuple[Flow, BaseException | None, Any]] = deque()
        self._running = False
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.active = False  # True while the engine runs one of its own callbacks
        #: Set when an asyncio Task was woken (it runs in the loop's next pass): the engine
        #: then queues its flush behind it, so what the Task writes leaves in that same pass.
        self.woke_task = False

    def push(self, flow: "Flow", exc: BaseException | None = None, token: Any = None) -> None:
        """Make ``flow`` go on (throwing ``exc`` into it, if given). ``token`` is what woke it:
        a wake-up by something the flow no longer waits for is ignored."""
        if self._running:
            self._ready.append((flow, exc, token))
            return
        if self.active:
            if self._ready:  # older ones first
                self._ready.append((flow, exc, token))
                self.drain()
                return
            # the usual case (a flow woken by Yate's answer): step it at once, then whatever
            # it made ready -- what drain() would do, without the queue round trip
            self.run(flow.step, exc, token)
            return
        self._ready.append((flow, exc, token))
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._drain_soon)

    def run(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` now as one step of the queue: the flows (and jobs) it makes
        ready run after it returns, in order, never inside it. (A callback of the engine's
        own, such as a Job's, goes through here.)"""
        if self._running:
            fn(*args)  # inside a drain already: what it wakes waits its turn
            return
        self._running = True
        try:
            fn(*args)
            ready = self._ready
            while ready:
                f, e, t = ready.popleft()
                f.step(e, t)
        finally:
            self._running = False

    def _drain_soon(self) -> None:
        self._scheduled = False
        self.active = True
        try:
            self.drain()
        finally:
            self.active = False
        if self.after is not None:
            self.after()

    def drain(self) -> None:
        """Run the flows that are ready, in order (nothing when a drain is running already:
        that one runs them)."""
        self.run(_nothing)


def _nothing() -> None:
    pass


class Waiter:
    """A one-shot result that a Flow or a Task awaits (an asyncio-compatible future).

    A subclass that must act when cancelled before a result arrived overrides :meth:`cancel`
    (the engine's dispatch waiter stops waiting for Yate's answer).
    """

    __slots__ = ("_state", "_result", "_exc", "_flow", "_callbacks", "_queue", "_loop",
                 "_asyncio_future_blocking")

    def __init__(self, queue: RunQueue, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._state = _PENDING
        self._result: Any = None
        self._exc: BaseException | None = None
        self._flow: Flow | None = None
        self._callbacks: list[Callable[[Any], None]] | None = None
        self._queue = queue
        self._loop = loop
        self._asyncio_future_blocking = False

    # -- awaiting ------------------------------------------------------------------------------
    def __await__(self):
        if self._state == _PENDING:
            self._asyncio_future_blocking = True
            yield self
        if self._state == _DONE and self._exc is None:
            return self._result
        return self.result()

    __iter__ = __await__

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> Any:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError()
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("result is not ready")
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self) -> BaseException | None:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError()
        return self._exc

    def get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def add_done_callback(self, fn: Callable[[Any], None], *, context: Any = None) -> None:
        """asyncio's protocol (a Task awaiting us): called through the loop, as asyncio does."""
        if self._state != _PENDING:
            self.get_loop().call_soon(fn, self, context=context)
            return
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(fn if context is None else (lambda f, c=context: c.run(fn, f)))

    def remove_done_callback(self, fn: Callable[[Any], None]) -> int:
        if not self._callbacks:
            return 0
        n = len(self._callbacks)
        self._callbacks = [cb for cb in self._callbacks if cb is not fn]
        return n - len(self._callbacks)

    # -- resolving -----------------------------------------------------------------------------
    def set_result(self, value: Any) -> None:
        if self._state != _PENDING:
            return
        self._state = _DONE
        self._result = value
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._state != _PENDING:
            return
        self._state = _DONE
        self._exc = exc
        self._wake()

    def cancel(self, msg: Any = None) -> bool:
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._wake()
        return True

    def _wake(self) -> None:
        flow = self._flow
        if flow is not None:
            self._flow = None
            self._queue.push(flow, None, self)
        if self._callbacks:  # asyncio Tasks awaiting us
            self._queue.woke_task = True
            loop = self.get_loop()
            for cb in self._callbacks:
                loop.call_soon(cb, self)
            self._callbacks = None


class Flow:
    """Steps one coroutine: resumed directly by the :class:`Waiter` it awaits, or through the
    loop by an asyncio future. ``done`` is called with the flow, the coroutine's return value
    and the exception that ended it (``CancelledError`` included; ``None`` on a return)."""

    __slots__ = ("coro", "queue", "waiting", "done", "finished", "arg")

    def __init__(self, coro: Coroutine[Any, Any, Any], queue: RunQueue,
                 done: Callable[["Flow", Any, BaseException | None], None] | None = None,
                 arg: Any = None) -> None:
        self.coro = coro
        self.queue = queue
        self.waiting: Any = None
        self.done = done
        self.finished = False
        self.arg = arg  # whatever ``done`` needs to know (the engine: the message)

    def start(self) -> "Flow":
        self.queue.push(self)
        return self

    def step(self, exc: BaseException | None = None, token: Any = None) -> None:
        if self.finished or (token is not None and token is not self.waiting):
            return  # over, or a stale wake-up (it was cancelled meanwhile)
        self.waiting = None
        try:
            if exc is None:
                awaited = self.coro.send(None)
            else:
                awaited = self.coro.throw(exc)
        except StopIteration as e:
            self._finish(e.value, None)
            return
        except BaseException as e:  # noqa: BLE001 - handed to ``done``; never lost
            self._finish(None, e)
            return
        if isinstance(awaited, Waiter):
            awaited._asyncio_future_blocking = False
            self.waiting = awaited
            if awaited._state != _PENDING:
                self.queue.push(self, None, awaited)
            else:
                awaited._flow = self
        elif getattr(awaited, "_asyncio_future_blocking", None):
            awaited._asyncio_future_blocking = False
            self.waiting = awaited
            awaited.add_done_callback(self._wakeup)
        elif awaited is None:  # a bare yield (asyncio.sleep(0)): go on in the next pass
            self.queue.push(self)
        else:
            self.queue.push(self, RuntimeError(f"a Flow cannot await {awaited!r}"))

    def _wakeup(self, fut: Any) -> None:
        self.queue.push(self, None, fut)

    def cancel(self) -> bool:
        """Throw ``CancelledError`` into the coroutine where it waits (as ``Task.cancel``)."""
        if self.finished:
            return False
        w, self.waiting = self.waiting, None
        if isinstance(w, Waiter):
            w._flow = None
            w.cancel()
        elif w is not None:
            w.remove_done_callback(self._wakeup)
            w.cancel()
        self.queue.push(self, asyncio.CancelledError())
        return True

    def _finish(self, value: Any, exc: BaseException | None) -> None:
        self.finished = True
        if self.done is not None:
            self.done(self, value, exc)
