"""SIP MESSAGE store and forward end to end (issue 3, Deliver 5 and 6, and 8).

The real script behind the fake Yate (``msg_e2e_harness``): offline recipients' messages are
stored (SQLite in ``tmp_path/state``), delivered on a successful ``user.register`` watch,
retried with back-off, expired (with an optional notice); the answer deadline stores and answers
202 without ever sending a message twice; a kill -9 between storing and the registration loses
nothing. The console and ``status sipgen`` show it all.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

try:
    from msg_e2e_harness import (assert_clean, sent, Yate, db_exec, db_path, db_rows, run,
                                 started, store_ready, write_conf)
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.msg_e2e_harness import (assert_clean, sent, Yate, db_exec, db_path, db_rows, run,  # type: ignore
                                       started, store_ready, write_conf)

from yate_sipgen.store import SQLiteMessageStore, StoredMessage

BOB = "bob@example.com"
BOB_URI = "sip:bob@192.0.2.20:5062"




async def until(pred, timeout: float = 5.0, step: float = 0.02):
    """Poll an async or plain predicate until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {pred}"
        await asyncio.sleep(step)


def preload(tmp_path: Path, *rows: StoredMessage) -> list[int]:
    """Write rows into the store's database before the script starts."""
    s = SQLiteMessageStore(db_path(tmp_path))
    try:
        return [s.add(r) for r in rows]
    finally:
        s.close()


def row(user: str = BOB, body: str = "stored hello", **kw) -> StoredMessage:
    now = time.time()
    d = dict(user=user, sender="alice@example.com",
             from_hdr='"Alice A" <sip:alice@example.com>', to_hdr=f"<sip:{user}>",
             content_type="text/plain;charset=UTF-8", body=body, call_id="cid-1@sipgen",
             from_tag="ftag1", received=now - 10, expires=now + 3600)
    d.update(kw)
    return StoredMessage(**d)


# ==========================================================================
# store -> register -> delivery -> delete
# ==========================================================================


def test_stored_message_is_delivered_on_a_successful_register_then_deleted(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(xsip_body="while you were out")
            assert r.get("code") == "202"
            # committed before the 202 went out, in a WAL database, kept 3 days by default
            (r,) = db_rows(tmp_path)
            assert r["user"] == BOB and r["body"] == b"while you were out"
            assert r["expires"] - r["received"] == 259200
            con = sqlite3.connect(db_path(tmp_path))
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            con.close()
            assert len(await y.stored(BOB)) == 1
            assert (await y.status())["msg_stored"] == "1"
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062;transport=tcp",
                             oconnection_id="tcp:3-192.0.2.20:5062")
            (x,) = await y.wait_xsip(1)
            assert x.get("uri") == "sip:bob@192.0.2.20:5062;transport=tcp"
            assert x.get("xsip_body") == "while you were out"
            (sx,) = sent(y, "xsip.generate")
            assert sx.get("connection_id") == "tcp:3-192.0.2.20:5062"
            await y.wait_store_empty()
            assert db_rows(tmp_path) == []
            st = await y.status()
            assert st["msg_delivered"] == "1" and st["message.delivered_stored"] == "1"
            assert st["msg_queued"] == "0"
            assert_clean(y)

    run(scenario)


def test_stored_delivery_keeps_call_id_from_tag_date_and_content_of_the_live_attempt(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            y.xsip = lambda m: 408  # the live attempt times out
            r = await y.message()
            assert r.get("code") == "202"
            y.xsip = lambda m: 200
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(2)
            await y.wait_store_empty()
            live, later = sent(y, "xsip.generate")
            for k in ("sip_Call-ID", "sip_From", "sip_To", "sip_CSeq", "sip_Date", "xsip_type",
                      "xsip_body", "uri"):
                assert live.get(k) == later.get(k), k
            assert_clean(y)

    run(scenario)


def test_failed_registration_does_not_trigger_delivery(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            assert (await y.message()).get("code") == "202"
            await y.register("bob", "example.com", BOB_URI, handled=False)
            await y.settle()
            await asyncio.sleep(0.1)
            assert y.xsip_seen == []
            assert len(await y.stored(BOB)) == 1
            # a registration for another domain's bob is not ours either
            await y.register("bob", "other.example", BOB_URI)
            await y.settle()
            assert y.xsip_seen == []
            # a contact that is not SIP is not delivered to
            await y.fy.watch_notify("user.register", [("username", "bob"), ("number", "bob"),
                                                      ("sip_uri", "sip:example.com"),
                                                      ("data", "jabber/bob@x")], handled=True)
            await y.settle()
            assert y.xsip_seen == []
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(1)
            await y.wait_store_empty()
            assert len(y.xsip_seen) == 1
            assert_clean(y)

    run(scenario)


def test_stored_messages_are_delivered_in_order_on_register(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            for i in range(5):
                assert (await y.message(xsip_body=f"m{i}")).get("code") == "202"
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(5)
            await y.wait_store_empty()
            assert y.bodies() == [f"m{i}" for i in range(5)]
            assert y.xsip_max_active == 1
            assert_clean(y)

    run(scenario)


def test_one_delivery_run_per_user_even_when_registrations_come_back_to_back(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            for i in range(3):
                assert (await y.message(xsip_body=f"m{i}")).get("code") == "202"

            async def slowish(m):
                await asyncio.sleep(0.05)
                return 200

            y.xsip = slowish
            for _ in range(3):  # a REGISTER and its quick refreshes
                await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(3)
            await y.wait_store_empty()
            await asyncio.sleep(0.1)
            assert y.bodies() == ["m0", "m1", "m2"]  # each exactly once, in order
            assert y.xsip_max_active == 1
            assert_clean(y)

    run(scenario)


def test_stored_delivery_stops_at_a_failure_and_keeps_the_rest_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            for i in range(3):
                assert (await y.message(xsip_body=f"m{i}")).get("code") == "202"
            y.xsip = lambda m: 200 if m.get("xsip_body") == "m0" else 480
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(2)
            await y.settle()
            assert y.bodies() == ["m0", "m1"]  # m2 is not tried past m1's failure
            rows = db_rows(tmp_path)
            assert [r["body"].decode() for r in rows] == ["m1", "m2"]
            assert [r["attempts"] for r in rows] == [1, 0]
            assert all(r["lease_owner"] == "" for r in rows)
            assert_clean(y)

    run(scenario)


# ==========================================================================
# retry, expiry, caps
# ==========================================================================


def test_failed_stored_delivery_is_retried_later_with_back_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = {"retry_min": "1", "retry_max": "2", "scan_interval": "1"}
        async with started(tmp_path, cfg) as y:
            assert (await y.message()).get("code") == "202"
            stored_at = time.time()
            y.register_contact(BOB, BOB_URI)  # reachable by routing now, no REGISTER seen
            outcomes = iter([408, 480, 200])
            y.xsip = lambda m: next(outcomes)
            await y.wait_xsip(1, timeout=4)
            await y.settle()
            (r,) = db_rows(tmp_path)
            assert r["attempts"] == 1
            assert r["next_try"] - time.time() <= 1.1  # retry_min
            await y.wait_xsip(2, timeout=4)
            await y.settle()
            (r,) = db_rows(tmp_path)
            assert r["attempts"] == 2
            assert 1.0 < r["next_try"] - time.time() <= 2.1  # doubled
            await y.wait_xsip(3, timeout=5)
            await y.wait_store_empty()
            times = [m.time for m in y.fy.sent_by_script if m.name == "xsip.generate"]
            assert times[0] >= int(stored_at) + 1  # not before retry_min
            # every retry routed the user again (call.route), the same message each time
            assert len({x.get("sip_Call-ID") for x in y.xsip_seen}) == 1
            st = await y.status()
            assert st["message.retry"] == "2" and st["msg_delivered"] == "1"
            assert_clean(y)

    run(scenario, timeout=30)


def test_retry_of_a_still_offline_user_keeps_the_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = {"retry_min": "1", "scan_interval": "1"}
        async with started(tmp_path, cfg) as y:
            assert (await y.message()).get("code") == "202"
            n = len(y.routes_seen)
            await until(lambda: len(y.routes_seen) > n, 4)  # the retry asked call.route again
            await y.settle()
            (r,) = db_rows(tmp_path)
            assert r["attempts"] == 1 and y.xsip_seen == []
            assert_clean(y)

    run(scenario, timeout=30)


def test_expired_message_is_counted_and_its_sender_gets_an_auto_submitted_notice(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = {"expiry_notice": "true", "scan_interval": "1", "notice_from": "postmaster"}
        async with started(tmp_path, cfg) as y:
            assert (await y.message(xsip_body="too late")).get("code") == "202"
            (r,) = db_rows(tmp_path)
            assert r["notify_sender"] == 1
            y.register_contact("alice@example.com", "sip:alice@192.0.2.7:5080")
            db_exec(tmp_path, "UPDATE messages SET expires=?", (time.time() - 1,))
            (n,) = await y.wait_xsip(1, timeout=4)
            assert n.get("uri") == "sip:alice@192.0.2.7:5080"
            assert n.get("sip_To") == "<sip:alice@example.com>"
            assert n.get("sip_From").startswith("<sip:postmaster@example.com>;tag=")
            (sn,) = sent(y, "xsip.generate")
            assert sn.get("sip_Auto-Submitted") == "auto-generated"
            assert "bob@example.com" in n.get("xsip_body") and "expired" in n.get("xsip_body")
            route = [m for m in sent(y, "call.route") if m.get("called") == "alice"]
            assert route and route[-1].get("called_domain") == "example.com"
            assert await y.stored() == []
            st = await y.status()
            assert st["msg_expired"] == "1" and st["msg_delivered"] == "0"
            assert_clean(y)

    run(scenario)


def test_expired_message_without_expiry_notice_is_dropped_silently(tmp_path: Path) -> None:
    now = time.time()
    preload(tmp_path, row(received=now - 400000, expires=now - 100000, notify_sender=True))

    async def scenario() -> None:
        async with started(tmp_path, {"scan_interval": "1"}) as y:
            await until(lambda: _expired(y), 3)
            assert await y.stored() == []
            assert y.xsip_seen == [] and y.routes_seen == []
            assert_clean(y)

    run(scenario)


async def _expired(y: Yate) -> bool:
    return (await y.status())["msg_expired"] == "1"


@pytest.mark.parametrize("over", [
    {"sip_auto__submitted": "auto-replied"},  # an automatic sender's message
    {"xsip_type": "message/imdn+xml", "sip_content__type": "message/imdn+xml"},
    {"username": None},  # unauthenticated (auth=optional)
    {"sip_from": "<sip:alice@foreign.example>;tag=1", "domain": "foreign.example"},
], ids=["auto-submitted", "imdn", "unauthenticated", "foreign-sender"])
def test_no_expiry_notice_ever_answers_an_automatic_or_unauthenticated_sender(
        tmp_path: Path, over: dict) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"expiry_notice": "true", "auth": "optional",
                                      "allow_from_mismatch": "true"}) as y:
            r = await y.message(**over)
            assert r.get("code") == "202"
            (r,) = db_rows(tmp_path)
            assert r["notify_sender"] == 0
            assert_clean(y)

    run(scenario)


def test_store_full_for_one_user_answers_480(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"max_per_user": "2"}) as y:
            codes = [(await y.message(xsip_body=str(i))).get("code") for i in range(3)]
            assert codes == ["202", "202", "480"]
            # another user still has room
            r = await y.message(called="carol", sip_uri="sip:carol@example.com")
            assert r.get("code") == "202"
            st = await y.status()
            assert st["message.store_full"] == "1" and st["message.rejected480"] == "1"
            assert_clean(y)

    run(scenario)


def test_store_full_in_total_answers_480(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"max_total": "2"}) as y:
            codes = []
            for u in ("bob", "carol", "dave"):
                r = await y.message(called=u, sip_uri=f"sip:{u}@example.com")
                codes.append(r.get("code"))
            assert codes == ["202", "202", "480"]
            assert len(await y.stored()) == 2
            assert_clean(y)

    run(scenario)


def test_iscomposing_is_never_stored(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(xsip_type="application/im-iscomposing+xml",
                                sip_content__type="application/im-iscomposing+xml",
                                xsip_body="<isComposing/>")
            assert r.get("code") == "480"
            assert await y.stored() == []
            # delivered live when the user is reachable
            y.register_contact(BOB, BOB_URI)
            r = await y.message(xsip_type="application/im-iscomposing+xml",
                                sip_content__type="application/im-iscomposing+xml",
                                xsip_body="<isComposing/>")
            assert r.get("code") == "200"
            assert_clean(y)

    run(scenario)


# ==========================================================================
# the answer deadline
# ==========================================================================

DEADLINE = {"timeout": "3000", "answer_margin": "500"}


def test_slow_delivery_is_stored_and_answered_202_before_yates_timeout_and_not_resent(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, general=DEADLINE) as y:
            assert y.fy.settings["timeout"] == 3000
            y.register_contact(BOB, BOB_URI)
            release = asyncio.Event()

            async def slow(m):
                await release.wait()  # an unreachable contact: Yate answers late
                return 200

            y.xsip = slow
            t0 = time.monotonic()
            r = await y.message()
            elapsed = time.monotonic() - t0
            assert r.answered and not r.timed_out
            assert r.get("code") == "202"
            assert 1.5 < elapsed < 3.0
            assert len(await y.stored(BOB)) == 1
            release.set()  # the late delivery succeeds after all
            await y.wait_store_empty()
            await y.register("bob", "example.com", BOB_URI)
            await y.settle()
            await asyncio.sleep(0.1)
            assert len(y.xsip_seen) == 1  # the stored copy is never sent as well
            st = await y.status()
            assert st["msg_delivered"] == "1" and st["message.deadline"] == "1"
            assert_clean(y)

    run(scenario)


def test_a_delivery_yate_never_answers_holds_the_recipients_queue_only_delivery_timeout(
        tmp_path: Path) -> None:
    """Yate 6.4.1 can lose the end of an xsip.generate wait=true (the phone's 200 came before
    ysipchan attached its waiter to the transaction): the answer never comes. The message is
    answered 202 at the deadline and kept; after delivery_timeout it counts as 408 (kept for
    a retry) and the next message to that recipient goes, answered with its own outcome."""
    async def scenario() -> None:
        async with started(tmp_path, {"delivery_timeout": "1"}, general=DEADLINE) as y:
            y.register_contact(BOB, BOB_URI)
            never = y.hold_xsip(body="lost")  # Yate never answers this one
            first = asyncio.ensure_future(y.message(xsip_body="lost"))
            await y.wait_xsip(1)
            t0 = time.monotonic()
            second = await y.message(xsip_body="next")  # queued behind it (one pending)
            assert second.get("code") == "200" and time.monotonic() - t0 < 2.0
            assert (await first).get("code") == "202"  # the deadline's answer, stored
            assert y.bodies() == ["lost", "next"]
            (row_,) = db_rows(tmp_path)  # kept for a retry with back-off, not sent again
            assert row_["body"] == b"lost" and row_["next_try"] > time.time() + 10
            assert any("did not answer a delivery" in t for _, t in y.fy.debug_lines)
            never.set()
            assert_clean(y)

    run(scenario)


def test_slow_delivery_that_then_fails_leaves_the_stored_copy_for_register(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, general=DEADLINE) as y:
            y.register_contact(BOB, BOB_URI)
            release = asyncio.Event()

            async def slow(m):
                await release.wait()
                return 408

            y.xsip = slow
            r = await y.message()
            assert r.get("code") == "202" and not r.timed_out
            release.set()
            await y.fy.wait_until(lambda: y.xsip_active == 0, 3)
            await y.settle()
            (row_,) = db_rows(tmp_path)
            assert row_["attempts"] == 1 and row_["lease_owner"] == ""
            y.xsip = lambda m: 200
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(2)
            await y.wait_store_empty()
            a, b = sent(y, "xsip.generate")
            assert a.get("sip_Call-ID") == b.get("sip_Call-ID")
            assert_clean(y)

    run(scenario)


def test_slow_delivery_with_store_off_is_answered_480_before_yates_timeout(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"store": "false"}, general=DEADLINE) as y:
            y.register_contact(BOB, BOB_URI)
            release = asyncio.Event()

            async def slow(m):
                await release.wait()
                return 200

            y.xsip = slow
            r = await y.message()
            assert r.answered and not r.timed_out
            assert r.get("code") == "480"
            release.set()
            assert_clean(y)

    run(scenario)


def test_stored_delivery_keeps_the_decremented_antiloop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            assert (await y.message(antiloop="7")).get("code") == "202"
            await y.register("bob", "example.com", BOB_URI)
            (x,) = await y.wait_xsip(1)
            assert x.get("antiloop") == "6"

    run(scenario)


def test_slow_routing_at_the_deadline_keeps_the_stored_copy(tmp_path: Path) -> None:
    """The router did not answer in time: 202 was sent, so the copy must not be thrown away."""
    async def scenario() -> None:
        async with started(tmp_path, general=DEADLINE) as y:
            release = asyncio.Event()

            async def slow_route(m):
                await release.wait()
                return False

            y.route_answer = slow_route
            r = await y.message()
            assert r.get("code") == "202" and not r.timed_out
            # once the lookup timed out too, the copy stays, to be retried (not "no such user")
            await until(lambda: [r["attempts"] for r in db_rows(tmp_path)] == [1], 3)
            assert len(await y.stored(BOB)) == 1
            release.set()
            assert_clean(y)

    run(scenario)


# ==========================================================================
# restarts
# ==========================================================================


def test_kill_9_between_store_and_register_delivers_exactly_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            assert (await y.message(xsip_body="survives")).get("code") == "202"
            n = len(y.routes_seen)
            y.fy.proc.kill()  # SIGKILL: no clean-up at all
            await y.fy.wait_until(lambda: y.fy.spawn_count == 2 and y.fy.alive, 5)
            await store_ready(y.fy)
            # at start the script looks its users up again: bob is still offline
            await until(lambda: any(m.get("called") == "bob" for m in y.routes_seen[n:]), 3)
            await y.settle()
            assert y.xsip_seen == []
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(1)
            await y.wait_store_empty()
            await asyncio.sleep(0.1)
            assert y.bodies() == ["survives"]
            assert y.fy.exit_codes and y.fy.exit_codes[0] == -9
            assert_clean(y)

    run(scenario)


def test_start_with_stored_messages_retries_them_through_call_route(tmp_path: Path) -> None:
    preload(tmp_path, row(body="first"), row(body="second"),
            row(user="carol@example.com", body="for carol"))

    async def scenario() -> None:
        online = lambda y: y.register_contact(BOB, BOB_URI)  # noqa: E731 - carol stays offline
        async with started(tmp_path, before_start=online) as y:
            await y.wait_xsip(2)
            await y.settle()
            await until(lambda: len(db_rows(tmp_path)) == 1)
            assert y.bodies() == ["first", "second"]
            routed = {(m.get("called"), m.get("called_domain"), m.get("route_type"))
                      for m in y.routes_seen}
            assert routed == {("bob", "example.com", "msg"), ("carol", "example.com", "msg")}
            x = sent(y, "xsip.generate")[0]
            assert x.get("sip_Call-ID") == "cid-1@sipgen"
            assert x.get("sip_From") == '"Alice A" <sip:alice@example.com>;tag=ftag1'
            (left,) = db_rows(tmp_path)
            assert left["user"] == "carol@example.com" and left["attempts"] == 1
            assert_clean(y)

    run(scenario)


# ==========================================================================
# console and status
# ==========================================================================


def test_console_lists_stored_messages_per_user_and_purges_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            for u in ("bob", "bob", "carol"):
                assert (await y.message(called=u, sip_uri=f"sip:{u}@example.com")).get("code") == "202"
            rows = await y.stored()
            assert len(rows) == 3
            assert sum("bob@example.com" in r for r in rows) == 2
            assert all("alice@example.com" in r and "text/plain;charset=UTF-8" in r for r in rows)
            assert len(await y.stored(BOB)) == 2
            assert len(await y.stored("carol@example.com")) == 1
            assert await y.stored("nobody@example.com") == []
            assert await y.command("sipgen messages purge") == \
                "Usage: messages purge <user@domain|all>\r\n"
            assert await y.command("sipgen messages purge bob@example.com") == \
                "Purged 2 stored message(s).\r\n"
            assert await y.stored(BOB) == []
            assert (await y.status())["msg_queued"] == "1"
            assert await y.command("sipgen messages purge all") == \
                "Purged 1 stored message(s).\r\n"
            assert await y.stored() == []
            assert (await y.status())["msg_queued"] == "0"
            # a purged user's registration sends nothing
            await y.register("bob", "example.com", BOB_URI)
            await y.settle()
            assert y.xsip_seen == []
            assert_clean(y)

    run(scenario)


def test_status_counts_received_delivered_stored_expired_and_rejections_by_code(
        tmp_path: Path) -> None:
    now = time.time()
    preload(tmp_path, row(user="old@example.com", received=now - 9e5, expires=now - 1))

    async def scenario() -> None:
        async with started(tmp_path) as y:
            await until(lambda: _expired(y), 3)
            y.register_contact("carol@example.com", "sip:carol@192.0.2.40:5060")
            await y.message(called="carol", sip_uri="sip:carol@example.com")  # 200
            await y.message()  # bob offline: 202
            await y.message(xsip_type="", sip_content__type="")  # 415
            await y.message(username=None)  # 403
            await y.message(called="nobody", sip_uri="sip:nobody@example.com")  # 404
            st = await y.status()
            assert st["msg_received"] == "5"
            assert st["msg_delivered"] == "1"
            assert st["msg_stored"] == "1"
            assert st["msg_expired"] == "1"
            assert st["msg_queued"] == "1"
            assert st["msg_inprogress"] == "0"
            assert st["message.rejected415"] == "1"
            assert st["message.rejected403"] == "1"
            assert st["message.rejected404"] == "1"
            assert st["code200"] == "1" and st["code202"] == "1"
            assert_clean(y)

    run(scenario)


def test_store_switched_on_by_a_reload_opens_the_database_and_stores(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, message={"store": "false"}) as y:
            assert (await y.message()).get("code") == "480"  # bob is offline, nothing kept
            write_conf(tmp_path, message={"store": "true"})
            assert "reloaded" in await y.command("sipgen reload")
            assert (await y.message()).get("code") == "202"
            assert len(await y.stored(BOB)) == 1
            assert_clean(y)

    run(scenario)


def test_a_busy_recipient_gets_every_message_once_in_order_and_no_answer_is_late(
        tmp_path: Path) -> None:
    """RFC 3428 §8 (one MESSAGE pending per recipient) with more traffic than one recipient
    takes before the deadline: the queue never pushes an answer past Yate's timeout; what
    cannot wait is stored at once (202) and sent after the ones ahead of it, in order."""
    async def scenario() -> None:
        async with started(tmp_path, {"max_per_user": "100", "sender_rate": "1000",
                                      "sender_burst": "1000"}, general=DEADLINE) as y:
            y.register_contact(BOB, BOB_URI)
            active = []

            async def phone(m):  # one at a time, 0.15 s each: ~13 fit in the 2 s budget
                active.append(1)
                assert len(active) == 1, "two MESSAGEs pending for one recipient"
                await asyncio.sleep(0.15)
                active.pop()
                return 200

            y.xsip = phone
            for i in range(5):  # how long a delivery takes is learnt from the first ones
                assert (await y.message(xsip_body=f"w{i}")).get("code") == "200"
            y.xsip_seen.clear()
            t0 = time.monotonic()
            answers = await asyncio.gather(*(y.message(xsip_body=f"m{i}") for i in range(30)))
            took = time.monotonic() - t0
            assert all(a.answered and not a.timed_out for a in answers)
            assert took < 3.0  # every answer before Yate's 3 s timeout
            codes = [a.get("code") for a in answers]
            assert set(codes) <= {"200", "202"} and "202" in codes and "200" in codes
            await y.wait_xsip(30, timeout=10)
            await y.wait_store_empty(timeout=10)
            await asyncio.sleep(0.3)
            assert y.bodies() == [f"m{i}" for i in range(30)]  # each once, in order
            st = await y.status()
            assert int(st.get("message.spilled", "0")) > 0  # stored at once, not at the deadline
            # 0.15 s deliveries are slow: the overload guard (accept_above) takes some too
            assert int(st["message.spilled"]) + int(st.get("message.deadline", "0")) \
                + int(st.get("message.overload_accepted", "0")) == codes.count("202")
            assert_clean(y)

    run(scenario, timeout=40)


# ==========================================================================
# mode=accept: the 202 is given for a committed copy
# ==========================================================================


def test_accept_mode_answers_202_only_once_the_message_is_committed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            y.register_contact(BOB, BOB_URI)
            release = y.hold_xsip()
            r = await y.message(xsip_body="kept")
            assert r.get("code") == "202"
            (row_,) = db_rows(tmp_path)  # there when the 202 came
            assert row_["user"] == BOB and row_["body"] == b"kept"
            await y.wait_xsip(1)
            release.set()
            await y.wait_store_empty()  # delivered: the copy is gone
            st = await y.status()
            assert st["msg_delivered"] == "1" and st["message.accepted"] == "1"
            assert st["msg_stored"] == "0"  # accepted copies are not counted as stored
            assert len(y.xsip_seen) == 1
            assert_clean(y)

    run(scenario)


def test_accept_mode_kill_9_during_the_delivery_loses_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            y.register_contact(BOB, BOB_URI)
            y.hold_xsip()  # the phone never answers
            assert (await y.message(xsip_body="in flight")).get("code") == "202"
            await y.wait_xsip(1)
            y.fy.proc.kill()  # SIGKILL while the phone has not answered
            y.xsip = lambda m: 200
            await y.fy.wait_until(lambda: y.fy.spawn_count == 2 and y.fy.alive, 5)
            await store_ready(y.fy)
            await y.wait_xsip(2)  # the restart sends it again (bob is still routable)
            await y.wait_store_empty()
            assert y.bodies() == ["in flight", "in flight"]
            first, again = y.xsip_seen
            assert first.get("sip_Call-ID") == again.get("sip_Call-ID")  # the same message
            assert y.fy.exit_codes and y.fy.exit_codes[0] == -9
            assert_clean(y)

    run(scenario)


def test_accept_mode_delivers_one_recipients_messages_one_at_a_time_in_order(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            y.register_contact(BOB, BOB_URI)
            gate = y.hold_xsip(body="1")
            for i in range(1, 5):  # each answered at once, the first still being delivered
                assert (await y.message(xsip_body=str(i))).get("code") == "202"
            await y.wait_xsip(1)
            await asyncio.sleep(0.1)
            assert y.bodies() == ["1"]  # RFC 3428 §8: one pending MESSAGE per recipient
            gate.set()
            await y.wait_xsip(4)
            await y.wait_store_empty()
            assert y.bodies() == ["1", "2", "3", "4"] and y.xsip_max_active == 1
            assert (await y.status())["msg_delivered"] == "4"
            assert_clean(y)

    run(scenario)


def test_accept_mode_drains_what_one_recipient_is_sent_meanwhile_in_one_more_run(
        tmp_path: Path) -> None:
    """The messages accepted for a recipient while a drain of theirs runs join it: one more
    run after it, with one lookup (a run and a call.route per message made each of them wait
    for the lock only to find the store emptied already), in order, each once."""
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            y.register_contact(BOB, BOB_URI)
            gate = y.hold_xsip(body="1")
            for i in range(1, 11):  # 2..10 accepted while "1" is being delivered
                assert (await y.message(xsip_body=str(i))).get("code") == "202"
            await y.wait_xsip(1)
            assert len(y.routes_seen) == 1
            gate.set()
            await y.wait_xsip(10)
            await y.wait_store_empty()
            await y.settle()
            assert y.bodies() == [str(i) for i in range(1, 11)] and y.xsip_max_active == 1
            assert len(y.routes_seen) == 2  # "1"'s run, then one for the nine behind it
            assert (await y.status())["msg_delivered"] == "10"
            assert_clean(y)

    run(scenario)


def test_accept_mode_answers_after_the_delivery_when_a_store_limit_refuses_the_copy(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept", "max_per_user": "1"}) as y:
            assert (await y.message(xsip_body="offline")).get("code") == "202"  # bob offline
            assert len(db_rows(tmp_path)) == 1  # bob's store is full now
            y.register_contact(BOB, BOB_URI)
            # no copy can be kept: no 202 but the outcome, after what was stored before it
            assert (await y.message(xsip_body="now")).get("code") == "200"
            assert y.bodies() == ["offline", "now"]
            await y.wait_store_empty()
            y.xsip = lambda m: 486
            assert (await y.message(xsip_body="spare")).get("code") == "202"  # room again
            await until(lambda: y.bodies()[-1:] == ["spare"], 3)
            assert_clean(y)

    run(scenario)


def test_accept_mode_drops_the_copy_of_a_message_for_nobody(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            r = await y.message(called="nobody", sip_uri="sip:nobody@example.com")
            assert r.get("code") == "202"  # answered before the lookup
            await until(lambda: not db_rows(tmp_path), 3)
            assert y.xsip_seen == []
            st = await y.status()
            assert st["message.accepted_dropped"] == "1" and st["msg_queued"] == "0"
            assert_clean(y)

    run(scenario)


def test_accept_mode_answers_a_typing_notice_202_at_once_without_storing_it(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            y.register_contact(BOB, BOB_URI)
            release = y.hold_xsip()
            r = await y.message(xsip_type="application/im-iscomposing+xml",
                                sip_content__type="application/im-iscomposing+xml",
                                xsip_body="<isComposing/>")
            assert r.get("code") == "202"
            assert db_rows(tmp_path) == []  # never stored, in any mode
            await y.wait_xsip(1)
            release.set()
            await until(lambda: _status_is(y, "msg_delivered", "1"), 3)
            assert_clean(y)

    run(scenario)


async def _status_is(y: Yate, key: str, n: str) -> bool:
    """Does ``status sipgen`` show ``key`` = ``n`` (a predicate for :func:`until`)?"""
    return (await y.status())[key] == n


# ==========================================================================
# relay mode under overload: past accept_above waiting deliveries, accept
# ==========================================================================


def test_relay_past_accept_above_answers_202_once_committed_and_keeps_the_order(
        tmp_path: Path) -> None:
    """With ``accept_above`` MESSAGEs already waiting for their delivery, a new one is
    answered as in accept mode (its copy committed first) and delivered from the store after
    the ones ahead of it; once the waiting ones are through, messages are relayed again."""
    async def scenario() -> None:
        async with started(tmp_path, {"accept_above": "2", "slow_delivery": "0"}) as y:
            y.register_contact(BOB, BOB_URI)
            gate = y.hold_xsip(body="1")
            waiting = [asyncio.ensure_future(y.message(xsip_body=b)) for b in ("1", "2")]
            await until(lambda: _status_is(y, "msg_inprogress", "2"))  # "1" at the phone, "2" behind it
            assert (await y.message(xsip_body="3")).get("code") == "202"
            (row_,) = db_rows(tmp_path)  # there when the 202 came
            assert row_["body"] == b"3"
            assert (await y.message(xsip_body="4")).get("code") == "202"
            assert not any(w.done() for w in waiting) and y.bodies() == ["1"]
            gate.set()
            assert [(await w).get("code") for w in waiting] == ["200", "200"]
            await y.wait_xsip(4)
            await y.wait_store_empty()
            assert (await y.message(xsip_body="5")).get("code") == "200"  # relayed again
            assert y.bodies() == ["1", "2", "3", "4", "5"] and y.xsip_max_active == 1
            st = await y.status()
            assert st["message.overload_accepted"] == "2" and st["msg_delivered"] == "5"
            assert "message.accepted" not in st and st["msg_stored"] == "0"
            assert_clean(y)

    run(scenario)


def test_relay_past_accept_above_still_waits_for_a_message_that_is_never_stored(
        tmp_path: Path) -> None:
    """A typing notice cannot be kept, so overload gives it no 202: its answer is the
    outcome, as without overload."""
    async def scenario() -> None:
        async with started(tmp_path, {"accept_above": "1", "slow_delivery": "0"}) as y:
            y.register_contact(BOB, BOB_URI)
            release = y.hold_xsip()
            first = asyncio.ensure_future(y.message(xsip_body="1"))
            await until(lambda: _status_is(y, "msg_inprogress", "1"))
            typing = asyncio.ensure_future(y.message(
                xsip_type="application/im-iscomposing+xml",
                sip_content__type="application/im-iscomposing+xml", xsip_body="<isComposing/>"))
            await asyncio.sleep(0.3)
            assert not typing.done() and db_rows(tmp_path) == []
            release.set()
            assert (await first).get("code") == "200"
            assert (await typing).get("code") == "200"
            assert y.bodies() == ["1", "<isComposing/>"]
            assert "message.overload_accepted" not in await y.status()
            assert_clean(y)

    run(scenario)


def test_relay_past_accept_above_accepts_only_while_deliveries_are_slow(
        tmp_path: Path) -> None:
    """Past the cap, a MESSAGE is still relayed (answered with its outcome) while deliveries
    are fast: a burst, or one busy recipient's queue, keeps its 200s. Once deliveries have been
    slower than slow_delivery, the next one past the cap is accepted (202), and delivered after
    the ones ahead of it."""
    async def scenario() -> None:
        async with started(tmp_path, {"accept_above": "2", "slow_delivery": "100"}) as y:
            y.register_contact(BOB, BOB_URI)
            release = y.hold_xsip()
            waiting = [asyncio.ensure_future(y.message(xsip_body=b)) for b in ("1", "2")]
            await until(lambda: _status_is(y, "msg_inprogress", "2"))
            third = asyncio.ensure_future(y.message(xsip_body="3"))  # past the cap, but fast
            await until(lambda: _status_is(y, "msg_inprogress", "3"))
            await asyncio.sleep(0.2)
            assert not third.done() and db_rows(tmp_path) == []
            release.set()
            assert [(await w).get("code") for w in (*waiting, third)] == ["200"] * 3

            async def slow_phone(m):
                await asyncio.sleep(0.25)
                return 200

            y.xsip = slow_phone
            for b in ("4", "5", "6", "7"):  # one at a time: never past the cap
                assert (await y.message(xsip_body=b)).get("code") == "200"
            release = y.hold_xsip()
            waiting = [asyncio.ensure_future(y.message(xsip_body=b)) for b in ("8", "9")]
            await until(lambda: _status_is(y, "msg_inprogress", "2"))
            assert (await y.message(xsip_body="10")).get("code") == "202"  # slow: accepted
            assert [r["body"] for r in db_rows(tmp_path)] == [b"10"]
            release.set()
            assert [(await w).get("code") for w in waiting] == ["200"] * 2
            await y.wait_store_empty()
            assert y.bodies() == [str(i) for i in range(1, 11)]
            assert (await y.status())["message.overload_accepted"] == "1"
            assert_clean(y)

    run(scenario)


def test_relay_with_accept_above_0_never_answers_before_the_outcome(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"accept_above": "0"}) as y:
            y.register_contact(BOB, BOB_URI)
            release = y.hold_xsip()
            answers = [asyncio.ensure_future(y.message(xsip_body=str(i))) for i in range(5)]
            await until(lambda: _status_is(y, "msg_inprogress", "5"))
            await asyncio.sleep(0.2)
            assert not any(a.done() for a in answers) and db_rows(tmp_path) == []
            release.set()
            assert [(await a).get("code") for a in answers] == ["200"] * 5
            assert y.bodies() == [str(i) for i in range(5)]
            assert_clean(y)

    run(scenario)


def test_accept_mode_right_after_a_start_waits_for_the_store_before_its_202(
        tmp_path: Path) -> None:
    SQLiteMessageStore(db_path(tmp_path)).close()  # the database of an earlier run
    lock = sqlite3.connect(db_path(tmp_path), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds it: the opening waits

    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}, wait_store=False) as y:
            y.register_contact(BOB, BOB_URI)
            answer = asyncio.ensure_future(y.message(xsip_body="early"))
            await asyncio.sleep(0.3)
            assert not answer.done()  # no 202 while nothing can be kept
            lock.execute("ROLLBACK")
            assert (await answer).get("code") == "202"
            await y.wait_xsip(1)
            await y.wait_store_empty()
            assert y.bodies() == ["early"]
            assert_clean(y)

    try:
        run(scenario)
    finally:
        lock.close()
