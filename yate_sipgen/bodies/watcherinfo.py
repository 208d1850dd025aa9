"""watcherinfo documents (RFC 3858) for the ``presence.winfo`` package (RFC 3857): who watches
a user's presence, and in what state."""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from .pidf import _clean

CONTENT_TYPE = "application/watcherinfo+xml"
NS = "urn:ietf:params:xml:ns:watcherinfo"
STATUSES = ("pending", "active", "waiting", "terminated")
#: What brought a watcher to its status (RFC 3858 §4).
EVENTS = ("subscribe", "approved", "deactivated", "probation", "rejected", "timeout", "giveup",
          "noresource")


@dataclass(frozen=True, slots=True)
class Watcher:
    """One watcher of the resource: ``id`` stays the same for its subscription."""

    id: str
    uri: str
    status: str
    event: str
    display: str = ""
    expiration: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"watcher status {self.status!r}")
        if self.event not in EVENTS:
            raise ValueError(f"watcher event {self.event!r}")
        if not self.id or not self.uri:
            raise ValueError("watcher without id or URI")


def _attr(name: str, value: str) -> str:
    return f" {name}={quoteattr(_clean(value))}"


def render(resource_uri: str, package: str, version: int, watchers: list[Watcher]) -> str:
    """A full-state document: every watcher of ``resource_uri``'s ``package``, in the order
    given. ``version`` counts the documents of one winfo subscription (from 0)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\r\n<watcherinfo xmlns="', NS,
           '" version="', str(version), '" state="full"><watcher-list',
           _attr("resource", resource_uri), _attr("package", package), ">"]
    for w in watchers:
        out += ["<watcher", _attr("id", w.id), _attr("status", w.status), _attr("event", w.event)]
        if w.display:
            out.append(_attr("display-name", w.display))
        if w.expiration is not None:
            out.append(_attr("expiration", str(max(0, w.expiration))))
        out += [">", escape(_clean(w.uri)), "</watcher>"]
    out.append("</watcher-list></watcherinfo>")
    return "".join(out)
