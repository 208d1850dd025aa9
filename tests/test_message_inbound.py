"""What MESSAGE takes from a request (features/message.py ``_inbound``): the checks and headers
that depend only on who sends to whom are derived once per pair and kept; what differs per
message (body, tags, Call-ID) never comes from the cache, a refusal is never kept, and the
order in which the checks refuse stays the same (415, 413, 400/403/404, 483).
"""

from __future__ import annotations

import pytest

from yate_sipgen.features.domains import Domains
from yate_sipgen.features.identity import trusted_lines
from yate_sipgen.features.message import MessageFeature
from yate_sipgen.features.validation import Refusal
from yate_sipgen.message import Message


def feature(**cfg: object) -> MessageFeature:
    f = MessageFeature()
    f.cfg = {"_types": {"text/plain"}, "_accept": "text/plain", "max_body": 100,
             "_trusted": trusted_lines([]), "_auth_required": False,
             "allow_from_mismatch": False, "relay_foreign": False, "notice_from": "sipgen",
             **cfg}
    f.domains = Domains(["example.com"])
    return f


def request(tag: str = "t1", body: str = "hi", **more: str) -> Message:
    params = {"caller": "alice", "called": "bob", "username": "alice",
              "sip_from": f'"Alice" <sip:alice@example.com>;tag={tag}',
              "sip_uri": "sip:bob@example.com", "xsip_type": "text/plain", "xsip_body": body}
    params.update(more)
    return Message("sip.message", params)


def test_messages_of_one_conversation_share_the_derived_headers_not_the_per_message_parts():
    f = feature()
    a = f._inbound(request("t1", "first"), 20)
    b = f._inbound(request("t2", "second"), 20)
    assert len(f._parties) == 1  # the From tag alone differed
    assert (a.out.from_hdr, a.out.to_hdr, a.out.user, a.out.sender) == (
        b.out.from_hdr, b.out.to_hdr, b.out.user, b.out.sender) == (
        '"Alice" <sip:alice@example.com>', "<sip:bob@example.com>", "bob@example.com",
        "alice@example.com")
    assert (a.out.body, b.out.body) == ("first", "second")
    assert a.out.call_id != b.out.call_id and a.out.from_tag != b.out.from_tag
    assert (a.out.antiloop, a.parties.authenticated, a.parties.media) == (
        19, True, "text/plain")


@pytest.mark.parametrize("change", [{"username": "mallory"}, {"in_line": "gw"},
                                    {"sip_uri": "sip:carol@example.com"},
                                    {"callername": "Al"}, {"sip_auto-submitted": "auto"},
                                    {"sip_content-type": "text/plain;charset=UTF-8"}])
def test_any_param_the_checks_read_makes_a_pair_of_its_own(change):
    f = feature(allow_from_mismatch=True)
    f._inbound(request(), 20)
    f._inbound(request(**change), 20)
    assert len(f._parties) == 2


def test_a_from_whose_tag_is_not_a_plain_token_is_kept_whole():
    f = feature()
    f._inbound(request("t1"), 20)
    f._inbound(request("odd%tag"), 20)
    assert len(f._parties) == 2


def test_a_refusal_is_never_kept_and_a_later_good_request_passes():
    f = feature()
    with pytest.raises(Refusal) as e:
        f._inbound(request(username="mallory"), 20)  # From user is not the username
    assert e.value.code == 403 and not f._parties
    assert f._inbound(request(), 20).parties.sender_user == "alice"


@pytest.mark.parametrize("params, hops, code", [
    ({"xsip_type": "image/png", "xsip_body": "x" * 200}, 20, 415),  # media before size
    ({"xsip_body": "x" * 200, "sip_from": "garbage<"}, 20, 413),  # size before From
    ({"sip_from": "garbage<"}, 1, 400),  # From before the hops left
    ({"sip_uri": "sip:bob@elsewhere.org"}, 1, 403),  # not our domain
    ({}, 1, 483),  # no hop left to forward
])
def test_refusals_come_in_the_same_order_cached_or_not(params, hops, code):
    for warm in (False, True):
        f = feature()
        if warm:  # the pair is already known from a good request
            f._inbound(request(), 20)
        m = request(**{k: v for k, v in params.items() if k != "sip_from"})
        if "sip_from" in params:
            m["sip_from"] = params["sip_from"]
        with pytest.raises(Refusal) as e:
            f._inbound(m, hops)
        assert e.value.code == code, (warm, params)
