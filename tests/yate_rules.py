"""Yate's extmodule decoder rules, re-implemented independently for the tests.

Everything here is written from ``/work/shared/reference/yate-internals.md``
(cited as "ref §N") and checked against the public Yate sources it cites
(``engine/String.cpp``, ``engine/Message.cpp``, ``modules/extmodule.cpp``).
It deliberately does **not** import ``yate_sipgen``: the point is to have a
second, independent implementation that can catch bugs in the project codec.

All wire data is handled as ``bytes``: Yate passes bytes 0x80-0xFF through
untouched (ref §1.3), so nothing here assumes UTF-8.

Main entry points
-----------------
* :func:`yate_escape` / :func:`yate_unescape` -- ``String::msgEscape`` /
  ``String::msgUnescape`` (ref §1.3).
* :func:`decode_answer` -- how Yate matches and applies a ``%%<message``
  answer to one waiting message, **chunk by chunk** (ref §1.4.2,
  "Partial application", and §6 item 1).
* :func:`decode_script_message` / :func:`parse_script_message` -- a
  ``%%>message`` emitted by the script (ref §1.4.3).
* :func:`parse_install` -- ``%%>install`` field parsing, including the
  field shift of ref §5 Surprise 27.
* :func:`check_script_line` -- every problem Yate would have with one line
  the script writes (plus a few lint rules, marked as such in the text).

The partial-application rule (ref §1.4.2 and §6 item 1)
-------------------------------------------------------
A ``%%<message:<id>:<processed>:<name>:<retval>:<k=v>...`` answer is applied
to the *live* message while it is being decoded:

1. the processed flag is parsed first and written into the holder's return
   value (``MsgHolder::m_ret``) even if garbage follows it (``t rue`` stores
   ``true`` and then fails);
2. the name (if non-empty) renames the message, then the retval replaces the
   return value, then each param chunk is applied left to right;
3. the first bad chunk (bad escape, raw control byte, chunk starting with
   ``=``) stops decoding.  What was applied stays applied, the answer counts
   as **unmatched** (only logged, no ``Error in:``), the message keeps
   waiting, and if it then times out the dispatcher gets the processed flag
   parsed in step 1 -- not ``false`` (live observation, ref §6 item 1).

:func:`decode_answer` implements exactly that: it mutates the
:class:`WireMessage` it is given and returns the (possibly updated) flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

__all__ = [
    "YateDecodeError",
    "WireMessage",
    "ScriptMessage",
    "InstallRequest",
    "TRUE_TOKENS",
    "FALSE_TOKENS",
    "BOOL_TOKENS",
    "KEYWORD_ORDER",
    "SETLOCAL_BOOLEANS",
    "DEF_BUFSIZE",
    "MIN_BUFSIZE",
    "MAX_BUFSIZE",
    "MAX_MAXQUEUE",
    "yate_escape",
    "yate_unescape",
    "msg_unescape",
    "c_strtol",
    "c_strtoul",
    "yate_strtoi",
    "yate_to_integer",
    "yate_to_boolean",
    "yate_bool_text",
    "bool_prefix",
    "trim_blanks",
    "common_decode",
    "decode_answer",
    "decode_script_message",
    "parse_script_message",
    "encode_params",
    "encode_message_line",
    "encode_answer_line",
    "parse_install",
    "parse_setlocal",
    "parse_debug",
    "script_line_keyword",
    "split_script_stream",
    "check_script_line",
]

# --------------------------------------------------------------------------
# Constants (ref §0, §1.2, §1.4.7)
# --------------------------------------------------------------------------

#: ``str_true`` of String.cpp, in the order Yate tests them (ref §0).
TRUE_TOKENS: tuple[bytes, ...] = (b"true", b"yes", b"on", b"enable", b"t")
#: ``str_false`` of String.cpp; Yate tests these *before* the true tokens.
FALSE_TOKENS: tuple[bytes, ...] = (b"false", b"no", b"off", b"disable", b"f")
BOOL_TOKENS: frozenset[bytes] = frozenset(TRUE_TOKENS + FALSE_TOKENS)

DEF_BUFSIZE = 8192  # DEF_INCOMING_LINE (ref §1.2)
MIN_BUFSIZE = 2048  # MIN_INCOMING_LINE
MAX_BUFSIZE = 65536  # MAX_INCOMING_LINE
MAX_MAXQUEUE = 10000  # ref §1.4.7

INT_MAX = 2**31 - 1
INT_MIN = -(2**31)
UINT_MAX = 2**32 - 1
LONG_MAX = 2**63 - 1
LONG_MIN = -(2**63)
ULONG_MAX = 2**64 - 1

#: Keyword prefixes in the order ``ExtModReceiver::processLine`` tests them
#: (ref §1.4).  ``%%>quit`` is an exact match, ``%%>message:`` is the final
#: decode attempt.  ``%%>connect:`` is only a keyword while the role is unknown.
KEYWORD_ORDER: tuple[tuple[str, bytes], ...] = (
    ("answer", b"%%<message:"),
    ("install", b"%%>install:"),
    ("uninstall", b"%%>uninstall:"),
    ("watch", b"%%>watch:"),
    ("unwatch", b"%%>unwatch:"),
    ("output", b"%%>output:"),
    ("debug", b"%%>debug:"),
    ("setlocal", b"%%>setlocal:"),
)

#: setlocal names whose value goes through ``String::toBoolean`` (ref §1.4.7).
SETLOCAL_BOOLEANS: frozenset[bytes] = frozenset(
    {b"restart", b"timebomb", b"reenter", b"setdata", b"settime", b"selfwatch"}
)
SETLOCAL_INTEGERS: dict[bytes, tuple[int, int]] = {
    b"timeout": (INT_MIN, INT_MAX),
    b"maxqueue": (0, MAX_MAXQUEUE),
    b"bufsize": (MIN_BUFSIZE, MAX_BUFSIZE),
    b"debuglevel": (1, 10),
}
SETLOCAL_STRINGS: frozenset[bytes] = frozenset({b"trackparam", b"reason", b"debugname"})
SETLOCAL_CHANNEL_ONLY: frozenset[bytes] = frozenset({b"id", b"disconnected"})
SETLOCAL_READONLY_PREFIXES: tuple[bytes, ...] = (b"engine.", b"config.", b"loaded.")

_C_SPACE = b" \t\n\v\f\r"  # isspace() in the C locale
_WORD_BREAK = b" \t\r\n"  # isWordBreak() in String.cpp (NUL handled separately)


class YateDecodeError(ValueError):
    """Raised where ``String::msgUnescape`` reports an error (ref §1.3).

    Attributes:
        offset: index in the *input* of the offending byte (the bad byte after
            ``%``, the raw control byte, or ``len(input)`` for a trailing
            ``%``).  Yate's own offset is relative to the last escape; it is
            only used for logging, so the absolute one is reported here.
        partial: what Yate had decoded before the error.
    """

    def __init__(self, message: str, offset: int, partial: bytes) -> None:
        super().__init__(message)
        self.offset = offset
        self.partial = partial


# --------------------------------------------------------------------------
# Escaping (ref §1.3)
# --------------------------------------------------------------------------


def _extra_code(extra: bytes | int | None) -> Optional[int]:
    if extra is None:
        return None
    if isinstance(extra, int):
        code = extra
    else:
        if len(extra) != 1:
            raise ValueError("extra must be exactly one byte")
        code = extra[0]
    if code == 0:
        return None
    return code


def yate_escape(s: bytes, extra: bytes | None = None) -> bytes:
    """``String::msgEscape`` (ref §1.3, Str.cpp).

    A byte below 0x20, ``:`` or the optional *extra* byte becomes ``%`` plus
    chr(c+0x40); ``%`` becomes ``%%``; every other byte (0x7F-0xFF included)
    is copied.  Yate escapes param *names* with ``extra=b"="`` (``=`` is sent
    as ``%}``) and everything else without an extra character.

    Raises:
        ValueError: *s* contains NUL, which a Yate (C) string cannot hold.
    """
    if b"\x00" in s:
        raise ValueError("NUL cannot be carried in a Yate string")
    ex = _extra_code(extra)
    out = bytearray()
    for c in s:
        if c < 0x20 or c == 0x3A or (ex is not None and c == ex):
            out += b"%"
            out.append((c + 0x40) & 0xFF)
        elif c == 0x25:
            out += b"%%"
        else:
            out.append(c)
    return bytes(out)


def msg_unescape(s: bytes, extra: bytes | int | None = None) -> tuple[bytes, int]:
    """Faithful ``String::msgUnescape(str, &err, extra)``: ``(decoded, err)``.

    ``err`` is -1 on success, otherwise the (absolute) offset of the error and
    ``decoded`` is what Yate had produced so far -- that partial value is what
    Yate uses when it does not check the error (``%%>install`` filter fields,
    ``%%>debug`` text).

    Accepted after ``%`` (ref §1.3): ``A``..``_`` (0x41-0x5F, giving
    0x01-0x1F), ``z`` (``:``), ``%``, and *extra*+0x40 when an extra character
    was requested.  Anything else -- ``%@``, ``%a``, ``%}`` without extra, a
    ``%`` at the very end -- is an error, and so is a raw byte below 0x20.

    Note: for a trailing ``%`` the C code actually reads past the terminating
    NUL (undefined behaviour) when no extra char is given; the reference
    classifies it as an error and so do we.
    """
    ex = _extra_code(extra)
    ex_code = ((ex + 0x40) & 0xFF) if ex is not None else None
    out = bytearray()
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c < 0x20:
            return bytes(out), i
        if c == 0x25:  # '%'
            if i + 1 >= n:
                return bytes(out), n
            d = s[i + 1]
            if 0x40 < d <= 0x5F or d == 0x7A or (ex_code is not None and d == ex_code):
                out.append((d - 0x40) & 0xFF)
            elif d == 0x25:
                out.append(0x25)
            else:
                return bytes(out), i + 1
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out), -1


def yate_unescape(s: bytes, extra: bytes | None = None) -> bytes:
    """Strict ``String::msgUnescape``; raises :class:`YateDecodeError` where Yate fails.

    See :func:`msg_unescape` for the accepted escapes (ref §1.3).
    """
    out, err = msg_unescape(s, extra)
    if err >= 0:
        if err < len(s) and s[err] < 0x20:
            why = f"raw control byte 0x{s[err]:02x}"
        elif err >= len(s):
            why = "'%' at the end of the field"
        else:
            why = f"invalid escape '%{chr(s[err])}'"
        raise YateDecodeError(f"{why} at offset {err} in {s!r}", err, out)
    return out


# --------------------------------------------------------------------------
# C number and boolean parsing, as Yate's String uses it
# --------------------------------------------------------------------------


def _digit_value(c: int) -> int:
    if 0x30 <= c <= 0x39:
        return c - 0x30
    if 0x61 <= c <= 0x7A:
        return c - 0x61 + 10
    if 0x41 <= c <= 0x5A:
        return c - 0x41 + 10
    return 99


def _c_strto(s: bytes, base: int) -> tuple[int, int, bool]:
    """Common part of strtol/strtoul: ``(sign*magnitude, end, negative)``.

    ``end`` is 0 when no conversion was performed (C sets endptr = nptr).
    """
    i = 0
    n = len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    neg = False
    if i < n and s[i] in b"+-":
        neg = s[i] == 0x2D
        i += 1
    if base == 0:
        if s[i : i + 2] in (b"0x", b"0X") and i + 2 < n and _digit_value(s[i + 2]) < 16:
            base = 16
            i += 2
        elif s[i : i + 1] == b"0":
            base = 8
        else:
            base = 10
    elif base == 16 and s[i : i + 2] in (b"0x", b"0X") and i + 2 < n and _digit_value(s[i + 2]) < 16:
        i += 2
    start = i
    val = 0
    while i < n and _digit_value(s[i]) < base:
        val = val * base + _digit_value(s[i])
        i += 1
    if i == start:
        return 0, 0, False
    return val, i, neg


def c_strtol(s: bytes, base: int = 0) -> tuple[int, int, bool]:
    """C ``strtol`` on a 64-bit platform: ``(value, end, erange)``."""
    mag, end, neg = _c_strto(s, base)
    if end == 0:
        return 0, 0, False
    val = -mag if neg else mag
    if val > LONG_MAX:
        return LONG_MAX, end, True
    if val < LONG_MIN:
        return LONG_MIN, end, True
    return val, end, False


def c_strtoul(s: bytes, base: int = 0) -> tuple[int, int, bool]:
    """C ``strtoul`` on a 64-bit platform: ``(value, end, erange)``.

    A leading ``-`` negates modulo 2**64, as C does (``-1`` gives ULONG_MAX).
    """
    mag, end, neg = _c_strto(s, base)
    if end == 0:
        return 0, 0, False
    if mag > ULONG_MAX:
        return ULONG_MAX, end, True
    return ((-mag) % (ULONG_MAX + 1)) if neg else mag, end, False


def yate_strtoi(s: bytes) -> tuple[int, int]:
    """``strtoi`` of String.cpp (base 0): ``(value, end)``.

    Out of int range -- including exactly INT_MAX and INT_MIN, since the code
    tests ``>=``/``<=`` -- marks the whole string unreadable (end = 0).
    """
    val, end, erange = c_strtol(s, 0)
    if end == 0:
        return 0, 0
    if erange or val >= INT_MAX or val <= INT_MIN:
        return (INT_MAX if val > 0 else INT_MIN), 0
    return val, end


def yate_to_integer(
    s: bytes | None,
    default: int,
    minvalue: int = INT_MIN,
    maxvalue: int = INT_MAX,
    clamp: bool = True,
) -> int:
    """``String::toInteger(default, base=0, min, max, clamp)``.

    The whole string must parse (no trailing garbage) or *default* is
    returned; an empty string is a null String and gives *default*.
    """
    if not s:
        return default
    val, end = yate_strtoi(s)
    if end == 0 or end != len(s):
        return default
    if minvalue <= val <= maxvalue:
        return val
    if clamp:
        return minvalue if val < minvalue else maxvalue
    return default


def yate_to_boolean(s: bytes | None, default: bool) -> bool:
    """``String::toBoolean``: exact, case-sensitive tokens only (ref §0, §5 item 14)."""
    if not s:
        return default
    if s in FALSE_TOKENS:
        return False
    if s in TRUE_TOKENS:
        return True
    return default


def yate_bool_text(v: bool) -> bytes:
    """``String::boolText``: how Yate prints a bool."""
    return b"true" if v else b"false"


def bool_prefix(s: bytes) -> tuple[Optional[bool], bytes]:
    """``String::operator>>(bool&)``: ``(value or None, rest)``.

    Leading spaces/tabs are skipped; a token matches only if followed by a
    word break (space, TAB, CR, LF) or the end.  False tokens are tried first.
    On no match the string is left *unchanged* (leading blanks included).
    """
    i = 0
    while i < len(s) and s[i] in b" \t":
        i += 1
    t = s[i:]
    for value, tokens in ((False, FALSE_TOKENS), (True, TRUE_TOKENS)):
        for tok in tokens:
            if t.startswith(tok) and (len(t) == len(tok) or t[len(tok)] in _WORD_BREAK):
                return value, t[len(tok) :]
    return None, s


def trim_blanks(s: bytes) -> bytes:
    """``String::trimBlanks``: strips spaces and TABs only."""
    return s.strip(b" \t")


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


@dataclass
class WireMessage:
    """A Yate ``Message`` as far as the protocol can see it (bytes everywhere).

    ``params`` keeps order and duplicates, like ``NamedList``.
    """

    name: bytes = b""
    retval: bytes = b""
    params: list[tuple[bytes, bytes]] = field(default_factory=list)

    def get_param(self, key: bytes) -> Optional[bytes]:
        """``NamedList::getParam``: the first param with that name."""
        for k, v in self.params:
            if k == key:
                return v
        return None

    def set_param(self, key: bytes, value: bytes) -> None:
        """``NamedList::setParam``: replace the *first* ``key``, else append (ref §5 item 25)."""
        for i, (k, _) in enumerate(self.params):
            if k == key:
                self.params[i] = (key, value)
                return
        self.params.append((key, value))

    def clear_param(self, key: bytes) -> None:
        """``NamedList::clearParam``: delete *every* param named ``key`` (ref §1.4.2)."""
        self.params = [(k, v) for k, v in self.params if k != key]

    def copy(self) -> "WireMessage":
        return WireMessage(self.name, self.retval, list(self.params))


#: One ``common_decode`` diagnostic: (kind, detail).  Kinds: ``no-name-colon``,
#: ``name-escape``, ``retval-escape``, ``param-escape``, ``param-starts-with-eq``
#: (errors) and ``bare-key`` (informational: a chunk without ``=``).
Diag = tuple[str, str]


def common_decode(line: bytes, offs: int, msg: WireMessage, diag: Optional[list[Diag]] = None) -> int:
    """Port of ``Message::commonDecode`` (ref §1.4.2, Msg.cpp:182-234).

    Decodes ``<name>:<retval>[:<chunk>]...`` starting at ``line[offs:]`` and
    applies it to *msg* **as it goes** (partial application).  Returns -2 on
    success, otherwise a non-negative error position.

    * the ``:`` after the name is mandatory;
    * a non-empty name renames the message;
    * the retval always replaces the return value (empty clears it);
    * each further chunk is unescaped *then* split on the first ``=``:
      ``k=v`` sets the first ``k``, bare ``k`` deletes all ``k``, an empty
      chunk is skipped, a chunk starting with ``=`` is an error.
    """
    rest = line[offs:]
    sep = rest.find(b":")
    if sep < 0:
        if diag is not None:
            diag.append(("no-name-colon", f"no ':' after the message name {rest!r}"))
        return offs
    chunk, err = msg_unescape(rest[:sep])
    if err >= 0:
        if diag is not None:
            diag.append(("name-escape", f"bad escape in the name {rest[:sep]!r} at offset {offs + err}"))
        return offs + err
    if chunk:
        msg.name = chunk
    offs += sep + 1
    rest = rest[sep + 1 :]
    sep = rest.find(b":")
    raw = rest[:sep] if sep >= 0 else rest
    chunk, err = msg_unescape(raw)
    if err >= 0:
        if diag is not None:
            diag.append(("retval-escape", f"bad escape in the retval {raw!r} at offset {offs + err}"))
        return offs + err
    msg.retval = chunk
    while sep >= 0:
        offs += sep + 1
        rest = rest[sep + 1 :]
        sep = rest.find(b":")
        raw = rest[:sep] if sep >= 0 else rest
        if not raw:
            continue
        chunk, err = msg_unescape(raw)
        if err >= 0:
            if diag is not None:
                diag.append(("param-escape", f"bad escape in param chunk {raw!r} at offset {offs + err}"))
            return offs + err
        pos = chunk.find(b"=")
        if pos < 0:
            if diag is not None:
                diag.append(("bare-key", f"param chunk {raw!r} has no '=' (deletes every {chunk!r})"))
            msg.clear_param(chunk)
        elif pos == 0:
            if diag is not None:
                diag.append(("param-starts-with-eq", f"param chunk {raw!r} starts with '='"))
            return offs - 1
        else:
            msg.set_param(chunk[:pos], chunk[pos + 1 :])
    return -2


def decode_answer(
    line: bytes,
    holder_id: bytes,
    msg: WireMessage,
    ret: bool = False,
    diag: Optional[list[Diag]] = None,
) -> tuple[int, bool]:
    """Try a ``%%<message`` answer against one waiting message (ref §1.4.2).

    Port of ``MsgHolder::decode`` → ``Message::decode(str, received, id)``.
    Returns ``(code, ret)``:

    * ``code == -2``: matched; *msg* now holds the answer's changes and
      ``ret`` the processed flag;
    * ``code == -1``: the line is not for this holder (different id); nothing
      was touched;
    * any other code: the line *is* for this holder but is malformed.  The
      answer is "unmatched", but -- partial application -- *ret* may already
      hold the parsed processed flag and *msg* whatever was decoded before the
      error (ref §1.4.2, §6 item 1).  Pass the returned ``ret`` back in on the
      next attempt: it is the holder's ``m_ret``.
    """
    prefix = b"%%<message:" + holder_id + b":"
    if not line.startswith(prefix):
        return -1, ret
    sep = line.find(b":", len(prefix))
    if sep < 0:
        if diag is not None:
            diag.append(("no-processed-colon", "no ':' after the processed field"))
        return len(prefix), ret
    rcvd = line[len(prefix) : sep]
    if rcvd:
        value, rest = bool_prefix(rcvd)
        if value is not None:
            ret = value
        if rest:
            if diag is not None:
                diag.append(("processed", f"processed field {rcvd!r} is not a boolean"))
            return len(prefix), ret
    if sep + 1 >= len(line):
        return -2, ret  # "%%<message:<id>:<bool>:" keeps everything
    return common_decode(line, sep + 1, msg, diag), ret


@dataclass
class ScriptMessage:
    """A decoded ``%%>message`` line from the script (ref §1.4.3)."""

    id: bytes
    time: int  # 0 means "now"
    msg: WireMessage


def decode_script_message(
    line: bytes, diag: Optional[list[Diag]] = None
) -> tuple[int, Optional[ScriptMessage]]:
    """Port of ``Message::decode(str, id)`` for a script's ``%%>message``.

    Returns ``(code, message)``; ``code == -2`` means success, anything else
    makes Yate answer ``Error in:`` (ref §1.4.3):

    * id (unescaped, may be empty) and time fields need their ``:``;
    * time goes through ``operator>>(unsigned&)`` (``strtoul`` base 0) and
      must be consumed entirely: digits, ``0x`` hex, octal with a leading 0,
      leading whitespace and ``+`` are accepted, ``-1`` is refused;
    * the ``:`` after the name is mandatory; params as in :func:`common_decode`.
    """
    prefix = b"%%>message:"
    if not line.startswith(prefix):
        return -1, None
    sep = line.find(b":", len(prefix))
    if sep < 0:
        if diag is not None:
            diag.append(("no-id-colon", "no ':' after the id"))
        return len(prefix), None
    sep2 = line.find(b":", sep + 1)
    if sep2 < 0:
        if diag is not None:
            diag.append(("no-time-colon", "no ':' after the time"))
        return sep, None
    mid, err = msg_unescape(line[len(prefix) : sep])
    if err >= 0:
        if diag is not None:
            diag.append(("id-escape", f"bad escape in the id at offset {len(prefix) + err}"))
        return err + len(prefix), None
    t = line[sep + 1 : sep2]
    tm = 0
    if t:
        val, end, erange = c_strtoul(t, 0)
        if not erange and val > UINT_MAX:
            erange = True
        if not erange and end > 0:
            tm = val
            t = t[end:]
    if t:
        if diag is not None:
            diag.append(("time", f"time field {line[sep + 1 : sep2]!r} is not an unsigned number"))
        return sep, None
    msg = WireMessage()
    code = common_decode(line, sep2 + 1, msg, diag)
    if code != -2:
        return code, None
    return -2, ScriptMessage(mid, tm, msg)


def parse_script_message(line: bytes) -> ScriptMessage:
    """Like :func:`decode_script_message` but raises :class:`YateDecodeError` on failure."""
    diag: list[Diag] = []
    code, sm = decode_script_message(line, diag)
    if code != -2 or sm is None:
        why = "; ".join(d[1] for d in diag if d[0] != "bare-key") or "not a %%>message line"
        raise YateDecodeError(why, max(code, 0), b"")
    return sm


def encode_params(params: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``:name=value`` for every param; names escaped with ``=`` as extra (ref §1.3)."""
    return b"".join(b":" + yate_escape(k, b"=") + b"=" + yate_escape(v) for k, v in params)


def encode_message_line(holder_id: bytes, time: int, msg: WireMessage) -> bytes:
    """``Message::encode(id)``: the ``%%>message`` line Yate sends (ref §1.4.1)."""
    return (
        b"%%>message:"
        + yate_escape(holder_id)
        + b":"
        + str(time & UINT_MAX).encode()
        + b":"
        + yate_escape(msg.name)
        + b":"
        + yate_escape(msg.retval)
        + encode_params(msg.params)
    )


def encode_answer_line(msg_id: bytes, handled: bool, msg: WireMessage) -> bytes:
    """``Message::encode(received, id)``: answers and watch notifications (ref §1.4.3, §1.4.6).

    A watch notification uses an empty id.  With no params the line ends with
    the retval (no trailing ``:``, ref §6).
    """
    return (
        b"%%<message:"
        + yate_escape(msg_id)
        + b":"
        + yate_bool_text(handled)
        + b":"
        + yate_escape(msg.name)
        + b":"
        + yate_escape(msg.retval)
        + encode_params(msg.params)
    )


# --------------------------------------------------------------------------
# Other keywords
# --------------------------------------------------------------------------


@dataclass
class InstallRequest:
    """How Yate reads ``%%>install:<rest>`` (ref §1.4.4, §5 Surprise 27)."""

    priority: int
    name: bytes
    filter_name: Optional[bytes]  # None when no filter is set
    filter_value: Optional[bytes]
    priority_field: bytes  # text before the first ':' of <rest> ('' if none)
    priority_parsed: bool  # whether operator>>(int&) consumed a number
    filter_errors: list[str] = field(default_factory=list)


_INSTALL_RE = re.compile(rb"^([^:]*):([^:]*):?(.*)", re.S)


def parse_install(rest: bytes) -> InstallRequest:
    """Parse what follows ``%%>install:`` exactly like ext.cpp:1477-1511.

    ``id >> prio >> ":"`` -- strtol base 0 (``010`` is 8, ``0x10`` is 16),
    kept at 100 if no number; then skip up to and including the *first*
    ``:`` if there is one; then ``^([^:]*):([^:]*):?(.*)`` gives name,
    filter name and filter value (only those two are unescaped, leniently).
    Hence ``sip.w:fname:fval`` installs ``fname`` filtered on ``fval`` = ''.
    """
    prio = 100
    s = rest
    val, end = yate_strtoi(s)
    parsed = end > 0
    if parsed:
        prio = val
        s = s[end:]
    k = s.find(b":")
    if k >= 0:
        s = s[k + 1 :]
    fname: Optional[bytes] = None
    fvalue: Optional[bytes] = None
    errors: list[str] = []
    m = _INSTALL_RE.match(s)
    if m:
        fn, e1 = msg_unescape(m.group(2))
        fv, e2 = msg_unescape(m.group(3))
        if e1 >= 0:
            errors.append(f"bad escape in the filter name {m.group(2)!r}")
        if e2 >= 0:
            errors.append(f"bad escape in the filter value {m.group(3)!r}")
        s = m.group(1)
        if fn:
            fname, fvalue = fn, fv
    first = rest.split(b":", 1)[0] if b":" in rest else b""
    return InstallRequest(prio, s, fname, fvalue, first, parsed, errors)


def parse_setlocal(rest: bytes) -> Optional[tuple[bytes, bytes]]:
    """``%%>setlocal:<name>:<value>`` → ``(name, trimmed value)`` or None (→ ``Error in:``).

    The name is everything before the first ``:`` and must be non-empty; the
    value is trimmed of spaces/TABs and *not* unescaped (ref §1.4.7).
    """
    col = rest.find(b":")
    if col <= 0:
        return None
    return rest[:col], trim_blanks(rest[col + 1 :])


def parse_debug(rest: bytes) -> Optional[tuple[int, bytes, int]]:
    """``%%>debug:<level>:<escaped text>`` → ``(level, text, unescape_err)`` or None.

    Level: int clamped to 1..10, non-numeric means 10 (ref §1.4.8).  The text
    is unescaped leniently (partial text on error; ``unescape_err`` >= 0).
    Without the second ``:`` the line gets ``Error in:`` (None).
    """
    col = rest.find(b":")
    if col < 0:
        return None
    level = yate_to_integer(trim_blanks(rest[:col]), 10, 1, 10)
    text, err = msg_unescape(rest[col + 1 :])
    return level, text, err


def script_line_keyword(line: bytes, *, role_known: bool = True) -> str:
    """Which branch of ``processLine`` a line takes (ref §1.4).

    Returns one of ``connect``, ``no-connect`` (role unknown and not a
    connect line: the connection is closed), ``answer``, ``install``,
    ``uninstall``, ``watch``, ``unwatch``, ``output``, ``debug``,
    ``setlocal``, ``quit``, ``message`` or ``unknown`` (→ ``Error in:``).
    """
    if not role_known:
        return "connect" if line.startswith(b"%%>connect:") else "no-connect"
    for kind, prefix in KEYWORD_ORDER:
        if line.startswith(prefix):
            return kind
    if line == b"%%>quit":
        return "quit"
    if line.startswith(b"%%>message:"):
        return "message"
    return "unknown"


def split_script_stream(data: bytes) -> tuple[list[bytes], bytes]:
    """Split bytes written by a script into lines the way Yate's reader does (ref §1.2).

    A line ends at ``\\n`` or at a NUL byte (whichever comes first); one
    trailing ``\\r`` is stripped; empty lines are dropped.  Returns
    ``(lines, leftover)`` where leftover is an unterminated tail.  The line
    length limit is not applied here (see :func:`check_script_line`).
    """
    lines: list[bytes] = []
    buf = data
    while True:
        nl = buf.find(b"\n")
        nul = buf.find(b"\x00")
        if nul >= 0 and (nl < 0 or nul < nl):
            end = nul
        elif nl >= 0:
            end = nl
        else:
            return lines, buf
        line = buf[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            lines.append(line)
        buf = buf[end + 1 :]


# --------------------------------------------------------------------------
# check_script_line
# --------------------------------------------------------------------------

_CANON_UINT = re.compile(rb"^(0|[1-9][0-9]*|0[xX][0-9a-fA-F]+)$")
_CANON_INT = re.compile(rb"^-?(0|[1-9][0-9]*|0[xX][0-9a-fA-F]+)$")


def _control_bytes(line: bytes) -> list[str]:
    out = []
    for i, c in enumerate(line):
        if c < 0x20:
            what = "NUL (Yate ends the line there)" if c == 0 else f"0x{c:02x}"
            out.append(f"raw control byte {what} at offset {i}")
    return out


def _diag_text(diag: list[Diag], consequence: str) -> list[str]:
    return [f"{d[1]}: {consequence}" for d in diag if d[0] != "bare-key"]


def _check_answer(line: bytes, problems: list[str]) -> None:
    prefix = b"%%<message:"
    rest = line[len(prefix) :]
    c1 = rest.find(b":")
    if c1 < 0:
        problems.append("answer has no ':' after the id: never matched (unmatched, no Error in)")
        return
    mid = rest[:c1]
    if not mid:
        problems.append("answer with an empty id never matches a waiting message (unmatched)")
    after_id = rest[c1 + 1 :]
    c2 = after_id.find(b":")
    processed = after_id if c2 < 0 else after_id[:c2]
    value, tail = bool_prefix(processed) if processed else (None, b"")
    if processed not in BOOL_TOKENS:
        if not processed:
            problems.append(
                "empty processed field (Yate reads it as the previous flag, i.e. false): "
                "send exactly true or false"
            )
        elif value is None or tail:
            problems.append(
                f"processed field {processed!r} is not one of true/yes/on/enable/t/false/no/off/disable/f: "
                "answer unmatched"
                + (" (but the flag parsed before the garbage is kept for a timeout)" if value is not None else "")
            )
        else:
            problems.append(f"processed field {processed!r} is accepted by Yate but is not exactly a boolean token")
    if c2 < 0:
        problems.append("no ':' after the processed field: answer unmatched")
        return
    after = after_id[c2 + 1 :]
    if not after:
        problems.append(
            "answer has only id:processed: -- Yate keeps name and retval, but always send id:bool:name:retval"
        )
        return
    if b":" not in after:
        problems.append("no ':' after the name (answer needs id:bool:name:retval): answer unmatched")
        return
    diag: list[Diag] = []
    common_decode(line, len(prefix) + c1 + 1 + c2 + 1, WireMessage(), diag)
    problems.extend(
        _diag_text(diag, "answer unmatched; fields before it are already applied (partial application)")
    )


def _check_message(line: bytes, problems: list[str]) -> None:
    diag: list[Diag] = []
    code, sm = decode_script_message(line, diag)
    if code != -2:
        problems.extend(_diag_text(diag, "Yate answers Error in:") or ["malformed %%>message: Yate answers Error in:"])
        return
    assert sm is not None
    # Lint on top of what Yate accepts.
    prefix = b"%%>message:"
    sep = line.find(b":", len(prefix))
    sep2 = line.find(b":", sep + 1)
    t = line[sep + 1 : sep2]
    if t and not _CANON_UINT.match(t):
        problems.append(
            f"time field {t!r} is accepted by strtoul but is not plain digits/0x-hex "
            f"(Yate reads it as {sm.time})"
        )
    if not sm.msg.name:
        problems.append("%%>message with an empty name (Yate dispatches a nameless message)")
    for kind, detail in diag:
        if kind == "bare-key":
            problems.append(f"{detail}: a no-op in a new %%>message")


def _check_install(line: bytes, problems: list[str]) -> None:
    rest = line[len(b"%%>install:") :]
    req = parse_install(rest)
    problems.extend(req.filter_errors)
    if not req.name:
        problems.append("install with an empty message name: Yate replies false")
    if b":" in rest:
        first = req.priority_field
        if first and not req.priority_parsed:
            problems.append(
                f"priority field {first!r} is not a number: Yate skips it and installs {req.name!r} "
                "(fields shift, ref Surprise 27)"
            )
        elif first and re.match(rb"^[ \t]*[-+]?0[0-9]", first):
            problems.append(f"priority field {first!r} has a leading 0: octal, read as {req.priority}")
        elif first and req.priority_parsed and not _CANON_INT.match(first):
            problems.append(f"priority field {first!r} is read by strtol base 0 as {req.priority}")
    if req.priority < 0:
        problems.append(f"negative priority {req.priority} becomes a huge unsigned priority in Yate")
    if b"%" in req.name:
        problems.append(f"install name {req.name!r} contains '%': Yate does not unescape it")


def _check_raw_name(kind: str, name: bytes, problems: list[str]) -> None:
    if b"%" in name:
        problems.append(f"{kind} name {name!r} contains '%': Yate does not unescape it")


def _check_setlocal(line: bytes, problems: list[str]) -> None:
    rest = line[len(b"%%>setlocal:") :]
    parsed = parse_setlocal(rest)
    if parsed is None:
        if b":" not in rest:
            problems.append("setlocal without ':' after the name: Yate answers Error in:")
        else:
            problems.append("setlocal with an empty name: Yate answers Error in:")
        return
    name, value = parsed
    if name != trim_blanks(name):
        problems.append(f"setlocal name {name!r} has blanks: Yate does not trim names (unknown name, ok=false)")
    if name in SETLOCAL_BOOLEANS:
        if value and value not in BOOL_TOKENS:
            problems.append(
                f"setlocal {name.decode(errors='replace')} value {value!r} is not a Yate boolean: "
                "the setting is silently left unchanged (reply still says ok=true)"
            )
    elif name in SETLOCAL_INTEGERS:
        lo, hi = SETLOCAL_INTEGERS[name]
        if value:
            v, end = yate_strtoi(value)
            if end == 0 or end != len(value):
                problems.append(
                    f"setlocal {name.decode(errors='replace')} value {value!r} is not an integer: silently ignored"
                )
            elif not lo <= v <= hi:
                clamped = lo if v < lo else hi
                problems.append(
                    f"setlocal {name.decode(errors='replace')} value {v} is clamped by Yate to {clamped}"
                )
    elif name in SETLOCAL_CHANNEL_ONLY:
        problems.append(f"setlocal {name.decode(errors='replace')} is for channel scripts only: ok=false")
    elif name in SETLOCAL_STRINGS:
        pass
    elif name == b"runid" or name.startswith(SETLOCAL_READONLY_PREFIXES):
        if value:
            problems.append(
                f"setlocal {name.decode(errors='replace')} is read-only: a non-empty value gives ok=false"
            )
    else:
        problems.append(f"unknown setlocal name {name!r}: Yate replies ok=false")


def check_script_line(line: bytes, *, bufsize: int = DEF_BUFSIZE, role_known: bool = True) -> list[str]:
    """Every problem Yate would have with ONE line written by the script.

    *line* is the line without its ``\\n`` (a trailing ``\\r`` may be
    present: it counts for the length limit and is then stripped, ref §1.2 /
    §6).  Returns human-readable problem strings; an empty list means Yate
    would accept the line cleanly.

    Checked (ref §1.2-§1.4, §5, §6):

    * length > ``bufsize-2`` bytes → Yate tears the script down;
    * raw control bytes anywhere (NUL ends the line early);
    * keyword dispatch in Yate's order; unrecognised lines get ``Error in:``;
      ``%%>connect:`` only while the role is unknown;
    * ``%%<message``: all four fields ``id:bool:name:retval``, exact boolean,
      escapes of name/retval/param chunks, chunk starting with ``=``;
    * ``%%>message``: ``:`` after id/time/name, time digits / 0x hex / empty,
      escapes, ``=``-chunks, bare keys (lint), empty name (lint);
    * ``%%>install``: priority field shift, octal priority, empty name,
      filter escapes; raw install/uninstall/watch/unwatch names must not
      contain ``%`` (they are never unescaped);
    * ``%%>debug``: the second ``:``, numeric level, text escapes;
    * ``%%>setlocal``: non-empty name and ``:``; booleans
      (restart/timebomb/reenter/setdata/settime/selfwatch) must be true/false
      tokens (``1``/``0`` are silently ignored by Yate); integers must parse;
      unknown / channel-only / read-only names.
    """
    problems: list[str] = []
    limit = bufsize - 2
    if len(line) > limit:
        problems.append(
            f"line is {len(line)} bytes, over bufsize-2 = {limit}: Yate closes the pipe and kills the script"
        )
    body = line[:-1] if line.endswith(b"\r") else line
    problems.extend(_control_bytes(body))
    if b"\x00" in body:
        body = body[: body.index(b"\x00")]
    if not body:
        return problems
    kind = script_line_keyword(body, role_known=role_known)
    if kind == "no-connect":
        problems.append("role unknown: only %%>connect:<global|channel> is accepted, Yate closes the connection")
    elif kind == "connect":
        role = body[len(b"%%>connect:") :].split(b":", 1)[0]
        if role not in (b"global", b"channel"):
            problems.append(f"connect role {role!r} is not global/channel: Yate closes the connection")
    elif kind == "answer":
        _check_answer(body, problems)
    elif kind == "install":
        _check_install(body, problems)
    elif kind in ("uninstall", "watch", "unwatch"):
        name = body[len(dict(KEYWORD_ORDER)[kind]) :]
        if kind == "uninstall" and not name:
            problems.append("uninstall with an empty name never succeeds")
        _check_raw_name(kind, name, problems)
    elif kind == "output":
        pass
    elif kind == "debug":
        rest = body[len(b"%%>debug:") :]
        parsed = parse_debug(rest)
        if parsed is None:
            problems.append("%%>debug without the second ':': Yate answers Error in:")
        else:
            lvl = trim_blanks(rest.split(b":", 1)[0])
            v, end = yate_strtoi(lvl) if lvl else (0, 0)
            if end == 0 or end != len(lvl) or not 1 <= v <= 10:
                problems.append(f"debug level {lvl!r} is not an integer 1..10 (Yate uses {parsed[0]})")
            if parsed[2] >= 0:
                problems.append("bad escape in the debug text: Yate truncates it there")
    elif kind == "setlocal":
        _check_setlocal(body, problems)
    elif kind == "quit":
        pass
    elif kind == "message":
        _check_message(body, problems)
    else:
        if body.startswith(b"%%>quit"):
            problems.append("quit must be exactly '%%>quit': Yate answers Error in:")
        elif body.startswith(b"%%>connect"):
            problems.append("%%>connect is only valid on a socket without a role: Yate answers Error in:")
        else:
            problems.append("unrecognised line: Yate answers Error in:")
    return problems
