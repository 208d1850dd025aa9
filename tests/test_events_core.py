"""The sans-I/O subscription core: SUBSCRIBE header rules, the table with its expiry heap, the
NOTIFY scheduler (cap, coalescing, pacing, urgency) and the NOTIFY outcome rules."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from yate_sipgen.errors import DispatchCancelled, DispatchTimeout, LocalProtocolError
from yate_sipgen.events import notifier as nt
from yate_sipgen.events.notifier import NotifyScheduler, notify_params
from yate_sipgen.events.publication import (INITIAL, MODIFY, REFRESH, REMOVE, PublicationTable,
                                            new_etag)
from yate_sipgen.events.store import Publication
from yate_sipgen.events.subscription import (ACTIVE, TERMINATED, Reservation, SubscribeError,
                                             Subscription, SubscriptionTable, accepts,
                                             negotiate_expires, parse_event)
from yate_sipgen.message import Message


# -- Event / Expires / Accept ---------------------------------------------------------------

@pytest.mark.parametrize("value,package,eid", [
    ("presence", "presence", ""), ("Presence", "presence", ""),
    ("dialog;id=7", "dialog", "7"), ("message-summary ; id = ab.c", "message-summary", "ab.c"),
    ("presence;foo=bar;id=1", "presence", "1"),
])
def test_event_header_gives_package_and_id(value: str, package: str, eid: str) -> None:
    ev = parse_event(value)
    assert ev is not None and (ev.package, ev.id) == (package, eid)


@pytest.mark.parametrize("value", [None, "", "pres ence", "presence;id=", "presence;id=a b",
                                   "<presence>"])
def test_missing_or_malformed_event_is_none(value) -> None:
    assert parse_event(value) is None


def test_expires_absent_takes_package_default_capped_by_max() -> None:
    assert negotiate_expires(None, 3600, 60, 7200) == 3600
    assert negotiate_expires("", 3600, 60, 1800) == 1800


def test_expires_is_shortened_never_lengthened() -> None:
    assert negotiate_expires("100000", 3600, 60, 3600) == 3600
    assert negotiate_expires("120", 3600, 60, 3600) == 120


def test_expires_zero_stays_zero_and_below_min_is_423_with_min_expires() -> None:
    assert negotiate_expires("0", 3600, 60, 3600) == 0
    with pytest.raises(SubscribeError) as e:
        negotiate_expires("1", 3600, 60, 3600)
    assert e.value.code == 423 and e.value.headers == {"Min-Expires": "60"}


def test_expires_not_a_number_is_400() -> None:
    with pytest.raises(SubscribeError) as e:
        negotiate_expires("soon", 3600, 60, 3600)
    assert e.value.code == 400


@pytest.mark.parametrize("accept,expected", [
    (None, "application/pidf+xml"), ("", "application/pidf+xml"),
    ("application/pidf+xml", "application/pidf+xml"),
    ("application/*", "application/pidf+xml"), ("*/*", "application/pidf+xml"),
    ("application/xpidf+xml, application/pidf+xml;q=0.5", "application/pidf+xml"),
    ("application/xpidf+xml", None), ("application/pidf+xml;q=0", None),
])
def test_accept_picks_our_type_or_none(accept, expected) -> None:
    assert accepts(accept, ("application/pidf+xml",)) == expected


# -- the table ------------------------------------------------------------------------------

def _sub(i: int, expires_at: float, resource: str = "bob@example.com",
         package: str = "presence") -> Subscription:
    return Subscription(id=f"s{i}", package=package, event_id="", resource=resource,
                        resource_uri=f"sip:{resource}", subscriber=f"w{i}@example.com",
                        call_id=f"c{i}", local_tag=f"l{i}",
                        local_uri=f"<sip:{resource}>", remote=f"<sip:w{i}@example.com>;tag=r{i}",
                        target=f"sip:w{i}@192.0.2.1:5060", expires_at=expires_at)


def test_table_finds_by_dialog_and_resource_and_expires_in_order() -> None:
    t = SubscriptionTable()
    for i, when in enumerate([30.0, 10.0, 20.0]):
        t.add(_sub(i, when))
    assert t.find("c1", "l1", "presence", "").id == "s1"
    assert t.find("c1", "l1", "dialog", "") is None
    assert {s.id for s in t.watchers("presence", "bob@example.com")} == {"s0", "s1", "s2"}
    assert t.next_expiry() == 10.0
    assert [s.id for s in t.expired(25.0)] == ["s1", "s2"]
    assert len(t) == 1 and t.next_expiry() == 30.0


def test_refresh_moves_expiry_and_the_old_heap_entry_is_ignored() -> None:
    t = SubscriptionTable()
    s = _sub(0, 10.0)
    t.add(s)
    t.reschedule(s, 100.0)
    assert t.expired(50.0) == []
    assert t.next_expiry() == 100.0
    t.remove("s0")
    assert t.next_expiry() is None and t.watchers("presence", "bob@example.com") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "refresh", "remove", "expire"]),
                          st.integers(0, 5), st.integers(0, 100)), max_size=60))
def test_table_expiry_matches_a_plain_model(ops) -> None:
    t = SubscriptionTable()
    model: dict[str, float] = {}
    for op, i, when in ops:
        sid = f"s{i}"
        if op == "add":
            t.add(_sub(i, float(when)))
            model[sid] = float(when)
        elif op == "refresh" and sid in model:
            t.reschedule(t.get(sid), float(when))
            model[sid] = float(when)
        elif op == "remove":
            t.remove(sid)
            model.pop(sid, None)
        elif op == "expire":
            gone = {s.id for s in t.expired(float(when))}
            assert gone == {k for k, v in model.items() if v <= when}
            for k in gone:
                del model[k]
        assert set(t.by_id) == set(model)
        assert t.next_expiry() == (min(model.values()) if model else None)


def test_reservation_saves_a_mark_only_per_block_and_restart_continues_above_it() -> None:
    r = Reservation(block=10)
    s = _sub(0, 1.0)
    seen = [r.next_cseq(s) for _ in range(25)]
    assert seen == list(range(1, 26))
    assert s.cseq_mark >= 25 and s.id in r.pending
    # after a restart the store gives cseq = mark: the next one is above anything handed out
    s2 = _sub(0, 1.0)
    s2.cseq = s2.cseq_mark = s.cseq_mark
    assert r.next_cseq(s2) > max(seen)


# -- the NOTIFY scheduler -------------------------------------------------------------------

def test_cap_bounds_notifies_in_flight_and_urgent_go_first() -> None:
    s = NotifyScheduler(max_in_flight=2)
    for i in range(5):
        s.mark(f"n{i}", 0.0)
    s.mark("u", 0.0, urgent=True)
    first = s.take(0.0)
    assert first == ["u", "n0"]
    assert s.take(0.0) == []  # cap reached
    s.done("u", 0.1)
    assert s.take(0.1) == ["n1"]


def test_marks_while_queued_or_in_flight_coalesce_into_one_more_notify() -> None:
    s = NotifyScheduler(max_in_flight=10)
    s.mark("a", 0.0)
    s.mark("a", 0.0)
    assert s.take(0.0) == ["a"]
    s.mark("a", 0.1)
    s.mark("a", 0.2)
    s.mark("a", 0.3)
    assert s.take(0.3) == []  # one subscription never has two NOTIFYs in flight
    s.done("a", 0.4)
    assert s.take(0.4) == ["a"]
    s.done("a", 0.5)
    assert s.take(0.5) == [] and len(s) == 0


def test_state_changes_are_paced_but_urgent_ones_are_not() -> None:
    s = NotifyScheduler()
    s.mark("a", 0.0, urgent=True, interval=5.0)
    assert s.take(0.0) == ["a"]
    s.done("a", 0.0, interval=5.0)
    s.mark("a", 1.0, interval=5.0)
    assert s.take(1.0) == [] and s.next_wakeup() == 5.0
    s.mark("a", 2.0, interval=5.0)  # coalesces with the paced one
    assert s.take(4.9) == []
    assert s.take(5.0) == ["a"]
    s.done("a", 5.0, interval=5.0)
    s.mark("a", 6.0, urgent=True, interval=5.0)
    assert s.take(6.0) == ["a"]


class SchedulerMachine(RuleBasedStateMachine):
    """Every operation in every state: the cap holds, nothing is in flight twice, a mark is
    never lost (it is queued, paced or in flight until taken and done)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = NotifyScheduler(max_in_flight=3)
        self.now = 0.0
        self.owed: set[str] = set()  # marked since its last take

    @rule(sid=st.sampled_from("abcde"), urgent=st.booleans(), interval=st.sampled_from([0, 5]))
    def mark(self, sid, urgent, interval) -> None:
        self.s.mark(sid, self.now, urgent=urgent, interval=float(interval))
        self.owed.add(sid)

    @rule()
    def take(self) -> None:
        for sid in self.s.take(self.now):
            self.owed.discard(sid)

    @precondition(lambda self: self.s.in_flight)
    @rule(data=st.data())
    def done(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.s.in_flight)))
        self.s.done(sid, self.now, interval=5.0)

    @rule(dt=st.sampled_from([0.0, 1.0, 6.0]))
    def tick(self, dt) -> None:
        self.now += dt

    @invariant()
    def cap_holds(self) -> None:
        assert len(self.s.in_flight) <= 3

    @invariant()
    def nothing_owed_is_lost(self) -> None:
        for sid in self.owed:
            assert (sid in self.s._queued or sid in self.s._due or sid in self.s._again
                    or sid in self.s.in_flight), sid


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("code,error,fails,expected", [
    (200, "", 0, nt.OK), (202, "", 0, nt.OK),
    *[(c, "", 0, nt.REMOVE) for c in (404, 405, 410, 416, 480, 481, 482, 483, 484, 485, 489,
                                      501, 604, 408)],
    *[(c, "", 0, nt.KEEP) for c in (401, 407, 491, 500, 503)],
    (0, "notransport", 0, nt.RETRY), (0, "noconn", 2, nt.RETRY), (0, "noconn", 3, nt.REMOVE),
])
def test_notify_outcome_follows_rfc_6665_and_5057(code, error, fails, expected) -> None:
    assert nt.outcome(code, error, fails) == expected


def test_notify_is_a_dialog_request_with_route_and_next_hop() -> None:
    sub = _sub(1, 1000.0)
    sub.route = "<sip:proxy.example.com;lr>, <sip:edge.example.com;lr>"
    sub.host, sub.port = "proxy.example.com", "5060"
    sub.event_id = "9"
    p = notify_params(sub, 400.0, 5, "application/pidf+xml", "<x/>", "<sip:bob@example.com>")
    assert p["method"] == "NOTIFY" and p["uri"] == sub.target and p["wait"] == "true"
    assert p["sip_From"] == "<sip:bob@example.com>;tag=l1"
    assert p["sip_To"] == sub.remote and p["sip_Call-ID"] == "c1"
    assert p["sip_CSeq"] == "5 NOTIFY" and p["sip_Event"] == "presence;id=9"
    assert p["sip_Subscription-State"] == "active;expires=600"
    assert p["sip_Route"] == sub.route and (p["host"], p["port"]) == ("proxy.example.com", "5060")
    sub.state, sub.reason = TERMINATED, "timeout"
    assert notify_params(sub, 400.0, 6, "x/y", "", "")["sip_Subscription-State"] == \
        "terminated;reason=timeout"


# -- publications -------------------------------------------------------------------------

def test_publish_operations_follow_rfc_3903_table() -> None:
    t = PublicationTable()
    assert t.plan("presence", "bob@x", "", True, 60) == (INITIAL, None)
    with pytest.raises(SubscribeError) as e:
        t.plan("presence", "bob@x", "", False, 60)
    assert e.value.code == 400
    pub = Publication(new_etag(), "presence", "bob@x", "application/pidf+xml", "<p/>", 60.0, 0.0)
    t.add(pub)
    assert t.plan("presence", "bob@x", pub.etag, False, 60) == (REFRESH, pub)
    assert t.plan("presence", "bob@x", pub.etag, True, 60) == (MODIFY, pub)
    assert t.plan("presence", "bob@x", pub.etag, False, 0) == (REMOVE, pub)
    for bad in ("nope", pub.etag + "x"):
        with pytest.raises(SubscribeError) as e:
            t.plan("presence", "bob@x", bad, True, 60)
        assert e.value.code == 412
    with pytest.raises(SubscribeError):  # an ETag of another presentity is no match
        t.plan("presence", "carol@x", pub.etag, True, 60)


def test_etags_are_random_and_distinct() -> None:
    tags = {new_etag() for _ in range(1000)}
    assert len(tags) == 1000 and all(len(t) >= 16 for t in tags)


def test_state_header_carries_remaining_expires() -> None:
    s = _sub(0, 1000.0)
    assert s.state_header(100.0) == "active;expires=900"
    s.state = "pending"
    assert s.state_header(999.8) == "pending;expires=0"
    assert ACTIVE == "active"


# -- sending one NOTIFY ---------------------------------------------------------------------

class _Engine:
    """An engine whose dispatch raises or answers what it is told (no Yate)."""

    def __init__(self, result: object) -> None:
        self.result = result
        self.sent: list[object] = []

    async def dispatch(self, msg: object, timeout: float) -> object:
        self.sent.append(msg)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.mark.parametrize("result,expected,verdict", [
    (LocalProtocolError("line too long"), (500, ""), nt.KEEP),
    (DispatchTimeout("xsip.generate"), (408, ""), nt.REMOVE),
    (DispatchCancelled("gone"), (0, "noconn"), nt.RETRY),
    (Message("xsip.generate", {"code": "481"}), (481, ""), nt.REMOVE),
    (Message("xsip.generate", {"code": "200"}), (200, ""), nt.OK),
    (Message("xsip.generate", {"error": "notransport"}), (0, "notransport"), nt.RETRY),
])
def test_dispatch_notify_gives_what_outcome_takes_for_every_way_a_send_ends(
        result: object, expected: tuple[int, str], verdict: str, caplog) -> None:
    engine = _Engine(result)
    got = asyncio.run(nt.dispatch_notify(engine, {"method": "NOTIFY", "uri": "sip:w@h"}, 5))
    assert got == expected and len(engine.sent) == 1
    assert nt.outcome(*got, transport_failures=0) == verdict
    if isinstance(result, LocalProtocolError):  # our own line: said in the log, with where
        assert "sip:w@h" in caplog.text and "line too long" in caplog.text
