"""Admission before authentication: per-source rate limits, pools, penalties.

- SourceRateLimiter: a token bucket per source.
- source_bucket: strangers are counted per IPv4 address and per IPv6 /64.
- PenaltyBox: sources whose connections time out or fail authentication
  are refused for a growing time (as OpenSSH's PerSourcePenalties).
- Admission: allowed sources (MITIGATOR's) get slots strangers cannot
  take; strangers share the rest under per-source caps and penalties.

Token buckets:

Each source address owns a bucket of ``burst`` tokens refilled at ``rate``
tokens per second; a connection takes one token or is refused.  Buckets
that have refilled completely carry no information and are dropped once
the table grows, so a flood from many addresses cannot grow memory without
bound.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

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


# --- admission before authentication ----------------------------------------------

IPV6_SOURCE_PREFIX = 64  # one IPv6 host usually owns a whole /64


def source_bucket(address: str) -> str:
    """The unit strangers are counted in: an IPv4 address, or an IPv6 /64.

    ``192.0.2.7`` stays ``192.0.2.7``; ``2001:db8:1:2::99`` becomes
    ``2001:db8:1:2::/64`` (every address of one /64 shares one count, one
    rate bucket and one penalty, since one host can use all of them);
    IPv4-mapped IPv6 counts as its IPv4 address.  Anything that is not an
    IP address (a Unix socket peer) is its own bucket.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


@dataclass(frozen=True)
class PenaltySettings:
    """Seconds added per offence, and when a source is refused (OpenSSH PerSourcePenalties)."""

    noauth: float = 1.0          # closed (or dropped) without authenticating
    authfail: float = 5.0        # a key refused and no login followed
    grace_exceeded: float = 10.0  # held a connection until the login timeout
    min_seconds: float = 15.0    # refused once the accumulated penalty exceeds this
    max_seconds: float = 600.0   # never penalised for longer than this


class PenaltyBox:
    """Accumulating penalties per source bucket, like sshd's PerSourcePenalties.

    Each offence adds its seconds to what is left of the source's penalty
    (so repeated offences make it grow), capped at ``max_seconds``; the
    source is refused while more than ``min_seconds`` are left.  A single
    timeout or refused key therefore never locks anyone out, a flood of
    them does, for longer the longer it goes on.  Expired entries are
    dropped when the table grows.
    """

    def __init__(self, settings: PenaltySettings = PenaltySettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._expiry: Dict[str, float] = {}

    def add(self, bucket: str, offence: str) -> Tuple[float, bool]:
        """Record ``offence`` (``noauth``, ``authfail`` or ``grace_exceeded``).

        Returns (seconds of penalty left, whether this offence made the
        source refused when it was not before).
        """
        now = self._clock()
        was_active = self.remaining(bucket) > self.settings.min_seconds
        if len(self._expiry) >= PRUNE_ABOVE:
            self._expiry = {key: expiry for key, expiry in self._expiry.items() if expiry > now}
        seconds = float(getattr(self.settings, offence))
        expiry = min(max(self._expiry.get(bucket, now), now) + seconds, now + self.settings.max_seconds)
        self._expiry[bucket] = expiry
        left = expiry - now
        return left, left > self.settings.min_seconds and not was_active

    def remaining(self, bucket: str) -> float:
        """Seconds of penalty left for ``bucket`` (0 when none)."""
        expiry = self._expiry.get(bucket)
        if expiry is None:
            return 0.0
        left = expiry - self._clock()
        if left <= 0:
            del self._expiry[bucket]
            return 0.0
        return left

    def refused_for(self, bucket: str) -> float:
        """Seconds until ``bucket`` may connect again; 0 when it may now."""
        left = self.remaining(bucket)
        return left - self.settings.min_seconds if left > self.settings.min_seconds else 0.0

    def __len__(self) -> int:
        return len(self._expiry)


@dataclass(frozen=True)
class Ticket:
    """An admitted, not yet authenticated connection: its bucket and pool."""

    bucket: str
    allowed: bool


class Admission:
    """Who may hold a connection that has not authenticated yet.

    Two pools.  Allowed sources (``is_allowed``: the keys file's from=
    patterns or the explicit allow list) have ``allowed_slots`` of their
    own, which strangers can never take, and are never penalised.
    Strangers share ``stranger_slots``, at most ``per_source`` of them per
    bucket (IPv4 address or IPv6 /64, see source_bucket), pass a token
    bucket per source bucket (``rate``/``burst``) and are refused while
    penalised (PenaltyBox).  ``admit`` returns a Ticket or the reason for
    refusal; every Ticket must be given back with ``release``.
    """

    def __init__(self, stranger_slots: int, per_source: int, allowed_slots: int, rate: float, burst: int,
                 is_allowed: Callable[[str], bool], penalties: PenaltySettings = PenaltySettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stranger_slots = stranger_slots
        self.per_source = per_source
        self.allowed_slots = allowed_slots
        self._is_allowed = is_allowed
        self.limiter = SourceRateLimiter(rate, burst, clock)
        self.penalties = PenaltyBox(penalties, clock)
        self._strangers: Counter[str] = Counter()
        self._strangers_total = 0
        self._allowed_total = 0

    def admit(self, address: str) -> Union[Ticket, str]:
        """Count a new connection from ``address`` in, or say why it is refused."""
        bucket = source_bucket(address)
        if self._is_allowed(address):
            if self._allowed_total >= self.allowed_slots:
                return f"too many unauthenticated connections from allowed sources ({self._allowed_total})"
            self._allowed_total += 1
            return Ticket(bucket, True)
        wait = self.penalties.refused_for(bucket)
        if wait > 0:
            return f"source {bucket} penalised for {wait:.0f} s more"
        if not self.limiter.allow(bucket):
            return (f"rate limit: over {self.limiter.burst} connections from {bucket}"
                    f" at {self.limiter.rate:g}/s")
        if self._strangers_total >= self.stranger_slots:
            return f"too many unauthenticated connections ({self._strangers_total})"
        if self._strangers[bucket] >= self.per_source:
            return f"too many unauthenticated connections from {bucket} ({self._strangers[bucket]})"
        self._strangers[bucket] += 1
        self._strangers_total += 1
        return Ticket(bucket, False)

    def release(self, ticket: Ticket) -> None:
        """The ticket's connection authenticated or went away."""
        if ticket.allowed:
            self._allowed_total -= 1
            return
        self._strangers_total -= 1
        self._strangers[ticket.bucket] -= 1
        if self._strangers[ticket.bucket] <= 0:
            del self._strangers[ticket.bucket]

    def penalise(self, ticket: Ticket, offence: str) -> Tuple[float, bool]:
        """Record an offence of the ticket's source (allowed sources are exempt)."""
        if ticket.allowed:
            return 0.0, False
        return self.penalties.add(ticket.bucket, offence)

    def counts(self) -> Tuple[int, int]:
        """(unauthenticated strangers, unauthenticated allowed) right now."""
        return self._strangers_total, self._allowed_total
