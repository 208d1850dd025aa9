"""SUBSCRIBE/NOTIFY and PUBLISH end to end: the real script behind the fake Yate.

Each test pins one rule of the events issue: the SUBSCRIBE answers (RFC 6665), the NOTIFY as a
dialog request, the order "answer first, then NOTIFY", PUBLISH (RFC 3903), removal on NOTIFY
failures, a restart in the middle of a subscription, MWI and dialog state, and a NOTIFY storm
that leaves MESSAGE relaying alone.
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from events_e2e_harness import PIDF_OPEN, in_dialog, started, subscriptions_ready
from msg_e2e_harness import BASE, assert_clean, run

PIDF = "{urn:ietf:params:xml:ns:pidf}"
DLG = "{urn:ietf:params:xml:ns:dialog-info}"


def _basic(body: str) -> list[str]:
    root = ET.fromstring(body)
    return [b.text for b in root.iter(PIDF + "basic")]


# -- RFC 6665 answers -----------------------------------------------------------------------

def test_presence_subscribe_gets_200_with_expires_and_contact_then_an_active_notify(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe()
            assert r.handled and r.get("code") == "200"
            assert r.get("osip_Expires") == "600"
            assert r.get("osip_Contact") == "<sip:bob@example.com>"
            (n,) = await y.wait_notifies(1)
            assert n.get("uri") == "sip:alice@192.0.2.7:5080" and n.get("wait") == "true"
            assert n.get("sip_From") == "<sip:bob@example.com>;tag=1342317711"
            assert n.get("sip_To") == "<sip:alice@example.com>;tag=alice-tag-1"
            assert n.get("sip_Call-ID") == "sub-call-1@192.0.2.7"
            assert n.get("sip_Event") == "presence"
            state = n.get("sip_Subscription-State")
            assert state.startswith("active;expires=") and 595 <= int(state.split("=")[1]) <= 600
            # UDP without a Route set: the next hop is where the SUBSCRIBE came from (NAT)
            assert (n.get("host"), n.get("port")) == ("192.0.2.7", "5080")
            assert n.get("xsip_type") == "application/pidf+xml"
            assert _basic(n.get("xsip_body")) == ["closed"]  # nothing published
            assert_clean(y)

    run(scenario)


def test_the_subscribe_answer_leaves_before_its_notify(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            await y.subscribe()
            await y.wait_notifies(1)
            lines = y.fy.lines_from_script()
            answer = next(i for i, ln in enumerate(lines)
                          if ln.startswith(b"%%<message:") and b"code=200" in ln
                          and b"osip_Expires" in ln)
            notify = next(i for i, ln in enumerate(lines)
                          if b":xsip.generate:" in ln and b"method=NOTIFY" in ln)
            assert answer < notify

    run(scenario)


def test_subscribe_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(sip_event="conference")
            assert r.get("code") == "489"
            assert set(r.get("osip_Allow-Events").split(", ")) == {
                "presence", "dialog", "message-summary", "presence.winfo"}
            assert (await y.subscribe(sip_event=None)).get("code") == "400"
            r = await y.subscribe(sip_expires="1")
            assert r.get("code") == "423" and r.get("osip_Min-Expires") == "60"
            assert (await y.subscribe(sip_accept="application/xpidf+xml")).get("code") == "406"
            assert (await y.subscribe(sip_uri="sip:bob@other.org")).get("code") == "403"
            r = await y.subscribe(**in_dialog(None, sip_callid="unknown@x"))
            assert r.get("code") == "481"
            # a watcher of another domain may not see bob (watchers=domain)
            r = await y.subscribe(username="eve", sip_from="<sip:eve@evil.org>;tag=e1")
            assert r.get("code") == "403"
            assert y.notifies() == []
            assert_clean(y)

    run(scenario)


def test_unauthenticated_watcher_is_refused_when_auth_is_required(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(drop=("username", "realm"))
            assert r.get("code") == "403"

    run(scenario)


def test_expires_is_shortened_to_max_and_default_applies(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"events": {"max_expires": "900"}}) as y:
            assert (await y.subscribe(sip_expires="100000")).get("osip_Expires") == "900"
            r = await y.subscribe(sip_expires=None, sip_callid="c2", xsip_dlgtag="2")
            assert r.get("osip_Expires") == "900"  # presence default 3600, capped

    run(scenario)


def test_refresh_gets_200_and_a_notify_and_unsubscribe_gets_terminated(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            first = await y.subscribe()
            await y.wait_notifies(1)
            r = await y.subscribe(**in_dialog(first, sip_expires="300"))
            assert r.get("code") == "200" and r.get("osip_Expires") == "300"
            ns = await y.wait_notifies(2)
            assert ns[1].get("sip_Subscription-State").startswith("active;expires=")
            assert int(ns[1].get("sip_CSeq").split()[0]) > int(ns[0].get("sip_CSeq").split()[0])
            r = await y.subscribe(**in_dialog(first, sip_expires="0"))
            assert r.get("code") == "200" and r.get("osip_Expires") == "0"
            ns = await y.wait_notifies(3)
            assert ns[2].get("sip_Subscription-State") == "terminated"
            assert "No subscriptions" in await y.command("sipgen subscriptions")
            # the dialog is gone: a refresh now is 481
            assert (await y.subscribe(**in_dialog(first))).get("code") == "481"
            assert_clean(y)

    run(scenario)


def test_expiry_sends_terminated_reason_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"events": {"min_expires": "1"}}) as y:
            await y.subscribe(sip_expires="1")
            ns = await y.wait_notifies(2, timeout=5)
            assert ns[1].get("sip_Subscription-State") == "terminated;reason=timeout"
            assert "No subscriptions" in await y.command("sipgen subscriptions")

    run(scenario)


def test_fetch_with_expires_zero_gets_one_terminated_notify_and_keeps_nothing(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(sip_expires="0")
            assert r.get("code") == "200" and r.get("osip_Expires") == "0"
            (n,) = await y.wait_notifies(1)
            assert n.get("sip_Subscription-State") == "terminated;reason=timeout"
            assert _basic(n.get("xsip_body")) == ["closed"]
            assert "No subscriptions" in await y.command("sipgen subscriptions")

    run(scenario)


def test_notify_follows_record_route_and_tcp_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            await y.subscribe(ip_transport="TCP", connection_id="tcp:3-192.0.2.7:5080",
                              sipheader_record__route="<sip:edge.example.com:5070;lr>")
            (n,) = await y.wait_notifies(1)
            assert n.get("sip_Route") == "<sip:edge.example.com:5070;lr>"
            assert (n.get("host"), n.get("port")) == ("edge.example.com", "5070")
            assert n.get("connection_id") == "tcp:3-192.0.2.7:5080"
            assert n.get("sip_Contact") == "<sip:bob@example.com;transport=tcp>"

    run(scenario)


# -- NOTIFY outcomes ------------------------------------------------------------------------

def test_notify_answered_481_removes_the_subscription_and_503_keeps_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            y.xsip = lambda m: 503
            await y.subscribe()
            await y.wait_notifies(1)
            await asyncio.sleep(0.1)
            assert "alice@example.com" in await y.command("sipgen subscriptions")
            y.xsip = lambda m: 481
            await y.command("sipgen mwi bob@example.com 1 0")  # no effect on presence
            await y.publish()
            await y.wait_notifies(2)
            await asyncio.sleep(0.1)
            assert "No subscriptions" in await y.command("sipgen subscriptions")
            assert_clean(y)

    run(scenario)


# -- PUBLISH ----------------------------------------------------------------------------------

def test_publish_gets_an_etag_and_the_watcher_the_document_byte_for_byte(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"min_interval": "0"}}) as y:
            await y.subscribe()
            await y.wait_notifies(1)
            r = await y.publish()
            assert r.get("code") == "200" and r.get("osip_Expires") == "3600"
            etag = r.get("osip_SIP-ETag")
            assert etag and len(etag) >= 16
            ns = await y.wait_notifies(2)
            assert ns[1].get("xsip_body") == PIDF_OPEN
            # refresh: a new ETag, no new NOTIFY (the state did not change)
            r2 = await y.publish(xsip_body=None, xsip_type=None, sip_content__type=None,
                                 sip_sip__if__match=etag)
            assert r2.get("code") == "200" and r2.get("osip_SIP-ETag") not in (None, etag)
            # the old ETag is no longer valid
            r3 = await y.publish(sip_sip__if__match=etag)
            assert r3.get("code") == "412"
            # remove: watchers see closed again
            r4 = await y.publish(xsip_body=None, xsip_type=None, sip_content__type=None,
                                 sip_expires="0", sip_sip__if__match=r2.get("osip_SIP-ETag"))
            assert r4.get("code") == "200"
            ns = await y.wait_notifies(3)
            assert _basic(ns[2].get("xsip_body")) == ["closed"]

    run(scenario, timeout=30)


def test_presence_state_changes_are_paced_per_subscriber(tmp_path: Path) -> None:
    """RFC 3856 §6.6 (here min_interval=1 s instead of 5): a burst of PUBLISHes right after
    the first NOTIFY gives one more NOTIFY, a pacing interval later, with the latest state."""
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"min_interval": "1"}}) as y:
            await y.subscribe()
            await y.wait_notifies(1)
            first = time.monotonic()
            etag = (await y.publish()).get("osip_SIP-ETag")
            closed_doc = PIDF_OPEN.replace("open", "closed")
            await y.publish(sip_sip__if__match=etag, xsip_body=closed_doc)
            ns = await y.wait_notifies(2)
            assert time.monotonic() - first >= 0.9
            assert ns[1].get("xsip_body") == closed_doc  # coalesced to the latest
            await asyncio.sleep(0.3)
            assert len(y.notifies()) == 2

    run(scenario)


def test_publish_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            assert (await y.publish(sip_event="dialog")).get("code") == "489"
            r = await y.publish(xsip_type="text/plain", sip_content__type="text/plain")
            assert r.get("code") == "415" and r.get("osip_Accept") == "application/pidf+xml"
            assert (await y.publish(xsip_body=None)).get("code") == "400"
            assert (await y.publish(sip_expires="1")).get("code") == "423"
            evil = ('<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "aaaaaaaa">]>'
                    '<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:b@x">&a;'
                    '</presence>')
            assert (await y.publish(xsip_body=evil)).get("code") == "400"
            assert (await y.publish(xsip_body="<presence")).get("code") == "400"
            assert (await y.publish(xsip_body="x" * 20000)).get("code") == "413"
            # someone else's presence
            assert (await y.publish(username="alice")).get("code") == "403"
            assert (await y.publish(sip_sip__if__match="bogus")).get("code") == "412"
            assert "No publications" in await y.command("sipgen publications")
            assert_clean(y)

    run(scenario)


def test_publication_survives_a_restart_of_the_script(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            etag = (await y.publish()).get("osip_SIP-ETag")
            await y.fy.close_stdin(respawn=True)
            await y.fy.wait_installed("sip.subscribe", 10)
            await subscriptions_ready(y)
            assert etag in await y.command("sipgen publications")
            r = await y.publish(xsip_body=None, xsip_type=None, sip_content__type=None,
                                sip_sip__if__match=etag)
            assert r.get("code") == "200"

    run(scenario, timeout=40)


# -- restart ------------------------------------------------------------------------------------

def test_subscription_survives_a_restart_and_cseq_continues(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            first = await y.subscribe()
            ns = await y.wait_notifies(1)
            before = int(ns[0].get("sip_CSeq").split()[0])
            await y.fy.close_stdin(respawn=True)
            await y.fy.wait_installed("sip.subscribe", 10)
            await subscriptions_ready(y)
            assert "alice@example.com" in await y.command("sipgen subscriptions")
            r = await y.subscribe(**in_dialog(first))
            assert r.get("code") == "200"
            ns = await y.wait_notifies(2)
            assert int(ns[1].get("sip_CSeq").split()[0]) > before
            assert ns[1].get("sip_From") == ns[0].get("sip_From")

    run(scenario, timeout=40)


# -- message-summary ------------------------------------------------------------------------

def test_mwi_console_change_reaches_the_subscriber_and_is_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(sip_event="message-summary", sip_uri="sip:alice@example.com",
                                  sip_to="<sip:alice@example.com>",
                                  sip_accept="application/simple-message-summary")
            assert r.get("code") == "200"
            (n,) = await y.wait_notifies(1)
            assert n.get("xsip_body").startswith("Messages-Waiting: no\r\n")
            out = await y.command("sipgen mwi alice@example.com 2 5")
            assert "1 subscriber(s) notified" in out
            ns = await y.wait_notifies(2)
            body = ns[1].get("xsip_body")
            assert body.startswith("Messages-Waiting: yes\r\n")
            assert "Voice-Message: 2/5" in body
            # someone else's mailbox: refused (watchers=self)
            r = await y.subscribe(sip_event="message-summary", sip_callid="c9", xsip_dlgtag="9",
                                  sip_accept="application/simple-message-summary")
            assert r.get("code") == "403"

    run(scenario)


def test_mwi_message_from_yate_updates_the_counts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            await y.subscribe(sip_event="message-summary", sip_uri="sip:*97@example.com",
                              sip_to="<sip:*97@example.com>", sip_accept=None)
            await y.wait_notifies(1)
            await y.fy.watch_notify("mwi", [("operation", "notify"), ("notifier", "alice"),
                                            ("message-summary.voicenew", "1"),
                                            ("message-summary.voiceold", "0")])
            ns = await y.wait_notifies(2)
            assert "Voice-Message: 1/0" in ns[1].get("xsip_body")

    run(scenario)


# -- dialog ----------------------------------------------------------------------------------

def _cdr(operation: str, status: str, t: float) -> list[tuple[str, str]]:
    return [("time", f"{t:.3f}"), ("chan", "sip/2"), ("operation", operation),
            ("direction", "outgoing"), ("status", status), ("external", "bob"),
            ("caller", "345"), ("called", "bob"), ("billid", "1700000000-1"),
            ("duration", "0"), ("billtime", "0")]


def test_a_call_gives_early_confirmed_terminated_with_increasing_versions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(sip_event="dialog", sip_accept="application/dialog-info+xml")
            assert r.get("code") == "200"
            (n0,) = await y.wait_notifies(1)
            docs = [ET.fromstring(n0.get("xsip_body"))]
            assert docs[0].get("state") == "full" and docs[0].findall(DLG + "dialog") == []
            t = time.time()
            for i, (op, st) in enumerate([("initialize", "outgoing"), ("update", "ringing"),
                                          ("update", "answered"), ("finalize", "answered")]):
                await y.fy.watch_notify("call.cdr", _cdr(op, st, t + i))
                ns = await y.wait_notifies(2 + i)
                docs.append(ET.fromstring(ns[-1].get("xsip_body")))
            states = [[s.text for s in d.iter(DLG + "state")] for d in docs]
            assert ["early"] in states and ["confirmed"] in states and ["terminated"] in states
            versions = [int(d.get("version")) for d in docs]
            assert versions == sorted(versions) and len(set(versions)) == len(versions)
            confirmed = next(d for d in docs if [s.text for s in d.iter(DLG + "state")]
                             == ["confirmed"])
            assert confirmed.find(DLG + "dialog").get("direction") == "recipient"

    run(scenario, timeout=30)


# -- a NOTIFY storm does not touch MESSAGE relaying ------------------------------------------

def test_notify_storm_against_dead_contacts_leaves_messages_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        sections = {"events": {"max_in_flight": "4"}, "presence": {"watchers": "any"}}
        async with started(tmp_path, sections) as y:
            release = asyncio.Event()

            async def xsip(m):
                if m.get("method") == "NOTIFY":
                    await release.wait()  # a dead UDP contact: Yate holds it ~7.5 s
                    return 408
                return 200

            y.xsip = xsip
            for i in range(30):
                r = await y.subscribe(sip_callid=f"storm-{i}", xsip_dlgtag=str(1000 + i),
                                      sip_from=f"<sip:w{i}@example.com>;tag=w{i}",
                                      username=f"w{i}")
                assert r.get("code") == "200"
            await asyncio.sleep(0.2)
            assert y.xsip_max_active <= 4  # the cap holds
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062")
            started_at = time.monotonic()
            r = await y.message()
            assert r.get("code") == "200"
            assert time.monotonic() - started_at < 1.0
            release.set()

    run(scenario, timeout=30)


# -- approvals --------------------------------------------------------------------------------

def test_pending_watcher_gets_pending_notify_until_approved_then_active(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"watchers": "approve"}}) as y:
            r = await y.subscribe()
            assert r.get("code") == "200"
            (n,) = await y.wait_notifies(1)
            assert n.get("sip_Subscription-State").startswith("pending;expires=")
            assert n.get("xsip_body") in (None, "")  # nothing is shown while pending
            out = await y.command("sipgen approve alice@example.com bob@example.com presence")
            assert "1 subscription(s) changed" in out
            ns = await y.wait_notifies(2)
            assert ns[1].get("sip_Subscription-State").startswith("active;expires=")
            assert _basic(ns[1].get("xsip_body")) == ["closed"]
            await y.command("sipgen deny alice@example.com bob@example.com presence")
            ns = await y.wait_notifies(3)
            assert ns[2].get("sip_Subscription-State") == "terminated;reason=rejected"
            # the decision is kept: a new SUBSCRIBE of alice is refused now
            r = await y.subscribe(sip_callid="again@x", xsip_dlgtag="5")
            assert r.get("code") == "403"

    run(scenario)


# -- other generic methods ----------------------------------------------------------------

def test_generic_methods_relay_fixed_codes_and_the_notify_rules(tmp_path: Path) -> None:
    async def scenario() -> None:
        sections = {"generic": {"methods": "notify:relay, info:488"}}
        async with started(tmp_path, sections) as y:
            await y.fy.wait_installed("sip.notify")
            await y.fy.wait_installed("sip.info")
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062")
            base = [(k, v) for k, v in (
                ("called", "bob"), ("caller", "alice"), ("username", "alice"),
                ("antiloop", "19"), ("ip_host", "192.0.2.7"), ("ip_port", "5080"),
                ("ip_transport", "UDP"), ("sip_uri", "sip:bob@example.com"),
                ("sip_callid", "n1@x"), ("sip_from", "<sip:alice@example.com>;tag=a1"),
                ("sip_to", "<sip:bob@example.com>"), ("sip_event", "x-custom"),
                ("xsip_type", "text/plain"), ("xsip_body", "ping"))]
            r = await y.fy.dispatch("sip.notify", base)
            assert r.get("code") == "200"
            (sent,) = [m for m in y.xsip_seen if m.get("method") == "NOTIFY"]
            assert sent.get("uri") == "sip:bob@192.0.2.20:5062"
            assert sent.get("sip_Event") == "x-custom" and sent.get("xsip_body") == "ping"
            y.xsip = lambda m: 486
            assert (await y.fy.dispatch("sip.notify", base)).get("code") == "486"
            assert (await y.fy.dispatch("sip.info", base)).get("code") == "488"
            in_dialog_base = [(k, v + ";tag=t9" if k == "sip_to" else v) for k, v in base]
            assert (await y.fy.dispatch("sip.notify", in_dialog_base)).get("code") == "481"
            refer = [(k, "refer;id=3" if k == "sip_event" else v) for k, v in in_dialog_base]
            r = await y.fy.dispatch("sip.notify", refer + [("id", "sip/7")])
            assert r.get("code") == "200"
            sync = [(k, "check-sync" if k == "sip_event" else v) for k, v in base
                    if k != "username"]
            assert (await y.fy.dispatch("sip.notify", sync)).get("code") == "403"
            unknown = [(k, "sip:nobody@example.com" if k == "sip_uri" else v) for k, v in base]
            y.xsip = lambda m: 200
            assert (await y.fy.dispatch("sip.notify", unknown)).get("code") in ("404", "480")
            assert_clean(y)

    run(scenario)


def test_a_relayed_generic_request_takes_one_hop_and_one_with_none_left_gets_483(
        tmp_path: Path) -> None:
    """As for MESSAGE: the onward xsip.generate carries the hops left less one (Yate's
    antiloop, from Max-Forwards; 20 when absent), and a request that would leave with none
    is answered 483 and not sent (a loop between two servers ends)."""
    async def scenario() -> None:
        async with started(tmp_path, {"generic": {"methods": "info:relay"}}) as y:
            await y.fy.wait_installed("sip.info")
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062")
            base = [("called", "bob"), ("caller", "alice"), ("username", "alice"),
                    ("sip_uri", "sip:bob@example.com"), ("sip_callid", "i1@x"),
                    ("sip_from", "<sip:alice@example.com>;tag=a1"),
                    ("sip_to", "<sip:bob@example.com>")]
            for antiloop, code, onward in (("5", "200", "4"), (None, "200", "19"),
                                           ("junk", "200", "19"), ("2", "200", "1"),
                                           ("1", "483", None), ("0", "483", None),
                                           ("-3", "483", None)):
                before = len(y.xsip_seen)
                params = base + ([("antiloop", antiloop)] if antiloop is not None else [])
                r = await y.fy.dispatch("sip.info", params)
                assert r.get("code") == code, (antiloop, r.get("code"))
                sent = [m for m in y.xsip_seen[before:] if m.get("method") == "INFO"]
                if onward is None:
                    assert sent == [], antiloop
                else:
                    assert [m.get("antiloop") for m in sent] == [onward], antiloop
            assert_clean(y)

    run(scenario)
