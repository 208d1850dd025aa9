"""Small pure SIP helpers: name-addr and URI parsing, quoting, media types, safe header values.

Values we put into SIP headers come from SIP requests; everything here either parses
defensively (returning ``None`` for garbage) or refuses what could inject a header (CR, LF, NUL
and other control characters) with :class:`HeaderValueError`.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate

_CTL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # TAB is allowed in header values


class HeaderValueError(ValueError):
    """A value cannot go into a SIP header without changing the message's structure."""


def header_safe(value: str) -> str:
    """Return ``value`` if it can be a header value as is; raise for CR/LF/control chars."""
    if value.isascii() and value.isprintable():  # the usual case, without a regex
        return value
    if _CTL.search(value):
        raise HeaderValueError(f"control character in header value {value[:40]!r}")
    return value


@dataclass(slots=True)  # built per request: frozen dataclasses construct slowly
class SipUri:
    scheme: str  # sip, sips, tel
    user: str
    host: str  # lower-cased, no brackets for IPv6
    port: int | None
    params: str  # ";..." including the leading ';', or ""

    @property
    def aor(self) -> str:
        """``user@host`` (the key users are stored under)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}:{user}{host}{port}{self.params}"


_URI = re.compile(
    r"(?P<scheme>sips?|tel):(?:(?P<user>[^@;?>\s]+)@)?(?P<host>\[[0-9a-fA-F:.]+\]|[^:;?>\s]+)"
    r"(?::(?P<port>\d{1,5}))?(?P<params>;[^?>\s]*)?", re.I)
_HOST = re.compile(r"\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+")
_USER = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+")


_SIMPLE_URI = re.compile(r"(sips?):([A-Za-z0-9\-_.!~*'()&=+$,?/%]+)@([A-Za-z0-9.-]+)")


def _plain_host(host: str) -> bool:
    return host.isascii() and host.replace(".", "").replace("-", "").isalnum()


def parse_uri(text: str) -> SipUri | None:
    """Parse ``sip:user@host:port;params`` (also inside ``<...>``); ``None`` if it is not one."""
    if text[:4] == "sip:":  # the usual ``sip:user@host``: string methods, no regex (hot path)
        user, at, host = text[4:].partition("@")
        if at and user.isascii() and user.isalnum() and _plain_host(host):
            return SipUri("sip", user, host.lower(), None, "")
    m = _SIMPLE_URI.fullmatch(text)
    if m is not None:
        return SipUri(m.group(1).lower(), m.group(2), m.group(3).lower(), None, "")
    text = text.strip()
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return None
        text = text[1:end]
    m = _URI.fullmatch(text.split("?", 1)[0])
    if not m:
        return None
    host = m.group("host")
    if not _HOST.fullmatch(host):
        return None
    user = m.group("user") or ""
    if user and not _USER.fullmatch(user):
        return None
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        return None
    return SipUri(m.group("scheme").lower(), user, host.strip("[]").lower(), port,
                  m.group("params") or "")


@dataclass(slots=True)
class NameAddr:
    display: str  # unquoted display name ("" if none)
    uri: SipUri
    tag: str  # ";tag=" value or ""


_SIMPLE_NA = re.compile(
    r'(?:"([^"\\]*)"\s*)?<(sips?):([A-Za-z0-9\-_.!~*\'()&=+$,?/%]+)@([A-Za-z0-9.-]+)(?::(\d{1,5}))?>'
    r'(?:;tag=([A-Za-z0-9\-_.!~*\'()+%]+))?')


def _simple_name_addr(text: str) -> NameAddr | None:
    """``"Display" <sip:user@host>;tag=x`` with plain parts, by string methods; else None."""
    lt = text.find("<")
    gt = text.find(">", lt)
    if lt < 0 or gt < 0:
        return None
    head = text[:lt].rstrip()
    if head:
        if len(head) < 2 or head[0] != '"' or head[-1] != '"':
            return None
        display = head[1:-1]
        if '"' in display or "\\" in display or not display.isprintable():
            return None
    else:
        display = ""
    uri = parse_uri(text[lt + 1:gt])
    if uri is None or uri.port is not None:
        return None
    rest = text[gt + 1:]
    if not rest:
        return NameAddr(display, uri, "")
    if rest[:5] == ";tag=" and rest[5:].isascii() and rest[5:].replace("-", "").isalnum():
        return NameAddr(display, uri, rest[5:])
    return None


def parse_name_addr(text: str) -> NameAddr | None:
    """Parse a From/To value: ``"Display" <uri>;tag=x``, ``Display <uri>`` or a bare URI."""
    na = _simple_name_addr(text)
    if na is not None:  # the usual shape (hot path)
        return na
    m = _SIMPLE_NA.fullmatch(text)
    if m is not None:  # the usual shape, in one regex match (hot path)
        port = int(m.group(5)) if m.group(5) else None
        if port is None or 0 < port < 65536:
            return NameAddr(m.group(1) or "", SipUri(m.group(2).lower(), m.group(3),
                                                     m.group(4).lower(), port, ""),
                            m.group(6) or "")
    text = text.strip()
    display = ""
    start = 0
    if text.startswith('"'):
        # a quoted display name may hold '<' or '>': find its closing quote first
        end = _quoted_end(text)
        if end < 0:
            return None
        display = _unquote(text[: end + 1])
        if display is None:
            return None
        start = end + 1
    if "<" in text[start:]:
        lt = text.index("<", start)
        if not start:
            display = text[:lt].strip()
        elif text[start:lt].strip():
            return None
        gt = text.find(">", lt)
        if gt < 0:
            return None
        uri = parse_uri(text[lt: gt + 1])
        rest = text[gt + 1:]
    else:
        semi = text.find(";")
        uri = parse_uri(text if semi < 0 else text[:semi])
        rest = "" if semi < 0 else text[semi:]
    if uri is None:
        return None
    tag = ""
    for param in rest.split(";"):
        k, _, v = param.partition("=")
        if k.strip().lower() == "tag":
            tag = v.strip()
    return NameAddr(display, uri, tag)


def _quoted_end(text: str) -> int:
    """Index of the quote closing the quoted-string that starts ``text``, or -1."""
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i
        i += 1
    return -1


def _unquote(raw: str) -> str | None:
    if len(raw) < 2 or not raw.endswith('"'):
        return None
    out = []
    i = 1
    while i < len(raw) - 1:
        c = raw[i]
        if c == "\\" and i + 1 < len(raw) - 1:
            out.append(raw[i + 1])
            i += 2
            continue
        if c == '"':
            return None
        out.append(c)
        i += 1
    return "".join(out)


def quote_display(display: str) -> str:
    """A quoted-string for a display name (RFC 3261 §25.1): ``"`` and ``\\`` escaped.

    Control characters are dropped: a display name must never break the header.
    """
    if display.isalnum():  # the usual name: nothing to escape or drop
        return '"' + display + '"'
    clean = _CTL.sub("", display.replace("\t", " "))
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_name_addr(uri: str, display: str = "", tag: str = "") -> str:
    header_safe(uri)
    out = (quote_display(display) + " " if display else "") + f"<{uri}>"
    if tag:
        out += ";tag=" + header_safe(tag)
    return out


def header_param(value: str, name: str) -> str | None:
    """The value of ``;name=`` in a header value (case-insensitive name), or ``None``."""
    if ";" not in value:  # no params at all (a To without a tag: every new MESSAGE)
        return None
    for param in value.split(";")[1:]:
        k, _, v = param.partition("=")
        if k.strip().lower() == name:  # whitespace around '=' is allowed (RFC 3261 §25.1)
            return v.strip().strip('"')
    return None


def media_type(content_type: str) -> str:
    """``Text/Plain; charset=UTF-8`` -> ``text/plain``."""
    return content_type.split(";", 1)[0].strip().lower()


_ID_PREFIX = secrets.token_hex(8)  # random per process; a counter makes each id unique
_TAG_PREFIX = _ID_PREFIX[:8]
_id_counter = itertools.count(1)


def new_tag() -> str:
    return f"{_TAG_PREFIX}{next(_id_counter):x}"


def new_call_id(host: str = "sipgen") -> str:
    """Globally unique without a system call per id: process-random prefix + counter."""
    return f"{_ID_PREFIX}{next(_id_counter):x}@{host}"


_date_cache: tuple[int, str] = (-1, "")


def http_date(epoch: float) -> str:
    """RFC 1123 date as the SIP ``Date`` header wants it (always GMT); cached per second."""
    global _date_cache
    sec = int(epoch)
    if _date_cache[0] != sec:
        _date_cache = (sec, formatdate(sec, usegmt=True))
    return _date_cache[1]


#: Yate's error names -> SIP codes (the part of ysipchan's table, sip.cpp:67-105, we need).
YATE_ERRORS = {
    "incomplete": 484, "noroute": 404, "nocall": 481, "noconn": 503, "noauth": 401,
    "nomedia": 415, "nocall-leg": 481, "busy": 486, "noanswer": 480, "rejected": 403,
    "forbidden": 403, "offline": 480, "congestion": 503, "failure": 500, "pending": 491,
    "looping": 483, "timeout": 408, "notransport": 480, "unallocated": 404,
}
