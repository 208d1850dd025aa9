"""RFC 6665 subscriptions: what a SUBSCRIBE asks for, the record we keep, the table of them.

Nothing here does I/O. A subscription is a dialog (Call-ID, our tag, their tag) plus an event
package and the ``id`` of its ``Event`` header: several subscriptions may share one dialog.

State machine (RFC 6665 §4.1.2, §4.2.1)::

    (none) --SUBSCRIBE Expires>0, allowed--> active   (200, then NOTIFY active;expires=)
    (none) --SUBSCRIBE Expires>0, undecided--> pending (200, then NOTIFY pending;expires=)
    (none) --SUBSCRIBE Expires:0--> (none)              (200, then NOTIFY terminated: a fetch)
    pending --approve--> active;  pending --deny--> terminated;reason=rejected
    active|pending --refresh (in dialog)--> same state, new expiry (200 + NOTIFY)
    active|pending --Expires:0 (in dialog)--> terminated (200 + NOTIFY terminated)
    active|pending --expiry--> terminated;reason=timeout
    active|pending --NOTIFY failed for good--> removed (no NOTIFY: the other side is gone)

Times are wall-clock seconds (``time.time()``): they are persisted and must mean the same after
a restart.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

PENDING = "pending"
ACTIVE = "active"
TERMINATED = "terminated"
STATES = (PENDING, ACTIVE, TERMINATED)

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")


class SubscribeError(Exception):
    """A SUBSCRIBE (or PUBLISH) we refuse: the SIP code and response headers to answer with."""

    def __init__(self, code: int, reason: str, **headers: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


@dataclass(frozen=True, slots=True)
class EventHeader:
    """``Event: presence;id=7`` -> package ``presence``, id ``7`` (``""`` when absent)."""

    package: str
    id: str = ""

    def header(self) -> str:
        return self.package + (f";id={self.id}" if self.id else "")


def parse_event(value: str | None) -> EventHeader | None:
    """The Event header, or None when it is missing or malformed.

    Package names are matched case-insensitively (phones differ; RFC 6665 §8.2.1 event types
    are tokens). Parameters other than ``id`` are ignored; an ``id`` must be a token.
    """
    if not value:
        return None
    parts = [p.strip() for p in value.split(";")]
    pkg = parts[0]
    if not _TOKEN.fullmatch(pkg):
        return None
    eid = ""
    for p in parts[1:]:
        name, _, v = p.partition("=")
        if name.strip().lower() == "id":
            v = v.strip()
            if not _TOKEN.fullmatch(v):
                return None
            eid = v
    return EventHeader(pkg.lower(), eid)


def negotiate_expires(requested: str | None, default: int, minimum: int, maximum: int) -> int:
    """RFC 6665 §4.2.1.1: absent -> the package default; longer than ``maximum`` -> shortened
    (never lengthened); 0 stays 0 (unsubscribe / fetch); below ``minimum`` -> 423."""
    if requested is None or requested.strip() == "":
        return min(default, maximum)
    text = requested.strip()
    if not text.isdigit():
        raise SubscribeError(400, f"bad Expires {text[:20]!r}")
    value = int(text[:10])
    if value == 0:
        return 0
    if value < minimum:
        raise SubscribeError(423, f"Expires {value} below {minimum}", Min_Expires=str(minimum))
    return min(value, maximum)


def accepts(accept: str | None, types: Iterable[str]) -> str | None:
    """The first of ``types`` (ours, in order of preference) that an ``Accept`` header allows;
    None when it allows none (406). No Accept header: the package's default type (RFC 6665
    §7.2.1: the package defines it). ``q=0`` excludes a type."""
    types = tuple(types)
    if accept is None or not accept.strip():
        return types[0] if types else None
    ranges = []
    for item in accept.split(","):
        media, *params = [x.strip() for x in item.split(";")]
        media = media.lower()
        if not media:
            continue
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 1.0
        ranges.append((media, q))
    for t in types:
        major = t.split("/")[0] + "/*"
        for media, q in ranges:
            if q > 0 and media in (t, major, "*/*"):
                return t
    return None


@dataclass(slots=True)
class Subscription:
    """One subscription; everything a NOTIFY needs, and nothing from the SUBSCRIBE beyond that.

    ``local_uri`` is the NOTIFY's From without our tag (the SUBSCRIBE's To); ``remote`` its To
    (the SUBSCRIBE's From, with the subscriber's tag: it is kept only there); ``target`` the Request-URI (the
    subscriber's Contact); ``route`` the Route set (the SUBSCRIBE's Record-Route, in order).
    ``host``/``port`` is the next hop, chosen when the SUBSCRIBE came (first Route hop, or the
    SUBSCRIBE's source for UDP). ``cseq`` is the last CSeq used; ``cseq_mark`` (and
    ``version_mark``) how far it is reserved in the store: after a restart the next one starts
    above the mark, so it never goes back.
    """

    id: str
    package: str
    event_id: str
    resource: str  # user@domain watched
    resource_uri: str  # the entity, e.g. sip:bob@example.com
    subscriber: str  # user@domain watching
    call_id: str
    local_tag: str
    local_uri: str
    remote: str
    target: str
    route: str = ""
    host: str = ""
    port: str = ""
    transport: str = ""
    connection_id: str = ""
    content_type: str = ""
    state: str = ACTIVE
    expires_at: float = 0.0
    cseq: int = 0
    cseq_mark: int = 0
    version: int = 0  # the next dialog-info version (packages that number their documents)
    version_mark: int = 0
    authenticated: bool = False
    owner: str = ""
    reason: str = ""  # why it ended (terminated NOTIFY's ;reason=)
    runid: str = ""  # Yate's engine.runid when it came (a TCP connection_id is only good then)
    contact: str = ""  # our Contact header (the 200's and every NOTIFY's)

    @property
    def dialog(self) -> tuple[str, str, str, str]:
        return (self.call_id, self.local_tag, self.package, self.event_id)

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))

    def state_header(self, now: float) -> str:
        """``Subscription-State`` for a NOTIFY sent now (``;expires=`` on active and pending,
        RFC 6665 §4.1.3; ``;reason=`` on terminated)."""
        if self.state == TERMINATED:
            return TERMINATED + (f";reason={self.reason}" if self.reason else "")
        return f"{self.state};expires={self.remaining(now)}"

    def event_header(self) -> str:
        return self.package + (f";id={self.event_id}" if self.event_id else "")


class SubscriptionTable:
    """Every live subscription, found by id, by dialog and by watched resource; one heap of
    expiry times for all of them (no timer per subscription).

    The heap holds ``(expires_at, id)``; an entry whose time no longer matches its
    subscription (refreshed, removed) is skipped when it comes up.
    """

    def __init__(self) -> None:
        self.by_id: dict[str, Subscription] = {}
        self._by_dialog: dict[tuple[str, str, str, str], str] = {}
        self._by_resource: dict[tuple[str, str], set[str]] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self.by_id.values()))

    def get(self, sid: str) -> Subscription | None:
        return self.by_id.get(sid)

    def add(self, sub: Subscription) -> None:
        old = self.by_id.get(sub.id)
        if old is not None:
            self.remove(old.id)
        self.by_id[sub.id] = sub
        self._by_dialog[sub.dialog] = sub.id
        self._by_resource.setdefault((sub.package, sub.resource), set()).add(sub.id)
        heapq.heappush(self._heap, (sub.expires_at, sub.id))

    def remove(self, sid: str) -> Subscription | None:
        sub = self.by_id.pop(sid, None)
        if sub is None:
            return None
        self._by_dialog.pop(sub.dialog, None)
        ids = self._by_resource.get((sub.package, sub.resource))
        if ids is not None:
            ids.discard(sid)
            if not ids:
                del self._by_resource[(sub.package, sub.resource)]
        return sub

    def find(self, call_id: str, local_tag: str, package: str, event_id: str) -> Subscription | None:
        sid = self._by_dialog.get((call_id, local_tag, package, event_id))
        return self.by_id.get(sid) if sid is not None else None

    def in_dialog(self, call_id: str, local_tag: str) -> list[Subscription]:
        """Every subscription of one dialog (for a stray in-dialog request)."""
        return [s for k, sid in self._by_dialog.items() if k[0] == call_id and k[1] == local_tag
                for s in (self.by_id[sid],)]

    def watchers(self, package: str, resource: str) -> list[Subscription]:
        return [self.by_id[i] for i in self._by_resource.get((package, resource), ())]

    def resources(self, package: str) -> list[str]:
        return [r for (p, r) in self._by_resource if p == package]

    def reschedule(self, sub: Subscription, expires_at: float) -> None:
        sub.expires_at = expires_at
        heapq.heappush(self._heap, (expires_at, sub.id))

    def next_expiry(self) -> float | None:
        heap = self._heap
        while heap:
            when, sid = heap[0]
            sub = self.by_id.get(sid)
            if sub is not None and sub.expires_at == when:
                return when
            heapq.heappop(heap)  # stale: refreshed or removed since
        return None

    def expired(self, now: float) -> list[Subscription]:
        """Remove and return the subscriptions whose time is up."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, sid = heapq.heappop(heap)
            sub = self.by_id.get(sid)
            if sub is not None and sub.expires_at == when:
                self.remove(sid)
                out.append(sub)
        return out

    def count(self, package: str | None = None) -> int:
        if package is None:
            return len(self.by_id)
        return sum(1 for s in self.by_id.values() if s.package == package)


@dataclass(slots=True)
class Reservation:
    """Numbers (CSeq, document versions) handed out from blocks reserved in the store, so
    that a restart never reuses one while a write per NOTIFY is avoided."""

    block: int = 100
    pending: set[str] = field(default_factory=set)  # subscriptions whose mark must be saved

    def next_cseq(self, sub: Subscription) -> int:
        sub.cseq += 1
        if sub.cseq > sub.cseq_mark:
            sub.cseq_mark = sub.cseq + self.block
            self.pending.add(sub.id)
        return sub.cseq

    def next_version(self, sub: Subscription) -> int:
        v = sub.version
        sub.version += 1
        if sub.version > sub.version_mark:
            sub.version_mark = sub.version + self.block
            self.pending.add(sub.id)
        return v
