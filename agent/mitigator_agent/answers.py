"""What the agent answers to each SSH command.

Commands (the SSH exec string; surrounding whitespace is ignored):

``get-tcp-secrets``, or a session with no command
    The legacy text of the tcpsecrets module's /proc/tcp_secrets, same
    format byte for byte; in wall mode its clocks are chosen so that a
    tcpsecrets-era consumer lands on the counters the kernel now uses (see
    :func:`legacy_text`).
``get``
    Exactly the ``key: value`` lines of isn_sync at the protocol level the
    agent serves (``serve --protocol``): 26.04's 11 lines by default, or
    those of an earlier release for the MITIGATOR versions that expect them
    (see :data:`PROTOCOL_FIELDS` and :func:`get_fields`).
``get json``
    One JSON object with everything, ours included (see :func:`json_answer`).
``set;NET;SYNCOOKIE;SYNCOOKIE6;TS;ECN;SACK;TIMESTAMPS;WSCALE``
    Anycast: apply and store these secrets and sysctls; off unless the
    administrator allows the polling key's instance (see anycast.py).  The
    7-value layout of releases before 26.04 (no SYNCOOKIE6) is accepted at
    every protocol level; it leaves the IPv6 key as it is.
anything else
    One line on stderr.

Every answer that needs secrets takes one snapshot (one read() of the
device), so all values in it were sampled together.  With anycast enabled
it first replays a stored set the module lacks, and refuses to answer while
the stored set is unusable (anycast.Anycast.ensure).

Exit statuses: 0 answered; 1 unknown command or bad usage (including a
command that is not UTF-8 or too long, and a ``set`` that is disabled, not
allowed for this key or malformed); 2 the tcpsecrets module is not loaded
(no device); 3 the device could not be read or returned a snapshot this
agent does not understand; 5 anycast: the module refused the set or it
could not be written or stored, or the stored set is unusable or could not
be replayed (secrets are not answered until that is fixed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .anycast import Anycast, AnycastUnavailable, SetUsageError, StoreError, parse_set_command
from .snapshot import (
    F_NET_SECRET,
    F_SYNCOOKIE,
    F_SYNCOOKIE6,
    F_TS_SECRET,
    DeviceMissing,
    SetError,
    Snapshot,
    SnapshotError,
    read_snapshot,
    read_snapshot_across_swap,
)

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_NO_DEVICE = 2
EXIT_BAD_SNAPSHOT = 3
EXIT_ANYCAST = 5  # 4 is the server's internal error

LEGACY_COMMAND = "get-tcp-secrets"
GET_COMMAND = "get"
GET_JSON_COMMAND = "get json"
SET_COMMAND = "set"
MAX_COMMAND_CHARS = 256  # longer than any command; the full `set;...` line is ~210
JSON_SCHEMA_VERSION = 2
# The isn_sync release whose contract (get format, kernel behaviour) this
# agent implements by default, answered as `version`; not this agent's own version.
PROTOCOL_LEVEL = "26.04"
_SYSCTLS = ("tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling")
# The `get` lines of each isn_sync release, in its order (its `server` script, tags v23.08 to v26.04):
# 23.08 answers 8 lines; 24.10 and 25.02 add `version`; 25.06 adds `time`; 26.04 adds
# `syncookie6_secret`.  `serve --protocol LEVEL` answers as LEVEL did; `version` is LEVEL itself.
PROTOCOL_FIELDS: Dict[str, Tuple[str, ...]] = {
    "23.08": ("uname", "net_secret", "syncookie_secret", "ts_secret", *_SYSCTLS),
    "24.10": ("uname", "version", "net_secret", "syncookie_secret", "ts_secret", *_SYSCTLS),
    "25.02": ("uname", "version", "net_secret", "syncookie_secret", "ts_secret", *_SYSCTLS),
    "25.06": ("uname", "version", "time", "net_secret", "syncookie_secret", "ts_secret", *_SYSCTLS),
    "26.04": ("uname", "version", "time", "net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret",
              *_SYSCTLS),
}
PROTOCOL_LEVELS = tuple(PROTOCOL_FIELDS)

NOT_LOADED_MESSAGE = "tcpsecrets module not loaded"
SET_DISABLED_MESSAGE = "anycast set is not enabled on this agent"
SET_APPLIED = "ok"


@dataclass(frozen=True)
class HostFacts:
    """What an answer needs besides the snapshot."""

    os_name: str                  # os.uname().sysname ("Linux"), answered as `uname`
    kernel_release: str           # os.uname().release (get json only)
    agent_version: str            # this agent's version (get json only)
    clock_synced: Optional[bool]  # kernel NTP state; None if unknown


@dataclass(frozen=True)
class Answer:
    """One command's outcome: what goes to the client and what the log says."""

    stdout: str
    stderr: str
    exit_status: int
    result: str  # short description for the log; never holds secret values


def legacy_jiffies(snap: Snapshot) -> int:
    """The ``jiffies`` of the legacy text: the real jiffies64, or wall time in jiffies.

    In wall mode realtime_ns * hz // 10**9, so that jiffies // (60 * hz) is
    exactly the kernel's wall counter, realtime seconds // 60.
    """
    if snap.wall_clock:
        return snap.realtime_ns * snap.hz // 10**9
    return snap.jiffies64


def legacy_text(snap: Snapshot) -> str:
    """The tcpsecrets module's /proc/tcp_secrets text (same lines, same format).

    A tcpsecrets-era consumer (MITIGATOR v20.12 to v23.02) derives the
    cookie counter as ``jiffies // (60 * HZ)`` (HZ from its own
    configuration, jiffies carried forward with ``time_ms``) and a TSval as
    ``uptime_ms + SipHash(timestamp_secret; saddr, daddr)``.  The values are
    chosen so that this lands on what the kernel does:

    - ``time_sec``, ``time_ms``: the snapshot's CLOCK_REALTIME (s, full Unix ms).
    - ``jiffies``: jiffies mode: the real jiffies64; wall mode:
      realtime_ns * hz // 10**9 (:func:`legacy_jiffies`).
    - ``uptime_ms``: (tcp_clock_ms + ts_shift_ms) mod 2^32, the clock the
      kernel's TSvals count; in jiffies mode the shift is 0 and this is the
      plain TCP timestamp clock, as before.
    - ``timestamp_secret``: the snapshot's ts_secret — the module's, which
      keys every TS offset when F_TS_OFFSET_HOOK is set (all zeros only
      from an ABI-1 module on a kernel without a ts_secret).
    - ``cookie_secret``: syncookie_secret (IPv4); ``net_secret``.

    The module's /proc/tcp_secrets follows the same rule.
    """
    lines = [
        ("time_sec", snap.realtime_ns // 10**9),
        ("time_ms", snap.realtime_ns // 10**6),
        ("uptime_ms", snap.ts_clock_ms),
        ("jiffies", legacy_jiffies(snap)),
        ("cookie_secret", snap.syncookie_secret.hex()),
        ("net_secret", snap.net_secret.hex()),
        ("timestamp_secret", snap.ts_secret.hex()),
    ]
    return "".join(f"{name} {value}\n" for name, value in lines)


def get_fields(snap: Snapshot, facts: HostFacts, level: str = PROTOCOL_LEVEL) -> List[Tuple[str, Union[str, int]]]:
    """The ``get`` answer's fields: exactly isn_sync ``level``'s, in its order (PROTOCOL_FIELDS).

    At 26.04, 11: ``uname`` the OS name (``Linux``), ``version`` the level
    (``26.04``), ``time`` the snapshot's wall clock in Unix seconds, the
    four secrets as lowercase hex of their bytes in kernel memory order
    (net 16, syncookie 2 x 16, syncookie6 2 x 16, ts 16 bytes), then the
    sysctls tcp_ecn, tcp_sack, tcp_timestamps, tcp_window_scaling as
    decimal numbers.  An earlier level answers a subset, in the same
    order.  Nothing else: everything of ours is in ``get json``.
    """
    values: Dict[str, Union[str, int]] = {
        "uname": facts.os_name,
        "version": level,
        "time": snap.realtime_ns // 10**9,
        "net_secret": snap.net_secret.hex(),
        "syncookie_secret": snap.syncookie_secret.hex(),
        "syncookie6_secret": snap.syncookie6_secret.hex(),
        "ts_secret": snap.ts_secret.hex(),
        "tcp_ecn": snap.tcp_ecn,
        "tcp_sack": snap.tcp_sack,
        "tcp_timestamps": snap.tcp_timestamps,
        "tcp_window_scaling": snap.tcp_window_scaling,
    }
    return [(name, values[name]) for name in PROTOCOL_FIELDS[level]]


def get_text(snap: Snapshot, facts: HostFacts, level: str = PROTOCOL_LEVEL) -> str:
    """The ``get`` answer: one ``key: value`` line per field."""
    return "".join(f"{name}: {value}\n" for name, value in get_fields(snap, facts, level))


# The `get json` schema: key -> kind of value (see _JSON_KIND_CHECKS).
JSON_FIELDS: Dict[str, str] = {
    "schema_version": "integer",
    "uname": "string",
    "version": "string",
    "kernel_release": "string",
    "agent_version": "string",
    "time": "integer",
    "time_ms": "integer",
    "realtime_ns": "integer",
    "net_secret": "hex16",
    "syncookie_secret": "hex32",
    "syncookie6_secret": "hex32",
    "ts_secret": "hex16",
    "secrets_present": "presence",
    "tcp_syncookies": "integer",
    "tcp_ecn": "integer",
    "tcp_sack": "integer",
    "tcp_timestamps": "integer",
    "tcp_window_scaling": "integer",
    "jiffies": "integer",
    "hz": "integer",
    "cookie_clock": "cookie clock",
    "cookie_count": "integer",
    "uptime_ms": "integer",
    "tcp_clock_ms": "integer",
    "ts_shift_ms": "integer",
    "isn_algorithm": "string",
    "ts_offset_hook": "boolean",
    "cookie_accept": "boolean",
    "sendsyn_drop": "boolean",
    "sendsyn_dropped": "integer",
    "set_allowed": "boolean",
    "set_generation": "integer",
    "accept_all_netns": "boolean",
    "netns_inum": "integer",
    "netns_refusing": "integer",
    "cookies_refused": "integer",
    "clock_synced": "boolean or null",
    "abi_version": "integer",
    "snapshot_size": "integer",
    "flags": "integer",
}
SECRETS_PRESENT_KEYS = ("syncookie_secret", "syncookie6_secret", "net_secret", "ts_secret")
COOKIE_CLOCKS = ("wall", "jiffies")


def json_answer(snap: Snapshot, facts: HostFacts, level: str = PROTOCOL_LEVEL) -> Dict[str, Any]:
    """The ``get json`` object (schema_version 2; every key always present).

    - ``schema_version``: 2
    - ``uname``, ``version``: as in ``get`` (OS name, PROTOCOL_LEVEL)
    - ``kernel_release`` (``uname -r``), ``agent_version`` (this agent)
    - ``time`` (Unix s), ``time_ms`` (Unix ms), ``realtime_ns``: the
      snapshot's CLOCK_REALTIME
    - ``net_secret``, ``syncookie_secret``, ``syncookie6_secret``,
      ``ts_secret``: lowercase hex of the bytes in kernel memory order
      (32, 64, 64, 32 hex digits)
    - ``secrets_present``: {name: bool} for those four, from the module's
      flags (a zero secret with false: the kernel has none)
    - ``tcp_syncookies``, ``tcp_ecn``, ``tcp_sack``, ``tcp_timestamps``,
      ``tcp_window_scaling``: init_net's sysctls
    - ``jiffies`` (the real jiffies_64), ``hz`` (CONFIG_HZ)
    - ``cookie_clock``: ``wall`` (counter = realtime s // 60) or ``jiffies``
      (jiffies // (60 hz)); ``cookie_count``: the kernel's counter at
      ``realtime_ns``, 32 bits
    - ``uptime_ms``: the legacy text's value, (tcp_clock_ms + ts_shift_ms)
      mod 2^32: the clock the kernel's TSvals count before the per-connection
      SipHash part; ``tcp_clock_ms``: the TCP timestamp clock, 64 bits,
      unshifted; ``ts_shift_ms``: added to every TS offset (0 in jiffies mode)
    - ``isn_algorithm``: the kernel's own ISN/TS scheme, ``ts_secret`` or
      ``seq_and_ts_off``; ``ts_offset_hook``: the module makes every TS
      offset SipHash(ts_secret; saddr, daddr) + ts_shift_ms regardless
    - ``cookie_accept``: the module makes the kernel accept upstream cookies
    - ``sendsyn_drop``: SYNs with MITIGATOR's SendSyn marker are dropped;
      ``sendsyn_dropped``: how many were
    - ``set_allowed``: the module accepts sets from a writer group;
      ``set_generation``: sets applied since the module was loaded
    - ``accept_all_netns``: cookies are accepted in every network namespace
      (containers) while init_net's tcp_syncookies is 2, unless a namespace
      set its own to 0; ``netns_inum``: the reader's network namespace (the
      module serves only the initial one, net:[N]); ``netns_refusing``: how
      many namespaces would refuse MITIGATOR's cookies now (the module's
      /proc/tcpsecrets_netns names them); ``cookies_refused``: valid cookie
      ACKs refused in any namespace since the module was loaded
    - ``clock_synced``: true/false from adjtimex, null if unknown
    - ``abi_version``, ``snapshot_size``, ``flags``: the module's snapshot header
    """
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "uname": facts.os_name,
        "version": level,
        "kernel_release": facts.kernel_release,
        "agent_version": facts.agent_version,
        "time": snap.realtime_ns // 10**9,
        "time_ms": snap.realtime_ns // 10**6,
        "realtime_ns": snap.realtime_ns,
        "net_secret": snap.net_secret.hex(),
        "syncookie_secret": snap.syncookie_secret.hex(),
        "syncookie6_secret": snap.syncookie6_secret.hex(),
        "ts_secret": snap.ts_secret.hex(),
        "secrets_present": {
            "syncookie_secret": bool(snap.flags & F_SYNCOOKIE),
            "syncookie6_secret": bool(snap.flags & F_SYNCOOKIE6),
            "net_secret": bool(snap.flags & F_NET_SECRET),
            "ts_secret": bool(snap.flags & F_TS_SECRET),
        },
        "tcp_syncookies": snap.tcp_syncookies,
        "tcp_ecn": snap.tcp_ecn,
        "tcp_sack": snap.tcp_sack,
        "tcp_timestamps": snap.tcp_timestamps,
        "tcp_window_scaling": snap.tcp_window_scaling,
        "jiffies": snap.jiffies64,
        "hz": snap.hz,
        "cookie_clock": snap.cookie_clock_name,
        "cookie_count": snap.cookie_count,
        "uptime_ms": snap.ts_clock_ms,
        "tcp_clock_ms": snap.tcp_clock_ms,
        "ts_shift_ms": snap.ts_shift_ms,
        "isn_algorithm": snap.algorithm,
        "ts_offset_hook": snap.ts_offset_hook,
        "cookie_accept": snap.cookie_accept,
        "sendsyn_drop": snap.sendsyn_drop,
        "sendsyn_dropped": snap.sendsyn_dropped,
        "set_allowed": snap.set_allowed,
        "set_generation": snap.set_generation,
        "accept_all_netns": snap.accept_all_netns,
        "netns_inum": snap.netns_inum,
        "netns_refusing": snap.netns_refusing,
        "cookies_refused": snap.cookies_refused,
        "clock_synced": facts.clock_synced,
        "abi_version": snap.abi_version,
        "snapshot_size": snap.size,
        "flags": snap.flags,
    }


def _is_hex(value: object, size: int) -> bool:
    return isinstance(value, str) and len(value) == 2 * size and not value.strip("0123456789abcdef")


_JSON_KIND_CHECKS: Dict[str, Callable[[object], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "boolean or null": lambda v: v is None or isinstance(v, bool),
    "cookie clock": lambda v: v in COOKIE_CLOCKS,
    "hex16": lambda v: _is_hex(v, 16),
    "hex32": lambda v: _is_hex(v, 32),
    "presence": lambda v: isinstance(v, dict) and sorted(v) == sorted(SECRETS_PRESENT_KEYS)
    and all(isinstance(flag, bool) for flag in v.values()),
}


def validate_json_answer(obj: object) -> List[str]:
    """Problems with a ``get json`` answer against JSON_FIELDS (empty list: valid).

    Every key must be present with its kind, and ``schema_version`` must be
    JSON_SCHEMA_VERSION; extra keys are allowed (a newer agent may add some).
    """
    if not isinstance(obj, dict):
        return ["answer is not a JSON object"]
    problems = []
    version = obj.get("schema_version")
    if _JSON_KIND_CHECKS["integer"](version) and version != JSON_SCHEMA_VERSION:
        problems.append(f"schema_version: {version}, this agent knows {JSON_SCHEMA_VERSION}")
    for key, kind in JSON_FIELDS.items():
        if key not in obj:
            problems.append(f"{key}: missing")
        elif not _JSON_KIND_CHECKS[kind](obj[key]):
            problems.append(f"{key}: expected {kind}")  # values may be secrets: not echoed
    return problems


def _usage_error(message: str, result: Optional[str] = None) -> Answer:
    return Answer("", message + "\n", EXIT_USAGE, result or message)


def _normalise(command: Optional[str]) -> Union[Optional[str], Answer]:
    """Check a raw command; return it stripped, or the error Answer."""
    if command is None:
        return None
    if len(command) > MAX_COMMAND_CHARS:
        return _usage_error(f"command too long ({len(command)} characters, at most {MAX_COMMAND_CHARS})")
    try:
        command.encode("utf-8")
    except UnicodeEncodeError:
        # The SSH layer hands undecodable bytes over as lone surrogates.
        return _usage_error("command is not valid UTF-8")
    return command.strip()


def _error(message: str, status: int) -> Answer:
    return Answer("", message + "\n", status, message)


def _take_snapshot(device: str, anycast: Optional[Anycast]) -> Union[Snapshot, Answer]:
    """One snapshot to answer from, after any replay; or the error Answer."""
    try:
        snap = read_snapshot_across_swap(device)
        if anycast is not None and anycast.ensure(snap):
            # answer what the kernel now uses, from a snapshot taken after the replay
            snap = read_snapshot(device)
            if snap.set_generation == 0:
                return _error("the tcpsecrets module reports no anycast set applied after the replay",
                              EXIT_ANYCAST)
    except DeviceMissing:
        return _error(NOT_LOADED_MESSAGE, EXIT_NO_DEVICE)
    except SnapshotError as exc:
        return _error(f"bad snapshot from {device}: {exc}", EXIT_BAD_SNAPSHOT)
    except AnycastUnavailable as exc:
        return _error(str(exc), EXIT_ANYCAST)
    except OSError as exc:
        return _error(f"cannot read {device}: {exc.strerror or exc}", EXIT_BAD_SNAPSHOT)
    return snap


def _with_snapshot(device: str, render: Callable[[Snapshot], str], anycast: Optional[Anycast]) -> Answer:
    snap = _take_snapshot(device, anycast)
    if isinstance(snap, Answer):
        return snap
    return Answer(render(snap), "", EXIT_OK, "ok")


def _set(command: str, anycast: Optional[Anycast], instance: Optional[str]) -> Answer:
    """Validate, apply and store one ``set`` (see anycast.py); no value reaches any message."""
    if anycast is None or not anycast.enabled:
        return _usage_error(SET_DISABLED_MESSAGE)
    if not anycast.permits(instance):
        return _usage_error(f"anycast set is not allowed for this key (instance {instance or '-'})",
                            result="anycast set not allowed for this instance")
    try:
        request = parse_set_command(command)
    except SetUsageError as exc:
        return _usage_error(str(exc))
    try:
        anycast.apply(request)
    except DeviceMissing:
        return _error(NOT_LOADED_MESSAGE, EXIT_NO_DEVICE)
    except SnapshotError as exc:  # reading the IPv6 key a 7-value set keeps
        return _error(f"bad snapshot from {anycast.device}: {exc}", EXIT_BAD_SNAPSHOT)
    except (SetError, StoreError) as exc:
        return _error(f"anycast set failed: {exc}", EXIT_ANYCAST)
    return Answer(SET_APPLIED + "\n", "", EXIT_OK, "anycast set applied and stored")


# Only a verb of this shape reaches the log: lower-case letters and dashes,
# so no hex digit, no base64, no separator of a secret-carrying command can.
LOGGABLE_VERB = re.compile(r"[a-z-]{1,16}")
UNPRINTABLE_VERB = "(unprintable verb)"


def loggable_command(command: Optional[str]) -> str:
    """The command as the log may show it: never its arguments, never a doubtful verb.

    ``set;NET;SYNCOOKIE;...`` carries secrets, and a mistyped command may
    too (``set,<net_secret>...``), so only a known command (``get``,
    ``get json``, ``get-tcp-secrets``) is logged whole.  Of anything else
    the log keeps the verb -- the text up to the first ``;`` or white space
    -- only if it matches ``^[a-z-]{1,16}$``, else ``(unprintable verb)``,
    and says how many characters it left out: ``set...(+120 chars not
    logged)``, ``(unprintable verb)...(+40 chars not logged)``.  An empty
    or blank command is ``(empty)``.
    """
    if command is None:
        return "(none)"
    stripped = command.strip()
    if stripped in (LEGACY_COMMAND, GET_COMMAND) or " ".join(stripped.split()) == GET_JSON_COMMAND:
        return stripped
    if not stripped:
        return "(empty)"
    verb = re.split(r"[;\s]", stripped, maxsplit=1)[0]
    if LOGGABLE_VERB.fullmatch(verb):
        left_out = len(command) - len(verb)
        return f"{verb}...(+{left_out} chars not logged)" if left_out else verb
    return f"{UNPRINTABLE_VERB}...(+{len(command)} chars not logged)"


def respond(command: Optional[str], device: str, facts: Callable[[], HostFacts],
            anycast: Optional[Anycast] = None, instance: Optional[str] = None,
            level: str = PROTOCOL_LEVEL) -> Answer:
    """Answer one SSH request.

    ``command`` is the exec string (None for a session without a command);
    ``device`` the snapshot source; ``facts`` is called only when an answer
    needs them; ``anycast`` the anycast settings (None: anycast off);
    ``instance`` the authenticated key's instance name (for ``set``);
    ``level`` the isn_sync release whose ``get`` to answer (PROTOCOL_LEVELS).
    """
    checked = _normalise(command)
    if isinstance(checked, Answer):
        return checked
    if checked is None or checked == LEGACY_COMMAND:
        return _with_snapshot(device, legacy_text, anycast)
    if checked == GET_COMMAND:
        return _with_snapshot(device, lambda snap: get_text(snap, facts(), level), anycast)
    if " ".join(checked.split()) == GET_JSON_COMMAND:
        return _with_snapshot(device, lambda snap: json.dumps(json_answer(snap, facts(), level)) + "\n", anycast)
    verb = checked.split(";", 1)[0].strip()
    if verb == SET_COMMAND:
        return _set(checked, anycast, instance)
    if verb == GET_COMMAND:
        return _usage_error("get takes no arguments (use `get` or `get json`)")
    return _usage_error(
        f"unknown command (known: {GET_COMMAND}, {GET_JSON_COMMAND}, {LEGACY_COMMAND})",
        result="unknown command",
    )

