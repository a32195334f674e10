"""Admission before authentication: per-source rate limits, pools, penalties.

- SourceRateLimiter: a token bucket per source.
- source_bucket: strangers are counted per IPv4 address and per IPv6 /48.
- PenaltyBox: sources whose connections time out or fail authentication
  are refused for a growing time (as OpenSSH's PerSourcePenalties).
- Admission: allowed sources (MITIGATOR's) get slots strangers cannot
  take; strangers share the rest under per-source caps and penalties.

Bounded memory: the rate and penalty tables hold at most ``max_sources``
entries each (MAX_SOURCES by default, a few MB at most), whatever the
number of sources a flood comes from, and each new source costs O(log n)
at worst, never a scan of the table.  What is forgotten when a table is
full is chosen so that forgetting gives nobody more than a new source
gets anyway (see each class).  The other per-source state, the count of
unauthenticated strangers, is bounded by their slots.
"""

from __future__ import annotations

import heapq
import ipaddress
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union

MAX_SOURCES = 16384  # entries per table; ~200 bytes each


@dataclass
class _Bucket:
    tokens: float
    updated: float


class SourceRateLimiter:
    """Token bucket per source: ``burst`` tokens refilled at ``rate`` per second.

    A connection takes one token or is refused.  At most ``max_sources``
    buckets are kept: when a new source arrives at a full table, the
    bucket of the source seen least recently is dropped.  A dropped source
    starts again with a full bucket, which is exactly what a never-seen
    source gets, so eviction hands nobody more than a new address would;
    and to push one source's bucket out an attacker must first connect from
    ``max_sources`` other sources, each of which spends its own tokens.
    A bucket that has refilled carries no information at all, and the
    least recently seen bucket is the one that has had longest to refill.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = MAX_SOURCES) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._clock = clock
        self._buckets: "OrderedDict[str, _Bucket]" = OrderedDict()  # least recently seen first

    def allow(self, source: str) -> bool:
        """Take a token for ``source``; False when its bucket is empty."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            while len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def __len__(self) -> int:
        return len(self._buckets)


# --- admission before authentication ----------------------------------------------

# One IPv6 host owns a /64 and one site (one attacker's allocation) a /48: its 65,536 /64s count as one.
IPV6_SOURCE_PREFIX = 48


def source_bucket(address: str) -> str:
    """The unit strangers are counted in: an IPv4 address, or an IPv6 /48.

    ``192.0.2.7`` stays ``192.0.2.7``; ``2001:db8:1:2::99`` becomes
    ``2001:db8:1::/48`` (every address of one /48 shares one count, one
    rate bucket and one penalty: a host can use all of its /64, and
    whoever holds a /48 all of its 65,536 /64s); IPv4-mapped IPv6 counts
    as its IPv4 address.  Anything that is not an IP address (a Unix
    socket peer) is its own bucket.  MITIGATOR's own sources are not
    strangers (allowed, named by from=, or known: knownsources.py), so a
    flood from its neighbours' addresses cannot hold it back.
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
    them does, for longer the longer it goes on.

    At most ``max_sources`` penalties are kept.  When a new source offends
    and the table is full, the penalty that ends first (an expired one
    first of all) is dropped if it ends before the newcomer's would;
    otherwise the newcomer's offence is not kept.  A refused source owes
    more than ``min_seconds``, more than any single offence costs (each
    offence's seconds are below ``min_seconds``), so no newcomer ever
    pushes it out: a refused source is never forgotten while it is
    refused, however many sources a flood comes from.  What the bound
    costs instead: while the table is full of longer penalties, the
    offences of further sources are not kept, so a flood from more than
    ``max_sources`` sources leaves the excess unpenalised; they still pass
    the rate limit and share the strangers' slots, never MITIGATOR's.
    """

    def __init__(self, settings: PenaltySettings = PenaltySettings(),
                 clock: Callable[[], float] = time.monotonic, max_sources: int = MAX_SOURCES) -> None:
        if max_sources < 1:
            raise ValueError("max_sources must be >= 1")
        self.settings = settings
        self.max_sources = max_sources
        self._clock = clock
        self._expiry: Dict[str, float] = {}
        # (expiry, bucket) for every kept penalty, earliest first; entries
        # whose expiry no longer matches _expiry are stale and skipped.
        self._ending: List[Tuple[float, str]] = []

    def add(self, bucket: str, offence: str) -> Tuple[float, bool]:
        """Record ``offence`` (``noauth``, ``authfail`` or ``grace_exceeded``).

        Returns (seconds of penalty left, whether this offence made the
        source refused when it was not before); (0, False) when the table
        is full and the offence was not kept (see the class).
        """
        now = self._clock()
        was_active = self.remaining(bucket) > self.settings.min_seconds
        seconds = float(getattr(self.settings, offence))
        expiry = min(max(self._expiry.get(bucket, now), now) + seconds, now + self.settings.max_seconds)
        if bucket not in self._expiry and len(self._expiry) >= self.max_sources \
                and not self._make_room(now, expiry):
            return 0.0, False
        self._expiry[bucket] = expiry
        heapq.heappush(self._ending, (expiry, bucket))
        if len(self._ending) > 2 * len(self._expiry) + 64:  # too many stale entries: rebuild
            self._ending = [(end, key) for key, end in self._expiry.items()]
            heapq.heapify(self._ending)
        left = expiry - now
        return left, left > self.settings.min_seconds and not was_active

    def _make_room(self, now: float, newcomer_expiry: float) -> bool:
        """Drop the penalty that ends first, unless the newcomer's ends earlier; True if room was made."""
        while self._ending:
            expiry, bucket = self._ending[0]
            if self._expiry.get(bucket) != expiry:
                heapq.heappop(self._ending)  # stale
                continue
            if expiry > now and expiry >= newcomer_expiry:
                return False
            heapq.heappop(self._ending)
            del self._expiry[bucket]
            return True
        return False

    def remaining(self, bucket: str) -> float:
        """Seconds of penalty left for ``bucket`` (0 when none)."""
        expiry = self._expiry.get(bucket)
        if expiry is None:
            return 0.0
        left = expiry - self._clock()
        if left <= 0:
            del self._expiry[bucket]  # its heap entry goes stale
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
    patterns, the explicit allow list, and the sources that polled before
    with a listed key) have ``allowed_slots`` of their
    own, which strangers can never take, and are never penalised.
    Strangers share ``stranger_slots``, at most ``per_source`` of them per
    bucket (IPv4 address or IPv6 /48, see source_bucket), pass a token
    bucket per source bucket (``rate``/``burst``) and are refused while
    penalised (PenaltyBox).  ``admit`` returns a Ticket or the reason for
    refusal; every Ticket must be given back with ``release``.  The rate
    and penalty tables keep at most ``max_sources`` sources each (see
    their classes for what is forgotten first).
    """

    def __init__(self, stranger_slots: int, per_source: int, allowed_slots: int, rate: float, burst: int,
                 is_allowed: Callable[[str], bool], penalties: PenaltySettings = PenaltySettings(),
                 clock: Callable[[], float] = time.monotonic, max_sources: int = MAX_SOURCES) -> None:
        self.stranger_slots = stranger_slots
        self.per_source = per_source
        self.allowed_slots = allowed_slots
        self._is_allowed = is_allowed
        self.limiter = SourceRateLimiter(rate, burst, clock, max_sources)
        self.penalties = PenaltyBox(penalties, clock, max_sources)
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
