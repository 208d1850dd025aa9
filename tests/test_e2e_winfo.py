"""presence.winfo (RFC 3857/3858) end to end: a user sees who asks for their presence (pending),
the approval turns the watcher active, an unsubscribe takes it off the list; only the user may
see their own watcher list; what a watcher put in its From reaches the document escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from events_e2e_harness import started
from msg_e2e_harness import assert_clean, run

WI = "{urn:ietf:params:xml:ns:watcherinfo}"

#: bob asks for his own watcher list.
WINFO = dict(called="bob", caller="bob", username="bob", sip_callid="winfo-1@192.0.2.9",
             xsip_dlgtag="555", sip_from="<sip:bob@example.com>;tag=bw1",
             sip_contact="<sip:bob@192.0.2.9:5090>", sip_event="presence.winfo",
             sip_accept="application/watcherinfo+xml")


def _doc(n) -> tuple[int, list[tuple[str, str, str, str]]]:  # noqa: ANN001 - YMessage
    root = ET.fromstring(n.get("xsip_body"))
    assert root.tag == WI + "watcherinfo" and root.get("state") == "full"
    wl = root.find(WI + "watcher-list")
    assert wl is not None and wl.get("resource") == "sip:bob@example.com"
    assert wl.get("package") == "presence"
    return int(root.get("version")), [
        (w.text or "", w.get("status"), w.get("event"), w.get("display-name") or "")
        for w in wl.iter(WI + "watcher")]


def test_the_user_sees_a_pending_watcher_then_approved_then_gone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"watchers": "approve"}}) as y:
            r = await y.subscribe(**WINFO)
            assert r.get("code") == "200"
            ns = await y.wait_notifies(1)
            assert ns[0].get("sip_Event") == "presence.winfo"
            assert ns[0].get("xsip_type") == "application/watcherinfo+xml"
            assert _doc(ns[0]) == (0, [])
            # alice asks for bob's presence: pending, and bob's list says so at once
            await y.subscribe(sip_from='"Alice <&>" <sip:alice@example.com>;tag=a1')
            ns = await y.wait_notifies(3)
            winfo = [n for n in ns if n.get("sip_Event") == "presence.winfo"]
            assert _doc(winfo[-1]) == (1, [("sip:alice@example.com", "pending", "subscribe",
                                            "Alice <&>")])
            assert "&lt;&amp;&gt;" in winfo[-1].get("xsip_body")
            out = await y.command("sipgen approve alice@example.com bob@example.com presence")
            assert "approved" in out
            await y.fy.wait_until(lambda: len([n for n in y.notifies() if n.get(
                "sip_Event") == "presence.winfo"]) >= 3, 5, "winfo after approve")
            winfo = [n for n in y.notifies() if n.get("sip_Event") == "presence.winfo"]
            assert _doc(winfo[-1]) == (2, [("sip:alice@example.com", "active", "approved",
                                            "Alice <&>")])
            # alice unsubscribes: bob's list is empty again
            await y.subscribe(sip_to="<sip:bob@example.com>;tag=1342317711",
                              sip_expires="0")
            await y.fy.wait_until(lambda: len([n for n in y.notifies() if n.get(
                "sip_Event") == "presence.winfo"]) >= 4, 5, "winfo after unsubscribe")
            winfo = [n for n in y.notifies() if n.get("sip_Event") == "presence.winfo"]
            assert _doc(winfo[-1]) == (3, [])
            assert_clean(y)

    run(scenario, timeout=30)


def test_only_the_user_may_see_their_watchers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(sip_event="presence.winfo",
                                  sip_accept="application/watcherinfo+xml")
            assert r.get("code") == "403"  # alice asks for bob's list
            r = await y.subscribe(**{**WINFO, "sip_accept": "application/pidf+xml"})
            assert r.get("code") == "406"
            assert "presence.winfo" in (await y.subscribe(sip_event="nope")).get(
                "osip_Allow-Events")

    run(scenario)
