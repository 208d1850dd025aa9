"""presence.winfo (RFC 3857/3858): a user learns who watches their presence.

The state is the subscription table itself: every ``presence`` subscription to the user is one
``<watcher>``, ``pending`` while it waits for approval (``[presence] watchers=approve``) and
``active`` once allowed. The core tells the package whenever a presence subscription begins,
is approved, or ends (its watcher then leaves the next full document), so a client that shows
"alice wants to see your presence" gets the request at once; the decision itself is made with
``sipgen approve``/``sipgen deny`` (there is no XCAP here).

Only the user may watch their own watcher list (``watchers=self``), plus whoever ``allow``
names. The document is numbered per subscription (``version``), like dialog-info.
"""

from __future__ import annotations

import time
from typing import Any

from ..bodies import watcherinfo as wi
from ..config import Declarations
from ..events.package import EventPackage
from ..events.subscription import PENDING, Subscription
from ..sip import parse_name_addr
from . import BaseFeature
from .events import package_keys

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()

S = "winfo"
WATCHED = "presence"
package_keys(CONFIG, S, "Event: presence.winfo (RFC 3857): the list of a user's presence "
             "watchers, pending ones included, for clients that ask who wants to see them.",
             expires=3600, watchers="self", event=WATCHED + ".winfo")


class WatcherInfoPackage(EventPackage):
    event = WATCHED + ".winfo"
    content_types = (wi.CONTENT_TYPE,)
    section = S
    numbered = True
    #: The package whose subscriptions are this one's state (the core reports their changes).
    watches = WATCHED

    def watchers(self, resource: str, now: float) -> list[wi.Watcher]:
        core = self.core
        out = []
        for s in sorted(core.table.watchers(WATCHED, resource), key=lambda s: s.id):
            na = parse_name_addr(s.remote)
            if s.state == PENDING:
                status, event = "pending", "subscribe"
            else:
                approved = core.approval(WATCHED, s.subscriber, resource) == "allow"
                status, event = "active", "approved" if approved else "subscribe"
            out.append(wi.Watcher(id=s.id, uri=f"sip:{s.subscriber}", status=status,
                                  event=event, display=na.display if na is not None else "",
                                  expiration=s.remaining(now)))
        return out

    def body(self, sub: Subscription, version: int) -> str:
        return wi.render(sub.resource_uri, WATCHED, version,
                         self.watchers(sub.resource, time.time()))


class WatcherInfoFeature(BaseFeature):
    name = "winfo"
    config = CONFIG

    def __init__(self) -> None:
        self.package = WatcherInfoPackage()

    def setup(self, app: Any) -> None:
        core = app.feature("events")
        cfg = app.config
        if core is None or not cfg["events"]["enable"] or not cfg[S]["enable"] \
                or not cfg[WATCHED]["enable"]:
            self.package.enabled = False
            return
        core.register(self.package)
