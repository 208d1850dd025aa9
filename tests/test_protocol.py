"""The extmodule codec (``yate_sipgen.protocol``) checked against Yate's own decoder rules.

Yate's side is played by ``tests/yate_rules.py``, an independent byte-level re-implementation of
``String::msgEscape``/``msgUnescape``, ``Message::commonDecode`` and ``processLine``
(``check_script_line`` lists every problem Yate would have with one line we write).

All wire data is bytes; the codec's ``str`` values carry non-UTF-8 bytes as lone surrogates
(``surrogateescape``). Strategies therefore build *bytes* and decode them, so every generated
``str`` is the canonical decoding of some byte string (two surrogate halves side by side could
otherwise re-encode to a different, valid UTF-8 character).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from yate_rules import (
    WireMessage,
    check_script_line,
    decode_answer,
    decode_script_message,
    encode_answer_line,
    encode_message_line,
    parse_install,
    parse_setlocal,
    trim_blanks,
    yate_escape,
    yate_unescape,
    YateDecodeError,
)

from yate_sipgen import protocol as p
from yate_sipgen.errors import LineTooLong, LocalProtocolError, ProtocolError, RemoteProtocolError
from yate_sipgen.message import Message

# --- helpers ------------------------------------------------------------------------------------


def wire(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def assert_yate_accepts(line: bytes, bufsize: int = 8192, role_known: bool = True) -> None:
    """One complete line, ``\\n``-terminated, that Yate's decoder takes without complaint."""
    assert line.endswith(b"\n"), line
    assert line.count(b"\n") == 1, line
    problems = check_script_line(line[:-1], bufsize=bufsize, role_known=role_known)
    assert problems == [], (line[:200], problems)


def escapes_in(field: bytes) -> list[bytes]:
    """The two-byte escape tokens of an escaped field, scanning as Yate does (``%%`` first)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == 0x25:
            out.append(field[i:i + 2])
            i += 2
        else:
            i += 1
    return out


YATE_ESCAPE_TOKENS = {b"%%", b"%z"} | {bytes([0x25, c]) for c in range(0x41, 0x60)}

FROM_YATE_TYPES = (p.MessageReceived, p.AnswerReceived, p.WatchReceived, p.InstallReplied,
                   p.UninstallReplied, p.WatchReplied, p.UnwatchReplied, p.SetLocalReplied,
                   p.QuitReplied, p.ErrorInReceived)

# --- strategies ---------------------------------------------------------------------------------

_PIECES = st.one_of(
    st.sampled_from([b":", b"%", b"=", b"%z", b"%}", b"%%", b"%@", b"}", b"\r\n", b"\t", b"\x01",
                     b"\x1b", b"\x1f", b"\x7f", b"\xff", b"\xc3\xa9", b"\xc3", b"\xed\xa0\x80",
                     b" ", b"a", b"true", b"\x00", b"\xef\xbf\xbf", b"%%z", b"%%%"]),
    st.binary(max_size=6),
    st.text(max_size=6).map(lambda s: s.encode()),
)


def _bytes(*, drop: bytes = b"\x00", drop_ctrl: bool = False, min_size: int = 0,
           max_pieces: int = 6) -> st.SearchStrategy[bytes]:
    def build(pieces: list[bytes]) -> bytes:
        b = bytes(c for c in b"".join(pieces)
                  if c not in drop and not (drop_ctrl and c < 0x20))
        return b if len(b) >= min_size else b + b"k" * (min_size - len(b))
    return st.lists(_PIECES, max_size=max_pieces).map(build)


#: Any value Yate can carry: everything but NUL (a Yate string is a C string).
VALUES = _bytes().map(text)
#: Param names the script may send: not empty, no '='.
NAMES = _bytes(drop=b"\x00=", min_size=1).map(text)
#: Param names Yate may send: '=' included (Yate writes it as %}).
YATE_NAMES = _bytes(min_size=1).map(text)
#: Raw fields (install/watch names, setlocal name and value, ids): no ':' and no control byte.
#: '%' is left out too: Yate takes it literally, which the linter flags as a likely mistake.
RAW_NAMES = _bytes(drop=b"\x00:% ", drop_ctrl=True, min_size=1).map(text)
#: Ids Yate hands us (holder ids) or arbitrary raw ids; echoed byte for byte in answers.
IDS = st.one_of(
    st.builds(lambda a, b: f"0x{a:x}.{b}", st.integers(0, 2**48), st.integers(0, 2**31)),
    _bytes(drop=b"\x00:", drop_ctrl=True, min_size=1).map(text),
)
TIMES = st.integers(0, 2**32 - 1)
PARAM_LISTS = st.lists(st.tuples(NAMES, VALUES), max_size=6, unique_by=lambda kv: kv[0])
YATE_PARAM_LISTS = st.lists(st.tuples(YATE_NAMES, VALUES), max_size=6)
CHANGES = st.dictionaries(NAMES, st.none() | VALUES, max_size=6)


# === escaping =====================================================================================


class TestEscaping:
    @given(VALUES)
    def test_escape_is_byte_identical_to_yate_msgEscape(self, s):
        assert wire(p.escape(s)) == yate_escape(wire(s))

    @given(VALUES)
    def test_unescape_inverts_escape(self, s):
        assert p.unescape(p.escape(s)) == s
        assert p.unescape(p.escape(s), name=True) == s

    @given(VALUES)
    def test_escaped_text_has_no_colon_and_no_control_byte(self, s):
        out = wire(p.escape(s))
        assert b":" not in out
        assert all(c >= 0x20 for c in out)
        assert all(tok in YATE_ESCAPE_TOKENS for tok in escapes_in(out))

    @given(VALUES)
    def test_escaped_size_is_the_wire_size_of_the_escaped_text(self, s):
        assert p.escaped_size(s) == len(wire(p.escape(s)))

    @given(_bytes(drop=b"", drop_ctrl=True, max_pieces=10))
    @example(b"%")
    @example(b"a%")
    @example(b"%@")
    @example(b"%a")
    @example(b"%}")
    @example(b"%%}")
    @example(b"%`")
    @example(b"%\xff")
    def test_unescape_accepts_and_rejects_exactly_what_yate_does(self, raw):
        try:
            expected = yate_unescape(raw)
        except YateDecodeError:
            with pytest.raises(RemoteProtocolError):
                p.unescape(text(raw))
        else:
            assert wire(p.unescape(text(raw))) == expected

    @given(_bytes(drop=b"", drop_ctrl=True, max_pieces=10))
    @example(b"a%}b")
    @example(b"%}")
    def test_unescape_of_a_name_also_accepts_percent_brace_as_equals(self, raw):
        try:
            expected = yate_unescape(raw, b"=")
        except YateDecodeError:
            with pytest.raises(RemoteProtocolError):
                p.unescape(text(raw), name=True)
        else:
            assert wire(p.unescape(text(raw), name=True)) == expected

    @pytest.mark.parametrize("c", [chr(c) for c in range(0x20, 0x7F)] + ["\xe9", "\udcff"])
    def test_only_percent_z_and_A_to_underscore_are_valid_escapes(self, c):
        expected = {"%": "%", "z": ":"}.get(c) or (chr(ord(c) - 0x40) if 0x41 <= ord(c) <= 0x5F else None)
        if expected is not None:
            assert p.unescape("%" + c) == expected
        else:
            with pytest.raises(RemoteProtocolError):
                p.unescape("%" + c)

    def test_escape_examples_from_the_reference(self):
        assert p.escape("a:b%c\r\n\t=") == "a%zb%%c%M%J%I="
        assert p.escape("\x7f\xe9") == "\x7f\xe9"  # 0x7F and above pass through

    def test_parse_bool_knows_only_yate_tokens(self):
        for w in ("true", "yes", "on", "enable", "t"):
            assert p.parse_bool(w) is True
        for w in ("false", "no", "off", "disable", "f"):
            assert p.parse_bool(w) is False
        for w in ("1", "0", "True", "FALSE", "", " true", "truee"):
            assert p.parse_bool(w) is None

    def test_max_line_is_bufsize_minus_two(self):
        assert p.max_line_for(8192) == 8190
        assert p.max_line_for(65536) == 65534
        assert p.max_line_for(2048) == 2046
        assert p.Encoder().max_line == 8190


# === round trips ==================================================================================


class TestMessageRoundTrip:
    """Encoder.message -> Yate's decoder and parse_script_line."""

    @given(IDS | st.just(""), TIMES, VALUES, VALUES, PARAM_LISTS)
    @example("", 0, "x", "", [])
    @example("id", 0, "m", "", [("k", "")])
    def test_every_sendable_name_and_value_round_trips(self, mid, time, name, retval, params):
        msg = Message(name or "n", params, retval)
        line = p.Encoder().message(msg, mid, time)

        ev = p.parse_script_line(line[:-1])
        assert isinstance(ev, p.MessageReceived)
        assert ev.message.id == mid
        assert ev.message.time == time
        assert ev.message.name == msg.name
        assert ev.message.retval == retval
        assert list(ev.message.items()) == params

        code, sm = decode_script_message(line[:-1])  # what Yate itself decodes
        assert code == -2 and sm is not None
        assert sm.id == wire(mid) and sm.time == time
        assert sm.msg.name == wire(msg.name) and sm.msg.retval == wire(retval)
        assert sm.msg.params == [(wire(k), wire(v)) for k, v in params]

    @given(IDS | st.just(""), TIMES, VALUES, VALUES, PARAM_LISTS)
    def test_message_line_passes_yate_rules(self, mid, time, name, retval, params):
        line = p.Encoder().message(Message(name or "n", params, retval), mid, time)
        assert_yate_accepts(line)
        assert all(tok in YATE_ESCAPE_TOKENS for tok in escapes_in(line))  # never %} etc.

    @pytest.mark.parametrize("retval", ["", "r:v"])
    def test_message_without_params_still_ends_its_name_with_a_colon(self, retval):
        line = p.Encoder().message(Message("app.job", retval=retval), "")
        # %%>message:<id>:<time>:<name>:<retval> -- an empty trailing chunk is harmless
        assert line.startswith(b"%%>message::0:app.job:" + wire(p.escape(retval)))
        assert len(line[:-1].split(b":")) >= 5
        assert_yate_accepts(line)
        code, sm = decode_script_message(line[:-1])
        assert code == -2 and sm.msg.retval == wire(retval) and sm.msg.params == []

    @given(IDS, VALUES, VALUES, PARAM_LISTS, PARAM_LISTS)
    def test_params_built_in_wire_form_are_written_as_built_params_would_be(
            self, mid, name, retval, params, forwarded):
        """Message.from_wire_params (our call.route and xsip.generate) goes out byte for byte
        as the same params set one by one, reads back the same, and is decoded only if a
        param is changed."""
        def as_wire(pairs):
            return "".join(":" + p.escape(k) + "=" + p.escape(v) for k, v in pairs)

        built = Message(name, params, retval)
        built.forwarded = as_wire(forwarded)
        lazy = Message.from_wire_params(name, as_wire(params), retval)
        lazy.forwarded = as_wire(forwarded)
        assert p.yate_message_line(lazy, mid) == p.yate_message_line(built, mid)
        assert all(lazy.get(k) == v for k, v in params)
        lazy["changed"] = "1"
        built["changed"] = "1"
        assert lazy.unchanged_wire() is None
        assert p.yate_message_line(lazy, mid) == p.yate_message_line(built, mid)

    def test_empty_value_is_written_as_key_equals(self):
        line = p.Encoder().message(Message("m", {"k": ""}), "i")
        assert line == b"%%>message:i:0:m::k=\n"
        ev = p.parse_script_line(line[:-1])
        assert ev.message["k"] == ""

    def test_equals_in_a_value_is_not_escaped(self):
        line = p.Encoder().message(Message("m", {"k": "a=b%}"}), "i")
        assert line == b"%%>message:i:0:m::k=a=b%%}\n"
        assert p.parse_script_line(line[:-1]).message["k"] == "a=b%}"

    def test_dispatched_duplicates_reach_yate_with_the_value_msg_reports(self):
        msg = Message("m", [("a", "1"), ("b", "2"), ("a", "3")])
        assert msg["a"] == "1"
        code, sm = decode_script_message(p.Encoder().message(msg, "i")[:-1])
        assert code == -2
        assert sm.msg.get_param(b"a") == b"1"


class TestAnswerRoundTrip:
    """Encoder.answer -> Yate's answer matching and parse_script_line."""

    @given(IDS, st.booleans(), VALUES, VALUES, CHANGES)
    @example("0x1.2", True, "", "", {})
    @example("0x1.2", False, "", "", {"k": None, "v": ""})
    def test_every_sendable_answer_round_trips(self, mid, handled, name, retval, changes):
        line = p.Encoder().answer(mid, handled, name, retval, changes)

        ev = p.parse_script_line(line[:-1])
        assert ev == p.Answer(mid, handled, name, retval, tuple(changes.items()))

        orig = WireMessage(b"orig.name", b"orig-rv", [(b"keep", b"1")] + [(wire(k), b"old") for k in changes])
        code, ret = decode_answer(line[:-1], wire(mid), orig)
        assert code == -2, "Yate would not match this answer"
        assert ret is handled
        assert orig.name == (wire(name) if name else b"orig.name")
        assert orig.retval == wire(retval)
        assert orig.get_param(b"keep") == b"1"
        for k, v in changes.items():
            assert orig.get_param(wire(k)) == (None if v is None else wire(v))

    @given(IDS, st.booleans(), VALUES, VALUES, CHANGES)
    def test_answer_line_passes_yate_rules(self, mid, handled, name, retval, changes):
        line = p.Encoder().answer(mid, handled, name, retval, changes)
        assert_yate_accepts(line)
        assert all(tok in YATE_ESCAPE_TOKENS for tok in escapes_in(line.split(b":", 2)[2]))

    @given(IDS, st.booleans(), VALUES, VALUES, CHANGES)
    def test_answer_always_has_four_fields_and_an_exact_boolean(self, mid, handled, name, retval, changes):
        line = p.Encoder().answer(mid, handled, name, retval, changes)
        head = line[:-1].split(b":")
        assert head[0] == b"%%<message"
        assert len(head) >= 5
        assert head[1] == wire(mid)
        assert head[2] == (b"true" if handled else b"false")

    @given(IDS, st.booleans(), st.from_regex(r"[0-9]{1,6}", fullmatch=True))
    @example("0x1.2", True, "200")
    def test_the_usual_code_answer_is_written_as_any_other_answer(self, mid, handled, code):
        """Answering a sip.* with only its SIP code set has a short way through the encoder
        (the hot path): Yate must get what the general encoding would give."""
        line = p.Encoder().answer(mid, handled, "", "", {"code": code})
        assert line == ("%%<message:" + mid + (":true" if handled else ":false") + ":::code="
                        + code + "\n").encode("utf-8", "surrogateescape")
        assert_yate_accepts(line)
        orig = WireMessage(b"sip.message", b"", [(b"code", b"old")])
        rc, ret = decode_answer(line[:-1], wire(mid), orig)
        assert rc == -2 and ret is handled
        assert orig.get_param(b"code") == code.encode()

    def test_minimal_answer_keeps_all_four_fields(self):
        assert p.Encoder().answer("0x1.2", True, "", "", None) == b"%%<message:0x1.2:true::\n"
        assert p.Encoder().answer("0x1.2", False, "", "", {}) == b"%%<message:0x1.2:false::\n"

    def test_deleted_param_is_a_bare_key_and_set_param_is_key_equals_value(self):
        line = p.Encoder().answer("i", True, "new.name", "rv", {"gone": None, "k": "a:b", "e": ""})
        assert line == b"%%<message:i:true:new.name:rv:gone:k=a%zb:e=\n"

    def test_id_is_echoed_as_received_not_escaped(self):
        # Yate compares the holder id literally (reference §1.4.2).
        assert p.Encoder().answer("a%b", True, "", "", None) == b"%%<message:a%b:true::\n"

    @pytest.mark.parametrize("mid", ["a:b", "a\nb", ""])
    def test_answer_with_an_id_that_cannot_be_echoed_raises(self, mid):
        with pytest.raises(LocalProtocolError):
            p.Encoder().answer(mid, True, "", "", None)


class TestYateSideRoundTrip:
    """yate_message_line / yate_answer_line (what Yate writes) -> parse_yate_line."""

    @given(IDS, TIMES, VALUES, VALUES, YATE_PARAM_LISTS)
    @example("0x1.2", 0, "m", "", [("a=b", "c"), ("a=b", "d"), ("", "")][:2])
    @example("0x1.2", 0, "m", "", [("k", ""), ("k", ""), ("j", "=")])
    def test_message_from_yate_round_trips_with_duplicates_in_order(self, mid, time, name, retval, params):
        msg = Message(name, params, retval)
        line = p.yate_message_line(msg, mid, time)
        # Message keeps per-name order (first values, then later duplicates): Yate's encoder
        # fed that same order writes the same bytes.
        assert line == encode_message_line(wire(mid), time, WireMessage(
            wire(name), wire(retval), [(wire(k), wire(v)) for k, v in msg.items()])) + b"\n"

        ev = p.parse_yate_line(line[:-1])
        assert isinstance(ev, p.MessageReceived)
        got = ev.message
        assert (got.id, got.time, got.name, got.retval) == (mid, time, name, retval)
        assert list(got.items()) == list(msg.items())
        assert sorted(got.items()) == sorted(params)
        for k, _ in params:
            assert got.getall(k) == [v for kk, v in params if kk == k]
            assert got[k] == next(v for kk, v in params if kk == k)
        assert len(got) == len(params)

    @pytest.mark.parametrize("answer", [False, True])
    def test_a_name_prefix_deleted_by_a_handler_no_longer_counts(self, answer):
        """has_prefix searches the line; a param deleted since is still on it, so a message
        with deletions is answered from what it holds now."""
        m = Message("sip.message", {"xsip_body.1": "x", "xsip_type": "text/plain"})
        line = (p.yate_answer_line(m, "0x1.2", True) if answer
                else p.yate_message_line(m, "0x1.2", 0))[:-1]
        msg = p.parse_yate_line(line).message
        assert msg.has_prefix(("xsip_body.", "xsip_type."))
        del msg["xsip_body.1"]
        assert not msg.has_prefix("xsip_body.")
        msg["xsip_body.2"] = "y"
        assert msg.has_prefix("xsip_body.")

    def test_forwarded_params_are_those_of_each_message_when_values_repeat(self):
        """wire_params keeps what it joined per set of values: messages that share them share
        the result, one that differs in a forwarded value gets its own, and a message a
        handler changed is read as it is now."""
        keys = ("ip_host", "ip_port", "antiloop")

        def request(port: str, extra: str) -> Message:
            m = Message("sip.message", {"ip_host": "192.0.2.7", "ip_port": port,
                                        "antiloop": "19", "other": extra})
            return p.parse_yate_line(p.yate_message_line(m, "0x1.1", 0)[:-1]).message

        a, b, c = request("5060", "1"), request("5060", "2"), request("5070", "1")
        assert a.wire_params(keys) == b.wire_params(keys) == (
            ":ip_host=192.0.2.7:ip_port=5060:antiloop=19")
        assert c.wire_params(keys) == ":ip_host=192.0.2.7:ip_port=5070:antiloop=19"
        assert a.wire_params(keys[:2]) == ":ip_host=192.0.2.7:ip_port=5060"
        b["ip_port"] = "5:1"
        assert b.wire_params(keys) == ":ip_host=192.0.2.7:ip_port=5%z1:antiloop=19"
        assert a.wire_params(keys) == ":ip_host=192.0.2.7:ip_port=5060:antiloop=19"

    @given(IDS, st.booleans(), VALUES, YATE_PARAM_LISTS, st.lists(YATE_NAMES, max_size=4))
    @example("0x1.2", False, "m", [("k", "1"), ("k", "2"), ("x.y", "")], ["k", "x", "x."])
    @example("0x1.2", True, "m", [("a", "%:"), ("b=c", "d")], ["a", "b=c", "b"])
    def test_lazy_reads_see_what_decoding_everything_sees(self, mid, answer, name, params,
                                                          asked):
        """A request is read through its one-split index, an answer by searching its line:
        either way each read, the forwarded wire form and the name-prefix test agree with
        the whole decoded list (the first value of a name wins, as Yate's getParam)."""
        msg = Message(name, params)
        line = (p.yate_answer_line(msg, mid, True) if answer
                else p.yate_message_line(msg, mid, 0))[:-1]
        lazy = p.parse_yate_line(line).message
        full = p.parse_yate_line(line).message
        decoded = full.params  # the first value of each name
        names = [k for k, _ in params] + asked
        plain = tuple(k for k in names if k and "=" not in k and p.escape(k) == k)
        want = "".join(":" + k + "=" + p.escape(decoded[k]) for k in plain if decoded.get(k))
        assert lazy.wire_params(plain) == want
        for k in names:
            assert lazy.get(k) == decoded.get(k)
        for pre in plain:
            assert lazy.has_prefix(pre) == any(k.startswith(pre) for k in decoded)

    @given(IDS, st.booleans(), VALUES, YATE_PARAM_LISTS, st.lists(YATE_NAMES, max_size=4),
           st.data())
    @example("0x1.2", False, "m", [("a", "x%:y"), ("b", "1")], ["a"], None)
    def test_wire_forms_stay_as_they_came_until_changed(self, mid, answer, name, params, asked,
                                                         data):
        """A param read (and so unescaped) is still forwarded as it came on the line; once
        set or deleted, its new value is escaped from what was set, and the untouched
        index is no longer offered whole."""
        msg = Message(name, params)
        line = (p.yate_answer_line(msg, mid, True) if answer
                else p.yate_message_line(msg, mid, 0))[:-1]
        lazy = p.parse_yate_line(line).message
        decoded = p.parse_yate_line(line).message.params
        names = [k for k, _ in params] + asked
        plain = tuple(dict.fromkeys(k for k in names if k and "=" not in k
                                    and p.escape(k) == k))
        for k in names:
            lazy.get(k)  # the reads cache unescaped values
        want = {k: p.escape(decoded[k]) for k in plain if k in decoded}
        assert lazy.wire_params(plain) == "".join(":" + k + "=" + v for k, v in want.items() if v)
        for k in plain:
            assert lazy.wire(k) == want.get(k)
        values = lazy.wire_values()
        if answer or any(k not in plain for k in names):
            # an answer is searched, not indexed; reading a name whose wire form differs
            # decoded the whole list
            assert values is None
        else:
            assert values is not None
            for k in plain:
                assert values.get(k) == want.get(k)
        if not plain or data is None:
            return
        changed = data.draw(st.sampled_from(plain))
        new = data.draw(VALUES)
        lazy[changed] = new
        want[changed] = p.escape(new)
        dropped = data.draw(st.sampled_from(plain))
        if dropped != changed:
            del lazy[dropped]
            want.pop(dropped, None)
        assert lazy.wire_values() is None
        assert lazy.wire_params(plain) == "".join(":" + k + "=" + v for k, v in want.items() if v)
        for k in plain:
            assert lazy.wire(k) == want.get(k)

    @given(IDS | st.just(""), st.booleans(), VALUES, VALUES, YATE_PARAM_LISTS)
    @example("", True, "call.route", "", [])
    def test_answer_and_watch_lines_from_yate_round_trip(self, mid, handled, name, retval, params):
        msg = Message(name, params, retval)
        line = p.yate_answer_line(msg, mid, handled)
        assert line == encode_answer_line(wire(mid), handled, WireMessage(
            wire(name), wire(retval), [(wire(k), wire(v)) for k, v in msg.items()])) + b"\n"

        ev = p.parse_yate_line(line[:-1])
        if mid:
            assert isinstance(ev, p.AnswerReceived)
            assert ev.id == mid
            assert ev.message.id == mid
        else:
            assert isinstance(ev, p.WatchReceived)
        assert ev.handled is handled
        assert (ev.message.name, ev.message.retval) == (name, retval)
        for k, _ in params:
            assert ev.message.getall(k) == [v for kk, v in params if kk == k]

    @given(st.lists(_bytes(drop=b"\x00:", drop_ctrl=True, max_pieces=4), min_size=3, max_size=8),
           st.booleans())
    @example([b"i", b"m", b"r", b"k=a%%z", b"j=%%%z"], False)
    @example([b"i", b"m", b"r", b"k=a%"], False)
    @example([b"i", b"m", b"r", b"a%", b"k=v"], True)
    @example([b"i", b"m", b"r", b"k%}=%%}", b"k=%}"], False)
    @example([b"i", b"m\xef\xbf\xbf%%", b"r", b"k=\xef\xbf\xbf"], True)
    @example([b"%%", b"%z", b"%%%z", b"=", b"x"], False)
    def test_parse_yate_line_unescapes_fields_exactly_like_yate(self, fields, answer):
        """Differential: any fields, valid escapes or not, against yate_rules' msgUnescape."""
        mid, name, retval, *chunks = fields
        line = (b"%%<message:" if answer else b"%%>message:") + \
            b":".join([mid, b"true" if answer else b"0", name, retval] + chunks)

        def model():
            head = [yate_unescape(f) for f in (mid, name, retval)]
            params = []
            for c in chunks:
                if not c:
                    continue  # Yate skips empty chunks
                k, sep, v = c.partition(b"=")
                if sep and not k:
                    raise YateDecodeError("chunk begins with '='", 0, b"")
                k = yate_unescape(k, b"=")  # Yate writes '=' in names as %}
                if sep:
                    params.append((k, yate_unescape(v)))
            return head, params

        try:
            (e_id, e_name, e_retval), e_params = model()
        except YateDecodeError:
            with pytest.raises(RemoteProtocolError):
                p.parse_yate_line(line)
            return
        ev = p.parse_yate_line(line)
        if answer:
            assert isinstance(ev, p.AnswerReceived if e_id else p.WatchReceived)
        m = ev.message
        assert (wire(m.id), wire(m.name), wire(m.retval)) == (e_id, e_name, e_retval)
        got = [(wire(k), wire(v)) for k, v in m.items()]
        assert sorted(got) == sorted(e_params)
        for k, _ in e_params:
            assert [wire(v) for v in m.getall(text(k))] == [v for kk, v in e_params if kk == k]

    def test_param_name_with_equals_arrives_as_percent_brace_and_is_decoded(self):
        ev = p.parse_yate_line(b"%%>message:0x1.2:100:m:rv:a%}b=c=d:x=")
        assert list(ev.message.items()) == [("a=b", "c=d"), ("x", "")]

    @pytest.mark.parametrize("raw", [
        b"%%>message:0x1.2:100:m%}:rv",      # %} is only valid in a param name
        b"%%>message:0x1.2:100:m:r%}",
        b"%%>message:0x1.2:100:m:rv:k=v%}",
    ])
    def test_percent_brace_outside_a_param_name_is_refused(self, raw):
        with pytest.raises(RemoteProtocolError):
            p.parse_yate_line(raw)

    def test_duplicate_params_are_kept_in_order(self):
        ev = p.parse_yate_line(b"%%>message:0x1.2:1:sip.message::username=123:realm=Yate:username=456")
        msg = ev.message
        assert msg["username"] == "123"
        assert msg.getall("username") == ["123", "456"]
        assert msg.extra == [("username", "456")]
        assert list(msg.items()) == [("username", "123"), ("realm", "Yate"), ("username", "456")]

    def test_non_utf8_bytes_survive_as_surrogates(self):
        ev = p.parse_yate_line(b"%%>message:0x1.2:1:m::k=\xff\xc3")
        assert ev.message["k"] == "\udcff\udcc3"
        assert wire(ev.message["k"]) == b"\xff\xc3"
        line = p.Encoder().answer("0x1.2", True, "", "", {"k": ev.message["k"]})
        assert line == b"%%<message:0x1.2:true:::k=\xff\xc3\n"

    def test_escaped_control_bytes_decode(self):
        ev = p.parse_yate_line(b"%%>message:0x1.2:1:m::xsip_body=a%M%Jb%zc%%")
        assert ev.message["xsip_body"] == "a\r\nb:c%"


# === every encoded line passes Yate's rules, per keyword ==========================================

SETLOCALS = st.one_of(
    st.tuples(st.sampled_from(["restart", "timebomb", "reenter", "setdata", "settime", "selfwatch"]),
              st.booleans()),
    st.tuples(st.just("bufsize"), st.integers(2048, 65536)),
    st.tuples(st.just("timeout"), st.integers(0, 2**31 - 2)),
    st.tuples(st.just("maxqueue"), st.integers(0, 10000)),
    st.tuples(st.just("debuglevel"), st.integers(1, 10)),
    st.tuples(st.sampled_from(["trackparam", "reason", "debugname"]), RAW_NAMES),
    st.tuples(st.sampled_from(["engine.version", "config.general.x", "loaded.ysipchan", "runid"]),
              st.just("")),
)


class TestEveryKeywordFollowsYateRules:
    @given(RAW_NAMES, st.none() | st.integers(0, 2**31 - 2), NAMES, st.none() | VALUES)
    @example("sip.message", None, None, None)
    @example("chan.notify", 100, "targetid", "")
    def test_install_line(self, name, priority, fname, fvalue):
        line = p.Encoder().install(name, priority, fname, fvalue)
        head = line[:-1].split(b":")
        assert head[0] == b"%%>install"
        assert head[1] == str(100 if priority is None else priority).encode()  # always a priority
        assert head[2] == wire(name)
        if priority is not None and priority < 0:
            return  # Yate reads it as unsigned; the linter says so, the line is still well formed
        assert_yate_accepts(line)
        yate = parse_install(line[len(b"%%>install:"):-1])
        assert yate.name == wire(name)
        assert yate.priority == (100 if priority is None else priority)
        assert yate.filter_name == (None if fname is None else wire(fname))
        if fname is not None:
            assert yate.filter_value == wire(fvalue or "")
        ev = p.parse_script_line(line[:-1])
        assert ev == p.Install(name, 100 if priority is None else priority, fname,
                               fvalue if fname is not None else None)

    def test_install_without_priority_writes_the_default_so_a_filter_cannot_shift(self):
        line = p.Encoder().install("sip.w", None, "fname", "fval")
        assert line == b"%%>install:100:sip.w:fname:fval\n"
        assert parse_install(line[11:-1]).name == b"sip.w"

    @pytest.mark.parametrize("kw", ["uninstall", "watch", "unwatch"])
    @given(name=RAW_NAMES)
    def test_raw_name_keywords(self, kw, name):
        line = getattr(p.Encoder(), kw)(name)
        assert line == b"%%>" + kw.encode() + b":" + wire(name) + b"\n"
        assert_yate_accepts(line)
        assert p.parse_script_line(line[:-1]) == {"uninstall": p.Uninstall, "watch": p.Watch,
                                                  "unwatch": p.Unwatch}[kw](name)

    def test_watch_with_empty_name_watches_everything(self):
        assert p.Encoder().watch("") == b"%%>watch:\n"
        assert_yate_accepts(p.Encoder().watch(""))

    @given(SETLOCALS)
    def test_setlocal_line(self, nv):
        name, value = nv
        line = p.Encoder().setlocal(name, value)
        assert_yate_accepts(line)
        sent = "true" if value is True else "false" if value is False else str(value)
        assert line == f"%%>setlocal:{name}:".encode() + wire(sent) + b"\n"
        assert parse_setlocal(line[len(b"%%>setlocal:"):-1]) == (wire(name), wire(sent))
        assert p.parse_script_line(line[:-1]) == p.SetLocal(name, sent)

    @pytest.mark.parametrize("value,wire_value", [(True, b"true"), (False, b"false")])
    def test_setlocal_booleans_are_true_or_false(self, value, wire_value):
        assert p.Encoder().setlocal("restart", value) == b"%%>setlocal:restart:" + wire_value + b"\n"

    @pytest.mark.parametrize("value", [1, 0, "1", "True", "maybe"])
    def test_setlocal_boolean_setting_refuses_a_non_boolean_value(self, value):
        with pytest.raises(LocalProtocolError):
            p.Encoder().setlocal("restart", value)

    @given(_bytes(drop=b"\x00", drop_ctrl=True).map(text))
    def test_output_line(self, s):
        line = p.Encoder().output(s)
        assert line == b"%%>output:" + wire(s) + b"\n"
        assert_yate_accepts(line)

    @given(st.integers(-5, 20), VALUES)
    def test_debug_line(self, level, s):
        line = p.Encoder().debug(level, s)
        assert_yate_accepts(line)
        assert p.parse_script_line(line[:-1]) == p.Debug(min(max(level, 1), 10), s)

    @pytest.mark.parametrize("role", ["global", "channel"])
    def test_connect_line(self, role):
        assert p.Encoder().connect(role) == f"%%>connect:{role}\n".encode()
        assert_yate_accepts(p.Encoder().connect(role), role_known=False)
        line = p.Encoder().connect(role, "chan/1", "nodata")
        assert line == f"%%>connect:{role}:chan/1:nodata\n".encode()
        assert p.parse_script_line(line[:-1]) == p.Connect(role, "chan/1", "nodata")

    def test_quit_line(self):
        assert p.Encoder().quit() == b"%%>quit\n"
        assert_yate_accepts(p.Encoder().quit())
        assert p.parse_script_line(b"%%>quit") == p.Quit()


# === API rejection ================================================================================

WITH_COLON_OR_CTRL = st.tuples(RAW_NAMES | st.just(""), st.sampled_from(
    [":", "\x01", "\t", "\r", "\n", "\x1f", "\x00"]), RAW_NAMES | st.just("")).map("".join)


class TestApiRejection:
    @pytest.mark.parametrize("bad", ["", "a=b", "="])
    def test_message_with_an_unsendable_param_name_is_refused(self, bad):
        with pytest.raises(LocalProtocolError):
            p.Encoder().message(Message("m", [("ok", "1"), (bad, "v")]), "i")

    @pytest.mark.parametrize("bad", ["", "a=b", "="])
    @pytest.mark.parametrize("value", ["v", None])
    def test_answer_with_an_unsendable_param_name_is_refused(self, bad, value):
        with pytest.raises(LocalProtocolError):
            p.Encoder().answer("i", True, "", "", {"ok": "1", bad: value})

    @pytest.mark.parametrize("kw", ["install", "uninstall", "watch", "unwatch"])
    @given(name=WITH_COLON_OR_CTRL)
    def test_raw_name_with_colon_or_control_byte_is_refused(self, kw, name):
        with pytest.raises(LocalProtocolError):
            getattr(p.Encoder(), kw)(name)

    @given(name=WITH_COLON_OR_CTRL)
    def test_setlocal_name_with_colon_or_control_byte_is_refused(self, name):
        with pytest.raises(LocalProtocolError):
            p.Encoder().setlocal(name, "x")

    @given(value=WITH_COLON_OR_CTRL)
    def test_setlocal_value_with_colon_or_control_byte_is_refused(self, value):
        with pytest.raises(LocalProtocolError):
            p.Encoder().setlocal("reason", value)

    @pytest.mark.parametrize("value", [" x", "x ", "\tx"])
    def test_setlocal_value_yate_would_trim_is_refused(self, value):
        with pytest.raises(LocalProtocolError):
            p.Encoder().setlocal("reason", value)

    def test_setlocal_and_install_need_a_name(self):
        with pytest.raises(LocalProtocolError):
            p.Encoder().setlocal("", "x")
        with pytest.raises(LocalProtocolError):
            p.Encoder().install("")
        with pytest.raises(LocalProtocolError):
            p.Encoder().install("m", 100, "")

    @given(s=st.tuples(VALUES, st.sampled_from(["\x01", "\t", "\r", "\n", "\x1f", "\x00"]), VALUES)
           .map("".join))
    def test_output_with_a_control_byte_is_refused(self, s):
        with pytest.raises(LocalProtocolError):
            p.Encoder().output(s)

    @given(role=st.text(max_size=10))
    @example("play")
    @example("record")
    @example("playrec")
    @example("Global")
    @example("")
    def test_connect_role_other_than_global_or_channel_is_refused(self, role):
        if role in ("global", "channel"):
            return
        with pytest.raises(LocalProtocolError):
            p.Encoder().connect(role)

    @pytest.mark.parametrize("field", ["id", "type"])
    def test_connect_raw_fields_with_colon_are_refused(self, field):
        kw = {"id": "a:b", "type": None} if field == "id" else {"id": "a", "type": "x:y"}
        with pytest.raises(LocalProtocolError):
            p.Encoder().connect("global", **kw)

    def test_text_that_is_not_utf8_encodable_is_a_local_error(self):
        with pytest.raises(LocalProtocolError):
            p.Encoder().message(Message("m", {"k": "\ud800"}), "i")  # a lone high surrogate
        with pytest.raises(LocalProtocolError):
            p.Encoder().output("\ud800")

    @pytest.mark.parametrize("where", ["id", "value", "param name", "name", "retval", "answer value",
                                       "answer name", "answer retval", "deleted key", "debug",
                                       "filter name", "filter value"])
    def test_nul_in_an_escaped_field_is_refused(self, where):
        # Yate would need '%@' for NUL, which its own decoder refuses; a C string cannot hold it.
        e = p.Encoder()
        calls = {
            "id": lambda: e.message(Message("m"), "a\x00"),
            "value": lambda: e.message(Message("m", {"k": "a\x00b"}), "i"),
            "param name": lambda: e.message(Message("m", {"k\x00": "v"}), "i"),
            "name": lambda: e.message(Message("m\x00"), "i"),
            "retval": lambda: e.message(Message("m", retval="\x00"), "i"),
            "answer value": lambda: e.answer("i", True, "", "", {"k": "\x00"}),
            "answer name": lambda: e.answer("i", True, "\x00", "", None),
            "answer retval": lambda: e.answer("i", True, "", "a\x00", None),
            "deleted key": lambda: e.answer("i", True, "", "", {"\x00": None}),
            "debug": lambda: e.debug(5, "\x00"),
            "filter name": lambda: e.install("m", 100, "f\x00", "v"),
            "filter value": lambda: e.install("m", 100, "f", "\x00"),
        }
        with pytest.raises(LocalProtocolError):
            calls[where]()

    @given(VALUES, VALUES, st.integers(0, 5))
    def test_nul_anywhere_in_a_message_or_answer_is_refused(self, before, after, where):
        bad = before + "\x00" + after
        e = p.Encoder()
        with pytest.raises(LocalProtocolError):
            if where == 0:
                e.message(Message("m", {"k": bad}), "i")
            elif where == 1:
                e.message(Message(bad, {"k": "v"}), "i")
            elif where == 2:
                e.message(Message("m", {"k": "v"}, retval=bad), "i")
            elif where == 3:
                e.answer("i", False, "", "", {"a": "1", "k": bad})
            elif where == 4:
                e.answer("i", False, bad, "", {"a": None})
            else:
                e.answer("i", False, "", bad, None)

    @pytest.mark.parametrize("time", [-1, 2**32])
    def test_message_time_yate_would_refuse_is_refused(self, time):
        with pytest.raises(LocalProtocolError):
            p.Encoder().message(Message("m"), "i", time)

    @pytest.mark.parametrize("priority", [-5, 2**31 - 1, 2**40])
    def test_install_priority_yate_would_misread_is_refused(self, priority):
        with pytest.raises(LocalProtocolError):
            p.Encoder().install("m", priority)

    def test_install_filter_value_without_filter_name_is_refused(self):
        with pytest.raises(LocalProtocolError):
            p.Encoder().install("m", 100, None, "v")


class TestLineLimit:
    @pytest.mark.parametrize("bufsize", [2048, 8192, 65536])
    def test_limit_is_bufsize_minus_two_bytes_excluding_the_newline(self, bufsize):
        e = p.Encoder(bufsize)
        limit = bufsize - 2
        ok = e.output("x" * (limit - len("%%>output:")))
        assert len(ok) == limit + 1
        assert_yate_accepts(ok, bufsize=bufsize)
        with pytest.raises(LineTooLong) as ei:
            e.output("x" * (limit - len("%%>output:") + 1))
        assert isinstance(ei.value, LocalProtocolError)
        assert (ei.value.size, ei.value.limit) == (limit + 1, limit)
        assert check_script_line(b"%%>output:" + b"x" * (limit - 9), bufsize=bufsize) != []

    def test_limit_counts_bytes_not_characters(self):
        e = p.Encoder()
        assert len(e.output("\xe9" * 4090)) == 8191
        with pytest.raises(LineTooLong):
            e.output("\xe9" * 4091)

    def test_limit_counts_the_escaped_size(self):
        e = p.Encoder()
        with pytest.raises(LineTooLong) as ei:
            e.message(Message("m", {"k": ":" * 4100}), "i")  # 4100 chars, 8200 bytes escaped
        assert ei.value.size > 8190

    @pytest.mark.parametrize("method,args", [
        ("message", (Message("m", {"k": "v" * 9000}), "i")),
        ("answer", ("i", True, "", "v" * 9000, None)),
        ("install", ("m" * 9000,)),
        ("uninstall", ("m" * 9000,)),
        ("watch", ("m" * 9000,)),
        ("unwatch", ("m" * 9000,)),
        ("setlocal", ("reason", "r" * 9000)),
        ("output", ("o" * 9000,)),
        ("debug", (5, "d" * 9000)),
    ])
    def test_every_keyword_checks_the_limit(self, method, args):
        with pytest.raises(LineTooLong):
            getattr(p.Encoder(), method)(*args)
        assert getattr(p.Encoder(65536), method)(*args).endswith(b"\n")

    def test_long_lines_from_yate_have_no_limit(self):
        body = b"x" * 200_000
        ev = p.parse_yate_line(b"%%>message:0x1.2:1:sip.publish::xsip_body=" + body + b"%M%J")
        assert ev.message["xsip_body"] == "x" * 200_000 + "\r\n"


# === decoding Yate's lines ========================================================================


class TestParseYateLine:
    @pytest.mark.parametrize("raw,expected", [
        (b"%%<setlocal:config.a.b:x:y:true", p.SetLocalReplied("config.a.b", "x:y", True)),
        (b"%%<setlocal:config.a.b:x:y:z::false", p.SetLocalReplied("config.a.b", "x:y:z:", False)),
        (b"%%<setlocal:config.sect::true", p.SetLocalReplied("config.sect", "", True)),
        (b"%%<setlocal:bufsize:65536:true", p.SetLocalReplied("bufsize", "65536", True)),
        (b"%%<setlocal:restart:false:true", p.SetLocalReplied("restart", "false", True)),
        (b"%%<setlocal:engine.workpath:/var/x:true", p.SetLocalReplied("engine.workpath", "/var/x", True)),
        (b"%%<setlocal:nosuch:a%b:false", p.SetLocalReplied("nosuch", "a%b", False)),  # raw, no unescape
        (b"%%<install:100:sip.message:true", p.InstallReplied(100, "sip.message", True)),
        (b"%%<install:50:x.y:false", p.InstallReplied(50, "x.y", False)),
        (b"%%<install:-5:x:true", p.InstallReplied(-5, "x", True)),
        (b"%%<uninstall:0:x:false", p.UninstallReplied(0, "x", False)),
        (b"%%<uninstall:100:sip.subscribe:true", p.UninstallReplied(100, "sip.subscribe", True)),
        (b"%%<watch:user.register:true", p.WatchReplied("user.register", True)),
        (b"%%<watch::true", p.WatchReplied("", True)),
        (b"%%<unwatch:x:false", p.UnwatchReplied("x", False)),
        (b"%%<quit", p.QuitReplied()),
        (b"Error in: %%>bogus:line", p.ErrorInReceived("%%>bogus:line")),
        (b"Error in: %%>message:a\x01b", p.ErrorInReceived("%%>message:a\x01b")),  # raw echo
        (b"%%<quit\r", p.QuitReplied()),
    ])
    def test_keyword_replies(self, raw, expected):
        assert p.parse_yate_line(raw) == expected

    @pytest.mark.parametrize("raw", [
        b"%%<setlocal:bufsize:true",          # no value field
        b"%%<setlocal:a:b:maybe",             # last field not a boolean
        b"%%<setlocal:a:b:1",
        b"%%<install:abc:x:true",             # priority not a number
        b"%%<install:100:true",               # no name field
        b"%%<install:100:x:True",
        b"%%<watch:x",
        b"%%<unwatch:x:yes please",
        b"%%<quit:now",
        b"Error in:no-space",
        b"%%>install:100:x",                  # a script keyword, never sent by Yate
        b"hello",
    ])
    def test_malformed_keyword_replies_are_remote_errors(self, raw):
        with pytest.raises(RemoteProtocolError) as ei:
            p.parse_yate_line(raw)
        assert isinstance(ei.value, ProtocolError)
        assert ei.value.line is not None

    def test_watch_notification_has_an_empty_id(self):
        ev = p.parse_yate_line(b"%%<message::true:user.register::number=234:handlers=regfile%z100")
        assert isinstance(ev, p.WatchReceived)
        assert ev.handled is True
        assert ev.message.name == "user.register"
        assert ev.message["handlers"] == "regfile:100"

    def test_answer_to_our_dispatch_has_its_id(self):
        ev = p.parse_yate_line(b"%%<message:sg1.7:false:call.route::error=offline")
        assert ev == p.AnswerReceived("sg1.7", False, ev.message)
        assert ev.message.id == "sg1.7"
        assert ev.message["error"] == "offline"

    def test_answer_without_params_ends_with_the_retval(self):
        ev = p.parse_yate_line(b"%%<message:sg1.7:true:xsip.generate:")
        assert (ev.handled, ev.message.name, ev.message.retval, len(ev.message)) == \
            (True, "xsip.generate", "", 0)

    def test_message_from_yate(self):
        ev = p.parse_yate_line(b"%%>message:0x55d5c6f0a1b0.1804289383:1764190000:sip.subscribe:rv:"
                               b"sip_event=presence:address=127.0.0.1%z5080\r")
        m = ev.message
        assert (m.id, m.time, m.name, m.retval) == ("0x55d5c6f0a1b0.1804289383", 1764190000,
                                                    "sip.subscribe", "rv")
        assert m["address"] == "127.0.0.1:5080"

    @pytest.mark.parametrize("raw", [b"", b"\r"])
    def test_empty_line_is_nothing(self, raw):
        assert p.parse_yate_line(raw) is None

    @pytest.mark.parametrize("raw", [
        b"%%<message:id:1:m:",                # 1 is not a boolean
        b"%%<message:id:True:m:",
        b"%%<message:id:true:m",              # only 3 fields
        b"%%<message:id:true",
        b"%%>message:id:0:m",                 # no ':' after the name
        b"%%>message:id:abc:m:",              # time not a number
        b"%%>message:id:0:m:rv:=v",           # chunk starting with '='
        b"%%>message:id:0:m:r%",              # trailing '%'
        b"%%>message:id:0:m:r%a",             # bad escape
        b"%%>message:id:0:m:r%@",
        b"%%>message:id:0:m:r\tx",            # raw control byte
        b"%%>message:i%d:0:m:",
        b"%%<message:id:true:m:r:k=%}",
    ])
    def test_malformed_message_lines_are_remote_errors(self, raw):
        with pytest.raises(RemoteProtocolError):
            p.parse_yate_line(raw)

    @pytest.mark.parametrize("reply", [
        p.InstallReplied(100, "sip.message", True), p.UninstallReplied(0, "x", False),
        p.WatchReplied("", True), p.UnwatchReplied("engine.timer", False),
        p.SetLocalReplied("config.a.b", "http://x:80/", True), p.SetLocalReplied("bufsize", "8192", False),
        p.QuitReplied(), p.ErrorInReceived("%%>what"),
    ])
    def test_yate_reply_line_round_trips(self, reply):
        line = p.yate_reply_line(reply)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert p.parse_yate_line(line[:-1]) == reply

    @given(RAW_NAMES, _bytes(drop=b"\x00", drop_ctrl=True).map(text), st.booleans())
    def test_setlocal_reply_value_keeps_its_colons(self, name, value, ok):
        line = p.yate_reply_line(p.SetLocalReplied(name, value, ok))
        assert p.parse_yate_line(line[:-1]) == p.SetLocalReplied(name, value, ok)


_KEYWORDS = [b"%%>message:", b"%%<message:", b"%%<message::", b"%%<install:", b"%%<uninstall:",
             b"%%<watch:", b"%%<unwatch:", b"%%<setlocal:", b"%%<quit", b"Error in: ", b""]
_FIELDS = st.one_of(_PIECES, st.sampled_from([b"true", b"false", b"0", b"12", b"0x10", b"-1", b"010",
                                              b"k=v", b"=v", b"%}=", b"a%}b=c", b"\r", b""]))
GARBAGE_LINES = st.one_of(
    st.binary(max_size=80),
    st.tuples(st.sampled_from(_KEYWORDS), st.lists(_FIELDS, max_size=8))
    .map(lambda t: t[0] + b":".join(t[1])),
)


class TestGarbage:
    @given(GARBAGE_LINES)
    @example(b"%%>message:::::")
    @example(b"%%<message:::::")
    @example(b"%%<setlocal:::")
    @example(b"%%<install:::")
    @example(b"%%>message:i:0x:m:")
    @example(b"%%>message:i: 5:m:")
    def test_parse_yate_line_raises_only_remote_protocol_error(self, raw):
        try:
            ev = p.parse_yate_line(raw)
        except RemoteProtocolError as e:
            assert e.line is not None or e.reason
            return
        assert ev is None or isinstance(ev, FROM_YATE_TYPES)

    @pytest.mark.parametrize("time", ["\u00b2".encode(), "\u2460".encode(), b"1" * 5000],
                             ids=["superscript-two", "circled-one", "5000-digits"])
    def test_time_field_of_unicode_digits_or_thousands_of_digits_is_a_remote_error(self, time):
        try:
            p.parse_yate_line(b"%%>message:0x1.2:" + time + b":m:")
        except RemoteProtocolError:
            pass


class TestParseScriptLineFidelity:
    """parse_script_line is what the tools and the fake Yate use to read our lines."""

    @pytest.mark.parametrize("raw", [b"%%<message:i:true::", b"%%>install:100:x:f:v:w",
                                     b"%%>message:i:0x10:m:", b"%%>debug:5:a%zb"])
    def test_lines_yate_accepts_are_accepted(self, raw):
        assert check_script_line(raw) == []
        assert p.parse_script_line(raw) is not None

    def test_answer_with_nothing_after_the_processed_field_is_accepted(self):
        assert p.parse_script_line(b"%%<message:i:true:") is not None

    def test_install_filter_value_may_contain_raw_colons(self):
        assert p.parse_script_line(b"%%>install:100:x:f:v:w") == p.Install("x", 100, "f", "v:w")

    @pytest.mark.parametrize("raw", [b"%%>message:i:0:m", b"%%<message:i:1:m:", b"%%>setlocal:x",
                                     b"%%>setlocal::v", b"%%>debug:5", b"%%>nope", b"%%>quit:"])
    def test_lines_yate_refuses_are_remote_errors(self, raw):
        assert check_script_line(raw) != []
        with pytest.raises(RemoteProtocolError):
            p.parse_script_line(raw)

    def test_repeated_param_in_a_script_message_keeps_the_last_value_and_bare_key_deletes(self):
        ev = p.parse_script_line(b"%%>message:i:0:m::d=1:d=2:e=1:e")
        assert list(ev.message.items()) == [("d", "2")]

    def test_octal_time_is_read_like_strtoul(self):
        assert p.parse_script_line(b"%%>message:i:010:m:").message.time == 8

    def test_octal_install_priority_is_read_like_strtol(self):
        assert p.parse_script_line(b"%%>install:010:x").priority == 8

    @pytest.mark.parametrize("raw", [b"%%>output:\xc2\xa0x\xe2\x80\x83", b"%%>setlocal:reason:\xc2\xa0x"])
    def test_only_spaces_and_tabs_are_trimmed(self, raw):
        ev = p.parse_script_line(raw)
        got = ev.text if isinstance(ev, p.Output) else ev.value
        assert wire(got) == trim_blanks(raw.split(b":", 2)[-1] if b"setlocal" in raw else raw[10:])
