"""Subscriptions, publications and package state in SQLite (``events.db`` in ``state_dir``).

A row is committed (WAL, ``synchronous=FULL``) before the SUBSCRIBE or PUBLISH it records is
answered, so a 200 or an ETag we gave out survives a crash of the script or of Yate. The shape
is meant for several Yate nodes sharing one database later: ETags and subscription ids are
random, each subscription records its ``owner`` (the process serving it), CSeq and document
versions are reserved in blocks (``cseq_mark``/``version_mark``: a restart continues above the
mark), and expiry is an ``expires_at`` column anyone can sweep.

Run it through :class:`yate_sipgen.store.AsyncStore` (one thread; the event loop never waits on
SQLite). There, the calls of one loop tick (and those made while the thread was busy) share one
transaction and one commit, still before any of their answers (group commit: see
:class:`yate_sipgen.store.SQLiteTransactions`); used directly, each method commits by itself.
"""

from __future__ import annotations

from sys import intern
from dataclasses import astuple, dataclass, fields

from ..store import SQLiteTransactions
from .subscription import Subscription

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY, package TEXT NOT NULL, event_id TEXT NOT NULL, resource TEXT NOT NULL,
    resource_uri TEXT NOT NULL, subscriber TEXT NOT NULL, call_id TEXT NOT NULL,
    local_tag TEXT NOT NULL, local_uri TEXT NOT NULL,
    remote TEXT NOT NULL, target TEXT NOT NULL, route TEXT NOT NULL, host TEXT NOT NULL,
    port TEXT NOT NULL, transport TEXT NOT NULL, connection_id TEXT NOT NULL,
    content_type TEXT NOT NULL, state TEXT NOT NULL, expires_at REAL NOT NULL,
    cseq INTEGER NOT NULL, cseq_mark INTEGER NOT NULL, version INTEGER NOT NULL,
    version_mark INTEGER NOT NULL, authenticated INTEGER NOT NULL, owner TEXT NOT NULL,
    reason TEXT NOT NULL, runid TEXT NOT NULL, contact TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS subscriptions_expiry ON subscriptions (expires_at);
CREATE TABLE IF NOT EXISTS publications (
    etag TEXT PRIMARY KEY, package TEXT NOT NULL, resource TEXT NOT NULL,
    content_type TEXT NOT NULL, body TEXT NOT NULL, expires_at REAL NOT NULL,
    published REAL NOT NULL, owner TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS publications_resource ON publications (package, resource);
CREATE TABLE IF NOT EXISTS outbox (
    sub_id TEXT PRIMARY KEY, marked REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS package_state (
    package TEXT NOT NULL, resource TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (package, resource)
);
"""

_SUB_COLS = tuple(f.name for f in fields(Subscription))
#: Columns whose values repeat across subscriptions (the watched resource, our own URIs).
_SHARED = frozenset(i for i, name in enumerate(_SUB_COLS) if name in (
    "package", "resource", "resource_uri", "local_uri", "host", "port", "transport",
    "connection_id", "content_type", "state", "owner", "runid", "contact", "reason"))


@dataclass(slots=True)
class Publication:
    """One PUBLISHed event state (RFC 3903), known by its entity tag."""

    etag: str
    package: str
    resource: str
    content_type: str
    body: str
    expires_at: float
    published: float
    owner: str = ""


_PUB_COLS = tuple(f.name for f in fields(Publication))


class EventStore(SQLiteTransactions):
    """Synchronous; one instance per thread (see :class:`~yate_sipgen.store.AsyncStore`).

    Every method is one statement (it commits by itself, or joins the transaction open) or
    runs in :meth:`transaction` (its own commit, or a savepoint of the transaction open).
    """

    READS = frozenset({"load_subscriptions", "load_publications", "load_state", "load_due"})

    def __init__(self, path: str) -> None:
        self._open(path, _SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- subscriptions -------------------------------------------------------------------
    def save_subscription(self, sub: Subscription, due: float = 0.0) -> None:
        """Insert or update ``sub``; ``due``: a NOTIFY is owed to it from then (the first one
        after a SUBSCRIBE or a refresh), as an outbox row in the same transaction."""
        cols = ",".join(_SUB_COLS)
        marks = ",".join("?" * len(_SUB_COLS))
        with self.transaction():
            self.db.execute(f"INSERT OR REPLACE INTO subscriptions ({cols}) VALUES ({marks})",
                            astuple(sub))
            if due:
                self.mark_due([sub.id], due)

    def save_marks(self, marks: list[tuple[int, int, str]]) -> None:
        """``(cseq_mark, version_mark, id)`` of subscriptions whose reservation grew."""
        if not marks:
            return
        with self.transaction():
            self.db.executemany("UPDATE subscriptions SET cseq_mark=?, version_mark=? WHERE id=?",
                                marks)

    def delete_subscription(self, sid: str) -> None:
        self.delete_subscriptions([sid])

    def delete_subscriptions(self, ids: list[str]) -> None:
        if not ids:
            return
        rows = [(i,) for i in ids]
        with self.transaction():
            self.db.executemany("DELETE FROM subscriptions WHERE id=?", rows)
            self.db.executemany("DELETE FROM outbox WHERE sub_id=?", rows)

    # -- the outbox: NOTIFYs due ------------------------------------------------------------
    # A state change marks its watchers here (one row per subscription: a burst coalesces
    # into one row, its ``marked`` the latest); the row goes once a NOTIFY rendered after that
    # mark is through. A restart, or another node sharing the file, finds what is still owed.
    def mark_due(self, ids: list[str], marked: float) -> None:
        if ids:
            with self.transaction():  # executemany alone would commit every row
                self.db.executemany(
                    "INSERT INTO outbox (sub_id, marked) VALUES (?, ?) ON CONFLICT(sub_id) "
                    "DO UPDATE SET marked=MAX(marked, excluded.marked)",
                    [(i, marked) for i in ids])

    def clear_due(self, done: list[tuple[str, float]]) -> None:
        """``(id, rendered)``: a NOTIFY rendered at ``rendered`` went; a mark made later
        stays."""
        if done:
            with self.transaction():
                self.db.executemany("DELETE FROM outbox WHERE sub_id=? AND marked<=?", done)

    def load_due(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sub_id FROM outbox")}

    def load_subscriptions(self) -> list[Subscription]:
        out = []
        # row by row (no list of every row at once) and with the values many subscriptions
        # share interned: 100,000 subscriptions must fit in little memory
        cur = self.db.execute(f"SELECT {','.join(_SUB_COLS)} FROM subscriptions")
        shared = _SHARED
        for r in cur:
            sub = Subscription(*[intern(v) if i in shared and type(v) is str else v
                                 for i, v in enumerate(r)])
            sub.authenticated = bool(sub.authenticated)
            # continue above what was reserved: numbers handed out after the last save of
            # the mark are never handed out twice
            sub.cseq = sub.cseq_mark
            sub.version = sub.version_mark
            out.append(sub)
        return out

    # -- publications --------------------------------------------------------------------
    def save_publication(self, pub: Publication, replaces: str = "") -> None:
        """Insert ``pub``; ``replaces``: the ETag it supersedes (one transaction)."""
        with self.transaction():
            if replaces:
                self.db.execute("DELETE FROM publications WHERE etag=?", (replaces,))
            cols = ",".join(_PUB_COLS)
            self.db.execute(f"INSERT OR REPLACE INTO publications ({cols}) VALUES "
                            f"({','.join('?' * len(_PUB_COLS))})", astuple(pub))

    def delete_publication(self, etag: str) -> None:
        self.db.execute("DELETE FROM publications WHERE etag=?", (etag,))

    def load_publications(self) -> list[Publication]:
        rows = self.db.execute(f"SELECT {','.join(_PUB_COLS)} FROM publications "
                               "ORDER BY published").fetchall()
        return [Publication(*r) for r in rows]

    # -- package state (MWI counts, dialog state) -----------------------------------------
    def set_state(self, package: str, resource: str, value: str) -> None:
        if value:
            self.db.execute("INSERT OR REPLACE INTO package_state VALUES (?,?,?)",
                            (package, resource, value))
        else:
            self.db.execute("DELETE FROM package_state WHERE package=? AND resource=?",
                            (package, resource))

    def load_state(self, package: str) -> dict[str, str]:
        return dict(self.db.execute("SELECT resource, value FROM package_state WHERE package=?",
                                    (package,)).fetchall())
