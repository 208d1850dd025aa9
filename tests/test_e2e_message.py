"""SIP MESSAGE end to end (issue 3): who may send, validation, routing, delivery, answers.

The real ``scripts/yate-sipgen`` runs behind the fake Yate (see ``msg_e2e_harness``): each test
dispatches ``sip.message`` as ysipchan does and checks the SIP answer Yate would send (``code``,
``osip_*``), the ``call.route`` / ``xsip.generate`` / ``msg.execute`` the script dispatched, and
that Yate saw no protocol failure. Store and forward is in ``test_e2e_message_store.py``; the
``msg.execute``, ``lateroute`` and in-call paths in ``test_e2e_message_paths.py``.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path

import pytest

try:
    from msg_e2e_harness import assert_clean, sent, DEFAULT_TYPES, XSIP_KEYS, Yate, run, started
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.msg_e2e_harness import assert_clean, sent, DEFAULT_TYPES, XSIP_KEYS, Yate, run, started  # type: ignore

BOB = "bob@example.com"
BOB_URI = "sip:bob@192.0.2.20:5062"




# ==========================================================================
# 1. Who may send, to whom
# ==========================================================================


def test_auth_required_rejects_a_message_without_username_with_403(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(username=None)
            assert r.answered and r.handled
            assert r.get("code") == "403"
            assert sent(y, "call.route") == [] and sent(y, "xsip.generate") == []
            st = await y.status()
            assert st["message.rejected403"] == "1"
            assert_clean(y)

    run(scenario)


def test_auth_optional_accepts_an_unauthenticated_sender_under_its_from_user(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"auth": "optional"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(username=None, realm=None, newcall=None)
            assert r.get("code") == "200"
            (route,) = sent(y, "call.route")
            assert route.get("caller") == "alice" and "username" not in route
            (x,) = sent(y, "xsip.generate")
            assert x.get("sip_From").startswith('"Alice A" <sip:alice@example.com>;tag=')
            assert_clean(y)

    run(scenario)


def test_trusted_line_sms_gateway_may_send_with_a_from_user_that_is_not_its_username(
        tmp_path: Path) -> None:
    """Yate sets ``username`` to the line user and adds ``in_line`` (reference §2.2 step 1)."""
    gateway = dict(username="smsgw", in_line="smsgw", caller="+4915112345",
                   callername=None, sip_from="<sip:+4915112345@sms.example.net>;tag=gw1")

    async def scenario() -> None:
        async with started(tmp_path, {"trusted_lines": "smsgw"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(**gateway)
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            assert x.get("sip_From").startswith("<sip:+4915112345@sms.example.net>;tag=")
            (route,) = sent(y, "call.route")
            assert route.get("in_line") == "smsgw" and route.get("caller") == "+4915112345"
            # the same request from a line that is not trusted: From user != username
            r = await y.message(**dict(gateway, in_line="otherline"))
            assert r.get("code") == "403"
            assert len(sent(y, "xsip.generate")) == 1
            assert_clean(y)

    run(scenario)


def test_from_user_differing_from_the_authenticated_username_gets_403(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(caller="mallory",
                                sip_from="<sip:mallory@example.com>;tag=1")
            assert r.get("code") == "403"
            assert sent(y, "call.route") == []
            assert_clean(y)

    run(scenario)


def test_allow_from_mismatch_accepts_and_sends_as_the_authenticated_user(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"allow_from_mismatch": "true"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(caller="boss", sip_from='"The Boss" <sip:boss@example.com>;tag=1')
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            # the delivery names the identity Yate authenticated, never a claimed one
            assert x.get("sip_From").startswith('"The Boss" <sip:alice@example.com>;tag=')
            assert sent(y, "call.route")[0].get("caller") == "alice"
            assert_clean(y)

    run(scenario)


def test_request_uri_host_outside_served_domains_gets_403_no_open_relay(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(sip_uri="sip:bob@elsewhere.org", sip_to="<sip:bob@elsewhere.org>")
            assert r.get("code") == "403"
            assert sent(y, "call.route") == [] and sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_relay_foreign_sends_authenticated_messages_straight_to_the_request_uri(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"relay_foreign": "true", "auth": "optional"}) as y:
            r = await y.message(sip_uri="sip:bob@elsewhere.org", sip_to="<sip:bob@elsewhere.org>")
            assert r.get("code") == "200"
            assert sent(y, "call.route") == []  # not a user of ours: no lookup
            (x,) = sent(y, "xsip.generate")
            assert x.get("uri") == "sip:bob@elsewhere.org"
            assert x.get("sip_To") == "<sip:bob@elsewhere.org>"
            # an unauthenticated sender is never relayed outward
            r = await y.message(username=None, sip_uri="sip:bob@elsewhere.org")
            assert r.get("code") == "403"
            assert len(sent(y, "xsip.generate")) == 1
            assert_clean(y)

    run(scenario)


def test_recipient_domain_is_the_request_uri_host_not_yates_domain_param(tmp_path: Path) -> None:
    """``domain`` is the sender's From host (reference §2.2); ``sip_uri`` names the recipient."""
    async def scenario() -> None:
        async with started(tmp_path, {"domains": "a.example,b.example"}) as y:
            y.known |= {"alice@a.example", "alice@b.example"}
            r = await y.message(caller="carol", username="carol", domain="b.example",
                                sip_from="<sip:carol@b.example>;tag=1",
                                sip_uri="sip:alice@a.example", called="alice")
            assert r.get("code") == "202"
            (route,) = sent(y, "call.route")
            assert route.get("called_domain") == "a.example"
            assert route.get("domain") == "b.example"
            assert_clean(y)

    run(scenario)


def test_without_domain_aliases_alice_at_a_and_alice_at_b_never_share(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"domains": "a.example,b.example",
                                      "domain_aliases": "false"}) as y:
            y.known |= {"alice@a.example", "alice@b.example"}
            common = dict(caller="carol", username="carol", domain="a.example", called="alice",
                          sip_from="<sip:carol@a.example>;tag=1")
            r1 = await y.message(**common, sip_uri="sip:alice@a.example", xsip_body="for a")
            r2 = await y.message(**common, sip_uri="sip:alice@b.example", xsip_body="for b")
            assert (r1.get("code"), r2.get("code")) == ("202", "202")
            assert len(await y.stored("alice@a.example")) == 1
            assert len(await y.stored("alice@b.example")) == 1
            await y.register("alice", "a.example", "sip:alice@192.0.2.30:5060")
            await y.wait_xsip(1)
            await y.settle()
            assert y.bodies() == ["for a"]
            assert y.xsip_seen[0].get("sip_To") == "<sip:alice@a.example>"
            assert await y.stored("alice@a.example") == []
            (left,) = await y.stored()
            assert "alice@b.example" in left
            assert_clean(y)

    run(scenario)


def test_domain_aliases_one_user_whichever_served_host_registers_or_is_messaged(
        tmp_path: Path) -> None:
    """A phone registering at our IP gets what was sent to our name (and the reverse)."""
    async def scenario() -> None:
        async with started(tmp_path, {"domains": "example.com,10.0.0.5"}) as y:
            y.known |= {"bob@10.0.0.5"}
            r1 = await y.message(xsip_body="to the name")
            r2 = await y.message(sip_uri="sip:bob@10.0.0.5", xsip_body="to the address")
            assert (r1.get("code"), r2.get("code")) == ("202", "202")
            assert len(await y.stored("bob@example.com")) == 2  # the main (first) domain
            await y.register("bob", "10.0.0.5", "sip:bob@192.0.2.30:5060")
            await y.wait_xsip(2)
            await y.settle()
            assert y.bodies() == ["to the name", "to the address"]  # in order
            # each keeps the To the sender wrote
            assert [m.get("sip_To") for m in y.xsip_seen] == ["<sip:bob@example.com>",
                                                               "<sip:bob@10.0.0.5>"]
            assert await y.stored() == []
            assert_clean(y)

    run(scenario)


# ==========================================================================
# 2. Validation
# ==========================================================================


@pytest.mark.parametrize("ctype", [
    {"xsip_type": None, "sip_content__type": None},
    {"xsip_type": "", "sip_content__type": ""},
], ids=["missing", "empty"])
def test_missing_or_empty_content_type_gets_415_with_accept(tmp_path: Path, ctype: dict) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(**ctype)
            assert r.get("code") == "415"
            assert r.get("osip_Accept") == DEFAULT_TYPES
            assert sent(y, "call.route") == []
            assert_clean(y)

    run(scenario)


def test_content_type_outside_the_allowed_list_gets_415_with_accept(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(xsip_type="application/pdf", sip_content__type="application/pdf")
            assert r.get("code") == "415"
            assert r.get("osip_Accept") == DEFAULT_TYPES
            st = await y.status()
            assert st["message.rejected415"] == "1"
            assert_clean(y)

    run(scenario)


def test_configured_content_types_are_the_ones_accepted_and_listed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"content_types": "text/plain,application/vnd.x-sms"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(xsip_type="text/html", sip_content__type="text/html")
            assert r.get("code") == "415"
            assert r.get("osip_Accept") == "text/plain, application/vnd.x-sms"
            r = await y.message(xsip_type="application/vnd.x-sms",
                                sip_content__type="application/vnd.x-sms")
            assert r.get("code") == "200"
            assert_clean(y)

    run(scenario)


def test_content_type_is_matched_case_insensitively_with_parameters_ignored(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(xsip_type="TEXT/Plain", sip_content__type="TEXT/Plain ; Charset=ISO-8859-1")
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            # the full Content-Type goes onward unchanged, charset included
            assert x.get("xsip_type") == "TEXT/Plain ; Charset=ISO-8859-1"
            assert_clean(y)

    run(scenario)


def test_body_over_max_body_gets_413(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"max_body": "10"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(xsip_body="0123456789")
            assert r.get("code") == "200"  # exactly the limit
            r = await y.message(xsip_body="0123456789A")
            assert r.get("code") == "413"
            r = await y.message(xsip_body="ééééé\u00e9")  # 6 characters, 12 bytes
            assert r.get("code") == "413"
            assert len(sent(y, "xsip.generate")) == 1
            assert_clean(y)

    run(scenario)


def test_body_whose_escaped_onward_line_would_not_fit_yates_buffer_gets_413(
        tmp_path: Path) -> None:
    """Every ':' doubles on the wire (%z): 40000 of them fit max_body but not a 64 KiB line."""
    async def scenario() -> None:
        async with started(tmp_path, {"max_body": "60000"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(xsip_body=":" * 40000)
            assert r.get("code") == "413"
            r = await y.message(xsip_body="a" * 40000)
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            assert len(x.get("xsip_body")) == 40000
            assert_clean(y)

    run(scenario, timeout=30)


def test_request_uri_without_a_user_gets_404_and_an_unparsable_from_400(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(sip_uri="sip:example.com", called=None)
            assert r.get("code") == "404"
            r = await y.message(sip_from="not a from header")
            assert r.get("code") == "400"
            assert sent(y, "call.route") == []
            assert_clean(y)

    run(scenario)


def test_content_type_that_would_inject_a_header_gets_400(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(sip_content__type="text/plain\r\nX-Evil: 1")
            assert r.get("code") == "400"
            assert sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


@pytest.mark.parametrize("antiloop", ["0", "-1", "1"])
def test_antiloop_exhausted_gets_483(tmp_path: Path, antiloop: str) -> None:
    """antiloop <= 0 is a loop; 1 leaves no hop to forward with (Yate refuses antiloop 0)."""
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(antiloop=antiloop)
            assert r.get("code") == "483"
            assert sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_outgoing_antiloop_is_the_inbound_one_decremented(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            for inbound in ("19", "5", "2"):
                r = await y.message(antiloop=inbound)
                assert r.get("code") == "200"
            assert [x.get("antiloop") for x in sent(y, "xsip.generate")] == ["18", "4", "1"]
            assert_clean(y)

    run(scenario)


def test_binary_body_encoding_and_multipart_parts_are_carried_unchanged(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"content_types": "application/vnd.x-bin,text/plain"}) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(xsip_type="application/vnd.x-bin",
                                sip_content__type="application/vnd.x-bin;v=2",
                                xsip_body="AAECA/7/", xsip_body_encoding="base64",
                                **{"xsip_type.1": "text/plain", "xsip_body.1": "part two"})
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            assert x.get("xsip_type") == "application/vnd.x-bin;v=2"
            assert x.get("xsip_body") == "AAECA/7/"
            assert x.get("xsip_body_encoding") == "base64"
            assert x.get("xsip_type.1") == "text/plain"
            assert x.get("xsip_body.1") == "part two"
            assert_clean(y)

    run(scenario)


# ==========================================================================
# 3. Routing
# ==========================================================================


def test_call_route_carries_route_type_msg_caller_called_domain_username_and_no_headers(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            await y.message(billid="1700000000-7")
            (route,) = sent(y, "call.route")
            p = route.as_dict()
            assert p["route_type"] == "msg"
            assert p["caller"] == "alice" and p["called"] == "bob"
            assert p["called_domain"] == "example.com" and p["domain"] == "example.com"
            assert p["username"] == "alice" and p["callername"] == "Alice A"
            assert p["billid"] == "1700000000-7" and p["ip_host"] == "192.0.2.7"
            assert p["sip_uri"] == "sip:bob@example.com"
            # none of the inbound headers (they would become junk headers on a renamed message)
            leaked = [k for k in p if k.startswith(("sip_", "xsip_body", "osip")) and k != "sip_uri"]
            assert leaked == []
            assert_clean(y)

    run(scenario)


def test_sip_target_is_the_request_uri_and_oconnection_id_becomes_connection_id(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, "sip:bob@192.0.2.20:5062;transport=tcp",
                               oconnection_id="tcp:7-192.0.2.20:5062")
            r = await y.message()
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            assert x.get("uri") == "sip:bob@192.0.2.20:5062;transport=tcp"
            assert x.get("connection_id") == "tcp:7-192.0.2.20:5062"
            # what regfile copied from the caller's own section stays out of the delivery
            assert "password" not in x and "driver" not in x and "oconnection_id" not in x
            assert_clean(y)

    run(scenario)


def test_fork_targets_go_out_in_parallel_and_the_first_2xx_wins(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            both = asyncio.Event()

            def fork(m):
                m.retval = "fork"
                m.set("callto.1", "sip/sip:bob@192.0.2.21:5060")
                m.set("callto.2", "|")
                m.set("callto.3", "sip/sip:bob@192.0.2.22:5060")
                return True

            async def gen(m):
                if len(y.xsip_seen) == 2:
                    both.set()
                await asyncio.wait_for(both.wait(), 5)  # both are pending at once
                if "192.0.2.21" in m.get("uri"):
                    await asyncio.sleep(0.3)  # the first target is slow and would fail
                    return 486
                return 200

            y.route_answer = fork
            y.xsip = gen
            r = await y.message()
            assert r.get("code") == "200"
            xs = sent(y, "xsip.generate")
            assert sorted(x.get("uri") for x in xs) == ["sip:bob@192.0.2.21:5060",
                                                        "sip:bob@192.0.2.22:5060"]
            # one message: the same Call-ID, From (tag) and CSeq on every branch
            assert len({(x.get("sip_Call-ID"), x.get("sip_From"), x.get("sip_CSeq")) for x in xs}) == 1
            assert_clean(y)

    run(scenario)


@pytest.mark.parametrize("codes,expected", [
    ((486, 603), "603"),  # any 6xx wins
    ((500, 404), "404"),  # else the lowest class
    ((503, 502), "500"),  # a 503 never goes back as such
], ids=["6xx", "lowest-class", "503-to-500"])
def test_fork_with_every_branch_failing_answers_the_rfc3261_16_7_choice(
        tmp_path: Path, codes: tuple, expected: str) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"store": "false"}) as y:
            def fork(m):
                m.retval = "fork"
                m.set("callto.1", "sip/sip:bob@192.0.2.21:5060")
                m.set("callto.2", "sip/sip:bob@192.0.2.22:5060")
                return True

            def gen(m):
                return codes[0] if "192.0.2.21" in m.get("uri") else codes[1]

            y.route_answer = fork
            y.xsip = gen
            r = await y.message()
            assert r.get("code") == expected
            assert len(sent(y, "xsip.generate")) == 2
            assert_clean(y)

    run(scenario)


def test_regfile_unknown_user_unhandled_without_error_gets_404_and_is_not_stored(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.message(sip_uri="sip:nobody@example.com", called="nobody")
            assert r.get("code") == "404"
            assert sent(y, "xsip.generate") == []
            assert await y.stored() == []
            assert_clean(y)

    run(scenario)


@pytest.mark.parametrize("handled,retval", [(False, ""), (True, "-"), (False, "-")])
def test_offline_user_is_stored_and_answered_202(tmp_path: Path, handled: bool,
                                                  retval: str) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            def offline(m):
                m.retval = retval
                m.set("error", "offline")
                return handled

            y.route_answer = offline
            r = await y.message()
            assert r.get("code") == "202"
            assert sent(y, "xsip.generate") == []
            (row,) = await y.stored(BOB)
            assert "alice@example.com" in row
            assert_clean(y)

    run(scenario)


def test_offline_user_with_store_off_gets_480(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"store": "false"}) as y:
            r = await y.message()
            assert r.get("code") == "480"
            assert "store is off" in await y.command("sipgen messages")
            assert_clean(y)

    run(scenario)


def test_non_sip_target_is_delivered_with_msg_execute_and_its_outcome_relayed(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            got = []

            def route(m):
                m.retval = "jabber/bob@jabber.example.com"
                return True

            def jabber(m):
                if m.get("callto", "").startswith("jabber/"):
                    got.append(m.copy())
                    return True
                return False

            def jabber_busy(m):
                m.set("error", "busy")
                m.set("code", "486")
                return False

            y.route_answer = route
            h = y.fy.on("msg.execute", jabber, 100)
            r = await y.message()
            assert r.get("code") == "200"
            (m,) = sent(y, "msg.execute")
            p = m.as_dict()
            assert p["callto"] == "jabber/bob@jabber.example.com"
            assert p["caller"] == "alice" and p["called"] == "bob"
            assert p["text"] == "hello bob\r\n" and p["xsip_body"] == "hello bob\r\n"
            assert p["xsip_type"] == "text/plain;charset=UTF-8"
            assert not [k for k in p if k.startswith("sip_")]
            assert len(got) == 1 and sent(y, "xsip.generate") == []
            # the module refuses it: its failure is relayed
            y.fy.off(h)
            y.fy.on("msg.execute", jabber_busy, 100)
            r = await y.message()
            assert r.get("code") == "486"
            assert_clean(y)

    run(scenario)


def test_non_sip_target_with_other_targets_reject_gets_404(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"other_targets": "reject"}) as y:
            def route(m):
                m.retval = "jabber/bob@jabber.example.com"
                return True

            y.route_answer = route
            r = await y.message()
            assert r.get("code") == "404"
            assert sent(y, "msg.execute") == [] and sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


# ==========================================================================
# 4. Delivery: what the MESSAGE carries
# ==========================================================================


def test_xsip_generate_carries_only_what_we_set_nothing_of_the_inbound_request(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            before = time.time()
            r = await y.message(**{"sip_x-custom": "junk", "sip_p-asserted-identity": "<sip:x@y>"})
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            keys = [k for k, _ in x.params]
            assert len(keys) == len(set(keys))
            assert set(keys) == XSIP_KEYS
            p = x.as_dict()
            assert p["method"] == "MESSAGE" and p["wait"] == "true" and p["uri"] == BOB_URI
            assert p["sip_From"].startswith('"Alice A" <sip:alice@example.com>;tag=')
            tag = p["sip_From"].rpartition(";tag=")[2]
            assert tag and tag != "inbound-from-tag"
            assert p["sip_To"] == "<sip:bob@example.com>"
            assert p["sip_Call-ID"] and p["sip_Call-ID"] != "inbound-call-id@192.0.2.7"
            assert p["sip_CSeq"] == "1 MESSAGE"
            date = email.utils.parsedate_to_datetime(p["sip_Date"]).timestamp()
            assert before - 1 <= date <= time.time() + 1
            assert p["sip_Date"].endswith(" GMT")
            assert p["xsip_type"] == "text/plain;charset=UTF-8"
            assert p["xsip_body"] == "hello bob\r\n"
            assert "sip_Auto-Submitted" not in p  # a person's message is not automatic
            assert_clean(y)

    run(scenario)


@pytest.mark.parametrize("from_hdr,expected", [
    (r'"Al \"the\" \\ B" <sip:alice@example.com>;tag=1', r'"Al \"the\" \\ B" <sip:alice@example.com>'),
    ("Alice Smith <sip:alice@example.com>;tag=1", '"Alice Smith" <sip:alice@example.com>'),
    ("<sip:alice@example.com>;tag=1", "<sip:alice@example.com>"),
    ("sip:alice@example.com;tag=1", "<sip:alice@example.com>"),
    ('"Evil\r\nVia: x" <sip:alice@example.com>;tag=1', '"EvilVia: x" <sip:alice@example.com>'),
], ids=["quote-backslash", "token-display", "no-display", "bare-uri", "crlf-dropped"])
def test_from_display_name_is_kept_and_correctly_quoted(tmp_path: Path, from_hdr: str,
                                                         expected: str) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            r = await y.message(sip_from=from_hdr, callername=None)
            assert r.get("code") == "200"
            (x,) = sent(y, "xsip.generate")
            assert x.get("sip_From").rpartition(";tag=")[0] == expected
            assert_clean(y)

    run(scenario)


def test_each_message_gets_its_own_call_id_and_from_tag(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            await y.message()
            await y.message()
            a, b = sent(y, "xsip.generate")
            assert a.get("sip_Call-ID") != b.get("sip_Call-ID")
            assert a.get("sip_From") != b.get("sip_From")
            assert_clean(y)

    run(scenario)


def test_a_log_line_per_message_at_info_level_and_the_body_only_at_the_most_verbose(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, debuglevel=10) as y:
            y.register_contact(BOB, BOB_URI)
            await y.message(xsip_body="secret words")
            await y.settle()
            got = [(lvl, t) for lvl, t in y.fy.debug_lines if "Got SIP MESSAGE" in t]
            assert len(got) == 1
            lvl, text = got[0]
            assert lvl == 9  # DebugInfo
            assert "alice@example.com" in text and "bob@example.com" in text
            assert "secret words" not in text
            bodies = [lvl for lvl, t in y.fy.debug_lines if "secret words" in t]
            assert bodies and set(bodies) == {10}  # DebugAll only
            assert_clean(y)

    run(scenario)


# ==========================================================================
# 5. A truthful answer
# ==========================================================================


@pytest.mark.parametrize("code", ["200", "202"])
def test_relay_mode_answers_what_the_target_answered_when_it_is_2xx(tmp_path: Path,
                                                                     code: str) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            y.xsip = lambda m: code
            r = await y.message()
            assert r.get("code") == code
            st = await y.status()
            assert st["msg_delivered"] == "1" and st["msg_stored"] == "0"
            assert await y.stored() == []
            assert_clean(y)

    run(scenario)


def test_relay_mode_maps_delivery_failures_when_not_stored(tmp_path: Path) -> None:
    """store=false: each xsip.generate outcome becomes the answer RFC 3428 and §2.3 allow."""
    cases = [
        ({"code": "408"}, "408"),  # 408 stays 408 when not stored
        ({"code": "401"}, "500"),  # the challenge's headers never reach us
        ({"code": "407"}, "500"),
        ({"code": "302", "sip_contact": "<sip:b@x>"}, "480"),  # its Contact never reaches us
        ({"code": "301"}, "480"),
        ({"error": "offline"}, "480"),  # no code: could not send at all
        ({"error": "notransport"}, "480"),
        ({"error": "noconn"}, "480"),
        ({"code": "486"}, "486"),
        ({"code": "404"}, "404"),
        ({"code": "603"}, "603"),
        ({"code": "503"}, "480"),  # a 503 is never passed back
        ({"code": "504"}, "408"),
        ({"code": "500"}, "500"),
        ({"_handled": False}, "500"),  # nobody sent it (no [general] generate=true)
    ]

    async def scenario() -> None:
        async with started(tmp_path, {"store": "false"}) as y:
            y.register_contact(BOB, BOB_URI)
            answers = []
            for result, _ in cases:
                y.xsip = lambda m, r=result: dict(r)
                r = await y.message()
                answers.append(r.get("code"))
            assert answers == [want for _, want in cases]
            assert len(sent(y, "xsip.generate")) == len(cases)
            assert_clean(y)

    run(scenario, timeout=30)


@pytest.mark.parametrize("result", [{"code": "408"}, {"error": "offline"}, {"code": "480"},
                                    {"code": "503"}],
                         ids=["408", "error-offline", "480", "503"])
def test_relay_mode_stores_an_unreachable_recipients_message_and_answers_202(
        tmp_path: Path, result: dict) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            y.xsip = lambda m: dict(result)
            r = await y.message()
            assert r.get("code") == "202"
            assert len(await y.stored(BOB)) == 1
            assert_clean(y)

    run(scenario)


def test_relay_mode_does_not_store_a_definite_refusal(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            y.xsip = lambda m: 486
            r = await y.message()
            assert r.get("code") == "486"
            assert await y.stored() == []
            assert_clean(y)

    run(scenario)


def test_accept_mode_answers_202_at_once_then_delivers_in_the_background(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            y.register_contact(BOB, BOB_URI)
            release = y.hold_xsip()
            r = await y.message()
            assert r.get("code") == "202"
            await y.wait_xsip(1)
            assert (await y.status())["msg_delivered"] == "0"  # still on its way
            release.set()
            for _ in range(100):
                if (await y.status())["msg_delivered"] == "1":
                    break
                await asyncio.sleep(0.02)
            assert (await y.status())["msg_delivered"] == "1"
            assert await y.stored() == []
            assert_clean(y)

    run(scenario)


def test_accept_mode_stores_when_the_background_delivery_finds_the_user_offline(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"mode": "accept"}) as y:
            r = await y.message()
            assert r.get("code") == "202"
            for _ in range(100):
                if await y.stored(BOB):
                    break
                await asyncio.sleep(0.02)
            assert len(await y.stored(BOB)) == 1
            assert_clean(y)

    run(scenario)


# ==========================================================================
# 6. Order and limits
# ==========================================================================


def test_messages_to_one_user_go_out_one_at_a_time_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.register_contact(BOB, BOB_URI)
            y.register_contact("carol@example.com", "sip:carol@192.0.2.40:5060")
            gate = y.hold_xsip(body="1")
            tasks = []
            for i in range(1, 5):
                tasks.append(asyncio.ensure_future(y.message(xsip_body=str(i))))
                await y.fy.wait_sent("call.route", count=i)
                await asyncio.sleep(0.02)
            # another user is not held up behind bob
            r = await y.message(called="carol", sip_uri="sip:carol@example.com",
                                xsip_body="to carol")
            assert r.get("code") == "200"
            assert y.bodies() == ["1", "to carol"]  # bob's 2..4 wait for his pending 1
            gate.set()
            answers = await asyncio.gather(*tasks)
            assert [a.get("code") for a in answers] == ["200"] * 4
            assert [b for b in y.bodies() if b != "to carol"] == ["1", "2", "3", "4"]
            assert_clean(y)

    run(scenario)


def test_a_live_message_waits_behind_the_users_stored_backlog(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            for body in ("old 1", "old 2"):
                r = await y.message(xsip_body=body)
                assert r.get("code") == "202"
            y.register_contact(BOB, BOB_URI)  # online now, but not yet told by a REGISTER
            r = await y.message(xsip_body="new")
            assert r.get("code") == "200"
            assert y.bodies() == ["old 1", "old 2", "new"]
            assert await y.stored() == []
            assert_clean(y)

    run(scenario)


def test_a_live_message_is_stored_behind_a_backlog_that_cannot_be_delivered(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            assert (await y.message(xsip_body="old")).get("code") == "202"
            y.register_contact(BOB, BOB_URI)
            y.xsip = lambda m: 408  # the contact does not answer
            r = await y.message(xsip_body="new")
            assert r.get("code") == "202"
            assert y.bodies() == ["old"]  # "new" never jumps ahead of "old"
            rows = await y.stored(BOB)
            assert len(rows) == 2
            assert_clean(y)

    run(scenario)


def test_max_concurrent_caps_deliveries_waiting_on_yate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"max_concurrent": "2"}) as y:
            users = ["bob", "carol", "dave", "erin"]
            for u in users:
                y.register_contact(f"{u}@example.com", f"sip:{u}@192.0.2.50:5060")
            gate = asyncio.Event()

            async def gen(m):
                await gate.wait()
                return 200

            y.xsip = gen
            tasks = [asyncio.ensure_future(y.message(called=u, sip_uri=f"sip:{u}@example.com"))
                     for u in users]
            await y.wait_xsip(2)
            await y.fy.wait_sent("call.route", count=4)
            await asyncio.sleep(0.2)
            assert len(y.xsip_seen) == 2  # the other two wait for a slot
            st = await y.status()
            assert st["msg_inprogress"] == "4" and st["inprogress"] == "4"
            gate.set()
            answers = await asyncio.gather(*tasks)
            assert [a.get("code") for a in answers] == ["200"] * 4
            assert y.xsip_max_active == 2
            assert_clean(y)

    run(scenario)


def test_sender_over_its_rate_gets_503_with_retry_after(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"sender_rate": "0.1", "sender_burst": "2"}) as y:
            y.register_contact(BOB, BOB_URI)
            codes = [(await y.message()).get("code") for _ in range(2)]
            r = await y.message()
            assert codes == ["200", "200"]
            assert r.get("code") == "503"
            assert r.get("osip_Retry-After") == "10"
            assert len(sent(y, "xsip.generate")) == 2
            # another sender is not limited by alice's burst
            r = await y.message(caller="carol", username="carol",
                                sip_from="<sip:carol@example.com>;tag=c")
            assert r.get("code") == "200"
            st = await y.status()
            assert st["message.rejected503"] == "1" and st["message.rate_limited"] == "1"
            assert_clean(y)

    run(scenario)


# ==========================================================================
# routing=registrations: our own view of user.register instead of call.route
# ==========================================================================


def test_routing_registrations_sends_to_the_registered_contact_without_call_route(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"routing": "registrations"}) as y:
            await y.register("bob", "example.com", BOB_URI, oconnection_id="tcp:7-x")
            y.unregister_contact(BOB)  # Yate's routing would now say offline: we must not ask
            r = await y.message()
            assert r.get("code") == "200"
            assert sent(y, "call.route") == []
            (x,) = sent(y, "xsip.generate")
            assert x.get("uri") == BOB_URI and x.get("connection_id") == "tcp:7-x"
            assert_clean(y)

    run(scenario)


def test_routing_registrations_asks_yate_for_users_it_saw_no_registration_of(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"routing": "registrations"}) as y:
            y.register_contact(BOB, BOB_URI)  # registered before our start: only regfile knows
            r = await y.message()
            assert r.get("code") == "200"
            assert len(sent(y, "call.route")) == 1
            assert_clean(y)

    run(scenario)


def test_routing_registrations_forgets_a_contact_on_user_unregister(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"routing": "registrations"}) as y:
            await y.register("bob", "example.com", BOB_URI)
            assert await y.fy.watch_notify("user.unregister", [
                ("number", "bob"), ("username", "bob"), ("sip_uri", "sip:example.com"),
                ("data", "sip/" + BOB_URI), ("expires", "0")], handled=True)
            y.unregister_contact(BOB)
            r = await y.message()
            assert r.get("code") == "202"  # routed by Yate again: offline, stored
            assert len(sent(y, "call.route")) == 1 and sent(y, "xsip.generate") == []
            assert_clean(y)

    run(scenario)


def test_routing_yate_always_asks_yate_even_after_a_registration(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"routing": "yate"}) as y:
            await y.register("bob", "example.com", BOB_URI)
            r = await y.message()
            assert r.get("code") == "200"
            assert len(sent(y, "call.route")) == 1
            assert_clean(y)

    run(scenario)
