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
stdin closes). It *group-commits*: the calls made in one event-loop tick, and those that arrive
while the thread is busy, run as one batch in one transaction with one commit (one fsync), and
no caller hears back before that commit. Writes are still committed before we answer; there is
just one commit per batch instead of one per write (:class:`SQLiteTransactions`).

Lease owners name their process (:func:`new_owner`: host, pid, the pid's start time): a row
leased by a process of this host that no longer runs is given back at start
(:meth:`SQLiteMessageStore.recover_leases`) instead of waiting for the lease to run out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("yate_sipgen.store")


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


class StoreLimit(Exception):
    """:meth:`MessageStore.add_within` refused: ``scope`` ("per_user" or "total") is at
    ``limit``."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} limit {limit}")
        self.scope = scope
        self.limit = limit


class MessageStore(ABC):
    """Storage of messages for offline users (synchronous; wrap with :class:`AsyncStore`)."""

    @abstractmethod
    def add(self, msg: StoredMessage, lease_owner: str = "", lease_until: float = 0.0) -> int:
        """Store durably; returns the new id. A lease keeps it from being claimed meanwhile."""

    def add_within(self, msg: StoredMessage, max_per_user: int, max_total: int,
                   lease_owner: str = "", lease_until: float = 0.0) -> int:
        """:meth:`add`, unless the recipient already has ``max_per_user`` rows or the store
        ``max_total``: then nothing is written and :class:`StoreLimit` says which. One call,
        so through :class:`AsyncStore` the checks and the write are one trip to the store's
        thread (and one transaction) instead of three."""
        if self.count(msg.user) >= max_per_user:
            raise StoreLimit("per_user", max_per_user)
        if self.count() >= max_total:
            raise StoreLimit("total", max_total)
        return self.add(msg, lease_owner, lease_until)

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


class SQLiteTransactions:
    """Transactions of a store on one SQLite connection (``self.db``, autocommit mode:
    ``isolation_level=None``), nestable so that :class:`AsyncStore` can group-commit.

    Why the batch exists: every commit in ``synchronous=FULL`` is an fsync, and one fsync per
    SUBSCRIBE, PUBLISH or stored MESSAGE caps the script at what the disk does per second (and
    costs CPU in the kernel). :class:`AsyncStore` therefore runs a whole batch of calls inside
    one :meth:`transaction`; each method of the store opens its own :meth:`transaction` (or is
    a single statement), which then is a SAVEPOINT inside the batch instead of a commit.

    Used directly (no batch open), every method still commits before it returns: a single
    statement commits by itself (autocommit), a multi-statement method's :meth:`transaction`
    is the outermost one and commits. Run inside a transaction the caller opened (``BEGIN``
    on ``db`` by hand, or a batch), nothing is committed until that one commits.
    """

    db: sqlite3.Connection
    #: Methods that only read: a batch made only of these needs no transaction (and no
    #: write lock). Any method not named here is taken to write.
    READS: frozenset[str] = frozenset()
    #: Write transactions committed so far through :meth:`transaction` (for tests/figures).
    commits: int = 0

    def _open(self, path: str, schema: str) -> None:
        """Open (creating its directory) the database at ``path`` as every store of ours
        uses it: autocommit (transactions are ours), WAL, ``synchronous=FULL`` (committed
        means on disk: we answer only after that), a lock waited for 10 s; then ``schema``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(schema)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit: the outermost one is ``BEGIN IMMEDIATE`` ... ``COMMIT`` (the write
        lock first, so a transaction never fails half way on a lock another process took),
        nested ones are savepoints. An exception rolls back just this unit and propagates.

        If SQLite itself ended the whole transaction on an error (a full disk, an I/O error),
        there is nothing left to roll back here; :attr:`in_transaction` is then False and the
        caller of a batch learns its earlier work is gone too.
        """
        db = self.db
        if db.in_transaction:
            db.execute("SAVEPOINT sipgen")
            try:
                yield
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK TO sipgen")
                    db.execute("RELEASE sipgen")
                raise
            db.execute("RELEASE sipgen")
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        try:
            self._commit()
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _commit(self) -> None:
        """The one place a transaction becomes durable (``synchronous=FULL``: on disk when
        this returns)."""
        self.db.execute("COMMIT")
        self.commits += 1


class SQLiteMessageStore(SQLiteTransactions, MessageStore):
    READS = frozenset({"count", "users_due", "users", "list"})

    def __init__(self, path: str) -> None:
        self._open(path, _SCHEMA)
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
        with self.transaction():
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
        return taken

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
        with self.transaction():
            rows = self.db.execute(
                f"SELECT {_COLS} FROM messages WHERE expires <= ? AND lease_until <= ? "
                "ORDER BY id LIMIT ?", (now, now, limit)).fetchall()
            self.db.executemany("DELETE FROM messages WHERE id=?", [(r[0],) for r in rows])
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
        n = 0
        with self.transaction():  # one commit for all of them
            owners = [r[0] for r in self.db.execute(
                "SELECT DISTINCT lease_owner FROM messages WHERE lease_owner != '' "
                "AND lease_until > 0")]
            for o in owners:
                if is_dead(o):
                    n += self.db.execute("UPDATE messages SET lease_owner='', lease_until=0 "
                                         "WHERE lease_owner=?", (o,)).rowcount
        return n

    def rekey(self, key: Callable[[str], str]) -> int:
        n = 0
        with self.transaction():  # every user moved, or none
            moves = [(key(u), u) for u in self.users()]
            for new, old in moves:
                if new != old:
                    n += self.db.execute("UPDATE messages SET user=? WHERE user=?",
                                         (new, old)).rowcount
        return n

    def close(self) -> None:
        self.db.close()


class StoreUnavailable(Exception):
    """The store could not be opened (or is closed); nothing can be stored or read."""


#: At most this many calls run in one batch (one transaction): a flood of calls cannot keep
#: one transaction open, and the write lock held, without end; the rest go in the next batch.
MAX_BATCH = 256


class _Call:
    """One awaited store call: what to run, and the future its caller waits on."""

    __slots__ = ("name", "args", "kw", "fut", "loop", "ok", "value")

    def __init__(self, name: str, args: tuple[Any, ...], kw: dict[str, Any],
                 fut: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.name, self.args, self.kw, self.fut, self.loop = name, args, kw, fut, loop
        self.ok = False
        self.value: Any = None


class _BatchLost(Exception):
    """The batch's transaction is gone (SQLite ended it on an error, or its commit failed)."""


def _resolve(calls: list[_Call]) -> None:
    """On the event loop: hand each caller its result (its batch is committed by now)."""
    for c in calls:
        fut = c.fut
        if fut.done():  # cancelled meanwhile: the caller no longer listens
            continue
        if c.ok:
            fut.set_result(c.value)
        else:
            fut.set_exception(c.value)


class _Worker:
    """The state :class:`AsyncStore` shares with its thread (the thread holds this, never the
    :class:`AsyncStore`, so an AsyncStore nobody uses any more is collected and stops it)."""

    def __init__(self, store: Any, opener: Callable[[], Any] | None) -> None:
        self.store: Any = store
        self.error: BaseException | None = None
        self.ready: Future[None] = Future()
        self.cond = threading.Condition(threading.Lock())
        self.queue: deque[_Call] = deque()  # handed over, waiting for the thread
        self.closing = False
        self.batches = 0  # batches run (for tests and figures)
        # the event loop's side: calls made during this tick, not handed over yet
        self.tick: list[_Call] = []
        self.tick_loop: asyncio.AbstractEventLoop | None = None
        if opener is None:
            self.ready.set_result(None)
        self.thread = threading.Thread(target=self.run, args=(opener,), daemon=True,
                                       name=f"sipgen-store-{id(self):x}")
        self.thread.start()

    # -- the event loop's side ---------------------------------------------------------------
    def submit(self, c: _Call) -> None:
        if self.closing:
            raise StoreUnavailable("store closed")
        self.tick.append(c)
        if self.tick_loop is not c.loop:
            if self.tick_loop is not None:
                self.hand_over()  # another loop had calls waiting: do not strand them
            self.tick_loop = c.loop
            c.loop.call_soon(self.hand_over)

    def hand_over(self) -> None:
        """End of the tick: what was called during it goes to the thread in one go."""
        self.tick_loop = None
        if not self.tick:
            return
        calls, self.tick = self.tick, []
        with self.cond:
            self.queue.extend(calls)
            self.cond.notify()

    def stop(self, wait: bool = False) -> None:
        """What was already called still runs; then the store is closed and the thread ends."""
        self.hand_over()
        with self.cond:
            self.closing = True
            self.cond.notify()
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()

    # -- the store's thread ------------------------------------------------------------------
    def run(self, opener: Callable[[], Any] | None) -> None:
        if opener is not None:
            try:
                self.store = opener()
            except BaseException as e:  # noqa: BLE001 - every caller hears of it
                self.error = e
                self.ready.set_exception(e)
            else:
                self.ready.set_result(None)
        cond, queue = self.cond, self.queue
        while True:
            with cond:
                while not queue and not self.closing:
                    cond.wait()
                if not queue:
                    break
                n = min(len(queue), MAX_BATCH)
                batch = [queue.popleft() for _ in range(n)]
            self.run_batch(batch)
        if self.store is not None:
            self.store.close()

    def run_batch(self, batch: list[_Call]) -> None:
        # cancelled before it started: not run (as an executor would not run it)
        calls = [c for c in batch if not c.fut.cancelled()]
        if not calls:
            return
        self.batches += 1
        store = self.store
        reads: frozenset[str] = getattr(store, "READS", frozenset())
        if (len(calls) == 1 or not isinstance(store, SQLiteTransactions)
                or all(c.name in reads for c in calls)):
            for c in calls:  # each commits by itself, if it writes at all
                self.run_one(c)
        else:
            try:
                self.run_together(store, calls)
            except _BatchLost:
                for c in calls:  # nothing of it was committed: each on its own now
                    self.run_one(c)
        # only now, every write of the batch committed, do the callers hear back
        by_loop: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
        for c in calls:
            by_loop.setdefault(c.loop, []).append(c)
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def run_one(self, c: _Call) -> None:
        try:
            if self.store is None:
                raise StoreUnavailable(f"store not open: {self.error!r}")
            c.value = getattr(self.store, c.name)(*c.args, **c.kw)
            c.ok = True
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            c.value, c.ok = e, False

    @staticmethod
    def run_together(store: SQLiteTransactions, calls: list[_Call]) -> None:
        """Every call in one transaction, each in a savepoint; one commit at the end.

        Raises :class:`_BatchLost` when the transaction did not survive (nothing committed).
        """
        try:
            with store.transaction():
                for c in calls:
                    try:
                        with store.transaction():
                            c.value = getattr(store, c.name)(*c.args, **c.kw)
                            c.ok = True
                    except BaseException as e:  # noqa: BLE001 - that caller gets it
                        c.value, c.ok = e, False
                        if not store.in_transaction:
                            raise _BatchLost from e
        except _BatchLost:
            raise
        except Exception as e:  # BEGIN or COMMIT failed: rolled back, nothing kept
            raise _BatchLost from e


class AsyncStore:
    """Runs a store (a :class:`MessageStore`, an ``EventStore``) in one dedicated thread; every
    method of it is awaitable here.

    Given a callable instead of a store, it opens the store *in that thread*: the event loop
    goes on at once, and calls made meanwhile queue behind the opening (one thread, first in
    first out). :meth:`opened` waits for it; if opening failed, every call raises
    :class:`StoreUnavailable`.

    **Group commit.** Calls are not handed to the thread one by one: those made during one
    event-loop tick go over together at the end of it, and those that arrive while the thread
    is busy wait for it. The thread takes everything waiting (at most :data:`MAX_BATCH` calls)
    and, when the store offers :class:`SQLiteTransactions`, runs it as *one* transaction: each
    call inside its own savepoint, then one commit. Why: with ``synchronous=FULL`` each commit
    is an fsync, and committing every SUBSCRIBE, PUBLISH or stored MESSAGE on its own made the
    disk, not the script, the limit.

    What a caller sees does not change:

    * **Durability**: a call's future is resolved only after the commit that holds its write
      has returned (data on disk), so "committed before we answer" still holds. Nothing of a
      batch is resolved before its commit; a batch of reads only needs none.
    * **Order**: calls run in the order they were made; a read sees the writes made before it,
      including those of its own batch (one connection).
    * **Isolation of failures**: a call that raises rolls back to its savepoint and gets its
      exception; the other calls of the batch are committed and get their results. If the
      batch's transaction is lost as a whole (SQLite ended it on a full disk or an I/O error,
      or the commit failed), nothing of it was committed and every call is run once more on
      its own, in its own transaction, exactly as without batching.
    * **Cancellation**: a call whose caller was cancelled before its batch started is not run.

    A store without :meth:`SQLiteTransactions.transaction` (another backend) gets its calls
    one at a time, each committing by itself. Use it from one event loop at a time.
    """

    def __init__(self, store: Any) -> None:
        if isinstance(store, MessageStore) or not callable(store):
            self._w = _Worker(store, None)
        else:
            self._w = _Worker(None, store)
        weakref.finalize(self, self._w.stop)

    @property
    def store(self) -> Any:
        """The synchronous store (None until open, or if opening failed)."""
        return self._w.store

    @property
    def error(self) -> BaseException | None:
        """What opening raised, if it failed."""
        return self._w.error

    @property
    def batches(self) -> int:
        """Batches run so far (each one transaction at most)."""
        return self._w.batches

    @property
    def is_open(self) -> bool:
        return self._w.ready.done() and self._w.store is not None

    async def opened(self) -> None:
        """Wait until the store is open; raises what opening raised."""
        await asyncio.wrap_future(self._w.ready)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        submit = self._submit

        async def call(*args: Any, **kw: Any) -> Any:
            return await submit(name, args, kw)

        call.__name__ = call.__qualname__ = name
        self.__dict__[name] = call  # found at once next time
        return call

    def post(self, name: str, *args: Any) -> "asyncio.Future[Any]":
        """Call ``name`` without waiting for it: the returned future resolves as the awaited
        call would (after the commit that holds it). Calls made later still run after it, in
        order, so a later read sees its write. For writes nobody needs to wait for (the
        delete after a delivery); a failure is logged here, whether or not anyone looks."""
        fut = self._submit(name, args, {})
        fut.add_done_callback(_log_posted_failure)
        return fut

    def _submit(self, name: str, args: tuple[Any, ...], kw: dict[str, Any]
                ) -> "asyncio.Future[Any]":
        """Hand one call to the thread (in this tick's batch); its future, not yet waited."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._w.submit(_Call(name, args, kw, fut, loop))
        return fut

    def close(self) -> None:
        """Run what was already called, then close the store and stop the thread (waits)."""
        self._w.stop(wait=True)


def _log_posted_failure(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("store write failed: %s", fut.exception())


def now() -> float:
    return time.time()
