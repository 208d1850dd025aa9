"""Per-sender rate limit: a token bucket per sender, in bounded memory.

A sender may send ``burst`` requests at once and ``rate`` per second on average. A bucket is
kept for every sender seen; past :attr:`RateLimiter.MAX_SENDERS` of them, a new sender first
drops the buckets that are full again (senders idle long enough to have their whole burst
back: forgetting them changes nothing), so a flood of distinct senders cannot grow it beyond
what is in use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token buckets by sender; :meth:`allow` takes one token (hot path: one call a request)."""

    #: Buckets kept before full ones are dropped.
    MAX_SENDERS = 10000

    __slots__ = ("rate", "burst", "clock", "_buckets")

    def __init__(self, rate: float = 5.0, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def configure(self, rate: float, burst: int) -> None:
        """New limits (a reload): the buckets are kept and fill at the new rate from now."""
        self.rate = rate
        self.burst = float(burst)

    def allow(self, sender: str) -> bool:
        """Take one of ``sender``'s tokens; False (nothing taken) when it has none left."""
        now = self.clock()
        rate, burst = self.rate, self.burst
        b = self._buckets.get(sender)
        if b is None:
            if len(self._buckets) > self.MAX_SENDERS:
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v.tokens + (now - v.stamp) * rate < burst}
            b = self._buckets[sender] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.stamp) * rate)
        b.stamp = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def retry_after(self) -> int:
        """Seconds a refused sender is told to wait (``Retry-After``): one token's time."""
        return max(1, math.ceil(1.0 / self.rate))

    def __len__(self) -> int:
        return len(self._buckets)
