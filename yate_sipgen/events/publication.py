"""RFC 3903 event state publication: which operation a PUBLISH is, and the table of
publications. No I/O.

=========  ====  ============  =======
operation  body  SIP-If-Match  Expires
=========  ====  ============  =======
initial    yes   no            > 0
refresh    no    yes           > 0
modify     yes   yes           > 0
remove     no    yes           0
=========  ====  ============  =======

Every successful operation but ``remove`` gets a new random entity tag (§4: the old one is then
invalid); an unknown ``SIP-If-Match`` (or one of another resource or package) gets 412; an
initial PUBLISH without a body gets 400.
"""

from __future__ import annotations

import heapq
import secrets

from .store import Publication
from .subscription import SubscribeError

INITIAL, REFRESH, MODIFY, REMOVE = "initial", "refresh", "modify", "remove"


def new_etag() -> str:
    """Random and unguessable: an ETag is all it takes to change someone's state."""
    return secrets.token_urlsafe(12)


class PublicationTable:
    """Publications by ETag and by (package, resource), with one expiry heap."""

    def __init__(self) -> None:
        self.by_etag: dict[str, Publication] = {}
        self._by_resource: dict[tuple[str, str], list[str]] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.by_etag)

    def of(self, package: str, resource: str) -> list[Publication]:
        """The resource's publications, oldest first."""
        return [self.by_etag[e] for e in self._by_resource.get((package, resource), ())]

    def resources(self, package: str) -> list[str]:
        return [r for (p, r) in self._by_resource if p == package]

    def add(self, pub: Publication) -> None:
        self.by_etag[pub.etag] = pub
        self._by_resource.setdefault((pub.package, pub.resource), []).append(pub.etag)
        heapq.heappush(self._heap, (pub.expires_at, pub.etag))

    def remove(self, etag: str) -> Publication | None:
        pub = self.by_etag.pop(etag, None)
        if pub is None:
            return None
        key = (pub.package, pub.resource)
        etags = self._by_resource.get(key)
        if etags is not None:
            if etag in etags:
                etags.remove(etag)
            if not etags:
                del self._by_resource[key]
        return pub

    def plan(self, package: str, resource: str, if_match: str, has_body: bool,
             expires: int) -> tuple[str, Publication | None]:
        """The operation a PUBLISH asks for and the publication it applies to; raises
        :class:`SubscribeError` (412, 400) for what RFC 3903 refuses."""
        if not if_match:
            if not has_body:
                raise SubscribeError(400, "initial PUBLISH without a body")
            if expires == 0:
                raise SubscribeError(400, "initial PUBLISH with Expires: 0")
            return INITIAL, None
        pub = self.by_etag.get(if_match.strip())
        if pub is None or pub.package != package or pub.resource != resource:
            raise SubscribeError(412, "SIP-If-Match matches no publication")
        if expires == 0:
            return REMOVE, pub
        return (MODIFY if has_body else REFRESH), pub

    def next_expiry(self) -> float | None:
        heap = self._heap
        while heap:
            when, etag = heap[0]
            pub = self.by_etag.get(etag)
            if pub is not None and pub.expires_at == when:
                return when
            heapq.heappop(heap)
        return None

    def expired(self, now: float) -> list[Publication]:
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, etag = heapq.heappop(heap)
            pub = self.by_etag.get(etag)
            if pub is not None and pub.expires_at == when:
                self.remove(etag)
                out.append(pub)
        return out
