"""Group commit in the store layer (:class:`AsyncStore` over :class:`SQLiteTransactions`).

The calls made in one event-loop tick (and those made while the store's thread is busy) run in
one transaction with one commit; each caller still gets its own result, and only after the
commit that holds its write; a call that fails fails alone; a batch is bounded; used without
AsyncStore, every method of both SQLite stores still commits by itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from yate_sipgen import store as store_mod
from yate_sipgen.events.store import EventStore, Publication
from yate_sipgen.events.subscription import Subscription
from yate_sipgen.store import AsyncStore, SQLiteMessageStore, StoredMessage, StoreUnavailable

ROOT = Path(__file__).resolve().parent.parent


def msg(user: str = "bob@example.com", body: str = "hi", **kw: Any) -> StoredMessage:
    d: dict[str, Any] = dict(user=user, sender="alice@example.com",
                             from_hdr='"Alice" <sip:alice@example.com>', to_hdr=f"<sip:{user}>",
                             content_type="text/plain", body=body, call_id="c@x",
                             from_tag="t", received=1000.0, expires=1e12)
    d.update(kw)
    return StoredMessage(**d)


def sub(n: int, **kw: Any) -> Subscription:
    d: dict[str, Any] = dict(id=f"{n:016x}", package="presence", event_id="",
                             resource="bob@example.com", resource_uri="sip:bob@example.com",
                             subscriber=f"w{n}@example.com", call_id=f"c{n}@x", local_tag=f"t{n}",
                             local_uri="<sip:bob@example.com>", remote=f"<sip:w{n}@x>;tag=r",
                             target=f"sip:w{n}@127.0.0.1", expires_at=time.time() + 3600)
    d.update(kw)
    return Subscription(**d)


def count_commits(db: sqlite3.Connection) -> list[int]:
    """Counts what really commits on ``db``: a COMMIT, or a write run in autocommit mode."""
    n = [0]

    def trace(sql: str) -> None:
        s = sql.lstrip()[:7].upper()
        if s.startswith("COMMIT") or (s.startswith(("INSERT", "UPDATE", "DELETE", "REPLACE"))
                                      and not db.in_transaction):
            n[0] += 1

    db.set_trace_callback(trace)
    return n


def fresh_rows(path: str, sql: str) -> list[tuple[Any, ...]]:
    """What another connection (another process, after a crash) finds in the file."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


class BrokenStore(SQLiteMessageStore):
    """A store with a call that writes, then fails, and one that kills the whole transaction."""

    def add_then_fail(self, m: StoredMessage) -> int:
        self.add(m)  # must not survive: rolled back to this call's savepoint
        raise ValueError("broken on purpose")

    def lose_transaction(self) -> None:
        # as SQLite does on a full disk or an I/O error: the whole transaction is gone
        self.db.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error (simulated)")


class GatedStore(SQLiteMessageStore):
    """Its commit waits until the test lets it go."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _commit(self) -> None:
        self.entered.set()
        assert self.release.wait(10)
        super()._commit()


class FailingCommitStore(SQLiteMessageStore):
    """The first batch commit fails (as a commit hitting an I/O error would)."""

    failed = False

    def _commit(self) -> None:
        if not self.failed:
            self.failed = True
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error at commit (simulated)")
        super()._commit()


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "messages.db")


# ==========================================================================
# one commit for many calls, each caller its own result
# ==========================================================================


def test_concurrent_subscriptions_share_one_commit_and_are_all_on_disk(tmp_path: Path) -> None:
    path = str(tmp_path / "events.db")

    async def scenario() -> None:
        st = EventStore(path)
        commits = count_commits(st.db)
        a = AsyncStore(st)
        results = await asyncio.gather(*(a.save_subscription(sub(n)) for n in range(200)))
        assert results == [None] * 200
        # every one acknowledged means every one on disk, for any other connection
        assert fresh_rows(path, "SELECT COUNT(*) FROM subscriptions") == [(200,)]
        assert commits[0] < 200 and commits[0] == st.commits
        assert a.batches == commits[0] == 1  # one tick, one batch, one commit
        a.close()

    asyncio.run(scenario())


def test_each_caller_gets_its_own_result_in_order_and_reads_see_earlier_writes(
        dbfile: str) -> None:
    async def scenario() -> None:
        st = SQLiteMessageStore(dbfile)
        commits = count_commits(st.db)
        a = AsyncStore(st)
        out = await asyncio.gather(a.add(msg(body="1")), a.count(), a.add(msg(body="2")),
                                   a.count("bob@example.com"), a.add(msg(user="x@y", body="3")),
                                   a.count("nobody@example.com"))
        i1, n1, i2, n2, i3, n3 = out
        assert i1 < i2 < i3 and (n1, n2, n3) == (1, 2, 0)
        assert [r.body for r in await a.list()] == ["1", "2", "3"]
        assert commits[0] == 1
        a.close()

    asyncio.run(scenario())


def test_calls_made_while_the_thread_is_busy_go_in_one_later_batch(dbfile: str) -> None:
    async def scenario() -> None:
        st = GatedStore(dbfile)
        a = AsyncStore(st)
        first = asyncio.gather(*(a.add(msg(body=f"a{n}")) for n in range(3)))
        await asyncio.to_thread(st.entered.wait, 5)  # the thread is inside that commit now
        later = []
        for n in range(50):  # made over many ticks, while the thread is busy
            later.append(asyncio.ensure_future(a.add(msg(body=f"b{n}"))))
            await asyncio.sleep(0)
        st.release.set()
        await first
        ids = await asyncio.gather(*later)
        assert ids == sorted(ids) and len(set(ids)) == 50
        assert a.batches == 2 and st.commits == 2
        a.close()

    asyncio.run(scenario())


def test_reads_alone_need_no_transaction(dbfile: str) -> None:
    async def scenario() -> None:
        st = SQLiteMessageStore(dbfile)
        st.add(msg())
        commits = count_commits(st.db)
        a = AsyncStore(st)
        assert await asyncio.gather(*(a.count() for _ in range(20))) == [1] * 20
        assert commits[0] == 0 and st.commits == 0
        a.close()

    asyncio.run(scenario())


def test_a_batch_is_bounded(dbfile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store_mod.MAX_BATCH == 256
    sizes: list[int] = []
    real = store_mod._Worker.run_batch

    def spy(self: Any, batch: list[Any]) -> None:
        sizes.append(len(batch))
        real(self, batch)

    monkeypatch.setattr(store_mod._Worker, "run_batch", spy)

    async def scenario() -> None:
        st = SQLiteMessageStore(dbfile)
        a = AsyncStore(st)
        ids = await asyncio.gather(*(a.add(msg(body=str(n))) for n in range(600)))
        assert ids == sorted(ids) and len(set(ids)) == 600
        assert sizes == [256, 256, 88] and st.commits == 3
        a.close()

    asyncio.run(scenario())


# ==========================================================================
# failures stay with their caller
# ==========================================================================


def test_a_failing_call_fails_only_its_caller_and_the_rest_are_durable(dbfile: str) -> None:
    async def scenario() -> None:
        st = BrokenStore(dbfile)
        a = AsyncStore(st)
        out = await asyncio.gather(a.add(msg(body="before")), a.add_then_fail(msg(body="bad")),
                                   a.add(msg(body="after")), a.count(),
                                   return_exceptions=True)
        assert isinstance(out[1], ValueError) and str(out[1]) == "broken on purpose"
        assert isinstance(out[0], int) and isinstance(out[2], int)
        assert out[3] == 2  # the failed call's own write was rolled back at once
        assert st.commits == 1
        assert fresh_rows(dbfile, "SELECT body FROM messages ORDER BY id") == [
            (b"before",), (b"after",)]
        a.close()

    asyncio.run(scenario())


def test_a_call_that_loses_the_whole_transaction_does_not_lose_the_others(
        dbfile: str) -> None:
    async def scenario() -> None:
        st = BrokenStore(dbfile)
        a = AsyncStore(st)
        out = await asyncio.gather(a.add(msg(body="1")), a.lose_transaction(),
                                   a.add(msg(body="2")), return_exceptions=True)
        assert isinstance(out[0], int) and isinstance(out[2], int) and out[0] < out[2]
        assert isinstance(out[1], sqlite3.OperationalError)
        assert fresh_rows(dbfile, "SELECT body FROM messages ORDER BY id") == [(b"1",), (b"2",)]
        assert not st.db.in_transaction
        a.close()

    asyncio.run(scenario())


def test_a_failed_commit_runs_the_calls_again_one_by_one(dbfile: str) -> None:
    async def scenario() -> None:
        st = FailingCommitStore(dbfile)
        a = AsyncStore(st)
        ids = await asyncio.gather(*(a.add(msg(body=str(n))) for n in range(5)))
        assert st.failed and len(set(ids)) == 5
        assert fresh_rows(dbfile, "SELECT body FROM messages ORDER BY id") == [
            (str(n).encode(),) for n in range(5)]
        a.close()

    asyncio.run(scenario())


# ==========================================================================
# durability: nobody hears back before the commit
# ==========================================================================


def test_nothing_is_resolved_before_the_commit(dbfile: str) -> None:
    async def scenario() -> None:
        st = GatedStore(dbfile)
        a = AsyncStore(st)
        tasks = [asyncio.ensure_future(a.add(msg(body=str(n)))) for n in range(5)]
        await asyncio.to_thread(st.entered.wait, 5)
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks)  # written, not committed: nobody is told
        assert fresh_rows(dbfile, "SELECT COUNT(*) FROM messages") == [(0,)]
        st.release.set()
        ids = await asyncio.gather(*tasks)
        assert len(set(ids)) == 5
        assert fresh_rows(dbfile, "SELECT COUNT(*) FROM messages") == [(5,)]
        a.close()

    asyncio.run(scenario())


def test_a_call_cancelled_before_its_batch_is_not_run(dbfile: str) -> None:
    async def scenario() -> None:
        st = GatedStore(dbfile)
        a = AsyncStore(st)
        first = asyncio.gather(*(a.add(msg(body=f"a{n}")) for n in range(2)))
        await asyncio.to_thread(st.entered.wait, 5)
        gone = asyncio.ensure_future(a.add(msg(body="cancelled")))
        kept = asyncio.ensure_future(a.add(msg(body="kept")))
        await asyncio.sleep(0.01)
        gone.cancel()
        st.release.set()
        await first
        await kept
        assert gone.cancelled()
        assert [r.body for r in await a.list()] == ["a0", "a1", "kept"]
        a.close()

    asyncio.run(scenario())


def test_acknowledged_writes_survive_a_crash_and_a_new_store_sees_them(tmp_path: Path) -> None:
    # a process writes through AsyncStore, says what it was told, and dies at once (no close)
    msgs, events = str(tmp_path / "m.db"), str(tmp_path / "e.db")
    child = textwrap.dedent(f"""
        import asyncio, os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from yate_sipgen.store import AsyncStore, SQLiteMessageStore, StoredMessage
        from yate_sipgen.events.store import EventStore, Publication
        from yate_sipgen.events.subscription import Subscription

        async def main():
            m = AsyncStore(lambda: SQLiteMessageStore({msgs!r}))
            e = AsyncStore(lambda: EventStore({events!r}))
            ids = await asyncio.gather(*(m.add(StoredMessage(
                user="bob@x", sender="a@x", from_hdr="<sip:a@x>", to_hdr="<sip:bob@x>",
                content_type="text/plain", body=str(n), received=n, expires=1e12))
                for n in range(30)))
            await asyncio.gather(*(e.save_subscription(Subscription(
                id=str(n), package="presence", event_id="", resource="bob@x",
                resource_uri="sip:bob@x", subscriber="w@x", call_id=str(n), local_tag="t",
                local_uri="<sip:bob@x>", remote="<sip:w@x>", target="sip:w@h",
                expires_at=time.time() + 60)) for n in range(30)),
                e.save_publication(Publication("tag1", "presence", "bob@x", "t/p", "b",
                                               time.time() + 60, time.time())),
                e.set_state("mwi", "bob@x", "2/0"))
            print(" ".join(map(str, ids)), flush=True)
            os._exit(0)  # as after kill -9: nothing closed, nothing flushed by us

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    acked = [int(x) for x in out.split()]
    assert len(acked) == 30
    s = SQLiteMessageStore(msgs)
    assert [r.id for r in s.list()] == acked and [r.body for r in s.list()] == [
        str(n) for n in range(30)]
    s.close()
    e = EventStore(events)
    assert sorted(int(x.id) for x in e.load_subscriptions()) == list(range(30))
    assert [p.etag for p in e.load_publications()] == ["tag1"]
    assert e.load_state("mwi") == {"bob@x": "2/0"}
    e.close()


def test_a_restarted_store_on_the_same_file_sees_what_was_acknowledged(dbfile: str) -> None:
    async def first() -> list[int]:
        a = AsyncStore(lambda: SQLiteMessageStore(dbfile))
        ids = await asyncio.gather(*(a.add(msg(body=str(n))) for n in range(10)))
        await asyncio.gather(a.delete(ids[0]), a.release(ids[1], 3, 5.0))
        a.close()
        return ids

    ids = asyncio.run(first())

    async def second() -> None:
        a = AsyncStore(lambda: SQLiteMessageStore(dbfile))
        rows = await a.list()
        assert [r.id for r in rows] == ids[1:]
        assert (rows[0].attempts, rows[0].next_try) == (3, 5.0)
        a.close()

    asyncio.run(second())


# ==========================================================================
# used directly: every method still commits by itself
# ==========================================================================


def test_every_write_of_the_message_store_commits_on_its_own_when_used_directly(
        dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    q = "SELECT id, user, attempts, lease_owner FROM messages ORDER BY id"

    def on_disk() -> list[tuple[Any, ...]]:
        assert not s.db.in_transaction  # nothing left open, waiting for a commit
        return fresh_rows(dbfile, q)

    i1 = s.add(msg())
    i2 = s.add(msg(), "other", 1e12)
    assert on_disk() == [(i1, "bob@example.com", 0, ""), (i2, "bob@example.com", 0, "other")]
    assert [m.id for m in s.claim("bob@example.com", "me", 1e12, 2000.0, 10, False)] == [i1]
    assert on_disk()[0][3] == "me"
    s.release(i1, 2, 0.0)
    assert on_disk()[0][2:] == (2, "")
    s.claim("bob@example.com", "me", 1e12, 2000.0, 10, False)
    s.unlease(i1)
    assert on_disk()[0][3] == ""
    assert s.recover_leases(lambda o: o == "other") == 1
    assert on_disk()[1][3] == ""
    assert s.rekey(lambda u: "robert@example.com") == 2
    assert {r[1] for r in on_disk()} == {"robert@example.com"}
    s.delete(i1)
    assert [r[0] for r in on_disk()] == [i2]
    i3 = s.add(msg(expires=1.0))
    assert [m.id for m in s.take_expired(2000.0)] == [i3]
    assert [r[0] for r in on_disk()] == [i2]
    assert s.purge() == 1
    assert on_disk() == []
    s.close()


def test_every_write_of_the_event_store_commits_on_its_own_when_used_directly(
        tmp_path: Path) -> None:
    path = str(tmp_path / "events.db")
    st = EventStore(path)

    def on_disk(sql: str) -> list[tuple[Any, ...]]:
        assert not st.db.in_transaction
        return fresh_rows(path, sql)

    st.save_subscription(sub(1))
    st.save_subscription(sub(2))
    assert on_disk("SELECT COUNT(*) FROM subscriptions") == [(2,)]
    st.save_marks([(100, 7, sub(1).id)])
    assert on_disk(f"SELECT cseq_mark, version_mark FROM subscriptions WHERE id='{sub(1).id}'"
                   ) == [(100, 7)]
    st.delete_subscription(sub(1).id)
    assert on_disk("SELECT COUNT(*) FROM subscriptions") == [(1,)]
    st.delete_subscriptions([sub(2).id])
    assert on_disk("SELECT COUNT(*) FROM subscriptions") == [(0,)]
    st.save_publication(Publication("e1", "presence", "bob@x", "t/p", "one", 1e12, 1.0))
    st.save_publication(Publication("e2", "presence", "bob@x", "t/p", "two", 1e12, 2.0),
                        replaces="e1")
    assert on_disk("SELECT etag, body FROM publications") == [("e2", "two")]
    st.delete_publication("e2")
    assert on_disk("SELECT COUNT(*) FROM publications") == [(0,)]
    st.set_state("mwi", "bob@x", "1/0")
    assert on_disk("SELECT value FROM package_state") == [("1/0",)]
    st.set_state("mwi", "bob@x", "")
    assert on_disk("SELECT COUNT(*) FROM package_state") == [(0,)]
    st.close()


def test_a_transaction_opened_by_hand_holds_the_methods_until_its_commit(
        tmp_path: Path) -> None:
    # as the benchmark preloads 100,000 subscriptions: BEGIN, many saves, one COMMIT
    path = str(tmp_path / "events.db")
    st = EventStore(path)
    st.db.execute("BEGIN")
    for n in range(5):
        st.save_subscription(sub(n))
    st.save_marks([(9, 9, sub(0).id)])  # nested: a savepoint, no commit of its own
    st.delete_subscriptions([sub(4).id])
    assert fresh_rows(path, "SELECT COUNT(*) FROM subscriptions") == [(0,)]
    st.db.execute("COMMIT")
    assert fresh_rows(path, "SELECT COUNT(*) FROM subscriptions") == [(4,)]
    st.close()


# ==========================================================================
# the rest of AsyncStore
# ==========================================================================


def test_calls_made_before_the_store_is_open_wait_for_it_and_share_a_batch(
        dbfile: str) -> None:
    gate = threading.Event()

    def opener() -> SQLiteMessageStore:
        assert gate.wait(5)
        return SQLiteMessageStore(dbfile)

    async def scenario() -> None:
        a = AsyncStore(opener)
        assert not a.is_open
        tasks = [asyncio.ensure_future(a.add(msg(body=str(n)))) for n in range(4)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks)
        gate.set()
        await a.opened()
        assert len(set(await asyncio.gather(*tasks))) == 4
        assert a.store.commits == 1
        a.close()

    asyncio.run(scenario())


def test_a_store_that_failed_to_open_fails_every_call(tmp_path: Path) -> None:
    def opener() -> SQLiteMessageStore:
        raise OSError("no disk")

    async def scenario() -> None:
        a = AsyncStore(opener)
        with pytest.raises(OSError):
            await a.opened()
        assert not a.is_open and isinstance(a.error, OSError)
        out = await asyncio.gather(a.count(), a.add(msg()), return_exceptions=True)
        assert all(isinstance(x, StoreUnavailable) for x in out)
        a.close()
        with pytest.raises(StoreUnavailable):
            await a.count()  # closed

    asyncio.run(scenario())


def test_a_store_without_transactions_gets_its_calls_one_by_one() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[int] = []
            self.closed = False

        def put(self, n: int) -> int:
            if n == 2:
                raise KeyError(n)
            self.seen.append(n)
            return n * 10

        def close(self) -> None:
            self.closed = True

    async def scenario() -> None:
        p = Plain()
        a = AsyncStore(p)
        out = await asyncio.gather(*(a.put(n) for n in range(4)), return_exceptions=True)
        assert out[:2] == [0, 10] and isinstance(out[2], KeyError) and out[3] == 30
        assert p.seen == [0, 1, 3]
        a.close()
        assert p.closed

    asyncio.run(scenario())
