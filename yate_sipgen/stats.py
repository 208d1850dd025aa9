"""Counters shown by ``status sipgen`` and ``sipgen stats``."""

from __future__ import annotations

import time
from collections import Counter


class Stats:
    """Plain counters; cheap enough for the hot path (a dict increment each)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.handled: Counter[str] = Counter()  # incoming messages by name
        self.codes: Counter[str] = Counter()  # SIP answers by code
        self.events: Counter[str] = Counter()  # timeouts, errors, overload, bad lines, ...
        self.features: dict[str, Counter[str]] = {}

    def feature(self, name: str) -> Counter[str]:
        """A counter group owned by one feature (shown as ``<feature>.<key>``)."""
        c = self.features.get(name)
        if c is None:
            c = self.features[name] = Counter()
        return c

    def uptime(self) -> int:
        return int(time.monotonic() - self.started)

    def summary(self) -> dict[str, int]:
        """The status line's main counters."""
        out = {
            "uptime": self.uptime(),
            "handled": sum(self.handled.values()),
            "timeouts": self.events["answer_deadline"] + self.events["dispatch_timeout"],
            "errors": self.events["handler_error"],
            "overload": self.events["overload"],
        }
        return out

    def details(self) -> list[tuple[str, int]]:
        rows: list[tuple[str, int]] = []
        rows += sorted(self.handled.items())
        rows += [(f"code{k}", v) for k, v in sorted(self.codes.items())]
        rows += sorted(self.events.items())
        for fname, c in sorted(self.features.items()):
            rows += [(f"{fname}.{k}", v) for k, v in sorted(c.items())]
        return rows
