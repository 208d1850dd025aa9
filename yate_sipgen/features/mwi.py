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

With ``unsolicited``, phones that never subscribe (Polycom, Cisco, Yealink set up for it) get
the lamp anyway: an out-of-dialog NOTIFY (RFC 3842 allows one without a subscription) to each
registered contact of the user, after each REGISTER when there is something to tell (counts
known, or instant messages stored) and whenever the counts change; never to a user who has a
message-summary subscription of their own (that one gets the in-dialog NOTIFY). The bindings
are the MESSAGE feature's view of ``user.register`` (:mod:`.registrations`), the NOTIFY goes
through the core's queue (its cap on NOTIFYs in flight, coalescing per contact), and one that
fails is logged and counted, never retried: the next REGISTER or change sends the lamp again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import config as config_mod
from ..bodies import message_summary as ms
from ..config import Declarations
from ..events.notifier import dispatch_notify, unsolicited_params
from ..events.package import EventPackage
from ..events.subscription import Subscription
from ..message import Message
from ..sip import HeaderValueError, header_safe, new_call_id, new_tag, parse_uri
from .events import package_keys
from .registrations import Binding, Registrations

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
key(S, "unsolicited", "bool", False,
    "Also light the lamp of registered phones that do not subscribe (unsolicited NOTIFY, for "
    "phones set up to expect it: Polycom, Cisco, Yealink): to every contact the user "
    "registered, after each REGISTER when the user's counts are known or instant messages are "
    "stored for them (a user Yate never gave counts for gets nothing), and whenever the counts "
    "change. Never to a user with a message-summary subscription of their own. A failed one is "
    "counted (mwi.unsolicited_failed), not retried.")

#: Characters that may not stand in a URI we put between < and > in a header of our own.
_URI_UNSAFE = frozenset('<>" \t')


def _safe_uri(text: str) -> str | None:
    """``text`` if it is a SIP URI that can go into a header as ``<text>``, else None."""
    try:
        header_safe(text)
    except HeaderValueError:
        return None
    if not text or _URI_UNSAFE.intersection(text) or parse_uri(text) is None:
        return None
    return text


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
        await self.count_texts(sub.resource)

    async def count_texts(self, resource: str) -> None:
        """Count ``resource``'s stored instant messages (``text_messages``); a new count is a
        new document (the store changes without telling us)."""
        if self.cfg.get("text_messages"):
            before = self.core.text_counts(resource)
            await self.core.count_texts(resource)
            if self.core.text_counts(resource) != before:
                self.invalidate(resource)

    def account(self, resource: str) -> str:
        """The Message-Account URI of ``resource``'s mailbox."""
        user, _, domain = resource.rpartition("@")
        tmpl = self.cfg.get("account") or "sip:${user}@${domain}"
        return tmpl.replace("${user}", user).replace("${domain}", domain)

    def document(self, resource: str, variant: Any) -> str:
        """The same summary for every watcher of the mailbox (and its unsolicited NOTIFYs)."""
        counts = self.counts.get(resource, ms.Counts())
        texts = self.core.text_counts(resource) if self.cfg.get("text_messages") else 0
        if texts:
            counts = ms.Counts(counts.voice_new, counts.voice_old, counts.voice_urgent_new,
                               counts.voice_urgent_old, text_new=texts)
        try:
            return ms.render(self.account(resource), counts)
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
        self.registrations: Registrations | None = None  # with unsolicited: who is where

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
        if cfg[S]["unsolicited"]:
            self._observe_registrations(app)

    def _observe_registrations(self, app: Any) -> None:
        """Use the MESSAGE feature's table of bindings (fed by its user.register watch);
        feed it ourselves only when that feature is off and nothing else does."""
        regs = getattr(app.feature("message"), "registrations", None)
        if regs is None:
            regs = Registrations(self.core.user_key)
        regs.observe(app.engine)
        regs.listen(self.on_registered)
        self.registrations = regs

    def reconfigure(self, cfg: config_mod.Config) -> None:
        pass

    def status(self) -> dict[str, Any]:
        if self.registrations is None:
            return {}
        return {"mwi_unsolicited_sent": self.counters["unsolicited_sent"]}

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
        pkg.changed(resource)
        await self.core.outbox_written()  # what the caller answers is owed on disk first
        if self.registrations is not None:
            self.unsolicited(resource, self.registrations.bindings(resource))
        return True

    # -- unsolicited NOTIFYs ------------------------------------------------------------
    def on_registered(self, key: str, binding: Binding) -> None:
        """A REGISTER Yate accepted (the registrations table's listener)."""
        pkg = self.package
        if not pkg.enabled or not self.core.ready:  # counts are known once the core started
            return
        if key in pkg.counts or pkg.cfg.get("text_messages"):  # else: nothing to tell
            self.app.engine.spawn(self._after_register(key, binding),
                                  f"unsolicited MWI to {key}")

    async def _after_register(self, key: str, binding: Binding) -> None:
        pkg = self.package
        await pkg.count_texts(key)
        if key in pkg.counts or (pkg.cfg.get("text_messages") and self.core.text_counts(key)):
            self.unsolicited(key, [binding])

    def subscribed(self, key: str) -> bool:
        """Has ``key`` a message-summary subscription of their own (then no unsolicited)?"""
        return any(s.subscriber == key for s in self.core.table.watchers(self.package.event, key))

    def unsolicited(self, key: str, bindings: list[Binding]) -> int:
        """Queue an unsolicited NOTIFY of ``key``'s mailbox to each of ``bindings`` (one per
        contact at a time: a newer change before it left is sent instead); how many."""
        if not bindings or self.subscribed(key):
            return 0
        sched, now = self.core.sched, time.time()
        for b in bindings:
            async def job(b: Binding = b) -> None:
                await self._send_unsolicited(key, b)
            sched.mark_job(f"mwi:{key} {b.target.callto}", job, now, self.package.interval)
        self.core._kick()  # the core's NOTIFY pump: the job waits its turn under the cap
        return len(bindings)

    async def _send_unsolicited(self, key: str, b: Binding) -> None:
        """One unsolicited NOTIFY, with the mailbox as it is when its turn comes."""
        pkg, core = self.package, self.core
        if self.subscribed(key):
            return  # it subscribed meanwhile: the in-dialog NOTIFY tells it
        uri, aor = _safe_uri(b.target.uri), _safe_uri(f"sip:{key}")
        if uri is None or aor is None:
            self.counters["unsolicited_invalid"] += 1
            log.warning("no unsolicited NOTIFY to %r for %r: not a usable URI",
                        b.target.callto, key)
            return
        await pkg.count_texts(key)
        contact = core.cfg.get("contact") or ""
        stream = b.transport in ("TCP", "TLS")
        params = unsolicited_params(
            event=pkg.event, uri=uri, to_uri=aor, from_uri=_safe_uri(pkg.account(key)) or aor,
            from_tag=new_tag(), call_id=new_call_id(key.rpartition("@")[2]),
            content_type=pkg.content_types[0], body=pkg.rendered(key),
            # TCP/TLS: the REGISTER's connection; UDP: where it came from (NAT)
            host="" if stream else b.host, port="" if stream else b.port,
            connection_id=b.target.connection_id if stream else "",
            contact=f"<{contact}>" if _safe_uri(contact) else "",
            trans_count=core.cfg.get("trans_count", -1))
        code, error = await dispatch_notify(self.app.engine, params,
                                            core.cfg.get("notify_timeout", 40))
        if 200 <= code < 300:
            self.counters["unsolicited_sent"] += 1
            return
        self.counters["unsolicited_failed"] += 1
        log.info("unsolicited NOTIFY of %s's mailbox to %s failed: %s (not retried)", key, uri,
                 code or error or "no answer")

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
