"""Presence (RFC 3856, PIDF RFC 3863) with PUBLISH (RFC 3903).

State of a presentity = its live publications, oldest first. Watchers get: the one publication
byte for byte; several composed into one PIDF document (:func:`bodies.pidf.compose`); none:
a ``closed`` document, or with ``from_registrations`` open/closed from the user's REGISTERs
(their expiry tracked here: regfile expires bindings silently).

PUBLISH answers: 200 with a new ``SIP-ETag`` and ``Expires``; 412 for an unknown
``SIP-If-Match``; 400 for an initial PUBLISH without a body or a malformed PIDF (DOCTYPE and
entity declarations refused); 413 too large; 415 not ``application/pidf+xml``; 423 too short;
489 another event; 403 for someone else's presence (``publishers``). The publication is in the
store before the 200 leaves; NOTIFYs follow through the subscription core's queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import config as config_mod
from ..bodies import pidf
from ..bodies.xml import BodyError
from ..config import Declarations
from ..events.package import EventPackage
from ..events.publication import INITIAL, MODIFY, REFRESH, REMOVE, PublicationTable, new_etag
from ..events.store import Publication
from ..events.subscription import SubscribeError, negotiate_expires, parse_event
from ..message import Message
from ..sip import media_type, parse_name_addr, parse_uri
from .events import package_keys, refuse
from .identity import requester

log = logging.getLogger("yate_sipgen.presence")

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()
key = CONFIG.key

S = "presence"
package_keys(CONFIG, S, "Event: presence (RFC 3856): watchers get the PIDF documents users PUBLISH "
             "(RFC 3903). Needs ysipchan.conf [methods] subscribe=... and publish=...",
             expires=3600, watchers="domain", min_interval=5.0)
key(S, "publish", "bool", True,
    "Accept PUBLISH of presence (sip.publish; ysipchan.conf [methods] publish=...). Used only "
    "at start.")
key(S, "publishers", "choice", "self",
    "Who may PUBLISH a user's presence. self: only the user (the authenticated username, or "
    "the From user of a [message] trusted_lines line, must be the Request-URI user). "
    "authenticated: any authenticated user or trusted line. any: anyone (no authentication: "
    "ysipchan.conf [methods] publish=no).",
    choices=("self", "authenticated", "any"))
key(S, "publish_priority", "int", 50, "Priority of our sip.publish handler.", minimum=0,
    maximum=1000)
key(S, "max_body", "int", 16384, "Largest PIDF document in bytes (413 above).", minimum=256,
    maximum=60000)
key(S, "publish_expires", "int", 3600,
    "Publication lifetime in seconds when the PUBLISH has no Expires (capped by [events] "
    "max_expires).", minimum=1, maximum=604800)
key(S, "from_registrations", "bool", False,
    "When nothing is published: open while the user is registered (from user.register / "
    "user.unregister and the registration's Expires), closed otherwise. false: closed.")


class PresencePackage(EventPackage):
    event = "presence"
    content_types = (pidf.CONTENT_TYPE,)
    section = S

    def __init__(self) -> None:
        super().__init__()
        self.pubs = PublicationTable()
        self.registered: dict[str, float] = {}  # user@domain -> registration expiry
        self.feature: Any = None  # the PresenceFeature serving PUBLISH (its expiry timer)

    def document(self, resource: str, variant: Any) -> str:
        """The same PIDF for every watcher: rendered once per change (:meth:`changed`)."""
        entity = f"sip:{resource}"
        docs = [p.body for p in self.pubs.of(self.event, resource)]
        if docs:
            return pidf.compose(entity, docs)
        if self.cfg.get("from_registrations"):
            return pidf.open_or_closed(entity, self.registered.get(resource, 0) > time.time())
        return pidf.closed(entity)

    def status(self) -> dict[str, Any]:
        return {"publications": len(self.pubs)}

    async def start(self) -> None:
        store = self.core.store if self.core is not None else None
        if store is None:
            return
        now = time.time()
        for pub in await store.load_publications():
            if pub.package == self.event and pub.expires_at > now:
                self.pubs.add(pub)
            else:
                await store.delete_publication(pub.etag)
        if self.feature is not None:
            self.feature._arm()


class PresenceFeature:
    """Registers the presence package with the core and serves PUBLISH."""

    name = "presence"
    config = CONFIG

    def __init__(self) -> None:
        self.package = PresencePackage()
        self.package.feature = self
        self.core: Any = None
        self.engine: Any = None
        self.counters: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._reg_timer: asyncio.TimerHandle | None = None

    @classmethod
    def sip_methods(cls, cfg: config_mod.Config) -> dict[str, str]:
        p = cfg[S]
        if not (cfg["events"]["enable"] and p["enable"] and p["publish"]):
            return {}
        return {"publish": "no" if p["publishers"] == "any" else "yes"}

    @classmethod
    def yate_notes(cls, cfg: config_mod.Config) -> list[str]:
        p = cfg[S]
        if not (cfg["events"]["enable"] and p["enable"] and p["publish"]):
            return []
        if p["publishers"] == "any":
            return ["publish=no: anyone may PUBLISH anyone's presence ([presence] "
                    "publishers=any); keep it for trusted networks only"]
        return ["publish=yes: Yate challenges PUBLISH; the 'username' must be the "
                "presentity ([presence] publishers=self)"]

    def setup(self, app: Any) -> None:
        self.app = app
        self.engine = app.engine
        self.counters = app.stats.feature("presence")
        self.core = app.feature("events")
        cfg = app.config
        if self.core is None or not cfg["events"]["enable"] or not cfg[S]["enable"]:
            self.package.enabled = False
            return
        self.core.register(self.package)
        if cfg[S]["publish"]:
            self.engine.add_handler("sip.publish", self.on_publish,
                                    priority=cfg[S]["publish_priority"], owner="presence")
        self.engine.watcher("user.register")(self.on_register)
        self.engine.watcher("user.unregister")(self.on_unregister)
        app.console.command("publications", "[user@domain]",
                            "list presence publications (ETag, expires, basic status)")(
            self.cmd_publications)

    def reconfigure(self, cfg: config_mod.Config) -> None:
        self.cfg = dict(cfg[S])

    def status(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        pass  # the package's start (below) runs inside the core's, once the store is open

    async def close(self) -> None:
        for t in (self._timer, self._reg_timer):
            if t is not None:
                t.cancel()

    # -- PUBLISH ------------------------------------------------------------------------
    async def on_publish(self, msg: Message) -> bool:
        try:
            return await self._publish(msg)
        except SubscribeError as e:
            return refuse(msg, e, self.counters, "PUBLISH")

    async def _publish(self, msg: Message) -> bool:
        core = self.core
        self.counters["publish"] += 1
        ev = parse_event(msg.get("sip_event"))
        if ev is None:
            raise SubscribeError(400, "missing or malformed Event header")
        if ev.package != self.package.event:
            raise SubscribeError(489, f"PUBLISH of {ev.package!r} not served",
                                 Allow_Events=self.package.event)
        ruri = parse_uri(msg.get("sip_uri") or "")
        if ruri is None or not ruri.user:
            raise SubscribeError(404 if ruri else 400, "no user in the Request-URI")
        if not core.serves(ruri.host):
            raise SubscribeError(403, f"{ruri.host} is not a domain we serve")
        resource = core.user_key(ruri.user, ruri.host)
        rule = self.cfg["publishers"]
        if rule != "any":  # self, authenticated: someone must vouch for the publisher
            who = requester(msg, parse_name_addr(msg.get("sip_from") or ""), core.trusted,
                            True, True, f"[presence] publishers={rule}")
            if rule == "self" and who.user != ruri.user:
                raise SubscribeError(403, f"{who.user} may not publish the presence of "
                                     f"{resource}")
        body = msg.get("xsip_body") or ""
        if body:
            ctype = media_type(msg.get("xsip_type") or msg.get("sip_content-type") or "")
            if ctype != pidf.CONTENT_TYPE:
                raise SubscribeError(415, f"content type {ctype or 'missing'}",
                                     Accept=pidf.CONTENT_TYPE)
            try:
                pidf.validate(body, self.cfg["max_body"])
            except BodyError as e:
                raise SubscribeError(e.code, e.reason) from None
        expires = negotiate_expires(msg.get("sip_expires"), self.cfg["publish_expires"],
                                    core.cfg["min_expires"], core.cfg["max_expires"])
        op, old = self.package.pubs.plan(self.package.event, resource,
                                         msg.get("sip_sip-if-match") or "", bool(body), expires)
        store = core.store
        now = time.time()
        if op == REMOVE:
            self.package.pubs.remove(old.etag)
            if store is not None:
                await store.delete_publication(old.etag)
            self.package.changed(resource)
            await core.outbox_written()  # the watchers' NOTIFY is owed on disk before the 200
            msg["osip_Expires"] = "0"
            msg["code"] = "200"
            self.engine.answer_now(msg)
            self.counters["unpublished"] += 1
            return True
        pub = Publication(etag=new_etag(), package=self.package.event, resource=resource,
                          content_type=pidf.CONTENT_TYPE,
                          body=body if op in (INITIAL, MODIFY) else old.body,
                          expires_at=now + expires,
                          published=now if op != REFRESH else old.published,
                          owner=core.owner)
        if store is not None:
            await store.save_publication(pub, replaces=old.etag if old is not None else "")
        if old is not None:
            self.package.pubs.remove(old.etag)
        self.package.pubs.add(pub)
        if op != REFRESH:  # a new state: its NOTIFYs are owed on disk before the 200
            self.package.changed(resource)
            await core.outbox_written()
        msg["osip_SIP-ETag"] = pub.etag
        msg["osip_Expires"] = str(expires)
        msg["code"] = "200"
        self.engine.answer_now(msg)
        self.counters[op] += 1
        log.info("presence of %s %s (ETag %s, %ds)", resource,
                 {"initial": "published", "modify": "modified", "refresh": "refreshed"}[op],
                 pub.etag, expires)
        self._arm()
        return True

    # -- expiry of publications ---------------------------------------------------------
    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.package.pubs.next_expiry()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, when - time.time()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        gone = self.package.pubs.expired(time.time())
        for pub in gone:
            self.counters["expired"] += 1
            log.info("presence publication %s of %s expired", pub.etag, pub.resource)
            if self.core.store is not None:
                self.engine.spawn(self.core.store.delete_publication(pub.etag),
                                  "deleting a publication")
        for resource in {p.resource for p in gone}:
            self.package.changed(resource)
        self._arm()

    # -- registrations (from_registrations) ---------------------------------------------
    def _reg_key(self, msg: Message) -> str | None:
        user = msg.get("username") or msg.get("number") or ""
        uri = parse_uri(msg.get("sip_uri") or "")
        domain = uri.host if uri is not None else msg.get("domain") or ""
        return self.core.user_key(user, domain) if user and domain else None

    def on_register(self, msg: Message) -> None:
        if not self.cfg.get("from_registrations") or not msg.handled:
            return
        k = self._reg_key(msg)
        if k is None:
            return
        exp = msg.get("expires") or ""
        was = self.package.registered.get(k, 0) > time.time()
        self.package.registered[k] = time.time() + (int(exp) if exp.isdigit() else 600)
        if not was:
            self.package.changed(k)
        self._arm_reg()

    def on_unregister(self, msg: Message) -> None:
        if not self.cfg.get("from_registrations"):
            return
        k = self._reg_key(msg)
        if k is not None and self.package.registered.pop(k, None) is not None:
            self.package.changed(k)

    def _arm_reg(self) -> None:
        if self._reg_timer is not None:
            self._reg_timer.cancel()
        reg = self.package.registered
        if reg:
            when = min(reg.values())
            self._reg_timer = asyncio.get_running_loop().call_later(
                max(0.0, when - time.time()) + 0.01, self._reg_expire)

    def _reg_expire(self) -> None:
        self._reg_timer = None
        now = time.time()
        for k in [k for k, t in self.package.registered.items() if t <= now]:
            del self.package.registered[k]
            self.package.changed(k)
        self._arm_reg()

    # -- console ------------------------------------------------------------------------
    def cmd_publications(self, args: list[str]) -> str:
        who = args[0].lower() if args else ""
        now = time.time()
        rows = [p for p in self.package.pubs.by_etag.values()
                if not who or p.resource.lower() == who]
        if not rows:
            return "No publications" + (f" for {who}" if who else "") + "\r\n"
        rows.sort(key=lambda p: (p.resource, p.published))
        out = [f"{'resource':<28} {'etag':<18} {'basic':<7} expires"]
        for p in rows:
            out.append(f"{p.resource:<28} {p.etag:<18} {pidf.basic(p.body) or '-':<7} "
                       f"{max(0, int(p.expires_at - now))}")
        return "\r\n".join(out) + "\r\n"
