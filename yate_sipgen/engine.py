"""The asyncio runtime: handlers, dispatch, deadlines and back-pressure around a Session.

Features register with the small public API::

    @engine.handler("sip.message", priority=50)
    async def on_message(msg: Message) -> bool: ...   # True: handled (stop), False: go on

    @engine.watcher("user.register")
    async def on_register(msg: Message) -> None: ...

    answered = await engine.dispatch(Message("call.route", {...}), timeout=5)
    engine.enqueue(Message("msg.execute", {...}))    # fire-and-forget: empty id, no answer

A handler on the hot path may instead be *deferred* (``add_handler(..., deferred=True)``): a
plain function that answers at once (returns a bool) or hands back the :class:`Job` (or the
Flow, :meth:`Engine.run_flow`) that will answer; a Job goes on from Yate's answers by callbacks
(:meth:`Job.wait`), without a coroutine to step.

Yate allows one install and one watch per message name per script (reference §1.4.4, §1.4.6),
so the engine installs each name once and fans out to every registered handler itself, in
priority order, applying each handler's filter. Plain (non-async) handlers run inline, without
a task: ``engine.status`` and ``engine.timer`` cost almost nothing.

Every incoming message is answered exactly once, before its deadline:

* a handler that returns answers with what it changed;
* one that raises gets the failure answer (``sip.*``: handled with ``code=500``; others:
  unhandled and unchanged), logged and counted;
* one still running at the deadline is cancelled and gets the same failure answer;
* past ``max_in_progress`` messages in progress, ``sip.*`` gets 503 + ``Retry-After`` at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from .errors import DispatchCancelled, DispatchTimeout, LineTooLong, LocalProtocolError
from .flow import _PENDING, Flow, RunQueue, Waiter
from .message import Message
from .session import RETRY_AFTER, BadLineReceived, Session, is_sip
from .stats import Stats

log = logging.getLogger("yate_sipgen.engine")

Handler = Callable[[Message], "bool | None | Awaitable[bool | None]"]
Watcher = Callable[[Message], "None | Awaitable[None]"]


class _Dispatched(Waiter):
    """What :meth:`Engine.dispatch` returns: the waiter for Yate's answer, with its own
    bookkeeping (id, expiry), so one dict entry per pending dispatch is all the engine keeps."""

    __slots__ = ("mid", "expires", "what", "secs", "engine", "session")

    def cancel(self, msg: Any = None) -> bool:
        if self._state != _PENDING:
            return False
        self.engine._forget(self.mid, self.session)  # stop waiting for Yate's answer
        return Waiter.cancel(self, msg)


class Job:
    """A handler's work on one message that goes on from Yate's answers by callbacks.

    The hot path's alternative to a coroutine: a deferred handler creates one, calls
    :meth:`start` (which registers it as the message's running work), and waits for
    Yate's answers (:meth:`wait`); each ``then(answer, exc)`` callback runs right where the
    answer is read. It ends with exactly one of :meth:`finish` (answer now),
    :meth:`hand_over` (go on as a coroutine, in a Flow) or a failure: a callback that raises
    is logged, the job released and the message answered as a failure. Subclasses override
    :meth:`release` to give back what they hold; it runs when the job is cancelled (the
    answer deadline, the connection closing) or fails, never after :meth:`finish` /
    :meth:`hand_over`.
    """

    # A job waits for one dispatch at a time, and is itself the engine's record of it
    # (Engine._futures: mid, expires, what, secs, session; done / set_result /
    # set_exception): nothing is made per wait.
    __slots__ = ("engine", "msg", "_then", "_over", "_waiter", "_waiter_then", "mid",
                 "expires", "what", "secs", "session")

    def __init__(self, engine: "Engine", msg: Message) -> None:
        self.engine = engine
        self.msg = msg
        self._then: Any = None  # the callback of the dispatch it waits for
        self._over = False
        self._waiter: Waiter | None = None
        self._waiter_then: Any = None

    def start(self) -> "Job":
        """Register as ``msg``'s running work, then run :meth:`run` (failures handled)."""
        self.engine._job_begin(self)
        self.engine.runq.run(self._run_first)
        return self

    def _run_first(self) -> None:
        try:
            self.run()
        except Exception as e:  # noqa: BLE001 - a bug in the job: still answered
            self.engine._job_failed(self, e)

    def run(self) -> None:
        """The first step (override)."""
        raise NotImplementedError

    def wait(self, msg: Message, then: Callable[[Message | None, BaseException | None], None],
             timeout: float | None = None) -> None:
        """Dispatch ``msg``; ``then(answer, None)`` on Yate's answer (``.handled`` set), or
        ``then(None, exc)`` with :class:`DispatchTimeout` / :class:`DispatchCancelled`.
        Raises as :meth:`Engine.dispatch` does when the message cannot be sent."""
        self.wait_wire(msg.name, "", then, timeout, msg)

    def wait_wire(self, name: str, wire: str,
                  then: Callable[[Message | None, BaseException | None], None],
                  timeout: float | None = None, msg: Message | None = None) -> None:
        """:meth:`wait` for the message ``name`` given by its escaped params (``:k=v...``,
        as :meth:`Message.wire_params` gives them), without building a Message (or for
        ``msg``, when given)."""
        e = self.engine
        s = e.session
        if s is None:
            raise DispatchCancelled("not connected to Yate")
        # raises before anything is kept when Yate would refuse it
        mid = s.dispatch_wire(name, wire) if msg is None else s.dispatch(msg)
        self._then = then
        e._keep_pending(self, mid, s, name, timeout)

    # -- the pending dispatch (what Engine._futures holds) ----------------------------------
    def done(self) -> bool:
        return self._then is None

    def set_result(self, value: Any) -> None:
        """Yate's answer to the dispatch: the callback runs as a step of the run queue (what
        it wakes, such as the next holder of a lock, goes on after it)."""
        then = self._then
        if then is not None:
            self._then = None
            self.engine.runq.run(self._call, then, value, None)

    def set_exception(self, exc: BaseException) -> None:
        then = self._then
        if then is not None:
            self._then = None
            self.engine.runq.run(self._call, then, None, exc)

    def wait_for(self, waiter: Waiter, then: Callable[[None, BaseException | None], None]
                 ) -> None:
        """Go on with ``then(None, exc)`` once ``waiter`` (an engine :class:`Waiter`, such as
        a gate's) is set; ``exc`` is what it was failed with, or None."""
        self._waiter = waiter
        self._waiter_then = then
        if waiter.done():
            self.engine.runq.push(self, None, waiter)  # type: ignore[arg-type]
        else:
            waiter._flow = self  # type: ignore[assignment]

    def step(self, exc: BaseException | None = None, token: Any = None) -> None:
        """What the run queue calls when the awaited Waiter is set (as it steps a Flow)."""
        w = self._waiter
        if self._over or w is None or token is not w:
            return  # over, or a stale wake-up
        self._waiter = None
        self._go(self._waiter_then, None, exc if exc is not None else w._exc)

    def finish(self, handled: bool = True) -> None:
        """Done: answer the message (unless answered already) with its changes."""
        if self.engine._job_end(self):
            msg = self.msg
            if not msg.answered:
                self.engine._answer(msg, handled)

    def hand_over(self, coro: Any) -> None:
        """Go on as the coroutine ``coro`` (its return value is the handled flag, as for an
        inline handler)."""
        if self.engine._job_end(self, keep_count=True):
            # its first step runs now, as the rest of this step (what this job woke, such as
            # the next holder of a lock it gave up, goes on after it, as after a Flow's step)
            self.engine._flow_for(self.msg, coro, now=True)

    def cancel(self) -> bool:
        """Stop (the answer deadline or the connection's end): stop waiting, release."""
        if self._over:
            return False
        if self._then is not None:  # stop waiting for Yate's answer: no callback
            self._then = None
            self.engine._forget(self.mid, self.session)
        w, self._waiter = self._waiter, None
        if w is not None and w._flow is self:  # type: ignore[comparison-overlap]
            w._flow = None
        self.engine._job_end(self)
        self.release()
        return True

    def release(self) -> None:
        """Give back what the job holds (override); it will not be called back again."""

    def _go(self, then: Callable[[Any, BaseException | None], None], answer: Any,
            exc: BaseException | None) -> None:
        # a step of the run queue: a flow or job this one wakes (the recipient's lock passed
        # on) goes on after this callback, as it would after a Flow's step
        self.engine.runq.run(self._call, then, answer, exc)

    def _call(self, then: Callable[[Any, BaseException | None], None], answer: Any,
              exc: BaseException | None) -> None:
        try:
            then(answer, exc)
        except Exception as e:  # noqa: BLE001 - a bug in the job: the message still gets answered
            self.engine._job_failed(self, e)


@dataclass(slots=True)
class _Entry:
    func: Handler
    priority: int
    filter: tuple[str, str] | None
    is_async: bool
    owner: str
    inline: bool = False
    deferred: bool = False


@dataclass(slots=True)
class _Route:
    """Everything registered for one message name: installed once in Yate."""

    entries: list[_Entry] = field(default_factory=list)
    all_sync: bool = True
    inline: bool = True  # every async handler may run in a Flow (see flow.py)
    single: Handler | None = None  # the only entry, inline async without a filter
    deferred: Handler | None = None  # the only entry, a deferred handler (see Job)

    def install_args(self) -> tuple[int, str | None, str | None]:
        prio = min(e.priority for e in self.entries)
        filters = {e.filter for e in self.entries}
        if len(filters) == 1 and None not in filters:
            (f,) = filters
            return prio, f[0], f[1]
        return prio, None, None


class Engine:
    """One running script: a registry of handlers and a live connection to Yate.

    Args:
        answer_within: seconds after reading a message by which it must be answered; keep it
            below Yate's ``timeout`` for this script.
        dispatch_timeout: default seconds to wait for Yate's answer to our own messages.
        max_in_progress: async handlers running at once before ``sip.*`` gets 503.
    """

    def __init__(self, *, answer_within: float = 9.0, dispatch_timeout: float = 10.0,
                 max_in_progress: int = 2000, stats: Stats | None = None) -> None:
        self.routes: dict[str, _Route] = {}
        self.watchers: dict[str, list[Watcher]] = {}
        self.answer_within = answer_within
        self.dispatch_timeout = dispatch_timeout
        self.max_in_progress = max_in_progress
        self.stats = stats or Stats()
        self.session: Session | None = None
        self._write: Callable[[bytes], None] | None = None
        self._flush_scheduled = False
        # our dispatches waiting for Yate's answer: a _Dispatched, or the Job that waits
        self._futures: dict[str, _Dispatched | Job] = {}
        self._clock: Callable[[], float] = time.monotonic  # the loop's clock (see attach)
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: dict[str, asyncio.Task[None] | Flow] = {}  # handlers still running
        self.runq = RunQueue(self.flush)
        self._bg: set[asyncio.Task[Any]] = set()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0  # when _deadline_timer fires
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_reply: Callable[[object], None] | None = None  # keyword replies, for the app
        self.on_connected: list[Callable[[], None]] = []  # hooks run after each (re)connect
        self._flows = 0  # how many of _tasks are Flows
        self._early: list[bytes] = []  # read before attach(): fed once attached

    # -- registration ------------------------------------------------------------------------
    def handler(self, name: str, *, priority: int = 100, filter: tuple[str, str] | None = None,
                owner: str = "") -> Callable[[Handler], Handler]:
        """Decorator: handle ``name``. Return True when handled (later handlers are skipped)."""

        def deco(func: Handler) -> Handler:
            self.add_handler(name, func, priority=priority, filter=filter, owner=owner)
            return func

        return deco

    def add_handler(self, name: str, func: Handler, *, priority: int = 100,
                    filter: tuple[str, str] | None = None, owner: str = "",
                    inline: bool = False, deferred: bool = False) -> None:
        """Register ``func`` for ``name``.

        ``inline=True`` (async handlers): run it in a :class:`~yate_sipgen.flow.Flow` instead
        of an asyncio Task: no Task, and each answer from Yate it awaits resumes it within the
        same read. Its code must not need ``asyncio.current_task()`` (no ``asyncio.timeout``;
        no ``asyncio.wait_for`` on Python 3.12+).

        ``deferred=True`` (a plain function): it returns a bool when it has decided at once
        (handled or not), or the work it started that answers later: a :class:`Job`
        (``job.start()``) or :meth:`run_flow`'s Flow. Handlers after it then do not run.
        As a name's only handler it is called straight from the input.
        """
        p.check_raw(name, "message name")
        route = self.routes.setdefault(name, _Route())
        is_async = inspect.iscoroutinefunction(func)
        if deferred and is_async:
            raise ValueError(f"a deferred handler of {name} must be a plain function")
        route.entries.append(_Entry(func, priority, filter, is_async, owner, inline, deferred))
        route.entries.sort(key=lambda e: e.priority)
        route.all_sync = not any(e.is_async or e.deferred for e in route.entries)
        route.inline = all(e.inline for e in route.entries if e.is_async)
        only = route.entries[0] if len(route.entries) == 1 else None
        route.single = (only.func if only is not None and only.is_async and only.inline
                        and only.filter is None else None)
        route.deferred = (only.func if only is not None and only.deferred
                          and only.filter is None else None)

    def watcher(self, name: str) -> Callable[[Watcher], Watcher]:
        """Decorator: be told about every dispatched ``name`` (post-dispatch, no answer)."""

        def deco(func: Watcher) -> Watcher:
            p.check_raw(name, "watch name")
            self.watchers.setdefault(name, []).append(func)
            return func

        return deco

    # -- connection ----------------------------------------------------------------------------
    def attach(self, write: Callable[[bytes], None], *, role: str | None = None,
               setlocals: list[tuple[str, str | bool | int]] = ()) -> Session:
        """Start a new connection: a fresh Session, the setlocals, then every install and watch."""
        self._loop = loop = asyncio.get_running_loop()
        self.runq._loop = loop
        # asyncio's own clock is time.monotonic behind a Python method: call it directly
        self._clock = (time.monotonic if type(loop).time is asyncio.BaseEventLoop.time
                       else loop.time)
        self.now = self._clock  # type: ignore[method-assign]
        self.session = s = Session(answer_within=self.answer_within)
        self._write = write
        if role:
            s.connect(role)
        for name, value in setlocals:
            s.setlocal(name, value)
        for name, route in self.routes.items():
            prio, fname, fvalue = route.install_args()
            s.install(name, prio, fname, fvalue)
        for name in self.watchers:
            s.watch(name)
        self.flush()
        for cb in self.on_connected:
            cb()
        if self._early:
            early, self._early = b"".join(self._early), []
            self.feed(early)
        return s

    def detach(self) -> None:
        """The connection is gone: fail pending dispatches, drop messages nobody can answer."""
        s = self.session
        self.session = None
        self._write = None
        self._early = []
        # the running work first (a Job stops waiting and releases what it holds; a Flow is
        # thrown CancelledError where it waits), then whatever else waits for an answer
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        pending = list(self._futures.values())
        self._futures.clear()
        for fut in pending:
            fut.set_exception(DispatchCancelled("connection to Yate closed"))
        if s is not None:
            s.incoming.clear()
        if self._deadline_timer:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def flush(self) -> None:
        self._flush_scheduled = False
        s = self.session
        if s is not None and s.has_output and self._write is not None:
            self._write(s.data_to_send())

    def _schedule_flush(self) -> None:
        if self.runq.active:
            return  # inside feed() or a timer of ours: it flushes when done
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    # -- input ---------------------------------------------------------------------------------
    #: A read is handled in slices of about this many bytes (cut after a line), and what
    #: each slice produced is written before the next one is decoded. Yate's threads get
    #: their lines while we still work on the rest of a burst, instead of after all of it
    #: (one write per read made the two sides take turns: a pipe benchmark spent a fifth
    #: of its time with the script idle, waiting for the answers to a batch it had just
    #: written). 16 KiB is about 25 sip.message lines: a write per slice costs nothing next
    #: to the slice's work.
    SLICE = 16384

    def feed(self, data: bytes) -> None:
        """Bytes from Yate: decode, run what they ask for, write what resulted (one write
        per :attr:`SLICE` of input)."""
        s = self.session
        if s is None:
            self._early.append(data)  # nothing is lost before attach()
            return
        now = self._clock()
        runq = self.runq
        runq.active = True
        try:
            start, end = 0, len(data)
            while start < end:  # one pass for a read of up to SLICE bytes (the usual)
                cut = data.find(b"\n", start + self.SLICE) + 1 or end
                self._feed(s.receive_data(data[start:cut], now))
                runq.drain()  # the flows Yate's answers woke go on now
                start = cut
                if start < end:
                    self.flush()
        finally:
            runq.active = False
        self.flush()
        # Tasks woken or started above run in the loop's next pass; a flush queued *now* runs
        # right after them in that same pass, so their output leaves one pass earlier. Only
        # then: the hot path has no Task, and a flush queued on every read cost a call_soon
        # and a loop pass per read (13k instructions, counted with callgrind).
        if runq.woke_task:
            runq.woke_task = False
            self._schedule_flush()

    def _feed(self, events: list[object]) -> None:
        futures = self._futures
        for ev in events:
            t = type(ev)
            if t is p.AnswerReceived:  # two of the three lines of a relayed MESSAGE
                fut = futures.pop(ev.id, None)
                if fut is not None:
                    msg = ev.message
                    msg.handled = ev.handled
                    fut.set_result(msg)  # the waiting flow goes on right here
            elif t is p.MessageReceived:
                self._on_message(ev.message)
            elif t is p.WatchReceived:
                self._on_watch(ev)
            elif t is BadLineReceived:
                self.stats.events["bad_line"] += 1
                log.warning("bad line from Yate (%s): %r", ev.error.reason, ev.line[:120])
            elif t is p.ErrorInReceived:
                self.stats.events["error_in"] += 1
                log.error("Yate could not parse our line: %r", ev.line[:200])
            elif self.on_reply is not None:
                self.on_reply(ev)

    def _on_message(self, msg: Message) -> None:
        self.stats.handled[msg.name] += 1
        route = self.routes.get(msg.name)
        if route is None:
            self._answer(msg, False)
            return
        if route.all_sync:
            self._run_sync(msg, route)
            return
        if len(self._tasks) >= self.max_in_progress and is_sip(msg.name):
            # shed SIP load only: console commands and engine messages still run
            self.stats.events["overload"] += 1
            self._fail(msg, 503, RETRY_AFTER)
            return
        deferred = route.deferred
        if deferred is not None:
            self._run_deferred(msg, deferred)
            return
        if route.inline:
            self._flows += 1
            single = route.single
            if single is not None:  # the handler's own coroutine is the flow: one frame less
                flow = Flow(single(msg), self.runq, self._single_done, msg)
            else:
                flow = Flow(self._run(msg, route), self.runq, self._flow_done)
            self._tasks[msg.id] = flow
            flow.start()
        else:
            self._tasks[msg.id] = self._loop.create_task(self._run(msg, route))
            self.runq.woke_task = True
        self._watch(msg)

    def _run_deferred(self, msg: Message, func: Handler) -> None:
        try:
            r = func(msg)
        except Exception:
            self.stats.events["handler_error"] += 1
            log.exception("handler for %s failed", msg.name)
            task = self._tasks.get(msg.id)
            if task is not None:
                task.cancel()
            self._fail(msg, 500)
            return
        if msg.id in self._tasks:  # it goes on (a Job or a Flow): the deadline watches it
            self._watch(msg)
        elif not msg.answered:
            self._answer(msg, bool(r))

    def _watch(self, msg: Message) -> None:
        """Keep the deadline timer no later than ``msg``'s deadline (it is being worked on)."""
        timer = self._deadline_timer
        if timer is None or msg.deadline < self._deadline_at:  # earlier after a reload
            if timer is not None:
                timer.cancel()
            self._arm_deadline(msg.deadline)

    def run_flow(self, msg: Message, coro: Any) -> Flow:
        """From a deferred handler: go on as the coroutine ``coro`` (it answers ``msg`` with
        its return value, as an inline handler does)."""
        self._flows += 1
        return self._flow_for(msg, coro)

    def _flow_for(self, msg: Message, coro: Any, now: bool = False) -> Flow:
        flow = Flow(coro, self.runq, self._single_done, msg)
        self._tasks[msg.id] = flow
        if now:
            flow.step()
        else:
            flow.start()
        return flow

    # -- jobs (see Job) ------------------------------------------------------------------------
    def _job_begin(self, job: Job) -> None:
        self._flows += 1  # counted as a flow: no Task to flush after
        self._tasks[job.msg.id] = job

    def _job_end(self, job: Job, keep_count: bool = False) -> bool:
        """The job is over (False if it was already): forget it as the message's work."""
        if job._over:
            return False
        job._over = True
        mid = job.msg.id
        if self._tasks.get(mid) is job:
            del self._tasks[mid]
        if not keep_count:
            self._flows -= 1
        return True

    def _job_failed(self, job: Job, exc: BaseException) -> None:
        msg = job.msg
        self.stats.events["handler_error"] += 1
        log.error("handler for %s failed%s", msg.name, " after answering" if msg.answered else "",
                  exc_info=exc)
        job.cancel()  # releases what it holds, unless it had ended already
        self._fail(msg, 500)  # (nothing when it was answered)

    def _keep_pending(self, pending: Any, mid: str, s: Session, what: str,
                      timeout: float | None) -> None:
        """Wait for Yate's answer to ``mid`` (a dispatch just queued): kept until it comes or
        the sweeper finds it expired."""
        pending.mid = mid
        secs = pending.secs = self.dispatch_timeout if timeout is None else timeout
        # No timer per dispatch (this is on the hot path twice per MESSAGE): one sweeper
        # checks the pending dispatches a few times a second.
        pending.expires = self._clock() + secs
        pending.what = what
        pending.engine = self
        pending.session = s
        self._futures[mid] = pending
        if not self.runq.active:
            self._schedule_flush()
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.SWEEP, self._sweep_dispatches)

    def _single_done(self, flow: Flow, handled: Any, exc: BaseException | None) -> None:
        """The end of a Flow running a route's only handler: what :meth:`_run` does after it."""
        msg: Message = flow.arg
        self._flows -= 1
        self._tasks.pop(msg.id, None)
        if exc is None:
            if not msg.answered:
                self._answer(msg, bool(handled))
            return
        if isinstance(exc, asyncio.CancelledError):
            if not msg.answered and self.session is not None and msg.id in self.session.incoming:
                self._fail(msg, 500)
            return
        self.stats.events["handler_error"] += 1
        log.error("handler for %s failed%s", msg.name, " after answering" if msg.answered else "",
                  exc_info=exc)
        if not msg.answered:
            self._fail(msg, 500)

    def _flow_done(self, flow: Flow, value: Any, exc: BaseException | None) -> None:
        self._flows -= 1
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.stats.events["handler_error"] += 1  # _run catches handler errors: a bug
            log.error("message flow failed", exc_info=exc)

    def _run_sync(self, msg: Message, route: _Route) -> None:
        try:
            handled = False
            for e in route.entries:
                f = e.filter
                if f is not None and (msg.get(f[0]) or "") != f[1]:
                    continue
                if e.func(msg):
                    handled = True
                    break
        except Exception:
            self.stats.events["handler_error"] += 1
            log.exception("handler for %s failed", msg.name)
            self._fail(msg, 500)
            return
        self._answer(msg, handled)

    async def _run(self, msg: Message, route: _Route) -> None:
        try:
            handled = False
            for e in route.entries:
                f = e.filter
                if f is not None and (msg.get(f[0]) or "") != f[1]:
                    continue
                r = e.func(msg)
                if e.deferred and r is not None and type(r) is not bool:
                    return  # the work it started is the message's now, and answers it
                if e.is_async:
                    r = await r
                if r:
                    handled = True
                    break
        except asyncio.CancelledError:
            if not msg.answered and self.session is not None and msg.id in self.session.incoming:
                self._fail(msg, 500)
            raise
        except Exception:
            self._tasks.pop(msg.id, None)
            self.stats.events["handler_error"] += 1
            log.exception("handler for %s failed%s", msg.name,
                          " after answering" if msg.answered else "")
            if not msg.answered:
                self._fail(msg, 500)
            return
        self._tasks.pop(msg.id, None)
        if not msg.answered:
            self._answer(msg, handled)

    def answer_now(self, msg: Message, handled: bool = True) -> None:
        """Answer before the handler returns (its later return value is then ignored)."""
        self._answer(msg, handled)

    def _answer(self, msg: Message, handled: bool) -> None:
        s = self.session
        if s is None or msg.id not in s.incoming:
            return  # connection gone, or already answered at the deadline
        err = s.answer(msg, handled)
        if err is not None:
            self.stats.events["answer_too_long"] += 1
            log.error("answer to %s too long (%s); sent the failure answer", msg.name, err)
        if msg.original_name.startswith("sip."):  # is_sip()
            changes = msg.changes  # (the code a handler set is there: no lookup of the line)
            code = changes.get("code") if changes else None
            if code is None:
                code = msg.get("code")
            self.stats.codes[code or ("200" if handled else "405")] += 1
        if not self.runq.active:
            self._schedule_flush()

    def _fail(self, msg: Message, code: int, retry_after: str | None = None) -> None:
        s = self.session
        if s is None or msg.id not in s.incoming:
            return
        s.answer_failure(msg, code, retry_after)
        if is_sip(msg.original_name):
            self.stats.codes[str(code)] += 1
        self._schedule_flush()

    # -- deadlines -----------------------------------------------------------------------------
    def _arm_deadline(self, when: float) -> None:
        self._deadline_at = when
        self._deadline_timer = self._loop.call_at(when, self._deadline_fired)

    def _deadline_fired(self) -> None:
        self._deadline_timer = None
        s = self.session
        if s is None:
            return
        self.runq.active = True
        try:
            self._overdue(s)
            self.runq.drain()
        finally:
            self.runq.active = False
        self.flush()

    def _overdue(self, s: Session) -> None:
        now = self._clock()
        for msg in s.overdue(now):
            self.stats.events["answer_deadline"] += 1
            log.warning("handler for %s did not finish within %.1fs; answered as a failure",
                        msg.name, self.answer_within)
            self._fail(msg, 500)
            task = self._tasks.pop(msg.id, None)
            if task is not None:
                task.cancel()
        nxt = s.next_deadline()
        if nxt is not None:
            self._arm_deadline(max(nxt, now + 0.001))

    # -- watches ------------------------------------------------------------------------------
    def _on_watch(self, ev: p.WatchReceived) -> None:
        msg = ev.message
        msg.handled = ev.handled
        funcs = self.watchers.get(msg.name, ())
        anyname = self.watchers.get("")
        if anyname:  # a wildcard watch sees every message, besides the named watchers
            funcs = [*funcs, *anyname]
        for func in funcs:
            try:
                r = func(msg)
                if inspect.isawaitable(r):
                    self.spawn(r, f"watcher of {msg.name}")
            except Exception:
                self.stats.events["handler_error"] += 1
                log.exception("watcher of %s failed", msg.name)

    def spawn(self, coro: Awaitable[Any], what: str = "task") -> asyncio.Task[Any]:
        """Run a background coroutine; its failure is logged and counted, never lost."""
        task = asyncio.ensure_future(coro)
        self._bg.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.stats.events["handler_error"] += 1
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- output --------------------------------------------------------------------------------
    def dispatch(self, msg: Message, timeout: float | None = None) -> Waiter:
        """Send ``msg`` to Yate; await the result for its answer (the final message, with
        ``.handled`` set).

        The awaitable raises :class:`DispatchTimeout` after ``timeout`` seconds (default
        ``dispatch_timeout``) and :class:`DispatchCancelled` if the connection closes; the call
        itself raises :class:`LineTooLong` / :class:`LocalProtocolError` before sending
        anything that Yate would refuse. Cancelling it stops waiting for the answer.
        """
        s = self.session
        if s is None:
            w = Waiter(self.runq, self._loop)
            w.set_exception(DispatchCancelled("not connected to Yate"))
            return w
        mid = s.dispatch(msg)  # raises before anything is kept when Yate would refuse it
        w = _Dispatched(self.runq, self._loop)
        self._keep_pending(w, mid, s, msg.name, timeout)
        return w

    def _forget(self, mid: str, s: Session) -> None:
        self._futures.pop(mid, None)
        if self.session is s:
            s.forget(mid)

    SWEEP = 0.05

    def _sweep_dispatches(self) -> None:
        self._sweeper = None
        now = self._clock()
        expired = [w for w in self._futures.values() if w.expires <= now]
        self.runq.active = True
        try:
            for fut in expired:
                mid = fut.mid
                self._futures.pop(mid, None)
                if self.session is not None:
                    self.session.forget(mid)
                if not fut.done():
                    self.stats.events["dispatch_timeout"] += 1
                    fut.set_exception(DispatchTimeout(
                        f"{fut.what} got no answer from Yate within {fut.secs:g}s"))
            self.runq.drain()
        finally:
            self.runq.active = False
        self.flush()
        if self._futures:
            self._sweeper = self._loop.call_later(self.SWEEP, self._sweep_dispatches)

    def enqueue(self, msg: Message) -> None:
        """Fire-and-forget: dispatch with an empty id. Yate never answers it, and (reference
        Surprise 10) delivers it to our own handlers and watchers too."""
        s = self.session
        if s is None:
            raise DispatchCancelled("not connected to Yate")
        s.dispatch(msg, expect_answer=False)
        self._schedule_flush()

    def send_keyword(self, kind: str, *args: Any) -> None:
        """Write a keyword line now (``setlocal``, ``output``, ``debug``, ``quit``, ...)."""
        s = self.session
        if s is None:
            raise DispatchCancelled("not connected to Yate")
        getattr(s, kind)(*args)
        self._schedule_flush()

    def new_waiter(self) -> Waiter:
        """A one-shot awaitable that resumes a waiting Flow at once when set (gates, queues)."""
        return Waiter(self.runq, self._loop)

    def now(self) -> float:
        """The loop's clock (deadlines and dispatch timeouts are on it). Once attached, the
        instance's ``now`` is that clock itself (no method call on the hot path)."""
        return self._clock()

    @property
    def in_progress(self) -> int:
        return len(self._tasks)


__all__ = ["Engine", "Message", "DispatchTimeout", "DispatchCancelled", "LineTooLong",
           "LocalProtocolError"]
