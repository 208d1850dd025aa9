"""A small SIP phone over UDP for the live tests (stdlib, asyncio).

Enough of RFC 3261 to play the phones of the live scenarios against a real Yate on loopback:

* client requests (REGISTER, MESSAGE, SUBSCRIBE, PUBLISH, ...) with one digest retry on
  401/407 (MD5, with or without ``qop=auth``), waiting for the final response; no
  retransmissions (loopback loses nothing) but a timeout;
* a server side: every request Yate sends us is recorded and answered by :attr:`Phone.answer`
  (a code, or a callable deciding per request, possibly after a delay); retransmissions of a
  request already answered get the same answer again, never a second record.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

_counter = itertools.count(1)


def _token(n: int = 10) -> str:
    return "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


@dataclass
class SipMsg:
    """One parsed SIP message (request or response)."""

    first: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    source: tuple[str, int] = ("", 0)
    received: float = 0.0

    @property
    def is_request(self) -> bool:
        return not self.first.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        return self.first.split(" ", 1)[0] if self.is_request else self.cseq_method

    @property
    def ruri(self) -> str:
        return self.first.split(" ")[1]

    @property
    def code(self) -> int:
        return int(self.first.split(" ")[1]) if not self.is_request else 0

    @property
    def cseq_method(self) -> str:
        return (self.get("CSeq") or " ").split()[-1]

    @property
    def cseq(self) -> int:
        return int((self.get("CSeq") or "0").split()[0])

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        n = name.lower()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return default

    def getall(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def tag(self, header: str) -> str:
        m = re.search(r";\s*tag=([^;>\s]+)", self.get(header) or "")
        return m.group(1) if m else ""

    def encode(self) -> bytes:
        head = self.first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers
                                             if k.lower() != "content-length")
        head += f"Content-Length: {len(self.body)}\r\n\r\n"
        return head.encode() + self.body


_COMPACT = {"i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
            "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
            "v": "Via", "o": "Event", "u": "Allow-Events", "r": "Refer-To"}


def parse(data: bytes, source: tuple[str, int] = ("", 0)) -> SipMsg:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    msg = SipMsg(lines[0], source=source, received=time.monotonic())
    for ln in lines[1:]:
        if ln[:1] in (" ", "\t") and msg.headers:  # folded line
            k, v = msg.headers[-1]
            msg.headers[-1] = (k, v + " " + ln.strip())
            continue
        k, _, v = ln.partition(":")
        k = k.strip()
        msg.headers.append((_COMPACT.get(k.lower(), k) if len(k) == 1 else k, v.strip()))
    clen = msg.get("Content-Length")
    msg.body = body[: int(clen)] if clen and clen.isdigit() else body
    return msg


def _md5(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


def digest_header(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    """The Authorization value answering a ``Digest ...`` challenge (RFC 2617)."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.split(" ", 1)[1]))
    realm, nonce = params.get("realm", ""), params.get("nonce", "")
    ha1 = _md5(f"{user}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    out = f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}"'
    if "auth" in params.get("qop", "").split(","):
        cnonce, nc = _token(8), "00000001"
        resp = _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        out += f', qop=auth, nc={nc}, cnonce="{cnonce}"'
    else:
        resp = _md5(f"{ha1}:{nonce}:{ha2}")
    out += f', response="{resp}", algorithm=MD5'
    if "opaque" in params:
        out += f', opaque="{params["opaque"]}"'
    return out


AnswerRule = Union[int, Callable[[SipMsg], Union[int, tuple[int, dict[str, str]],
                                               Awaitable[Any]]]]


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, phone: "Phone") -> None:
        self.phone = phone

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse(data, addr)
        except Exception:  # noqa: BLE001 - a test phone ignores garbage
            return
        self.phone._received(msg)


class Phone:
    """A SIP user agent on ``127.0.0.1:<port>`` registering ``user`` at Yate.

    ``domain`` is what goes in From/To/Request-URI hosts (Yate's address by default, as a phone
    configured with the server's IP does).
    """

    def __init__(self, user: str, password: str, server: tuple[str, int], *,
                 domain: Optional[str] = None, port: int = 0) -> None:
        self.user = user
        self.password = password
        self.server = server
        self.domain = domain or f"{server[0]}:{server[1]}"
        self.port = port
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.received: list[SipMsg] = []  # requests Yate sent us, in arrival order
        self.answer: AnswerRule = 200
        self._pending: dict[str, asyncio.Future[SipMsg]] = {}
        self._provisional: dict[str, list[SipMsg]] = {}
        self._answered: dict[tuple[str, str, str], bytes] = {}
        self._waiters: list[tuple[Callable[[SipMsg], bool], asyncio.Future[SipMsg]]] = []
        self.cseq = random.randint(1, 1000)
        self.call_id = f"{_token()}@127.0.0.1"
        self.from_tag = _token(8)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> "Phone":
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Proto(self), local_addr=("127.0.0.1", self.port))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def __aenter__(self) -> "Phone":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@127.0.0.1:{self.port}>"

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    # -- receiving ---------------------------------------------------------------------------
    def _received(self, msg: SipMsg) -> None:
        if not msg.is_request:
            branch = _branch(msg)
            fut = self._pending.get(branch)
            if fut is None or fut.done():
                return
            if msg.code < 200:
                self._provisional.setdefault(branch, []).append(msg)
                return
            fut.set_result(msg)
            return
        if msg.method == "ACK":
            return
        key = (msg.get("Call-ID") or "", msg.get("CSeq") or "", _branch(msg))
        if key in self._answered:  # a retransmission: same answer, no second record
            if self._answered[key]:
                self.transport.sendto(self._answered[key], msg.source)
            return
        self._answered[key] = b""
        self.received.append(msg)
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(msg):
                fut.set_result(msg)
        asyncio.ensure_future(self._answer(msg, key))

    async def _answer(self, req: SipMsg, key: tuple[str, str, str]) -> None:
        rule = self.answer
        extra: dict[str, str] = {}
        result: Any = rule(req) if callable(rule) else rule
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if isinstance(result, tuple):
            result, extra = result
        if result is None:
            return  # never answer (a dead phone)
        data = self.response(req, int(result), extra).encode()
        self._answered[key] = data
        self.transport.sendto(data, req.source)

    def response(self, req: SipMsg, code: int, extra: Optional[dict[str, str]] = None) -> SipMsg:
        reason = {200: "OK", 202: "Accepted", 404: "Not Found", 481: "Does Not Exist",
                  486: "Busy Here", 480: "Temporarily Unavailable", 500: "Server Error",
                  603: "Decline", 180: "Ringing", 100: "Trying"}.get(code, "Whatever")
        to = req.get("To") or ""
        if ";tag=" not in to and code > 100:
            to += ";tag=" + self.from_tag
        hdrs = [("Via", v) for v in req.getall("Via")]
        hdrs += [("From", req.get("From") or ""), ("To", to),
                 ("Call-ID", req.get("Call-ID") or ""), ("CSeq", req.get("CSeq") or "")]
        if req.method in ("INVITE", "SUBSCRIBE") and 200 <= code < 300:
            hdrs.append(("Contact", self.contact))
        hdrs += list((extra or {}).items())
        return SipMsg(f"SIP/2.0 {code} {reason}", hdrs)

    async def wait_request(self, pred: Callable[[SipMsg], bool] = lambda m: True,
                           timeout: float = 10.0, *, seen: int = 0) -> SipMsg:
        """The first request matching ``pred`` (among the received ones after index ``seen``,
        or the next to arrive)."""
        for m in self.received[seen:]:
            if pred(m):
                return m
        fut: asyncio.Future[SipMsg] = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.remove((pred, fut))

    def requests(self, method: str) -> list[SipMsg]:
        return [m for m in self.received if m.method == method]

    # -- sending -----------------------------------------------------------------------------
    def build(self, method: str, ruri: str, *, to: Optional[str] = None,
              headers: Optional[list[tuple[str, str]]] = None, body: Union[bytes, str] = b"",
              content_type: str = "", call_id: Optional[str] = None,
              from_tag: Optional[str] = None, to_tag: str = "", cseq: Optional[int] = None
              ) -> SipMsg:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        branch = "z9hG4bK" + _token(12)
        to_val = to or f"<{ruri}>"
        if to_tag:
            to_val += f";tag={to_tag}"
        hdrs = [("Via", f"SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport"),
                ("Max-Forwards", "70"),
                ("From", f"<{self.aor}>;tag={from_tag or self.from_tag}"), ("To", to_val),
                ("Call-ID", call_id or f"{_token()}@127.0.0.1"),
                ("CSeq", f"{cseq} {method}"), ("User-Agent", "sipgen-live-phone")]
        hdrs += headers or []
        data = body.encode() if isinstance(body, str) else body
        if content_type:
            hdrs.append(("Content-Type", content_type))
        return SipMsg(f"{method} {ruri} SIP/2.0", hdrs, data)

    async def send(self, req: SipMsg, *, auth: bool = True, timeout: float = 15.0) -> SipMsg:
        """Send a request; answer one digest challenge when ``auth``; the final response."""
        resp = await self._transact(req, timeout)
        if auth and resp.code in (401, 407):
            hname = "WWW-Authenticate" if resp.code == 401 else "Proxy-Authenticate"
            aname = "Authorization" if resp.code == 401 else "Proxy-Authorization"
            chal = resp.get(hname) or ""
            req = SipMsg(req.first, [(k, v) for k, v in req.headers
                                     if k not in ("Authorization", "Proxy-Authorization")],
                         req.body)
            _bump_cseq(req)
            _new_branch(req)
            req.headers.append((aname, digest_header(chal, req.method, req.ruri, self.user,
                                                     self.password)))
            resp = await self._transact(req, timeout)
        return resp

    async def _transact(self, req: SipMsg, timeout: float) -> SipMsg:
        branch = _branch(req)
        fut: asyncio.Future[SipMsg] = asyncio.get_running_loop().create_future()
        self._pending[branch] = fut
        self.transport.sendto(req.encode(), self.server)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(branch, None)

    async def register(self, expires: int = 300) -> SipMsg:
        ruri = f"sip:{self.domain}"
        req = self.build("REGISTER", ruri, to=f"<{self.aor}>", call_id=self.call_id,
                         headers=[("Contact", self.contact), ("Expires", str(expires))])
        return await self.send(req)

    async def message(self, to_user: str, body: str = "hello", *,
                      content_type: str = "text/plain", auth: bool = True,
                      headers: Optional[list[tuple[str, str]]] = None,
                      domain: Optional[str] = None, timeout: float = 15.0) -> SipMsg:
        ruri = f"sip:{to_user}@{domain or self.domain}"
        req = self.build("MESSAGE", ruri, headers=headers, body=body,
                         content_type=content_type)
        return await self.send(req, auth=auth, timeout=timeout)


def _branch(msg: SipMsg) -> str:
    via = msg.get("Via") or ""
    m = re.search(r";\s*branch=([^;,\s]+)", via)
    return m.group(1) if m else ""


def _bump_cseq(req: SipMsg) -> None:
    for i, (k, v) in enumerate(req.headers):
        if k == "CSeq":
            n, meth = v.split()
            req.headers[i] = (k, f"{int(n) + 1} {meth}")


def _new_branch(req: SipMsg) -> None:
    for i, (k, v) in enumerate(req.headers):
        if k == "Via":
            req.headers[i] = (k, re.sub(r"branch=[^;]+", "branch=z9hG4bK" + _token(12), v))
            return
