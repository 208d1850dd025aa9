"""The policy every inbound request shares (issue 9): who sends (features/identity.py), the
sender's rate (features/ratelimit.py), the checks of the request (features/validation.py); and,
end to end, the trust rule SUBSCRIBE, PUBLISH and check-sync NOTIFY now share with MESSAGE: an
``in_line`` vouches for a request only when it is one of ``[message] trusted_lines``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from events_e2e_harness import PUBLISH, SUBSCRIBE, started
from msg_e2e_harness import assert_clean, run
from yate_sipgen.events.subscription import SubscribeError
from yate_sipgen.features.domains import Domains
from yate_sipgen.features.identity import Requester, requester, trusted_lines
from yate_sipgen.features.message import MessageFeature
from yate_sipgen.features.ratelimit import RateLimiter
from yate_sipgen.features.validation import (ONWARD_ROOM, Refusal, hops, too_big,
                                             unsupported_media)
from yate_sipgen.message import Message
from yate_sipgen.sip import parse_name_addr

# ==========================================================================
# identity: every combination of username, in_line, From, auth and mismatch
# ==========================================================================

FROM = '"Alice" <sip:alice@example.com>;tag=a1'
TRUSTED = trusted_lines(["gw"])

#: username -> the param ("same": the From user; "other": not the From user)
USERNAMES = {"none": None, "same": "alice", "other": "bob"}
#: in_line -> the param (TRUSTED lists "gw" only)
LINES = {"none": None, "trusted": "gw", "untrusted": "pbx-trunk"}

#: (username, in_line) -> (user, authenticated, trusted_line, vouched, mismatch): the rule.
#: ``mismatch``: a 403 unless allow_from_mismatch. Unvouched requests get 403 when auth is
#: required. A trusted line speaks for the From user whatever the username (the line's own).
RULE = {
    ("none", "none"): ("alice", False, False, False, False),
    ("none", "trusted"): ("alice", False, True, True, False),
    ("none", "untrusted"): ("alice", False, False, False, False),
    ("same", "none"): ("alice", True, False, True, False),
    ("same", "trusted"): ("alice", True, True, True, False),
    ("same", "untrusted"): ("alice", True, False, True, False),
    ("other", "none"): ("bob", True, False, True, True),
    ("other", "trusted"): ("alice", True, True, True, False),
    ("other", "untrusted"): ("bob", True, False, True, True),
}


def request(username: Optional[str] = None, in_line: Optional[str] = None,
            **more: str) -> Message:
    params = {"caller": "alice", "sip_from": FROM}
    if username is not None:
        params["username"] = username
    if in_line is not None:
        params["in_line"] = in_line
    params.update(more)
    return Message("sip.subscribe", params)


@pytest.mark.parametrize("allow_mismatch", [False, True], ids=["strict", "mismatch-ok"])
@pytest.mark.parametrize("auth_required", [True, False], ids=["required", "optional"])
@pytest.mark.parametrize("line", list(LINES))
@pytest.mark.parametrize("user", list(USERNAMES))
def test_requester_decides_every_combination(user: str, line: str, auth_required: bool,
                                             allow_mismatch: bool) -> None:
    msg = request(USERNAMES[user], LINES[line])
    who, authenticated, trusted, vouched, mismatch = RULE[(user, line)]
    refused = (not vouched and auth_required) or (mismatch and not allow_mismatch)
    frm = parse_name_addr(FROM)
    if refused:
        with pytest.raises(Refusal) as e:
            requester(msg, frm, TRUSTED, auth_required, allow_mismatch)
        assert e.value.code == 403 and e.value.headers == {}
        return
    r = requester(msg, frm, TRUSTED, auth_required, allow_mismatch)
    assert r == Requester(who, "example.com", authenticated, trusted, "alice", vouched)


def test_requester_refusals_say_why() -> None:
    frm = parse_name_addr(FROM)
    with pytest.raises(Refusal) as e:
        requester(request(), frm, TRUSTED, True, False, "[events] auth=required")
    assert e.value.reason == "not authenticated ([events] auth=required)"
    with pytest.raises(Refusal) as e:
        requester(request("bob"), frm, TRUSTED, True, False)
    assert e.value.reason == "From user alice is not the authenticated bob"


def test_star_trusts_every_line_but_not_the_absence_of_one() -> None:
    frm = parse_name_addr(FROM)
    anyline = trusted_lines(["*"])
    r = requester(request("gwuser", "whatever-line"), frm, anyline, True, False)
    assert r.trusted_line and r.vouched and r.user == "alice"
    with pytest.raises(Refusal):
        requester(request(), frm, anyline, True, False)  # no in_line at all


def test_requester_without_from_or_from_user_takes_the_caller() -> None:
    r = requester(request(caller="carol"), None, TRUSTED)
    assert (r.user, r.host, r.claimed_user) == ("carol", "", "carol")
    r = requester(request(caller="carol"), parse_name_addr("<sip:example.com>;tag=x"), TRUSTED)
    assert (r.user, r.host) == ("carol", "example.com")


def test_requester_defaults_refuse_nothing() -> None:
    frm = parse_name_addr(FROM)
    assert not requester(request(in_line="pbx-trunk"), frm, TRUSTED).vouched
    assert requester(request("bob"), frm, TRUSTED).user == "bob"


def test_message_is_automatic_trusts_only_the_trusted_lines() -> None:
    """The echo service's guard (is_automatic) once counted any in_line as a vouched sender."""
    f = MessageFeature()
    f.cfg = {"_trusted": TRUSTED, "notice_from": "sipgen"}
    f.domains = Domains()
    text = {"xsip_type": "text/plain"}
    assert f.is_automatic(request(in_line="pbx-trunk", **text))
    assert not f.is_automatic(request(in_line="gw", **text))
    assert not f.is_automatic(request("alice", **text))


# ==========================================================================
# rate limit
# ==========================================================================


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_allows_the_burst_then_one_per_token_time() -> None:
    clock = Clock()
    rl = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b")  # senders are independent
    clock.now += 0.25
    assert not rl.allow("a")  # half a token: a refusal takes nothing
    clock.now += 0.25
    assert rl.allow("a") and not rl.allow("a")
    clock.now += 3600
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_rate_limit_retry_after_is_one_token_time_rounded_up() -> None:
    assert RateLimiter(rate=5.0).retry_after() == 1
    assert RateLimiter(rate=0.5).retry_after() == 2
    assert RateLimiter(rate=0.3).retry_after() == 4


def test_rate_limit_reconfigure_keeps_the_buckets() -> None:
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert rl.allow("a") and not rl.allow("a")
    rl.configure(rate=4.0, burst=1)
    assert not rl.allow("a")  # still empty
    clock.now += 0.25
    assert rl.allow("a")  # refilled at the new rate


def test_rate_limit_memory_is_bounded_by_dropping_idle_senders() -> None:
    class Small(RateLimiter):
        MAX_SENDERS = 3

    clock = Clock()
    rl = Small(rate=1.0, burst=2, clock=clock)
    for s in ("s0", "s1", "s2", "busy"):
        assert rl.allow(s)
    assert len(rl) == 4
    clock.now += 10  # s0..s2 have their whole burst back: forgetting them changes nothing
    assert rl.allow("busy") and rl.allow("busy") and not rl.allow("busy")
    assert rl.allow("new")
    assert len(rl) == 2  # busy (still limited) and new
    assert not rl.allow("busy")


# ==========================================================================
# validation
# ==========================================================================


@pytest.mark.parametrize("antiloop,want", [(None, 20), ("19", 19), ("0", 0), ("-3", -3),
                                           ("x", 20), ("", 20), ("1.5", 20)])
def test_hops_left_from_antiloop(antiloop: Optional[str], want: int) -> None:
    params = {} if antiloop is None else {"antiloop": antiloop}
    assert hops(Message("sip.message", params)) == want


def test_unsupported_media_is_a_415_with_accept() -> None:
    e = unsupported_media("image/png", "text/plain, message/cpim")
    assert (e.code, e.reason, e.headers) == (415, "content type image/png",
                                             {"Accept": "text/plain, message/cpim"})
    assert unsupported_media("", "text/plain").reason == "no content type"


def test_refusal_is_the_one_type_events_raise_too() -> None:
    assert Refusal is SubscribeError
    e = Refusal(503, "busy", Retry_After="2")
    assert (e.code, e.reason, e.headers) == (503, "busy", {"Retry-After": "2"})


def test_too_big_counts_bytes_body_parts_and_the_escaped_line() -> None:
    assert too_big("abc", {}, 3) == ""
    assert too_big("abc", {}, 2) == "body of 3 bytes"
    assert too_big("éé", {}, 3) == "body of 4 bytes"  # UTF-8 bytes, not characters
    assert too_big("ab", {"xsip_body.1": "cd"}, 3) == "body of 4 bytes"
    assert too_big(":" * 11, {}, 1000, room=30) == ""  # 22 bytes once escaped: fits
    assert too_big(":" * 16, {}, 1000, room=30) == "body of 16 bytes (32 once escaped)"
    assert too_big("a" * 16, {}, 1000, room=30) == ""  # nothing to escape
    assert ONWARD_ROOM == 65534 - 3072


# ==========================================================================
# end to end: in_line counts only for a trusted line (SUBSCRIBE, PUBLISH, check-sync)
# ==========================================================================


def test_an_in_line_vouches_for_subscribe_publish_and_check_sync_only_when_trusted(
        tmp_path: Path) -> None:
    """Before: SUBSCRIBE took any in_line as authenticated, PUBLISH and check-sync none."""
    async def scenario() -> None:
        sections = {"message": {"trusted_lines": "gw"},
                    "generic": {"methods": "notify:relay"}}
        async with started(tmp_path, sections) as y:
            anon = ("username", "realm")
            # SUBSCRIBE ([events] auth=required): alice watches bob (watchers=domain)
            r = await y.subscribe(SUBSCRIBE, anon, in_line="pbx-trunk")
            assert r.get("code") == "403"
            r = await y.subscribe(SUBSCRIBE, anon, in_line="gw")
            assert r.get("code") == "200"
            (sub,) = [line for line in (await y.command("sipgen subscriptions")).splitlines()
                      if "alice@example.com" in line]
            assert "bob@example.com" in sub
            # PUBLISH ([presence] publishers=self): bob's own presence, From bob
            r = await y.publish(PUBLISH, ("username",), in_line="pbx-trunk")
            assert r.get("code") == "403"
            r = await y.publish(PUBLISH, ("username",), in_line="gw")
            assert r.get("code") == "200" and r.get("osip_SIP-ETag")
            # a trusted line speaks for its From user only: not for someone else's presence
            r = await y.publish(PUBLISH, ("username",), in_line="gw",
                                sip_from="<sip:carol@example.com>;tag=c1")
            assert r.get("code") == "403"
            # check-sync NOTIFY (it reboots phones): relayed only when someone vouches
            await y.fy.wait_installed("sip.notify")
            await y.register("bob", "example.com", "sip:bob@192.0.2.20:5062")
            sync = [("called", "bob"), ("caller", "alice"), ("antiloop", "19"),
                    ("sip_uri", "sip:bob@example.com"), ("sip_callid", "n1@x"),
                    ("sip_from", "<sip:alice@example.com>;tag=a1"),
                    ("sip_to", "<sip:bob@example.com>"), ("sip_event", "check-sync")]
            r = await y.fy.dispatch("sip.notify", sync + [("in_line", "pbx-trunk")])
            assert r.get("code") == "403"
            r = await y.fy.dispatch("sip.notify", sync + [("in_line", "gw")])
            assert r.get("code") == "200"
            assert [m.get("sip_Event") for m in y.xsip_seen
                    if m.get("method") == "NOTIFY" and m.get("uri") == "sip:bob@192.0.2.20:5062"
                    ] == ["check-sync"]
            assert_clean(y)

    run(scenario)


def test_without_trusted_lines_an_in_line_subscribe_is_unauthenticated(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path) as y:
            r = await y.subscribe(SUBSCRIBE, ("username", "realm"), in_line="anything")
            assert r.get("code") == "403"
            r = await y.subscribe(SUBSCRIBE, ("username", "realm"), in_line="anything",
                                  sip_from="<sip:bob@example.com>;tag=b1")
            assert r.get("code") == "403"  # even to watch oneself: auth=required
            assert_clean(y)

    run(scenario)
