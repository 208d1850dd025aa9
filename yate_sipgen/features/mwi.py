"""message-summary (RFC 3842): the voicemail lamp.

Counts per mailbox (``user@domain``), from what a Yate actually sends:

* ``mwi`` messages (what Yate's ``subscription`` module consumes): ``notifier`` or ``user``,
  ``message-summary.voicenew`` / ``message-summary.voiceold``;
* ``user.notify`` / ``user.update`` that carry ``voicenew`` / ``voiceold`` (``register.cpp``);
* the console: ``sipgen mwi <user@domain> <new> <old>``;
* with ``text_messages``: the user's stored (undelivered) instant messages as ``Text-Message``.

The last counts are kept in the event store, so the first NOTIFY after a SUBSCRIBE or a restart
tells the truth. A SUBSCRIBE to a voicemail number (``mailbox_numbers``, e.g. ``*97``) or to
``<mailbox_prefix><user>`` (e.g. ``vm-123``) is for the subscriber's own or that user's mailbox.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import config as config_mod
from ..bodies import message_summary as ms
from ..config import Declarations
from ..events.package import EventPackage
from ..events.subscription import Subscription
from ..message import Message
from ..sip import parse_uri
from .events import package_keys

log = logging.getLogger("yate_sipgen.mwi")

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()
key = CONFIG.key

S = "message-summary"
package_keys(CONFIG, S, "Event: message-summary (RFC 3842): the message-waiting lamp, from Yate's mwi "
             "and user.notify messages, the console, and stored instant messages.",
             expires=3600, watchers="self")
key(S, "mailbox_numbers", "list", ("*97",),
    "Request-URI users that mean 'my own mailbox' (a phone subscribing to its voicemail "
    "number).")
key(S, "mailbox_prefix", "str", "vm-",
    "A Request-URI user '<prefix><user>' means that user's mailbox (vm-123 -> 123). Empty: "
    "off.")
key(S, "account", "str", "",
    "Message-Account URI in the body; ${user} and ${domain} are replaced. Empty: "
    "sip:<user>@<domain>.")
key(S, "text_messages", "bool", True,
    "Report the user's stored (not yet delivered) instant messages as Text-Message counts.")


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    v = value.strip()
    return int(v) if v.isdigit() else None


class MessageSummaryPackage(EventPackage):
    event = "message-summary"
    content_types = (ms.CONTENT_TYPE,)
    section = S

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, ms.Counts] = {}

    def map_resource(self, user: str, host: str, watcher: str) -> str | None:
        """The mailbox a SUBSCRIBE to ``user@host`` means (None: the plain user)."""
        if user in self.cfg.get("mailbox_numbers", ()):
            return watcher
        prefix = self.cfg.get("mailbox_prefix", "")
        if prefix and user.startswith(prefix) and len(user) > len(prefix):
            return self.core.user_key(user[len(prefix):], host)
        return None

    async def prepare(self, sub: Subscription) -> None:
        if self.cfg.get("text_messages"):
            await self.core.count_texts(sub.resource)

    def body(self, sub: Subscription, version: int) -> str:
        user, _, domain = sub.resource.rpartition("@")
        tmpl = self.cfg.get("account") or "sip:${user}@${domain}"
        account = tmpl.replace("${user}", user).replace("${domain}", domain)
        counts = self.counts.get(sub.resource, ms.Counts())
        texts = self.core.text_counts(sub.resource) if self.cfg.get("text_messages") else 0
        if texts:
            counts = ms.Counts(counts.voice_new, counts.voice_old, counts.voice_urgent_new,
                               counts.voice_urgent_old, text_new=texts)
        try:
            return ms.render(account, counts)
        except ValueError:
            return ms.render("", counts)  # a bad account template: leave the line out

    def status(self) -> dict[str, Any]:
        return {"mailboxes": len(self.counts)}

    async def start(self) -> None:
        store = self.core.store if self.core is not None else None
        if store is None:
            return
        for res, value in (await store.load_state(self.event)).items():
            try:
                self.counts[res] = ms.parse(value)
            except Exception:  # noqa: BLE001 - a damaged row: forget it, say so
                log.warning("ignoring unreadable stored counts of %s", res)


class MessageSummaryFeature:
    name = "message-summary"
    config = CONFIG

    def __init__(self) -> None:
        self.package = MessageSummaryPackage()
        self.core: Any = None

    @classmethod
    def yate_notes(cls, cfg: config_mod.Config) -> list[str]:
        return []

    def setup(self, app: Any) -> None:
        self.app = app
        self.core = app.feature("events")
        self.counters = app.stats.feature("mwi")
        cfg = app.config
        if self.core is None or not cfg["events"]["enable"] or not cfg[S]["enable"]:
            self.package.enabled = False
            return
        self.core.register(self.package)
        app.engine.watcher("mwi")(self.on_mwi)
        app.engine.watcher("user.notify")(self.on_user_notify)
        app.engine.watcher("user.update")(self.on_user_notify)
        app.console.command("mwi", "<user@domain> <new> <old>",
                            "set a user's voicemail counts (the message-waiting lamp)")(
            self.cmd_mwi)

    def reconfigure(self, cfg: config_mod.Config) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        pass  # the package's start runs inside the core's, once the store is open

    async def close(self) -> None:
        pass

    async def set_counts(self, resource: str, new: int, old: int) -> bool:
        """Record ``resource``'s voicemail counts; NOTIFY its watchers when they changed."""
        pkg = self.package
        prev = pkg.counts.get(resource, ms.Counts())
        counts = ms.Counts(new, old, prev.voice_urgent_new, prev.voice_urgent_old)
        if counts == prev:
            return False
        pkg.counts[resource] = counts
        if self.core.store is not None:
            await self.core.store.set_state(pkg.event, resource, ms.render("", counts))
        self.counters["updates"] += 1
        self.core.changed(pkg.event, resource)
        return True

    def _resource(self, msg: Message, *names: str) -> str | None:
        for n in names:
            v = msg.get(n) or ""
            if v:
                uri = parse_uri(v if ":" in v else "")
                if uri is not None and uri.user:
                    return self.core.user_key(uri.user, uri.host)
                user, _, domain = v.partition("@")
                domain = domain or msg.get("domain") or self.core.default_domain()
                if user and domain:
                    return self.core.user_key(user, domain)
        return None

    def on_mwi(self, msg: Message) -> Any:
        new = _count(msg.get("message-summary.voicenew"))
        old = _count(msg.get("message-summary.voiceold"))
        if new is None and old is None:
            return None
        res = self._resource(msg, "notifier", "user", "username")
        if res is None:
            return None
        prev = self.package.counts.get(res, ms.Counts())
        return self.set_counts(res, prev.voice_new if new is None else new,
                               prev.voice_old if old is None else old)

    def on_user_notify(self, msg: Message) -> Any:
        new, old = _count(msg.get("voicenew")), _count(msg.get("voiceold"))
        if new is None and old is None:
            return None
        res = self._resource(msg, "user", "username", "number")
        if res is None:
            return None
        prev = self.package.counts.get(res, ms.Counts())
        return self.set_counts(res, prev.voice_new if new is None else new,
                               prev.voice_old if old is None else old)

    async def cmd_mwi(self, args: list[str]) -> str:
        if len(args) != 3 or not args[1].isdigit() or not args[2].isdigit() or "@" not in args[0]:
            return "usage: mwi <user@domain> <new> <old>\r\n"
        user, _, domain = args[0].partition("@")
        res = self.core.user_key(user, domain)
        changed = await self.set_counts(res, int(args[1]), int(args[2]))
        n = len(self.core.table.watchers(self.package.event, res))
        return (f"{res}: {args[1]} new, {args[2]} old"
                + (f"; {n} subscriber(s) notified" if changed else " (unchanged)") + "\r\n")
