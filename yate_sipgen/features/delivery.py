"""Getting a MESSAGE to a user: routing through Yate, sending, forking, store and forward.

* **Routing** is Yate's: ``call.route`` with ``route_type=msg`` reaches whatever the operator
  runs (regfile, register/DB, regexroute). :func:`parse_route` turns each backend's real answers
  (reference §3.8, §6) into targets or a failure.
* **Sending** is ``xsip.generate`` with ``wait=true`` for ``sip/`` targets and ``msg.execute``
  for any other channel (e.g. Jabber). Every attempt of one message carries the same Call-ID,
  From tag and CSeq, so a phone can drop the duplicate a lost 2xx may cause.
* **Forks** go out in parallel; the first 2xx wins; otherwise the best failure as RFC 3261
  §16.7 picks it.
* **Order**: deliveries to one user go one at a time (RFC 3428 §8), through a per-user lock;
  live messages wait behind that user's stored backlog.
* **Store and forward**: rows are claimed with a lease, deleted only after a 2xx, retried with
  bounded back-off until they expire.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DispatchCancelled, DispatchTimeout, LocalProtocolError
from ..message import Message
from ..protocol import check_param_name, escape
from ..sip import YATE_ERRORS, http_date
from ..store import AsyncStore, StoredMessage, new_owner

log = logging.getLogger("yate_sipgen.delivery")

#: Failures after which a message is worth keeping for later (offline, unreachable, timeout).
STORE_WORTHY = frozenset((0, 408, 480, 500, 503, 504))
#: xsip.generate ``error`` values that mean "could not reach the user" (-> 480).
UNREACHABLE_ERRORS = frozenset(("offline", "notransport", "noconn", "noroute", "noanswer"))

_CALLTO_N = re.compile(r"callto\.(\d+)")
#: Params of our call.route that :meth:`Deliverer.route_wire` sets itself.
_ROUTE_OWN = frozenset(("route_type", "called", "called_domain"))


_wire_date_cache: tuple[int, str] = (-1, "")


def wire_date(epoch: float) -> str:
    """:func:`~yate_sipgen.sip.http_date` escaped for Yate's wire; cached per second."""
    global _wire_date_cache
    sec = int(epoch)
    if _wire_date_cache[0] != sec:
        _wire_date_cache = (sec, escape(http_date(sec)))
    return _wire_date_cache[1]


def _loop_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


class UserGate:
    """One holder at a time per key, waiters served in FIFO order.

    Cheaper than an ``asyncio.Lock`` per user on the hot path (no coroutine call when free)
    and keeps nothing for a key nobody holds. Use::

        waiter = gate.enter(key)
        if waiter is not None:
            await gate.wait(key, waiter)
        try: ...
        finally: gate.leave(key)
    """

    __slots__ = ("_held", "_new")

    def __init__(self, new_waiter: Callable[[], Any] | None = None) -> None:
        self._held: dict[str, deque[Any] | None] = {}
        # what a waiter is: the engine's Waiter (a Flow waiting on it resumes in the same
        # read, without a pass of the loop), or an asyncio future by default
        self._new = new_waiter or _loop_future

    def locked(self, key: str) -> bool:
        return key in self._held

    def queued(self, key: str) -> int:
        """How many wait for ``key`` (not counting its holder)."""
        q = self._held.get(key)
        return len(q) if q else 0

    def enter(self, key: str) -> asyncio.Future[None] | None:
        if key not in self._held:
            self._held[key] = None
            return None
        q = self._held[key]
        if q is None:
            q = self._held[key] = deque()
        fut = self._new()
        q.append(fut)
        return fut

    async def wait(self, key: str, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave(key)  # handed over just as we were cancelled: pass it on
            raise

    def leave(self, key: str) -> None:
        q = self._held.get(key)
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)  # ownership passes straight to the next waiter
                return
        self._held.pop(key, None)


class CountGate:
    """At most ``limit`` holders; the others wait in FIFO order (a lean semaphore)."""

    __slots__ = ("limit", "active", "_waiters", "_new")

    def __init__(self, limit: int, new_waiter: Callable[[], Any] | None = None) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[Any] = deque()
        self._new = new_waiter or _loop_future

    def try_enter(self) -> bool:
        """:meth:`enter` when that lets one in at once (True); else nothing (False)."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    def enter(self) -> asyncio.Future[None] | None:
        if self.try_enter():
            return None
        fut = self._new()
        self._waiters.append(fut)
        return fut

    async def wait(self, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave()
            raise

    def leave(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the place passes on; active stays the same
                return
        self.active -= 1
        while self.active < self.limit and self._waiters:  # the limit was raised
            fut = self._waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)


@dataclass(slots=True)
class Target:
    """Where to send: a ``sip/`` URI (``uri``) or any other Yate ``callto``."""

    callto: str
    connection_id: str = ""
    #: The ``sip/`` URI escaped for Yate's wire, once it was needed (callto never changes).
    wire_uri: str = field(default="", compare=False, repr=False)

    @property
    def is_sip(self) -> bool:
        return self.callto.startswith("sip/")

    @property
    def uri(self) -> str:
        return self.callto[4:] if self.is_sip else ""


@dataclass(slots=True)
class Route:
    targets: list[Target]
    code: int = 0  # failure code when there is no target
    offline: bool = False  # known user, not registered: worth storing

    @property
    def nobody(self) -> bool:
        """No target and nothing to wait for: no such user (404), forbidden (403), ...;
        a message for it is not worth keeping."""
        return not self.targets and not self.offline and self.code not in STORE_WORTHY


def route_of(answer: Message | None, exc: BaseException | None) -> Route:
    """The route Yate's answer to our ``call.route`` gives (:func:`parse_route`), or, when
    it did not answer (``exc``): 503 for a timeout, 500 when the connection went."""
    if exc is None:
        return parse_route(answer)  # type: ignore[arg-type]
    if isinstance(exc, DispatchTimeout):
        return Route([], 503)
    if isinstance(exc, DispatchCancelled):
        return Route([], 500)
    raise exc


#: (callto, connection id) -> its one-target Route: Yate's routing gives the same again and
#: again.
_ONE_TARGET: dict[tuple[str, str], Route] = {}


def parse_route(answer: Message) -> Route:
    """Interpret Yate's answer to ``call.route route_type=msg``.

    * handled, retval ``sip/<uri>`` (or any other callto): one target; ``oconnection_id`` of a
      TCP/TLS registration becomes its ``connection_id``;
    * retval ``fork`` with ``callto.N``: one target each, in N order;
    * ``error=offline`` (handled or not, retval ``-`` or empty): known but offline;
    * not handled, no error (regfile's unknown user): 404;
    * any other ``error``/``reason``: its SIP code (``noroute`` 404, ``forbidden`` 403, ...).
    """
    retval = answer.retval.strip()
    if answer.handled and retval:
        if retval == "fork":
            numbered = sorted((int(m.group(1)), v) for k, v in answer.items()
                              if (m := _CALLTO_N.fullmatch(k)) and v and not v.startswith("|"))
            targets = [Target(v.strip()) for _, v in numbered]
            if targets:
                return Route(targets)
        elif retval != "-" and retval != "error":  # the usual answer: one target
            key = (retval, answer.get("oconnection_id") or "")
            route = _ONE_TARGET.get(key)
            if route is None:  # (routes are never changed once made: one is shared)
                if len(_ONE_TARGET) >= 4096:
                    _ONE_TARGET.clear()
                route = _ONE_TARGET[key] = Route([Target(*key)])
            return route
    error = (answer.get("error") or answer.get("reason") or "").strip()
    if error == "offline":
        return Route([], 480, offline=True)
    if error:
        code = int(error) if error.isdigit() else YATE_ERRORS.get(error, 404)
        return Route([], code if 300 <= code <= 699 else 404)
    return Route([], 404)


def best_failure(codes: list[int]) -> int:
    """RFC 3261 §16.7: any 6xx first, else the lowest class; 503 never goes back (-> 500)."""
    if not codes:
        return 480
    six = [c for c in codes if c >= 600]
    pool = six or codes
    lowest = min(c // 100 for c in pool)
    chosen = next(c for c in pool if c // 100 == lowest)
    return 500 if chosen == 503 else chosen


@dataclass(slots=True)
class Outgoing:
    """One message on its way: everything a delivery attempt needs, fixed for all attempts."""

    user: str  # recipient key user@domain
    sender: str  # sender key user@domain
    from_hdr: str  # From without tag
    to_hdr: str
    content_type: str
    body: str
    body_encoding: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    call_id: str = ""
    from_tag: str = ""
    received: float = 0.0
    antiloop: int = 20
    caller: str = ""  # for msg.execute targets
    called: str = ""
    auto: bool = False  # generated by us (notices, services): never answered automatically
    notify_sender: bool = False
    stored_id: int = 0
    attempts: int = 0
    #: The body and (From without tag, To, Content-Type) as escaped on Yate's wire, when
    #: known already (the body from the sender's line): not escaped again per attempt.
    wire_body: str | None = None
    wire_headers: tuple[str, str, str] | None = None

    def to_stored(self, expires: float) -> StoredMessage:
        return StoredMessage(user=self.user, sender=self.sender, from_hdr=self.from_hdr,
                             to_hdr=self.to_hdr, content_type=self.content_type, body=self.body,
                             body_encoding=self.body_encoding, extra=dict(self.extra),
                             call_id=self.call_id, from_tag=self.from_tag,
                             received=self.received, expires=expires,
                             notify_sender=self.notify_sender, attempts=self.attempts,
                             antiloop=self.antiloop)

    @classmethod
    def from_stored(cls, row: StoredMessage) -> "Outgoing":
        user = row.user.rpartition("@")[0]
        return cls(user=row.user, sender=row.sender, from_hdr=row.from_hdr, to_hdr=row.to_hdr,
                   content_type=row.content_type, body=row.body, body_encoding=row.body_encoding,
                   extra=dict(row.extra), call_id=row.call_id, from_tag=row.from_tag,
                   received=row.received, antiloop=row.antiloop,
                   caller=row.sender.rpartition("@")[0], called=user,
                   notify_sender=row.notify_sender, stored_id=row.id, attempts=row.attempts)


class Deliverer:
    """Routing, sending and the store-and-forward runs, shared by every MESSAGE path."""

    def __init__(self, engine: Any, counters: Any) -> None:
        self.engine = engine
        self.counters = counters
        self.store: AsyncStore | None = None
        # unique per instance, and tells whether its process still runs (store.owner_is_dead)
        self.owner = new_owner()
        self.backlog: set[str] = set()  # users with stored rows (this instance's view)
        new_waiter = getattr(engine, "new_waiter", None)
        self.users = UserGate(new_waiter)  # one delivery at a time per user (RFC 3428 §8)
        self.slots = CountGate(200, new_waiter)  # deliveries waiting on Yate at once
        self.delivery_timeout = 40.0
        self.route_timeout = 5.0
        self.retry_min = 30.0
        self.retry_max = 3600.0
        self.lease = 90.0
        self.other_targets = "msg.execute"
        #: Smoothed time one delivery takes (seconds): how long a queue behind a user lasts.
        self.delivery_time = 0.05

    def configure(self, *, max_concurrent: int, delivery_timeout: float, retry_min: float,
                  retry_max: float, other_targets: str) -> None:
        self.slots.limit = max_concurrent
        self.delivery_timeout = delivery_timeout
        self.lease = delivery_timeout * 2 + 10
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.other_targets = other_targets

    # -- routing ---------------------------------------------------------------------------
    async def route(self, called: str, called_domain: str, params: dict[str, str],
                    timeout: float | None = None, forwarded: str = "") -> Route:
        """Ask Yate where ``called@called_domain`` is (``call.route route_type=msg``)."""
        return parse_route(await self.route_request(called, called_domain, params, timeout,
                                                    forwarded))

    def route_request(self, called: str, called_domain: str, params: dict[str, str],
                      timeout: float | None = None, forwarded: str = "") -> Any:
        """Dispatch the ``call.route``; the awaitable gives Yate's answer (see :func:`parse_route`)."""
        return self.engine.dispatch(self.route_message(called, called_domain, params, forwarded),
                                    timeout=timeout or self.route_timeout)

    def route_message(self, called: str, called_domain: str, params: dict[str, str],
                      forwarded: str = "") -> Message:
        """Our ``call.route route_type=msg`` for ``called@called_domain``.

        ``forwarded`` are wire-form params of the sender's message
        (:meth:`Message.wire_params`).
        """
        wire = self.route_wire(called, called_domain, params)
        return Message.from_wire_params("call.route", wire + forwarded)

    @staticmethod
    def route_wire(called: str, called_domain: str, params: dict[str, str]) -> str:
        """The params of our ``call.route route_type=msg``, escaped for Yate's wire."""
        return ":route_type=msg:called=" + escape(called) + ":called_domain=" + escape(
            called_domain) + "".join(":" + k + "=" + escape(v) for k, v in params.items()
                                     if k not in _ROUTE_OWN)

    # -- sending ---------------------------------------------------------------------------
    def send(self, out: Outgoing, targets: list[Target]) -> Awaitable[int]:
        """Deliver to the targets (forked in parallel); awaits to the resulting SIP code.

        0 means "no code" (Yate could not send it at all: offline line, no transport, ...).
        One target (the usual case) is its own coroutine: no extra await layer.
        """
        if len(targets) == 1:
            return self.send_one(out, targets[0])
        return self._fork(out, targets)

    async def _fork(self, out: Outgoing, targets: list[Target]) -> int:
        tasks = [asyncio.ensure_future(self.send_one(out, t)) for t in targets]
        try:
            for fut in asyncio.as_completed(tasks):
                code = await fut
                if 200 <= code < 300:
                    return code  # the others stop being waited for (Yate ends them itself)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
        return best_failure([t.result() or 480 for t in tasks])

    async def send_one(self, out: Outgoing, target: Target) -> int:
        slots = self.slots
        waiter = slots.enter()
        if waiter is not None:
            await slots.wait(waiter)
        try:
            if target.callto[:4] == "sip/":
                started = self.engine.now()
                answer = await self.engine.dispatch(self.xsip_message(out, target),
                                                    self.delivery_timeout)
                return self.sip_outcome(started, answer, None)
            if self.other_targets == "reject":
                return 404
            return await self._msg_execute(out, target)
        except (DispatchTimeout, DispatchCancelled) as e:
            return self.unanswered(e)
        except LocalProtocolError as e:  # too big for Yate's line, NUL in a value, ...
            return self.cannot_send(out, target, e)
        finally:
            slots.leave()

    def sip_outcome(self, started: float, answer: Message | None,
                    exc: BaseException | None) -> int:
        """The SIP code of one ``xsip.generate`` sent at ``started``: its answer, or 408 when
        Yate did not answer in time, 0 when the connection went (``exc``)."""
        if exc is not None:
            return self.unanswered(exc)
        self.delivery_time += (self.engine.now() - started - self.delivery_time) * 0.2
        return _code_of(answer)  # type: ignore[arg-type]

    def unanswered(self, exc: BaseException) -> int:
        """What a send Yate did not answer counts as: 408 when it did not answer within
        ``delivery_timeout``, 0 when the connection went (anything else is re-raised).

        The 408 is logged as a warning: Yate gives up on a UDP phone itself after 7.5 s by
        default, so this is usually ysipchan losing the phone's answer (a race in Yate 6.4.1's
        xsip.generate), which also keeps one Yate engine worker busy until Yate restarts."""
        if isinstance(exc, DispatchTimeout):
            log.warning("Yate did not answer a delivery (xsip.generate) within %g s; if this "
                        "repeats, its engine workers are being used up (see delivery_timeout "
                        "in the README)", self.delivery_timeout)
            return 408
        if isinstance(exc, DispatchCancelled):
            return 0
        raise exc

    @staticmethod
    def cannot_send(out: Outgoing, target: Target, e: LocalProtocolError) -> int:
        """What a MESSAGE Yate could not take is counted as (413), logged."""
        log.warning("cannot send MESSAGE for %s to %s: %s", out.user, target.callto, e)
        return 413

    @staticmethod
    def xsip_message(out: Outgoing, target: Target) -> Message:
        """The ``xsip.generate`` (``wait=true``) that sends ``out`` to a ``sip/`` target
        (its params: :meth:`xsip_wire`)."""
        return Message.from_wire_params("xsip.generate", Deliverer.xsip_wire(out, target))

    @staticmethod
    def xsip_wire(out: Outgoing, target: Target) -> str:
        """The params of :meth:`xsip_message`, escaped for Yate's wire: the escaped headers
        and body ``out`` carries are used as they are."""
        hdrs = out.wire_headers
        if hdrs is None:
            hdrs = (escape(out.from_hdr), escape(out.to_hdr), escape(out.content_type))
        body = out.wire_body
        if body is None:
            body = escape(out.body)
        uri = target.wire_uri
        if not uri:
            uri = target.wire_uri = escape(target.callto[4:])
        tag = out.from_tag
        wire = [":method=MESSAGE:uri=", uri, ":wait=true:antiloop=",
                str(out.antiloop), ":sip_From=", hdrs[0], ";tag=",
                tag if tag.isalnum() else escape(tag), ":sip_To=", hdrs[1], ":sip_Call-ID=",
                escape(out.call_id), ":sip_CSeq=1 MESSAGE:sip_Date=",
                wire_date(out.received), ":xsip_type=", hdrs[2], ":xsip_body=", body]
        if out.body_encoding:
            wire += (":xsip_body_encoding=", escape(out.body_encoding))
        for k, v in out.extra.items():
            check_param_name(k)
            wire += (":", escape(k), "=", escape(v))
        if target.connection_id:
            wire += (":connection_id=", escape(target.connection_id))
        if out.auto:
            wire.append(":sip_Auto-Submitted=auto-generated")
        return "".join(wire)

    async def _msg_execute(self, out: Outgoing, target: Target) -> int:
        m = Message("msg.execute", {
            "callto": target.callto, "caller": out.caller, "called": out.called,
            "module": "sipgen", "xsip_type": out.content_type, "xsip_body": out.body,
        })
        if out.body_encoding:
            m["xsip_body_encoding"] = out.body_encoding
        elif out.content_type.lower().startswith("text/"):
            m["text"] = out.body
        answer = await self.engine.dispatch(m, timeout=self.delivery_timeout)
        if answer.handled:
            code = answer.get("code", "")
            return int(code) if code.isdigit() else 200
        return _code_of(answer) or 480

    # -- store and forward ---------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        return min(self.retry_min * (2 ** max(attempts - 1, 0)), self.retry_max)

    async def flush_user(self, user: str, targets: list[Target] | None,
                         route: Callable[[str], Awaitable[Route]] | None,
                         *, due_only: bool, stop_at: float | None = None,
                         hold_lock: bool = True, up_to: float | None = None) -> bool:
        """Deliver ``user``'s stored messages in order; True when none is left.

        ``targets`` given (a fresh registration): send there. Otherwise ``route`` looks the
        user up. Stops at the first failure (the row gets its back-off), or at ``stop_at``.
        ``up_to``: only rows received no later than that; True then means none of those is
        left (newer rows may be).
        """
        if self.store is None:
            return True
        if hold_lock:
            waiter = self.users.enter(user)
            if waiter is not None:
                await self.users.wait(user, waiter)
            try:
                return await self._flush(user, targets, route, due_only, stop_at, up_to)
            finally:
                self.users.leave(user)
        return await self._flush(user, targets, route, due_only, stop_at, up_to)

    async def _flush(self, user: str, targets: list[Target] | None,
                     route: Callable[[str], Awaitable[Route]] | None, due_only: bool,
                     stop_at: float | None, up_to: float | None = None) -> bool:
        store = self.store
        loop = asyncio.get_running_loop()
        while True:
            if stop_at is not None and loop.time() >= stop_at:
                return False
            now = time.time()
            rows = await store.claim(user, self.owner, now + self.lease, now, 20, due_only,
                                     up_to)
            if not rows:
                left = await store.count(user)
                if not left:
                    self.backlog.discard(user)
                    return True
                if up_to is not None:  # what is left is newer, or not claimable now
                    older = [r for r in await store.list(user, 1) if r.received <= up_to]
                    return not older
                return False
            if targets is None:
                r = await route(user) if route else Route([], 480, offline=True)
                if not r.targets:
                    for row in rows:
                        await store.release(row.id, row.attempts + 1,
                                            time.time() + self.backoff(row.attempts + 1))
                    return False
                targets = r.targets
            for i, row in enumerate(rows):
                code = await self.send(Outgoing.from_stored(row), targets)
                if 200 <= code < 300:
                    # not waited for: the next send need not wait for this commit (a store
                    # round trip per message made one user's stored queue drain slower than
                    # the live relay). Later store calls run after it, so the next claim and
                    # the final count see it. A kill before it commits sends the message again
                    # after the restart, as a kill during the send would (at least once).
                    store.post("delete", row.id)
                    self.counters["delivered"] += 1
                    self.counters["delivered_stored"] += 1
                    log.info("delivered stored message %d to %s (%d)", row.id, user, code)
                    continue
                attempts = row.attempts + 1
                await store.release(row.id, attempts, time.time() + self.backoff(attempts))
                for later in rows[i + 1:]:
                    await store.unlease(later.id)
                self.counters["retry"] += 1
                log.info("stored message %d for %s not delivered (%d); retry in %ds",
                         row.id, user, code, int(self.backoff(attempts)))
                return False


def _code_of(answer: Message) -> int:
    """The SIP code of an ``xsip.generate wait=true`` answer; 0 for "not sent at all"."""
    code = answer.get("code", "")
    if code.isdigit():
        return int(code)
    error = answer.get("error", "")
    if error in UNREACHABLE_ERRORS:
        return 0
    if error == "looping":
        return 483
    return 500 if error or not answer.handled else 0
