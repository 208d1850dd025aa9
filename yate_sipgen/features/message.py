"""SIP MESSAGE (RFC 3428): validate, route through Yate, deliver, answer truthfully, store.

Replaces the regexroute recipe (which answers 200 whatever happens). Paths:

* ``sip.message`` (``ysipchan [message] enable=no`` + ``[methods] message=...``): the main path.
  Mode ``relay`` answers after the outcome (200/202/failure), ``accept`` stores, answers 202 and
  delivers from the store, ``lateroute`` behaves like the recipe (200 at once, enqueue
  ``msg.execute callto=lateroute/<called>``).
* ``msg.execute`` for ``sip/`` targets (``[message] msg_execute=true``), installed ahead of
  ysipchan's, for MESSAGEs Yate routes itself (``ysipchan [message] enable=yes``); with
  ``route_offline=true`` we also answer ``call.route route_type=msg`` for users the other
  routers left offline, routing them to ``sipgen/store/<user@domain>``.

Every answer is a SIP code in ``code`` (handled=true): an unhandled ``sip.message`` would become
405 (reference §2.3).

This module is the flow (answer modes, routing, live delivery racing the answer deadline); its
usual case, one relay that nothing makes wait, runs as callbacks (:mod:`.relay`) and joins the
coroutines here wherever something does. The policy it applies is shared with the event
packages: who sends (:mod:`.identity`), the checks of the request (:mod:`.validation`), the
sender's rate (:mod:`.ratelimit`); the store and forward is :mod:`.offline`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from .. import config as config_mod
from ..config import Declarations
from ..errors import DispatchCancelled, DispatchTimeout
from ..message import Message
from ..protocol import escape
from ..sip import (HeaderValueError, format_name_addr, header_param, header_safe, media_type,
                   new_call_id, new_tag, parse_name_addr, parse_uri)
from ..store import AsyncStore
from .domains import Domains
from .identity import requester, trusted_lines
from .offline import OfflineStore
from .ratelimit import RateLimiter
from .registrations import Registrations
from .delivery import STORE_WORTHY, Deliverer, Outgoing, Route, Target, route_of
from .relay import RelayJob
from .validation import Refusal, hops as _hops, hops_of, too_big, unsupported_media

log = logging.getLogger("yate_sipgen.message")

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()
key = CONFIG.key

S = "message"
CONFIG.docs[S] = (
    "SIP MESSAGE (instant messages): who may send to whom, validation limits, how the sender is "
    "answered, and the offline store. Needs ysipchan.conf [methods] message=... and [message] "
    "enable=no (or msg_execute=true for Yate's own MESSAGE routing).")
key(S, "enable", "bool", True,
    "Handle SIP MESSAGE (sip.message from ysipchan). Used only at start (handlers are "
    "installed in Yate once).")
key(S, "mode", "choice", "relay",
    "relay: answer after the delivery outcome (200 delivered, 202 stored, or the failure). "
    "accept: answer 202 once the message is committed to the store, then deliver it from the "
    "store (no Yate thread waits for the delivery; a kill after the 202 loses nothing). One "
    "that is never stored (a typing notice, store=false) gets its 202 at once, best effort; one "
    "a store limit refuses is answered after its delivery, as in relay. "
    "lateroute: the old regexroute recipe's behaviour (200 at once, msg.execute to "
    "lateroute/<called>).", choices=("relay", "accept", "lateroute"))
key(S, "accept_above", "int", 20,
    "relay mode under overload: while this many MESSAGEs are already waiting for their "
    "delivery (status msg_inprogress) and deliveries are slow (slow_delivery), a new one is "
    "answered as in accept mode (202 once committed to the store, then delivered from it, in "
    "order). Each waiting MESSAGE holds a Yate thread that Yate keeps polling, so past a point "
    "the waiting itself eats Yate's CPU and the queue feeds itself; this caps it. 0: never "
    "(every answer waits for its outcome).",
    minimum=0, maximum=100000)
key(S, "slow_delivery", "int", 50,
    "With accept_above: a delivery (xsip.generate until the phone's answer, smoothed over the "
    "last ones) taking at least this many milliseconds means Yate is overloaded; only then does "
    "accept_above apply. A burst the machine delivers at once, or one busy recipient's queue "
    "(stored and answered 202 when it would outlast the answer deadline), keeps its 200s. "
    "Raise it where phones are far away (a long round trip makes every delivery slow). 0: the "
    "count alone decides.",
    minimum=0, maximum=60000)
key(S, "priority", "int", 50, "Priority of our sip.message handler in Yate.", minimum=0,
    maximum=1000)
key(S, "auth", "choice", "required",
    "required: only MESSAGEs Yate authenticated (they carry 'username'; needs ysipchan.conf "
    "[methods] message=yes) are accepted, others get 403. optional: unauthenticated senders "
    "are accepted too (ysipchan.conf [methods] message=no: Yate then authenticates nobody).",
    choices=("required", "optional"))
key(S, "trusted_lines", "list", (),
    "Yate lines/trunks (the in_line param, e.g. an SMS gateway) that vouch for their senders: "
    "their MESSAGEs are accepted with any From user, their SUBSCRIBEs and PUBLISHes count as "
    "authenticated (as the From user). '*' trusts every line.")
key(S, "allow_from_mismatch", "bool", False,
    "Accept an authenticated MESSAGE whose From user differs from the authenticated username.")
key(S, "domains", "list", (),
    "Domains we serve (Request-URI hosts), e.g. example.com,192.0.2.10. A MESSAGE for another "
    "host gets 403 (no open relay). Empty: every host counts as ours.")
key(S, "domain_aliases", "bool", True,
    "The hosts in 'domains' are names of one domain (e.g. example.com,10.0.0.5): a user is "
    "the same whichever of them a phone registers with or a sender writes, and stored "
    "messages are kept under the first. false: each host is a domain of its own (user@host).")
key(S, "relay_foreign", "bool", False,
    "Send MESSAGEs for hosts outside 'domains' straight to their Request-URI (authenticated "
    "senders only) instead of answering 403.")
key(S, "routing", "choice", "registrations",
    "How a recipient is found. registrations: send straight to the contact the user "
    "registered from (we watch user.register/user.unregister), skipping Yate's routing round "
    "trip (on Yate 6.4.1 under load that round trip costs about 5 ms of the sender's wait); "
    "users we have seen no registration of since our start, or with several contacts, are "
    "still routed by Yate. yate: ask Yate's routing (call.route route_type=msg: regfile, "
    "register, regexroute rules) for every MESSAGE; choose it when your routing for messages "
    "does more than look up registrations (rules that redirect or rewrite, gateways).",
    choices=("yate", "registrations"))
key(S, "content_types", "list",
    ("text/plain", "text/html", "message/cpim", "message/imdn+xml",
     "application/im-iscomposing+xml"),
    "Accepted media types (case-insensitive, parameters ignored); others get 415 with Accept.")
key(S, "max_body", "int", 16384,
    "Largest body in bytes (413 above). The line we must send onward to Yate also has to fit "
    "its 64 KiB buffer.", minimum=1, maximum=60000)
key(S, "store", "bool", True,
    "Store messages for users who are offline, unreachable or time out, and deliver them when "
    "they register (store and forward).")
key(S, "database", "path", "",
    "SQLite file of stored messages. Empty: messages.db in [general] state_dir. A change "
    "takes effect at the next start ('sipgen restart').")
key(S, "expire", "int", 259200, "Seconds a stored message is kept (default 3 days).",
    minimum=60, maximum=31536000)
key(S, "expiry_notice", "bool", False,
    "Tell the sender (by MESSAGE) when a stored message expires undelivered.")
key(S, "notice_from", "str", "sipgen",
    "User part of the From of notices we send (the domain is the sender's).")
key(S, "max_per_user", "int", 100, "Stored messages per recipient; when full: 480.",
    minimum=1, maximum=1000000)
key(S, "max_total", "int", 100000, "Stored messages in all; when full: 480.",
    minimum=1, maximum=100000000)
key(S, "retry_min", "int", 30, "First retry of a failed stored delivery, in seconds (doubles).",
    minimum=1, maximum=86400)
key(S, "retry_max", "int", 3600, "Longest delay between retries, in seconds.", minimum=1,
    maximum=86400)
key(S, "scan_interval", "int", 15,
    "Seconds between scans for due retries and expired messages.", minimum=1, maximum=3600)
key(S, "delivery_timeout", "int", 15,
    "Seconds to wait for Yate's answer to one delivery (xsip.generate wait=true; an "
    "unreachable UDP contact takes Yate about 7.5 s). Past it the outcome counts as 408 (the "
    "message is kept for a retry) and the recipient's next message goes. Yate 6.4.1 sometimes "
    "never answers a delivery the phone took within a fraction of a millisecond (seen under "
    "CPU load); this bounds how long that holds up the recipient's queue.",
    minimum=1, maximum=300)
key(S, "max_concurrent", "int", 200,
    "Deliveries waiting on Yate at once (each holds a Yate thread).", minimum=1, maximum=10000)
key(S, "sender_rate", "float", 5.0,
    "Messages per second one sender may send on average (503 with Retry-After above).",
    minimum=0.01, maximum=100000)
key(S, "sender_burst", "int", 20, "Messages one sender may send at once above the rate.",
    minimum=1, maximum=100000)
key(S, "other_targets", "choice", "msg.execute",
    "What to do with a route that is not sip/... (e.g. jabber/...): msg.execute delivers it "
    "through that channel module; reject answers 404.", choices=("msg.execute", "reject"))
key(S, "msg_execute", "bool", False,
    "Also handle msg.execute for sip/ targets (ysipchan [message] enable=yes set-ups, where "
    "Yate routes MESSAGEs itself). Used only at start.")
key(S, "msg_execute_priority", "int", 90,
    "Priority of that msg.execute handler: below ysipchan's 100 so we come first.",
    minimum=0, maximum=99)
key(S, "route_offline", "bool", False,
    "With msg_execute: answer call.route route_type=msg for users the other routers left "
    "offline, so they are stored (Yate itself would answer 405). Used only at start.")
key(S, "route_offline_priority", "int", 150,
    "Priority of that call.route handler: after regfile/regexroute (100).", minimum=101,
    maximum=10000)

#: _deliver_live: the message's stored copy was delivered with the user's backlog.
SENT_FROM_STORE = -2
#: _deliver_live: the queue for the recipient would outlast the answer deadline.
SPILL = -3
#: _deliver_routed: the message was stored and answered already (the recipient's queue).
ANSWERED = -4
NEVER_AUTO_ANSWER = ("application/im-iscomposing+xml", "message/imdn+xml")
#: Margin kept before the answer deadline to store the message and answer 202.
STORE_RESERVE = 0.5
_BODY_PARAMS = ("xsip_body.", "xsip_type.", "xsip_body_encoding.")
#: What, besides the From without its tag, decides the checks and headers of a conversation
#: (the key of MessageFeature._parties: every param _parties_of reads).
_PARTY_PARAMS = ("sip_uri", "called", "username", "in_line", "caller", "callername",
                 "xsip_type", "sip_content-type", "sip_auto-submitted")


def _check_message(cfg: config_mod.Config) -> list[str]:
    m = cfg["message"]
    errs = []
    if m["retry_min"] > m["retry_max"]:
        errs.append(f"{cfg.path}: [message] retry_min={m['retry_min']} must not exceed "
                    f"retry_max={m['retry_max']}")
    if m["mode"] == "lateroute" and m["msg_execute"]:
        errs.append(f"{cfg.path}: [message] mode=lateroute cannot be combined with "
                    "msg_execute=true (our msg.execute handler would take the message lateroute "
                    "routes)")
    if m["route_offline"] and not m["msg_execute"]:
        errs.append(f"{cfg.path}: [message] route_offline=true needs msg_execute=true")
    return errs


CONFIG.checks.append(_check_message)


class Inbound:
    """One incoming MESSAGE: what goes out (``out``) and who sends to whom (``parties``, the
    checks and headers every message of that conversation shares)."""

    __slots__ = ("out", "parties")

    def __init__(self, out: Outgoing, parties: "Parties") -> None:
        self.out = out
        self.parties = parties


class MessageFeature:
    name = "message"
    config = CONFIG

    def __init__(self) -> None:
        self.cfg: dict[str, Any] = {}
        self.app: Any = None
        self.engine: Any = None
        self.counters: Any = None
        self.deliverer: Deliverer | None = None
        self.offline: OfflineStore | None = None  # the store and forward (from setup)
        self.limiter = RateLimiter()
        self.domains = Domains()
        self._live = 0
        self._deadlines: dict[int, tuple[float, Message, Outgoing, str, _LiveState]] = {}
        self._deadline_tick: asyncio.TimerHandle | None = None
        self._parties: dict[tuple[str, ...], Parties] = {}
        #: recipient -> accepted messages waiting for the drain that runs for them
        self._accepted: dict[str, list[tuple[Message, Inbound, Route | None]]] = {}
        self.state_dir = ""

    @property
    def store(self) -> AsyncStore | None:
        """The message store (None while storing is off or not set up)."""
        return self.offline.store if self.offline is not None else None

    # -- --check support ------------------------------------------------------------------
    @classmethod
    def sip_methods(cls, cfg: config_mod.Config) -> dict[str, str]:
        m = cfg["message"]
        if not m["enable"] or m["msg_execute"]:
            return {}  # with Yate's own MESSAGE routing, [methods] plays no part
        return {"message": "yes" if m["auth"] == "required" else "no"}

    @classmethod
    def ysipchan_sections(cls, cfg: config_mod.Config) -> dict[str, list[str]]:
        """ysipchan.conf lines besides [methods] (comment lines start with ';')."""
        m = cfg["message"]
        if not m["enable"]:
            return {}
        if m["msg_execute"]:
            return {"message": ["; Yate routes MESSAGE itself (call.route, then msg.execute);",
                                "; yate-sipgen delivers its msg.execute for sip/ targets",
                                "enable=yes", "auth_required=yes"]}
        return {"message": ["; MESSAGE must reach yate-sipgen as sip.message, not Yate's routing",
                            "enable=no"]}

    @classmethod
    def yate_general(cls, cfg: config_mod.Config) -> list[str]:
        """yate.conf [general] lines: Yate's engine workers.

        Each delivery is an xsip.generate with wait=true, which holds one Yate engine worker
        until the SIP transaction ends (about 7.5 s for a dead UDP contact). Yate's default of
        at most 10 workers (Engine.cpp s_maxworkers) starves under load: measured on Yate 6.4.1,
        a minimal script doing this flow had p50 340 ms at 100 MESSAGE/s with the defaults and
        32 ms with maxworkers=200, minworkers=20.

        Yate's ``Thread::idle()`` interval (``idlemsec``, engine/Thread.cpp, default 5 ms) is
        how often ysipchan's xsip.generate checks whether its transaction ended
        (``while (gen.busy()) Thread::idle();``), how long the SIP endpoint sleeps when it
        had no event, and how long a Yate thread waits when another one is writing to the
        script: three such waits are on a relayed MESSAGE's path.
        """
        m = cfg["message"]
        if not m["enable"]:
            return []
        workers = min(1000, max(200, m["max_concurrent"] + 50))
        return ["; each delivery (xsip.generate wait=true) holds one engine worker until its SIP",
                f"; transaction ends; Yate's default maxworkers=10 starves: [message] "
                f"max_concurrent={m['max_concurrent']} deliveries plus the rest of Yate",
                f"maxworkers={workers}",
                "; start with some, so a burst does not wait for threads to be created",
                "minworkers=20",
                "; Yate polls at this interval (default 5 ms): a waiting xsip.generate, the SIP",
                "; endpoint's event loop, concurrent writes to a script. 1 ms: sender's wait at",
                "; 250 MESSAGE/s 36.7 -> 13.2 ms (routing=yate), 8.0 ms (routing=registrations)",
                "idlemsec=1"]

    @classmethod
    def yate_notes(cls, cfg: config_mod.Config) -> list[str]:
        m = cfg["message"]
        if not m["enable"]:
            return []
        notes = []
        if m["msg_execute"]:
            notes.append("[message] auth_required=yes: Yate authenticates MESSAGE before routing "
                         "it; [methods] message is not used in this set-up")
        elif m["auth"] == "required":
            notes.append("message=yes: Yate challenges every MESSAGE; only authenticated ones "
                         "reach us, with 'username'")
        else:
            notes.append("message=no: Yate authenticates no MESSAGE and no 'username' arrives; "
                         "[message] auth=optional accepts unauthenticated senders")
        notes.append("remove any regexroute.conf MESSAGE recipe: it would also react to the "
                     "call.route route_type=msg we dispatch")
        if not m["domains"]:
            notes.append("NOTE: [message] domains is empty: every Request-URI host is treated "
                         "as ours; list your domains to refuse others with 403")
        return notes

    # -- Feature protocol ---------------------------------------------------------------------
    def setup(self, app: Any) -> None:
        self.app = app
        self.engine = app.engine
        self.counters = app.stats.feature("message")
        self.deliverer = Deliverer(self.engine, self.counters)
        self.registrations = Registrations(self.user_key)
        m = app.config["message"]
        self.state_dir = app.config["general"]["state_dir"]
        self.offline = OfflineStore(self.engine, self.counters, self.deliverer,
                                    self.registrations, self.canonical_key, self.submit,
                                    self.state_dir)
        if not m["enable"]:
            return
        self.engine.add_handler("sip.message", self.on_sip_message, priority=m["priority"],
                                owner="message", deferred=True)
        self.engine.watcher("user.register")(self.offline.on_register)
        self.engine.watcher("user.unregister")(self.registrations.unregistered)
        if m["msg_execute"]:
            self.engine.add_handler("msg.execute", self.on_msg_execute,
                                    priority=m["msg_execute_priority"], owner="message",
                                    deferred=True)
            if m["route_offline"]:
                self.engine.add_handler("call.route", self.on_route_offline,
                                        priority=m["route_offline_priority"],
                                        filter=("route_type", "msg"), owner="message")
        app.console.command("messages", "[user@domain] | purge <user@domain|all>",
                            "list stored messages, or delete them",
                            complete=self.offline.complete_messages)(
            self.offline.cmd_messages)

    def reconfigure(self, cfg: config_mod.Config) -> None:
        self._parties = {}  # derived from the rules below
        self.cfg = dict(cfg["message"])
        self.cfg["_types"] = {t.lower() for t in self.cfg["content_types"]}
        self.domains = Domains.from_config(self.cfg)
        self.cfg["_trusted"] = trusted_lines(self.cfg["trusted_lines"])
        self.cfg["_auth_required"] = self.cfg["auth"] == "required"
        self.cfg["_accept"] = ", ".join(self.cfg["content_types"])
        self.cfg["_slow_delivery"] = self.cfg["slow_delivery"] / 1000.0
        self.limiter.configure(self.cfg["sender_rate"], self.cfg["sender_burst"])
        d = self.deliverer
        d.configure(max_concurrent=self.cfg["max_concurrent"],
                    delivery_timeout=float(self.cfg["delivery_timeout"]),
                    retry_min=float(self.cfg["retry_min"]),
                    retry_max=float(self.cfg["retry_max"]),
                    other_targets=self.cfg["other_targets"])
        d.route_timeout = min(self.engine.dispatch_timeout, 5.0)
        self.offline.configure(self.cfg)

    def status(self) -> dict[str, Any]:
        c = self.counters
        if not self.cfg.get("enable"):
            return {}
        return {"msg_received": c["received"], "msg_delivered": c["delivered"],
                "msg_stored": c["stored"], "msg_expired": c["expired"],
                "msg_queued": len(self.deliverer.backlog) if self.deliverer else 0,
                "msg_inprogress": self._live}

    async def start(self) -> None:
        if self.cfg.get("enable") and not self.cfg["domains"]:
            log.warning("[message] domains is empty: every Request-URI host is treated as ours")
        self.offline.start()

    async def close(self) -> None:
        self.offline.close()

    # -- the sip.message path -----------------------------------------------------------------
    def _reject(self, msg: Message, code: int, why: str, **headers: str) -> bool:
        msg["code"] = str(code)
        for h, v in headers.items():
            msg["osip_" + h.replace("_", "-")] = v
        self.counters[f"rejected{code}"] += 1
        log.info("MESSAGE from %s to %s rejected %d: %s", msg.get("caller", "?"),
                 msg.get("sip_uri", "?"), code, why)
        return True

    def _refuse(self, msg: Message, e: Refusal) -> bool:
        return self._reject(msg, e.code, e.reason, **e.headers)

    def on_sip_message(self, msg: Message) -> Any:
        """Our sip.message handler (deferred: True when answered at once, else the work that
        answers)."""
        c = self.counters
        c["received"] += 1
        cfg = self.cfg
        if cfg["mode"] == "lateroute":
            return self._lateroute(msg)
        # A request as Yate sent it (the usual): read straight from the line's index, in
        # wire form (None: a handler before us changed it, every read goes through msg). The
        # wire form does for these checks: digits, presence, and a ';' (never escaped).
        raw = msg.wire_values()
        get = raw.get if raw is not None else msg.get
        hops = hops_of(get("antiloop") or "")
        if hops <= 0:
            return self._reject(msg, 483, "antiloop exhausted")
        if get("id") is not None:
            return self.engine.run_flow(msg, self._in_call(msg, hops))
        to = get("sip_to")
        if to and ";" in to and header_param(msg.get("sip_to") or "", "tag"):
            return self._reject(msg, 481, "To tag of no known dialog")
        try:
            inb = self._inbound(msg, hops, raw)
        except Refusal as e:
            return self._refuse(msg, e)
        if log.isEnabledFor(logging.INFO):  # (one call when off: this is the hot path)
            out = inb.out
            log.info("Got SIP MESSAGE from %s to %s (%s, %d bytes)", out.sender, out.user,
                     out.content_type, len(out.body))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("MESSAGE body for %s: %s", out.user, out.body)
        return self._relay(msg, inb, None)

    def _inbound(self, msg: Message, hops: int, raw: "dict[str, str] | None" = None
                 ) -> Inbound:
        """What ``msg`` asks for, checked; raises :class:`Refusal` for what we refuse.
        ``raw``: what :meth:`Message.wire_values` gave for it, when the caller asked already
        (looked up again when None)."""
        # who sends to whom: the same for every message between two parties (a conversation);
        # the key is read in wire form, straight from the line's index when it is untouched
        if raw is None:
            raw = msg.wire_values()
        wget = raw.get if raw is not None else msg.wire
        frm_text = wget("sip_from") or ""
        cut = frm_text.rfind(";tag=")
        if cut > 0 and frm_text[cut - 1] == ">":  # the tag alone differs between messages
            tag = frm_text[cut + 5:]
            if tag.isascii() and tag.replace("-", "").replace(".", "").isalnum():
                frm_text = frm_text[:cut]
        key = (frm_text, *map(wget, _PARTY_PARAMS))  # (an absent one is None)
        parties = self._parties.get(key)
        wire_body = wget("xsip_body")
        if wire_body is None:
            body = ""
        elif "%" in wire_body:
            body = msg.get("xsip_body") or ""
        else:
            body = wire_body
        if parties is None:
            try:
                parties = self._parties_of(msg)
            except Refusal as e:
                if e.code != 415:  # the media type is checked first, then the body
                    self._body_extra(msg, body)
                raise
            if len(self._parties) >= self.PARTIES_CACHE:
                self._parties.clear()
            self._parties[key] = parties
        extra = self._body_extra(msg, body)
        if hops <= 1:
            raise Refusal(483, "no hop left to forward")
        encoding = wget("xsip_body_encoding")
        if encoding and "%" in encoding:
            encoding = msg.get("xsip_body_encoding")
        out = Outgoing(parties.user, parties.sender, parties.from_hdr, parties.to_hdr,
                       parties.content_type, body, encoding or "", extra,
                       new_call_id(), new_tag(), time.time(), hops - 1,
                       parties.sender_user, parties.rcpt_user, False, parties.notify_sender,
                       0, 0, wire_body, parties.wire_headers)
        return Inbound(out, parties)

    def _body_extra(self, msg: Message, body: str) -> dict[str, str]:
        """The other body parts and body headers (multipart, Content-Disposition), checked
        with the body against the size limits; raises :class:`Refusal` 413."""
        # rare, so one search of the names decides whether to look for them
        if msg.has_prefix(_BODY_PARAMS):
            extra = {k: v for k, v in msg.items() if k.startswith(_BODY_PARAMS)}
        else:
            extra = {}
        why = too_big(body, extra, self.cfg["max_body"])
        if why:
            raise Refusal(413, why)
        return extra

    #: Sender/recipient pairs whose checked headers are kept (cleared when full or reloaded).
    PARTIES_CACHE = 4096

    def _parties_of(self, msg: Message) -> "Parties":
        """The checks and headers that depend only on who sends to whom (the params of
        :meth:`_inbound`'s cache key); raises :class:`Refusal`."""
        cfg = self.cfg
        get = msg.get
        xtype = get("xsip_type") or ""
        ctype_full = get("sip_content-type") or xtype
        media = media_type(xtype or ctype_full)
        if media not in cfg["_types"]:  # "" (no type) is never in it
            raise unsupported_media(media, cfg["_accept"])
        frm = parse_name_addr(get("sip_from") or "")
        if frm is None:
            raise Refusal(400, "unparsable From")
        sender = requester(msg, frm, cfg["_trusted"], cfg["_auth_required"],
                           cfg["allow_from_mismatch"])
        sender_user = sender.user
        ruri = parse_uri(get("sip_uri") or "")
        called = get("called") or ""
        if ruri is None or not (ruri.user or called):
            raise Refusal(404 if ruri else 400, "no recipient in the Request-URI")
        rcpt_user = ruri.user or called
        foreign = self.domains.is_foreign(ruri.host)
        if foreign and not (cfg["relay_foreign"] and sender.vouched):
            raise Refusal(403, f"{ruri.host} is not a domain we serve")
        try:
            display = frm.display or get("callername") or ""
            from_uri = f"sip:{sender_user}@{frm.uri.host}" + (
                f":{frm.uri.port}" if frm.uri.port else "")
            from_hdr = format_name_addr(from_uri, display)
            to_hdr = format_name_addr(f"sip:{rcpt_user}@{ruri.host}")
            header_safe(ctype_full)
        except HeaderValueError as e:
            raise Refusal(400, str(e)) from None
        route_wire = Deliverer.route_wire(rcpt_user, ruri.host, {
            "caller": sender_user, "domain": frm.uri.host, "module": "sipgen",
            "xsip_type": ctype_full})
        return Parties(self.user_key(rcpt_user, ruri.host), f"{sender_user}@{frm.uri.host}",
                       from_hdr, to_hdr, ctype_full, media, rcpt_user, ruri.host,
                       sender_user, frm.uri.host, sender.authenticated, foreign,
                       self._may_notify(msg, frm, media, sender.vouched), route_wire,
                       (escape(from_hdr), escape(to_hdr), escape(ctype_full)))

    def user_key(self, user: str, host: str) -> str:
        """The ``user@domain`` a recipient is stored and delivered under (see
        :class:`~.domains.Domains`)."""
        return self.domains.user_key(user, host)

    def canonical_key(self, key: str) -> str:
        return self.domains.canonical_key(key)

    def serves(self, host: str) -> bool:
        """Is ``host`` one of our domains (always, when ``domains`` is empty)?"""
        return self.domains.serves(host)

    def is_automatic(self, msg: Message, frm: Any = None) -> bool:
        """A message that no automatic sender (notices, services) may ever answer."""
        if frm is None:
            frm = parse_name_addr(msg.get("sip_from") or "")
            if frm is None:
                return True
        return not self._may_notify(msg, frm, media_type(msg.get("xsip_type") or ""),
                                    requester(msg, frm, self.cfg["_trusted"]).vouched)

    def _may_notify(self, msg: Message, frm: Any, media: str, authenticated: bool) -> bool:
        """May an automatic sender of ours (notices) ever write back to this sender? Never to
        automatic messages (RFC 3834: typing and delivery notices, Auto-Submitted), nor to
        unauthenticated or foreign senders, nor to our own notice user."""
        if not authenticated or media in NEVER_AUTO_ANSWER:
            return False
        auto = msg.get("sip_auto-submitted")
        if auto and auto.lower() != "no":
            return False
        if frm.uri.user == self.cfg.get("notice_from"):
            return False
        return self.domains.serves(frm.uri.host)

    def _over_rate(self, msg: Message, sender: str) -> bool:
        """Answer 503 with Retry-After (and say True) when ``sender`` is over its rate."""
        if self.limiter.allow(sender):
            return False
        self.counters["rate_limited"] += 1
        return self._reject(msg, 503, f"sender {sender} over its rate",
                            Retry_After=str(self.limiter.retry_after()))

    #: Params of the sender's MESSAGE forwarded in our call.route, for routers that look at
    #: them (regexroute rules on ${username}, ${ip_host}, ...).
    ROUTE_PARAMS = ("username", "callername", "in_line", "ip_host", "ip_port", "ip_transport",
                    "address", "connection_id", "antiloop", "sip_uri", "billid")

    def _route_message(self, inb: Inbound, msg: Message) -> Message:
        """Our call.route for ``inb`` (``msg``: the sender's message, whose routing params
        are forwarded)."""
        return Message.from_wire_params("call.route", self._route_wire(inb, msg))

    def _route_wire(self, inb: Inbound, msg: Message) -> str:
        """The params of :meth:`_route_message`, escaped for Yate's wire."""
        return inb.parties.route_wire + msg.wire_params(self.ROUTE_PARAMS)

    def _route_budget(self, msg: Message) -> float:
        """Seconds Yate's routing may take: what is left before the answer deadline (less
        the time to store and answer 202), or the routing timeout once answered."""
        budget = (msg.deadline - STORE_RESERVE - self.engine.now() if not msg.answered
                  else self.deliverer.route_timeout)
        return max(budget, 0.05)

    def _relay(self, msg: Message, inb: Inbound, route: Route | None) -> Any:
        """The sender's rate, then the answer mode, then delivery; shared by both set-ups.
        Returns True (answered) or the work that answers (see Engine's deferred handlers)."""
        if self._over_rate(msg, inb.out.sender):
            return True
        cfg = self.cfg
        if cfg["mode"] == "accept":
            # (right after a start: once open)
            if self.offline.keeps(inb.out, inb.parties.media):
                return self.engine.run_flow(msg, self._accept(msg, inb, route))
            # a typing notice, an automatic message, no store: nothing to keep it in, so
            # this 202 is best effort (a kill during the delivery loses it)
            msg["code"] = "202"
            self.engine.answer_now(msg)
            self.counters["accepted"] += 1
        elif (self._live >= cfg["accept_above"] > 0
              and self.deliverer.delivery_time >= cfg["_slow_delivery"]
              and self.offline.keeps(inb.out, inb.parties.media)):
            # overload: stop adding Yate threads that wait on us (one never stored still does).
            # Slow deliveries tell it from one busy recipient's queue, which the spill handles
            # (a queue diverted to the store would drain slower than the live relay)
            return self.engine.run_flow(msg, self._accept(msg, inb, route, overload=True))
        return RelayJob(self, msg, inb, route).start()

    async def _accept(self, msg: Message, inb: Inbound, route: Route | None,
                      overload: bool = False) -> bool:
        """``mode=accept`` (or ``overload``: relay mode past ``accept_above``): commit the
        message to the store, answer 202, then deliver it from the store
        (:meth:`_deliver_accepted`): a kill after the 202 loses nothing, the restart delivers
        it. One that cannot be stored now (a store limit, a failing store) is relayed as in
        ``mode=relay`` and answered after the outcome: a 202 is never given for a message
        that is not kept."""
        out = inb.out
        if not await self.offline.add(
                out, inb.parties.media, counter="overload_accepted" if overload else "accepted",
                why=(f"accepted: {self._live} deliveries in progress" if overload
                     else "accepted (mode=accept)")):
            route = await self._route_for(msg, inb, route)
            return await self._after_lookup(msg, inb, route, self._live_begin(msg, inb))
        self._answer(msg, 202)
        self.engine.answer_now(msg)
        waiting = self._accepted.get(out.user)
        if waiting is not None:  # the drain running for this user takes this one too
            waiting.append((msg, inb, route))
        else:
            self._accepted[out.user] = []
            self.engine.spawn(self._drain_accepted(msg, inb, route),
                              f"accepted delivery to {out.user}")
        return True

    async def _drain_accepted(self, msg: Message, inb: Inbound, route: Route | None) -> None:
        """The accepted messages of one recipient, delivered by one task: this one, then, as
        long as more are accepted meanwhile (each committed before it is queued here), the
        next batch of them. One delivery task per message made each of them wait for the
        recipient's lock only to find the store emptied by the one before (a claim and a
        count each): one busy recipient's accepted queue drained at half the rate."""
        user = inb.out.user
        batch = [(msg, inb, route)]
        try:
            while batch:
                try:
                    await self._deliver_accepted(user, batch)
                except Exception:  # (the store's back-off and retries still apply)
                    log.exception("delivering accepted messages to %s failed", user)
                batch = self._accepted[user]
                self._accepted[user] = []
        finally:
            del self._accepted[user]

    async def _deliver_accepted(self, user: str,
                                batch: list[tuple[Message, Inbound, Route | None]]) -> None:
        """After accept-mode 202s: look the recipient up (for the latest of ``batch``) and
        send what the store holds for them, these messages among it, in order, under the
        recipient's lock (as the delivery on REGISTER does; failures get the store's
        back-off). Offline or unreachable, they stay stored; a recipient that does not exist
        (404, 403, ...) drops their copies."""
        msg, inb, route = batch[-1]
        route = await self._route_for(msg, inb, route)
        if route.targets:
            await self.deliverer.flush_user(user, route.targets, None, due_only=False)
        elif route.nobody:
            for _, dropped, _ in batch:
                log.info("accepted message %d for %s dropped: not deliverable (%d)",
                         dropped.out.stored_id, user, route.code)
                self.counters["accepted_dropped"] += 1
                await self.offline.discard(dropped.out.stored_id, user)

    async def _route_for(self, msg: Message, inb: Inbound, route: Route | None) -> Route:
        """``route`` when known already, else what :meth:`_known_route` or a call.route
        gives (:class:`RelayJob` does the same with callbacks)."""
        if route is None:
            route = self._known_route(inb)
        if route is not None:
            return route
        try:
            answer = await self.engine.dispatch(self._route_message(inb, msg),
                                                self._route_budget(msg))
        except (DispatchTimeout, DispatchCancelled) as e:
            return route_of(None, e)
        return route_of(answer, None)

    def _known_route(self, inb: Inbound) -> Route | None:
        """The route when no call.route is needed: a foreign host (relay_foreign) or, with
        routing=registrations, the one contact we saw the user register."""
        p = inb.parties
        if p.foreign:  # relay_foreign: straight to the Request-URI
            return Route([Target(f"sip/sip:{p.rcpt_user}@{p.rcpt_host}")])
        if self.cfg["routing"] == "registrations":
            target = self.registrations.target(inb.out.user)
            if target is not None:
                return Route([target])
        return None

    def _live_begin(self, msg: Message, inb: Inbound) -> "_LiveState":
        """A live delivery starts: counted, and watched against the answer deadline."""
        state = _LiveState()
        if not msg.answered:  # one ticking check for all of them, not a timer each
            self._deadlines[id(state)] = (msg.deadline - STORE_RESERVE, msg, inb.out,
                                          inb.parties.media, state)
            if self._deadline_tick is None:
                self._deadline_tick = asyncio.get_running_loop().call_later(
                    self.DEADLINE_TICK, self._check_deadlines)
        self._live += 1
        return state

    def _live_end(self, state: "_LiveState") -> None:
        self._live -= 1
        self._deadlines.pop(id(state), None)

    async def _after_lookup(self, msg: Message, inb: Inbound, route: Route,
                            state: "_LiveState") -> bool:
        """Deliver along ``route`` and answer with the truthful code (the live delivery
        ``state`` ends here): where a :class:`RelayJob` hands over when something makes the
        delivery wait. If the answer deadline comes first, the message is stored and answered
        202 at once (an unanswered msg.execute would go on to ysipchan and be sent twice); the
        late outcome then settles the stored copy."""
        try:
            code = await self._deliver_routed(msg, inb, route, state)
        finally:
            self._live_end(state)
        return await self._conclude(msg, inb, state, code, route)

    async def _deliver_routed(self, msg: Message, inb: Inbound, route: Route,
                              state: "_LiveState") -> int:
        """The SIP code of the live attempt (see :meth:`_deliver_live`); ``ANSWERED`` when
        the recipient's queue made us store the message and answer already."""
        if not route.targets:
            return 0 if route.offline and route.code == 480 else route.code
        out = inb.out
        code = await self._deliver_live(msg, out, route.targets, state, inb.parties.media)
        if code != SPILL:
            return code
        state.spilling = True  # the deadline watch must not store it twice
        if await self.offline.add(out, inb.parties.media,
                                  why="the recipient's queue is too long"):
            self.counters["spilled"] += 1
            self._answer(msg, 202)
        else:
            # cannot be stored (limits) and the queue would outlast the deadline: the truth
            # now (recipient unavailable) rather than a late answer
            self._answer(msg, 480)
        return ANSWERED

    async def _conclude(self, msg: Message, inb: Inbound, state: "_LiveState", code: int,
                        route: Route) -> bool:
        """Answer after the live attempt ended with ``code``: delivered, stored, or the
        failure; after a deadline store, settle the stored copy instead."""
        if code == ANSWERED:
            return True
        out = inb.out
        if state.storing is not None:  # the deadline came first: 202 (or 480) already sent
            await state.storing
            await self._settle_late(out, state, code, route)
            return True
        if 200 <= code < 300:
            return self._delivered(msg, code)
        if code == -1 or code in STORE_WORTHY or route.offline:
            if await self.offline.add(out, inb.parties.media):
                return self._answer(msg, 202)
        return self._answer(msg, self._failure_code(code, route))

    def _delivered(self, msg: Message, code: int) -> bool:
        self.counters["delivered"] += 1
        return self._answer(msg, code)

    def _sends_itself(self, route: Route, state: "_LiveState") -> bool:
        """Can a RelayJob deliver along ``route`` itself: one ``sip/`` target, no deadline
        store running (else :meth:`_after_lookup` does it)."""
        targets = route.targets
        return (len(targets) == 1 and state.storing is None
                and targets[0].callto[:4] == "sip/")

    def _answer(self, msg: Message, code: int) -> bool:
        if not msg.answered:
            msg["code"] = str(code)
            if code >= 300:
                self.counters[f"rejected{code}"] += 1
        return True

    @staticmethod
    def _failure_code(code: int, route: Route) -> int:
        """The truthful failure for the sender (reference §2.3: no reason phrase, no headers)."""
        if code == -1 or code == 0:
            return 480
        if code == 401 or code == 407:
            return 500  # the target challenged us: we cannot relay its challenge
        if 300 <= code < 400:
            return 480  # its Contact header never reaches us
        if code == 503:
            return 480
        if code == 504:
            return 408
        return code

    async def _deliver_live(self, msg: Message, out: Outgoing, targets: list[Target],
                            state: "_LiveState", media: str) -> int:
        """Send under the user's lock (RFC 3428 §8: one pending MESSAGE per recipient), after
        the stored messages that were there before this one arrived.

        Returns the SIP code, -1 (queued behind a backlog that could not be sent: store it),
        or ``SPILL``: the queue for this recipient would outlast the answer deadline, so the
        message is to be stored now and answered 202; it is then sent in order once the
        messages ahead of it are through.
        """
        users = self.deliverer.users
        user = out.user
        had_backlog = user in self.deliverer.backlog  # stored before we came: those go first
        if self._must_spill(msg, out, media):
            return SPILL
        waiter = users.enter(user)
        if waiter is not None:
            await users.wait(user, waiter)
        return await self._deliver_locked(out, targets, state, had_backlog)

    def _must_spill(self, msg: Message, out: Outgoing, media: str) -> bool:
        """Would the queue for this recipient outlast the answer deadline (store it now)?"""
        d = self.deliverer
        users = d.users
        if not users.locked(out.user) or msg.answered or not self.offline.storable(out, media):
            return False
        ahead = users.queued(out.user) + 1
        budget = msg.deadline - STORE_RESERVE - self.engine.now()
        return ahead >= self.MAX_QUEUE or (ahead + 1) * d.delivery_time > budget

    def _backlog_first(self, user: str, state: "_LiveState", had_backlog: bool) -> bool:
        """Must the user's stored messages go before this one (see :meth:`_deliver_locked`)?"""
        return user in self.deliverer.backlog and self.offline.store is not None and (
            had_backlog or state.storing is not None)

    async def _deliver_locked(self, out: Outgoing, targets: list[Target], state: "_LiveState",
                              had_backlog: bool) -> int:
        """Holding the recipient's lock (given up here): its backlog first when there was one
        before this message came (or this message was stored at the deadline meanwhile), then
        this message. Returns what :meth:`_deliver_live` does."""
        d = self.deliverer
        user = out.user
        reached = False  # the recipient took a message just now
        try:
            if self._backlog_first(user, state, had_backlog):
                if state.storing is not None:
                    await state.storing  # our own copy must be in the store, or not, for sure
                ok = await d.flush_user(user, targets, None, due_only=False, hold_lock=False,
                                        up_to=out.received)
                if state.stored_id:
                    # stored at the deadline: that copy went (or not) with the backlog
                    reached = ok
                    return SENT_FROM_STORE if ok else -1
                if not ok:
                    return -1
            code = await d.send(out, targets)
            reached = 200 <= code < 300
            return code
        finally:
            self._leave_user(user, targets, reached)

    async def _after_lock(self, msg: Message, inb: Inbound, route: Route, state: "_LiveState",
                          had_backlog: bool) -> bool:
        """:meth:`_after_lookup` from the point where the recipient's lock is held."""
        try:
            code = await self._deliver_locked(inb.out, route.targets, state, had_backlog)
        finally:
            self._live_end(state)
        return await self._conclude(msg, inb, state, code, route)

    def _leave_user(self, user: str, targets: list[Target], reached: bool) -> None:
        """The delivery to ``user`` is over (``reached``: it took the message)."""
        d = self.deliverer
        d.users.leave(user)
        if reached and user in d.backlog and not d.users.locked(user):
            # the queue is through: what was stored meanwhile (spilled) goes now, in order
            self.engine.spawn(d.flush_user(user, targets, None, due_only=False),
                              f"stored delivery to {user}")

    #: Messages waiting for one recipient before later ones are stored at once (202). Each
    #: holds a Yate thread that Yate keeps waking (see accept_above): with 200, one recipient
    #: sent 500/s on a real Yate (2 cores, about 250/s one phone takes) got 365-406 of 5000
    #: delivered in a 10 s run, Yate at 154 % CPU; with 20, 1949-2353 (the rest stored, then
    #: 480 at max_per_user), Yate at 72-82 %, and 250/s still all 200.
    MAX_QUEUE = 20

    #: How often live deliveries are checked against their answer deadlines (seconds).
    DEADLINE_TICK = 0.1

    def _check_deadlines(self) -> None:
        self._deadline_tick = None
        now = asyncio.get_running_loop().time()
        due = [k for k, v in self._deadlines.items() if v[0] <= now]
        for k in due:
            _, msg, out, media, state = self._deadlines.pop(k)
            self._deadline_reached(msg, out, media, state)
        if self._deadlines:
            self._deadline_tick = asyncio.get_running_loop().call_later(
                self.DEADLINE_TICK, self._check_deadlines)

    def _deadline_reached(self, msg: Message, out: Outgoing, media: str,
                          state: "_LiveState") -> None:
        if msg.answered or state.spilling:
            return
        state.storing = self.engine.spawn(self._store_at_deadline(msg, out, media, state),
                                          "deadline store")

    async def _store_at_deadline(self, msg: Message, out: Outgoing, media: str,
                                 state: "_LiveState") -> None:
        self.counters["deadline"] += 1
        lease_until = time.time() + self.deliverer.lease
        stored = await self.offline.add(out, media, lease_until=lease_until,
                                        why="still being delivered at the answer deadline")
        if stored:
            state.stored_id = out.stored_id
            self._answer(msg, 202)
        else:
            self._answer(msg, 480)
        self.engine.answer_now(msg)
        log.info("delivery to %s still running at the answer deadline: answered %s",
                 out.user, msg.get("code"))

    async def _settle_late(self, out: Outgoing, state: "_LiveState", code: int,
                           route: Route) -> None:
        """The live attempt ended after we stored a copy: never leave both to be sent."""
        offline = self.offline
        store = offline.store
        if not state.stored_id or store is None or code == SENT_FROM_STORE:
            return
        if 200 <= code < 300 or route.nobody:  # delivered, or no such user after all
            await offline.discard(state.stored_id, out.user)
            self.counters["stored"] -= 1
            if 200 <= code < 300:
                self.counters["delivered"] += 1
        else:
            await store.release(state.stored_id, 1, time.time() + self.deliverer.backoff(1))

    # -- in-call MESSAGE ------------------------------------------------------------------
    async def _in_call(self, msg: Message, hops: int) -> bool:
        peer = msg.get("peerid", "")
        if not peer:
            return self._reject(msg, 481, "call has no other party")
        media = media_type(msg.get("xsip_type", ""))
        if media not in self.cfg["_types"]:
            return self._refuse(msg, unsupported_media(media, self.cfg["_accept"]))
        why = too_big(msg.get("xsip_body", ""), {}, self.cfg["max_body"])
        if why:
            return self._reject(msg, 413, why)
        if peer.startswith("sip/"):
            m = Message("xsip.generate", {"method": "MESSAGE", "id": peer, "wait": "true",
                                          "antiloop": str(max(hops - 1, 1)),
                                          "xsip_type": msg.get("sip_content-type") or
                                          msg.get("xsip_type", ""),
                                          "xsip_body": msg.get("xsip_body", "")})
            if msg.get("xsip_body_encoding"):
                m["xsip_body_encoding"] = msg["xsip_body_encoding"]
        else:
            m = Message("chan.text", {"id": peer, "targetid": peer,
                                      "text": msg.get("xsip_body", "")})
        try:
            ans = await self.engine.dispatch(
                m, timeout=max(msg.deadline - asyncio.get_running_loop().time() - 0.2, 0.05))
        except (DispatchTimeout, DispatchCancelled):
            return self._answer(msg, 408)
        if m.name == "chan.text":
            return self._answer(msg, 200 if ans.handled else 480)
        code = ans.get("code", "")
        code_i = int(code) if code.isdigit() else 0
        if 200 <= code_i < 300:
            self.counters["delivered"] += 1
            return self._answer(msg, code_i)
        return self._answer(msg, self._failure_code(code_i if code_i >= 200 else 0, Route([])))

    # -- recipe compatibility -------------------------------------------------------------
    def _lateroute(self, msg: Message) -> bool:
        if not msg.get("xsip_type"):
            return self._refuse(msg, unsupported_media("", self.cfg["_accept"]))
        caller, called = msg.get("caller", ""), msg.get("called", "")
        domain = msg.get("domain", "")
        m = Message("msg.execute", {"callto": f"lateroute/{called}", "caller": caller,
                                    "called": called, "domain": domain,
                                    "sip_From": f"<sip:{caller}@{domain}>",
                                    "xsip_type": msg.get("xsip_type", ""),
                                    "xsip_body": msg.get("xsip_body", "")})
        for k in ("username", "xsip_body_encoding", "antiloop"):
            if msg.get(k):
                m[k] = msg[k]
        log.info("Got SIP MESSAGE from %s to %s (lateroute)", caller, called)
        self.engine.enqueue(m)
        return self._answer(msg, 200)

    # -- Yate's own MESSAGE routing (ysipchan [message] enable=yes) ------------------------
    def on_msg_execute(self, msg: Message) -> Any:
        """Our msg.execute handler for sip/ targets (deferred, as :meth:`on_sip_message`)."""
        callto = msg.get("callto", "")
        if not (callto.startswith("sip/") or callto.startswith("sipgen/store/")):
            return False
        self.counters["received"] += 1
        hops = _hops(msg)
        if hops <= 0:
            return self._reject(msg, 483, "antiloop exhausted")
        try:
            inb = self._inbound(msg, hops)
        except Refusal as e:
            return self._refuse(msg, e)
        log.info("Got SIP MESSAGE from %s to %s via Yate's routing (%s)", inb.out.sender,
                 inb.out.user, callto)
        if callto.startswith("sipgen/store/"):
            if self._over_rate(msg, inb.out.sender):
                return True
            return self.engine.run_flow(msg, self._store_now(msg, inb))
        target = Target(callto, msg.get("oconnection_id") or "")
        return self._relay(msg, inb, Route([target]))

    async def _store_now(self, msg: Message, inb: Inbound) -> bool:
        stored = await self.offline.add(inb.out, inb.parties.media)
        return self._answer(msg, 202 if stored else 480)

    def on_route_offline(self, msg: Message) -> bool:
        if msg.get("error") != "offline" or not self.cfg.get("store") or self.store is None:
            return False
        ruri = parse_uri(msg.get("sip_uri", ""))
        user = (ruri.user if ruri else "") or msg.get("called", "")
        if not user or ruri is None:
            return False
        msg.retval = f"sipgen/store/{user}@{ruri.host}"
        del msg["error"]
        return True

    # -- automatic messages -------------------------------------------------------------
    async def submit(self, sender: str, recipient: str, content_type: str, body: str,
                     display: str = "") -> int:
        """Send an automatic MESSAGE (a notice, a service's reply). Never stored; returns the
        SIP code. Marked ``Auto-Submitted`` so no automatic sender answers it."""
        r_user, _, r_host = recipient.rpartition("@")
        s_user, _, s_host = sender.rpartition("@")
        out = Outgoing(user=recipient, sender=sender,
                       from_hdr=format_name_addr(f"sip:{sender}", display),
                       to_hdr=format_name_addr(f"sip:{recipient}"), content_type=content_type,
                       body=body, call_id=new_call_id(), from_tag=new_tag(),
                       received=time.time(), caller=s_user, called=r_user, auto=True)
        try:
            route = await self.deliverer.route(r_user, r_host, {"caller": s_user,
                                                                "domain": s_host,
                                                                "module": "sipgen"})
        except (DispatchTimeout, DispatchCancelled):
            return 408
        if not route.targets:
            return route.code or 480
        return await self.deliverer.send(out, route.targets)


@dataclass(slots=True, frozen=True)
class Parties:
    """What :meth:`MessageFeature._inbound` derives from who sends to whom (cached)."""

    user: str  # recipient key user@domain
    sender: str  # sender key user@host
    from_hdr: str
    to_hdr: str
    content_type: str
    media: str
    rcpt_user: str
    rcpt_host: str
    sender_user: str
    sender_host: str
    authenticated: bool
    foreign: bool
    notify_sender: bool
    route_wire: str  # our call.route's own params, escaped (Deliverer.route_wire)
    wire_headers: tuple[str, str, str]  # Outgoing.wire_headers


@dataclass(slots=True)
class _LiveState:
    """A live delivery racing its answer deadline."""

    storing: "asyncio.Future[None] | None" = None
    stored_id: int = 0
    spilling: bool = False  # being stored because the recipient's queue is too long
