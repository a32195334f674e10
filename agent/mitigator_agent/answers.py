"""What the agent answers to each SSH command.

Commands (the SSH exec string; surrounding whitespace is ignored):

``get-tcp-secrets``, or a session with no command
    The legacy text of the tcpsecrets module's /proc/tcp_secrets, byte for
    byte (see :func:`legacy_text`).
``get``
    ``key: value`` lines in the order MITIGATOR v23.08+ reads them, then
    this agent's extra fields (see :func:`get_fields`).
``get json``
    One JSON object with everything (see :func:`json_answer`).
``set;...``
    Anycast secret copying; refused for now.
anything else
    One line on stderr.

Every answer that needs secrets takes one snapshot (one read() of the
device), so all values in it were sampled together.

Exit statuses: 0 answered; 1 unknown command or bad usage (including a
command that is not UTF-8, too long, and ``set``); 2 the tcpsecrets module is
not loaded (no device); 3 the device could not be read or returned a
snapshot this agent does not understand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .snapshot import (
    F_NET_SECRET,
    F_SYNCOOKIE,
    F_SYNCOOKIE6,
    F_TS_SECRET,
    DeviceMissing,
    Snapshot,
    SnapshotError,
    read_snapshot,
)

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_NO_DEVICE = 2
EXIT_BAD_SNAPSHOT = 3

LEGACY_COMMAND = "get-tcp-secrets"
GET_COMMAND = "get"
GET_JSON_COMMAND = "get json"
SET_COMMAND = "set"
MAX_COMMAND_CHARS = 256  # longer than any command; the full `set;...` line is ~250
JSON_SCHEMA_VERSION = 1

NOT_LOADED_MESSAGE = "tcpsecrets module not loaded"
SET_DISABLED_MESSAGE = "anycast set is not enabled on this agent"

U32_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class HostFacts:
    """What an answer needs besides the snapshot."""

    kernel_release: str           # os.uname().release, reported as `uname`
    agent_version: str            # this agent's version, reported as `version`
    clock_synced: Optional[bool]  # kernel NTP state; None if unknown


@dataclass(frozen=True)
class Answer:
    """One command's outcome: what goes to the client and what the log says."""

    stdout: str
    stderr: str
    exit_status: int
    result: str  # short description for the log; never holds secret values


def legacy_text(snap: Snapshot) -> str:
    """The tcpsecrets module's /proc/tcp_secrets text.

    ``time_ms`` is full Unix milliseconds; ``uptime_ms`` is the TCP timestamp
    clock truncated to 32 bits as the module printed it; ``timestamp_secret``
    is all zeros on kernels without a ts_secret (6.1.192+), where the TS
    offset comes from net_secret instead.
    """
    lines = [
        ("time_sec", snap.realtime_ns // 10**9),
        ("time_ms", snap.realtime_ns // 10**6),
        ("uptime_ms", snap.tcp_clock_ms & U32_MASK),
        ("jiffies", snap.jiffies64),
        ("cookie_secret", snap.syncookie_secret.hex()),
        ("net_secret", snap.net_secret.hex()),
        ("timestamp_secret", snap.ts_secret.hex()),
    ]
    return "".join(f"{name} {value}\n" for name, value in lines)


def _synced_text(clock_synced: Optional[bool]) -> str:
    if clock_synced is None:
        return "unknown"
    return "1" if clock_synced else "0"


def get_fields(snap: Snapshot, facts: HostFacts) -> List[Tuple[str, Union[str, int]]]:
    """The ``get`` answer's fields, in order.

    First the isn_sync agent's fields (uname = kernel release, version =
    agent version, time = snapshot wall clock in Unix seconds, secrets as
    lowercase hex, sysctls as numbers), then: jiffies, hz, uptime_ms (as in
    the legacy text), time_ms, isn_algorithm (``ts_secret`` or
    ``seq_and_ts_off``), clock_synced (1, 0 or ``unknown``), abi_version.
    """
    return [
        ("uname", facts.kernel_release),
        ("version", facts.agent_version),
        ("time", snap.realtime_ns // 10**9),
        ("net_secret", snap.net_secret.hex()),
        ("syncookie_secret", snap.syncookie_secret.hex()),
        ("syncookie6_secret", snap.syncookie6_secret.hex()),
        ("ts_secret", snap.ts_secret.hex()),
        ("tcp_ecn", snap.tcp_ecn),
        ("tcp_sack", snap.tcp_sack),
        ("tcp_timestamps", snap.tcp_timestamps),
        ("tcp_window_scaling", snap.tcp_window_scaling),
        ("jiffies", snap.jiffies64),
        ("hz", snap.hz),
        ("uptime_ms", snap.tcp_clock_ms & U32_MASK),
        ("time_ms", snap.realtime_ns // 10**6),
        ("isn_algorithm", snap.algorithm),
        ("clock_synced", _synced_text(facts.clock_synced)),
        ("abi_version", snap.abi_version),
    ]


def get_text(snap: Snapshot, facts: HostFacts) -> str:
    """The ``get`` answer: one ``key: value`` line per field."""
    return "".join(f"{name}: {value}\n" for name, value in get_fields(snap, facts))


# The `get json` schema: key -> kind of value (see _JSON_KIND_CHECKS).
JSON_FIELDS: Dict[str, str] = {
    "schema_version": "integer",
    "uname": "string",
    "version": "string",
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
    "cookie_count": "integer",
    "uptime_ms": "integer",
    "tcp_clock_ms": "integer",
    "isn_algorithm": "string",
    "cookie_accept": "boolean",
    "clock_synced": "boolean or null",
    "abi_version": "integer",
    "snapshot_size": "integer",
    "flags": "integer",
}
SECRETS_PRESENT_KEYS = ("syncookie_secret", "syncookie6_secret", "net_secret", "ts_secret")


def json_answer(snap: Snapshot, facts: HostFacts) -> Dict[str, Any]:
    """The ``get json`` object.

    Keys (all always present):

    - ``schema_version`` (1), ``uname`` (kernel release), ``version`` (agent)
    - ``time`` (Unix s), ``time_ms`` (Unix ms), ``realtime_ns``: the
      snapshot's CLOCK_REALTIME
    - ``net_secret``, ``syncookie_secret``, ``syncookie6_secret``,
      ``ts_secret``: lowercase hex of the bytes in kernel memory order
      (32, 64, 64, 32 hex digits); all zeros where the kernel has none
    - ``secrets_present``: {name: bool} for those four, from the module's flags
    - ``tcp_syncookies``, ``tcp_ecn``, ``tcp_sack``, ``tcp_timestamps``,
      ``tcp_window_scaling``: init_net's sysctls
    - ``jiffies`` (jiffies_64), ``hz``, ``cookie_count`` (jiffies / (60 hz),
      32 bits: the SYN-cookie minute counter)
    - ``uptime_ms`` (TCP timestamp clock, 32 bits, as in the legacy text)
      and ``tcp_clock_ms`` (the same clock, full 64 bits)
    - ``isn_algorithm``: ``ts_secret`` or ``seq_and_ts_off``
    - ``cookie_accept``: the module makes the kernel accept upstream cookies
    - ``clock_synced``: true/false from adjtimex, null if unknown
    - ``abi_version``, ``snapshot_size``, ``flags``: the module's snapshot header
    """
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "uname": facts.kernel_release,
        "version": facts.agent_version,
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
        "cookie_count": snap.cookie_count,
        "uptime_ms": snap.tcp_clock_ms & U32_MASK,
        "tcp_clock_ms": snap.tcp_clock_ms,
        "isn_algorithm": snap.algorithm,
        "cookie_accept": snap.cookie_accept,
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
    "hex16": lambda v: _is_hex(v, 16),
    "hex32": lambda v: _is_hex(v, 32),
    "presence": lambda v: isinstance(v, dict) and sorted(v) == sorted(SECRETS_PRESENT_KEYS)
    and all(isinstance(flag, bool) for flag in v.values()),
}


def validate_json_answer(obj: object) -> List[str]:
    """Problems with a ``get json`` answer against JSON_FIELDS (empty list: valid)."""
    if not isinstance(obj, dict):
        return ["answer is not a JSON object"]
    problems = []
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


def _with_snapshot(device: str, render: Callable[[Snapshot], str]) -> Answer:
    try:
        snap = read_snapshot(device)
    except DeviceMissing:
        return Answer("", NOT_LOADED_MESSAGE + "\n", EXIT_NO_DEVICE, NOT_LOADED_MESSAGE)
    except SnapshotError as exc:
        message = f"bad snapshot from {device}: {exc}"
        return Answer("", message + "\n", EXIT_BAD_SNAPSHOT, message)
    except OSError as exc:
        message = f"cannot read {device}: {exc.strerror or exc}"
        return Answer("", message + "\n", EXIT_BAD_SNAPSHOT, message)
    return Answer(render(snap), "", EXIT_OK, "ok")


MAX_LOGGED_VERB_CHARS = 32


def loggable_command(command: Optional[str]) -> str:
    """The command as the log may show it: never its arguments.

    ``set;NET;SYNCOOKIE;...`` carries secrets, and a mistyped command may
    too, so only a known command is logged whole; of anything else the log
    keeps the verb (up to the first ``;`` or blank, at most 32 characters)
    and says how much it left out.
    """
    if command is None:
        return "(none)"
    stripped = command.strip()
    if stripped in (LEGACY_COMMAND, GET_COMMAND) or " ".join(stripped.split()) == GET_JSON_COMMAND:
        return stripped
    verb = stripped.split(";", 1)[0].split(None, 1)[0] if stripped else ""
    verb = verb[:MAX_LOGGED_VERB_CHARS]
    left_out = len(command) - len(verb)
    return f"{verb}...(+{left_out} chars not logged)" if left_out else verb


def respond(command: Optional[str], device: str, facts: Callable[[], HostFacts]) -> Answer:
    """Answer one SSH request.

    ``command`` is the exec string (None for a session without a command);
    ``device`` the snapshot source; ``facts`` is called only when an answer
    needs them.
    """
    checked = _normalise(command)
    if isinstance(checked, Answer):
        return checked
    if checked is None or checked == LEGACY_COMMAND:
        return _with_snapshot(device, legacy_text)
    if checked == GET_COMMAND:
        return _with_snapshot(device, lambda snap: get_text(snap, facts()))
    if " ".join(checked.split()) == GET_JSON_COMMAND:
        return _with_snapshot(device, lambda snap: json.dumps(json_answer(snap, facts())) + "\n")
    verb = checked.split(";", 1)[0].strip()
    if verb == SET_COMMAND:
        return _usage_error(SET_DISABLED_MESSAGE)
    if verb == GET_COMMAND:
        return _usage_error("get takes no arguments (use `get` or `get json`)")
    return _usage_error(
        f"unknown command (known: {GET_COMMAND}, {GET_JSON_COMMAND}, {LEGACY_COMMAND})",
        result="unknown command",
    )

