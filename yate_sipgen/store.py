"""Persistent storage of messages waiting for delivery, behind one small interface.

:class:`MessageStore` is what the MESSAGE feature uses; :class:`SQLiteMessageStore` implements
it on an embedded SQLite database (WAL, ``synchronous=FULL``: a row is on disk when ``add``
returns, so a 202 sent after it is never a lie). A shared-database backend only has to provide
the same methods.

Several script instances may share one database: a delivery run *claims* a user's oldest rows
with a lease (owner + expiry) inside one write transaction, so two instances never send the same
stored message at the same time, and rows are always taken in order (a user's backlog is not
claimed at all while its oldest row is leased elsewhere).

:class:`AsyncStore` runs every call in one dedicated thread: SQLite work (and its fsync) never
blocks the event loop, not even opening the file (a database locked by another process makes
SQLite wait up to its busy timeout; the script must still answer Yate and exit at once when its
stdin closes).

Lease owners name their process (:func:`new_owner`: host, pid, the pid's start time): a row
leased by a process of this host that no longer runs is given back at start
(:meth:`SQLiteMessageStore.recover_leases`) instead of waiting for the lease to run out.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredMessage:
    """One MESSAGE kept for later delivery. ``user`` and ``sender`` are ``user@domain`` keys."""

    user: str
    sender: str
    from_hdr: str  # From header value for the delivery (no tag)
    to_hdr: str
    content_type: str
    body: str
    body_encoding: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # other body params (xsip_body.N, ...)
    call_id: str = ""
    from_tag: str = ""
    received: float = 0.0
    expires: float = 0.0
    attempts: int = 0
    next_try: float = 0.0
    notify_sender: bool = False
    antiloop: int = 20  # Max-Forwards left when it arrived: keeps falling on every attempt
    id: int = 0

    def size(self) -> int:
        return len(self.body) + sum(len(v) for v in self.extra.values())


class MessageStore(ABC):
    """Storage of messages for offline users (synchronous; wrap with :class:`AsyncStore`)."""

    @abstractmethod
    def add(self, msg: StoredMessage, lease_owner: str = "", lease_until: float = 0.0) -> int:
        """Store durably; returns the new id. A lease keeps it from being claimed meanwhile."""

    @abstractmethod
    def count(self, user: str | None = None) -> int: ...

    @abstractmethod
    def claim(self, user: str, owner: str, lease_until: float, now: float, limit: int,
              due_only: bool = True, up_to: float | None = None) -> list[StoredMessage]:
        """Lease the user's oldest rows, in arrival order (``received``), stopping at the first
        one not claimable.

        A row is claimable when its lease has run out or is ``owner``'s own (a copy stored
        while its live delivery was still running), and, with ``due_only``, when its retry
        time has come. ``up_to``: only rows received no later than that (a live message
        sends what arrived before it, never what arrived after it).
        """

    @abstractmethod
    def delete(self, msg_id: int) -> None: ...

    @abstractmethod
    def release(self, msg_id: int, attempts: int, next_try: float) -> None:
        """Give a row back after a failed attempt, to be tried again at ``next_try``."""

    @abstractmethod
    def unlease(self, msg_id: int) -> None:
        """Give a row back untouched (the attempt did not happen)."""

    @abstractmethod
    def users_due(self, now: float) -> list[str]: ...

    @abstractmethod
    def users(self) -> list[str]: ...

    @abstractmethod
    def take_expired(self, now: float, limit: int = 500) -> list[StoredMessage]:
        """Remove and return rows past their expiry (not currently leased)."""

    @abstractmethod
    def list(self, user: str | None = None, limit: int = 1000) -> list[StoredMessage]: ...

    @abstractmethod
    def purge(self, user: str | None = None) -> int: ...

    @abstractmethod
    def recover_leases(self, is_dead: Callable[[str], bool]) -> int:
        """Give back every row leased by an owner ``is_dead`` says is gone; returns how many."""

    @abstractmethod
    def rekey(self, key: Callable[[str], str]) -> int:
        """Move rows stored under a user key to ``key(user)`` (aliases merged); returns how
        many rows moved. Order is kept: rows are taken by id."""

    @abstractmethod
    def close(self) -> None: ...


def _proc_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), or ""."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


_HOST = socket.gethostname().replace(":", "_")


def new_owner() -> str:
    """A lease owner name unique to this process: ``sipgen:<host>:<pid>:<start>:<random>``.

    The start time tells a live process from a later one that got the same pid.
    """
    pid = os.getpid()
    return f"sipgen:{_HOST}:{pid}:{_proc_start(pid)}:{secrets.token_hex(4)}"


def owner_is_dead(owner: str) -> bool:
    """True only when ``owner`` names a process of *this* host that is gone.

    Owners of other hosts (several Yate nodes on one database) and names in an older format
    are never judged: their leases run out by themselves.
    """
    parts = owner.split(":")
    if len(parts) != 5 or parts[0] != "sipgen" or parts[1] != _HOST or not parts[2].isdigit():
        return False
    start = _proc_start(int(parts[2]))
    return not start or start != parts[3]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    sender TEXT NOT NULL,
    from_hdr TEXT NOT NULL,
    to_hdr TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB NOT NULL,
    body_encoding TEXT NOT NULL DEFAULT '',
    extra TEXT NOT NULL DEFAULT '{}',
    call_id TEXT NOT NULL,
    from_tag TEXT NOT NULL,
    received REAL NOT NULL,
    expires REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    notify_sender INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    antiloop INTEGER NOT NULL DEFAULT 20
);
CREATE INDEX IF NOT EXISTS messages_user ON messages(user, id);
CREATE INDEX IF NOT EXISTS messages_expires ON messages(expires);
"""

_COLS = ("id, user, sender, from_hdr, to_hdr, content_type, body, body_encoding, extra, call_id, "
         "from_tag, received, expires, attempts, next_try, notify_sender, antiloop")


def _row(r: tuple[Any, ...]) -> StoredMessage:
    try:
        extra = json.loads(r[8]) if r[8] else {}
    except ValueError:
        extra = {}
    return StoredMessage(id=r[0], user=r[1], sender=r[2], from_hdr=_unblob(r[3]),
                         to_hdr=_unblob(r[4]), content_type=_unblob(r[5]), body=_unblob(r[6]), body_encoding=r[7], extra=extra,
                         call_id=r[9], from_tag=r[10], received=r[11], expires=r[12],
                         attempts=r[13], next_try=r[14], notify_sender=bool(r[15]),
                         antiloop=r[16])


def _blob(s: str) -> bytes:
    # Bodies are str with surrogate escapes for non-UTF-8 bytes: keep the exact bytes.
    return s.encode("utf-8", "surrogateescape")


def _unblob(b: bytes | str) -> str:
    return b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b


class SQLiteMessageStore(MessageStore):
    def __init__(self, path: str) -> None:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(messages)")}
        if "antiloop" not in cols:  # a database from before this column existed
            self.db.execute("ALTER TABLE messages ADD COLUMN antiloop INTEGER NOT NULL DEFAULT 20")

    def add(self, msg: StoredMessage, lease_owner: str = "", lease_until: float = 0.0) -> int:
        cur = self.db.execute(
            "INSERT INTO messages (user, sender, from_hdr, to_hdr, content_type, body, "
            "body_encoding, extra, call_id, from_tag, received, expires, attempts, next_try, "
            "notify_sender, lease_owner, lease_until, antiloop) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (msg.user, msg.sender, _blob(msg.from_hdr), _blob(msg.to_hdr),
             _blob(msg.content_type), _blob(msg.body),
             msg.body_encoding, json.dumps(msg.extra),
             msg.call_id, msg.from_tag, msg.received, msg.expires, msg.attempts, msg.next_try,
             int(msg.notify_sender), lease_owner, lease_until, msg.antiloop))
        msg.id = int(cur.lastrowid)
        return msg.id

    def count(self, user: str | None = None) -> int:
        if user is None:
            return int(self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM messages WHERE user=?",
                                   (user,)).fetchone()[0])

    def claim(self, user: str, owner: str, lease_until: float, now: float, limit: int,
              due_only: bool = True, up_to: float | None = None) -> list[StoredMessage]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                f"SELECT {_COLS}, lease_until, lease_owner FROM messages WHERE user=? "
                "ORDER BY received, id LIMIT ?", (user, limit)).fetchall()
            taken: list[StoredMessage] = []
            for r in rows:
                if (r[17] > now and r[18] != owner) or (due_only and r[14] > now):
                    break  # keep the order: never skip past a row we cannot take
                if up_to is not None and r[11] > up_to:
                    break
                taken.append(_row(r))
            if taken:
                self.db.executemany("UPDATE messages SET lease_owner=?, lease_until=? WHERE id=?",
                                    [(owner, lease_until, m.id) for m in taken])
            self.db.execute("COMMIT")
            return taken
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def delete(self, msg_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id=?", (msg_id,))

    def release(self, msg_id: int, attempts: int, next_try: float) -> None:
        self.db.execute("UPDATE messages SET attempts=?, next_try=?, lease_owner='', "
                        "lease_until=0 WHERE id=?", (attempts, next_try, msg_id))

    def unlease(self, msg_id: int) -> None:
        self.db.execute("UPDATE messages SET lease_owner='', lease_until=0 WHERE id=?", (msg_id,))

    def users_due(self, now: float) -> list[str]:
        # a user is due when their *oldest* row is due and not leased
        rows = self.db.execute(
            "SELECT m.user FROM messages m JOIN (SELECT user, MIN(id) AS first FROM messages "
            "GROUP BY user) f ON m.id = f.first WHERE m.next_try <= ? AND m.lease_until <= ?",
            (now, now)).fetchall()
        return [r[0] for r in rows]

    def users(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT user FROM messages")]

    def take_expired(self, now: float, limit: int = 500) -> list[StoredMessage]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                f"SELECT {_COLS} FROM messages WHERE expires <= ? AND lease_until <= ? "
                "ORDER BY id LIMIT ?", (now, now, limit)).fetchall()
            self.db.executemany("DELETE FROM messages WHERE id=?", [(r[0],) for r in rows])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [_row(r) for r in rows]

    def list(self, user: str | None = None, limit: int = 1000) -> list[StoredMessage]:
        if user is None:
            rows = self.db.execute(f"SELECT {_COLS} FROM messages ORDER BY user, received, id LIMIT ?",
                                   (limit,)).fetchall()
        else:
            rows = self.db.execute(f"SELECT {_COLS} FROM messages WHERE user=? ORDER BY received, id "
                                   "LIMIT ?", (user, limit)).fetchall()
        return [_row(r) for r in rows]

    def purge(self, user: str | None = None) -> int:
        if user is None:
            cur = self.db.execute("DELETE FROM messages")
        else:
            cur = self.db.execute("DELETE FROM messages WHERE user=?", (user,))
        return cur.rowcount

    def recover_leases(self, is_dead: Callable[[str], bool]) -> int:
        owners = [r[0] for r in self.db.execute(
            "SELECT DISTINCT lease_owner FROM messages WHERE lease_owner != '' "
            "AND lease_until > 0")]
        dead = [o for o in owners if is_dead(o)]
        n = 0
        for o in dead:
            n += self.db.execute("UPDATE messages SET lease_owner='', lease_until=0 "
                                 "WHERE lease_owner=?", (o,)).rowcount
        return n

    def rekey(self, key: Callable[[str], str]) -> int:
        moves = [(key(u), u) for u in self.users()]
        moves = [(new, old) for new, old in moves if new != old]
        n = 0
        for new, old in moves:
            n += self.db.execute("UPDATE messages SET user=? WHERE user=?", (new, old)).rowcount
        return n

    def close(self) -> None:
        self.db.close()


class StoreUnavailable(Exception):
    """The store could not be opened; nothing can be stored or read."""


class AsyncStore:
    """Runs a :class:`MessageStore` in one dedicated thread; every method is awaitable.

    Given a callable instead of a store, it opens the store *in that thread*: the event loop
    goes on at once, and calls made meanwhile queue behind the opening (one thread, first in
    first out). :meth:`opened` waits for it; if opening failed, every call raises
    :class:`StoreUnavailable`.
    """

    def __init__(self, store: MessageStore | Callable[[], MessageStore]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sipgen-store")
        self.error: BaseException | None = None
        if isinstance(store, MessageStore):
            self.store: MessageStore | None = store
            self._ready: Future[None] = Future()
            self._ready.set_result(None)
        else:
            self.store = None
            self._ready = self._pool.submit(self._open, store)

    def _open(self, opener: Callable[[], MessageStore]) -> None:
        try:
            self.store = opener()
        except BaseException as e:
            self.error = e
            raise

    @property
    def is_open(self) -> bool:
        return self._ready.done() and self.store is not None

    async def opened(self) -> None:
        """Wait until the store is open; raises what opening raised."""
        await asyncio.wrap_future(self._ready)

    def _run(self, name: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if self.store is None:
            raise StoreUnavailable(f"message store not open: {self.error!r}")
        return getattr(self.store, name)(*args, **kw)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        async def call(*args: Any, **kw: Any) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._run, name, args, kw)

        return call

    def close(self) -> None:
        if self.store is not None:
            self._pool.submit(self.store.close)
        self._pool.shutdown(wait=True)


def now() -> float:
    return time.time()
