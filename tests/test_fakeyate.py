"""Tests of the test-side Yate emulation (``yate_rules`` and ``FakeYate``).

The expectations come from /work/shared/reference/yate-internals.md ("ref §N";
§6, the live observations, wins over the rest).  Subprocess tests run tiny
stub scripts from ``tests/stubs/``; ``puppet.py`` takes a JSON plan as its
single argument.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

try:  # plain import when tests/ is on sys.path (pytest's default "prepend" mode)
    import yate_rules as yr
    from fakeyate import FakeYate, YMessage
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests import yate_rules as yr  # type: ignore[no-redef]
    from tests.fakeyate import FakeYate, YMessage  # type: ignore[no-redef]

STUBS = Path(__file__).resolve().parent / "stubs"
PUPPET = str(STUBS / "puppet.py")


@pytest.fixture(autouse=True, scope="module")
def _stubs_executable() -> None:
    """Yate execs the file directly: it needs its exec bit (ref §1.1)."""
    for p in STUBS.glob("*.py"):
        p.chmod(0o755)


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    """Run one async scenario with a hard upper bound."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def plan(*steps: list[Any], auto: str | None = None) -> str:
    return json.dumps({"steps": [list(s) for s in steps], "auto": auto})


# ==========================================================================
# yate_rules: escaping (ref §1.3)
# ==========================================================================


def test_escape_examples() -> None:
    assert yr.yate_escape(b"a:b%c\n\r\t") == b"a%zb%%c%J%M%I"
    assert yr.yate_escape(b"a=b") == b"a=b"
    assert yr.yate_escape(b"a=b", b"=") == b"a%}b"  # param names (Msg.cpp:178)
    assert yr.yate_escape(b"\x7f\x80\xff\xc3\xa9") == b"\x7f\x80\xff\xc3\xa9"
    assert yr.yate_escape(b"\x01\x1f") == b"%A%_"
    with pytest.raises(ValueError):
        yr.yate_escape(b"a\x00b")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"%%", b"%"),
        (b"%z", b":"),
        (b"%A%_", b"\x01\x1f"),
        (b"%J%M", b"\n\r"),
        (b"%Z", b"\x1a"),
        (b"caf\xc3\xa9 \x80", b"caf\xc3\xa9 \x80"),
        (b"", b""),
    ],
)
def test_unescape_accepts(raw: bytes, expected: bytes) -> None:
    assert yr.yate_unescape(raw) == expected


@pytest.mark.parametrize(
    "raw, offset, partial",
    [
        (b"a%}b", 2, b"a"),  # '%}' only with extra '=' -- Yate sends it, never accepts it back
        (b"%@", 1, b""),  # NUL
        (b"ab%a", 3, b"ab"),  # lower case
        (b"x%", 2, b"x"),  # trailing '%'
        (b"a\tb", 1, b"a"),  # raw control byte
        (b"%z\x1f", 2, b":"),
        (b"%%%q", 3, b"%"),
    ],
)
def test_unescape_rejects(raw: bytes, offset: int, partial: bytes) -> None:
    with pytest.raises(yr.YateDecodeError) as ei:
        yr.yate_unescape(raw)
    assert ei.value.offset == offset
    assert ei.value.partial == partial


def test_unescape_extra_char() -> None:
    assert yr.yate_unescape(b"a%}b", b"=") == b"a=b"
    with pytest.raises(yr.YateDecodeError):
        yr.yate_unescape(b"a%}b")


@given(st.binary().filter(lambda b: b"\x00" not in b), st.sampled_from([None, b"="]))
def test_escape_roundtrip(data: bytes, extra: bytes | None) -> None:
    enc = yr.yate_escape(data, extra)
    assert b":" not in enc
    assert all(c >= 0x20 for c in enc)
    assert yr.yate_unescape(enc, extra) == data


# ==========================================================================
# yate_rules: numbers and booleans
# ==========================================================================


def test_bool_prefix_and_to_boolean() -> None:
    for tok in yr.TRUE_TOKENS:
        assert yr.bool_prefix(tok) == (True, b"")
        assert yr.yate_to_boolean(tok, False) is True
    for tok in yr.FALSE_TOKENS:
        assert yr.bool_prefix(tok) == (False, b"")
        assert yr.yate_to_boolean(tok, True) is False
    for bad in (b"1", b"0", b"True", b"TRUE", b"y", b"n", b"on "):
        assert yr.yate_to_boolean(bad, None) is None  # type: ignore[arg-type]
    assert yr.bool_prefix(b"  true") == (True, b"")
    assert yr.bool_prefix(b"t rue") == (True, b" rue")
    assert yr.bool_prefix(b"trueX") == (None, b"trueX")
    assert yr.bool_prefix(b"1") == (None, b"1")


def test_integer_parsing_quirks() -> None:
    assert yr.yate_to_integer(b"010", 7) == 8
    assert yr.yate_to_integer(b"0x10", 7) == 16
    assert yr.yate_to_integer(b"12ab", 7) == 7
    assert yr.yate_to_integer(b"", 7) == 7
    assert yr.yate_to_integer(b"2147483647", 7) == 7  # strtoi marks >= INT_MAX unreadable
    assert yr.yate_to_integer(b"20000", 7, 0, 10000) == 10000
    assert yr.yate_to_integer(b"-5", 7, 0, 10000) == 0
    assert yr.c_strtoul(b"-1") == (2**64 - 1, 2, False)
    assert yr.c_strtol(b"0x") == (0, 1, False)
    assert yr.c_strtol(b"08") == (0, 1, False)


# ==========================================================================
# yate_rules: answers, partial application (ref §1.4.2, §5 1-3, §6 item 1)
# ==========================================================================

HID = b"0x55d5c6f0a1b0.1804289383"


def _live() -> yr.WireMessage:
    return yr.WireMessage(b"foo", b"rv", [(b"keep", b"1"), (b"d", b"1"), (b"d", b"2")])


def test_answer_framing_surprise_1() -> None:
    m = _live()
    assert yr.decode_answer(b"%%<message:" + HID + b":true", HID, m)[0] not in (-1, -2)
    assert yr.decode_answer(b"%%<message:" + HID + b":true:newname", HID, m)[0] not in (-1, -2)
    assert yr.decode_answer(b"%%<message:otherid:true:x:y", HID, m) == (-1, False)
    m = _live()
    assert yr.decode_answer(b"%%<message:" + HID + b":true:", HID, m) == (-2, True)
    assert m == _live()  # nothing changed
    m = _live()
    assert yr.decode_answer(b"%%<message:" + HID + b":false::", HID, m) == (-2, False)
    assert m.name == b"foo" and m.retval == b""  # empty retval field clears it


def test_answer_param_rules() -> None:
    m = _live()
    code, ret = yr.decode_answer(b"%%<message:" + HID + b":true:bar:new:d:d=9:x=a%zb::keep", HID, m)
    assert (code, ret) == (-2, True)
    assert m.name == b"bar" and m.retval == b"new"
    assert m.params == [(b"d", b"9"), (b"x", b"a:b")]
    m = _live()
    assert yr.decode_answer(b"%%<message:" + HID + b":true:foo:rv:d=7", HID, m)[0] == -2
    assert m.params == [(b"keep", b"1"), (b"d", b"7"), (b"d", b"2")]  # only the first 'd'


@pytest.mark.parametrize("processed", [b"1", b"0", b"True", b"FALSE", b"yes!", b"truex"])
def test_answer_processed_must_be_a_token(processed: bytes) -> None:
    m = _live()
    code, ret = yr.decode_answer(b"%%<message:" + HID + b":" + processed + b":foo:rv", HID, m)
    assert code not in (-1, -2)
    assert ret is False and m == _live()


def test_partial_application_live_example() -> None:
    """ref §6 item 1: applied chunks stay, answer unmatched, flag kept for the timeout."""
    m = yr.WireMessage(b"foo", b"rv", [(b"keep", b"1")])
    line = b"%%<message:p1:true:foo.renamed:newrv:x=1:bad=%q:y=2"
    code, ret = yr.decode_answer(line, b"p1", m)
    assert code not in (-1, -2)
    assert ret is True
    assert m == yr.WireMessage(b"foo.renamed", b"newrv", [(b"keep", b"1"), (b"x", b"1")])
    assert yr.encode_answer_line(b"p1", ret, m) == b"%%<message:p1:true:foo.renamed:newrv:keep=1:x=1"
    # 't rue': token 't' then garbage -> unmatched, flag true
    m = yr.WireMessage(b"foo")
    assert yr.decode_answer(b"%%<message:p1:t rue:a:b", b"p1", m) == (len(b"%%<message:p1:"), True)
    assert m == yr.WireMessage(b"foo")
    # a chunk beginning with '=' stops it too
    m = yr.WireMessage(b"foo")
    code, ret = yr.decode_answer(b"%%<message:p1:false:n:r:a=1:=v:b=2", b"p1", m)
    assert code not in (-1, -2) and ret is False
    assert m == yr.WireMessage(b"n", b"r", [(b"a", b"1")])


@given(
    st.binary(max_size=20).filter(lambda b: b"\x00" not in b),
    st.binary(max_size=20).filter(lambda b: b"\x00" not in b),
    st.dictionaries(
        st.binary(min_size=1, max_size=8).filter(lambda b: b"\x00" not in b and b"=" not in b),
        st.binary(max_size=20).filter(lambda b: b"\x00" not in b),
        max_size=5,
    ),
    st.booleans(),
)
def test_encode_decode_answer_roundtrip(name: bytes, retval: bytes, params: dict[bytes, bytes], handled: bool) -> None:
    """What Yate encodes, Yate decodes back (names without '=' only: '%}' is refused)."""
    src = yr.WireMessage(name, retval, list(params.items()))
    line = yr.encode_answer_line(HID, handled, src)
    dst = yr.WireMessage(b"orig")
    code, ret = yr.decode_answer(line, HID, dst)
    assert code == -2 and ret is handled
    assert dst.name == (name or b"orig") and dst.retval == retval and dst.params == src.params
    assert yr.check_script_line(line, bufsize=1 << 30) == []


def test_param_name_with_equals_is_not_accepted_back() -> None:
    line = yr.encode_answer_line(HID, True, yr.WireMessage(b"n", b"", [(b"a=b", b"1")]))
    assert line.endswith(b":a%}b=1")
    assert yr.decode_answer(line, HID, yr.WireMessage())[0] not in (-1, -2)


# ==========================================================================
# yate_rules: %%>message from the script (ref §1.4.3)
# ==========================================================================


@pytest.mark.parametrize(
    "tfield, ok, value",
    [(b"", True, 0), (b"0", True, 0), (b"1700000000", True, 1700000000), (b"0x10", True, 16),
     (b" 5", True, 5), (b"010", True, 8), (b"-1", False, None), (b"5 ", False, None),
     (b"abc", False, None), (b"4294967296", False, None)],
)
def test_script_message_time(tfield: bytes, ok: bool, value: int | None) -> None:
    code, sm = yr.decode_script_message(b"%%>message:id:" + tfield + b":app.job:")
    assert (code == -2) is ok
    if ok:
        assert sm is not None and sm.time == value


def test_script_message_fields() -> None:
    assert yr.decode_script_message(b"%%>message:id:0:app.job")[0] != -2  # ':' after name mandatory
    sm = yr.parse_script_message(b"%%>message:a%zb:0:app.job:rv:d=1:d=2:k:x=%J")
    assert sm.id == b"a:b" and sm.msg.name == b"app.job" and sm.msg.retval == b"rv"
    assert sm.msg.params == [(b"d", b"2"), (b"x", b"\n")]
    with pytest.raises(yr.YateDecodeError):
        yr.parse_script_message(b"%%>message:id:0:app.job::a%}b=1")
    with pytest.raises(yr.YateDecodeError):
        yr.parse_script_message(b"%%>message:id:0:app.job::=v")


def test_encode_message_line() -> None:
    m = yr.WireMessage(b"sip.subscribe", b"", [(b"sip_uri", b"sip:234@127.0.0.1:5070"), (b"a=b", b"%")])
    assert yr.encode_message_line(HID, 1700000000, m) == (
        b"%%>message:" + HID + b":1700000000:sip.subscribe::sip_uri=sip%z234@127.0.0.1%z5070:a%}b=%%"
    )


# ==========================================================================
# yate_rules: install parsing (ref §1.4.4, Surprise 27)
# ==========================================================================


@pytest.mark.parametrize(
    "rest, prio, name, fname, fvalue",
    [
        (b"010:x", 8, b"x", None, None),
        (b"0x10:x", 16, b"x", None, None),
        (b"x", 100, b"x", None, None),
        (b":x", 100, b"x", None, None),
        (b" 50:x", 50, b"x", None, None),
        (b"-5:x", -5, b"x", None, None),
        (b"sip.w:fname:fval", 100, b"fname", b"fval", b""),  # the field shift
        (b"50:chan.notify:targetid", 50, b"chan.notify", b"targetid", b""),
        (b"50:a:b:c:d", 50, b"a", b"b", b"c:d"),
        (b"50:a:f%zn:v%J", 50, b"a", b"f:n", b"v\n"),
        (b"2147483647:x", 100, b"x", None, None),
        (b"50", 50, b"", None, None),
        (b"50:a::v", 50, b"a", None, None),
    ],
)
def test_parse_install(rest: bytes, prio: int, name: bytes, fname: bytes | None, fvalue: bytes | None) -> None:
    req = yr.parse_install(rest)
    assert (req.priority, req.name, req.filter_name, req.filter_value) == (prio, name, fname, fvalue)


# ==========================================================================
# yate_rules: check_script_line
# ==========================================================================

CLEAN_LINES = [
    b"%%<message:" + HID + b":true:foo:rv",
    b"%%<message:" + HID + b":false:::a=b%zc:d",
    b"%%>message:m1:0:app.job:",
    b"%%>message::1700000000:app.job:rv:a=1",
    b"%%>message:m1:0x10:app.job::x=%%",
    b"%%>install:50:sip.subscribe",
    b"%%>install:sip.subscribe",
    b"%%>install:100:chan.notify:targetid:abc",
    b"%%>uninstall:sip.subscribe",
    b"%%>watch:",
    b"%%>watch:user.register",
    b"%%>unwatch:user.register",
    b"%%>output:hello world: 100%",
    b"%%>debug:5:text%Jmore",
    b"%%>setlocal:restart:true",
    b"%%>setlocal:timeout:",
    b"%%>setlocal:bufsize:65536",
    b"%%>setlocal:engine.version:",
    b"%%>setlocal:config.general.x:",
    b"%%>setlocal:reason:",
    b"%%>quit",
    b"%%>message:m1:0:app.job:\r",
]


@pytest.mark.parametrize("line", CLEAN_LINES)
def test_check_clean_lines(line: bytes) -> None:
    assert yr.check_script_line(line) == []


BAD_LINES = [
    (b"%%<message:" + HID + b":true", "no ':' after the processed"),
    (b"%%<message:" + HID + b":true:foo", "no ':' after the name"),
    (b"%%<message:" + HID + b":1:foo:rv", "not one of true"),
    (b"%%<message:" + HID + b":True:foo:rv", "not one of true"),
    (b"%%<message:" + HID + b": true:foo:rv", "not exactly a boolean"),
    (b"%%<message:" + HID + b"::foo:rv", "empty processed"),
    (b"%%<message:" + HID + b":true:", "only id:processed"),
    (b"%%<message:" + HID + b":true:n:r:a%}b=1", "bad escape in param chunk"),
    (b"%%<message:" + HID + b":true:n:r:=v", "starts with '='"),
    (b"%%<message:" + HID + b":true:n%q:r", "bad escape in the name"),
    (b"%%<message:" + HID + b":true:n:r%", "bad escape in the retval"),
    (b"%%<message::true:n:r", "empty id"),
    (b"%%>message:id:0:app.job", "no ':' after the message name"),
    (b"%%>message:id:-1:app.job:", "not an unsigned number"),
    (b"%%>message:id: 5:app.job:", "not plain digits"),
    (b"%%>message:id:0::", "empty name"),
    (b"%%>message:id:0:app.job::k", "no-op"),
    (b"%%>message:id:0:app.job::v=a\tb", "raw control byte 0x09"),
    (b"%%>install:sip.w:fname:fval", "fields shift"),
    (b"%%>install:010:x", "octal"),
    (b"%%>install:50:", "empty message name"),
    (b"%%>install:50:a%zb", "does not unescape"),
    (b"%%>watch:a%zb", "does not unescape"),
    (b"%%>debug:5", "without the second ':'"),
    (b"%%>debug:loud:x", "not an integer 1..10"),
    (b"%%>setlocal:restart:1", "silently left unchanged"),
    (b"%%>setlocal:selfwatch:0", "silently left unchanged"),
    (b"%%>setlocal:timeout:abc", "not an integer"),
    (b"%%>setlocal:maxqueue:20000", "clamped by Yate to 10000"),
    (b"%%>setlocal:bufsize:100", "clamped by Yate to 2048"),
    (b"%%>setlocal:timeout", "without ':'"),
    (b"%%>setlocal::5", "empty name"),
    (b"%%>setlocal:foo:bar", "unknown setlocal name"),
    (b"%%>setlocal:engine.version:7", "read-only"),
    (b"%%>setlocal:id:abc", "channel scripts only"),
    (b"%%>output:tab\there", "raw control byte 0x09"),
    (b"%%>quit ", "exactly '%%>quit'"),
    (b"%%>connect:global", "only valid on a socket"),
    (b"hello", "Error in"),
    (b"%%>output:a\x00b", "NUL"),
]


@pytest.mark.parametrize("line, needle", BAD_LINES)
def test_check_bad_lines(line: bytes, needle: str) -> None:
    problems = yr.check_script_line(line)
    assert any(needle in p for p in problems), problems


def test_check_role_unknown() -> None:
    assert yr.check_script_line(b"%%>connect:global", role_known=False) == []
    assert yr.check_script_line(b"%%>connect:channel:x:y", role_known=False) == []
    assert "closes the connection" in yr.check_script_line(b"%%>connect:play", role_known=False)[0]
    assert "only %%>connect" in yr.check_script_line(b"%%>install:x", role_known=False)[0]


@pytest.mark.parametrize(
    "bufsize, length, cr, ok",
    [(8192, 8190, False, True), (8192, 8191, False, False), (8192, 8190, True, True),
     (8192, 8191, True, False), (2048, 2046, False, True), (2048, 2047, False, False)],
)
def test_check_line_length(bufsize: int, length: int, cr: bool, ok: bool) -> None:
    body = b"%%>output:" + b"x" * (length - 10 - (1 if cr else 0))
    line = body + (b"\r" if cr else b"")
    assert len(line) == length
    problems = yr.check_script_line(line, bufsize=bufsize)
    assert (problems == []) is ok, problems


@given(st.binary(max_size=200), st.booleans())
def test_check_never_raises(line: bytes, role_known: bool) -> None:
    assert isinstance(yr.check_script_line(line, role_known=role_known), list)
    assert isinstance(yr.check_script_line(b"%%<message:" + line, role_known=role_known), list)
    assert isinstance(yr.check_script_line(b"%%>message:" + line), list)


def test_split_script_stream() -> None:
    lines, rest = yr.split_script_stream(b"a\r\n\nb\x00c\nd\r\r\ntail")
    assert lines == [b"a", b"b", b"c", b"d\r"]
    assert rest == b"tail"


# ==========================================================================
# FakeYate: process model (ref §1.1)
# ==========================================================================


def _report(fy: FakeYate) -> dict[str, Any]:
    for line in fy.stderr.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[7:])
    raise AssertionError(f"no report in stderr: {fy.stderr!r}")


def test_spawn_like_execl(tmp_path: Path) -> None:
    """argv == [path, arg]: one entry, spaces kept; cwd/env as given; signals as Yate sets them."""

    async def scenario() -> None:
        p = plan(["report", None], ["exit", 0])
        env = dict(os.environ, FAKEYATE_MARKER="m1")
        fy = FakeYate(PUPPET, p, cwd=str(tmp_path), env=env)
        await fy.start()
        assert await fy.wait_exit(5) == 0
        await fy.wait_until(lambda: "REPORT" in fy.stderr)
        await fy.stop()
        rep = _report(fy)
        assert rep["argv"] == [PUPPET, p]
        assert rep["cwd"] == str(tmp_path)
        assert rep["env_marker"] == "m1"
        assert rep["sigint_ignored"] and rep["sigquit_ignored"] and rep["sigterm_default"]
        assert set(rep["fds"]) <= {0, 1, 2, 3}  # 3 = listdir's own fd; 3..1023 closed

    run(scenario)


def test_spawn_without_argument_passes_empty_string() -> None:
    async def scenario() -> None:
        async with FakeYate(PUPPET) as fy:  # the puppet reports when it gets no plan
            await fy.wait_until(lambda: "REPORT" in fy.stderr)
            assert _report(fy)["argv"] == [PUPPET, ""]
            assert fy.engine_params["workpath"] == os.getcwd()

    run(scenario)


# ==========================================================================
# FakeYate: keyword replies (ref §1.4.4-1.4.7)
# ==========================================================================


def test_install_uninstall_watch_replies() -> None:
    lines_and_replies = [
        ("%%>install:010:x", b"%%<install:8:x:true"),
        ("%%>install:x", b"%%<install:100:x:false"),
        ("%%>install:sip.w:fname:fval", b"%%<install:100:fname:true"),
        ("%%>install:0x10:y:kind:a:b", b"%%<install:16:y:true"),
        ("%%>install:50:", b"%%<install:50::false"),
        ("%%>uninstall:x", b"%%<uninstall:8:x:true"),
        ("%%>uninstall:nope", b"%%<uninstall:0:nope:false"),
        ("%%>install:20:x", b"%%<install:20:x:true"),
        ("%%>watch:a", b"%%<watch:a:true"),
        ("%%>watch:a", b"%%<watch:a:false"),
        ("%%>watch:", b"%%<watch::true"),
        ("%%>unwatch:zz", b"%%<unwatch:zz:false"),
        ("%%>unwatch:a", b"%%<unwatch:a:true"),
        ("%%>watch:b", b"%%<watch:b:true"),
    ]

    async def scenario() -> None:
        steps = [["send", line] for line, _ in lines_and_replies] + [["expect", "%%<watch:b:"]]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_line(b"%%<watch:b:", "Y>S")
            assert fy.lines_to_script() == [r for _, r in lines_and_replies]
            assert fy.installs == {
                "fname": (100, "fval", ""),
                "y": (16, "kind", "a:b"),
                "x": (20, None, None),
            }
            assert fy.watches == {"", "b"}
            lint = [f for f in fy.failures if f.startswith("lint")]
            assert any("fields shift" in f for f in lint)
            assert any("octal" in f for f in lint)
            assert all(f.startswith("lint") for f in fy.failures)

    run(scenario)


def test_setlocal_replies(tmp_path: Path) -> None:
    cases = [
        ("%%>setlocal:timeout:150", b"%%<setlocal:timeout:150:true"),
        ("%%>setlocal:timeout:", b"%%<setlocal:timeout:150:true"),
        ("%%>setlocal:timeout:abc", b"%%<setlocal:timeout:150:true"),
        ("%%>setlocal:timeout: 0x20 ", b"%%<setlocal:timeout:32:true"),
        ("%%>setlocal:maxqueue:20000", b"%%<setlocal:maxqueue:10000:true"),
        ("%%>setlocal:maxqueue:-5", b"%%<setlocal:maxqueue:0:true"),
        ("%%>setlocal:bufsize:100", b"%%<setlocal:bufsize:2048:true"),
        ("%%>setlocal:bufsize:100000", b"%%<setlocal:bufsize:65536:true"),
        ("%%>setlocal:restart:1", b"%%<setlocal:restart:false:true"),
        ("%%>setlocal:restart:true", b"%%<setlocal:restart:true:true"),
        ("%%>setlocal:restart:", b"%%<setlocal:restart:true:true"),
        ("%%>setlocal:restart:0", b"%%<setlocal:restart:true:true"),
        ("%%>setlocal:restart:false", b"%%<setlocal:restart:false:true"),
        ("%%>setlocal:reenter:yes", b"%%<setlocal:reenter:true:true"),
        ("%%>setlocal:selfwatch:on", b"%%<setlocal:selfwatch:true:true"),
        ("%%>setlocal:timebomb:f", b"%%<setlocal:timebomb:false:true"),
        ("%%>setlocal:setdata:false", b"%%<setlocal:setdata:false:true"),
        # ext.cpp answers settime with the *setdata* value (see FakeYate docs)
        ("%%>setlocal:settime:true", b"%%<setlocal:settime:false:true"),
        ("%%>setlocal:debuglevel:99", b"%%<setlocal:debuglevel:10:true"),
        ("%%>setlocal:debuglevel:0", b"%%<setlocal:debuglevel:1:true"),
        ("%%>setlocal:debuglevel:", b"%%<setlocal:debuglevel:1:true"),
        ("%%>setlocal:debugname:foo", b"%%<setlocal:debugname:foo:true"),
        ("%%>setlocal:debugname:bar", b"%%<setlocal:debugname:foo:true"),
        ("%%>setlocal:trackparam:mytrack", b"%%<setlocal:trackparam:mytrack:true"),
        ("%%>setlocal:trackparam:", b"%%<setlocal:trackparam:mytrack:true"),
        ("%%>setlocal:reason:bye now", b"%%<setlocal:reason:bye now:true"),
        ("%%>setlocal:engine.version:", b"%%<setlocal:engine.version:6.4.1:true"),
        ("%%>setlocal:engine.version:x", b"%%<setlocal:engine.version:6.4.1:false"),
        ("%%>setlocal:engine.nodename:", b"%%<setlocal:engine.nodename:node7:true"),
        ("%%>setlocal:engine.trackparam:", b"%%<setlocal:engine.trackparam:handlers:true"),
        ("%%>setlocal:engine.nope:", b"%%<setlocal:engine.nope::false"),
        ("%%>setlocal:config.general.x:", b"%%<setlocal:config.general.x:a:b:true"),
        ("%%>setlocal:config.general:", b"%%<setlocal:config.general::true"),
        ("%%>setlocal:config.nosuch.key:", b"%%<setlocal:config.nosuch.key::false"),
        ("%%>setlocal:loaded.ysipchan:", b"%%<setlocal:loaded.ysipchan:true:true"),
        ("%%>setlocal:loaded.nope:", b"%%<setlocal:loaded.nope:false:true"),
        ("%%>setlocal:unknown:bar", b"%%<setlocal:unknown:bar:false"),
        ("%%>setlocal:id:chan1", b"%%<setlocal:id:chan1:false"),
        ("%%>setlocal: timeout:5", b"%%<setlocal: timeout:5:false"),
        ("%%>setlocal:timeout", b"Error in: %%>setlocal:timeout"),
        ("%%>setlocal::5", b"Error in: %%>setlocal::5"),
        ("%%>setlocal:runid:", None),
    ]

    async def scenario() -> None:
        steps = [["send", line] for line, _ in cases] + [["expect", "%%<setlocal:runid:"]]
        fy = FakeYate(
            PUPPET,
            plan(*steps),
            engine_params={"nodename": "node7"},
            config={"general": {"x": "a:b"}},
        )
        async with fy:
            await fy.wait_line(b"%%<setlocal:runid:", "Y>S")
            got = fy.lines_to_script()
            assert got[:-1] == [r for _, r in cases[:-1]]
            assert got[-1] == b"%%<setlocal:runid:" + fy.runid.encode() + b":true"
            s = fy.settings
            assert s["timeout"] == 32 and s["maxqueue"] == 0 and s["bufsize"] == 65536
            assert s["restart"] is False and s["reenter"] is True and s["selfwatch"] is True
            assert s["settime"] is True and s["setdata"] is False
            assert s["debuglevel"] == 1 and s["debugname"] == "foo"
            assert s["trackparam"] == "mytrack" and s["reason"] == "bye now"
            assert sum(f.startswith("error-in") for f in fy.failures) == 2
            assert any("restart value b'1'" in f for f in fy.failures)

    run(scenario)


def test_error_in_lines() -> None:
    bad = ["hello", "%%>quit now", "%%>message:id:0:app.job", "%%>connect:global", "%%>debug:5",
           "%%>message:id:-1:app.job:", "%%>message:id:0:app.job::=v"]

    async def scenario() -> None:
        steps = [["send", b] for b in bad] + [["expect", "Error in: %%>message:id:0:app.job::=v"]]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_line(b"Error in: %%>message:id:0:app.job::=v", "Y>S")
            assert fy.lines_to_script() == [b"Error in: " + b.encode() for b in bad]
            assert sum(f.startswith("error-in") for f in fy.failures) == len(bad)

    run(scenario)


def test_output_and_debug_lines() -> None:
    async def scenario() -> None:
        steps = [
            ["send", "%%>output:  hi there%z  "],
            ["send", "%%>debug:3:a%zb%Jc"],
            ["send", "%%>debug:loud:x"],
            ["send", "%%>debug:99:y"],
            ["send", "%%>debug:5:bad%qtail"],
            ["send", "%%>output:done"],
        ]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_until(lambda: "done" in fy.output_lines)
            assert fy.output_lines == ["hi there%z", "done"]  # trimmed, never unescaped
            assert fy.debug_lines == [(3, "a:b\nc"), (10, "x"), (10, "y"), (5, "bad")]
            assert fy.lines_to_script() == []  # no replies to output/debug

    run(scenario)


# ==========================================================================
# FakeYate: Yate -> script messages (ref §1.4.1, §1.4.2, §1.5, §6)
# ==========================================================================


def test_dispatch_filter_tracking_and_answer() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "naive_ok.py")) as fy:
            await fy.wait_installed("test.echo")
            assert fy.installs["test.echo"] == (50, "kind", "echo")
            seen: list[YMessage] = []

            def early(m: YMessage) -> bool:
                seen.append(m.copy())
                return False

            fy.on("test.echo", early, priority=10, track="regexroute")
            r = await fy.dispatch("test.echo", [("kind", "echo"), ("v", "a:b\n%")], "rv")
            assert r.handled and r.answered and not r.timed_out and r.outcome == "answered"
            assert r.retval == "rv" and r["answered_by"] == "naive" and r["v"] == "a:b\n%"
            assert r["handlers"] == "regexroute:10,naive:50"
            assert seen and "handlers" in seen[0]
            sent = [line for line in fy.lines_to_script() if line.startswith(b"%%>message:")]
            assert len(sent) == 1
            hid = r.id.encode()
            assert sent[0] == (b"%%>message:" + hid + b":" + str(r.time).encode()
                               + b":test.echo:rv:kind=echo:v=a%zb%J%%:handlers=regexroute%z10,naive%z50")
            assert hid.startswith(b"0x") and hid.split(b".")[1].isdigit()
            # filter mismatch / missing filter param / not installed: never reaches the script
            for params in ({"kind": "other"}, {}):
                r2 = await fy.dispatch("test.echo", params)
                assert not r2.handled and r2.outcome == "not-delivered"
            r3 = await fy.dispatch("not.installed", {"a": "1"})
            assert not r3.handled and not r3.answered and r3.params == [("a", "1")]
            assert fy.failures == []

    run(scenario)


def test_bool1_answer_is_unmatched_and_times_out() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "answers_bool1.py")) as fy:
            await fy.wait_installed("test.bool1")
            await fy.wait_until(lambda: fy.settings["timeout"] == 200)
            t0 = time.monotonic()
            r = await fy.dispatch("test.bool1", {"a": "1"}, "orig")
            took = time.monotonic() - t0
            assert 0.18 <= took < 2.0
            assert not r.handled and r.timed_out and not r.answered and r.outcome == "timeout"
            assert r.retval == "orig" and r.params == [("a", "1")]
            assert fy.timeouts == [r]
            assert any(f.startswith("unmatched") for f in fy.failures)
            assert any("b'1' is not one of true" in f for f in fy.failures)

    run(scenario)


@pytest.mark.parametrize(
    "answer, handled, name, retval, params",
    [
        # ref §6 item 1, verbatim
        ("%%<message:{id}:true:foo.renamed:newrv:x=1:bad=%q:y=2", True, "foo.renamed", "newrv",
         [("keep", "1"), ("x", "1")]),
        ("%%<message:{id}:t rue:foo.renamed:newrv", True, "foo", "rv", [("keep", "1")]),
        ("%%<message:{id}:false:bar:nrv:=oops", False, "bar", "nrv", [("keep", "1")]),
        ("%%<message:{id}:true", False, "foo", "rv", [("keep", "1")]),
    ],
)
def test_partial_application_then_timeout(
    answer: str, handled: bool, name: str, retval: str, params: list[tuple[str, str]]
) -> None:
    async def scenario() -> None:
        steps = [["send", "%%>setlocal:timeout:100"], ["send", "%%>install:foo"], ["answer_next", answer]]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_installed("foo")
            await fy.wait_until(lambda: fy.settings["timeout"] == 100)
            r = await fy.dispatch("foo", {"keep": "1"}, "rv")
            assert r.timed_out and not r.answered
            assert (r.handled, r.name, r.retval, r.params) == (handled, name, retval, params)
            assert any(f.startswith("unmatched") for f in fy.failures)

    run(scenario)


def test_bad_answer_then_good_answer_same_id() -> None:
    async def scenario() -> None:
        steps = [
            ["send", "%%>install:foo"],
            ["answer_next", "%%<message:{id}:true:foo.renamed:newrv:x=1:bad=%q:y=2"],
            ["sleep", 0.05],
            ["answer_again", "%%<message:{id}:false:::z=3"],
        ]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_installed("foo")
            r = await fy.dispatch("foo", {"keep": "1"}, "rv")
            assert r.answered and not r.timed_out
            # second answer: empty name keeps the (already renamed) name, empty retval clears
            assert (r.handled, r.name, r.retval) == (False, "foo.renamed", "")
            assert r.params == [("keep", "1"), ("x", "1"), ("z", "3")]
            assert sum(f.startswith("unmatched") for f in fy.failures) == 1

    run(scenario)


def test_maxqueue_refusal_and_timeout() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "never_answers.py"), "timeout:300,maxqueue:1") as fy:
            await fy.wait_installed("test.slow")
            assert fy.settings["maxqueue"] == 1 and fy.settings["timeout"] == 300
            first = asyncio.ensure_future(fy.dispatch("test.slow", {"n": "1"}))
            await fy.wait_until(lambda: fy.queue_length == 1)
            t0 = time.monotonic()
            second = await fy.dispatch("test.slow", {"n": "2"})
            assert time.monotonic() - t0 < 0.1
            assert not second.handled and second.outcome == "refused"
            assert fy.refusals and "queued" in fy.refusals[0][1]
            r1 = await first
            assert r1.timed_out and not r1.handled and fy.queue_length == 0
            # a late answer after the timeout is only "unmatched"
            assert fy.failures == []

    run(scenario)


def test_script_death_releases_waiting_messages() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "never_answers.py"), "timeout:0") as fy:
            await fy.wait_installed("test.slow")
            pending = asyncio.ensure_future(fy.dispatch("test.slow"))
            await fy.wait_until(lambda: fy.queue_length == 1)
            await fy.close_stdin()
            r = await asyncio.wait_for(pending, 2)
            assert r.outcome == "dropped" and not r.handled and not r.timed_out
            assert await fy.wait_exit(2) in (0, -signal.SIGTERM)  # 0 unless it took > 30 ms
            after = await fy.dispatch("test.slow")
            assert after.outcome == "not-delivered" and fy.installs == {}

    run(scenario)


def test_timebomb_kills_on_timeout() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "never_answers.py"), "timeout:100,timebomb:true") as fy:
            await fy.wait_installed("test.slow")
            r = await fy.dispatch("test.slow")
            assert r.timed_out
            assert await fy.wait_exit(2) in (0, -signal.SIGTERM)
            await fy.wait_until(lambda: not fy.alive)

    run(scenario)


def test_long_lines_to_script_are_fine() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "naive_ok.py")) as fy:
            await fy.wait_installed("test.echo")
            big = "x" * 200_000
            r = await fy.dispatch("test.echo", {"kind": "echo", "body": big})
            assert r.handled and r["body"] == big

    run(scenario)


# ==========================================================================
# FakeYate: script -> Yate messages, watches (ref §1.4.3, §1.4.6)
# ==========================================================================


def test_script_messages_answers_reenter_and_watch_order() -> None:
    async def scenario() -> None:
        steps = [
            ["send", "%%>install:app.self"],
            ["send", "%%>setlocal:selfwatch:true"],
            ["send", "%%>watch:app.job"],
            ["expect", "%%<watch:app.job:"],
            ["send", "%%>message:m1:0:app.self::p=1"],
            ["send", "%%>message::0:app.self::p=2"],
            ["send", "%%>message:m%z2:0x10:app.job:r0:d=1:d=2:k"],
            ["expect", "%%<message:m%z2:"],
        ]
        auto = "%%<message:{id}:true:{name}:{retval}:seen=1"

        def job(m: YMessage) -> bool:
            m.retval = "done"
            m.add("a=b", "c:d")
            return True

        async with FakeYate(PUPPET, plan(*steps, auto=auto)) as fy:
            fy.on("app.job", job, track="jobber")
            await fy.wait_line(b"%%<message:m%z2:", "Y>S")
            out = fy.lines_to_script()
            # own message with an id: not delivered to its own handler (reenter=false)
            assert b"%%<message:m1:false:app.self::p=1" in out
            # empty id: delivered to its own handler, and no answer line
            delivered = [line for line in out if line.startswith(b"%%>message:")]
            assert len(delivered) == 1 and delivered[0].endswith(b":app.self::p=2")
            assert not any(line.startswith(b"%%<message::") and b"app.self" in line for line in out)
            answer = b"%%<message:m%z2:true:app.job:done:d=2:handlers=jobber%z100:a%}b=c%zd"
            watch = b"%%<message::true:app.job:done:d=2:handlers=jobber%z100:a%}b=c%zd"
            assert answer in out and watch in out
            assert out.index(watch) < out.index(answer)  # Surprise 24
            sent = {m.id: m for m in fy.sent_by_script}
            assert sent["m:2"].time == 16 and sent["m:2"].params == [("d", "2")]
            assert sent["m1"].time > 1_000_000_000  # 0 means "now"
            assert sent["m:2"].result is not None and sent["m:2"].result.retval == "done"
            assert any("no-op" in f for f in fy.failures)  # the bare 'k'
            assert not any(f.startswith(("unmatched", "error-in")) for f in fy.failures)

    run(scenario)


def test_watch_notify_and_wildcard() -> None:
    async def scenario() -> None:
        async with FakeYate(str(STUBS / "naive_ok.py")) as fy:
            await fy.wait_until(lambda: "test.watched" in fy.watches)
            assert await fy.watch_notify("test.watched", {"a": "b:c"}, "rv", handled=False)
            assert not await fy.watch_notify("other.name", {})
            assert b"%%<message::false:test.watched:rv:a=b%zc" in fy.lines_to_script()
        steps = [["send", "%%>watch:"], ["expect", "%%<watch::true"]]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_until(lambda: "" in fy.watches)
            fy.on("any.thing", lambda m: True)
            r = await fy.dispatch("any.thing", {"x": "1"})
            assert r.handled
            await fy.wait_line(b"%%<message::true:any.thing::x=1", "Y>S")
            assert await fy.watch_notify("whatever")

    run(scenario)


def test_engine_handler_chain_without_script() -> None:
    async def scenario() -> None:
        fy = FakeYate(PUPPET)
        order: list[str] = []

        def mk(tag: str, result: bool) -> Callable[[YMessage], bool]:
            def h(m: YMessage) -> bool:
                order.append(tag)
                return result
            return h

        async def slow(m: YMessage) -> bool:
            await asyncio.sleep(0.01)
            order.append("slow")
            m.name = "renamed"
            return False

        fy.on("a", mk("p90", True), priority=90)
        fy.on("a", slow, priority=50)
        fy.on("a", mk("p100", True), priority=100)
        fy.on("renamed", mk("r95", False), priority=95)
        r = await fy.dispatch("a")
        assert order == ["slow", "r95"] and not r.handled and r.name == "renamed"
        order.clear()
        fy.off("renamed")
        fy.on("b", mk("b1", True), priority=1)
        fy.on("b", mk("b2", False), priority=2)
        r = await fy.dispatch("b", broadcast=True)
        assert order == ["b1", "b2"] and r.handled
        order.clear()
        r = await fy.dispatch("b")
        assert order == ["b1"] and r.handled

    run(scenario)


# ==========================================================================
# FakeYate: framing and lifecycle (ref §1.2, §1.4.10, §1.6, §6)
# ==========================================================================


def test_overlong_line_kills_script() -> None:
    async def scenario() -> None:
        fy = FakeYate(str(STUBS / "overlong_line.py"), "8191")
        await fy.start()
        t0 = time.monotonic()
        rc = await fy.wait_exit(5)
        await fy.stop()
        assert rc == -signal.SIGTERM and time.monotonic() - t0 >= 0.03
        assert fy.output_lines == ["before"]
        assert any(f.startswith("overflow") for f in fy.failures)
        assert any(line == b"SIGTERM #1" for d, line in fy.transcript if d == "EVT")

    run(scenario)


def test_huge_overlong_line_still_lets_the_process_be_reaped() -> None:
    async def scenario() -> None:
        fy = FakeYate(str(STUBS / "overlong_line.py"), "1000000")
        await fy.start()
        assert await fy.wait_exit(5) == -signal.SIGTERM
        await fy.stop()
        assert any(f.startswith("overflow") for f in fy.failures)

    run(scenario)


@pytest.mark.parametrize(
    "bufsize_cmd, length, cr, ok",
    [(None, 8190, False, True), (None, 8191, False, False), (None, 8191, True, False),
     (None, 8190, True, True), ("2048", 2046, False, True), ("2048", 2047, False, False),
     ("65536", 20000, False, True)],
)
def test_line_limit_exact(bufsize_cmd: str | None, length: int, cr: bool, ok: bool) -> None:
    async def scenario() -> None:
        payload = "%%>output:" + "x" * (length - 10 - (1 if cr else 0)) + ("\r" if cr else "")
        assert len(payload) == length
        steps: list[list[Any]] = []
        if bufsize_cmd:
            steps += [["send", f"%%>setlocal:bufsize:{bufsize_cmd}"], ["expect", "%%<setlocal:bufsize:"]]
        steps += [["send", payload], ["send", "%%>output:done"]]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            if ok:
                await fy.wait_until(lambda: "done" in fy.output_lines)
                assert len(fy.output_lines[0]) == length - 10 - (1 if cr else 0)
                assert fy.failures == []
            else:
                await fy.wait_until(lambda: not fy.alive)
                assert fy.output_lines == []
                assert any(f.startswith("overflow") for f in fy.failures)

    run(scenario)


def test_unterminated_last_line_is_lost() -> None:
    async def scenario() -> None:
        steps = [["send", "%%>output:one"], ["sendraw", "%%>output:tail"], ["exit", 0]]
        fy = FakeYate(PUPPET, plan(*steps))
        await fy.start()
        assert await fy.wait_exit(5) == 0
        await fy.wait_until(lambda: not fy.alive)
        await fy.stop()
        assert fy.output_lines == ["one"]
        assert any(f.startswith("eof: unterminated") for f in fy.failures)

    run(scenario)


def test_close_stdin_then_sigterm() -> None:
    async def scenario() -> None:
        steps = [["send", "%%>install:x"], ["hang", None]]
        fy = FakeYate(PUPPET, plan(*steps))
        await fy.start()
        await fy.wait_installed("x")
        t0 = time.monotonic()
        await fy.close_stdin()
        rc = await fy.wait_exit(2)
        assert rc == -signal.SIGTERM and 0.03 <= time.monotonic() - t0 < 1.0
        assert fy.installs == {} and not fy.alive
        await fy.stop()

    run(scenario)


def test_quit_replies_then_restart_respawns(tmp_path: Path) -> None:
    flag = str(tmp_path / "quit-once")

    async def scenario() -> None:
        steps = [
            ["send", "%%>setlocal:restart:true"],
            ["expect", "%%<setlocal:restart:"],
            ["send", "%%>install:x"],
            ["expect", "%%<install:"],
            ["touch_or_skip", flag],
            ["send", "%%>quit"],
            ["send", "%%>output:after quit"],  # Yate has stopped reading
        ]
        async with FakeYate(PUPPET, plan(*steps)) as fy:
            await fy.wait_until(lambda: fy.spawn_count == 2 and fy.installs.get("x"))
            out = fy.lines_to_script()
            assert out.count(b"%%<quit") == 1
            assert out.count(b"%%<install:100:x:true") == 2  # state reset per process
            assert fy.output_lines == []
            await fy.wait_until(lambda: fy.exit_codes == [0])
            assert fy.settings["restart"] is True
        assert fy.spawn_count == 2

    run(scenario)


def test_restart_1_does_not_respawn() -> None:
    async def scenario() -> None:
        steps = [["send", "%%>setlocal:restart:1"], ["expect", "%%<setlocal:restart:"], ["exit", 1]]
        fy = FakeYate(PUPPET, plan(*steps))
        await fy.start()
        assert await fy.wait_exit(5) == 1
        await fy.wait_until(lambda: not fy.alive)
        await asyncio.sleep(0.1)
        assert fy.spawn_count == 1
        assert b"%%<setlocal:restart:false:true" in fy.lines_to_script()
        await fy.stop()

    run(scenario)


def test_crash_loop_is_bounded() -> None:
    async def scenario() -> None:
        steps = [["send", "%%>setlocal:restart:true"], ["expect", "%%<setlocal:restart:"], ["exit", 2]]
        fy = FakeYate(PUPPET, plan(*steps), max_spawns=3)
        await fy.start()
        await fy.wait_until(
            lambda: len(fy.exit_codes) == 3 and any(f.startswith("respawn") for f in fy.failures), 10
        )
        assert fy.spawn_count == 3 and fy.exit_codes == [2, 2, 2]
        await fy.stop()

    run(scenario)
