"""The sans-I/O session (``yate_sipgen.session.Session``): framing, bookkeeping, exactly-once.

Yate's side is played with the codec's Yate-side encoders (``yate_message_line`` and friends)
and with ``tests/yate_rules.py`` (``check_script_line`` for every line we write,
``decode_answer`` to apply our answers to the message the way Yate does).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from yate_rules import WireMessage, check_script_line, decode_answer

from yate_sipgen import protocol as p
from yate_sipgen.errors import LineTooLong, LocalProtocolError, RemoteProtocolError
from yate_sipgen.message import Message
from yate_sipgen.session import BadLineReceived, Session, is_sip

# --- helpers ------------------------------------------------------------------------------------


def wire(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def out_lines(s: Session, bufsize: int | None = None) -> list[bytes]:
    """Drain the session's output; every line must be one Yate accepts."""
    data = s.data_to_send()
    if not data:
        return []
    assert data.endswith(b"\n")
    lines = data[:-1].split(b"\n")
    for line in lines:
        problems = check_script_line(line, bufsize=bufsize or s.bufsize)
        assert problems == [], (line[:200], problems)
    return lines


def receive(s: Session, name: str = "call.route", params=None, retval: str = "rv", *,
            mid: str = "0x55d5c6f0a1b0.1804289383", now: float = 0.0) -> Message:
    events = s.receive_data(p.yate_message_line(Message(name, params or {}, retval), mid), now)
    assert len(events) == 1 and isinstance(events[0], p.MessageReceived), events
    return events[0].message


FROM_YATE_TYPES = (p.MessageReceived, p.AnswerReceived, p.WatchReceived, p.InstallReplied,
                   p.UninstallReplied, p.WatchReplied, p.UnwatchReplied, p.SetLocalReplied,
                   p.QuitReplied, p.ErrorInReceived)

_PIECES = st.one_of(
    st.sampled_from([b":", b"%", b"=", b"%z", b"%}", b"%%", b"\r\n", b"\t", b"\x1f", b"\xff",
                     b"\xc3\xa9", b" ", b"a"]),
    st.binary(max_size=5),
)
VALUES = st.lists(_PIECES, max_size=5).map(lambda ps: text(b"".join(ps).replace(b"\x00", b"")))
NAMES = st.sampled_from(["a", "b", "c", "caller", "called", "sip_to", "x:y", "%", "\xe9"])
#: Names Yate may send; the handler never touches the '=' one (it could not send it back).
YATE_NAMES = NAMES | st.just("a=b")


# === receiving ====================================================================================


class TestReceiving:
    def test_message_from_yate_is_pending_with_a_deadline(self):
        s = Session(answer_within=4.0)
        msg = receive(s, now=100.0)
        assert s.incoming == {msg.id: msg}
        assert (msg.received_at, msg.deadline) == (100.0, 104.0)
        assert not msg.answered
        assert s.next_deadline() == 104.0

    def test_line_split_anywhere_decodes_the_same(self):
        line = p.yate_message_line(Message("sip.message", {"a": "1", "b": "x:y"}), "0x1.2") + \
            b"%%<watch:x:true\r\n"
        for cut in range(1, len(line)):
            s = Session()
            events = s.receive_data(line[:cut], 0.0) + s.receive_data(line[cut:], 0.0)
            assert [type(e) for e in events] == [p.MessageReceived, p.WatchReplied]
            assert list(events[0].message.items()) == [("a", "1"), ("b", "x:y")]

    def test_one_byte_at_a_time(self):
        line = p.yate_message_line(Message("sip.message", {"a": "1"}), "0x1.2") + b"%%<quit\n"
        s = Session()
        events = []
        for i in range(len(line)):
            events += s.receive_data(line[i:i + 1], 0.0)
        assert [type(e) for e in events] == [p.MessageReceived, p.QuitReplied]
        assert events[0].message["a"] == "1"

    @pytest.mark.parametrize("piece", [None, 1000, 4096])
    def test_a_200_kb_line_from_yate_decodes(self, piece):
        body = "<presence>" + "x" * 200_000 + "</presence>\r\n"
        line = p.yate_message_line(Message("sip.publish", {"xsip_body": body, "n": "1"}), "0x1.2")
        assert len(line) > 200_000
        s = Session()
        if piece is None:
            events = s.receive_data(line, 0.0)
        else:
            events = []
            for i in range(0, len(line), piece):
                events += s.receive_data(line[i:i + piece], 0.0)
        assert len(events) == 1
        assert events[0].message["xsip_body"] == body
        assert events[0].message["n"] == "1"

    def test_nothing_comes_out_until_the_newline(self):
        s = Session()
        assert s.receive_data(b"%%<quit", 0.0) == []
        assert s.receive_data(b"", 0.0) == []
        assert s.receive_data(b"\n", 0.0) == [p.QuitReplied()]

    def test_empty_lines_and_crlf_are_ignored(self):
        s = Session()
        assert s.receive_data(b"\n\r\n\n%%<quit\r\n\n", 0.0) == [p.QuitReplied()]

    def test_malformed_line_becomes_bad_line_event_and_the_stream_goes_on(self):
        s = Session()
        events = s.receive_data(b"%%<message:id:1:m:\n%%<quit\n", 0.0)
        assert isinstance(events[0], BadLineReceived)
        assert events[0].line == b"%%<message:id:1:m:"
        assert isinstance(events[0].error, RemoteProtocolError)
        assert events[1] == p.QuitReplied()

    def test_watch_notification_is_not_pending(self):
        s = Session()
        events = s.receive_data(b"%%<message::true:user.register::number=234\n", 0.0)
        assert isinstance(events[0], p.WatchReceived)
        assert s.incoming == {}

    def test_receive_eof_marks_closed(self):
        s = Session()
        assert not s.closed
        s.receive_eof()
        assert s.closed

    @given(st.lists(st.binary(max_size=120), max_size=12))
    def test_garbage_never_raises(self, chunks):
        s = Session()
        for chunk in chunks:
            for ev in s.receive_data(chunk, 0.0):
                assert isinstance(ev, (BadLineReceived, *FROM_YATE_TYPES))
                if isinstance(ev, BadLineReceived):
                    assert isinstance(ev.error, RemoteProtocolError)

    _KW = st.sampled_from([b"%%>message:", b"%%<message:", b"%%<message::", b"%%<setlocal:",
                           b"%%<install:", b"%%<uninstall:", b"%%<watch:", b"%%<unwatch:",
                           b"%%<quit", b"Error in: ", b"%%<setlocal:bufsize:"])
    _FIELD = _PIECES | st.sampled_from([b"true", b"false", b"0", b"65536", b"2048", b"k=v", b"=v",
                                        b"0x10", b"-3", b""])

    @given(st.lists(st.tuples(_KW, st.lists(_FIELD, max_size=7)).map(lambda t: t[0] + b":".join(t[1])),
                    max_size=8), st.integers(1, 50))
    def test_keyword_shaped_garbage_gives_only_events_or_bad_lines(self, lines, piece):
        s = Session()
        data = b"\n".join(lines) + b"\n"
        events = []
        for i in range(0, len(data), piece):
            events += s.receive_data(data[i:i + piece], 0.0)
        for ev in events:
            assert isinstance(ev, (BadLineReceived, *FROM_YATE_TYPES))
        assert set(s.incoming) == {ev.message.id for ev in events if isinstance(ev, p.MessageReceived)}
        assert p.MIN_BUFSIZE <= s.bufsize <= p.MAX_BUFSIZE
        assert s.encoder.max_line == s.bufsize - 2

    def test_unicode_digit_time_is_a_bad_line_not_a_crash(self):
        s = Session()
        events = s.receive_data("%%>message:0x1.2:\u00b2:m:\n%%<quit\n".encode(), 0.0)
        assert isinstance(events[0], BadLineReceived)
        assert events[1] == p.QuitReplied()


# === bufsize ======================================================================================


class TestBufsize:
    def test_default_limit_is_8190(self):
        s = Session()
        assert (s.bufsize, s.encoder.max_line) == (8192, 8190)
        with pytest.raises(LineTooLong):
            s.output("x" * 8181)
        s.output("x" * 8180)  # 8190 bytes
        assert len(out_lines(s)[0]) == 8190

    def test_confirmed_bufsize_raises_the_limit(self):
        s = Session()
        s.setlocal("bufsize", 65536)
        assert out_lines(s) == [b"%%>setlocal:bufsize:65536"]
        with pytest.raises(LineTooLong):
            s.dispatch(Message("m", {"body": "x" * 20000}))  # not confirmed yet
        assert s.receive_data(b"%%<setlocal:bufsize:65536:true\n", 0.0) == \
            [p.SetLocalReplied("bufsize", "65536", True)]
        assert (s.bufsize, s.encoder.max_line) == (65536, 65534)
        s.dispatch(Message("m", {"body": "x" * 60000}))
        assert len(out_lines(s)) == 1
        with pytest.raises(LineTooLong):
            s.output("x" * 65525)

    @pytest.mark.parametrize("reply,bufsize", [
        (b"%%<setlocal:bufsize:65536:false", 8192),
        (b"%%<setlocal:bufsize:big:true", 8192),
        (b"%%<setlocal:bufsize::true", 8192),
        (b"%%<setlocal:bufsize:4096:true", 4096),
        (b"%%<setlocal:bufsize:2048:true", 2048),
        (b"%%<setlocal:bufsize:100000:true", 65536),  # clamped like Yate
        (b"%%<setlocal:bufsize:10:true", 2048),
        (b"%%<setlocal:timeout:65536:true", 8192),
    ])
    def test_only_a_successful_bufsize_reply_changes_the_limit(self, reply, bufsize):
        s = Session()
        s.receive_data(reply + b"\n", 0.0)
        assert (s.bufsize, s.encoder.max_line) == (bufsize, bufsize - 2)

    def test_answer_uses_the_confirmed_limit(self):
        s = Session()
        s.receive_data(b"%%<setlocal:bufsize:65536:true\n", 0.0)
        msg = receive(s, "sip.publish")
        msg["xsip_body"] = "x" * 30000
        assert s.answer(msg, True) is None
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + b":true::rv:xsip_body=" + b"x" * 30000]

    def test_shrinking_bufsize_applies_before_the_reply(self):
        s = Session()
        s.setlocal("bufsize", 2048)
        with pytest.raises(LineTooLong):
            s.output("x" * 3000)


# === output =======================================================================================


class TestOutput:
    def test_keyword_methods_write_one_line_each_in_order(self):
        s = Session()
        assert not s.has_output
        s.connect("global")
        s.install("sip.message", 50)
        s.install("chan.notify", 100, "targetid", "sipgen/1")
        s.uninstall("sip.message")
        s.watch("")
        s.unwatch("engine.timer")
        s.setlocal("restart", True)
        s.setlocal("timeout", 9000)
        s.output("hello: world")
        s.debug(12, "a:b")
        s.quit()
        assert s.has_output
        data = s.data_to_send()
        assert data == (b"%%>connect:global\n"
                        b"%%>install:50:sip.message\n"
                        b"%%>install:100:chan.notify:targetid:sipgen/1\n"
                        b"%%>uninstall:sip.message\n"
                        b"%%>watch:\n"
                        b"%%>unwatch:engine.timer\n"
                        b"%%>setlocal:restart:true\n"
                        b"%%>setlocal:timeout:9000\n"
                        b"%%>output:hello: world\n"
                        b"%%>debug:10:a%zb\n"
                        b"%%>quit\n")
        for line in data[:-1].split(b"\n"):
            assert check_script_line(line, role_known=not line.startswith(b"%%>connect")) == []
        assert not s.has_output
        assert s.data_to_send() == b""

    def test_session_install_default_priority_is_100(self):
        s = Session()
        s.install("sip.subscribe")
        assert s.data_to_send() == b"%%>install:100:sip.subscribe\n"

    @pytest.mark.parametrize("call", [
        lambda s: s.install("a:b"), lambda s: s.uninstall("a\nb"), lambda s: s.watch("a:b"),
        lambda s: s.unwatch("\t"), lambda s: s.setlocal("reason", "a:b"), lambda s: s.setlocal("", "x"),
        lambda s: s.output("a\rb"), lambda s: s.connect("play"),
        lambda s: s.dispatch(Message("m", {"a=b": "1"})), lambda s: s.dispatch(Message("m", {"": "1"})),
        lambda s: s.dispatch(Message("m", {"body": "x" * 9000})), lambda s: s.output("x" * 9000),
        lambda s: s.debug(1, "%" * 4100),
    ])
    def test_refused_line_leaves_the_output_untouched(self, call):
        s = Session()
        s.watch("x")
        with pytest.raises(LocalProtocolError):
            call(s)
        assert s.data_to_send() == b"%%>watch:x\n"
        assert s.outgoing == set()


# === dispatching ==================================================================================


class TestDispatch:
    def test_dispatch_ids_are_unique_and_need_no_escaping(self):
        s = Session()
        ids = [s.dispatch(Message("call.route", {"called": str(i)})) for i in range(500)]
        assert len(set(ids)) == 500
        for mid in ids:
            assert mid and p.escape(mid) == mid and p.check_raw(mid, "id") == mid
        assert s.outgoing == set(ids)
        lines = out_lines(s)
        assert [p.parse_script_line(line).message.id for line in lines] == ids

    def test_ids_from_two_sessions_do_not_collide(self):
        a, b = Session(), Session()
        assert {a.new_id() for _ in range(50)}.isdisjoint({b.new_id() for _ in range(50)})

    def test_dispatch_writes_the_whole_message(self):
        s = Session()
        msg = Message("xsip.generate", [("method", "NOTIFY"), ("uri", "sip:1@h:5060"),
                                        ("xsip_body", "a\r\nb")], "rv")
        mid = s.dispatch(msg)
        ev = p.parse_script_line(out_lines(s)[0])
        assert (ev.message.id, ev.message.name, ev.message.retval, ev.message.time) == \
            (mid, "xsip.generate", "rv", 0)
        assert list(ev.message.items()) == list(msg.items())

    def test_dispatch_without_answer_has_an_empty_id_and_is_not_awaited(self):
        s = Session()
        assert s.dispatch(Message("chan.notify", {"targetid": "x"}), expect_answer=False) == ""
        assert s.outgoing == set()
        assert out_lines(s) == [b"%%>message::0:chan.notify::targetid=x"]

    def test_answer_from_yate_clears_the_dispatch(self):
        s = Session()
        mid = s.dispatch(Message("call.route"))
        other = s.dispatch(Message("call.route"))
        events = s.receive_data(p.yate_answer_line(Message("call.route", {"error": "offline"}), mid, False), 1.0)
        assert isinstance(events[0], p.AnswerReceived)
        assert (events[0].id, events[0].handled, events[0].message["error"]) == (mid, False, "offline")
        assert s.outgoing == {other}

    def test_forget_makes_a_late_answer_not_outgoing(self):
        s = Session()
        mid = s.dispatch(Message("xsip.generate"))
        s.forget(mid)
        assert mid not in s.outgoing
        events = s.receive_data(p.yate_answer_line(Message("xsip.generate"), mid, True), 20.0)
        assert isinstance(events[0], p.AnswerReceived) and events[0].id == mid  # still reported
        assert mid not in s.outgoing
        s.forget(mid)  # forgetting twice is harmless
        s.forget("never-sent")

    def test_watch_line_for_our_own_message_does_not_clear_the_dispatch(self):
        s = Session()
        mid = s.dispatch(Message("chan.notify"))
        s.receive_data(p.yate_answer_line(Message("chan.notify"), "", True), 0.0)
        assert s.outgoing == {mid}


# === answering ====================================================================================


class TestAnswer:
    def test_answer_carries_only_changed_params(self):
        s = Session()
        msg = receive(s, "call.route", {"a": "1", "b": "2", "c": "3"}, "rv")
        msg["b"] = "20"
        del msg["c"]
        msg["d"] = "4:4"
        assert s.answer(msg, True) is None
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + b":true::rv:b=20:c:d=4%z4"]
        assert msg.answered and msg.handled
        assert s.incoming == {}

    def test_unchanged_message_answers_with_its_original_retval_and_no_params(self):
        s = Session()
        msg = receive(s, "call.route", {"a": "1"}, "orig")
        s.answer(msg, False)
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + b":false::orig"]
        assert msg.answered and not msg.handled

    def test_new_retval_replaces_and_empty_retval_clears(self):
        s = Session()
        m1 = receive(s, mid="0x1.1", retval="orig")
        m2 = receive(s, mid="0x1.2", retval="orig")
        m1.retval = "sip/sip:1@h"
        m2.retval = ""
        s.answer(m1, True)
        s.answer(m2, True)
        assert out_lines(s) == [b"%%<message:0x1.1:true::sip/sip%z1@h", b"%%<message:0x1.2:true::"]

    def test_renamed_message_writes_the_new_name(self):
        s = Session()
        msg = receive(s, "call.route")
        msg.rename("msg.execute")
        s.answer(msg, False)
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + b":false:msg.execute:rv"]

    def test_renaming_back_to_the_original_name_writes_an_empty_name(self):
        s = Session()
        msg = receive(s, "call.route")
        msg.rename("x")
        msg.rename("call.route")
        s.answer(msg, True)
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + b":true::rv"]

    def test_answer_id_is_echoed_byte_for_byte(self):
        s = Session()
        msg = receive(s, mid="0x7f%ab\xe9.12")  # escaped by Yate on the way in
        s.answer(msg, True)
        line = out_lines(s)[0]
        assert line.startswith(b"%%<message:0x7f%ab\xc3\xa9.12:true:")
        assert decode_answer(line, wire("0x7f%ab\xe9.12"), WireMessage(b"m"))[0] == -2

    def test_answering_twice_is_refused_and_writes_nothing(self):
        s = Session()
        msg = receive(s)
        s.answer(msg, True)
        first = out_lines(s)
        with pytest.raises(LocalProtocolError):
            s.answer(msg, True)
        with pytest.raises(LocalProtocolError):
            s.answer_failure(msg)
        assert s.data_to_send() == b""
        assert len(first) == 1

    def test_failure_then_answer_is_refused(self):
        s = Session()
        msg = receive(s)
        s.answer_failure(msg)
        with pytest.raises(LocalProtocolError):
            s.answer(msg, True)
        with pytest.raises(LocalProtocolError):
            s.answer_failure(msg)
        assert len(out_lines(s)) == 1

    def test_answering_a_message_that_was_never_received_is_refused(self):
        s = Session()
        with pytest.raises(LocalProtocolError):
            s.answer(Message("call.route", id="0x9.9"), True)
        with pytest.raises(LocalProtocolError):
            s.answer_failure(Message("call.route", id="0x9.9"))
        assert s.data_to_send() == b""

    @pytest.mark.parametrize("code,retry,expected", [
        (503, "5", b":true::rv:code=503:osip_Retry-After=5"),
        (403, None, b":true::rv:code=403"),
        (500, "", b":true::rv:code=500"),
    ])
    def test_failure_of_a_sip_message_is_handled_with_a_code(self, code, retry, expected):
        s = Session()
        msg = receive(s, "sip.subscribe", {"sip_event": "presence"})
        msg["osip_Expires"] = "600"   # the handler's changes are dropped
        msg.retval = "changed"
        msg.rename("other")           # still a sip.* message by its original name
        s.answer_failure(msg, code, retry)
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + expected]
        assert msg.answered and msg.handled

    def test_failure_of_another_message_is_unhandled_and_unchanged(self):
        s = Session()
        msg = receive(s, "call.route", {"called": "1"}, "orig:rv")
        msg["x"] = "1"
        msg.rename("sip.fake")
        s.answer_failure(msg, 503, "5")
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + b":false::orig%zrv"]
        assert msg.answered and not msg.handled

    def test_is_sip(self):
        assert is_sip("sip.message") and is_sip("sip.") and not is_sip("xsip.generate")
        assert not is_sip("call.route") and not is_sip("sip")

    @pytest.mark.parametrize("name,expected", [
        ("sip.message", b":true::rv:code=500"),
        ("call.route", b":false::rv"),
    ])
    def test_answer_too_long_falls_back_to_the_failure_line(self, name, expected):
        s = Session()
        msg = receive(s, name, {"a": "1"})
        msg["xsip_body"] = "x" * 9000
        err = s.answer(msg, True)
        assert isinstance(err, LineTooLong)
        assert err.limit == 8190 and err.size > 8190
        assert out_lines(s) == [b"%%<message:" + wire(msg.id) + expected]
        assert s.incoming == {}
        with pytest.raises(LocalProtocolError):
            s.answer(msg, True)

    @pytest.mark.parametrize("name", ["call.route", "sip.message"])
    def test_answer_is_written_even_when_the_original_retval_is_huge(self, name):
        s = Session()
        msg = receive(s, name, retval="r" * 9000)
        msg["x"] = "1"
        try:
            err = s.answer(msg, True)
        except LineTooLong:
            err = None
        assert isinstance(err, LineTooLong)
        data = s.data_to_send()
        lines = data[:-1].split(b"\n")
        assert len(lines) == 1 and lines[0].startswith(b"%%<message:" + wire(msg.id) + b":")
        problems = check_script_line(lines[0], bufsize=s.bufsize)
        if name.startswith("sip."):
            assert problems == [] and b":true::" in lines[0] and lines[0].endswith(b":code=500")
        else:
            # the only answer that fits: Yate's "keep everything" form (Surprise 1)
            assert lines[0] == b"%%<message:" + wire(msg.id) + b":false:"
            assert all("only id:processed:" in p for p in problems)

    @pytest.mark.parametrize("bad", ["a=b", ""])
    def test_a_refused_answer_is_replaced_by_the_failure_answer(self, bad):
        s = Session(answer_within=1.0)
        msg = receive(s, "call.route", {"a=b": "1"})
        if bad:
            del msg[bad]  # deleting a param Yate sent us with '=' in its name
        else:
            msg[bad] = "x"
        err = s.answer(msg, True)  # never raises for a change Yate cannot take ...
        assert err is not None
        # ... the message is answered exactly once, with the unchanged failure answer
        lines = out_lines(s)
        assert len(lines) == 1 and lines[0].startswith(b"%%<message:" + wire(msg.id) + b":false:")
        assert list(s.overdue(10.0)) == []
        with pytest.raises(LocalProtocolError):
            s.answer(msg, True)

    def test_delete_then_set_of_a_duplicated_param_leaves_one_value_in_yate(self):
        s = Session()
        line = b"%%>message:0x1.2:1:sip.message::username=123:realm=Yate:username=123\n"
        msg = s.receive_data(line, 0.0)[0].message
        del msg["username"]
        msg["username"] = "new"
        assert msg.getall("username") == ["new"]
        s.answer(msg, True)
        yate_msg = WireMessage(b"sip.message", b"", [(b"username", b"123"), (b"realm", b"Yate"),
                                                     (b"username", b"123")])
        assert decode_answer(out_lines(s)[0], b"0x1.2", yate_msg)[0] == -2
        assert [v for k, v in yate_msg.params if k == b"username"] == [b"new"]

    OPS = st.lists(st.one_of(
        st.tuples(st.just("set"), NAMES, VALUES),
        st.tuples(st.just("del"), NAMES, st.just("")),
        st.tuples(st.just("rename"), st.sampled_from(["call.route", "msg.execute", "x:y"]), st.just("")),
        st.tuples(st.just("retval"), VALUES, st.just("")),
    ), max_size=8)

    @given(st.lists(st.tuples(YATE_NAMES, VALUES), max_size=6), VALUES, OPS, st.booleans())
    def test_yate_applying_the_answer_gets_the_handlers_final_message(self, params, retval, ops, handled):
        dup = {k for k, _ in params if sum(1 for kk, _ in params if kk == k) > 1}
        deleted: set[str] = set()
        for op, k, _ in ops:  # the known bug above: delete-then-set of a duplicated name
            if op == "del":
                deleted.add(k)
            assume(not (op == "set" and k in dup and k in deleted))

        s = Session()
        msg = receive(s, "call.route", params, retval, mid="0x1.2")
        for op, a, b in ops:
            if op == "set":
                msg[a] = b
            elif op == "del":
                del msg[a]
            elif op == "rename":
                msg.rename(a)
            else:
                msg.retval = a
        assert s.answer(msg, handled) is None
        line = out_lines(s)[0]

        yate_msg = WireMessage(b"call.route", wire(retval),
                               [(wire(k), wire(v)) for k, v in Message("x", params).items()])
        code, ret = decode_answer(line, b"0x1.2", yate_msg)
        assert code == -2 and ret is handled
        assert yate_msg.name == wire(msg.name)
        assert yate_msg.retval == wire(msg.retval)
        names = {k for k, _ in params} | {a for op, a, _ in ops if op in ("set", "del")}
        for k in names:
            assert [v for kk, v in yate_msg.params if kk == wire(k)] == [wire(v) for v in msg.getall(k)], k


# === deadlines ====================================================================================


class TestOverdue:
    def test_overdue_yields_in_order_the_messages_past_their_deadline(self):
        s = Session(answer_within=5.0)
        m0 = receive(s, mid="0x1.0", now=0.0)
        m1 = receive(s, mid="0x1.1", now=1.0)
        m2 = receive(s, mid="0x1.2", now=2.0)
        assert list(s.overdue(4.999)) == []
        assert list(s.overdue(5.0)) == [m0]  # the deadline itself is due
        assert list(s.overdue(6.5)) == [m0, m1]
        assert list(s.overdue(100.0)) == [m0, m1, m2]
        assert s.next_deadline() == 5.0

    def test_answering_while_iterating_overdue_is_safe(self):
        s = Session(answer_within=1.0)
        msgs = [receive(s, "sip.message", mid=f"0x1.{i}", now=float(i)) for i in range(4)]
        done = []
        for msg in s.overdue(2.5):
            s.answer_failure(msg, 408)
            done.append(msg)
        assert done == msgs[:2]
        assert list(s.incoming.values()) == msgs[2:]
        assert s.next_deadline() == 3.0
        assert len(out_lines(s)) == 2

    def test_answered_messages_are_no_longer_overdue(self):
        s = Session(answer_within=1.0)
        m0 = receive(s, mid="0x1.0", now=0.0)
        m1 = receive(s, mid="0x1.1", now=0.0)
        s.answer(m0, True)
        assert list(s.overdue(10.0)) == [m1]
        s.answer(m1, True)
        assert list(s.overdue(10.0)) == []
        assert s.next_deadline() is None

    def test_messages_in_one_read_share_the_read_time(self):
        s = Session(answer_within=2.0)
        data = p.yate_message_line(Message("a"), "0x1.0") + p.yate_message_line(Message("b"), "0x1.1")
        events = s.receive_data(data, 7.0)
        assert [e.message.deadline for e in events] == [9.0, 9.0]
        assert [m.name for m in s.overdue(9.0)] == ["a", "b"]


# === the exactly-once state machine ===============================================================


class ExactlyOnce(RuleBasedStateMachine):
    """Yate sends messages; handlers answer some, fail some; time passes and the overdue ones
    are failed; noise and our own dispatches are interleaved. Every received id must be answered
    exactly once in the output, every written line must be one Yate accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.session = Session(answer_within=5.0)
        self.now = 0.0
        self.seq = 0
        self.received: list[str] = []
        self.pending: dict[str, Message] = {}
        self.done: dict[str, Message] = {}
        self.answers: Counter[str] = Counter()
        self.awaiting: set[str] = set()

    def _drain(self) -> None:
        for line in out_lines(self.session):
            ev = p.parse_script_line(line)
            if isinstance(ev, p.Answer):
                self.answers[ev.id] += 1
                assert self.answers[ev.id] == 1, f"{ev.id} answered twice"
                assert ev.id in self.done

    @initialize(names=st.lists(st.sampled_from(["sip.message", "call.route"]), min_size=1, max_size=4))
    def yate_sends_a_first_batch(self, names):
        data = b"".join(p.yate_message_line(Message(n, {"caller": "1"}), f"0x1.{i}")
                        for i, n in enumerate(names))
        events = self.session.receive_data(data, self.now)
        assert [e.message.id for e in events] == [f"0x1.{i}" for i in range(len(names))]
        for e in events:
            self.pending[e.message.id] = e.message
            self.received.append(e.message.id)

    @rule(name=st.sampled_from(["sip.message", "sip.subscribe", "call.route", "user.auth"]),
          params=st.lists(st.tuples(YATE_NAMES, VALUES), max_size=4), piece=st.integers(1, 64))
    def yate_sends_a_message(self, name, params, piece):
        self.seq += 1
        mid = f"0x7f{self.seq:08x}.{self.seq * 7919}"
        line = p.yate_message_line(Message(name, params, "rv"), mid, 1764190000)
        events = []
        for i in range(0, len(line), piece):
            events += self.session.receive_data(line[i:i + piece], self.now)
        assert [type(e) for e in events] == [p.MessageReceived]
        msg = events[0].message
        assert msg.id == mid and msg.deadline == self.now + 5.0
        self.pending[mid] = msg
        self.received.append(mid)

    def _pick(self, data, pool):
        return pool[data.draw(st.sampled_from(sorted(pool)))]

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), handled=st.booleans(), big=st.booleans())
    def handler_answers(self, data, handled, big):
        msg = self._pick(data, self.pending)
        msg["result"] = "x" * (9000 if big else 3)
        del msg["caller"]
        err = self.session.answer(msg, handled)
        assert isinstance(err, LineTooLong) if big else err is None
        self.done[msg.id] = self.pending.pop(msg.id)
        with pytest.raises(LocalProtocolError):
            self.session.answer(msg, handled)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), code=st.sampled_from([403, 480, 500, 503]), retry=st.sampled_from([None, "5"]))
    def handler_fails(self, data, code, retry):
        msg = self._pick(data, self.pending)
        self.session.answer_failure(msg, code, retry)
        assert msg.handled is msg.original_name.startswith("sip.")
        self.done[msg.id] = self.pending.pop(msg.id)
        with pytest.raises(LocalProtocolError):
            self.session.answer_failure(msg, code, retry)

    @rule(dt=st.floats(0.0, 4.0))
    def time_passes(self, dt):
        self.now += dt
        last = -1.0
        for msg in self.session.overdue(self.now):
            assert msg.deadline <= self.now and msg.deadline >= last
            last = msg.deadline
            assert msg.id in self.pending
            self.session.answer_failure(msg, 408)
            self.done[msg.id] = self.pending.pop(msg.id)

    @precondition(lambda self: self.done)
    @rule(data=st.data(), failure=st.booleans())
    def handler_answers_again(self, data, failure):
        msg = self._pick(data, self.done)
        self._drain()
        with pytest.raises(LocalProtocolError):
            if failure:
                self.session.answer_failure(msg)
            else:
                self.session.answer(msg, True)
        assert not self.session.has_output

    @rule(kind=st.sampled_from(["watch", "setlocal", "install", "bad", "error", "partial"]))
    def yate_sends_noise(self, kind):
        line = {
            "watch": b"%%<message::true:call.route:rv:called=1\n",
            "setlocal": b"%%<setlocal:config.a.b:x:y:true\n",
            "install": b"%%<install:100:sip.message:true\n",
            "bad": b"%%<message:x:1:m:\n",
            "error": b"Error in: %%>bogus\n",
            "partial": b"",
        }[kind]
        events = self.session.receive_data(line, self.now)
        assert not any(isinstance(e, p.MessageReceived) for e in events)

    @rule()
    def script_dispatches(self):
        mid = self.session.dispatch(Message("call.route", {"called": "1"}))
        assert mid not in self.awaiting and mid not in self.received
        self.awaiting.add(mid)

    @precondition(lambda self: self.awaiting)
    @rule(data=st.data(), late=st.booleans())
    def yate_answers_our_dispatch(self, data, late):
        mid = data.draw(st.sampled_from(sorted(self.awaiting)))
        self.awaiting.discard(mid)
        if late:
            self.session.forget(mid)
        events = self.session.receive_data(p.yate_answer_line(Message("call.route"), mid, True), self.now)
        assert [type(e) for e in events] == [p.AnswerReceived]
        assert mid not in self.session.outgoing

    @rule()
    def write_out(self):
        self._drain()

    @invariant()
    def bookkeeping_matches(self):
        assert set(self.session.incoming) == set(self.pending)
        assert self.session.outgoing == self.awaiting
        assert list(self.session.overdue(self.now)) == []  # time_passes fails every overdue one
        assert all(m.answered for m in self.done.values())
        assert not any(m.answered for m in self.pending.values())

    def teardown(self):
        for msg in self.session.overdue(float("inf")):
            self.session.answer_failure(msg, 408)
            self.done[msg.id] = self.pending.pop(msg.id)
        self._drain()
        assert self.pending == {}
        assert sorted(self.answers) == sorted(self.received)
        assert set(self.answers.values()) <= {1}


TestExactlyOnce = ExactlyOnce.TestCase
TestExactlyOnce.settings = settings(max_examples=60, stateful_step_count=40)
