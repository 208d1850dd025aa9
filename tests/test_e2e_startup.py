"""Start-up and stop invariants, end to end through the fake Yate (issue "A real Yate ...").

Whatever the script is doing -- waiting in crash back-off, opening a store another process has
locked, recovering leases -- two things hold:

* within a second of being started it has installed its handlers, or said in Yate's log why
  not (the crash back-off);
* when Yate closes its stdin it exits on its own, before Yate's SIGTERM (30-60 ms later).

Each test gives the fake a SIGTERM grace far above that, so an exit before it is the script's
own; the exit must still come within :data:`EXIT_WITHIN`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

try:
    from fakeyate import FakeYate
    from msg_e2e_harness import SCRIPT, BASE, assert_clean, params_of, run, started, write_conf
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.fakeyate import FakeYate  # type: ignore[no-redef]
    from tests.msg_e2e_harness import (SCRIPT, BASE, assert_clean, params_of, run,  # type: ignore
                                       started, write_conf)

from yate_sipgen.store import SQLiteMessageStore, StoredMessage, new_owner

#: A script left alone exits this fast after EOF (Yate sends SIGTERM after 30-60 ms; a loaded
#: CI machine gets some slack, the fake's SIGTERM comes only after GRACE).
EXIT_WITHIN = 0.25
GRACE_MS = 3000


def fake(tmp_path: Path, conf: str, **kw) -> FakeYate:
    cwd = tmp_path / "yate-cwd"
    cwd.mkdir(exist_ok=True)
    return FakeYate(SCRIPT, conf, cwd=str(cwd), script_name="sipgen", respawn=False,
                    kill_grace_ms=GRACE_MS, **kw)


async def eof_exit_time(fy: FakeYate) -> float:
    """Close the script's stdin; seconds until it exited (without any SIGTERM)."""
    proc = fy.proc
    t0 = time.monotonic()
    closing = asyncio.ensure_future(fy.close_stdin())
    await asyncio.wait_for(proc.wait(), GRACE_MS / 1000 - 0.5)
    took = time.monotonic() - t0
    await closing
    assert not any(d == "EVT" and b"SIGTERM" in ln for d, ln in fy.transcript)
    return took


def crashed_before(tmp_path: Path, crashes: int) -> None:
    """lifecycle.json as a crash loop leaves it: the last run did not end cleanly."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "lifecycle.json").write_text(json.dumps(
        {"running": True, "started": time.time() - 1, "pid": 1, "crashes": crashes}))


def test_stdin_eof_during_crash_back_off_ends_the_script_at_once(tmp_path: Path) -> None:
    crashed_before(tmp_path, 5)  # the next start waits 32 s
    conf = write_conf(tmp_path, general={"restart": "false"})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            # within a second: Yate's log says why nothing is installed
            await fy.wait_until(lambda: any("waiting" in t for t in fy.output_lines), 1.0,
                                "the back-off announced")
            assert "sip.message" not in fy.installs
            took = await eof_exit_time(fy)
            assert took < EXIT_WITHIN, took
            assert fy.exit_codes == [0]

    run(scenario)


def lock_database(path: Path) -> sqlite3.Connection:
    """Another process's hold on the database: no other connection can even read it."""
    SQLiteMessageStore(str(path)).close()
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
    db.execute("INSERT INTO messages (user, sender, from_hdr, to_hdr, content_type, body, "
               "call_id, from_tag, received, expires) VALUES "
               "('x@y','a@b','f','t','text/plain','b','c','t',0,0)")
    return db


def test_a_locked_store_delays_neither_the_install_nor_the_exit(tmp_path: Path) -> None:
    db = lock_database(tmp_path / "state" / "messages.db")
    conf = write_conf(tmp_path)

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            t0 = time.monotonic()
            await fy.wait_installed("sip.message", 1.0)
            assert time.monotonic() - t0 < 1.0
            await fy.wait_until(lambda: any("still opening" in t for _, t in fy.debug_lines),
                                3.0, "the locked store reported")
            took = await eof_exit_time(fy)
            assert took < EXIT_WITHIN, took
            assert fy.exit_codes == [0]

    try:
        run(scenario)
    finally:
        db.close()


def test_a_message_that_arrives_while_the_store_is_locked_is_stored_once_it_opens(
        tmp_path: Path) -> None:
    db = lock_database(tmp_path / "state" / "messages.db")

    async def scenario() -> None:
        async with started(tmp_path, wait_store=False) as y:
            pending = asyncio.ensure_future(y.message())  # bob is offline
            await asyncio.sleep(1.0)
            assert not pending.done()  # waits for the store, within its deadline
            db.execute("ROLLBACK")
            db.close()
            r = await pending
            assert r.get("code") == "202"
            assert len(await y.stored("bob@example.com")) == 1
            assert_clean(y)

    try:
        run(scenario)
    finally:
        db.close()


def test_leases_of_a_dead_process_of_this_host_are_given_back_at_start(tmp_path: Path) -> None:
    """A kill -9 during a deadline delivery leaves the row leased; the next start delivers it
    at once instead of after the lease (about 90 s)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = new_owner().split(":")
    dead_owner = ":".join(["sipgen", mine[1], str(dead.pid), "12345", "beef"])
    other_host = ":".join(["sipgen", "elsewhere", str(os.getpid()), "1", "cafe"])
    s = SQLiteMessageStore(str(tmp_path / "state" / "messages.db"))
    now = time.time()
    row = dict(sender="alice@example.com", from_hdr="<sip:alice@example.com>",
               content_type="text/plain", call_id="c1@x", from_tag="t1", received=now,
               expires=now + 3600)
    s.add(StoredMessage(user="bob@example.com", to_hdr="<sip:bob@example.com>", body="leased",
                        **row), dead_owner, now + 90)
    s.add(StoredMessage(user="carol@example.com", to_hdr="<sip:carol@example.com>",
                        body="other node's", **row), other_host, now + 90)
    s.close()

    async def scenario() -> None:
        def before(y):
            y.register_contact("bob@example.com", "sip:bob@192.0.2.20:5062")
            y.register_contact("carol@example.com", "sip:carol@192.0.2.21:5062")

        async with started(tmp_path, before_start=before) as y:
            await y.wait_xsip(1)
            await y.settle()
            assert y.bodies() == ["leased"]  # the other host's lease is left alone
            assert [r.split()[1] for r in await y.stored()] == ["carol@example.com"]
            assert_clean(y)

    run(scenario)


def test_a_message_sent_during_start_up_is_answered_not_lost(tmp_path: Path) -> None:
    """What Yate writes in the first moments is never dropped (it waits until attached)."""
    async def scenario() -> None:
        async with started(tmp_path, wait_store=False) as y:
            y.register_contact("bob@example.com", "sip:bob@192.0.2.20:5062")
            r = await y.fy.dispatch("sip.message", params_of(BASE))
            assert r.answered and r.get("code") == "200"
            assert_clean(y)

    run(scenario)
