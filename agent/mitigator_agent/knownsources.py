"""The sources MITIGATOR has polled from, remembered so that a flood of strangers cannot keep it out.

An admin who adds MITIGATOR's key as the README says (no ``from=``, no ``--allow``) names none of
its addresses, and until now such a key competed with every stranger for the admission slots.
The agent knows better after the first poll: a source that authenticated with a listed key is
MITIGATOR's.

Behaviour:

- After a key authenticates, its source address (an IPv4 address, or an IPv6 address exactly;
  IPv4-mapped IPv6 counts as IPv4) is remembered with the key's fingerprint and instance name
  and the time.  A known source gets the admission pool of MITIGATOR's addresses
  (ratelimit.Admission: slots strangers cannot take, no penalties) for as long as the key it
  polled with is listed in the keys file and still admits it (from=).  Admission only: every
  login is still authenticated against the keys file.
- A source not seen for ``MAX_AGE_SECONDS`` (30 days) is forgotten; at most ``MAX_SOURCES`` are
  kept, the one seen least recently dropped first.
- Kept in ``STATE_DIR/known-sources.json`` (mode 0600, written atomically, at most once a
  second; a source already known is written again only when its time is an hour old), so a
  restart or a reboot keeps the reservation.  It holds addresses, fingerprints and instance
  names: no secret.  A file that cannot be read or trusted (StrictModes, as the anycast store)
  is logged and ignored: the agent then starts with no known source, as on its first day.
- A new MITIGATOR address is a stranger until it has authenticated once; it gets in as soon as
  the strangers' slots have room, which their penalties give back.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from . import logs
from .atomic import write_file_atomically, write_soon
from .authkeys import default_allowed_owners, strict_modes_problem

FILE_NAME = "known-sources.json"
FILE_MODE = 0o600
STATE_DIR_MODE = 0o700
SCHEMA_VERSION = 1
MAX_SOURCES = 256
MAX_AGE_SECONDS = 30 * 86400
REFRESH_SECONDS = 3600.0  # a known source's time is written again once it is this old
WRITE_DELAY = 1.0
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class KnownSource:
    """One source that authenticated with one key."""

    address: str
    key: str        # SHA256:... of the key it authenticated with
    instance: str   # that key's instance name when it last polled ("" for none)
    last: float     # Unix seconds


class KnownSourcesError(Exception):
    """The file cannot be read or trusted; the message names it and says why."""


def normalised(address: str) -> Optional[str]:
    """The address as it is remembered (IPv4-mapped IPv6 as IPv4), or None for no IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def read_known_sources(state_dir: str, allowed_owners: Optional[FrozenSet[int]] = None) -> List[KnownSource]:
    """What the file holds ([] when there is none); KnownSourcesError when it cannot be used."""
    path = path_in(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise KnownSourcesError(f"{path}: {reason}") from None
    try:
        owners = allowed_owners if allowed_owners is not None else default_allowed_owners()
        problem = strict_modes_problem(path, os.fstat(fd), owners, label="known sources")
        if problem is not None:
            raise KnownSourcesError(problem)
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KnownSourcesError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        document = json.loads(data)
        if document.get("version") != SCHEMA_VERSION:
            raise ValueError(f"version {document.get('version')!r}, expected {SCHEMA_VERSION}")
        sources = []
        for item in document["sources"]:
            address = normalised(str(item["address"]))
            if address is None:
                raise ValueError(f"{item['address']!r} is not an IP address")
            sources.append(KnownSource(address, str(item["key"]), str(item["instance"]), float(item["last"])))
        return sources
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KnownSourcesError(f"{path} is not the agent's list of known sources ({exc})") from None


class KnownSources:
    """The remembered sources, in memory and in the state directory's file."""

    def __init__(self, state_dir: str, logger: Optional[logging.Logger] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.path = path_in(state_dir)
        self._log = logger or logs.get_logger()
        self._clock = clock
        self._sources: Dict[Tuple[str, str], KnownSource] = {}
        # address -> its sources: admission asks about every connection, a flood's included
        self._by_address: Dict[str, List[KnownSource]] = {}
        self._write_pending: Optional[asyncio.TimerHandle] = None
        self._broken = False

    def load(self) -> None:
        """Read the file (at start); a problem is logged and the agent starts knowing no source."""
        try:
            sources = read_known_sources(self.state_dir)
        except KnownSourcesError as exc:
            self._log.warning(logs.event("known-sources-ignored", reason=str(exc),
                                         effect="no source is known until MITIGATOR polls again",
                                         fix=f"remove {self.path}; the agent writes it anew"))
            return
        now = self._clock()
        fresh = sorted((s for s in sources if now - s.last < MAX_AGE_SECONDS), key=lambda s: s.last)
        self._sources = {(s.address, s.key): s for s in fresh[-MAX_SOURCES:]}
        self._index()

    def _index(self) -> None:
        self._by_address = {}
        for source in self._sources.values():
            self._by_address.setdefault(source.address, []).append(source)

    def keys_of(self, address: str) -> FrozenSet[str]:
        """Fingerprints of the keys that authenticated from ``address`` (not forgotten yet)."""
        sources = self._by_address.get(normalised(address) or "")
        if not sources:
            return frozenset()
        now = self._clock()
        return frozenset(s.key for s in sources if now - s.last < MAX_AGE_SECONDS)

    def sources(self) -> List[KnownSource]:
        """Every remembered source, the most recently seen first."""
        return sorted(self._sources.values(), key=lambda s: s.last, reverse=True)

    def remember(self, address: str, key: str, instance: str) -> None:
        """``key`` authenticated from ``address``: remember (or refresh) it; never raises."""
        plain = normalised(address)
        if plain is None:
            return
        now = self._clock()
        known = self._sources.get((plain, key))
        if known is not None and known.instance == instance and now - known.last < REFRESH_SECONDS:
            return
        if known is None:
            self._log.info(logs.event("source-remembered", src=plain, key=key, instance=instance or "-",
                                      effect="admitted ahead of strangers from now on"))
            while len(self._sources) >= MAX_SOURCES:
                del self._sources[min(self._sources, key=lambda k: self._sources[k].last)]
        self._sources[(plain, key)] = KnownSource(plain, key, instance, now)
        self._index()  # a new or refreshed source: at most once an hour per source
        self._schedule_write()

    def _schedule_write(self) -> None:
        if self._write_pending is None:
            self._write_pending = write_soon(WRITE_DELAY, self._write)

    def flush(self) -> None:
        """Write now what is waiting to be written (the agent stops); never raises."""
        if self._write_pending is not None:
            self._write_pending.cancel()
            self._write()

    def _write(self) -> None:
        self._write_pending = None
        document = {"version": SCHEMA_VERSION, "sources": [asdict(s) for s in self.sources()]}
        try:
            try:
                os.mkdir(self.state_dir, STATE_DIR_MODE)
            except FileExistsError:
                pass
            write_file_atomically(self.path, (json.dumps(document, indent=1) + "\n").encode(), FILE_MODE)
        except OSError as exc:
            if not self._broken:
                self._log.warning(logs.event(
                    "known-sources-not-saved", path=self.path, reason=exc.strerror or str(exc),
                    effect="known sources are forgotten when the agent restarts",
                    fix="give the agent a writable state directory (state-dir)"))
            self._broken = True
        else:
            self._broken = False
