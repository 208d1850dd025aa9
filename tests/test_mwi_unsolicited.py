"""Unsolicited message-summary NOTIFYs (``[message-summary] unsolicited``), end to end.

Phones that never SUBSCRIBE to their mailbox (Polycom, Cisco, Yealink set up for it) get the
lamp as an out-of-dialog NOTIFY to each registered contact: after a REGISTER when there is
something to tell, and when the counts change; never when the user has a subscription of their
own, always through the core's NOTIFY queue, never retried.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from events_e2e_harness import EventsYate, started
from msg_e2e_harness import run

ON = {"message-summary": {"unsolicited": "true"}}
CONTACT = "sip:bob@192.0.2.20:5062"
VIA = {"ip_host": "198.51.100.4", "ip_port": "40000", "ip_transport": "UDP"}


def unsolicited(y: EventsYate) -> list:
    return [n for n in y.notifies() if n.get("sip_Subscription-State") == "terminated"
            and n.get("sip_Event") == "message-summary"]


async def quiet(y: EventsYate) -> None:
    """Long enough for anything queued to have gone out."""
    await y.settle()
    await asyncio.sleep(0.3)


def test_off_by_default_nothing_is_sent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            await y.command("sipgen mwi bob@example.com 2 1")
            await y.register("bob", "example.com", CONTACT, **VIA)
            await y.command("sipgen mwi bob@example.com 3 1")
            await quiet(y)
            assert y.notifies() == []
            assert "mwi_unsolicited_sent" not in await y.status()

    run(scenario)


def test_register_with_known_counts_gets_one_out_of_dialog_notify(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, ON) as y:
            await y.command("sipgen mwi bob@example.com 2 1")  # nobody registered: nothing
            await quiet(y)
            assert y.notifies() == []
            await y.register("bob", "example.com", CONTACT, **VIA)
            (n,) = await y.wait_notifies(1)
            assert n.get("method") == "NOTIFY" and n.get("wait") == "true"
            assert n.get("uri") == CONTACT
            assert n.get("sip_To") == "<sip:bob@example.com>"
            frm = n.get("sip_From")
            assert frm.startswith("<sip:bob@example.com>;tag=") and len(frm) > 28
            assert n.get("sip_Event") == "message-summary"
            assert n.get("sip_Subscription-State") == "terminated"
            assert n.get("sip_CSeq") == "1 NOTIFY"
            assert n.get("sip_Call-ID", "").endswith("@example.com")
            assert n.get("xsip_type") == "application/simple-message-summary"
            assert n.get("xsip_body") == ("Messages-Waiting: yes\r\n"
                                          "Message-Account: sip:bob@example.com\r\n"
                                          "Voice-Message: 2/1\r\n")
            # UDP: the next hop is where the REGISTER came from (NAT), no connection named
            assert (n.get("host"), n.get("port")) == ("198.51.100.4", "40000")
            assert n.get("connection_id") is None
            # a re-REGISTER (or a phone that rebooted) gets the lamp again, a new Call-ID
            await y.register("bob", "example.com", CONTACT, **VIA)
            ns = await y.wait_notifies(2)
            assert ns[1].get("sip_Call-ID") != n.get("sip_Call-ID")
            assert ns[1].get("sip_From") != frm  # a fresh tag
            status = await y.status()
            assert status["mwi_unsolicited_sent"] == "2"
            assert status["mwi.unsolicited_sent"] == "2"

    run(scenario)


def test_register_without_anything_to_tell_sends_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, ON) as y:
            await y.register("bob", "example.com", CONTACT, **VIA)
            await y.register("bob", "example.com", CONTACT, handled=False)  # Yate refused it
            await quiet(y)
            assert y.notifies() == []

    run(scenario)


def test_stored_instant_messages_alone_are_worth_a_notify(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, ON) as y:
            y.xsip = lambda m: 480 if m.get("method") == "MESSAGE" else 200  # stays stored
            r = await y.message()  # bob is offline: stored, 202
            assert r.get("code") == "202"
            await y.register("bob", "example.com", CONTACT, **VIA)
            (n,) = await y.wait_notifies(1)
            body = n.get("xsip_body")
            assert body.startswith("Messages-Waiting: yes\r\n") and "Text-Message: 1/0" in body

    run(scenario)


def test_a_subscriber_gets_only_its_in_dialog_notify(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, ON) as y:
            r = await y.subscribe(sip_event="message-summary", sip_uri="sip:*97@example.com",
                                  sip_to="<sip:*97@example.com>",
                                  sip_accept="application/simple-message-summary")
            assert r.get("code") == "200"
            await y.wait_notifies(1)
            await y.register("alice", "example.com", "sip:alice@192.0.2.7:5080")
            await y.command("sipgen mwi alice@example.com 1 0")
            ns = await y.wait_notifies(2)
            await quiet(y)
            assert len(y.notifies()) == 2 and unsolicited(y) == []
            assert ns[1].get("sip_Call-ID") == "sub-call-1@192.0.2.7"  # the dialog's
            assert ns[1].get("sip_Subscription-State").startswith("active;expires=")
            assert "Voice-Message: 1/0" in ns[1].get("xsip_body")

    run(scenario)


def test_count_changes_reach_every_registered_contact(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, ON) as y:
            await y.register("bob", "example.com", CONTACT, **VIA)
            await y.register("bob", "example.com", "sip:bob@192.0.2.21:5070;transport=tcp",
                             oconnection_id="tcp:7-192.0.2.21", ip_host="192.0.2.21",
                             ip_port="5070", ip_transport="TCP")
            await quiet(y)
            assert y.notifies() == []  # no counts yet
            # Yate's mwi message (what its subscription module consumes)
            await y.fy.watch_notify("mwi", [("operation", "notify"), ("notifier", "bob"),
                                            ("message-summary.voicenew", "1"),
                                            ("message-summary.voiceold", "4")])
            ns = await y.wait_notifies(2)
            by_uri = {n.get("uri"): n for n in ns}
            assert set(by_uri) == {CONTACT, "sip:bob@192.0.2.21:5070;transport=tcp"}
            tcp = by_uri["sip:bob@192.0.2.21:5070;transport=tcp"]
            assert tcp.get("connection_id") == "tcp:7-192.0.2.21" and tcp.get("host") is None
            assert all("Voice-Message: 1/4" in n.get("xsip_body") for n in ns)
            # user.notify from register.cpp, then the console
            await y.fy.watch_notify("user.notify", [("user", "bob"), ("domain", "example.com"),
                                                    ("voicenew", "0"), ("voiceold", "5")])
            ns = await y.wait_notifies(4)
            assert all(n.get("xsip_body").startswith("Messages-Waiting: no\r\n")
                       for n in ns[2:])
            out = await y.command("sipgen mwi bob@example.com 3 5")
            assert "0 subscriber(s) notified" in out
            ns = await y.wait_notifies(6)
            assert all("Voice-Message: 3/5" in n.get("xsip_body") for n in ns[4:])
            await y.command("sipgen mwi bob@example.com 3 5")  # unchanged: nothing
            await quiet(y)
            assert len(y.notifies()) == 6

    run(scenario)


def test_works_with_the_message_feature_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        sections = dict(ON, message={"enable": "false"})
        async with started(tmp_path, sections) as y:
            await y.command("sipgen mwi bob@example.com 1 0")
            await y.register("bob", "example.com", CONTACT, **VIA)
            (n,) = await y.wait_notifies(1)
            assert n.get("uri") == CONTACT
            # one observation of Yate's registrations, for presence and MWI alike
            assert y.fy.lines_from_script().count(b"%%>watch:user.register") == 1

    run(scenario)


def test_a_failure_is_counted_and_not_retried(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, ON) as y:
            y.xsip = lambda m: 408 if m.get("method") == "NOTIFY" else 200
            await y.command("sipgen mwi bob@example.com 1 0")
            await y.register("bob", "example.com", CONTACT, **VIA)
            await y.wait_notifies(1)
            await asyncio.sleep(2.5)  # past the first transport retry of a subscription
            assert len(y.notifies()) == 1
            status = await y.status()
            assert status["mwi.unsolicited_failed"] == "1"
            assert status["mwi_unsolicited_sent"] == "0"

    run(scenario)


def test_unusable_values_never_reach_a_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        sections = {"message-summary": {"unsolicited": "true",
                                        "account": "sip:${user}@vm.example.com"}}
        async with started(tmp_path, sections) as y:
            await y.command("sipgen mwi bob@example.com 1 0")
            # a Contact Yate passed on that cannot stand between < and >
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062>;evil=<x")
            await y.register("bob", "example.com", 'sip:"bob"@192.0.2.20')
            # a user name that makes no URI (counts from register.cpp's user.notify)
            await y.fy.watch_notify("user.notify", [("user", "car ol"), ("domain", "example.com"),
                                                    ("voicenew", "1"), ("voiceold", "0")])
            await quiet(y)
            await y.register("car ol", "example.com", "sip:carol@192.0.2.30")
            await quiet(y)
            assert y.notifies() == []
            assert (await y.status())["mwi.unsolicited_invalid"] == "3"
            # the Message-Account template is the notifier identity
            await y.register("bob", "example.com", CONTACT)
            (n,) = await y.wait_notifies(1)
            assert n.get("sip_From").startswith("<sip:bob@vm.example.com>;tag=")
            assert "Message-Account: sip:bob@vm.example.com\r\n" in n.get("xsip_body")
            assert (n.get("host"), n.get("port")) == (None, None)  # no source: the URI's

    run(scenario)


def test_the_core_cap_on_notifies_in_flight_applies(tmp_path: Path) -> None:
    async def scenario() -> None:
        sections = dict(ON, events={"max_in_flight": "1"})
        async with started(tmp_path, sections) as y:
            release = asyncio.Event()

            async def xsip(m):
                if m.get("sip_Subscription-State", "").startswith("active"):
                    await release.wait()  # a subscriber's NOTIFY holds the only slot
                return 200

            y.xsip = xsip
            await y.subscribe()  # alice watches bob's presence
            await y.wait_notifies(1)
            await y.command("sipgen mwi bob@example.com 1 0")
            await y.register("bob", "example.com", CONTACT, **VIA)
            await y.command("sipgen mwi bob@example.com 2 0")  # coalesces with the first
            await quiet(y)
            assert unsolicited(y) == [] and y.xsip_max_active == 1
            release.set()
            await y.fy.wait_until(lambda: unsolicited(y), 5, "the unsolicited NOTIFY")
            await quiet(y)
            (n,) = unsolicited(y)
            assert "Voice-Message: 2/0" in n.get("xsip_body")  # the state when it went

    run(scenario)


# -- the pieces, without the script ------------------------------------------------------------

def test_registrations_tell_listeners_list_bindings_and_are_observed_once() -> None:
    from yate_sipgen.features.registrations import Binding, Registrations
    from yate_sipgen.message import Message

    class Engine:
        def __init__(self) -> None:
            self.watchers: dict[str, list] = {}

        def watcher(self, name: str):
            return lambda f: self.watchers.setdefault(name, []).append(f) or f

    t = [1000.0]
    regs = Registrations(lambda u, h: f"{u}@{h}", lambda: t[0])
    heard: list[tuple[str, Binding]] = []
    regs.listen(lambda k, b: heard.append((k, b)))
    regs.listen(lambda k, b: 1 / 0)  # a failing listener stops neither the others nor the table

    def reg(contact: str, expires: str = "300", **extra: str) -> Message:
        m = Message("user.register", {"username": "bob", "sip_uri": "sip:example.com",
                                      "data": "sip/" + contact, "expires": expires, **extra})
        m.handled = True
        return m

    regs.registered(reg("sip:bob@192.0.2.1:5060", ip_host="198.51.100.4", ip_port="4000",
                        ip_transport="udp"))
    regs.registered(reg("sip:bob@192.0.2.2:5060", expires="60", oconnection_id="tcp:1",
                        ip_transport="TCP"))
    regs.registered(reg("sip:bob@192.0.2.3:5060", expires="0"))  # ends nothing, told nobody
    assert [k for k, _ in heard] == ["bob@example.com"] * 2
    assert heard[0][1] == Binding(heard[0][1].target, "198.51.100.4", "4000", "UDP")
    assert heard[1][1].target.connection_id == "tcp:1" and heard[1][1].transport == "TCP"
    assert [b.target.uri for b in regs.bindings("bob@example.com")] == [
        "sip:bob@192.0.2.1:5060", "sip:bob@192.0.2.2:5060"]
    assert regs.target("bob@example.com") is None  # two phones: Yate's routing forks
    t[0] += 61  # the second expired
    assert [b.target.uri for b in regs.bindings("bob@example.com")] == ["sip:bob@192.0.2.1:5060"]
    assert regs.bindings("carol@example.com") == []
    # fed by the engine's watches only when nobody feeds it already
    engine = Engine()
    engine.watcher("user.unregister")(regs.unregistered)  # what the MESSAGE feature does
    regs.observe(engine)
    assert len(engine.watchers["user.unregister"]) == 1 and "user.register" not in engine.watchers
    other = Engine()
    regs.observe(other)
    assert other.watchers == {"user.register": [regs.registered],
                              "user.unregister": [regs.unregistered]}


def test_scheduler_jobs_share_the_cap_coalesce_and_leave_nothing_behind() -> None:
    from yate_sipgen.events.notifier import NotifyScheduler, unsolicited_params

    sched = NotifyScheduler(max_in_flight=2)
    ran: list[str] = []

    def job(name: str):
        async def run() -> None:
            ran.append(name)
        return run

    sched.mark("sub1", 0.0)
    sched.mark_job("mwi:a", job("a1"), 0.0)
    sched.mark_job("mwi:a", job("a2"), 0.0)  # queued still: one NOTIFY, the newest job
    sched.mark_job("mwi:b", job("b"), 0.0)
    assert len(sched) == 3
    first = sched.take(1.0)
    assert first == ["sub1", "mwi:a"]  # the cap counts jobs and subscriptions alike
    asyncio.run(sched.run_job("mwi:a"))
    assert ran == ["a2"] and "mwi:a" not in sched.jobs and "mwi:a" not in sched._last
    assert sched.take(1.0) == ["mwi:b"]
    sched.mark_job("mwi:b", job("b2"), 1.0)  # while in flight: once more afterwards
    asyncio.run(sched.run_job("mwi:b"))
    assert sched.take(2.0) == ["mwi:b"]
    asyncio.run(sched.run_job("mwi:b"))
    assert ran == ["a2", "b2", "b2"] and sched.jobs == {} and len(sched) == 0

    async def boom() -> None:
        raise RuntimeError("x")

    sched.mark_job("mwi:c", boom, 3.0)
    assert sched.take(3.0) == ["mwi:c"]
    asyncio.run(sched.run_job("mwi:c"))  # logged, never retried
    assert sched.jobs == {} and sched.take(4.0) == []

    p = unsolicited_params(event="message-summary", uri="sip:bob@192.0.2.1:5060",
                           to_uri="sip:bob@example.com", from_uri="sip:bob@example.com",
                           from_tag="t1", call_id="c1@example.com",
                           content_type="application/simple-message-summary",
                           body="Messages-Waiting: no\r\n", host="198.51.100.4", port="4000",
                           trans_count=2)
    assert p == {"method": "NOTIFY", "uri": "sip:bob@192.0.2.1:5060", "wait": "true",
                 "sip_From": "<sip:bob@example.com>;tag=t1", "sip_To": "<sip:bob@example.com>",
                 "sip_Call-ID": "c1@example.com", "sip_CSeq": "1 NOTIFY",
                 "sip_Event": "message-summary", "sip_Subscription-State": "terminated",
                 "host": "198.51.100.4", "port": "4000", "xsip_trans_count": "2",
                 "xsip_type": "application/simple-message-summary",
                 "xsip_body": "Messages-Waiting: no\r\n"}
