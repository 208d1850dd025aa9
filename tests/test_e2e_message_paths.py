"""SIP MESSAGE end to end: the other paths (issue 3, Deliver 2 in-call and 7).

* in-call MESSAGE (Yate adds the call's ``id`` and ``peerid``): to the other party, not routed;
* ``msg_execute=true``: Yate routes MESSAGE itself (``ysipchan [message] enable=yes``) and our
  ``msg.execute`` handler, ahead of ysipchan's, delivers ``sip/`` targets; ``route_offline``
  answers ``call.route`` for users regfile left offline with ``sipgen/store/<user@domain>``
  (reference §2.4 and §6 "Native MESSAGE path", simulated here step by step);
* ``mode=lateroute``: the regexroute recipe's behaviour.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

try:
    from msg_e2e_harness import assert_clean, sent, BASE, Yate, params_of, run, started
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.msg_e2e_harness import assert_clean, sent, BASE, Yate, params_of, run, started  # type: ignore

BOB = "bob@example.com"
BOB_URI = "sip:bob@192.0.2.20:5062"

#: What ysipchan adds to sip.message for a MESSAGE inside a Yate call (reference §2.2).
IN_CALL = dict(id="sip/5", peerid="sip/6", status="answered", targetid="sip/6",
               callid="sip/abc@x/f1/t1", answered="true", direction="incoming",
               sip_to="<sip:bob@example.com>;tag=t1", xsip_dlgtag="t1")




# ==========================================================================
# in-call MESSAGE
# ==========================================================================


def test_in_call_message_goes_to_the_peer_sip_leg_with_xsip_generate_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(**IN_CALL, antiloop="10")
            assert r.get("code") == "200"
            assert sent(y, "call.route") == []  # no routing lookup
            (x,) = sent(y, "xsip.generate")
            p = x.as_dict()
            assert p["id"] == "sip/6" and p["method"] == "MESSAGE" and p["wait"] == "true"
            assert "uri" not in p  # the dialog's remote URI
            assert p["xsip_type"] == "text/plain;charset=UTF-8"
            assert p["xsip_body"] == "hello bob\r\n"
            assert p["antiloop"] == "9"
            assert not [k for k in p if k.startswith("sip_")]
            assert_clean(y)

    run(scenario)


def test_in_call_message_answer_follows_the_peers_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.xsip = lambda m: 486
            assert (await y.message(**IN_CALL)).get("code") == "486"
            y.xsip = lambda m: {"error": "noconn"}  # the call went away meanwhile
            assert (await y.message(**IN_CALL)).get("code") == "480"
            assert_clean(y)

    run(scenario)


def test_in_call_message_answer_never_relays_a_code_whose_headers_are_lost(
        tmp_path: Path) -> None:
    """A 401/407 without its challenge or a 3xx without its Contact is no truthful answer."""
    async def scenario() -> None:
        async with started(tmp_path) as y:
            answers = []
            for code in (401, 407, 302):
                y.xsip = lambda m, c=code: c
                answers.append((await y.message(**IN_CALL)).get("code"))
            assert answers == ["500", "500", "480"]
            assert_clean(y)

    run(scenario)


def test_in_call_message_is_validated_like_any_other(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"max_body": "60000"}) as y:
            r = await y.message(**IN_CALL, xsip_type="application/pdf",
                                sip_content__type="application/pdf")
            assert r.get("code") == "415" and r.get("osip_Accept")
            # fits max_body, but not escaped in Yate's 64 KiB line: 413, not a failure
            r = await y.message(**IN_CALL, xsip_body=":" * 40000)
            assert r.get("code") == "413"
            assert sent(y, "xsip.generate") == []
            st = await y.status()
            assert st["errors"] == "0"
            assert_clean(y)

    run(scenario)


def test_in_call_message_to_a_non_sip_peer_goes_as_chan_text(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            got = []

            def text(m):
                got.append(m.as_dict())
                return True

            y.fy.on("chan.text", text, 100)
            r = await y.message(**dict(IN_CALL, peerid="wave/3"))
            assert r.get("code") == "200"
            assert got and got[0]["targetid"] == "wave/3"
            assert got[0]["text"] == "hello bob\r\n"
            assert sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_in_call_message_without_content_type_gets_415(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(**IN_CALL, xsip_type="", sip_content__type="")
            assert r.get("code") == "415"
            assert r.get("osip_Accept")
            assert sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_to_tag_that_matches_no_call_gets_481(tmp_path: Path) -> None:
    """RFC 3261 §12.2.2: Yate adds ``id`` only for a live call's dialog (reference §2.2)."""
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(sip_to="<sip:bob@example.com>;tag=stale", xsip_dlgtag="stale")
            assert r.get("code") == "481"
            assert sent(y, "call.route") == [] and sent(y, "xsip.generate") == []
            assert (await y.status())["message.rejected481"] == "1"
            assert_clean(y)

    run(scenario)


# ==========================================================================
# msg_execute=true: Yate routes MESSAGE itself
# ==========================================================================

MSG_EXECUTE = {"msg_execute": "true", "route_offline": "true"}


async def ysipchan_native(y: Yate, **over) -> tuple:
    """What ysipchan does with ``[message] enable=yes`` (reference §2.4, §6): ``call.route``
    with every param of the request, then, when routed, the same message renamed
    ``msg.execute`` with ``callto`` (``error``/``reason``/retval cleared)."""
    params = params_of(BASE, **over) + [("module", "sip"), ("route_type", "msg")]
    route = await y.fy.dispatch("call.route", params)
    if not (route.handled and route.retval not in ("", "-", "error")):
        return route, None  # Yate answers 405 (or the error's code) itself
    ex = [(k, v) for k, v in route.params if k not in ("error", "reason")]
    ex.append(("callto", route.retval))
    return route, await y.fy.dispatch("msg.execute", ex)


def ysipchan_msg_execute(y: Yate) -> list:
    """ysipchan's own msg.execute handler (priority 100) for sip/ targets: sends the MESSAGE."""
    calls = []

    def handler(m):
        if m.get("callto", "").startswith("sip/"):
            calls.append(m.copy())
            return True
        return False

    y.fy.on("msg.execute", handler, 100, track="sip")
    return calls


def test_msg_execute_handler_is_installed_ahead_of_ysipchan(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, MSG_EXECUTE) as y:
            await y.fy.wait_installed("msg.execute")
            assert y.fy.installs["msg.execute"][0] == 90
            assert y.fy.installs["call.route"] == (150, "route_type", "msg")
            assert_clean(y)

    run(scenario)


def test_msg_execute_sip_target_is_delivered_by_us_with_a_truthful_code(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, MSG_EXECUTE) as y:
            y.register_contact(BOB, BOB_URI, oconnection_id="tcp:9-x")
            ours_only = ysipchan_msg_execute(y)
            route, ex = await ysipchan_native(y)
            assert route.retval == "sip/" + BOB_URI
            assert ex.handled and ex.get("code") == "200"
            assert ours_only == []  # ysipchan never sent it as well
            (x,) = sent(y, "xsip.generate")
            p = x.as_dict()
            assert p["uri"] == BOB_URI and p["connection_id"] == "tcp:9-x"
            assert p["sip_From"].startswith('"Alice A" <sip:alice@example.com>;tag=')
            assert p["antiloop"] == "18"
            # none of the leftovers ysipchan would have sent (uri:, callid:, the sender's From)
            assert set(p) <= {"method", "uri", "wait", "antiloop", "sip_From", "sip_To",
                              "sip_Call-ID", "sip_CSeq", "sip_Date", "xsip_type", "xsip_body",
                              "connection_id"}
            # a failing contact: stored, 202
            y.xsip = lambda m: 408
            route, ex = await ysipchan_native(y)
            assert ex.get("code") == "202"
            assert len(await y.stored(BOB)) == 1
            assert ours_only == []
            assert_clean(y)

    run(scenario)


def test_msg_execute_failure_that_cannot_be_stored_is_relayed_mapped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"msg_execute": "true", "store": "false"}) as y:
            y.register_contact(BOB, BOB_URI)
            ysipchan_msg_execute(y)
            for result, want in (({"code": "486"}, "486"), ({"code": "407"}, "500"),
                                 ({"error": "offline"}, "480")):
                y.xsip = lambda m, r=result: dict(r)
                _, ex = await ysipchan_native(y)
                assert ex.handled and ex.get("code") == want
            assert_clean(y)

    run(scenario)


def test_msg_execute_for_other_targets_is_left_to_other_modules(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, MSG_EXECUTE) as y:
            r = await y.fy.dispatch("msg.execute", params_of(BASE) + [("callto", "jabber/bob@j")])
            assert r.answered and not r.handled
            assert sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_route_offline_routes_a_user_regfile_left_offline_to_our_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, MSG_EXECUTE) as y:
            calls = ysipchan_msg_execute(y)
            route, ex = await ysipchan_native(y)  # bob is known to regfile but offline
            assert route.handled
            assert route.retval == "sipgen/store/bob@example.com"
            assert route.get("error") is None
            assert ex.handled and ex.get("code") == "202"
            assert calls == [] and sent(y, "xsip.generate") == []
            (row,) = await y.stored(BOB)
            # the user regfile did not know is not taken: Yate answers it itself
            route, ex = await ysipchan_native(y, called="nobody", sip_uri="sip:nobody@example.com")
            assert not route.handled and ex is None
            # delivered on register like any stored message
            await y.register("bob", "example.com", BOB_URI)
            await y.wait_xsip(1)
            await y.wait_store_empty()
            assert y.bodies() == ["hello bob\r\n"]
            assert_clean(y)

    run(scenario)


def test_msg_execute_to_sipgen_store_target_stores_and_answers_202(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"msg_execute": "true"}) as y:
            ex = await y.fy.dispatch("msg.execute", params_of(BASE) + [
                ("callto", "sipgen/store/bob@example.com")])
            assert ex.handled and ex.get("code") == "202"
            assert len(await y.stored(BOB)) == 1
            assert_clean(y)

    run(scenario)


def test_msg_execute_slow_delivery_is_answered_before_the_deadline_and_not_sent_twice(
        tmp_path: Path) -> None:
    """Unanswered, the msg.execute would go on to ysipchan (priority 100), a second send."""
    async def scenario() -> None:
        async with started(tmp_path, {"msg_execute": "true"},
                           general={"timeout": "3000", "answer_margin": "500"}) as y:
            y.register_contact(BOB, BOB_URI)
            calls = ysipchan_msg_execute(y)
            release = asyncio.Event()

            async def slow(m):
                await release.wait()
                return 200

            y.xsip = slow
            t0 = time.monotonic()
            _, ex = await ysipchan_native(y)
            assert time.monotonic() - t0 < 3.0
            assert ex.handled and ex.get("code") == "202"
            assert calls == []  # ysipchan did not send it a second time
            release.set()
            await y.wait_store_empty()  # the late 200 settles the stored copy
            await y.register("bob", "example.com", BOB_URI)
            await y.settle()
            assert len(y.xsip_seen) == 1
            assert_clean(y)

    run(scenario)


# ==========================================================================
# mode=lateroute: the regexroute recipe's behaviour
# ==========================================================================


def test_lateroute_mode_answers_200_at_once_and_enqueues_msg_execute_to_lateroute(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "lateroute"}) as y:
            r = await y.message(xsip_body_encoding=None)
            assert r.get("code") == "200"
            m = await y.fy.wait_sent("msg.execute")
            assert m.id == ""  # enqueued: nobody waits for it
            p = m.as_dict()
            assert p["callto"] == "lateroute/bob"
            assert p["caller"] == "alice" and p["called"] == "bob"
            assert p["sip_From"] == "<sip:alice@example.com>"
            assert p["xsip_type"] == "text/plain" and p["xsip_body"] == "hello bob\r\n"
            assert p["username"] == "alice"
            assert sent(y, "call.route") == [] and sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_lateroute_mode_answers_415_without_content_type(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "lateroute"}) as y:
            r = await y.message(xsip_type="", sip_content__type="")
            assert r.get("code") == "415"
            await y.settle()
            assert sent(y, "msg.execute") == []
            assert_clean(y)

    run(scenario)


def test_msg_execute_path_applies_the_senders_rate_limit(tmp_path: Path) -> None:
    """Set-up (B) is rate-limited like (A): 503 with Retry-After past the burst."""
    async def scenario() -> None:
        conf = dict(MSG_EXECUTE, sender_rate="0.5", sender_burst="2")
        async with started(tmp_path, conf) as y:
            y.register_contact(BOB, BOB_URI)
            ysipchan_msg_execute(y)
            codes = []
            for _ in range(3):
                _, ex = await ysipchan_native(y)
                codes.append((ex.get("code"), ex.get("osip_Retry-After")))
            assert codes == [("200", None), ("200", None), ("503", "2")]
            # offline users (our store target) are limited too
            ex = await y.fy.dispatch("msg.execute", params_of(BASE) + [
                ("callto", "sipgen/store/bob@example.com")])
            assert ex.get("code") == "503" and await y.stored() == []
            assert len(sent(y, "xsip.generate")) == 2
            assert_clean(y)

    run(scenario)


def test_msg_execute_path_in_accept_mode_answers_202_at_once_then_delivers(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, dict(MSG_EXECUTE, mode="accept")) as y:
            y.register_contact(BOB, BOB_URI)
            ysipchan_msg_execute(y)
            release = asyncio.Event()

            async def slow(m):
                await release.wait()
                return 200

            y.xsip = slow
            t0 = time.monotonic()
            _, ex = await ysipchan_native(y)
            assert ex.handled and ex.get("code") == "202"
            assert time.monotonic() - t0 < 1.0  # not after the delivery
            release.set()
            await y.wait_xsip(1)
            await y.settle()
            assert (await y.status()).get("message.delivered") == "1"
            assert_clean(y)

    run(scenario)
