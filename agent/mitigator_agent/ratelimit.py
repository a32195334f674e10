"""Per-source connection rate limiting (token buckets).

Each source address owns a bucket of ``burst`` tokens refilled at ``rate``
tokens per second; a connection takes one token or is refused.  Buckets
that have refilled completely carry no information and are dropped once
the table grows, so a flood from many addresses cannot grow memory without
bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict

PRUNE_ABOVE = 4096  # buckets kept before full ones are dropped


@dataclass
class _Bucket:
    tokens: float
    updated: float


class SourceRateLimiter:
    """Token bucket per source address."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: Dict[str, _Bucket] = {}

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)

    def allow(self, source: str) -> bool:
        """Take a token for ``source``; False when its bucket is empty."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= PRUNE_ABOVE:
                self._prune(now)
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
        bucket.tokens = self._refilled(bucket, now)
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _prune(self, now: float) -> None:
        full = [source for source, bucket in self._buckets.items()
                if self._refilled(bucket, now) >= self.burst]
        for source in full:
            del self._buckets[source]

    def __len__(self) -> int:
        return len(self._buckets)
