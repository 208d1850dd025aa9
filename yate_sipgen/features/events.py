"""SUBSCRIBE/NOTIFY (RFC 6665): the subscription core every event package shares.

``sip.subscribe`` is installed once; the ``Event`` header picks the package. What is answered:

* no or malformed Event -> 400; a package we do not serve -> 489 with ``Allow-Events``;
* ``Accept`` allowing none of the package's types -> 406;
* Expires: the package default when absent, shortened to ``max_expires``, never lengthened;
  below ``min_expires`` -> 423 with ``Min-Expires``;
* a Request-URI host we do not serve -> 403; a watcher the package's rules refuse -> 403;
* in-dialog (To tag) for a subscription we do not have -> 481;
* otherwise 200 with ``Expires`` and ``Contact``, answered *before* the NOTIFY goes out (the
  answer never waits for a NOTIFY); the subscription is in the store when the 200 leaves.

NOTIFYs go through :class:`~yate_sipgen.events.notifier.NotifyScheduler` (cap, coalescing,
pacing) as ``xsip.generate wait=true``, one per subscription at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any

from .. import config as config_mod
from ..config import Declarations
from ..errors import DispatchCancelled, DispatchTimeout, LocalProtocolError
from ..events import notifier as nt
from ..events.notifier import NotifyScheduler, notify_params
from ..events.package import WATCH_POLICIES, EventPackage
from ..events.store import EventStore
from ..events.subscription import (ACTIVE, PENDING, TERMINATED, Reservation, SubscribeError,
                                   Subscription, SubscriptionTable, accepts, negotiate_expires,
                                   parse_event)
from ..message import Message
from ..sip import (HeaderValueError, format_name_addr, header_safe, parse_name_addr,
                   parse_uri)
from ..store import AsyncStore, new_owner
from .domains import Domains
from .identity import requester, trusted_lines

log = logging.getLogger("yate_sipgen.events")

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()
key = CONFIG.key

S = "events"
CONFIG.docs[S] = (
    "SIP events (SUBSCRIBE/NOTIFY, RFC 6665): what every event package shares. Needs "
    "ysipchan.conf [methods] subscribe=... and [general] initial_headers=yes (for the Route "
    "set). The packages have sections of their own: [presence], [dialog], [message-summary], "
    "[winfo].")
key(S, "enable", "bool", True,
    "Handle SIP SUBSCRIBE (sip.subscribe). Used only at start.")
key(S, "priority", "int", 50,
    "Priority of our sip.subscribe handler: below 100, so it comes before Yate's own "
    "sipfeatures module (better: do not load sipfeatures).", minimum=0, maximum=1000)
key(S, "auth", "choice", "required",
    "required: only SUBSCRIBEs Yate authenticated (ysipchan.conf [methods] subscribe=yes) or "
    "that came from one of [message] trusted_lines may watch others; optional: unauthenticated watchers are judged by the package rules alone "
    "(with subscribe=no Yate authenticates nobody).", choices=("required", "optional"))
key(S, "min_expires", "int", 60,
    "Shortest subscription in seconds; a shorter Expires gets 423 with Min-Expires.",
    minimum=1, maximum=86400)
key(S, "max_expires", "int", 3600,
    "Longest subscription in seconds; a longer Expires is shortened to this.",
    minimum=60, maximum=604800)
key(S, "contact", "str", "",
    "Contact URI of our 200 and NOTIFYs (where the phone sends in-dialog requests), e.g. "
    "sip:sipgen@192.0.2.10:5060. Empty: sip:<user>@<Request-URI host:port>. ';transport=tcp' "
    "(or tls) is added for subscriptions that came over TCP (TLS).")
key(S, "max_in_flight", "int", 20,
    "NOTIFYs waiting on Yate at once, all packages together. Each holds a Yate engine worker "
    "until its transaction ends (about 7.5 s for a dead UDP contact): keep it well below "
    "yate.conf maxworkers.", minimum=1, maximum=1000)
key(S, "notify_timeout", "int", 40,
    "Seconds to wait for Yate's answer to one NOTIFY (xsip.generate wait=true).",
    minimum=1, maximum=300)
key(S, "trans_count", "int", -1,
    "Retransmissions of a NOTIFY over UDP (xsip_trans_count); -1: Yate's default. Fewer ends "
    "a NOTIFY to a dead contact sooner, freeing its Yate worker.", minimum=-1, maximum=10)
key(S, "database", "path", "",
    "SQLite file of subscriptions and publications. Empty: events.db in [general] state_dir. "
    "Used only at start.")


def package_keys(decl: Declarations, section: str, doc: str, *, expires: int, watchers: str,
                 min_interval: float = 0.0, event: str = "") -> None:
    """Declare in ``decl`` the keys every package section has (``event``: when the package's
    name is not its section's)."""
    key = decl.key
    decl.docs[section] = doc
    key(section, "enable", "bool", True, f"Serve Event: {event or section}. Used only at start.")
    key(section, "expires", "int", expires,
        "Subscription length in seconds when the SUBSCRIBE has no Expires (capped by [events] "
        "max_expires).", minimum=1, maximum=604800)
    key(section, "watchers", "choice", watchers,
        "Who may subscribe to a user's state. self: only the user. domain: users of the same "
        "domain. authenticated: any authenticated user. any: anyone (even unauthenticated). "
        "approve: pending until approved with 'sipgen approve'. A user may always watch "
        "themselves.", choices=WATCH_POLICIES)
    key(section, "allow", "list", (),
        "Watchers (user@domain, * and ? patterns) always allowed, whatever 'watchers' says.")
    key(section, "deny", "list", (), "Watchers (patterns) always refused (403).")
    if min_interval:
        key(section, "min_interval", "float", min_interval,
            "Least seconds between two state-change NOTIFYs to one subscriber (the first "
            "NOTIFY and the final one are never delayed).", minimum=0, maximum=3600)


def refuse(msg: Message, err: SubscribeError, counters: Any, method: str) -> bool:
    """Answer a SUBSCRIBE or PUBLISH we refuse: the code, its headers (``osip_*``), counted
    and logged."""
    msg["code"] = str(err.code)
    for h, v in err.headers.items():
        msg["osip_" + h] = v
    counters[f"{method.lower()}_{err.code}"] += 1
    log.info("%s from %s for %s refused %d: %s", method, msg.get("caller", "?"),
             msg.get("sip_uri", "?"), err.code, err.reason)
    return True


def _first_hop(route: str) -> tuple[str, str]:
    """Host and port of the first Route entry (where a NOTIFY with a Route set goes)."""
    first = route.split(",")[0].strip()
    na = parse_name_addr(first)
    if na is None:
        return "", ""
    return na.uri.host, str(na.uri.port) if na.uri.port else ""


def _release_memory() -> None:
    """Give the heap that reading many rows used back to the system (glibc keeps it)."""
    try:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


class EventsFeature:
    """The subscription core: one table, one expiry timer, one NOTIFY queue."""

    name = "events"
    config = CONFIG

    def __init__(self) -> None:
        self.packages: dict[str, EventPackage] = {}
        self.table = SubscriptionTable()
        self.sched = NotifyScheduler()
        self.reserve = Reservation()
        self.cfg: dict[str, Any] = {}
        self.app: Any = None
        self.engine: Any = None
        self.counters: Any = None
        self.store: AsyncStore | None = None
        self.owner = new_owner()
        self._finals: dict[str, Subscription] = {}  # terminated, their last NOTIFY queued
        self._failures: dict[str, int] = {}  # transport failures in a row
        # outbox rows to delete: (id, when the NOTIFY that settles them was rendered)
        self._due_done: list[tuple[str, float]] = []
        #: The latest outbox write (``mark_due``) not known to be committed: a NOTIFY waits
        #: for it, so no NOTIFY leaves before the row that makes a restart resend it.
        self._outbox_write: asyncio.Future[Any] | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._wake: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._approvals: dict[tuple[str, str, str], str] = {}
        self.started = False
        self.ready = False  # the store is read and every package has its state back
        self._texts: dict[str, int] = {}
        self.domains = Domains()
        self.trusted: frozenset[str] = frozenset()  # [message] trusted_lines

    # -- registration of packages (called by their features' setup) ---------------------------
    def register(self, package: EventPackage) -> None:
        package.core = self
        self.packages[package.event] = package

    @property
    def runid(self) -> str:
        """Yate's engine.runid (empty until Yate answered our query)."""
        return getattr(self.app, "runid", "") if self.app is not None else ""

    @property
    def auth_required(self) -> bool:
        return self.cfg.get("auth", "required") == "required"

    def approval(self, event: str, watcher: str, resource: str) -> str:
        return self._approvals.get((event, watcher, resource), "")

    # -- --check -----------------------------------------------------------------------------
    @classmethod
    def sip_methods(cls, cfg: config_mod.Config) -> dict[str, str]:
        e = cfg["events"]
        if not e["enable"]:
            return {}
        return {"subscribe": "yes" if e["auth"] == "required" else "no"}

    @classmethod
    def ysipchan_sections(cls, cfg: config_mod.Config) -> dict[str, list[str]]:
        if not cfg["events"]["enable"]:
            return {}
        return {"general": [
            "; the SUBSCRIBE's Record-Route reaches us only with initial_headers (the NOTIFY's "
            "Route set)", "initial_headers=yes",
            "; a PIDF PUBLISH or NOTIFY is larger than one 1500-byte UDP packet", "maxpkt=4096"]}

    @classmethod
    def yate_notes(cls, cfg: config_mod.Config) -> list[str]:
        e = cfg["events"]
        if not e["enable"]:
            return []
        notes = ["do not load Yate's sipfeatures module (modules/server/sipfeatures: it "
                 "installs sip.subscribe at 100), or keep [events] priority below 100"]
        if e["auth"] == "optional":
            notes.append("subscribe=no: Yate authenticates no SUBSCRIBE and no 'username' "
                         "arrives: watchers=authenticated refuses everyone, and domain/approve "
                         "rules then trust the From header")
        return notes

    # -- Feature protocol ---------------------------------------------------------------------
    def setup(self, app: Any) -> None:
        self.app = app
        self.engine = app.engine
        self.counters = app.stats.feature("events")
        self.state_dir = app.config["general"]["state_dir"]
        if not app.config["events"]["enable"]:
            return
        e = app.config["events"]
        self.engine.add_handler("sip.subscribe", self.on_subscribe, priority=e["priority"],
                                owner="events")
        c = app.console
        c.command("subscriptions", "[user@domain]", "list active subscriptions (watcher, "
                  "package, state, expires)")(self.cmd_subscriptions)
        c.command("approve", "<watcher> <user@domain> [package]",
                  "let a pending watcher see a user's state")(self.cmd_approve)
        c.command("deny", "<watcher> <user@domain> [package]",
                  "refuse a watcher (ends its subscription)")(self.cmd_deny)
        self.cfg = dict(e)
        self._open_store()

    def reconfigure(self, cfg: config_mod.Config) -> None:
        self.cfg = dict(cfg["events"])
        self.sched.max_in_flight = self.cfg["max_in_flight"]
        msg_cfg = cfg["message"]
        self.domains = Domains.from_config(msg_cfg)
        self.trusted = trusted_lines(msg_cfg["trusted_lines"])  # the lines MESSAGE trusts
        for pkg in self.packages.values():
            pkg.configure(dict(cfg[pkg.section]))

    def status(self) -> dict[str, Any]:
        if not self.cfg.get("enable"):
            return {}
        out: dict[str, Any] = {"subscriptions": len(self.table),
                               "notify_queued": len(self.sched),
                               "notify_inflight": len(self.sched.in_flight)}
        for pkg in self.packages.values():
            out.update(pkg.status())
        return out

    def _open_store(self) -> None:
        """Open the store in its own thread at once (a SUBSCRIBE that comes before it is open
        waits behind the opening); what it holds is read there too."""
        path = self.cfg["database"] or os.path.join(self.state_dir, "events.db")
        found = self._found = {"subs": [], "approvals": {}, "due": set()}

        def opener() -> EventStore:
            st = EventStore(path)
            found["subs"] = st.load_subscriptions()
            found["approvals"] = st.load_state("approvals")
            found["due"] = st.load_due()
            return st

        self._path = path
        self.store = AsyncStore(opener)

    async def start(self) -> None:
        self.started = True
        if not self.cfg.get("enable"):
            return
        if self.store is None:
            self._open_store()
        try:
            await self.store.opened()
        except Exception as e:
            log.error("cannot open the event store %s: %s; subscriptions are not kept",
                      self._path, e)
            self.store = None
        found = self._found
        for k, v in found.get("approvals", {}).items():
            ev, _, rest = k.partition(" ")
            watcher, _, resource = rest.partition(" ")
            self._approvals[(ev, watcher, resource)] = v
        for pkg in self.packages.values():
            if pkg.enabled:
                try:
                    await pkg.start()
                except Exception:  # noqa: BLE001 - one package's state must not stop the rest
                    log.exception("restoring the state of %s failed", pkg.event)
        self._restore(found.pop("subs", []), found.pop("due", set()))
        self.ready = True

    def _restore(self, subs: list[Subscription], due: set[str] = frozenset()) -> None:
        """Take back the stored subscriptions; those with an outbox row (a state change
        whose NOTIFY had not gone through when we stopped) get it now."""
        now = time.time()
        dead: list[str] = []
        owed = 0
        for sub in subs:
            pkg = self.packages.get(sub.package)
            if pkg is None or not pkg.enabled or sub.expires_at <= now:
                dead.append(sub.id)  # over while we were down: the subscriber knows
                continue
            if sub.connection_id and sub.connection_id != "general" and sub.transport in (
                    "TCP", "TLS") and (not self.runid or sub.runid != self.runid):
                dead.append(sub.id)  # a TCP connection of an earlier Yate run is gone
                continue
            self.table.add(sub)
            pkg.on_subscribed(sub)
            if sub.id in due:
                self.sched.mark(sub.id, now, interval=pkg.interval)
                owed += 1
        if owed:
            log.info("%d NOTIFY(s) owed from before the restart", owed)
            self._kick()
        if dead and self.store is not None:
            self.engine.spawn(self.store.delete_subscriptions(dead), "dropping old subscriptions")
        if subs:
            log.info("restored %d subscription(s), dropped %d", len(self.table), len(dead))
            _release_memory()
        self._arm_expiry()

    async def close(self) -> None:
        for h in (self._wake, self._expiry_timer):
            if h is not None:
                h.cancel()

    # -- helpers ------------------------------------------------------------------------
    def user_key(self, user: str, host: str) -> str:
        return self.domains.user_key(user, host)

    def default_domain(self) -> str:
        """The main domain (the first of [message] domains), or ""."""
        return self.domains.main

    def text_counts(self, resource: str) -> int:
        """Stored instant messages waiting for ``resource`` (as last counted)."""
        return self._texts.get(resource, 0)

    async def count_texts(self, resource: str) -> None:
        msg = self.app.feature("message") if self.app is not None else None
        store = getattr(msg, "store", None)
        if store is None or not store.is_open:
            return
        try:
            self._texts[resource] = await store.count(resource)
        except Exception:  # noqa: BLE001 - the lamp must not fail because of the IM store
            pass

    def serves(self, host: str) -> bool:
        return self.domains.serves(host)

    def _contact(self, msg: Message, user: str, ruri: Any) -> str:
        base = self.cfg.get("contact") or ""
        if not base:
            host = f"[{ruri.host}]" if ":" in ruri.host else ruri.host
            base = f"sip:{user or 'sipgen'}@{host}" + (f":{ruri.port}" if ruri.port else "")
        transport = (msg.get("ip_transport") or "").upper()
        if transport in ("TCP", "TLS") and ";transport=" not in base.lower():
            base += ";transport=" + transport.lower()
        return f"<{header_safe(base)}>"

    # -- sip.subscribe ------------------------------------------------------------------
    async def on_subscribe(self, msg: Message) -> bool:
        try:
            return await self._subscribe(msg)
        except SubscribeError as e:
            return refuse(msg, e, self.counters, "SUBSCRIBE")

    async def _subscribe(self, msg: Message) -> bool:
        self.counters["subscribe"] += 1
        raw_event = msg.get("sip_event")
        ev = parse_event(raw_event)
        if ev is None:
            raise SubscribeError(400, "missing Event header" if not raw_event
                                 else "malformed Event header")
        pkg = self.packages.get(ev.package)
        if pkg is None or not pkg.enabled:
            raise SubscribeError(489, f"event package {ev.package!r} not served",
                                 Allow_Events=self.allow_events())
        expires = negotiate_expires(msg.get("sip_expires"), pkg.default_expires,
                                    self.cfg["min_expires"], self.cfg["max_expires"])
        ctype = accepts(msg.get("sip_accept"), pkg.content_types)
        if ctype is None:
            raise SubscribeError(406, f"Accept allows none of {', '.join(pkg.content_types)}",
                                 Accept=", ".join(pkg.content_types))
        to_hdr = parse_name_addr(msg.get("sip_to") or "")
        if to_hdr is None:
            raise SubscribeError(400, "unparsable To")
        call_id = msg.get("sip_callid") or ""
        if to_hdr.tag:
            return await self._in_dialog(msg, pkg, ev.id, call_id, to_hdr.tag, expires)
        return await self._initial(msg, pkg, ev.id, call_id, expires, ctype, to_hdr)

    def allow_events(self) -> str:
        return ", ".join(p.event for p in self.packages.values() if p.enabled)

    def _dialog_fields(self, msg: Message) -> dict[str, str]:
        """Target, Route set and next hop from a SUBSCRIBE (initial or refresh)."""
        contact = parse_name_addr(msg.get("sip_contact") or "")
        if contact is None:
            raise SubscribeError(400, "missing or unparsable Contact")
        routes = msg.getall("sipheader_record-route")
        route = ", ".join(r.strip() for r in routes if r.strip())
        try:
            target = header_safe(str(contact.uri))
            header_safe(route)
        except HeaderValueError as e:
            raise SubscribeError(400, str(e)) from None
        transport = (msg.get("ip_transport") or "UDP").upper()
        host = port = ""
        if route:
            host, port = _first_hop(route)
        elif transport == "UDP":
            # behind NAT the Contact may be unreachable: answer where the SUBSCRIBE came from
            host, port = msg.get("ip_host") or "", msg.get("ip_port") or ""
        conn = msg.get("connection_id") or ""
        return {"target": target, "route": route, "host": host, "port": port,
                "transport": transport,
                "connection_id": conn if transport in ("TCP", "TLS") else ""}

    async def _initial(self, msg: Message, pkg: EventPackage, event_id: str, call_id: str,
                       expires: int, ctype: str, to_hdr: Any) -> bool:
        ruri = parse_uri(msg.get("sip_uri") or "")
        if ruri is None or not ruri.user:
            raise SubscribeError(404 if ruri else 400, "no user in the Request-URI")
        if not self.serves(ruri.host):
            raise SubscribeError(403, f"{ruri.host} is not a domain we serve")
        frm = parse_name_addr(msg.get("sip_from") or "")
        if frm is None or not frm.tag:
            raise SubscribeError(400, "From without a tag")
        if not call_id:
            raise SubscribeError(400, "no Call-ID")
        # the identity Yate checked (a username over a different From user), or a trusted line's
        who = requester(msg, frm, self.trusted, self.auth_required, True,
                        "[events] auth=required")
        watcher = self.user_key(who.user, frm.uri.host)
        resource = pkg.map_resource(ruri.user, ruri.host, watcher) or \
            self.user_key(ruri.user, ruri.host)
        decision = pkg.may_watch(watcher, resource, who.vouched)
        if isinstance(decision, int):
            raise SubscribeError(decision, f"{watcher} may not watch {resource} ({pkg.event})")
        fields = self._dialog_fields(msg)
        try:
            local_uri = format_name_addr(str(to_hdr.uri), to_hdr.display)
            remote = header_safe(msg.get("sip_from") or "")
            header_safe(call_id)
        except HeaderValueError as e:
            raise SubscribeError(400, str(e)) from None
        now = time.time()
        sub = Subscription(
            id=secrets.token_hex(8), package=pkg.event, event_id=event_id, resource=resource,
            resource_uri=f"sip:{resource}", subscriber=watcher, call_id=call_id,
            local_tag=msg.get("xsip_dlgtag") or secrets.token_hex(6),
            local_uri=local_uri, remote=remote, content_type=ctype, state=decision,
            expires_at=now + expires, authenticated=who.vouched, owner=self.owner,
            runid=self.runid, **fields)
        sub.contact = self._contact(msg, ruri.user, ruri)
        msg["osip_Expires"] = str(expires)
        msg["osip_Contact"] = sub.contact
        msg["code"] = "200"
        if expires == 0:
            # a fetch (RFC 6665 §4.4.3): the state once, nothing kept
            sub.state, sub.reason = TERMINATED, "timeout"
            self.engine.answer_now(msg)
            self._queue_final(sub)
            self.counters["fetch"] += 1
            return True
        self.reserve.next_cseq(sub)  # reserve the first block before the row is written
        sub.cseq -= 1
        if self.store is not None:
            await self.store.save_subscription(sub, due=now)
        self.table.add(sub)
        self.engine.answer_now(msg)
        self.counters["subscribed"] += 1
        if decision == PENDING:
            self.counters["pending"] += 1
        log.info("%s subscribed to %s of %s for %ds (%s)", watcher, pkg.event, resource,
                 expires, decision)
        pkg.on_subscribed(sub)
        self.mark(sub, urgent=True, saved=True)
        self._watchers_changed(sub)
        self._arm_expiry()
        return True

    async def _in_dialog(self, msg: Message, pkg: EventPackage, event_id: str, call_id: str,
                         local_tag: str, expires: int) -> bool:
        sub = self.table.find(call_id, local_tag, pkg.event, event_id)
        if sub is None:
            raise SubscribeError(481, "no such subscription")
        now = time.time()
        if msg.get("sip_contact"):
            f = self._dialog_fields(msg)
            sub.target = f["target"]
            if f["transport"] == "UDP" and not sub.route:
                sub.host, sub.port = f["host"], f["port"]
            if f["connection_id"]:
                sub.connection_id = f["connection_id"]
                sub.runid = self.runid
        msg["osip_Expires"] = str(expires)
        msg["osip_Contact"] = sub.contact
        msg["code"] = "200"
        if expires == 0:
            self.table.remove(sub.id)
            self.sched.forget(sub.id)
            if self.store is not None:
                await self.store.delete_subscription(sub.id)
            self.engine.answer_now(msg)
            sub.state, sub.reason = TERMINATED, ""
            self._queue_final(sub)
            self._watchers_changed(sub)
            self.counters["unsubscribed"] += 1
            return True
        self.table.reschedule(sub, now + expires)
        if self.store is not None:
            await self.store.save_subscription(sub, due=now)
        self.engine.answer_now(msg)
        self.counters["refreshed"] += 1
        self.mark(sub, urgent=True, saved=True)  # RFC 6665 §4.2.1.2: a refresh gets one too
        self._arm_expiry()
        return True

    # -- state changes (packages call these) -------------------------------------------------
    def changed(self, package: str, resource: str) -> int:
        """``resource``'s state in ``package`` changed: NOTIFY its watchers (coalesced, paced).
        Returns how many subscriptions were marked."""
        subs = self.table.watchers(package, resource)
        pkg = self.packages[package]
        pkg.invalidate(resource)  # its document is rendered anew, once for all its watchers
        now = time.time()
        marked = []
        for sub in subs:
            if sub.state == ACTIVE:
                self.sched.mark(sub.id, now, interval=pkg.interval)
                marked.append(sub.id)
        if marked:
            self._owe(marked, now)
            self._kick()
        return len(subs)

    def _owe(self, ids: list[str], now: float) -> None:
        """Owed NOTIFYs as outbox rows, so a restart still sends them: written in the
        background, remembered for :meth:`outbox_written`."""
        if self.store is not None:
            self._outbox_write = self.engine.spawn(self.store.mark_due(ids, now), "outbox")

    async def outbox_written(self) -> None:
        """Until the outbox rows marked so far are committed: a NOTIFY waits for its row
        before it leaves, and a request whose change it records (a PUBLISH) before its
        answer, so a kill at any point leaves the row for the restart to resend. The store's
        one thread commits in order, so the latest write covers the earlier ones. A failed
        write is logged (by spawn) and waited for no longer."""
        written = self._outbox_write
        if written is not None and not written.done():
            await asyncio.wait((written,))  # not `await`: a cancelled waiter keeps the write

    def mark(self, sub: Subscription, urgent: bool = False, saved: bool = False) -> None:
        """``sub`` needs a NOTIFY; ``saved``: its outbox row is written already."""
        now = time.time()
        self.sched.mark(sub.id, now, urgent=urgent, interval=self.packages[sub.package].interval)
        if not saved:
            self._owe([sub.id], now)
        self._kick()

    def _watchers_changed(self, sub: Subscription) -> None:
        """``sub`` began, was approved or ended: packages whose state is the watchers of its
        package (presence.winfo) notify the watched user."""
        for pkg in self.packages.values():
            if pkg.enabled and getattr(pkg, "watches", "") == sub.package:
                self.changed(pkg.event, sub.resource)

    def _queue_final(self, sub: Subscription) -> None:
        """Send ``sub``'s last NOTIFY (terminated) even though the subscription is gone."""
        fid = "final:" + sub.id
        self._finals[fid] = sub
        self.sched.mark(fid, time.time(), urgent=True)
        self._kick()

    def end(self, sub: Subscription, reason: str) -> None:
        """End an active subscription from our side (expiry, a deny, the package is gone)."""
        if self.table.remove(sub.id) is None:
            return
        self.sched.forget(sub.id)
        sub.state, sub.reason = TERMINATED, reason
        if self.store is not None:
            self.engine.spawn(self.store.delete_subscription(sub.id), "deleting a subscription")
        self._queue_final(sub)
        self._watchers_changed(sub)

    # -- expiry -------------------------------------------------------------------------------
    def _arm_expiry(self) -> None:
        when = self.table.next_expiry()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if when is None:
            return
        delay = max(0.0, when - time.time())
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        now = time.time()
        gone = self.table.expired(now)
        for sub in gone:
            self.sched.forget(sub.id)
            sub.state, sub.reason = TERMINATED, "timeout"
            self.counters["expired"] += 1
            log.info("subscription of %s to %s of %s expired", sub.subscriber, sub.package,
                     sub.resource)
            self._queue_final(sub)
            self._watchers_changed(sub)
        if gone and self.store is not None:
            self.engine.spawn(self.store.delete_subscriptions([s.id for s in gone]),
                              "deleting expired subscriptions")
        self._arm_expiry()

    # -- the NOTIFY sender --------------------------------------------------------------------
    def _kick(self) -> None:
        if self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        now = time.time()
        for sid in self.sched.take(now):
            self.engine.spawn(self._send(sid), "NOTIFY")
        nxt = self.sched.next_wakeup()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if nxt is not None:
            self._wake = asyncio.get_running_loop().call_later(max(0.0, nxt - now) + 0.001,
                                                               self._pump)

    async def _send(self, sid: str) -> None:
        if sid in self.sched.jobs:  # a NOTIFY of no subscription (unsolicited message-summary)
            await self.sched.run_job(sid)
            self._kick()
            return
        final = sid.startswith("final:")
        sub = self._finals.get(sid) if final else self.table.get(sid)
        if sub is None:
            self.sched.done(sid, time.time())
            self._kick()
            return
        pkg = self.packages.get(sub.package)
        code, error = 0, ""
        rendered = 0.0
        try:
            marks_before = len(self.reserve.pending)
            cseq = self.reserve.next_cseq(sub)
            version = self.reserve.next_version(sub) if pkg is not None and pkg.numbered else 0
            if len(self.reserve.pending) > marks_before or self.reserve.pending:
                await self._save_marks()
            await self.outbox_written()
            now = rendered = time.time()
            body = ""
            if pkg is not None and sub.state != PENDING:
                await pkg.prepare(sub)
                body = pkg.body(sub, version)
            params = notify_params(sub, now, cseq, sub.content_type, body,
                                   sub.contact or self._default_contact(sub),
                                   self.cfg.get("trans_count", -1))
            self.counters["notify"] += 1
            code, error = await nt.dispatch_notify(self.engine, params,
                                                   self.cfg.get("notify_timeout", 40))
        # what preparing the body asked of Yate, failing as dispatch_notify says a send does
        except DispatchTimeout:
            code = 408
        except DispatchCancelled:
            error = "noconn"
        except LocalProtocolError as e:
            log.warning("cannot send NOTIFY for %s: %s", sub.resource, e)
            code = 500
        result = nt.outcome(code, error, self._failures.get(sid, 0))
        now = time.time()
        if result != nt.RETRY:
            self.sched.done(sid, now, pkg.interval if pkg is not None else 0.0)
        if final:
            if result == nt.RETRY:
                self._failures[sid] = self._failures.get(sid, 0) + 1
                self.sched.retry_at(sid, now + nt.TRANSPORT_RETRIES[self._failures[sid] - 1])
            else:
                self._finals.pop(sid, None)
                self._failures.pop(sid, None)
            self._kick()
            return
        if result != nt.RETRY and result != nt.REMOVE and rendered:
            self._settle_due(sid, rendered)
        if result == nt.OK:
            self._failures.pop(sid, None)
            self.counters["notify_ok"] += 1
        elif result == nt.REMOVE:
            self.counters[f"notify_{code or error}"] += 1
            log.info("NOTIFY to %s for %s got %s: subscription removed", sub.subscriber,
                     sub.resource, code or error)
            self._remove(sub)
        elif result == nt.RETRY:
            n = self._failures[sid] = self._failures.get(sid, 0) + 1
            self.counters["notify_retry"] += 1
            self.sched.retry_at(sid, now + nt.TRANSPORT_RETRIES[n - 1])
        else:
            self.counters[f"notify_{code or error or 'failed'}"] += 1
        self._kick()

    def _settle_due(self, sid: str, rendered: float) -> None:
        """The state as of ``rendered`` reached the subscriber (or it refused it for good
        reasons of its own): its outbox row goes, in one write for all settled this tick."""
        if self.store is None:
            return
        if not self._due_done:
            asyncio.get_running_loop().call_soon(self._flush_due)
        self._due_done.append((sid, rendered))

    def _flush_due(self) -> None:
        done, self._due_done = self._due_done, []
        if done and self.store is not None:
            self.engine.spawn(self.store.clear_due(done), "outbox")

    def _default_contact(self, sub: Subscription) -> str:
        base = self.cfg.get("contact") or f"sip:{sub.resource}"
        if sub.transport in ("TCP", "TLS") and ";transport=" not in base.lower():
            base += ";transport=" + sub.transport.lower()
        return f"<{base}>"

    async def _save_marks(self) -> None:
        pending, self.reserve.pending = self.reserve.pending, set()
        marks = [(s.cseq_mark, s.version_mark, s.id) for sid in pending
                 if (s := self.table.get(sid)) is not None]
        if marks and self.store is not None:
            await self.store.save_marks(marks)

    def _remove(self, sub: Subscription) -> None:
        """Gone for good (the subscriber said so with its answer): no final NOTIFY."""
        self.table.remove(sub.id)
        self.sched.forget(sub.id)
        self._failures.pop(sub.id, None)
        if self.store is not None:
            self.engine.spawn(self.store.delete_subscription(sub.id), "deleting a subscription")
        self._watchers_changed(sub)

    # -- console -------------------------------------------------------------------------------
    def cmd_subscriptions(self, args: list[str]) -> str:
        if not self.ready:
            return "The event store is still opening; try again in a moment\r\n"
        who = args[0].lower() if args else ""
        now = time.time()
        rows = [s for s in self.table
                if not who or who in (s.resource.lower(), s.subscriber.lower())]
        if not rows:
            return "No subscriptions" + (f" for {who}" if who else "") + "\r\n"
        rows.sort(key=lambda s: (s.resource, s.package, s.subscriber))
        out = [f"{'resource':<28} {'package':<16} {'watcher':<28} {'state':<8} expires"]
        for s in rows:
            out.append(f"{s.resource:<28} {s.event_header():<16} {s.subscriber:<28} "
                       f"{s.state:<8} {s.remaining(now)}")
        return "\r\n".join(out) + "\r\n"

    async def cmd_approve(self, args: list[str]) -> str:
        return await self._decide(args, "allow")

    async def cmd_deny(self, args: list[str]) -> str:
        return await self._decide(args, "deny")

    async def _decide(self, args: list[str], decision: str) -> str:
        if len(args) < 2:
            return "usage: <watcher user@domain> <user@domain> [package]\r\n"
        watcher, resource = args[0].lower(), args[1].lower()
        pkgs = [args[2]] if len(args) > 2 else list(self.packages)
        changed = 0
        for event in pkgs:
            if event not in self.packages:
                return f"no event package {event}\r\n"
            self._approvals[(event, watcher, resource)] = decision
            if self.store is not None:
                await self.store.set_state("approvals", f"{event} {watcher} {resource}",
                                           decision)
            for sub in self.table.watchers(event, resource):
                if sub.subscriber.lower() != watcher:
                    continue
                changed += 1
                if decision == "allow" and sub.state == PENDING:
                    sub.state = ACTIVE
                    self.mark(sub, urgent=True)
                    self._watchers_changed(sub)
                elif decision == "deny":
                    self.end(sub, "rejected")
        verb = "approved" if decision == "allow" else "denied"
        return f"{watcher} {verb} for {resource} ({changed} subscription(s) changed)\r\n"
