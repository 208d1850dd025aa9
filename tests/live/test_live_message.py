"""Live: SIP MESSAGE through a real Yate, the console, restarts and the start/stop loop.

Phones are :class:`sipphone.Phone` (UDP on loopback); users 123, 234, 345 are in regfile.
Set-up (A) hands every MESSAGE to yate-sipgen as ``sip.message``; set-up (B) lets Yate route
it (``[message] enable=yes``) and yate-sipgen delivers the ``msg.execute``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest

from sipphone import Phone
from yatelive import LiveYate, wait_for

#: A / B, each with and without digest challenges.
SETUPS: dict[str, dict[str, Any]] = {
    "A-auth": dict(ysipchan={"methods": {"message": "yes"}}),
    "A-noauth": dict(ysipchan={"methods": {"message": "no"}},
                     sipgen={"message": {"auth": "optional"}}),
    "B-auth": dict(ysipchan={"methods": None,
                             "message": {"enable": "yes", "auth_required": "yes"}},
                   sipgen={"message": {"msg_execute": "true", "route_offline": "true"}}),
    "B-noauth": dict(ysipchan={"methods": None,
                               "message": {"enable": "yes", "auth_required": "no"}},
                     sipgen={"message": {"msg_execute": "true", "route_offline": "true",
                                         "auth": "optional"}}),
}


def merged(setup: str, **extra: dict) -> dict[str, Any]:
    kw = {k: {s: (dict(v) if v is not None else None) for s, v in sect.items()}
          for k, sect in SETUPS[setup].items()}
    for k, sect in extra.items():
        for s, v in sect.items():
            kw.setdefault(k, {}).setdefault(s, {}).update(v)
    return kw


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def phones(y: LiveYate, *users: str) -> list[Phone]:
    return [await Phone(u, y.users[u], y.server).start() for u in users]


def messages(p: Phone) -> list[str]:
    return [m.text for m in p.requests("MESSAGE")]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_message_flows_delivered_rejected_stored_then_delivered_once(yate, setup: str) -> None:
    y = yate(**merged(setup))
    y.start()
    auth = setup.endswith("-auth")

    async def scenario() -> None:
        a, b, c = await phones(y, "123", "234", "345")
        assert (await b.register()).code == 200
        r = await a.message("234", "hi 234", auth=auth)
        assert r.code == 200, r.first  # the phone's own 200: delivered
        assert messages(b) == ["hi 234"]
        (got,) = b.requests("MESSAGE")
        assert "sip:123@" in (got.get("From") or "")
        if setup.startswith("A"):
            # an empty MESSAGE (no Content-Type): 415 with what we take
            r = await a.message("234", "", content_type="", auth=auth)
            assert r.code == 415 and "text/plain" in (r.get("Accept") or "")
        r = await a.message("345", "while you were out", auth=auth)
        assert r.code == 202, r.first  # 345 is offline: stored
        assert (await c.register()).code == 200
        await c.wait_request(lambda m: m.method == "MESSAGE", 5)
        await asyncio.sleep(0.5)
        assert messages(c) == ["while you were out"]  # exactly once
        for p in (a, b, c):
            p.close()

    run(scenario())
    y.stop()
    assert "has not exited" not in y.log_text()


def test_unauthenticated_message_with_auth_required_gets_a_challenge_then_403(yate) -> None:
    """[methods] message=yes: Yate challenges; without credentials the sender never gets in."""
    y = yate()
    y.start()

    async def scenario() -> None:
        (a,) = await phones(y, "123")
        r = await a.message("234", "no credentials", auth=False)
        assert r.code == 401 and "Digest" in (r.get("WWW-Authenticate") or "")
        a.close()

    run(scenario())


def test_console_status_stats_and_reload_through_rmanager(yate) -> None:
    y = yate()
    y.start()
    st = y.command("status sipgen")
    assert "name=sipgen,type=misc;state=running" in st
    assert "name=sipgen" in y.command("status")  # the overview has our line too
    stats = y.command("sipgen stats")
    assert "msg_received=0" in stats and "uptime=" in stats
    assert "sipgen reload" in y.command("sipgen")

    async def send(body: str) -> int:
        (a,) = await phones(y, "123")
        try:
            return (await a.message("345", body)).code
        finally:
            a.close()

    assert run(send("x" * 300)) == 202
    y.set_sipgen("message", max_body="200")
    y.command("reload sipgen")
    time.sleep(0.5)  # the reload runs in the script after rmanager's answer
    assert run(send("x" * 300)) == 413
    assert "msg_received=2" in y.command("sipgen stats")
    # a bad file is reported and the running configuration kept
    y.sipgen_conf.write_text(y.sipgen_conf.read_text() + "\n[message]\nmax_body=zero\n")
    out = y.command("sipgen reload")
    assert "Reload failed" in out and "max_body" in out
    assert run(send("x" * 300)) == 413


def test_sipgen_restart_runs_a_new_process_with_the_same_argument(yate) -> None:
    y = yate()
    y.start()
    (old,) = y.script_pids()
    assert "Restarting" in y.command("sipgen restart")
    run(wait_for(lambda: y.script_pids() and y.script_pids() != [old], 5, "a new script"))
    y.wait_installed("sip.message", 5)
    assert "state=running" in y.command("status sipgen")

    async def scenario() -> None:
        a, b = await phones(y, "123", "234")
        await b.register()
        assert (await a.message("234", "after restart")).code == 200
        a.close()
        b.close()

    run(scenario())
    y.stop()
    assert "has not exited" not in y.log_text()


def test_kill_9_between_store_and_register_delivers_exactly_once(yate) -> None:
    y = yate()
    y.start()

    async def scenario() -> None:
        a, c = await phones(y, "123", "345")
        assert (await a.message("345", "survives kill -9")).code == 202
        old = y.kill_script()
        await wait_for(lambda: y.script_pids() and old not in y.script_pids(), 5, "respawn")
        y.wait_installed("sip.message", 5)
        assert (await c.register()).code == 200
        await c.wait_request(lambda m: m.method == "MESSAGE", 5)
        await asyncio.sleep(1.0)
        assert messages(c) == ["survives kill -9"]
        # and the respawned script serves new messages
        assert (await a.message("345", "live again")).code == 200
        a.close()
        c.close()

    run(scenario())


def test_yate_restart_keeps_stored_messages(yate) -> None:
    y = yate()
    y.start()

    async def store() -> None:
        (a,) = await phones(y, "123")
        assert (await a.message("345", "kept over a Yate restart")).code == 202
        a.close()

    run(store())
    y.stop()
    assert "has not exited" not in y.log_text()
    y.start()

    async def deliver() -> None:
        (c,) = await phones(y, "345")
        assert (await c.register()).code == 200
        await c.wait_request(lambda m: m.method == "MESSAGE", 5)
        await asyncio.sleep(0.5)
        assert messages(c) == ["kept over a Yate restart"]
        c.close()

    run(deliver())


def test_domain_aliases_registering_at_the_address_gets_what_was_sent_to_the_name(
        yate) -> None:
    y = yate(sipgen={"message": {"domains": "example.com,127.0.0.1"}})
    y.start()

    async def scenario() -> None:
        a, c = await phones(y, "123", "345")
        r = await a.message("345", "to the name", domain="example.com")
        assert r.code == 202, r.first
        assert (await c.register()).code == 200  # Request-URI host 127.0.0.1
        await c.wait_request(lambda m: m.method == "MESSAGE", 5)
        await asyncio.sleep(0.5)
        assert messages(c) == ["to the name"]
        a.close()
        c.close()

    run(scenario())


@pytest.mark.parametrize("load", [0, 2])
def test_start_stop_loop_installs_within_a_second_and_exits_on_eof(yate, tmp_path,
                                                                  load: int) -> None:
    """The start-up fault of the issue: Yate started and stopped again and again on one
    state_dir, with kill -9s in between, on an idle and a loaded machine."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(load)]
    try:
        y = yate()
        for i in range(8):
            t0 = time.monotonic()
            y.start(wait_installed=None)
            y.wait_installed("sip.message", timeout=1.0 + (0.5 if load else 0.0))
            took = time.monotonic() - t0
            assert took < 1.5, (i, took)
            if i % 2:
                old = y.kill_script()
                run(wait_for(lambda: y.script_pids() and old not in y.script_pids(), 5))
                y.wait_installed("sip.message", timeout=2.0)
            y.stop()
            log = y.log_text()
            assert "has not exited" not in log or load, log[-2000:]
            assert "Never got anything" not in log
    finally:
        for b in burners:
            b.kill()


def test_a_locked_store_neither_delays_the_install_nor_keeps_the_script_alive(yate) -> None:
    """One trigger of the start-up fault: messages.db held by another process. SQLite makes
    the opener wait up to 10 s; the script must install at once and exit on EOF."""
    import sqlite3

    from yate_sipgen.store import SQLiteMessageStore

    y = yate()
    path = y.state / "messages.db"
    SQLiteMessageStore(str(path)).close()
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
    db.execute("DELETE FROM messages")
    try:
        t0 = time.monotonic()
        y.start(wait_installed=None)
        y.wait_installed("sip.message", timeout=1.0)
        assert time.monotonic() - t0 < 1.5
        y.wait_log("still opening after 1 s", 3)
        y.stop()
        assert "has not exited" not in y.log_text()
    finally:
        db.close()


def test_crash_back_off_is_announced_and_ends_at_once_on_eof(yate) -> None:
    """The other trigger: a crash counter that makes the start wait longer than the run."""
    import json

    y = yate()
    y.state.mkdir(parents=True, exist_ok=True)
    (y.state / "lifecycle.json").write_text(json.dumps(
        {"running": True, "started": time.time() - 1, "pid": 1, "crashes": 5}))
    y.start(wait_installed=None)
    y.wait_log(r"crashed 6 times in a row; waiting 32s", 1.5)
    y.stop()
    assert "has not exited" not in y.log_text()
