"""The event packages' own rules end to end (the real script behind the fake Yate): PIDF
composition and publication expiry, presence from registrations, MWI from user.notify and for
a vm-<user> mailbox, the dialog knobs, TCP subscriptions of an earlier Yate run, and the
bounded retry after a transport error."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from events_e2e_harness import PIDF_OPEN, in_dialog, started, subscriptions_ready
from msg_e2e_harness import assert_clean, run

PIDF = "{urn:ietf:params:xml:ns:pidf}"
DLG = "{urn:ietf:params:xml:ns:dialog-info}"
FAST = {"presence": {"min_interval": "0"}}


def _basic(body: str) -> list[str]:
    return [b.text or "" for b in ET.fromstring(body).iter(PIDF + "basic")]


# -- presence ------------------------------------------------------------------------------------

def test_two_publications_are_composed_into_one_valid_pidf_and_one_left_is_relayed_as_is(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, FAST) as y:
            await y.subscribe()
            await y.wait_notifies(1)
            phone = (await y.publish()).get("osip_SIP-ETag")
            await y.wait_notifies(2)
            busy = PIDF_OPEN.replace("open", "closed")  # same tuple id "t1"
            desk = await y.publish(sip_callid="pub-2@192.0.2.10", xsip_body=busy)
            assert desk.get("code") == "200"
            ns = await y.wait_notifies(3)
            body = ns[2].get("xsip_body")
            root = ET.fromstring(body)
            assert root.tag == PIDF + "presence" and root.get("entity") == "sip:bob@example.com"
            ids = [t.get("id") for t in root.iter(PIDF + "tuple")]
            assert len(ids) == 2 and len(set(ids)) == 2  # made unique
            assert sorted(_basic(body)) == ["closed", "open"]
            assert "ns0:" not in body
            # the desk phone's publication goes: the phone's is relayed byte for byte again
            r = await y.publish(xsip_body=None, xsip_type=None, sip_content__type=None,
                                sip_expires="0", sip_sip__if__match=desk.get("osip_SIP-ETag"))
            assert r.get("code") == "200"
            ns = await y.wait_notifies(4)
            assert ns[3].get("xsip_body") == PIDF_OPEN
            assert phone in await y.command("sipgen publications bob@example.com")
            assert_clean(y)

    run(scenario, timeout=30)


def test_an_expired_publication_is_removed_and_the_watchers_are_told(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {**FAST, "events": {"min_expires": "1"}}) as y:
            await y.subscribe()
            await y.wait_notifies(1)
            r = await y.publish(sip_expires="1")
            assert r.get("code") == "200" and r.get("osip_Expires") == "1"
            ns = await y.wait_notifies(2)
            assert _basic(ns[1].get("xsip_body")) == ["open"]
            ns = await y.wait_notifies(3, timeout=5)
            assert _basic(ns[2].get("xsip_body")) == ["closed"]
            assert "No publications" in await y.command("sipgen publications")

    run(scenario, timeout=30)


def test_presence_from_registrations_is_open_while_registered(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"min_interval": "0",
                                                   "from_registrations": "true"}}) as y:
            await y.subscribe()
            (n,) = await y.wait_notifies(1)
            assert _basic(n.get("xsip_body")) == ["closed"]
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062")
            ns = await y.wait_notifies(2)
            assert _basic(ns[1].get("xsip_body")) == ["open"]
            await y.fy.watch_notify("user.unregister", [
                ("number", "bob"), ("username", "bob"), ("sip_uri", "sip:example.com"),
                ("data", "sip/sip:bob@192.0.2.20:5062"), ("handlers", "regfile:100")])
            ns = await y.wait_notifies(3)
            assert _basic(ns[2].get("xsip_body")) == ["closed"]

    run(scenario, timeout=30)


# -- message-summary -----------------------------------------------------------------------------

MWI = dict(sip_event="message-summary", sip_accept="application/simple-message-summary")


def test_mwi_counts_from_user_notify_reach_the_subscriber(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            await y.subscribe(**MWI, sip_uri="sip:alice@example.com",
                              sip_to="<sip:alice@example.com>")
            await y.wait_notifies(1)
            await y.fy.watch_notify("user.notify", [("user", "alice"),
                                                    ("domain", "example.com"),
                                                    ("voicenew", "4"), ("voiceold", "1")])
            ns = await y.wait_notifies(2)
            body = ns[1].get("xsip_body")
            assert body.startswith("Messages-Waiting: yes\r\n") and "Voice-Message: 4/1" in body

    run(scenario)


def test_a_vm_prefixed_mailbox_is_that_users_and_only_they_may_watch_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(**MWI, sip_uri="sip:vm-bob@example.com",
                                  sip_to="<sip:vm-bob@example.com>")
            assert r.get("code") == "403"  # alice asking for bob's mailbox
            r = await y.subscribe(**MWI, sip_uri="sip:vm-alice@example.com",
                                  sip_to="<sip:vm-alice@example.com>", sip_callid="vm-2")
            assert r.get("code") == "200"
            await y.wait_notifies(1)
            assert "1 subscriber(s) notified" in await y.command(
                "sipgen mwi alice@example.com 3 0")
            ns = await y.wait_notifies(2)
            assert "Voice-Message: 3/0" in ns[1].get("xsip_body")
            assert "Message-Account: sip:alice@example.com" in ns[1].get("xsip_body")

    run(scenario)


# -- dialog --------------------------------------------------------------------------------------

def _cdr(chan: str, operation: str, status: str, t: float, caller: str) -> list[tuple[str, str]]:
    return [("time", f"{t:.3f}"), ("chan", chan), ("operation", operation),
            ("direction", "outgoing"), ("status", status), ("external", "bob"),
            ("caller", caller), ("called", "bob"), ("billid", f"b-{chan}"),
            ("duration", "0"), ("billtime", "0")]


def test_single_dialog_and_hidden_remote_identity(tmp_path: Path) -> None:
    async def scenario() -> None:
        sections = {"dialog": {"single_dialog": "true", "remote_identity": "false"}}
        async with started(tmp_path, sections) as y:
            await y.subscribe(sip_event="dialog", sip_accept="application/dialog-info+xml")
            await y.wait_notifies(1)
            t = time.time()
            await y.fy.watch_notify("call.cdr", _cdr("sip/1", "update", "answered", t, "345"))
            await y.fy.watch_notify("call.cdr", _cdr("sip/2", "update", "ringing", t, "346"))
            await asyncio.sleep(0.3)
            last = ET.fromstring(y.notifies()[-1].get("xsip_body"))
            dialogs = last.findall(DLG + "dialog")
            assert len(dialogs) == 1  # one only: the most important (the confirmed call)
            assert [s.text for s in dialogs[0].iter(DLG + "state")] == ["confirmed"]
            assert last.find(f".//{DLG}remote") is None
            assert "345" not in y.notifies()[-1].get("xsip_body")

    run(scenario, timeout=30)


# -- restarts and transport errors --------------------------------------------------------------

def test_a_tcp_subscription_of_an_earlier_yate_run_is_dropped_at_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(ip_transport="TCP", connection_id="tcp-7",
                                  sip_contact="<sip:alice@192.0.2.7:5080;transport=tcp>")
            assert r.get("code") == "200"
            (n,) = await y.wait_notifies(1)
            assert n.get("connection_id") == "tcp-7"
            udp = await y.subscribe(sip_callid="udp-1", xsip_dlgtag="42")
            assert udp.get("code") == "200"
            await y.wait_notifies(2)
            # Yate restarted meanwhile: its TCP connections are gone
            y.fy.runid = y.fy.engine_params["runid"] = str(int(y.fy.runid) + 1)
            await y.fy.close_stdin(respawn=True)
            await y.fy.wait_installed("sip.subscribe", 10)
            await subscriptions_ready(y)
            listing = await y.command("sipgen subscriptions")
            assert listing.count("alice@example.com") == 1  # the UDP one only
            r = await y.subscribe(**in_dialog(r), ip_transport="TCP", connection_id="tcp-7")
            assert r.get("code") == "481"  # the phone re-subscribes

    run(scenario, timeout=40)


def test_a_transport_error_is_retried_and_the_subscription_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            answers = [{"error": "notransport", "_handled": False}]

            def xsip(m):  # noqa: ANN001, ANN202
                return answers.pop(0) if answers else 200

            y.xsip = xsip
            await y.subscribe()
            await y.wait_notifies(1)
            t0 = time.monotonic()
            ns = await y.wait_notifies(2, timeout=6)  # the first retry comes after 2 s
            assert time.monotonic() - t0 >= 1.5
            assert ns[1].get("sip_Call-ID") == ns[0].get("sip_Call-ID")
            assert int(ns[1].get("sip_CSeq").split()[0]) > int(ns[0].get("sip_CSeq").split()[0])
            assert "alice@example.com" in await y.command("sipgen subscriptions")

    run(scenario, timeout=30)


# -- the composer on its own ---------------------------------------------------------------------

def test_composing_keeps_extensions_prefixes_and_makes_every_id_unique() -> None:
    from yate_sipgen.bodies import pidf

    doc = ('<?xml version="1.0" encoding="UTF-8"?>\r\n<presence xmlns="urn:ietf:params:xml:ns:pidf"'
           ' xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" xmlns:foo="urn:x-foo"'
           ' entity="sip:bob@example.com"><tuple id="t1"><status><basic>open</basic></status>'
           '<foo:x foo:a="1" xml:lang="en">a &amp; b</foo:x></tuple><dm:person id="p"/>'
           '<note>n</note></presence>')
    out = pidf.compose("sip:bob@example.com", [doc, doc.replace("open", "closed")])
    root = pidf.validate(out)
    assert "ns0" not in out and "xmlns:foo=\"urn:x-foo\"" in out and "<dm:person" in out
    ids = [c.get("id") for c in root if c.get("id") is not None]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert [t.tag for t in root][:2] == [PIDF + "tuple"] * 2  # tuples first (RFC 3863 §4.1)
    x = root.find(f"{PIDF}tuple/{{urn:x-foo}}x")
    assert x is not None and x.text == "a & b" and x.get("{urn:x-foo}a") == "1"
    assert x.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"


def test_dialog_info_version_continues_across_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            await y.subscribe(sip_event="dialog", sip_accept="application/dialog-info+xml")
            await y.wait_notifies(1)
            await y.fy.watch_notify("call.cdr", _cdr("sip/1", "update", "ringing",
                                                     time.time(), "345"))
            ns = await y.wait_notifies(2)
            before = int(ET.fromstring(ns[1].get("xsip_body")).get("version"))
            await y.fy.close_stdin(respawn=True)
            await y.fy.wait_installed("sip.subscribe", 10)
            await subscriptions_ready(y)
            await y.fy.watch_notify("call.cdr", _cdr("sip/1", "update", "answered",
                                                     time.time() + 1, "345"))
            ns = await y.wait_notifies(3)
            assert int(ET.fromstring(ns[2].get("xsip_body")).get("version")) > before
            assert int(ns[2].get("sip_CSeq").split()[0]) > int(ns[1].get("sip_CSeq").split()[0])

    run(scenario, timeout=40)
