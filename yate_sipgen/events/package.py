"""What an event package is to the subscription core: a name, its body types, its limits, who
may watch whom, and how its document for one resource is rendered.

A package module (``features/presence.py``, ``features/dialog.py``, ...) subclasses
:class:`EventPackage`, calls :meth:`EventPackage.changed` when a resource's state changes, and
renders in :meth:`EventPackage.document`. The core does the rest: the RFC 6665 dialog, Expires,
Accept, persistence, expiry, the NOTIFY queue.

Each document is rendered once per resource state, not once per watcher: :meth:`body` keeps
what :meth:`document` returned per (resource, :meth:`variant`) until the resource changes (the
core's ``changed`` drops it; :meth:`invalidate` for state that changes without a NOTIFY), and
:meth:`finish` adds what differs per NOTIFY (dialog-info's ``version``) to the shared
rendering. A PUBLISH to a presentity with 10,000 watchers renders its document once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Hashable
from typing import Any

from .subscription import ACTIVE, PENDING, Subscription

#: Who may subscribe to a resource (``[<package>] watchers``).
WATCH_POLICIES = ("self", "domain", "authenticated", "any", "approve")
#: Resources whose rendered documents are kept at most (oldest dropped first): a fan-out needs
#: only the one being sent; the bound keeps 100,000 quiet subscriptions from holding 100,000
#: documents.
MAX_RENDERED = 4096
_MISSING = object()


class EventPackage:
    """Base of every package. Class attributes describe it; override :meth:`body`."""

    event: str = ""
    #: Body types we can send, preferred first (Accept is matched against these).
    content_types: tuple[str, ...] = ()
    #: Config section of the package (enable, expires, watchers, ...).
    section: str = ""
    #: dialog-info numbers its documents per subscription (RFC 4235 ``version``).
    numbered: bool = False

    def __init__(self) -> None:
        self.core: Any = None
        self.cfg: dict[str, Any] = {}
        self.enabled = True
        # resource -> variant -> what document() returned (until the resource changes)
        self._rendered: dict[str, dict[Hashable, Any]] = {}

    # -- configuration ------------------------------------------------------------------
    def configure(self, section: dict[str, Any]) -> None:
        self.cfg = section
        self.enabled = bool(section.get("enable", True))
        self._rendered.clear()  # the knobs a document depends on may have changed

    @property
    def default_expires(self) -> int:
        return int(self.cfg.get("expires", 3600))

    @property
    def interval(self) -> float:
        """Least seconds between two state-change NOTIFYs of one subscription."""
        return float(self.cfg.get("min_interval", 0.0))

    # -- authorization --------------------------------------------------------------------
    def may_watch(self, watcher: str, resource: str, authenticated: bool) -> str | int:
        """``active``, ``pending`` (needs approval) or the SIP code to refuse with.

        ``watcher`` and ``resource`` are ``user@domain`` keys (domains already mapped to
        their main name). ``deny`` wins over ``allow``; both take ``fnmatch`` patterns.
        """
        if watcher == resource:
            return ACTIVE  # everyone may watch themselves
        for pat in self.cfg.get("deny", ()):
            if fnmatch.fnmatchcase(watcher, pat):
                return 403
        for pat in self.cfg.get("allow", ()):
            if fnmatch.fnmatchcase(watcher, pat):
                return ACTIVE
        policy = self.cfg.get("watchers", "domain")
        if policy == "any":
            return ACTIVE
        if policy == "self":
            return 403
        if not authenticated and self.core is not None and self.core.auth_required:
            return 403
        if policy == "authenticated":
            return ACTIVE if authenticated else 403
        if policy == "approve":
            decision = self.core.approval(self.event, watcher, resource) if self.core else ""
            return ACTIVE if decision == "allow" else 403 if decision == "deny" else PENDING
        # domain: a watcher of the resource's own domain
        return ACTIVE if watcher.rpartition("@")[2] == resource.rpartition("@")[2] else 403

    # -- state ----------------------------------------------------------------------------
    def body(self, sub: Subscription, version: int) -> str:
        """The document for ``sub``'s resource now (``version``: for numbered packages),
        rendered once for every subscription of the same resource and :meth:`variant`."""
        return self.finish(self.rendered(sub.resource, self.variant(sub)), version)

    def rendered(self, resource: str, variant: Hashable = None) -> Any:
        """:meth:`document` of ``resource``, from the cache while its state is unchanged."""
        docs = self._rendered.get(resource)
        if docs is None:
            cache = self._rendered
            if len(cache) >= MAX_RENDERED:
                del cache[next(iter(cache))]
            docs = cache[resource] = {}
        doc = docs.get(variant, _MISSING)
        if doc is _MISSING:
            doc = docs[variant] = self.document(resource, variant)
        return doc

    def variant(self, sub: Subscription) -> Hashable:
        """What of ``sub`` changes its document besides the resource's state (a filter, a
        per-subscriber knob); subscriptions with the same variant share one rendering."""
        return None

    def document(self, resource: str, variant: Hashable) -> Any:
        """Render ``resource``'s document now; anything :meth:`finish` turns into the body."""
        raise NotImplementedError

    def finish(self, doc: Any, version: int) -> str:
        """The body of one NOTIFY from the shared rendering (dialog-info adds its version)."""
        return doc

    def invalidate(self, resource: str) -> None:
        """Forget ``resource``'s renderings (the core's ``changed`` calls this too)."""
        self._rendered.pop(resource, None)

    def changed(self, resource: str) -> None:
        """``resource``'s state changed: render anew and NOTIFY its watchers."""
        if self.core is not None:
            self.core.changed(self.event, resource)
        else:
            self.invalidate(resource)

    def map_resource(self, user: str, host: str, watcher: str) -> str | None:
        """The resource a SUBSCRIBE to ``user@host`` by ``watcher`` is for, when it is not
        simply that user (e.g. a voicemail number means the watcher's own mailbox)."""
        return None

    async def prepare(self, sub: Subscription) -> None:
        """Gather what :meth:`body` needs and cannot get without waiting (before each
        NOTIFY)."""

    def on_subscribed(self, sub: Subscription) -> None:
        """A subscription began (or came back after a restart)."""

    def status(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        """Read the package's state back from the store (called once it is open, before the
        subscriptions are restored)."""
