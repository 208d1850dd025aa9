"""Yate's extmodule line protocol: bytes <-> typed lines, with no I/O.

Every rule here comes from ``yate-internals.md`` §0, §1.3-1.4, "Surprises" and §6:

* Lines are ``\\n``-terminated; a trailing ``\\r`` is stripped; empty lines are ignored.
* Text is handled as ``str`` decoded from UTF-8 with ``surrogateescape``: bytes 0x80-0xFF pass
  through untouched and any byte sequence round-trips.
* Escaping (``String::msgEscape``): ``%`` -> ``%%``, a byte below 0x20 or ``:`` -> ``%`` +
  chr(c + 0x40). Yate additionally writes ``=`` in *param names* as ``%}`` but refuses ``%}``
  from the script, so we accept it on input and never write it.
* Unescaping (``String::msgUnescape``) accepts only ``%%``, ``%z`` and ``%A``..``%_``; anything
  else, a trailing ``%`` or a raw control byte is an error.
* Some fields are raw on the Yate side (install/uninstall/watch/unwatch names, setlocal name
  and value, output text): they cannot carry ``:`` (a separator) or control bytes, and the API
  refuses such values instead of writing a line Yate would misread.
* A line from the script must fit in ``bufsize - 2`` bytes or Yate kills the script.

Decoding functions raise :class:`RemoteProtocolError`; encoding functions raise
:class:`LocalProtocolError` (or :class:`LineTooLong`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from .errors import LineTooLong, LocalProtocolError, RemoteProtocolError
from . import message as _message
from .message import Message

ENCODING = "utf-8"
ERRORS = "surrogateescape"

DEFAULT_BUFSIZE = 8192  # Yate's DEF_INCOMING_LINE
MAX_BUFSIZE = 65536
MIN_BUFSIZE = 2048


def max_line_for(bufsize: int) -> int:
    """Longest line (without its ``\\n``) Yate accepts with that buffer (§1.2, §6)."""
    return bufsize - 2


#: setlocal names whose value Yate parses as a boolean (reference §1.4.7).
BOOL_SETTINGS = frozenset(("restart", "timebomb", "reenter", "setdata", "settime", "selfwatch",
                           "disconnected"))

TRUE_WORDS = frozenset(("true", "yes", "on", "enable", "t"))
FALSE_WORDS = frozenset(("false", "no", "off", "disable", "f"))

# --- escaping ---------------------------------------------------------------------------------

_SPECIAL = re.compile("[\x00-\x1f:%]")
_ESC_OUT = {chr(c): "%" + chr(c + 0x40) for c in range(0x20)}
_ESC_OUT[":"] = "%z"
_ESC_OUT["%"] = "%%"
_UNESC = {chr(c + 0x40): chr(c) for c in range(1, 0x20)}
_UNESC["z"] = ":"
_UNESC["%"] = "%"
_UNESC_NAME = dict(_UNESC)
_UNESC_NAME["}"] = "="
_ESC_IN = re.compile("%(.?)", re.S)
_CTRL = re.compile("[\x00-\x1f]")


def _esc_repl(m: re.Match[str], _t: dict[str, str] = _ESC_OUT) -> str:
    return _t[m.group()]


def escape(text: str) -> str:
    """Escape a field exactly as ``String::msgEscape`` does (no extra character).

    NUL cannot be sent: Yate would write it as ``%@`` but its decoder refuses ``%@``
    (only ``%A``..``%_`` are accepted), so a NUL raises :class:`LocalProtocolError`.
    """
    if text.isprintable():  # no control character: '%' and ':' are all there is to escape
        if "%" in text:
            text = text.replace("%", "%%")
        if ":" in text:
            text = text.replace(":", "%z")
        return text
    if _SPECIAL.search(text) is None:
        return text
    if "\x00" in text:
        raise LocalProtocolError("a NUL byte cannot be sent to Yate (it has no escape for it)")
    return _SPECIAL.sub(_esc_repl, text)


_CTRL_BYTES = bytes(range(0x20))
_CTRL_NONNUL_B = re.compile(b"[\x01-\x1f]")
_ESC_OUT_B = {bytes([c]): b"%" + bytes([c + 0x40]) for c in range(1, 0x20)}


def _escape_joined(text: str, fields: int) -> bytes:
    """Encode NUL-joined fields and escape them with a few byte-level passes; NUL -> ``:``.

    ``fields`` is the number of fields joined; a NUL inside a field is refused. Working on
    bytes lets ``translate`` tell in one C pass whether any control byte besides the NUL
    separators is left (the common case: none).
    """
    try:
        data = text.encode(ENCODING, ERRORS)
    except UnicodeEncodeError as e:
        raise LocalProtocolError(f"text cannot be encoded: {e}") from None
    if b"%" in data:
        data = data.replace(b"%", b"%%")
    if b":" in data:
        data = data.replace(b":", b"%z")
    if b"\n" in data:
        data = data.replace(b"\n", b"%J")
    if b"\r" in data:
        data = data.replace(b"\r", b"%M")
    # every control byte left, the NUL separators included: exactly the separators, usually
    if len(data) - len(data.translate(None, _CTRL_BYTES)) != fields - 1:
        if data.count(b"\x00") != fields - 1:
            raise LocalProtocolError("a NUL byte cannot be sent to Yate (it has no escape for it)")
        data = _CTRL_NONNUL_B.sub(lambda m: _ESC_OUT_B[m.group()], data)
    return data.replace(b"\x00", b":")


def _unesc_repl(m: re.Match[str], _t: dict[str, str] = _UNESC) -> str:
    return _t[m.group(1)]


def _unesc_name_repl(m: re.Match[str], _t: dict[str, str] = _UNESC_NAME) -> str:
    return _t[m.group(1)]


def unescape(text: str, *, name: bool = False) -> str:
    """Undo :func:`escape`, strictly; ``name=True`` also accepts Yate's ``%}`` for ``=``.

    Raises :class:`RemoteProtocolError` on a bad escape. The caller is expected to have
    rejected raw control bytes for the whole line already.
    """
    if "%" not in text:
        return text
    if "%%" not in text:  # the usual escapes (':' and a body's CR LF) by plain replaces
        t = text.replace("%z", ":").replace("%M", "\r").replace("%J", "\n")
        if "%" not in t:
            return t
    try:
        return _ESC_IN.sub(_unesc_name_repl if name else _unesc_repl, text)
    except KeyError:
        m = re.search("%(?![A-_z%]|$)|%$" if not name else "%(?![A-_z%}]|$)|%$", text)
        pos = m.start() if m else -1
        raise RemoteProtocolError(f"bad escape at offset {pos} in {text[:60]!r}") from None


def escaped_size(text: str) -> int:
    """Bytes ``text`` takes on the wire once escaped (for size checks before building a line)."""
    n = len(text.encode(ENCODING, ERRORS)) if not text.isascii() else len(text)
    if _SPECIAL.search(text) is None:
        return n
    return n + len(_SPECIAL.findall(text))


def check_raw(value: str, what: str) -> str:
    """Validate a field Yate takes raw: no ``:`` and no control byte (they cannot be escaped)."""
    if ":" in value or _CTRL.search(value):
        raise LocalProtocolError(f"{what} {value!r} cannot contain ':' or control characters "
                                 "(Yate reads this field raw)")
    return value


def check_param_name(name: str) -> None:
    if not name or "=" in name:
        raise LocalProtocolError(f"param name {name!r} is empty or contains '=' "
                                 "(Yate would split it wrongly)")


def parse_bool(word: str) -> bool | None:
    """Yate's ``String::toBoolean`` without a default: ``None`` when it is not a boolean."""
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def _bool(value: bool) -> str:
    return "true" if value else "false"


# --- typed lines ------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built once per line on the hot path
class MessageReceived:
    """``%%>message`` from Yate: it waits for our answer (or, script->Yate, our dispatch)."""

    message: Message


@dataclass(slots=True)
class AnswerReceived:
    """``%%<message`` with a non-empty id: Yate's answer to a message we dispatched."""

    id: str
    handled: bool
    message: Message


@dataclass(frozen=True, slots=True)
class WatchReceived:
    """``%%<message`` with an empty id: a watch (post-dispatch) notification."""

    handled: bool
    message: Message


@dataclass(frozen=True, slots=True)
class InstallReplied:
    priority: int
    name: str
    success: bool


@dataclass(frozen=True, slots=True)
class UninstallReplied:
    priority: int
    name: str
    success: bool


@dataclass(frozen=True, slots=True)
class WatchReplied:
    name: str
    success: bool


@dataclass(frozen=True, slots=True)
class UnwatchReplied:
    name: str
    success: bool


@dataclass(frozen=True, slots=True)
class SetLocalReplied:
    """``%%<setlocal:<name>:<value>:<ok>``; the value is raw and may contain ``:``."""

    name: str
    value: str
    success: bool


@dataclass(frozen=True, slots=True)
class QuitReplied:
    pass


@dataclass(frozen=True, slots=True)
class ErrorInReceived:
    """``Error in: <line>``: Yate could not parse a line of ours. Never answered."""

    line: str


# Script -> Yate line kinds (what we write; parsed back by the tools and tests).


@dataclass(frozen=True, slots=True)
class Install:
    name: str
    priority: int | None = None
    filter_name: str | None = None
    filter_value: str | None = None


@dataclass(frozen=True, slots=True)
class Uninstall:
    name: str


@dataclass(frozen=True, slots=True)
class Watch:
    name: str


@dataclass(frozen=True, slots=True)
class Unwatch:
    name: str


@dataclass(frozen=True, slots=True)
class SetLocal:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Output:
    text: str


@dataclass(frozen=True, slots=True)
class Debug:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Connect:
    role: str
    id: str | None = None
    type: str | None = None


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Answer:
    """``%%<message`` written by the script: the answer to a message Yate asked us to handle.

    ``changes`` maps names to new values, ``None`` meaning "delete" (a bare key).
    """

    id: str
    handled: bool
    name: str
    retval: str
    changes: tuple[tuple[str, str | None], ...] = ()


FromYate = Union[MessageReceived, AnswerReceived, WatchReceived, InstallReplied,
                 UninstallReplied, WatchReplied, UnwatchReplied, SetLocalReplied,
                 QuitReplied, ErrorInReceived]
FromScript = Union[MessageReceived, Answer, Install, Uninstall, Watch, Unwatch, SetLocal,
                   Output, Debug, Connect, Quit]


# --- decoding ---------------------------------------------------------------------------------


def _decode(raw: bytes) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode(ENCODING, ERRORS)


def _raw_pairs(chunks: list[str], start: int) -> list[tuple[str, str]]:
    """Decode ``k=v`` chunks one by one, splitting each on its raw ``=`` first (for lines
    whose param names carry Yate's ``%}``)."""
    pairs: list[tuple[str, str]] = []
    for i in range(start, len(chunks)):
        chunk = chunks[i]
        if not chunk:
            continue  # Yate skips empty chunks ("::")
        k, sep, v = chunk.partition("=")
        if not k:
            raise RemoteProtocolError(f"param chunk {chunk[:40]!r} begins with '='")
        if not sep:
            continue  # a bare key deletes; on a message we just built that is a no-op
        pairs.append((unescape(k, name=True) if "%" in k else k,
                      unescape(v) if "%" in v else v))
    return pairs


def _first_values(params: dict[str, str], pairs: list[tuple[str, str]]
                  ) -> list[tuple[str, str]] | None:
    """``params`` is ``dict(pairs)``: each name where it came first, with its last value.

    With duplicates (an authenticated sip.message has ``username`` twice), give every name its
    first value, as Yate's getParam does -- the reversed dict has them; ``update()`` puts them
    in place, all in C -- and return the pairs so the later duplicates can be listed on demand.
    """
    if len(params) == len(pairs):
        return None
    params.update(dict(reversed(pairs)))
    return pairs


_C_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]{0,18})")


def c_number(text: str) -> int | None:
    """Parse like C's ``strtol(text, NULL, 0)`` on the whole field: ``0x10`` is 16, ``010``
    is 8; ``None`` for anything else (including non-ASCII digits)."""
    m = _C_NUMBER.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        v = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        v = int(digits, 8)
    else:
        v = int(digits)
    return -v if m.group(1) == "-" else v


def _int(text: str, what: str) -> int:
    if not text:
        return 0
    v = c_number(text)
    if v is None:
        raise RemoteProtocolError(f"{what} {text[:40]!r} is not a number")
    return v


_SENT = "\uffff"  # stands for an escaped '%' while the rest of a line is unescaped
_CTRL_ESC = re.compile("%(.?)", re.S)


def _fields(line: str) -> list[str]:
    """Split a message line on raw ``:`` and unescape every field, in a few C-level passes.

    This is the hot path: instead of one regex call per field, the separators become NUL
    (a raw control byte cannot be in the line), then ``%%`` and ``%z`` are replaced over the
    whole line, and only the rare control escapes go through a regex. Lines with ``%}`` (an
    ``=`` in a param name) or U+FFFF take the field-by-field path.
    """
    if "%" not in line:
        return line.split(":")
    if _SENT in line:
        return [unescape(f) for f in line.split(":")]
    t = line.replace(":", "\x00").replace("%%", _SENT).replace("%z", ":")
    if "%" in t:
        # CR and LF (bodies) are the common control escapes: no regex callback for them
        t = t.replace("%M", "\r").replace("%J", "\n")
    if "%" in t:
        try:
            t = _CTRL_ESC.sub(_unesc_repl, t)
        except KeyError:
            return [unescape(f) for f in line.split(":")]  # raises with the exact place
    if _SENT in t:
        t = t.replace(_SENT, "%")
    return t.split("\x00")


_BAD_ESC = re.compile("%(?![A-_z}])")  # once every "%%" is taken out
#: '%' followed by anything but ``A``..``_`` or ``z``: "%%", "%}" or a bad escape. A line
#: without one (past its keyword's "%%") has only valid escapes and no escaped '='.
_ESC_SUSPECT = re.compile("%(?![A-_z])")


def _check_params(line: str, start: int) -> None:
    """Yate's decoder rules for the param part, in C-level passes: every escape valid (``%}``
    is accepted for names), no chunk beginning with ``=``."""
    if "%" in line:
        t = line.replace("%%", "\x00\x00")  # same length: positions stay comparable
        if "%" in t:
            if _BAD_ESC.search(t) is not None:
                raise RemoteProtocolError("bad escape", line)
            i = t.find("%}")
            while i >= 0:  # '=' escaped: valid in a param name only (Yate's own encoding)
                chunk = t.rfind(":", 0, i)
                if chunk < start or t.find("=", chunk, i) >= 0:
                    raise RemoteProtocolError("bad escape '%}' outside a param name", line)
                i = t.find("%}", i + 2)
    if line.find(":=", start) >= 0:
        raise RemoteProtocolError("a param chunk begins with '='", line)


def decode_params(line: str, start: int) -> tuple[dict[str, str], list[tuple[str, str]] | None]:
    """Every param of a message line (``start``: the ``:`` before the first one).

    Returns the first value of each name and, when names repeat, every pair in order.
    Empty chunks are skipped and bare keys (a delete: a no-op on a fresh message) dropped,
    as Yate does.
    """
    rest = line[start + 1:]
    if not rest:
        return {}, None
    if "%}" in rest:
        # an '=' inside a param name: split each chunk on its raw '=' before unescaping
        pairs = _raw_pairs(rest.split(":"), 0)
        params = dict(pairs)
        return params, _first_values(params, pairs)
    chunks = _fields(rest)
    kv = [c.partition("=") for c in chunks]
    params = {k: v for k, sep, v in kv if sep}
    if "" in params:
        raise RemoteProtocolError("a param chunk begins with '='", line)
    if len(params) == len(chunks):
        return params, None
    # duplicates, bare keys or empty chunks
    return params, _first_values(params, [(k, v) for k, sep, v in kv if sep])


_message.decode_params = decode_params
_make = _message._make  # a Message with every attribute set, without __init__
_Message = _message.Message
_message.unescape = unescape
_message.escape = escape


def _split_last(rest: str, line: str) -> tuple[str, bool]:
    head, sep, ok = rest.rpartition(":")
    flag = parse_bool(ok)
    if not sep or flag is None:
        raise RemoteProtocolError("reply without a final boolean", line)
    return head, flag


def parse_yate_line(raw: bytes) -> FromYate | None:
    """Decode one line Yate wrote to the script (without its ``\\n``).

    Returns ``None`` for an empty line (Yate ignores those too). Raises
    :class:`RemoteProtocolError` for anything Yate's own rules would not produce or accept.
    """
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw:
        return None
    line = raw.decode(ENCODING, ERRORS)
    kw = line[:11]
    if kw == "%%<message:" or kw == "%%>message:":  # nearly every line: first, and lean
        # one C pass (translate deletes control bytes) instead of a per-character check
        if len(raw.translate(None, _CTRL_BYTES)) != len(raw):
            raise RemoteProtocolError("raw control byte in line", line)
        parts = line.split(":", 5)
        if len(parts) < 5:
            raise RemoteProtocolError("message line has fewer than 4 fields", line)
        mid, second, name, retval = parts[1], parts[2], parts[3], parts[4]
        # the ':' before the first param (or the line's end when there is none)
        pstart = len(line) - len(parts[5]) - 1 if len(parts) == 6 else len(line)
        # Two C-level scans decide the usual line is valid: no '%' outside the escapes every
        # line has (``%z``, ``%J``, ...), and no chunk that begins with '='. Anything else
        # ("%%", "%}", a bad escape) is checked exactly by _check_params.
        if _ESC_SUSPECT.search(line, 11) is not None or line.find(":=", pstart) >= 0:
            _check_params(line, pstart)
        if "%" in mid:
            mid = unescape(mid)
        if "%" in name:
            name = unescape(name)
        if "%" in retval:
            retval = unescape(retval)
        if kw[2] == "<":
            # (what Yate writes: "true" or "false"; any other word of toBoolean's, the long way)
            handled = True if second == "true" else False if second == "false" else (
                parse_bool(second))
            if handled is None:
                raise RemoteProtocolError(f"bad boolean {second!r}", line)
            # an answer echoes our request and we read a param or two: searched, not indexed
            msg = _make(_Message, name, retval, mid, 0, {}, None, line, pstart, False)
            if mid:
                return AnswerReceived(mid, handled, msg)
            return WatchReceived(handled, msg)
        if "%" in second:
            second = unescape(second)
        t_val = (int(second) if (second.isascii() and second.isdigit() and len(second) < 20)
                 else _int(second, "time"))
        return MessageReceived(_make(_Message, name, retval, mid, t_val, {}, None, line,
                                     pstart))
    if line.startswith("Error in: "):
        return ErrorInReceived(line[10:])
    if len(raw.translate(None, _CTRL_BYTES)) != len(raw):
        raise RemoteProtocolError("raw control byte in line", line)
    try:
        if line.startswith("%%<install:") or line.startswith("%%<uninstall:"):
            body = line.split(":", 1)[1]
            head, ok = _split_last(body, line)
            prio, sep, name = head.partition(":")
            if not sep:
                raise RemoteProtocolError("install reply without a name", line)
            cls = InstallReplied if line[3] == "i" else UninstallReplied
            return cls(_int(prio, "priority"), name, ok)
        if line.startswith("%%<watch:") or line.startswith("%%<unwatch:"):
            head, ok = _split_last(line.split(":", 1)[1], line)
            return (WatchReplied if line[3] == "w" else UnwatchReplied)(head, ok)
        if line.startswith("%%<setlocal:"):
            head, ok = _split_last(line[12:], line)
            name, sep, value = head.partition(":")
            if not sep:
                raise RemoteProtocolError("setlocal reply without a value field", line)
            return SetLocalReplied(name, value, ok)
    except RemoteProtocolError as e:
        if e.line is None:
            e.line = line
        raise
    if line == "%%<quit":
        return QuitReplied()
    raise RemoteProtocolError("unknown keyword", line)


def parse_script_line(raw: bytes) -> FromScript | None:
    """Decode one line a script writes to Yate, with Yate's field rules (for tools and tests).

    Raw fields come back as written; escaped ones are unescaped.
    """
    line = _decode(raw)
    if not line:
        return None
    if _CTRL.search(line):
        raise RemoteProtocolError("raw control byte in line", line)
    if line.startswith("%%<message:"):
        parts = line.split(":")
        if len(parts) == 4 and parts[3] == "":
            # "%%<message:<id>:<bool>:" -- Yate's special form: everything unchanged
            handled = parse_bool(parts[2])
            if handled is None:
                raise RemoteProtocolError(f"bad boolean {parts[2]!r}", line)
            return Answer(parts[1], handled, "", "", ())
        if len(parts) < 5:
            raise RemoteProtocolError("answer has fewer than 4 fields", line)
        handled = parse_bool(parts[2])
        if handled is None:
            raise RemoteProtocolError(f"bad boolean {parts[2]!r}", line)
        changes: list[tuple[str, str | None]] = []
        for chunk in parts[5:]:
            if not chunk:
                continue
            if chunk.startswith("="):
                raise RemoteProtocolError("param chunk begins with '='", line)
            text = unescape(chunk)
            k, sep, v = text.partition("=")
            changes.append((k, v if sep else None))
        return Answer(parts[1], handled, unescape(parts[3]), unescape(parts[4]), tuple(changes))
    if line.startswith("%%>install:"):
        rest = line[11:]
        prio_txt, sep, tail = rest.partition(":")
        if not sep:
            # "%%>install:name" -- no priority field at all
            return Install(prio_txt)
        try:
            prio = None if not prio_txt.strip() else c_number(prio_txt)
            if prio is None and prio_txt.strip():
                raise ValueError
        except ValueError:
            raise RemoteProtocolError(f"bad priority {prio_txt!r}", line) from None
        name, sep, f = tail.partition(":")
        fname = fvalue = None
        if sep:
            fname, sep2, fv = f.partition(":")
            fname = unescape(fname)
            fvalue = unescape(fv) if sep2 else None
        return Install(name, prio, fname, fvalue)
    for kw, cls in (("%%>uninstall:", Uninstall), ("%%>watch:", Watch), ("%%>unwatch:", Unwatch)):
        if line.startswith(kw):
            return cls(line[len(kw):])
    if line.startswith("%%>output:"):
        return Output(line[10:].strip(" \t"))
    if line.startswith("%%>debug:"):
        level, sep, text = line[9:].partition(":")
        if not sep:
            raise RemoteProtocolError("debug without a level field", line)
        try:
            lvl = int(level)
        except ValueError:
            lvl = 10
        return Debug(min(max(lvl, 1), 10), unescape(text))
    if line.startswith("%%>setlocal:"):
        name, sep, value = line[12:].partition(":")
        if not sep or not name:
            raise RemoteProtocolError("setlocal needs a name and a ':'", line)
        return SetLocal(name, value.strip(" \t"))
    if line == "%%>quit":
        return Quit()
    if line.startswith("%%>connect:"):
        f = line[11:].split(":")
        return Connect(f[0], f[1] if len(f) > 1 else None, f[2] if len(f) > 2 else None)
    if line.startswith("%%>message:"):
        parts = line.split(":")
        if len(parts) < 5:
            raise RemoteProtocolError("message needs ':' after its name", line)
        t = parts[2]
        t_num = c_number(t) if t else 0
        if t_num is None or t_num < 0:
            raise RemoteProtocolError(f"bad time {t[:40]!r}", line)
        params: dict[str, str] = {}
        for chunk in parts[5:]:
            if not chunk:
                continue
            if chunk.startswith("="):
                raise RemoteProtocolError("param chunk begins with '='", line)
            k, sep, v = unescape(chunk).partition("=")
            if not sep:
                params.pop(k, None)
                continue
            params[k] = v  # Yate's setParam: a repeated name updates the first one
        msg = Message.from_wire(unescape(parts[3]), unescape(parts[4]), params,
                                id=unescape(parts[1]), time=t_num)
        return MessageReceived(msg)
    raise RemoteProtocolError("unknown keyword", line)


# --- encoding (script -> Yate) ----------------------------------------------------------------


class Encoder:
    """Builds script->Yate lines and enforces the line limit for the current ``bufsize``.

    ``max_line`` follows what Yate confirmed (``%%<setlocal:bufsize:...:true``); until then it
    is the default 8190. Every method returns the line as bytes *with* its ``\\n`` or raises.
    """

    __slots__ = ("max_line",)

    def __init__(self, bufsize: int = DEFAULT_BUFSIZE) -> None:
        self.max_line = max_line_for(bufsize)

    def _finish(self, line: str, what: str = "line") -> bytes:
        try:
            data = line.encode(ENCODING, ERRORS)
        except UnicodeEncodeError as e:
            raise LocalProtocolError(f"text cannot be encoded: {e}") from None
        return self._finish_bytes(data, what)

    def _finish_bytes(self, data: bytes, what: str = "line") -> bytes:
        if len(data) > self.max_line:
            raise LineTooLong(len(data), self.max_line, what)
        return data + b"\n"

    def message(self, msg: Message, id: str, time: int = 0) -> bytes:
        """``%%>message``: dispatch ``msg`` (all its params) under ``id`` (empty: no answer)."""
        if time:
            if not 0 <= time <= 0xFFFFFFFF:
                raise LocalProtocolError(f"message time {time} is not a 32-bit unsigned number")
            stamp = str(int(time))
        else:
            stamp = "0"
        fwd = msg.forwarded
        wire = msg.unchanged_wire()
        if wire is not None:  # params already in wire form (from Yate, or built so)
            return self.message_wire(msg.name, wire + fwd, id, stamp, msg.retval)
        # Only the first value of each name: Yate keeps one param per name from a script's
        # message ("d=1:d=2" becomes d=2), and msg[k] is the first value on our side.
        params = msg.params
        if "" in params or "=" in "".join(params):
            for k in params:
                check_param_name(k)
        fields = [id, stamp, msg.name, msg.retval, *map("=".join, params.items())]
        if len(fields) == 4 and not fwd:
            fields.append("")  # the ':' after the name is mandatory (§1.4.3)
        body = _escape_joined("\x00".join(fields), len(fields))
        if fwd:  # already escaped (Message.wire_params): only encoded
            try:
                data = b"".join((b"%%>message:", body, fwd.encode(ENCODING, ERRORS), b"\n"))
            except UnicodeEncodeError as e:
                raise LocalProtocolError(f"text cannot be encoded: {e}") from None
        else:
            data = b"".join((b"%%>message:", body, b"\n"))
        if len(data) > self.max_line + 1:
            raise LineTooLong(len(data) - 1, self.max_line, f"message {msg.name}")
        return data

    def message_wire(self, name: str, wire: str, id: str, stamp: str = "0",
                     retval: str = "", *, plain_id: bool = False) -> bytes:
        """``%%>message`` whose params are given already escaped (``:k=v...``, as
        :meth:`Message.wire_params` gives them; ``wire`` must follow Yate's escaping).
        ``plain_id``: the caller made ``id`` of characters that need no escape."""
        try:
            data = "".join(("%%>message:", id if plain_id else escape(id), ":", stamp,
                            ":", escape(name), ":", escape(retval) if retval else "",
                            wire or ":", "\n")).encode(ENCODING, ERRORS)
        except UnicodeEncodeError as e:
            raise LocalProtocolError(f"text cannot be encoded: {e}") from None
        if len(data) > self.max_line + 1:
            raise LineTooLong(len(data) - 1, self.max_line, f"message {name}")
        return data

    def answer(self, id: str, handled: bool, name: str, retval: str,
               changes: dict[str, str | None] | None) -> bytes:
        """``%%<message``: all four fields always; only the changed params (bare key = delete).

        ``name`` is the new name, or empty to keep it. ``id`` is echoed as received.
        """
        if not id or ":" in id or _CTRL.search(id):
            raise LocalProtocolError(f"answer id {id[:40]!r} cannot be matched by Yate")
        if not name and not retval and changes is not None and len(changes) == 1:
            # the usual answer to a sip.*: only the SIP code set (and digits need no escape)
            code = changes.get("code")
            if code.__class__ is str and code.isascii() and code.isdigit():
                data = ("%%<message:" + id + (":true:::code=" if handled else ":false:::code=")
                        + code + "\n").encode(ENCODING, ERRORS)
                if len(data) > self.max_line + 1:
                    raise LineTooLong(len(data) - 1, self.max_line, "answer")
                return data
        fields = ["%%<message:" + id + (":true:" if handled else ":false:")
                  + (escape(name) if name else ""), escape(retval) if retval else ""]
        if changes:
            for k, v in changes.items():
                if not k or "=" in k:
                    check_param_name(k)
                k = escape(k)
                if v is None:
                    fields.append(k)
                else:
                    if type(v) is not str:  # Reset: delete every copy, then set one
                        fields.append(k)
                    fields.append(k + "=" + escape(v))
        fields[-1] += "\n"
        try:
            data = ":".join(fields).encode(ENCODING, ERRORS)
        except UnicodeEncodeError as e:
            raise LocalProtocolError(f"text cannot be encoded: {e}") from None
        if len(data) > self.max_line + 1:
            raise LineTooLong(len(data) - 1, self.max_line, "answer")
        return data

    def install(self, name: str, priority: int | None = 100, filter_name: str | None = None,
                filter_value: str | None = None) -> bytes:
        check_raw(name, "install name")
        if not name:
            raise LocalProtocolError("install needs a message name")
        prio = 100 if priority is None else int(priority)
        if not 0 <= prio < 2 ** 31 - 1:
            raise LocalProtocolError(f"install priority {prio} is outside 0..2147483646")
        if filter_value is not None and filter_name is None:
            raise LocalProtocolError("a filter value needs a filter name")
        # Always write the priority field: without it a filter shifts the fields (Surprise 27).
        line = f"%%>install:{prio}:{name}"
        if filter_name is not None:
            if not filter_name:
                raise LocalProtocolError("empty filter name")
            line += ":" + escape(filter_name)
            if filter_value is not None:
                line += ":" + escape(filter_value)
        return self._finish(line)

    def _raw_keyword(self, kw: str, name: str) -> bytes:
        check_raw(name, kw + " name")
        return self._finish(f"%%>{kw}:{name}")

    def uninstall(self, name: str) -> bytes:
        return self._raw_keyword("uninstall", name)

    def watch(self, name: str) -> bytes:
        """``%%>watch``; an empty name watches every message."""
        return self._raw_keyword("watch", name)

    def unwatch(self, name: str) -> bytes:
        return self._raw_keyword("unwatch", name)

    def setlocal(self, name: str, value: str | bool | int) -> bytes:
        """``%%>setlocal``; booleans are written ``true``/``false`` (``1`` is not a boolean)."""
        if isinstance(value, bool):
            value = _bool(value)
        value = str(value)
        if not name:
            raise LocalProtocolError("setlocal needs a name")
        if name in BOOL_SETTINGS and value not in ("true", "false"):
            raise LocalProtocolError(f"setlocal {name} takes true or false, not {value!r} "
                                     "(Yate would ignore it silently)")
        check_raw(name, "setlocal name")
        check_raw(value, "setlocal value")
        if value != value.strip():
            raise LocalProtocolError("setlocal value would be trimmed by Yate")
        return self._finish(f"%%>setlocal:{name}:{value}")

    def output(self, text: str) -> bytes:
        """``%%>output``: raw text; control bytes are refused, ``:`` is fine (rest of line)."""
        if _CTRL.search(text):
            raise LocalProtocolError("output text cannot contain control characters")
        return self._finish("%%>output:" + text, "output")

    def debug(self, level: int, text: str) -> bytes:
        level = min(max(int(level), 1), 10)
        return self._finish(f"%%>debug:{level}:{escape(text)}", "debug")

    def connect(self, role: str = "global", id: str | None = None, type: str | None = None) -> bytes:
        if role not in ("global", "channel"):
            raise LocalProtocolError(f"connect role {role!r}: Yate implements only global and channel")
        line = "%%>connect:" + role
        if id is not None:
            line += ":" + check_raw(id, "connect id")
            if type is not None:
                line += ":" + check_raw(type, "connect type")
        return self._finish(line)

    def quit(self) -> bytes:
        return b"%%>quit\n"


# --- encoding (Yate -> script), for the tools and tests that play Yate -----------------------


def _yate_params(items) -> str:
    return "".join(":" + escape(k).replace("=", "%}") + "=" + escape(v) for k, v in items)


def yate_message_line(msg: Message, id: str, time: int = 0) -> bytes:
    """``%%>message`` as Yate writes it to a script (names escaped with ``=`` -> ``%}``)."""
    line = f"%%>message:{escape(id)}:{time}:{escape(msg.name)}:{escape(msg.retval)}" + _yate_params(msg.items())
    return line.encode(ENCODING, ERRORS) + b"\n"


def yate_answer_line(msg: Message, id: str, handled: bool) -> bytes:
    """``%%<message`` as Yate writes an answer (``id`` non-empty) or a watch line (empty id)."""
    line = f"%%<message:{escape(id)}:{_bool(handled)}:{escape(msg.name)}:{escape(msg.retval)}" + _yate_params(msg.items())
    return line.encode(ENCODING, ERRORS) + b"\n"


def yate_reply_line(reply: FromYate) -> bytes:
    """The keyword replies, raw as Yate writes them."""
    if isinstance(reply, InstallReplied):
        s = f"%%<install:{reply.priority}:{reply.name}:{_bool(reply.success)}"
    elif isinstance(reply, UninstallReplied):
        s = f"%%<uninstall:{reply.priority}:{reply.name}:{_bool(reply.success)}"
    elif isinstance(reply, WatchReplied):
        s = f"%%<watch:{reply.name}:{_bool(reply.success)}"
    elif isinstance(reply, UnwatchReplied):
        s = f"%%<unwatch:{reply.name}:{_bool(reply.success)}"
    elif isinstance(reply, SetLocalReplied):
        s = f"%%<setlocal:{reply.name}:{reply.value}:{_bool(reply.success)}"
    elif isinstance(reply, QuitReplied):
        s = "%%<quit"
    elif isinstance(reply, ErrorInReceived):
        s = "Error in: " + reply.line
    else:
        raise LocalProtocolError(f"not a reply: {reply!r}")
    return s.encode(ENCODING, ERRORS) + b"\n"
