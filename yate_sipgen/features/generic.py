"""Every other generic SIP method an operator lists: out-of-dialog NOTIFY, INFO, custom ones.

``[generic] methods`` gives each method a policy: ``relay`` (to the Request-URI user, routed as
a MESSAGE is -- our view of registrations, else Yate's ``call.route`` -- and answered with the
outcome; nothing is stored) or a fixed SIP code. One ``install`` per ``sip.<method>``.

NOTIFY has rules of its own, whatever its policy:

* in a Yate call's dialog (``id`` set) with ``Event: refer`` (the REFER progress of a transfer)
  -> 200;
* any other in-dialog NOTIFY (a To tag) -> 481: we keep no subscription we did not make;
* ``Event: check-sync`` without authentication is never relayed (403): it reboots phones.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import config as config_mod
from ..config import Declarations
from ..errors import DispatchCancelled, DispatchTimeout, LocalProtocolError
from ..message import Message
from ..sip import header_safe, parse_name_addr, parse_uri
from ..events.subscription import parse_event
from . import BaseFeature
from .delivery import Target, parse_route
from .identity import requester
from .validation import hops

log = logging.getLogger("yate_sipgen.generic")

#: This module's sipgen.conf keys (assembled into the schema by features.schema()).
CONFIG = Declarations()
key = CONFIG.key

S = "generic"
CONFIG.docs[S] = (
    "Other generic SIP methods (ysipchan.conf [methods]): what each is answered, or whether it "
    "is relayed to the Request-URI user.")
key(S, "methods", "list", (),
    "method:policy pairs, e.g. notify:relay, info:relay, x-custom:488. relay: deliver it to "
    "the Request-URI user (a registered contact, else Yate's routing) and answer with the "
    "outcome (480 when unreachable; nothing is stored). A number: answer that code. Each "
    "method must also be in ysipchan.conf [methods]. Used only at start.")
key(S, "priority", "int", 50, "Priority of our sip.<method> handlers.", minimum=0, maximum=1000)
key(S, "timeout", "int", 10, "Seconds to wait for the recipient of a relayed request.",
    minimum=1, maximum=60)

#: Request headers copied onto a relayed request (the rest is the dialog's or Yate's).
RELAYED_HEADERS = ("event", "subscription-state", "info-package", "content-disposition",
                   "user-agent")


def parse_policies(items: tuple[str, ...] | list[str]) -> dict[str, str | int]:
    """``("notify:relay", "info:415")`` -> ``{"notify": "relay", "info": 415}``; raises
    ValueError naming a bad item."""
    out: dict[str, str | int] = {}
    for item in items:
        method, _, policy = item.partition(":")
        method, policy = method.strip().lower(), policy.strip().lower()
        if not method or not method.replace("-", "").isalnum() or method in (
                "message", "subscribe", "publish", "invite", "register"):
            raise ValueError(f"bad method in {item!r}")
        if policy == "relay":
            out[method] = "relay"
        elif policy.isdigit() and 200 <= int(policy) <= 699:
            out[method] = int(policy)
        else:
            raise ValueError(f"bad policy in {item!r} (relay or a SIP code 200-699)")
    return out


def _check(cfg: config_mod.Config) -> list[str]:
    try:
        parse_policies(cfg[S]["methods"])
    except ValueError as e:
        return [f"{cfg.path}: [generic] methods: {e}"]
    return []


CONFIG.checks.append(_check)


class GenericFeature(BaseFeature):
    name = "generic"
    config = CONFIG

    def __init__(self) -> None:
        self.policies: dict[str, str | int] = {}

    @classmethod
    def sip_methods(cls, cfg: config_mod.Config) -> dict[str, str]:
        try:
            pol = parse_policies(cfg[S]["methods"])
        except ValueError:
            return {}
        return {m: "no" for m in pol}

    @classmethod
    def yate_notes(cls, cfg: config_mod.Config) -> list[str]:
        if not cfg[S]["methods"]:
            return []
        return ["the [generic] methods are listed with =no: Yate does not challenge them "
                "(check-sync NOTIFYs are refused unless authenticated: set notify=yes to "
                "have Yate challenge NOTIFY)"]

    def setup(self, app: Any) -> None:
        self.app = app
        self.engine = app.engine
        self.counters = app.stats.feature("generic")
        try:
            self.policies = parse_policies(app.config[S]["methods"])
        except ValueError:
            self.policies = {}
        prio = app.config[S]["priority"]
        for method in self.policies:
            self.engine.add_handler("sip." + method, self.on_request, priority=prio,
                                    owner="generic")

    def reconfigure(self, cfg: config_mod.Config) -> None:
        self.timeout = float(cfg[S]["timeout"])

    def _answer(self, msg: Message, code: int, why: str) -> bool:
        msg["code"] = str(code)
        self.counters[f"{msg.name[4:]}_{code}"] += 1
        if code >= 300:
            log.info("%s from %s to %s answered %d: %s", msg.name[4:].upper(),
                     msg.get("caller", "?"), msg.get("sip_uri", "?"), code, why)
        return True

    async def on_request(self, msg: Message) -> bool:
        method = msg.name[4:]
        to = parse_name_addr(msg.get("sip_to") or "")
        if method == "notify":
            ev = parse_event(msg.get("sip_event"))
            if msg.get("id") and ev is not None and ev.package == "refer":
                return self._answer(msg, 200, "REFER progress in a call")
            if to is not None and to.tag:
                return self._answer(msg, 481, "in-dialog NOTIFY of no subscription of ours")
            if ev is not None and ev.package == "check-sync":
                mf = self.app.feature("message")  # its [message] trusted_lines
                trusted = mf.cfg.get("_trusted", frozenset()) if mf is not None else frozenset()
                if not requester(msg, None, trusted).vouched:
                    return self._answer(msg, 403, "unauthenticated check-sync")
        policy = self.policies.get(method, 405)
        if policy != "relay":
            return self._answer(msg, int(policy), "fixed policy")
        if to is not None and to.tag:
            return self._answer(msg, 481, "in-dialog request of no dialog of ours")
        return await self._relay(msg, method)

    async def _relay(self, msg: Message, method: str) -> bool:
        left = hops(msg)
        if left <= 1:  # the onward request would leave with none (RFC 3261 §16.3: 483)
            return self._answer(msg, 483, "no hop left to forward")
        ruri = parse_uri(msg.get("sip_uri") or "")
        frm = parse_name_addr(msg.get("sip_from") or "")
        if ruri is None or not ruri.user or frm is None:
            return self._answer(msg, 400, "no user in the Request-URI or bad From")
        mf = self.app.feature("message")
        if mf is not None and not mf.serves(ruri.host):
            return self._answer(msg, 403, f"{ruri.host} is not a domain we serve")
        user_key = mf.user_key(ruri.user, ruri.host) if mf is not None else ruri.aor
        target = mf.registrations.target(user_key) if mf is not None else None
        if target is None:
            try:
                route = parse_route(await mf.deliverer.route_request(
                    ruri.user, ruri.host, {"caller": frm.uri.user, "domain": frm.uri.host,
                                           "module": "sipgen"}, timeout=5.0))
            except (DispatchTimeout, DispatchCancelled):
                return self._answer(msg, 480, "routing failed")
            if not route.targets or not route.targets[0].is_sip:
                return self._answer(msg, 480 if route.offline or not route.code else route.code,
                                    "not reachable")
            target = route.targets[0]
        return await self._send(msg, method, target, left - 1)

    async def _send(self, msg: Message, method: str, target: Target, antiloop: int) -> bool:
        p = {"method": method.upper(), "uri": target.uri, "wait": "true",
             "antiloop": str(antiloop)}
        try:
            p["sip_From"] = header_safe(msg.get("sip_from") or "")
            p["sip_To"] = header_safe(msg.get("sip_to") or "")
            for h in RELAYED_HEADERS:
                v = msg.get("sip_" + h)
                if v:
                    p["sip_" + h.title()] = header_safe(v)
        except ValueError as e:
            return self._answer(msg, 400, str(e))
        if msg.get("xsip_body"):
            p["xsip_type"] = msg.get("xsip_type") or "application/octet-stream"
            p["xsip_body"] = msg.get("xsip_body") or ""
            if msg.get("xsip_body_encoding"):
                p["xsip_body_encoding"] = msg.get("xsip_body_encoding")
        if target.connection_id:
            p["connection_id"] = target.connection_id
        try:
            answer = await self.engine.dispatch(Message("xsip.generate", p),
                                                timeout=self.timeout)
        except DispatchTimeout:
            return self._answer(msg, 408, "no answer from the recipient")
        except DispatchCancelled:
            return self._answer(msg, 500, "connection to Yate lost")
        except LocalProtocolError as e:
            return self._answer(msg, 413, str(e))
        code = answer.get("code") or ""
        code_i = int(code) if code.isdigit() else 480
        if code_i in (401, 407):
            code_i = 500  # the recipient challenged us: we cannot relay its challenge
        return self._answer(msg, code_i if 200 <= code_i <= 699 else 480, "relayed")
