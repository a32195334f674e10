"""Anycast mode: MITIGATOR's ``set`` command, its stored copy and its replay.

Several servers behind one address must make identical cookies, so
MITIGATOR copies one server's secrets and sysctls to the others with
``set;NET;SYNCOOKIE;SYNCOOKIE6;TS;ECN;SACK;TIMESTAMPS;WSCALE``.

Rules this module enforces:

- Off unless the administrator names the key instances allowed to use it
  (``--anycast-instance NAME``, repeatable; the instance is the trailing
  comment of the key's line in the keys file).  Everyone else is refused.
- The whole command is validated before anything is written: 8 arguments,
  or 7 in the layout of MITIGATOR versions before isn_sync 26.04
  (``set;NET;SYNCOOKIE;TS;ECN;SACK;TIMESTAMPS;WSCALE``: no SYNCOOKIE6, and
  the module's IPv6 key stays as it is); NET and TS 32 hex digits,
  SYNCOOKIE and SYNCOOKIE6 64 (either case); ECN 0..2, SACK 0..1,
  TIMESTAMPS 0..2, WSCALE 0..1 in decimal.
- Applied with one write() to the device (snapshot.write_set): the module
  takes all of it or nothing.  Only then is it stored in
  ``STATE_DIR/anycast-set`` (the struct's 120 bytes, mode 0600, written
  atomically).  A refusal writes and stores nothing.
- Replay: a module that was (re)loaded, e.g. at boot, runs on fresh random
  secrets and reports ``set_generation == 0``.  Whenever anycast is enabled,
  a set is stored and a snapshot shows generation 0 — at start (once the
  device is there) and before any answer — the stored set is written again
  before anything is answered.
- Fail closed: while anycast is enabled and the stored file exists but
  cannot be used (unreadable, not a valid set, unsafe ownership or mode),
  or the replay fails, every secrets answer is an error: answering the
  module's fresh secrets would give MITIGATOR cookies that the other
  servers of the group do not make.  A successful new ``set`` repairs it,
  as does removing the file.

No message or log line here ever carries a secret or a sysctl value.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Union

from . import logs
from .atomic import write_file_atomically
from .authkeys import default_allowed_owners, strict_modes_problem
from .snapshot import (
    ABI_VERSION,
    SET_RANGES,
    SET_SIZE,
    DeviceMissing,
    SetError,
    SetValues,
    SnapshotError,
    Snapshot,
    decode_set,
    encode_set,
    read_snapshot,
    write_set,
)

DEFAULT_STATE_DIR = "/opt/mitigator_agent/state"
STORE_NAME = "anycast-set"
STORE_MODE = 0o600
STATE_DIR_MODE = 0o700

SET_VERB = "set"
SET_USAGE = "set;NET;SYNCOOKIE;SYNCOOKIE6;TS;ECN;SACK;TIMESTAMPS;WSCALE"
SET_USAGE_BEFORE_26_04 = "set;NET;SYNCOOKIE;TS;ECN;SACK;TIMESTAMPS;WSCALE"
# (argument name in SET_USAGE, SetValues field, bytes)
SET_SECRETS = (("NET", "net_secret", 16), ("SYNCOOKIE", "syncookie_secret", 32),
               ("SYNCOOKIE6", "syncookie6_secret", 32), ("TS", "ts_secret", 16))
SYNCOOKIE6 = "syncookie6_secret"
# (argument name in SET_USAGE, SetValues field)
SET_NUMBERS = (("ECN", "tcp_ecn"), ("SACK", "tcp_sack"), ("TIMESTAMPS", "tcp_timestamps"),
               ("WSCALE", "tcp_window_scaling"))

_DECIMAL = re.compile(r"[0-9]{1,9}")  # bounded: int() of a huge string is slow
_HEX = re.compile(r"[0-9a-fA-F]+")

Writer = Callable[[str, SetValues], None]


class SetUsageError(Exception):
    """A malformed ``set`` command; the message names the rule, never the value."""


class AnycastUnavailable(Exception):
    """The stored set cannot be used or replayed; secrets must not be answered."""


class StoreError(Exception):
    """The set was applied but could not be stored."""


@dataclass(frozen=True)
class SetRequest:
    """A parsed ``set``: its values, and whether it left the IPv6 key out (the 7-value layout).

    With 7 values ``values.syncookie6_secret`` is empty until :meth:`completed` puts in the
    module's current IPv6 key: MITIGATOR versions before 26.04 copy the IPv4 key only.
    """

    values: SetValues
    keeps_syncookie6: bool = False

    def completed(self, current_syncookie6: bytes) -> SetValues:
        """The values to write: with the module's own IPv6 key where the command had none."""
        if not self.keeps_syncookie6:
            return self.values
        return dataclasses.replace(self.values, syncookie6_secret=current_syncookie6)


def parse_set_command(command: str) -> SetRequest:
    """Turn ``set;NET;SYNCOOKIE;SYNCOOKIE6;TS;ECN;SACK;TIMESTAMPS;WSCALE`` (or the 7-value layout
    without SYNCOOKIE6) into a SetRequest.

    Raises SetUsageError for the first rule broken (argument count, hex
    length and digits, decimal ranges); nothing is written either way.
    """
    parts = command.split(";")
    if parts[0] != SET_VERB:
        raise SetUsageError(f"not a set command (usage: {SET_USAGE})")
    arguments = parts[1:]
    full = len(SET_SECRETS) + len(SET_NUMBERS)
    if len(arguments) not in (full, full - 1):
        raise SetUsageError(f"set takes 8 arguments (7 without SYNCOOKIE6, as before 26.04), got {len(arguments)}"
                            f" (usage: {SET_USAGE})")
    keeps_syncookie6 = len(arguments) == full - 1
    secret_fields = [item for item in SET_SECRETS if not (keeps_syncookie6 and item[1] == SYNCOOKIE6)]
    secrets: Dict[str, bytes] = {SYNCOOKIE6: b""}
    for (name, field_name, size), text in zip(secret_fields, arguments):
        if len(text) != 2 * size:
            raise SetUsageError(f"set: {name} must be {2 * size} hex digits, got {len(text)} characters")
        # fullmatch, not bytes.fromhex alone: fromhex would skip blanks
        if not _HEX.fullmatch(text):
            raise SetUsageError(f"set: {name} must be {2 * size} hex digits (0-9, a-f, A-F)")
        secrets[field_name] = bytes.fromhex(text)
    numbers: Dict[str, int] = {}
    for (name, field_name), text in zip(SET_NUMBERS, arguments[len(secret_fields):]):
        low, high = SET_RANGES[field_name]
        if not _DECIMAL.fullmatch(text) or not low <= int(text) <= high:
            raise SetUsageError(f"set: {name} must be a decimal number {low}..{high}")
        numbers[field_name] = int(text)
    return SetRequest(SetValues(
        net_secret=secrets["net_secret"], syncookie_secret=secrets["syncookie_secret"],
        syncookie6_secret=secrets[SYNCOOKIE6], ts_secret=secrets["ts_secret"],
        tcp_ecn=numbers["tcp_ecn"], tcp_sack=numbers["tcp_sack"], tcp_timestamps=numbers["tcp_timestamps"],
        tcp_window_scaling=numbers["tcp_window_scaling"],
    ), keeps_syncookie6)


class Anycast:
    """Who may ``set``, where the set is stored, and its replay.

    ``writer`` applies a set to the device (snapshot.write_set; tests
    substitute a fake kernel).
    """

    def __init__(self, instances: Iterable[str], state_dir: str, device: str,
                 logger: Optional[logging.Logger] = None, writer: Writer = write_set,
                 allowed_owners: Optional[FrozenSet[int]] = None) -> None:
        self.instances = frozenset(instances)
        self.state_dir = state_dir
        self.device = device
        self.store_path = os.path.join(state_dir, STORE_NAME)
        self._log = logger or logs.get_logger()
        self._writer = writer
        self._allowed_owners = allowed_owners if allowed_owners is not None else default_allowed_owners()

    @property
    def enabled(self) -> bool:
        """Whether any instance may ``set`` (and stored sets are replayed)."""
        return bool(self.instances)

    def permits(self, instance: Optional[str]) -> bool:
        """Whether the key instance ``instance`` may ``set`` (an unnamed key never may)."""
        return bool(instance) and instance in self.instances

    # --- the stored set ----------------------------------------------------

    def _unusable(self, reason: str) -> AnycastUnavailable:
        return AnycastUnavailable(f"stored anycast set {self.store_path} is unusable: {reason}"
                                  " (send a new set, or fix or remove the file)")

    def stored(self) -> Optional[SetValues]:
        """The stored set; None if there is none; AnycastUnavailable if it cannot be trusted or read."""
        try:
            fd = os.open(self.store_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
            raise self._unusable(reason) from None
        try:
            problem = strict_modes_problem(self.store_path, os.fstat(fd), self._allowed_owners,
                                           label="anycast state")
            if problem is not None:
                raise self._unusable(problem)
            data = os.read(fd, SET_SIZE + 1)
        except OSError as exc:
            raise self._unusable(exc.strerror or str(exc)) from None
        finally:
            os.close(fd)
        try:
            return decode_set(data)
        except ValueError as exc:
            raise self._unusable(f"not a valid set ({exc})") from None

    def _store(self, values: SetValues) -> None:
        try:
            try:
                os.mkdir(self.state_dir, STATE_DIR_MODE)
            except FileExistsError:
                pass
            write_file_atomically(self.store_path, encode_set(values), STORE_MODE)
        except OSError as exc:
            raise StoreError(f"applied, but could not be stored in {self.store_path}"
                             f" ({exc.strerror or exc}): it will not survive a module reload") from None

    # --- applying ----------------------------------------------------------

    def apply(self, request: Union[SetRequest, SetValues]) -> None:
        """Write the request's values to the device, then store them.

        A 7-value request keeps the module's IPv6 key: it is read from the
        device just before the write, and the whole set (all 8 values) is
        written and stored, so a replay restores exactly what the kernel had.
        Raises DeviceMissing or SetError (nothing written, nothing stored)
        or StoreError (in the kernel, not stored).
        """
        values = request if isinstance(request, SetValues) else request.completed(
            read_snapshot(self.device).syncookie6_secret if request.keeps_syncookie6 else b"")
        problems = values.problems()
        if problems:  # parse_set_command already refused these; never send them
            raise SetError("; ".join(problems))
        self._writer(self.device, values)
        self._store(values)

    def ensure(self, snap: Snapshot, when: str = "poll") -> bool:
        """Replay the stored set if ``snap`` shows none applied; True if it did.

        Checks the stored file on every call (fail closed: raises
        AnycastUnavailable when it is unusable or the replay fails);
        DeviceMissing passes through.  Does nothing while anycast is off.
        """
        if not self.enabled:
            return False
        values = self.stored()
        if values is None or snap.set_generation != 0:
            return False
        if snap.abi_version < ABI_VERSION:
            raise AnycastUnavailable(f"the tcpsecrets module (ABI {snap.abi_version}) cannot apply"
                                     f" the stored anycast set {self.store_path}")
        try:
            self._writer(self.device, values)
        except SetError as exc:
            raise AnycastUnavailable(f"replaying the stored anycast set failed: {exc}") from None
        self._log.info(logs.event("anycast-set-replayed", when=when, store=self.store_path, device=self.device,
                                  reason="module reports no set applied (set_generation 0)"))
        return True

    def startup(self) -> None:
        """At serve start: say what anycast does and replay the stored set if needed.

        Problems are logged, not raised: the server starts anyway and each
        secrets answer reports (and retries) them.
        """
        if not self.enabled:
            if os.path.lexists(self.store_path):
                self._log.info(logs.event("anycast-set-ignored", store=self.store_path,
                                          reason="anycast disabled (no anycast-instance configured)"))
            return
        self._log.info(logs.event("anycast-enabled", instances=",".join(sorted(self.instances)),
                                  store=self.store_path))
        try:
            snap = read_snapshot(self.device)
        except DeviceMissing:
            self._log.info(logs.event("anycast-replay-deferred", reason="tcpsecrets module not loaded"))
            return
        except (SnapshotError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._log.warning(logs.event("anycast-replay-deferred", reason=f"cannot read {self.device}: {reason}"))
            return
        try:
            self.ensure(snap, when="start")
        except (AnycastUnavailable, DeviceMissing) as exc:
            self._log.error(logs.event("anycast-unavailable", reason=str(exc),
                                       effect="secrets answers refused until fixed"))

