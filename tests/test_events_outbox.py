"""NOTIFYs owed are rows (the outbox): a state change, or a SUBSCRIBE's first NOTIFY, that had
not gone through when the script died is sent after the restart; one that went is not sent
again; a burst is one row; a mark made after a NOTIFY was rendered outlives that NOTIFY."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from events_e2e_harness import PIDF_OPEN, started, subscriptions_ready
from inproc_harness import running_app
from msg_e2e_harness import run

from yate_sipgen import protocol as p
from yate_sipgen.events.store import EventStore
from yate_sipgen.message import Message


def _outbox(tmp_path: Path) -> list[tuple[str, float]]:
    con = sqlite3.connect(tmp_path / "state" / "events.db")
    try:
        return con.execute("SELECT sub_id, marked FROM outbox").fetchall()
    finally:
        con.close()


async def _respawn_after_kill(y) -> None:  # noqa: ANN001 - EventsYate
    y.fy.proc.kill()  # SIGKILL: nothing is cleaned up
    await y.fy.wait_until(lambda: y.fy.spawn_count == 2 and y.fy.alive, 5)
    await y.fy.wait_installed("sip.subscribe", 10)
    await subscriptions_ready(y)


def test_a_state_change_whose_notify_was_in_flight_at_a_kill_is_sent_after_the_restart(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"min_interval": "0"}}) as y:
            hold = asyncio.Event()

            async def xsip(m):  # noqa: ANN001, ANN202
                if len(y.notifies()) >= 2 and not hold.is_set():
                    await hold.wait()  # the PUBLISH's NOTIFY: never answered before the kill
                return 200

            y.xsip = xsip
            await y.subscribe()
            await y.wait_notifies(1)
            assert (await y.publish()).get("code") == "200"
            await y.wait_notifies(2)
            assert len(_outbox(tmp_path)) == 1  # owed: its NOTIFY has no answer yet
            await _respawn_after_kill(y)
            hold.set()
            ns = await y.wait_notifies(3)
            assert ns[2].get("xsip_body") == PIDF_OPEN
            assert int(ns[2].get("sip_CSeq").split()[0]) > int(ns[1].get("sip_CSeq").split()[0])
            await y.fy.wait_until(lambda: _outbox(tmp_path) == [], 3, "outbox empty")

    run(scenario, timeout=40)


def test_a_notify_that_went_through_is_not_sent_again_after_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"min_interval": "0"}}) as y:
            await y.subscribe()
            await y.wait_notifies(1)
            await y.publish()
            await y.wait_notifies(2)
            await y.fy.wait_until(lambda: _outbox(tmp_path) == [], 3, "outbox empty")
            await _respawn_after_kill(y)
            await asyncio.sleep(0.5)
            assert len(y.notifies()) == 2

    run(scenario, timeout=40)


def test_a_burst_of_marks_is_one_row_and_a_later_mark_outlives_an_earlier_notify(
        tmp_path: Path) -> None:
    st = EventStore(str(tmp_path / "events.db"))
    st.mark_due(["a", "b"], 10.0)
    st.mark_due(["a"], 12.0)
    st.mark_due(["a"], 11.0)  # late-arriving older mark: the newest stays
    assert sorted(st.db.execute("SELECT sub_id, marked FROM outbox")) == [("a", 12.0),
                                                                          ("b", 10.0)]
    st.clear_due([("a", 11.5), ("b", 10.0)])  # a's NOTIFY was rendered before its last mark
    assert st.load_due() == {"a"}
    st.clear_due([("a", 12.0)])
    assert st.load_due() == set()
    st.mark_due(["c"], 1.0)
    st.delete_subscriptions(["c"])  # a subscription gone owes nothing
    assert st.load_due() == set()
    st.close()


EVENTS_CONF = """
[general]
state_dir={state}
timeout=10000
[message]
domains=example.com
[presence]
watchers=any
min_interval=0
"""
#: The first SUBSCRIBE and PUBLISH as Yate hands them over (the params ysipchan sets).
_REQUEST = {"antiloop": "19", "ip_host": "127.0.0.1", "ip_port": "5060", "ip_transport": "UDP",
            "sip_uri": "sip:bob@example.com", "sip_to": "<sip:bob@example.com>"}


def _subscribe(event: str = "presence", accept: str = "application/pidf+xml") -> bytes:
    return p.yate_message_line(Message("sip.subscribe", {
        **_REQUEST, "called": "bob", "caller": "w", "username": "w",
        "sip_callid": "sub1@127.0.0.1", "xsip_dlgtag": "91",
        "sip_from": "<sip:w@example.com>;tag=f1", "sip_contact": "<sip:w@127.0.0.1:5060>",
        "sip_event": event, "sip_accept": accept, "sip_expires": "3600"}),
        "0xsub.1", 1700000000)


def _publish() -> bytes:
    return p.yate_message_line(Message("sip.publish", {
        **_REQUEST, "called": "bob", "caller": "bob", "username": "bob",
        "sip_callid": "pub1@127.0.0.1", "xsip_dlgtag": "71",
        "sip_from": "<sip:bob@example.com>;tag=p1", "sip_event": "presence",
        "sip_expires": "3600", "xsip_type": "application/pidf+xml", "xsip_body": PIDF_OPEN}),
        "0xpub.1", 1700000000)


@pytest.fixture
def held_marks(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """While the returned event is clear, the store's thread holds every outbox mark
    (``mark_due``) before committing it."""
    gate = threading.Event()
    gate.set()
    mark_due = EventStore.mark_due

    def slow_mark_due(self, ids, marked):  # noqa: ANN001, ANN202 - the store's thread
        gate.wait(5)
        mark_due(self, ids, marked)

    monkeypatch.setattr(EventStore, "mark_due", slow_mark_due)
    return gate


def test_a_publish_is_answered_and_notified_only_once_the_outbox_row_is_committed(
        tmp_path: Path, held_marks: threading.Event) -> None:
    """A PUBLISH marks its watchers' NOTIFYs as owed (an outbox row). While the store's thread
    has not committed that row, neither the 200 nor the NOTIFY goes out: a kill at any point
    leaves the row for the restart to resend. (Before, both went at once and the row was
    written behind them: under CPU load the NOTIFY reached Yate before the row existed.)"""
    async def scenario() -> None:
        async with running_app(tmp_path, EVENTS_CONF) as (app, out):
            eng = app.engine
            #: ("answer", id, code), or ("notify", the outbox rows when it left)
            sent: list[tuple] = []

            async def pump(seconds: float) -> None:
                end = asyncio.get_running_loop().time() + seconds
                while asyncio.get_running_loop().time() < end:
                    for raw in b"".join(out).split(b"\n"):
                        ev = p.parse_script_line(raw) if raw else None
                        if isinstance(ev, p.Answer):
                            sent.append(("answer", ev.id, dict(ev.changes).get("code", "")))
                        elif (isinstance(ev, p.MessageReceived)
                              and ev.message.name == "xsip.generate"):
                            sent.append(("notify", _outbox(tmp_path)))
                            answer = Message("xsip.generate", {"code": "200"})
                            eng.feed(p.yate_answer_line(answer, ev.message.id, True))
                    out.clear()
                    await asyncio.sleep(0.005)

            eng.feed(_subscribe())
            await pump(0.3)
            assert [s[0] for s in sent] == ["answer", "notify"], sent
            await pump(0.2)  # the first NOTIFY's 200 settles its row
            assert _outbox(tmp_path) == []
            sent.clear()
            held_marks.clear()  # the store's thread is slow to commit the marks
            eng.feed(_publish())
            await pump(0.3)
            assert sent == [], sent  # the publication is stored, the row not yet: nothing goes
            held_marks.set()
            await pump(0.3)
            assert sorted(s[0] for s in sent) == ["answer", "notify"], sent
            assert ("answer", "0xpub.1", "200") in sent
            notify = next(s for s in sent if s[0] == "notify")
            assert len(notify[1]) == 1, sent  # the row was there when the NOTIFY left

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_new_voicemail_counts_are_reported_done_only_once_their_outbox_row_is_committed(
        tmp_path: Path, held_marks: threading.Event) -> None:
    """``sipgen mwi`` (and Yate's mwi / user.notify) set the counts: the call returns only
    when the watchers' outbox row is on disk."""
    async def scenario() -> None:
        conf = EVENTS_CONF + "[message-summary]\nwatchers=any\n"
        async with running_app(tmp_path, conf) as (app, _out):
            app.engine.feed(_subscribe("message-summary", "application/simple-message-summary"))
            for _ in range(100):  # the SUBSCRIBE answered and its first NOTIFY out
                await asyncio.sleep(0.005)
            feature = app.feature("message-summary")
            watchers = app.feature("events").table.watchers("message-summary", "bob@example.com")
            assert len(watchers) == 1
            held_marks.clear()
            setting = asyncio.ensure_future(feature.set_counts("bob@example.com", 2, 1))
            await asyncio.sleep(0.3)
            assert not setting.done()  # the row is not committed yet
            held_marks.set()
            assert await asyncio.wait_for(setting, 5) is True
            assert len(_outbox(tmp_path)) == 1

    asyncio.run(asyncio.wait_for(scenario(), 20))
