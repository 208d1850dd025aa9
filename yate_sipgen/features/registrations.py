"""Who is registered where, as Yate's registrar saw it: the ``user.register`` and
``user.unregister`` watches (post-dispatch, with ``handled``), one table in memory.

Used to route a MESSAGE straight to a user's registered contact instead of asking Yate with a
``call.route`` round trip (``[message] routing=registrations``), and to know when a user comes
online. The table is a cache, never the truth:

* a user with no binding here, or with more than one (several phones: Yate's routing decides
  how to fork), is routed by Yate as before;
* a binding ends at its ``expires`` (regfile expires bindings silently, with no message), on
  ``user.unregister`` for that contact or that user, and on ``user.unregister`` with only a
  ``connection_id`` (a TCP/TLS transport died: every binding on it);
* ``REGISTER`` with ``Contact: *`` reaches no handler (reference Surprise 36), so such a binding
  lives on until it expires: a delivery to it then fails and the MESSAGE is stored, as for any
  unreachable phone;
* it starts empty: after a start, users are routed by Yate until they register again.

Other features use the same table rather than a second one: :meth:`Registrations.listen` tells
them of each REGISTER recorded (unsolicited MWI), :meth:`Registrations.bindings` lists a
user's contacts, and :meth:`Registrations.observe` feeds the table from Yate's messages only
when no watcher does already (the MESSAGE feature's, when it is on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..message import Message
from ..sip import parse_uri
from .delivery import Target

log = logging.getLogger("yate_sipgen.registrations")

#: Longest binding we believe without a refresh, whatever ``expires`` says (seconds).
MAX_EXPIRES = 86400


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact: the target, and where its REGISTER came from (``ip_host``,
    ``ip_port``, ``ip_transport``): the next hop of a request to it, as behind NAT the
    Contact itself may be unreachable."""

    target: Target
    host: str = ""
    port: str = ""
    transport: str = ""


class Registrations:
    """``user@domain`` -> live bindings (contact callto -> (binding, expires at))."""

    __slots__ = ("_by_user", "_key", "_clock", "_listeners")

    def __init__(self, key: Callable[[str, str], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = key  # (user, host) -> the user's key (domain aliases applied)
        self._clock = clock
        self._by_user: dict[str, dict[str, tuple[Binding, float]]] = {}
        self._listeners: list[Callable[[str, Binding], Any]] = []

    def listen(self, func: Callable[[str, Binding], Any]) -> None:
        """Call ``func(key, binding)`` for every REGISTER recorded (not for one that ends a
        binding with ``expires=0``)."""
        self._listeners.append(func)

    def observe(self, engine: Any) -> None:
        """Feed this table from ``user.register``/``user.unregister``, unless a watcher of
        the engine does already (one observation of Yate's registrations serves all)."""
        if any(getattr(f, "__self__", None) is self
               for f in engine.watchers.get("user.unregister", ())):
            return
        engine.watcher("user.register")(self.registered)
        engine.watcher("user.unregister")(self.unregistered)

    def __len__(self) -> int:
        return len(self._by_user)

    @staticmethod
    def user_of(msg: Message) -> tuple[str, str] | None:
        """(user, host) a ``user.register``/``user.unregister`` is about, or None."""
        user = msg.get("username") or msg.get("number") or ""
        uri = parse_uri(msg.get("sip_uri") or "")
        if not user or uri is None:
            return None
        return user, uri.host

    def registered(self, msg: Message) -> tuple[str, Target] | None:
        """A ``user.register`` watch: record a binding Yate accepted; returns (key, target)."""
        if not msg.handled:
            return None
        who = self.user_of(msg)
        data = msg.get("data") or ""
        if who is None or not data.startswith("sip/"):
            return None
        key = self._key(*who)
        target = Target(data, msg.get("oconnection_id") or msg.get("connection_id") or "")
        expires = msg.get("expires") or ""
        secs = min(int(expires), MAX_EXPIRES) if expires.isdigit() else 0
        bindings = self._by_user.setdefault(key, {})
        if secs <= 0:
            bindings.pop(data, None)
        else:
            binding = Binding(target, msg.get("ip_host") or "", msg.get("ip_port") or "",
                              (msg.get("ip_transport") or "").upper())
            bindings[data] = (binding, self._clock() + secs)
            for func in self._listeners:
                try:
                    func(key, binding)
                except Exception:  # noqa: BLE001 - a listener must not stop the others
                    log.exception("registration listener failed")
        if not bindings:
            del self._by_user[key]
        return key, target

    def unregistered(self, msg: Message) -> None:
        """A ``user.unregister`` watch (Yate answers them all 200, handled or not)."""
        who = self.user_of(msg)
        if who is None:
            conn = msg.get("connection_id") or ""
            if conn:
                self.drop_connection(conn)
            return
        key = self._key(*who)
        data = msg.get("data") or ""
        bindings = self._by_user.get(key)
        if bindings is None:
            return
        if data:
            bindings.pop(data, None)
        else:
            bindings.clear()
        if not bindings:
            del self._by_user[key]

    def drop_connection(self, conn: str) -> None:
        for key in list(self._by_user):
            bindings = self._by_user[key]
            for data in [d for d, (b, _) in bindings.items()
                         if b.target.connection_id == conn]:
                del bindings[data]
            if not bindings:
                del self._by_user[key]

    def target(self, key: str) -> Target | None:
        """The one live binding of ``key``; None when there is none or several."""
        bindings = self._by_user.get(key)
        if bindings is None:
            return None
        now = self._clock()
        if len(bindings) != 1:
            for data in [d for d, (_, until) in bindings.items() if until <= now]:
                del bindings[data]
            if len(bindings) != 1:
                if not bindings:
                    del self._by_user[key]
                return None
        ((binding, until),) = bindings.values()
        if until <= now:
            del self._by_user[key]
            return None
        return binding.target

    def bindings(self, key: str) -> list[Binding]:
        """Every live binding of ``key`` (expired ones dropped)."""
        bindings = self._by_user.get(key)
        if bindings is None:
            return []
        now = self._clock()
        for data in [d for d, (_, until) in bindings.items() if until <= now]:
            del bindings[data]
        if not bindings:
            del self._by_user[key]
        return [b for b, _ in bindings.values()]

    def clear(self) -> None:
        self._by_user.clear()
