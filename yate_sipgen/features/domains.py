"""The domains we serve, shared by every feature: which Request-URI hosts are ours, and the
``user@domain`` key a user is known by (MESSAGE store, registrations, subscriptions,
publications, MWI counts).

From ``[message] domains`` and ``domain_aliases``: with aliases on, every host of the list
names the first one (a phone registering at 192.0.2.10 and a sender writing to example.com
mean the same user). An empty list serves every host.
"""

from __future__ import annotations

from collections.abc import Iterable


class Domains:
    __slots__ = ("hosts", "main", "aliases")

    def __init__(self, hosts: Iterable[str] = (), aliases: bool = True) -> None:
        listed = [h.lower() for h in hosts]
        self.hosts = frozenset(listed)
        self.main = listed[0] if listed else ""
        self.aliases = aliases

    @classmethod
    def from_config(cls, message_section: dict) -> "Domains":
        return cls(message_section["domains"], bool(message_section["domain_aliases"]))

    def serves(self, host: str) -> bool:
        """Is ``host`` ours (always, when no domain is listed)?"""
        return not self.hosts or host.lower() in self.hosts

    def is_foreign(self, host: str) -> bool:
        """A host outside a non-empty list (``serves`` is its negation)."""
        return bool(self.hosts) and host.lower() not in self.hosts

    def user_key(self, user: str, host: str) -> str:
        """``user@domain``, the host mapped to the main domain when it is an alias."""
        host = host.lower()
        if self.aliases and host in self.hosts:
            host = self.main
        return f"{user}@{host}"

    def canonical_key(self, key: str) -> str:
        user, _, host = key.rpartition("@")
        return self.user_key(user, host) if user else key
