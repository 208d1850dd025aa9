"""Unit tests of the pure pieces behind SIP MESSAGE (issue 3): routing answers, RFC 3261 §16.7,
SIP helpers, the SQLite store (two instances on one file, leases, order, expiry) and the
Deliverer's sending and store-and-forward runs against a scripted engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from yate_sipgen.errors import DispatchCancelled, DispatchTimeout, LineTooLong
from yate_sipgen.features.delivery import (STORE_WORTHY, Deliverer, Outgoing, Route, Target,
                                           _code_of, best_failure, parse_route)
from yate_sipgen.features.message import MessageFeature
from yate_sipgen.message import Message
from yate_sipgen.sip import (HeaderValueError, format_name_addr, header_param, header_safe,
                             http_date, media_type, parse_name_addr, parse_uri, quote_display)
from yate_sipgen.store import AsyncStore, SQLiteMessageStore, StoredMessage, StoreLimit


def answer(retval: str = "", handled: bool = True, **params: str) -> Message:
    m = Message("call.route", {k.replace("__", "."): v for k, v in params.items()}, retval)
    m.handled = handled
    return m


# ==========================================================================
# parse_route: each backend's real answers (reference §3.8, §6)
# ==========================================================================


def test_parse_route_sip_target_takes_oconnection_id_and_nothing_else() -> None:
    r = parse_route(answer("sip/sip:bob@192.0.2.1:5062", oconnection_id="tcp:4-x",
                           driver="sip", password="callers-secret"))
    assert r.targets == [Target("sip/sip:bob@192.0.2.1:5062", "tcp:4-x")]
    assert r.targets[0].is_sip and r.targets[0].uri == "sip:bob@192.0.2.1:5062"
    assert r.code == 0 and not r.offline


def test_parse_route_gives_one_route_per_target_and_connection_however_often_asked() -> None:
    """Yate's routing answers the same target again and again: parse_route keeps the Route,
    and a different connection (or target) is a different one."""
    a = parse_route(answer("sip/sip:bob@192.0.2.1:5062", oconnection_id="tcp:4-x"))
    b = parse_route(answer("sip/sip:bob@192.0.2.1:5062", oconnection_id="tcp:4-x", x="1"))
    c = parse_route(answer("sip/sip:bob@192.0.2.1:5062", oconnection_id="tcp:5-y"))
    d = parse_route(answer("sip/sip:carol@192.0.2.1:5062", oconnection_id="tcp:4-x"))
    assert a is b and a == Route([Target("sip/sip:bob@192.0.2.1:5062", "tcp:4-x")])
    assert c.targets == [Target("sip/sip:bob@192.0.2.1:5062", "tcp:5-y")]
    assert d.targets == [Target("sip/sip:carol@192.0.2.1:5062", "tcp:4-x")]
    assert not parse_route(answer("sip/sip:bob@192.0.2.1:5062", handled=False)).targets


def test_parse_route_fork_targets_in_numeric_order_without_group_separators() -> None:
    r = parse_route(answer("fork", callto__10="sip/sip:c@x", callto__2="sip/sip:b@x",
                           callto__1="sip/sip:a@x", callto__3="|", callto__4="|next=5000",
                           callto__5="", other="sip/sip:no@x"))
    assert [t.callto for t in r.targets] == ["sip/sip:a@x", "sip/sip:b@x", "sip/sip:c@x"]
    assert all(t.connection_id == "" for t in r.targets)


def test_parse_route_fork_without_targets_is_not_found() -> None:
    assert parse_route(answer("fork")) == Route([], 404)


@pytest.mark.parametrize("ans", [
    answer("", handled=False, error="offline"),  # live regfile (reference §6)
    answer("-", handled=True, error="offline"),
    answer("-", handled=False, error="offline"),
    answer("", handled=True, reason="offline"),
], ids=["unhandled", "handled-dash", "unhandled-dash", "reason"])
def test_parse_route_known_but_offline_is_worth_storing(ans: Message) -> None:
    assert parse_route(ans) == Route([], 480, offline=True)


def test_parse_route_unknown_user_unhandled_without_error_is_404() -> None:
    assert parse_route(answer("", handled=False)) == Route([], 404)
    assert parse_route(answer("-", handled=True)) == Route([], 404)
    assert parse_route(answer("error", handled=True)) == Route([], 404)


@pytest.mark.parametrize("error,code", [("noroute", 404), ("forbidden", 403), ("busy", 486),
                                        ("486", 486), ("603", 603), ("100", 404),
                                        ("800", 404), ("whatever", 404), ("congestion", 503)])
def test_parse_route_error_names_and_codes_become_sip_codes(error: str, code: int) -> None:
    assert parse_route(answer("", handled=False, error=error)) == Route([], code)


def test_parse_route_non_sip_target_is_one_target_for_msg_execute() -> None:
    r = parse_route(answer("jabber/bob@j.example"))
    assert r.targets == [Target("jabber/bob@j.example")]
    assert not r.targets[0].is_sip and r.targets[0].uri == ""


# ==========================================================================
# best_failure: RFC 3261 §16.7
# ==========================================================================


@pytest.mark.parametrize("codes,want", [
    ([], 480),
    ([486, 603, 404], 603),
    ([404, 500, 486], 404),
    ([500, 486], 486),
    ([503], 500),
    ([503, 502], 500),
    ([502, 503], 502),
    ([480, 408], 480),
    ([302, 486], 302),
    ([600, 603], 600),
])
def test_best_failure_follows_rfc3261_16_7(codes: list[int], want: int) -> None:
    assert best_failure(codes) == want


# ==========================================================================
# the xsip.generate answer, and the answer to the sender
# ==========================================================================


def _gen_answer(handled: bool = True, **params: str) -> Message:
    m = Message("xsip.generate", params)
    m.handled = handled
    return m


@pytest.mark.parametrize("ans,code", [
    (_gen_answer(code="200"), 200),
    (_gen_answer(code="408"), 408),
    (_gen_answer(error="offline"), 0),
    (_gen_answer(error="notransport"), 0),
    (_gen_answer(error="noconn"), 0),
    (_gen_answer(error="looping"), 483),
    (_gen_answer(error="failure"), 500),
    (_gen_answer(handled=False), 500),
    (_gen_answer(), 0),
])
def test_code_of_xsip_generate_answers(ans: Message, code: int) -> None:
    assert _code_of(ans) == code


@pytest.mark.parametrize("code,want", [(-1, 480), (0, 480), (401, 500), (407, 500), (300, 480),
                                       (302, 480), (399, 480), (503, 480), (504, 408),
                                       (408, 408), (404, 404), (486, 486), (500, 500),
                                       (603, 603)])
def test_failure_code_maps_what_cannot_be_relayed_faithfully(code: int, want: int) -> None:
    assert MessageFeature._failure_code(code, Route([])) == want


def test_store_worthy_failures_are_offline_unreachable_and_timeouts() -> None:
    assert STORE_WORTHY == {0, 408, 480, 500, 503, 504}


# ==========================================================================
# SIP helpers
# ==========================================================================


def test_parse_uri_variants() -> None:
    u = parse_uri("<sip:Bob@Example.COM:5062;transport=tcp>")
    assert (u.scheme, u.user, u.host, u.port, u.params) == ("sip", "Bob", "example.com", 5062,
                                                            ";transport=tcp")
    assert u.aor == "Bob@example.com"
    assert parse_uri("sip:example.com").user == "" and parse_uri("sip:example.com").aor == "example.com"
    assert parse_uri("sips:alice@[2001:db8::1]:5061").host == "2001:db8::1"
    assert str(parse_uri("sips:alice@[2001:db8::1]:5061")) == "sips:alice@[2001:db8::1]:5061"
    assert parse_uri("sip:bob@host?subject=x").host == "host"
    for bad in ("", "http://x", "sip:", "sip:bob@", "sip:bob@host:0", "sip:bob@host:70000",
                "<sip:bob@host", "sip:bob@ho st", "sip:b\r\nob@host"):
        assert parse_uri(bad) is None, bad


@pytest.mark.parametrize("text,display,user,tag", [
    ('"Alice A" <sip:alice@a.example>;tag=123', "Alice A", "alice", "123"),
    (r'"Al \"the\" \\ B" <sip:alice@a.example>', 'Al "the" \\ B', "alice", ""),
    ("Alice Smith <sip:alice@a.example> ;tag=x", "Alice Smith", "alice", "x"),
    ("<sip:alice@a.example;transport=tcp>;TAG=9", "", "alice", "9"),
    ("sip:alice@a.example;tag=5", "", "alice", "5"),
])
def test_parse_name_addr_variants(text: str, display: str, user: str, tag: str) -> None:
    na = parse_name_addr(text)
    assert na is not None
    assert (na.display, na.uri.user, na.tag) == (display, user, tag)


@pytest.mark.parametrize("bad", ['"unterminated <sip:a@b>', '"a"b" <sip:a@b>', "<sip:a@b",
                                 "garbage", ""])
def test_parse_name_addr_refuses_garbage(bad: str) -> None:
    assert parse_name_addr(bad) is None


def test_parse_name_addr_allows_angle_bracket_inside_a_quoted_display_name_fast_path() -> None:
    na = parse_name_addr('"a<b" <sip:alice@a.example>;tag=1')
    assert na is not None and na.display == "a<b" and na.uri.user == "alice"


def test_parse_name_addr_allows_angle_bracket_inside_a_quoted_display_name() -> None:
    na = parse_name_addr('"a<b" <sip:alice@a.example;transport=tcp>;tag=1')
    assert na is not None and na.display == "a<b" and na.uri.user == "alice"


def test_quote_display_escapes_quote_and_backslash_and_drops_controls() -> None:
    assert quote_display('Al "the" \\ B') == r'"Al \"the\" \\ B"'
    assert quote_display("tab\there") == '"tab here"'
    assert quote_display("evil\r\nVia: x") == '"evilVia: x"'
    # a round trip through the parser gives the display name back
    for name in ('Al "the" \\ B', "plain", 'x\\"y', "\\"):
        assert parse_name_addr(format_name_addr("sip:a@b", name)).display == name


def test_format_name_addr_and_header_safe_refuse_injection() -> None:
    assert format_name_addr("sip:a@b") == "<sip:a@b>"
    assert format_name_addr("sip:a@b", "A", tag="t1") == '"A" <sip:a@b>;tag=t1'
    with pytest.raises(HeaderValueError):
        format_name_addr("sip:a@b\r\nX: y")
    with pytest.raises(HeaderValueError):
        header_safe("text/plain\r\nX-Evil: 1")
    assert header_safe("text/plain;\tcharset=utf-8") == "text/plain;\tcharset=utf-8"


def test_header_param_allows_whitespace_around_the_equals_sign() -> None:
    assert header_param("<sip:b@x>; TAG = abc ", "tag") == "abc"


def test_header_param_media_type_and_http_date() -> None:
    assert header_param("<sip:b@x>;tag=abc", "tag") == "abc"
    assert header_param("<sip:b@x>; TAG=abc ", "tag") == "abc"
    assert header_param("<sip:b@x>", "tag") is None
    assert media_type("Text/Plain ; Charset=UTF-8") == "text/plain"
    assert media_type("") == ""
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


# ==========================================================================
# the SQLite store
# ==========================================================================


def msg(user: str = "bob@example.com", body: str = "hi", **kw: Any) -> StoredMessage:
    d: dict[str, Any] = dict(user=user, sender="alice@example.com",
                             from_hdr='"Alice" <sip:alice@example.com>',
                             to_hdr=f"<sip:{user}>", content_type="text/plain", body=body,
                             call_id="c@x", from_tag="t", received=1000.0, expires=1e12)
    d.update(kw)
    return StoredMessage(**d)


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "sub" / "messages.db")


def test_store_add_list_count_delete_and_round_trip_of_every_field(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    body = "bin \udcff\udcfe é :%\r\n"  # non-UTF-8 bytes as surrogate escapes
    m = msg(body=body, body_encoding="base64", extra={"xsip_body.1": "x\udc80"},
            notify_sender=True, attempts=2, next_try=5.0)
    i = s.add(m)
    assert i == m.id and i > 0
    (got,) = s.list()
    assert got == m
    assert s.count() == 1 and s.count("bob@example.com") == 1 and s.count("x@y") == 0
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.delete(i)
    assert s.list() == [] and s.count() == 0
    s.close()


def test_store_add_within_refuses_at_either_limit_and_writes_nothing(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    s.add_within(msg(), max_per_user=2, max_total=3)
    s.add_within(msg(), max_per_user=2, max_total=3)
    with pytest.raises(StoreLimit) as e:
        s.add_within(msg(), max_per_user=2, max_total=3)
    assert (e.value.scope, e.value.limit) == ("per_user", 2)
    s.add_within(msg(user="carol@example.com"), max_per_user=2, max_total=3)
    with pytest.raises(StoreLimit) as e:
        s.add_within(msg(user="dave@example.com"), max_per_user=2, max_total=3)
    assert (e.value.scope, e.value.limit) == ("total", 3)
    assert s.count() == 3 and s.count("dave@example.com") == 0
    s.close()


def test_store_claims_a_users_rows_in_order_and_stops_at_the_first_it_cannot_take(
        dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    ids = [s.add(msg(body=str(n))) for n in range(4)]
    s.add(msg(user="carol@example.com"))
    now = 2000.0
    got = s.claim("bob@example.com", "A", now + 90, now, 2, due_only=False)
    assert [r.id for r in got] == ids[:2]  # the limit
    # a row due later stops a due_only claim (never skip ahead of it)
    s.release(ids[2], 1, now + 60)
    got = s.claim("bob@example.com", "B", now + 90, now, 10, due_only=True)
    assert got == []  # ids[0] is leased by A: nothing for B, in order
    s.unlease(ids[0])
    s.unlease(ids[1])
    got = s.claim("bob@example.com", "B", now + 90, now, 10, due_only=True)
    assert [r.id for r in got] == ids[:2]  # up to the row not yet due
    got = s.claim("bob@example.com", "B", now + 90, now, 10, due_only=False)
    assert [r.id for r in got] == ids  # own leases are claimable again; due_only off
    s.close()


def test_two_stores_on_one_database_file_never_claim_the_same_row(dbfile: str) -> None:
    a = SQLiteMessageStore(dbfile)
    b = SQLiteMessageStore(dbfile)
    ids = [a.add(msg(body=str(n))) for n in range(3)]
    now = time.time()
    got_a = a.claim("bob@example.com", "owner-a", now + 90, now, 10, due_only=False)
    got_b = b.claim("bob@example.com", "owner-b", now + 90, now, 10, due_only=False)
    assert [r.id for r in got_a] == ids and got_b == []
    assert b.users_due(now) == []  # leased: nobody's due
    # a delivered row disappears for both
    a.delete(ids[0])
    assert [r.id for r in b.list()] == ids[1:]
    a.close()
    b.close()


def test_two_stores_racing_to_claim_get_disjoint_rows(dbfile: str) -> None:
    import threading

    SQLiteMessageStore(dbfile).close()
    stores = [SQLiteMessageStore(dbfile) for _ in range(4)]
    for n in range(30):
        stores[0].add(msg(user=f"u{n % 3}@example.com", body=str(n)))
    taken: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        now = time.time()
        for u in ("u0@example.com", "u1@example.com", "u2@example.com"):
            rows = stores[i].claim(u, f"owner-{i}", now + 90, now, 100, due_only=False)
            with lock:
                taken.extend(r.id for r in rows)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(set(taken))  # no row twice
    assert len(taken) == 30
    for s in stores:
        s.close()


def test_a_lease_that_ran_out_can_be_claimed_by_another_instance(dbfile: str) -> None:
    a = SQLiteMessageStore(dbfile)
    b = SQLiteMessageStore(dbfile)
    i = a.add(msg())
    now = 5000.0
    assert [r.id for r in a.claim("bob@example.com", "A", now + 90, now, 10, False)] == [i]
    assert b.claim("bob@example.com", "B", now + 90, now + 89, 10, False) == []
    got = b.claim("bob@example.com", "B", now + 200, now + 91, 10, False)
    assert [r.id for r in got] == [i]  # A died with the lease: B takes over after it
    assert a.claim("bob@example.com", "A", now + 200, now + 92, 10, False) == []
    a.close()
    b.close()


def test_a_row_stored_with_a_lease_is_not_claimed_by_others_meanwhile(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    now = time.time()
    i = s.add(msg(expires=now - 1), "live-owner", now + 90)
    assert s.claim("bob@example.com", "other", now + 90, now, 10, False) == []
    assert [r.id for r in s.claim("bob@example.com", "live-owner", now + 90, now, 10, False)] == [i]
    assert s.take_expired(now) == []  # a leased row is not expired from under its sender
    assert [r.id for r in s.take_expired(now + 91)] == [i]
    s.close()


def test_store_users_due_looks_at_each_users_oldest_row(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    now = 3000.0
    b1 = s.add(msg(next_try=now + 100))  # bob's oldest is not due
    s.add(msg(next_try=0))
    s.add(msg(user="carol@example.com", next_try=now - 1))
    d1 = s.add(msg(user="dave@example.com", next_try=0))
    s.claim("dave@example.com", "X", now + 50, now, 10, False)  # leased
    assert s.users_due(now) == ["carol@example.com"]
    assert sorted(s.users()) == ["bob@example.com", "carol@example.com", "dave@example.com"]
    s.release(b1, 1, now - 1)
    s.unlease(d1)
    assert sorted(s.users_due(now)) == ["bob@example.com", "carol@example.com",
                                        "dave@example.com"]
    s.close()


def test_store_take_expired_removes_and_returns_only_expired_rows(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    old = s.add(msg(expires=100.0, body="old"))
    s.add(msg(expires=10 ** 12, body="fresh"))
    got = s.take_expired(200.0)
    assert [(r.id, r.body) for r in got] == [(old, "old")]
    assert [r.body for r in s.list()] == ["fresh"]
    assert s.take_expired(200.0) == []
    s.close()


def test_store_purge_one_user_or_all(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    for u in ("bob@example.com", "bob@example.com", "carol@example.com"):
        s.add(msg(user=u))
    assert s.purge("bob@example.com") == 2
    assert s.purge("nobody@example.com") == 0
    assert s.purge() == 1
    assert s.count() == 0
    s.close()


def test_store_survives_reopening_the_file(dbfile: str) -> None:
    s = SQLiteMessageStore(dbfile)
    s.add(msg(body="kept"))
    s.close()
    s = SQLiteMessageStore(dbfile)
    assert [r.body for r in s.list()] == ["kept"]
    s.close()


def test_async_store_runs_calls_off_the_event_loop(dbfile: str) -> None:
    import threading

    async def scenario() -> None:
        a = AsyncStore(SQLiteMessageStore(dbfile))
        i = await a.add(msg())
        assert await a.count() == 1
        threads = await a.__getattr__("list")()  # any method is wrapped
        assert threads[0].id == i
        where = []
        orig = a.store.count
        a.store.count = lambda *x: where.append(threading.current_thread().name) or orig(*x)
        await a.count()
        assert where and where[0].startswith("sipgen-store")
        a.close()

    asyncio.run(scenario())


# ==========================================================================
# Outgoing <-> StoredMessage, back-off
# ==========================================================================


def test_outgoing_round_trips_through_a_stored_row() -> None:
    out = Outgoing(user="bob@example.com", sender="alice@example.com",
                   from_hdr="<sip:alice@example.com>", to_hdr="<sip:bob@example.com>",
                   content_type="text/plain", body="b", body_encoding="hex",
                   extra={"xsip_body.1": "p"}, call_id="cid", from_tag="ft", received=7.0,
                   notify_sender=True, attempts=1)
    row = out.to_stored(99.0)
    assert (row.expires, row.call_id, row.from_tag, row.extra) == (99.0, "cid", "ft",
                                                                   {"xsip_body.1": "p"})
    row.id = 12
    back = Outgoing.from_stored(row)
    assert (back.caller, back.called, back.stored_id) == ("alice", "bob", 12)
    assert (back.call_id, back.from_tag, back.received, back.body_encoding) == ("cid", "ft", 7.0,
                                                                               "hex")


def test_backoff_doubles_from_retry_min_up_to_retry_max() -> None:
    d = Deliverer(engine=None, counters=None)
    d.retry_min, d.retry_max = 30.0, 200.0
    assert [d.backoff(n) for n in range(0, 6)] == [30.0, 30.0, 60.0, 120.0, 200.0, 200.0]


# ==========================================================================
# Deliverer against a scripted engine
# ==========================================================================


class ScriptedEngine:
    """Answers dispatched messages with ``respond(msg) -> Message | awaitable``; records them."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.sent: list[Message] = []
        self.active = 0
        self.max_active = 0
        self.cancelled = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def dispatch(self, m: Message, timeout: float | None = None) -> Message:
        self.sent.append(m)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            r = self.respond(m)
            if asyncio.iscoroutine(r):
                r = await r
            if isinstance(r, BaseException):
                raise r
            if isinstance(r, Message):
                return r
            a = Message(m.name, dict(m.params))
            a.handled = True
            if r is not None:
                a["code"] = str(r)
            return a
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


def out_msg(**kw: Any) -> Outgoing:
    d: dict[str, Any] = dict(user="bob@example.com", sender="alice@example.com",
                             from_hdr="<sip:alice@example.com>", to_hdr="<sip:bob@example.com>",
                             content_type="text/plain", body="hi", call_id="cid@x",
                             from_tag="ft", received=0.0, antiloop=7, caller="alice",
                             called="bob")
    d.update(kw)
    return Outgoing(**d)


def deliverer(engine: ScriptedEngine, **cfg: Any) -> Deliverer:
    from collections import Counter

    d = Deliverer(engine, Counter())
    d.configure(max_concurrent=cfg.get("max_concurrent", 10), delivery_timeout=5.0,
                retry_min=1.0, retry_max=8.0, other_targets=cfg.get("other_targets",
                                                                    "msg.execute"))
    return d


def test_send_xsip_generate_params_are_exactly_ours() -> None:
    async def scenario() -> None:
        e = ScriptedEngine(lambda m: 200)
        d = deliverer(e)
        code = await d.send(out_msg(body_encoding="base64", extra={"xsip_body.1": "p"}),
                            [Target("sip/sip:bob@h", "tcp:1")])
        assert code == 200
        (m,) = e.sent
        assert dict(m.params) == {
            "method": "MESSAGE", "uri": "sip:bob@h", "wait": "true", "antiloop": "7",
            "sip_From": "<sip:alice@example.com>;tag=ft", "sip_To": "<sip:bob@example.com>",
            "sip_Call-ID": "cid@x", "sip_CSeq": "1 MESSAGE",
            "sip_Date": "Thu, 01 Jan 1970 00:00:00 GMT", "xsip_type": "text/plain",
            "xsip_body": "hi", "xsip_body_encoding": "base64", "xsip_body.1": "p",
            "connection_id": "tcp:1"}
        await d.send(out_msg(auto=True), [Target("sip/sip:bob@h")])
        assert e.sent[1]["sip_Auto-Submitted"] == "auto-generated"

    asyncio.run(scenario())


def test_send_fork_first_2xx_wins_and_the_rest_stop_being_waited_for() -> None:
    async def scenario() -> None:
        async def respond(m):
            if m["uri"] == "sip:slow@h":
                await asyncio.sleep(10)
                return 486
            await asyncio.sleep(0.01)
            return 202

        e = ScriptedEngine(respond)
        d = deliverer(e)
        t0 = time.monotonic()
        code = await d.send(out_msg(), [Target("sip/sip:slow@h"), Target("sip/sip:fast@h")])
        assert code == 202 and time.monotonic() - t0 < 1
        await asyncio.sleep(0)
        assert e.cancelled == 1

    asyncio.run(scenario())


def test_send_fork_all_failing_gives_the_best_failure_and_no_code_counts_as_480() -> None:
    async def scenario() -> None:
        codes = {"sip:a@h": Message("x", {"error": "offline"}), "sip:b@h": 486}

        def respond(m):
            r = codes[m["uri"]]
            if isinstance(r, Message):
                r.handled = True
            return r

        d = deliverer(ScriptedEngine(respond))
        assert await d.send(out_msg(), [Target("sip/sip:a@h"), Target("sip/sip:b@h")]) == 480
        codes["sip:a@h"] = 603
        assert await d.send(out_msg(), [Target("sip/sip:a@h"), Target("sip/sip:b@h")]) == 603

    asyncio.run(scenario())


@pytest.mark.parametrize("exc,code", [(DispatchTimeout("t"), 408), (DispatchCancelled("c"), 0),
                                      (LineTooLong(70000, 65534), 413)])
def test_send_turns_dispatch_failures_into_codes(exc: BaseException, code: int) -> None:
    async def scenario() -> None:
        d = deliverer(ScriptedEngine(lambda m: exc))
        assert await d.send(out_msg(), [Target("sip/sip:a@h")]) == code

    asyncio.run(scenario())


def test_send_other_targets_go_by_msg_execute_or_are_rejected() -> None:
    async def scenario() -> None:
        def respond(m):
            a = Message(m.name, dict(m.params))
            a.handled = m["callto"] == "jabber/ok"
            return a

        e = ScriptedEngine(respond)
        d = deliverer(e)
        assert await d.send(out_msg(), [Target("jabber/ok")]) == 200
        assert dict(e.sent[0].params) == {"callto": "jabber/ok", "caller": "alice",
                                          "called": "bob", "module": "sipgen",
                                          "xsip_type": "text/plain", "xsip_body": "hi",
                                          "text": "hi"}
        assert await d.send(out_msg(), [Target("jabber/nobody")]) == 500
        assert "text" not in (await _sent_one(d, e, out_msg(body_encoding="base64")))
        d2 = deliverer(e, other_targets="reject")
        n = len(e.sent)
        assert await d2.send(out_msg(), [Target("jabber/ok")]) == 404
        assert len(e.sent) == n

    asyncio.run(scenario())


async def _sent_one(d: Deliverer, e: ScriptedEngine, out: Outgoing) -> Message:
    await d.send(out, [Target("jabber/ok")])
    return e.sent[-1]


def test_max_concurrent_bounds_deliveries_in_flight() -> None:
    async def scenario() -> None:
        async def respond(m):
            await asyncio.sleep(0.02)
            return 200

        e = ScriptedEngine(respond)
        d = deliverer(e, max_concurrent=3)
        codes = await asyncio.gather(*(d.send(out_msg(user=f"u{i}@x"), [Target("sip/sip:a@h")])
                                       for i in range(10)))
        assert codes == [200] * 10 and e.max_active == 3

    asyncio.run(scenario())


def test_flush_user_delivers_in_order_deletes_on_2xx_and_backs_off_at_the_first_failure(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        results = iter([200, 200, 408])
        e = ScriptedEngine(lambda m: next(results))
        d = deliverer(e)
        d.store = AsyncStore(SQLiteMessageStore(str(tmp_path / "m.db")))
        ids = [await d.store.add(msg(body=str(n))) for n in range(5)]
        d.backlog.add("bob@example.com")
        before = time.time()
        ok = await d.flush_user("bob@example.com", [Target("sip/sip:b@h")], None, due_only=False)
        assert ok is False
        assert [m["xsip_body"] for m in e.sent] == ["0", "1", "2"]
        rows = await d.store.list()
        assert [r.id for r in rows] == ids[2:]
        assert rows[0].attempts == 1 and before + 1 <= rows[0].next_try <= time.time() + 1.1
        raw = d.store.store.db.execute("SELECT lease_owner, lease_until FROM messages").fetchall()
        assert raw == [("", 0)] * 3  # nothing stays leased after the run
        assert d.counters["delivered"] == 2 and d.counters["retry"] == 1
        assert "bob@example.com" in d.backlog
        d.store.close()

    asyncio.run(scenario())


class DeleteGatedStore(SQLiteMessageStore):
    """Its deletes wait until the test lets them go (each one's start is recorded)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.deleting: list[int] = []
        self.release = threading.Event()

    def delete(self, msg_id: int) -> None:
        self.deleting.append(msg_id)
        assert self.release.wait(10)
        super().delete(msg_id)


def test_flush_user_sends_the_next_stored_message_without_waiting_for_the_last_delete(
        tmp_path: Path) -> None:
    """The delete after a delivery is the store's business: the next send goes at once (a
    commit per message on the way made one user's stored queue drain slower than the live
    relay), and the run still ends with every delivered row gone."""
    async def scenario() -> None:
        e = ScriptedEngine(lambda m: 200)
        d = deliverer(e)
        d.store = AsyncStore(DeleteGatedStore(str(tmp_path / "m.db")))
        ids = [await d.store.add(msg(body=str(n))) for n in range(3)]
        d.backlog.add("bob@example.com")
        run = asyncio.ensure_future(
            d.flush_user("bob@example.com", [Target("sip/sip:b@h")], None, due_only=False))
        deadline = time.monotonic() + 5
        while len(e.sent) < 3:  # all three sent while the first delete is still held
            assert time.monotonic() < deadline, f"sent {len(e.sent)}"
            await asyncio.sleep(0.01)
        assert [m["xsip_body"] for m in e.sent] == ["0", "1", "2"]
        assert d.store.store.deleting == ids[:1] and not run.done()
        d.store.store.release.set()
        assert await run is True
        assert await d.store.count() == 0 and "bob@example.com" not in d.backlog
        assert d.counters["delivered"] == 3
        d.store.close()

    asyncio.run(scenario())


def test_flush_user_without_targets_routes_and_forgets_the_user_when_done(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        e = ScriptedEngine(lambda m: 200)
        d = deliverer(e)
        d.store = AsyncStore(SQLiteMessageStore(str(tmp_path / "m.db")))
        await d.store.add(msg())
        d.backlog.add("bob@example.com")
        asked = []

        async def route(user):
            asked.append(user)
            return Route([Target("sip/sip:bob@found")])

        assert await d.flush_user("bob@example.com", None, route, due_only=False) is True
        assert asked == ["bob@example.com"] and e.sent[0]["uri"] == "sip:bob@found"
        assert d.backlog == set() and await d.store.count() == 0
        assert not d.users.locked("bob@example.com")
        # an offline user: rows go back with their back-off, nothing is sent
        await d.store.add(msg())

        async def offline(user):
            return Route([], 480, offline=True)

        assert await d.flush_user("bob@example.com", None, offline, due_only=False) is False
        (r,) = await d.store.list()
        assert r.attempts == 1 and len(e.sent) == 1
        assert d.users._held == {}  # a finished run keeps nothing per user around
        d.store.close()

    asyncio.run(scenario())


def test_two_deliverers_on_one_database_do_not_deliver_the_same_message_twice(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async def respond(m):
            await asyncio.sleep(0.01)
            return 200

        e = ScriptedEngine(respond)
        path = str(tmp_path / "m.db")
        a, b = deliverer(e), deliverer(e)
        a.store = AsyncStore(SQLiteMessageStore(path))
        b.store = AsyncStore(SQLiteMessageStore(path))
        assert a.owner != b.owner
        for n in range(6):
            await a.store.add(msg(body=str(n)))
        t = [Target("sip/sip:b@h")]
        await asyncio.gather(a.flush_user("bob@example.com", t, None, due_only=False),
                             b.flush_user("bob@example.com", t, None, due_only=False))
        # whatever one left (its oldest row leased by the other) the next run delivers
        await a.flush_user("bob@example.com", t, None, due_only=False)
        bodies = [m["xsip_body"] for m in e.sent]
        assert sorted(bodies) == [str(n) for n in range(6)]
        assert await a.store.count() == 0
        a.store.close()
        b.store.close()

    asyncio.run(scenario())


def test_deliverer_owner_is_unique_per_process(tmp_path: Path) -> None:
    """Two instances on one database tell their leases apart by owner."""
    import subprocess
    import sys

    code = ("from yate_sipgen.features.delivery import Deliverer; "
            "print(Deliverer(None, None).owner)")
    root = str(Path(__file__).resolve().parent.parent)
    owners = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=root, check=True).stdout.strip() for _ in range(2)}
    assert len(owners) == 2
