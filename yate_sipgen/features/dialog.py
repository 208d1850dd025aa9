"""dialog (RFC 4235): busy lamp fields, from Yate's call events.

The source is ``call.cdr`` (needs ``cdrbuild.yate``, with ``updates=true``): one series per call
leg, ``operation`` initialize -> update... -> finalize. ``external`` names the party outside
Yate: the caller on Yate's *incoming* leg (so that user initiated the call: ``initiator``), the
callee on the *outgoing* leg (``recipient``). ``status`` gives the state: ringing/progressing
-> ``early``, answered -> ``confirmed``; ``finalize`` -> ``terminated`` (status stays
``answered`` on finalize, reference §7). ``call.cdr`` is enqueued, so two of one leg may come
out of order: a leg's state never goes back (finalize is final; an older ``time`` is ignored).

The document is ``dialog-info`` with ``state="full"`` and a ``version`` counted per
subscription (kept across restarts by the core). ``single_dialog`` sends at most one
``<dialog>`` (phones that show only one), ``remote_identity=false`` hides who the other party is
(BLF otherwise tells every watcher who the user talks to).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import config as config_mod
from ..bodies import dialog_info as di
from ..config import Declarations
from ..events.package import EventPackage
from ..message import Message
from . import BaseFeature
from .events import package_keys

log = logging.getLogger("yate_sipgen.dialog")

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()
key = CONFIG.key

S = "dialog"
package_keys(CONFIG, S, "Event: dialog (RFC 4235): busy lamp fields from Yate's call.cdr (load "
             "cdrbuild.yate; cdrbuild.conf [general] updates=true).",
             expires=3600, watchers="domain")
key(S, "single_dialog", "bool", False,
    "At most one <dialog> per document (the most important call): for phones that show "
    "only one or mishandle several.")
key(S, "remote_identity", "bool", True,
    "Tell watchers who the other party of a call is (<remote><identity>). false: hide it.")
key(S, "domain", "str", "",
    "Domain of the users named in call events (call.cdr has none). Empty: the first of "
    "[message] domains.")

_RANK = {"initialize": 0, "update": 1, "finalize": 2}
#: Terminated dialogs are shown this long, then the user is idle again.
LINGER = 2.0


class DialogPackage(EventPackage):
    event = "dialog"
    content_types = (di.CONTENT_TYPE,)
    section = S
    numbered = True

    def __init__(self) -> None:
        super().__init__()
        # resource -> chan -> (dialog, rank, time)
        self.calls: dict[str, dict[str, tuple[di.Dialog, int, float]]] = {}

    def dialogs(self, resource: str) -> list[di.Dialog]:
        return [d for d, _, _ in self.calls.get(resource, {}).values()]

    def document(self, resource: str, variant: Any) -> tuple[str, str]:
        """The document without its version, once per change of the user's calls; each
        NOTIFY puts its subscription's own version in (:meth:`finish`)."""
        return di.template(f"sip:{resource}", self.dialogs(resource),
                           remote_identities=bool(self.cfg.get("remote_identity", True)),
                           single=bool(self.cfg.get("single_dialog", False)))

    def finish(self, doc: tuple[str, str], version: int) -> str:
        return di.with_version(doc, version)

    def status(self) -> dict[str, Any]:
        return {"calls": sum(len(v) for v in self.calls.values())}


def _state(operation: str, status: str, direction: str) -> str:
    if operation == "finalize":
        return "terminated"
    s = status.lower()
    if s == "answered":
        return "confirmed"
    if s in ("ringing", "progressing"):
        return "early" if direction == "recipient" else "proceeding" if s == "progressing" \
            else "early"
    return "trying"


class DialogFeature(BaseFeature):
    name = "dialog"
    config = CONFIG

    def __init__(self) -> None:
        self.package = DialogPackage()
        self.core: Any = None

    @classmethod
    def yate_notes(cls, cfg: config_mod.Config) -> list[str]:
        if not (cfg["events"]["enable"] and cfg[S]["enable"]):
            return []
        return ["dialog (BLF) needs Yate's call.cdr: load cdrbuild.yate (yate.conf [modules] "
                "or modload) with cdrbuild.conf [general] updates=true"]

    def setup(self, app: Any) -> None:
        self.app = app
        self.core = app.feature("events")
        self.counters = app.stats.feature("dialog")
        cfg = app.config
        if self.core is None or not cfg["events"]["enable"] or not cfg[S]["enable"]:
            self.package.enabled = False
            return
        self.core.register(self.package)
        app.engine.watcher("call.cdr")(self.on_cdr)

    def reconfigure(self, cfg: config_mod.Config) -> None:
        self.domain = cfg[S]["domain"].lower()

    def on_cdr(self, msg: Message) -> None:
        user = (msg.get("external") or "").strip()
        chan = msg.get("chan") or ""
        operation = msg.get("operation") or ""
        if not user or not chan or operation not in _RANK:
            return
        domain = self.domain or self.core.default_domain()
        if not domain:
            return
        resource = self.core.user_key(user, domain)
        yate_dir = (msg.get("direction") or "").lower()
        # Yate's incoming leg: the external party called in, so the user initiated the call
        direction = "initiator" if yate_dir == "incoming" else "recipient"
        rank = _RANK[operation]
        try:
            when = float(msg.get("time") or 0)
        except ValueError:
            when = 0.0
        legs = self.package.calls.setdefault(resource, {})
        old = legs.get(chan)
        if old is not None and (old[1] == 2 or (rank < old[1]) or (when and when < old[2])):
            return  # out of order: never go back
        other = (msg.get("called") if direction == "initiator" else msg.get("caller")) or ""
        state = _state(operation, msg.get("status") or "", direction)
        duration = None
        if state == "confirmed":
            dur = msg.get("billtime") or ""
            duration = int(float(dur)) if dur.replace(".", "", 1).isdigit() else None
        event = ""
        if state == "terminated":
            event = "remote-bye" if (msg.get("status") or "") == "answered" else "cancelled"
        try:
            dialog = di.Dialog(id=chan.replace("/", "-"), state=state, direction=direction,
                               call_id=msg.get("billid") or "",
                               local_identity=f"sip:{resource}",
                               remote_identity=f"sip:{other}@{domain}" if other else "",
                               event=event, duration=duration)
        except ValueError:
            return
        if old is not None and old[0] == dialog:
            return
        legs[chan] = (dialog, rank, when)
        self.counters[state] += 1
        self.package.changed(resource)
        if state == "terminated":
            import asyncio
            asyncio.get_running_loop().call_later(LINGER, self._forget, resource, chan)

    def _forget(self, resource: str, chan: str) -> None:
        legs = self.package.calls.get(resource)
        if not legs or chan not in legs or legs[chan][1] != 2:
            return
        del legs[chan]
        if not legs:
            del self.package.calls[resource]
        self.package.changed(resource)
