"""Store and forward of SIP MESSAGE: the store, its opening, retries, expiry, delivery on
REGISTER, and the ``messages`` console command.

The MESSAGE flow (:mod:`.message`) decides *when* a message is stored (offline, unreachable,
timed out, the answer deadline, a queue that would outlast it) and settles a stored copy when
a live attempt ends late; this module keeps the copies and sends them on: to the contact a
user registers from, and in retry runs (every ``scan_interval``, after a backoff per message).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import DispatchCancelled, DispatchTimeout
from ..store import AsyncStore, SQLiteMessageStore, StoreLimit, owner_is_dead
from .delivery import CountGate, Deliverer, Outgoing, Route, Target
from .registrations import Registrations

log = logging.getLogger("yate_sipgen.message")

ISCOMPOSING = "application/im-iscomposing+xml"


class OfflineStore:
    """The MESSAGE store of one run. ``store`` is None while storing is off (or failed)."""

    #: Stored-message retry runs at once (each starts with a call.route lookup).
    SCAN_PARALLEL = 20

    def __init__(self, engine: Any, counters: Any, deliverer: Deliverer,
                 registrations: Registrations, canonical_key: Callable[[str], str],
                 submit: Callable[..., Awaitable[int]], state_dir: str) -> None:
        self.engine = engine
        self.counters = counters
        self.deliverer = deliverer
        self.registrations = registrations
        self.canonical_key = canonical_key  # user@host -> user@main domain (now)
        self.submit = submit  # sends an automatic MESSAGE (expiry notices)
        self.state_dir = state_dir
        self.cfg: dict[str, Any] = {}  # the [message] section (the feature's, not a copy)
        self.store: AsyncStore | None = None
        self._opening: asyncio.Task[None] | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._started = False
        self._scan_gate = CountGate(self.SCAN_PARALLEL)
        self._scanning: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------
    def configure(self, cfg: dict[str, Any]) -> None:
        """A (re)loaded ``[message]``: store=true after a reload opens the store now; changed
        domains move the stored rows."""
        self.cfg = cfg
        if self._started and self.store is None and cfg["store"] and cfg["enable"]:
            self.open()
        elif self.store is not None and self.store.is_open:
            self.engine.spawn(self._rekey(self.store), "re-keying stored messages")

    def start(self) -> None:
        self._started = True
        self.open()

    def close(self) -> None:
        if self._scanner:
            self._scanner.cancel()

    def open(self) -> None:
        """Start opening the store in its own thread; the event loop goes on meanwhile.

        Calls made before it is open queue behind the opening (one store thread), so a
        MESSAGE or REGISTER that comes right after a (re)start is served once it is open. A
        database locked by another process (SQLite waits up to 10 s) is reported after 1 s.
        """
        if not self.cfg.get("enable") or not self.cfg.get("store"):
            return
        path = self.cfg["database"] or os.path.join(self.state_dir, "messages.db")
        found: dict[str, Any] = {}

        def opener() -> SQLiteMessageStore:
            # all in the store's thread, before any call queued behind the opening: what
            # it finds is exactly what the previous run left
            store = SQLiteMessageStore(path)
            found["freed"] = store.recover_leases(owner_is_dead)
            found["moved"] = store.rekey(self.canonical_key)
            found["users"] = store.users()
            return store

        self.store = AsyncStore(opener)
        self.deliverer.store = self.store
        self._opening = self.engine.spawn(self._opened(self.store, path, found),
                                          "opening the message store")

    async def _opened(self, store: AsyncStore, path: str, found: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        slow = loop.call_later(1.0, lambda: log.warning(
            "message store %s is still opening after 1 s (locked by another process?); "
            "messages that need it wait for it", path))
        try:
            await store.opened()
        except Exception as e:
            log.error("cannot open message store %s: %s; storing is off", path, e)
            if self.store is store:
                self.store = None
                self.deliverer.store = None
            return
        finally:
            slow.cancel()
        freed, moved, users = found["freed"], found["moved"], found["users"]
        if freed:
            log.info("released %d stored message(s) leased by a process that is gone", freed)
        if moved:
            log.info("moved %d stored message(s) to their users' main domain", moved)
        self.deliverer.backlog.update(users)
        if users:
            log.info("%d users have stored messages; trying to deliver", len(users))
        if self._scanner is None:
            self._scanner = self.engine.spawn(self._scan_loop(users), "stored message scanner")

    async def _rekey(self, store: AsyncStore) -> None:
        """After a reload changed the domains: move stored rows and the backlog with them."""
        moved = await store.rekey(self.canonical_key)
        if moved:
            d = self.deliverer
            d.backlog = {self.canonical_key(k) for k in d.backlog}
            log.info("moved %d stored message(s) to their users' main domain", moved)

    # -- storing --------------------------------------------------------------------------
    def keeps(self, out: Outgoing, media: str) -> bool:
        """Is ``out`` a message we store at all (limits aside), the store open or still
        opening (:meth:`add` then waits for it)?"""
        return (self.store is not None and self.cfg["store"] and media != ISCOMPOSING
                and not out.auto)

    def storable(self, out: Outgoing, media: str) -> bool:
        """Could ``out`` be stored now, without waiting for the store to open (limits aside)?"""
        return self.keeps(out, media) and self.store.is_open  # type: ignore[union-attr]

    async def add(self, out: Outgoing, media: str, lease_until: float = 0.0, *,
                  counter: str = "stored", why: str = "offline or unreachable") -> bool:
        """Store durably (committed before we answer 202); False when we may not.

        ``counter`` is the status counter it adds to; ``why`` goes into the log line."""
        cfg = self.cfg
        if not self.keeps(out, media):
            return False
        row = out.to_stored(out.received + cfg["expire"])
        row.next_try = time.time() + self.deliverer.retry_min
        try:
            out.stored_id = await self.store.add_within(
                row, cfg["max_per_user"], cfg["max_total"],
                self.deliverer.owner if lease_until else "", lease_until)
        except StoreLimit as e:
            self.counters["store_full"] += 1
            if e.scope == "per_user":
                log.warning("not storing for %s: %d stored messages is the per-user limit",
                            out.user, e.limit)
            else:
                log.warning("not storing for %s: the store is full (%d)", out.user, e.limit)
            return False
        except Exception as e:
            log.error("storing a message for %s failed: %s", out.user, e)
            return False
        self.deliverer.backlog.add(out.user)
        self.counters[counter] += 1
        log.info("stored message %d for %s (%s)", out.stored_id, out.user, why)
        return True

    async def discard(self, stored_id: int, user: str) -> None:
        """Delete one stored copy that must not be sent (delivered meanwhile, or for nobody)."""
        if self.store is not None:
            await self.store.delete(stored_id)
            await self.forget_if_empty(user)

    async def forget_if_empty(self, user: str) -> None:
        if self.store is not None and not await self.store.count(user):
            self.deliverer.backlog.discard(user)

    # -- delivery on REGISTER -------------------------------------------------------------
    def on_register(self, msg: Any) -> None:
        """A registration: deliver the user's stored messages to the contact just registered.

        The user is ``username`` (or ``number``) at the REGISTER's Request-URI host, mapped
        to its main domain (``domain_aliases``): registering at an address of ours and being
        messaged at our name is the same user.
        """
        bound = self.registrations.registered(msg)
        if bound is None or self.store is None:
            return
        keyname, target = bound
        opening = self._opening
        if opening is not None and not opening.done():
            # right after a start the backlog is known only once the store is open
            self.engine.spawn(self._registered_after_open(opening, keyname, target),
                              f"stored delivery to {keyname}")
            return
        self._registered(keyname, target)

    async def _registered_after_open(self, opening: "asyncio.Task[None]", keyname: str,
                                     target: Target) -> None:
        await asyncio.shield(opening)
        self._registered(keyname, target)

    def _registered(self, keyname: str, target: Target) -> None:
        if keyname not in self.deliverer.backlog:
            return
        log.info("%s registered with stored messages: delivering to %s", keyname, target.uri)
        self.engine.spawn(self.deliverer.flush_user(keyname, [target], None, due_only=False),
                          f"stored delivery to {keyname}")

    # -- retries and expiry ---------------------------------------------------------------
    async def _scan_loop(self, initial: list[str]) -> None:
        """Retries and expiry every ``scan_interval``; first, at once, every user the previous
        run left messages for (they may have registered meanwhile)."""
        first: list[str] | None = initial
        while True:
            try:
                await self.scan(first)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stored message scan failed")
            first = None
            await asyncio.sleep(self.cfg["scan_interval"])

    async def scan(self, initial: list[str] | None = None) -> None:
        store = self.store
        now = time.time()
        expired = await store.take_expired(now)
        for row in expired:
            self.counters["expired"] += 1
            log.info("stored message %d for %s expired undelivered", row.id, row.user)
            if self.cfg["expiry_notice"] and row.notify_sender:
                self.engine.spawn(self._notice(row), "expiry notice")
        for user in {row.user for row in expired}:
            await self.forget_if_empty(user)
        users = initial if initial is not None else await store.users_due(now)
        for user in users:
            if self.deliverer.users.locked(user) or user in self._scanning:
                continue
            self._scanning.add(user)
            self.engine.spawn(self._scan_user(user, due_only=initial is None),
                              f"stored delivery to {user}")

    async def _scan_user(self, user: str, due_only: bool) -> None:
        """One retry run, at most SCAN_PARALLEL at once: a start with thousands of users
        with stored messages must not flood Yate with call.route lookups."""
        waiter = self._scan_gate.enter()
        try:
            if waiter is not None:
                await self._scan_gate.wait(waiter)
            try:
                await self.deliverer.flush_user(user, None, self._route_key, due_only=due_only)
            finally:
                self._scan_gate.leave()
        finally:
            self._scanning.discard(user)

    async def _route_key(self, user: str) -> Route:
        """Route a stored message's recipient (``user@domain``) for a retry run."""
        u, _, host = user.rpartition("@")
        try:
            return await self.deliverer.route(u, host, {"caller": "", "called": u,
                                                        "called_domain": host,
                                                        "module": "sipgen"})
        except (DispatchTimeout, DispatchCancelled):
            return Route([], 480, offline=True)

    async def _notice(self, row: Any) -> None:
        sender_user, _, sender_host = row.sender.rpartition("@")
        text = (f"Your message to {row.user} of "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(row.received))} "
                "could not be delivered and has expired.")
        await self.submit(f"{self.cfg['notice_from']}@{sender_host}", row.sender,
                          "text/plain;charset=utf-8", text)

    # -- console --------------------------------------------------------------------------
    def complete_messages(self, words: list[str]) -> list[str]:
        if not words:
            return ["purge"] + sorted(self.deliverer.backlog)
        if words == ["purge"]:
            return ["all"] + sorted(self.deliverer.backlog)
        return []

    async def cmd_messages(self, args: list[str]) -> str:
        if self.store is None:
            return "Message store is off ([message] store=false or not opened).\r\n"
        if args[:1] == ["purge"]:
            if len(args) != 2:
                return "Usage: messages purge <user@domain|all>\r\n"
            who = None if args[1] == "all" else args[1]
            n = await self.store.purge(who)
            if who is None:
                self.deliverer.backlog.clear()
            else:
                self.deliverer.backlog.discard(who)
            return f"Purged {n} stored message(s).\r\n"
        who = args[0] if args else None
        rows = await self.store.list(who)
        if not rows:
            return "No stored messages.\r\n"
        lines = [f"{'id':>6} {'to':<28} {'from':<28} {'age':>7} {'tries':>5} type"]
        now = time.time()
        for r in rows:
            lines.append(f"{r.id:>6} {r.user:<28} {r.sender:<28} {int(now - r.received):>6}s "
                         f"{r.attempts:>5} {r.content_type} ({len(r.body)} bytes)")
        return "\r\n".join(lines) + "\r\n"
