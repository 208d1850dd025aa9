"""NOTIFYs owed are rows (the outbox): a state change, or a SUBSCRIBE's first NOTIFY, that had
not gone through when the script died is sent after the restart; one that went is not sent
again; a burst is one row; a mark made after a NOTIFY was rendered outlives that NOTIFY."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from events_e2e_harness import PIDF_OPEN, started, subscriptions_ready
from msg_e2e_harness import run

from yate_sipgen.events.store import EventStore


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
