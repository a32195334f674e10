"""Is the agent working? One list of findings for ``status``, ``check`` and ``serve``'s start.

Every finding is judged from the agent's side: the files and the device
are opened *as the service's user* (runas.call_as: really that uid and its
groups when run as root), so a keys file only root can read shows as
admitting nobody, exactly as the running agent sees it.  Each finding that
is not ``ok`` carries the command that fixes it.

Findings (``name``): ``keys``, ``keys-line`` (a line that admits nobody),
``keys-warning``, ``host-key``, ``module``,
``device``, ``tcp-syncookies``, ``netns``, ``dnat``, ``clock``,
``ntp-offset``, ``listening``, ``service``, ``last-poll``.  Their
``status``: ``ok``; ``fail`` (something MITIGATOR relies on is broken:
the command exits 1); ``warn`` (worth knowing, does not fail);
``info`` (nothing to judge, e.g. no systemd).

JSON (``status --json``, ``check --json``) is one object, schema
``REPORT_SCHEMA`` below (JSON Schema draft 2020-12), ``version`` 1::

    {"version": 1, "command": "check", "ok": false, "user": "mitigator_agent",
     "config": "/opt/mitigator_agent/agent.toml",
     "items": [{"name": "tcp-syncookies", "status": "fail",
                "text": "tcp_syncookies = 2 (is 1)",
                "fix": "run sysctl -w net.ipv4.tcp_syncookies=2 and keep it in /etc/sysctl.d/90-tcpsecrets.conf",
                "facts": {"value": 1}}, ...]}

``ok`` is true when no item has status ``fail``.  ``facts`` holds the
machine-readable values of an item (counts, paths, fingerprints, times as
Unix seconds); it never holds a secret.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import modulestate, namespaces
from .authkeys import KeysFile, refusal_remedy
from .clock import (DEFAULT_NTP_SERVERS, ClockState, NtpUnavailable, TimeService, ask_time_service, describe_kernel_clock,
                    kernel_clock_state, measure_ntp_offset)
from .hostkey import HostKeyError, fingerprint_line, load_host_key
from .runas import account, call_as, can_become, current_user_name, group_name
from .knownsources import KnownSourcesError, read_known_sources
from .runstate import RuntimeStateError, read_polls
from .server import CHECK_PROBE_VERSION, DEFAULT_PORT, SERVER_VERSION, format_address, split_listen_address
from .snapshot import DeviceMissing, Snapshot, SnapshotError, read_snapshot

SYNCOOKIES_PROC = "/proc/sys/net/ipv4/tcp_syncookies"
SYSCTL_FILE = "/etc/sysctl.d/90-tcpsecrets.conf"
MODPROBE_FILE = "/etc/modprobe.d/tcpsecrets.conf"
SERVICE = "mitigator-agent"
SYSTEMD_RUNNING = "/run/systemd/system"  # sd_booted(3)
SSH_BANNER_PREFIX = b"SSH-2.0-"
LOOPBACK_FOR_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}

OK, FAIL, WARN, INFO = "ok", "fail", "warn", "info"
SCHEMA_VERSION = 1

REPORT_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mitigator-agent status/check report",
    "type": "object",
    "required": ["version", "command", "ok", "user", "config", "items"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": SCHEMA_VERSION},
        "command": {"enum": ["status", "check"]},
        "ok": {"type": "boolean", "description": "no item has status fail"},
        "user": {"type": "string", "description": "the account files and the device were judged as"},
        "config": {"type": ["string", "null"], "description": "the config file read, null if none"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "status", "text", "fix", "facts"],
                "additionalProperties": False,
                "properties": {
                    "name": {"enum": ["keys", "keys-line", "keys-warning", "host-key", "module", "device", "tcp-syncookies",
                                      "netns", "dnat", "clock", "ntp-offset", "listening", "service",
                                      "last-poll", "user"]},
                    "status": {"enum": [OK, FAIL, WARN, INFO]},
                    "text": {"type": "string"},
                    "fix": {"type": ["string", "null"], "description": "the command that fixes it"},
                    "facts": {"type": "object"},
                },
            },
        },
    },
}

KEYS_LIST_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mitigator-agent keys list --json",
    "type": "object",
    "required": ["version", "path", "user", "admits_nobody_because", "keys", "warnings"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": SCHEMA_VERSION},
        "path": {"type": "string"},
        "user": {"type": "string", "description": "the account the file was judged as"},
        "admits_nobody_because": {"type": ["string", "null"]},
        "keys": {"type": "array", "items": {
            "type": "object", "required": ["line", "fingerprint", "instance", "options"],
            "additionalProperties": False,
            "properties": {"line": {"type": "integer", "minimum": 1},
                           "fingerprint": {"type": "string", "pattern": "^SHA256:"},
                           "instance": {"type": ["string", "null"]},
                           "options": {"type": "array", "items": {"type": "string"}}}}},
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}


@dataclass
class Item:
    """One finding: ``text`` is check's sentence, ``label: summary`` status's line."""

    name: str
    status: str
    text: str
    fix: Optional[str] = None
    facts: Dict[str, Any] = field(default_factory=dict)
    label: str = ""
    summary: str = ""

    def check_line(self) -> str:
        """``ok   TEXT``, ``FAIL TEXT: FIX``, ``warn TEXT: FIX``, ``info TEXT``."""
        word = {OK: "ok  ", FAIL: "FAIL", WARN: "warn", INFO: "info"}[self.status]
        return f"{word} {self.text}" + (f": {self.fix}" if self.fix and self.status != OK else "")

    def status_line(self) -> str:
        """``LABEL: SUMMARY``, with ``: FIX`` when it is not ok."""
        summary = self.summary or self.text
        return f"{self.label or self.name}: {summary}" + (f": {self.fix}" if self.fix and self.status != OK else "")

    def as_json(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.status, "text": self.text, "fix": self.fix, "facts": self.facts}


@dataclass(frozen=True)
class Subject:
    """What to look at: the paths and addresses ``serve`` uses, and its account."""

    keys_path: str
    host_key_path: str
    device: str
    user: str
    port: int = DEFAULT_PORT
    listen: Tuple[str, ...] = ()
    runtime_dir: str = ""
    state_dir: str = ""                # where serve keeps the known sources ("": not judged)
    allow: Tuple[str, ...] = ()        # serve's allow list: MITIGATOR's networks, reserved


def quiet_logger() -> logging.Logger:
    """A logger that drops records: the commands print their own findings."""
    logger = logging.getLogger("mitigator_agent.quiet")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


# --- judged as the service's user -----------------------------------------------------

def _snapshot_facts(snap: Snapshot) -> Dict[str, Any]:
    return {"abi": snap.abi_version, "hz": snap.hz, "isn_algorithm": snap.algorithm,
            "cookie_clock": snap.cookie_clock_name, "set_generation": snap.set_generation,
            "tcp_syncookies": snap.tcp_syncookies}


def describe_snapshot(snap: Snapshot) -> str:
    """One line about the module: ABI, HZ, algorithms, cookie clock, sets applied."""
    return (f"ABI {snap.abi_version}, HZ {snap.hz}, isn_algorithm {snap.algorithm},"
            f" cookie_clock {snap.cookie_clock_name}, set_generation {snap.set_generation},"
            f" tcp_syncookies {snap.tcp_syncookies}")


def keys_view(keys_path: str) -> Dict[str, Any]:
    """The keys file as the running agent would judge it, were it this process: entries, refusal, warnings."""
    state = KeysFile(keys_path, logger=quiet_logger()).state()
    return {"admitted": [{"line": e.line_number, "fingerprint": e.fingerprint, "instance": e.instance or None,
                          "options": list(e.options)} for e in state.entries],
            "refusal": state.refusal, "warnings": list(state.warnings)}


def _known_view(subject: Subject) -> Dict[str, Any]:
    """The keys whose sources are reserved before anyone polls (from=), and the known sources."""
    state = KeysFile(subject.keys_path, logger=quiet_logger()).state()
    view: Dict[str, Any] = {"named_by_from": [e.fingerprint for e in state.entries if e.names_sources],
                            "known": [], "error": None}
    if subject.state_dir:
        try:
            view["known"] = [{"address": s.address, "key": s.key, "last": s.last}
                             for s in read_known_sources(subject.state_dir)]
        except KnownSourcesError as exc:
            view["error"] = str(exc)
    return view


def _as_user_view(subject: Subject) -> Dict[str, Any]:
    """Keys, host key and device as the current process sees them (run as the service's user)."""
    keys = keys_view(subject.keys_path)
    keys["sources"] = _known_view(subject)
    host_key: Dict[str, Any] = {"line": None, "missing": False, "error": None, "creatable": False}
    try:
        host_key["line"] = fingerprint_line(load_host_key(subject.host_key_path))
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(subject.host_key_path))
        host_key["missing"] = True
        host_key["creatable"] = os.access(directory, os.W_OK | os.X_OK)
        host_key["directory_exists"] = os.path.isdir(directory)
    except (HostKeyError, OSError) as exc:
        host_key["error"] = str(exc) if isinstance(exc, HostKeyError) else (
            f"host key {subject.host_key_path}: {exc.strerror or exc}")
    device: Dict[str, Any] = {"snapshot": None, "missing": False, "error": None}
    try:
        snap = read_snapshot(subject.device)
        device["snapshot"] = _snapshot_facts(snap)
        device["description"] = describe_snapshot(snap)
    except DeviceMissing:
        device["missing"] = True
    except SnapshotError as exc:
        device["error"] = str(exc)
    except OSError as exc:
        device["error"] = exc.strerror or str(exc)
    return {"keys": keys, "host_key": host_key, "device": device}


# --- the findings -----------------------------------------------------------------------

def _keys_items(view: Dict[str, Any], subject: Subject, group: str) -> List[Item]:
    keys = view["keys"]
    path = subject.keys_path
    items: List[Item] = []
    admitted = keys["admitted"]
    if keys["refusal"] is None:
        names = ", ".join(entry["instance"] or "-" for entry in admitted)
        count = f"{len(admitted)} key{'s' if len(admitted) != 1 else ''}"
        items.append(Item("keys", OK, f"keys file {path} admits {count} ({names})",
                          facts={"path": path, "admitted": len(admitted), "instances": [e["instance"] for e in admitted]},
                          label="keys", summary=f"{len(admitted)} admitted ({names}) from {path}"))
    else:
        items.append(Item("keys", FAIL, f"keys file admits nobody: {keys['refusal']}",
                          refusal_remedy(keys["refusal"], path, subject.user, group),
                          facts={"path": path, "admitted": 0, "reason": keys["refusal"]},
                          label="keys", summary=f"none admitted: {keys['refusal']}"))
    # A line that admits nobody locks out whoever it was written for: a failure, not a remark.
    for warning in keys["warnings"]:
        items.append(Item("keys-line", FAIL, f"keys file: {warning}",
                          "fix the line (mitigator-agent keys add replaces a key's line) or remove it",
                          facts={"path": path}, label="keys"))
    for instance, lines in duplicate_instances(admitted).items():
        items.append(Item("keys-warning", WARN, f"keys file: {duplicate_words(instance, lines)}", DUPLICATE_FIX,
                          facts={"path": path, "instance": instance, "lines": lines}, label="keys"))
    items.extend(_reservation_items(keys, subject))
    return items


def _reservation_items(keys: Dict[str, Any], subject: Subject) -> List[Item]:
    """A warning per key whose sources nothing reserves yet: no from=, no allow, never polled.

    Until such a key has polled once (its source is then known, knownsources.py), it competes
    with every stranger for the admission slots, and a flood of strangers can keep it out.
    """
    sources = keys.get("sources") or {}
    if not subject.state_dir or subject.allow or keys["refusal"] is not None:
        return []
    items = []
    if sources.get("error"):
        items.append(Item("keys-warning", WARN, f"known sources: {sources['error']}",
                          f"remove {os.path.join(subject.state_dir, 'known-sources.json')}; the agent writes it anew",
                          facts={"state_dir": subject.state_dir}, label="keys"))
    known = {item["key"] for item in sources.get("known", [])}
    for entry in keys["admitted"]:
        if entry["fingerprint"] in sources.get("named_by_from", []) or entry["fingerprint"] in known:
            continue
        name = entry["instance"] or "-"
        items.append(Item(
            "keys-warning", WARN,
            f"key {name} ({entry['fingerprint']}) has no reserved source yet: until it has polled once,"
            f" strangers flooding port {subject.port} can keep it out",
            f"let MITIGATOR poll once (its source is then remembered), or name its addresses:"
            f" mitigator-agent keys add 'from=\"ADDRESS\" ssh-ed25519 ... {name}'"
            f" (or allow = [\"CIDR\"] in the config)",
            facts={"path": subject.keys_path, "fingerprint": entry["fingerprint"], "instance": entry["instance"]},
            label="keys"))
    return items


DUPLICATE_FIX = "give each key its own name (mitigator-agent keys add 'KEY NEWNAME')"


def duplicate_instances(admitted: Sequence[Dict[str, Any]]) -> Dict[str, List[int]]:
    """Instance names carried by more than one admitted key, with their lines."""
    seen: Dict[str, List[int]] = {}
    for entry in admitted:
        if entry["instance"]:
            seen.setdefault(entry["instance"], []).append(entry["line"])
    return {instance: lines for instance, lines in seen.items() if len(lines) > 1}


def duplicate_words(instance: str, lines: Sequence[int]) -> str:
    """Why one instance name on several lines is a problem."""
    return (f"instance name {instance} is on lines {', '.join(map(str, lines))}:"
            " logs and `keys remove` cannot tell them apart")


def _host_key_item(view: Dict[str, Any], subject: Subject) -> Item:
    info = view["host_key"]
    path = subject.host_key_path
    if info["line"]:
        return Item("host-key", OK, f"host key {path}: {info['line']}", facts={"path": path, "fingerprint": info["line"]},
                    label="host key", summary=f"{info['line']} ({path}; MITIGATOR pins it)")
    if info["missing"]:
        directory = os.path.dirname(os.path.abspath(path))
        create = f"{_as_user_prefix(subject.user)}mitigator-agent host-key --host-key {path}"
        if not info.get("directory_exists", True):
            fix = f"run mkdir -p {directory} && chown {subject.user} {directory}, then {create}"
        elif info["creatable"]:
            fix = f"run {create} and give MITIGATOR the fingerprint it prints"
        else:
            fix = f"run chown {subject.user} {directory}, then {create}"
        return Item("host-key", FAIL, f"host key {path} does not exist yet", fix,
                    facts={"path": path, "missing": True}, label="host key", summary=f"{path} missing")
    error = info["error"] or f"host key {path} cannot be used"
    fix = None
    if "run chmod" in error:
        error, _, fix = error.partition("; ")
    elif "Permission denied" in error:
        fix = f"run chown {subject.user} {path} && chmod 600 {path}"
    else:
        fix = f"fix or restore {path} (a new key changes the fingerprint MITIGATOR pins)"
    return Item("host-key", FAIL, error, fix, facts={"path": path}, label="host key", summary=error)


def _as_user_prefix(user: str) -> str:
    """``runuser -u USER -- `` when USER is not who runs this command, else nothing."""
    return "" if user == current_user_name() else f"runuser -u {user} -- "


def _device_items(view: Dict[str, Any], subject: Subject, gid: int, group: str) -> List[Item]:
    device = view["device"]
    path = subject.device
    if device["missing"]:
        absence = modulestate.diagnose()
        return [Item("module", FAIL, f"module loaded: tcpsecrets module not loaded (no {path}): {absence.sentence}",
                     f"{absence.remedy}",
                     facts={"device": path, "loaded": False, "cause": absence.kind, "kernel": absence.kernel},
                     label="module", summary=f"not loaded (no {path}): {absence.sentence}")]
    items = []
    is_device = _is_char_device(path)
    if device["snapshot"] is not None:
        items.append(Item("module", OK, f"module loaded ({path}, {device['description']})",
                          facts={"device": path, "loaded": True, **device["snapshot"]}, label="module",
                          summary=f"loaded, {device['description']} ({path})"))
        items.append(Item("device", OK, f"device {path} readable by {subject.user}",
                          facts={"device": path, "user": subject.user}, label="device",
                          summary=f"readable by {subject.user}"))
        return items
    items.append(Item("module", OK if is_device else INFO, f"module loaded ({path} exists)",
                      facts={"device": path, "loaded": True}, label="module", summary=f"loaded ({path})"))
    error = device["error"]
    if "Permission denied" in error or "not permitted" in error:
        fix = (f"load the module with the agent's group: modprobe -r tcpsecrets && modprobe tcpsecrets"
               f" read_gid={gid}, and keep `options tcpsecrets read_gid={gid}` in {MODPROBE_FILE}"
               if is_device else f"run chgrp {group} {path} && chmod g+r {path}")
    else:
        fix = "reload the module (modprobe -r tcpsecrets && modprobe tcpsecrets); a module older than this agent needs an update"
    items.append(Item("device", FAIL, f"device {path} not readable by {subject.user}: {error}", fix,
                      facts={"device": path, "user": subject.user, "error": error}, label="device",
                      summary=f"not readable by {subject.user}: {error}"))
    return items


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def read_syncookies(proc_path: str = SYNCOOKIES_PROC) -> Optional[int]:
    """net.ipv4.tcp_syncookies of this namespace, None if unreadable."""
    try:
        with open(proc_path) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def syncookies_item(value: Optional[int]) -> Item:
    """tcp_syncookies must be 2: cookies for every SYN, so MITIGATOR's cookie ACKs are checked."""
    shown = "unknown" if value is None else str(value)
    if value == 2:
        return Item("tcp-syncookies", OK, "tcp_syncookies = 2", facts={"value": 2}, label="tcp_syncookies", summary="2")
    return Item("tcp-syncookies", FAIL, f"tcp_syncookies = 2 (is {shown})",
                f"run sysctl -w net.ipv4.tcp_syncookies=2 and keep it in {SYSCTL_FILE}",
                facts={"value": value}, label="tcp_syncookies", summary=f"{shown}, must be 2")


def _namespace_items() -> List[Item]:
    """Network namespaces (containers) that would refuse MITIGATOR's cookies, and DNAT rules."""
    try:
        table = namespaces.read_table()
    except namespaces.TableUnavailable as exc:
        return [Item("netns", FAIL, f"network namespaces: {exc}", "reload the module (modprobe -r tcpsecrets && modprobe tcpsecrets)",
                     label="network namespaces")]
    namespaces.add_processes(table)
    losing = namespaces.losing_cookies(table)
    items = []
    if not losing:
        items.append(Item("netns", OK, f"cookies accepted in every network namespace with listeners ({len(table)} namespaces)",
                          facts={"namespaces": len(table)}, label="network namespaces",
                          summary=f"{len(table)}, all accept cookies"))
    for ns in losing:
        where = ", ".join(ns.processes[:3]) or "processes not visible (run as root)"
        ports = ",".join(map(str, ns.listening_ports)) or "-"
        items.append(Item("netns", FAIL, f"network namespace {ns.name} refuses MITIGATOR's cookies"
                                         f" (tcp_syncookies={ns.syncookies}, {ns.refused} refused so far;"
                                         f" listening ports {ports}; {where})", namespaces.remedy(ns),
                          facts={"inum": ns.inum, "syncookies": ns.syncookies, "refused": ns.refused},
                          label="network namespaces"))
    rules = namespaces.dnat_rules()
    if rules:
        items.append(Item("dnat", WARN, f"DNAT rules found ({len(rules)}): services reached through destination NAT"
                                        f" cannot accept MITIGATOR's cookies; first: {rules[0]}",
                          "use host networking, macvlan/ipvlan or routed addresses for those services",
                          facts={"rules": len(rules)}, label="DNAT"))
    return items


def _service_words(service: TimeService) -> str:
    parts = []
    if service.offset is not None:
        parts.append(f"offset {service.offset * 1000:+.1f} ms")
    if service.server:
        parts.append(f"server {service.server}")
    return f"{service.name}" + (f": {', '.join(parts)}" if parts else "")


def clock_items(ntp_servers: Sequence[str] = (), max_offset: float = 0.1, timeout: float = 3.0,
                measure: bool = True) -> List[Item]:
    """The time service's word on the clock; NTP servers asked when none answers (or when named)."""
    items = []
    service = ask_time_service()
    if service is not None:
        facts = {"service": service.name, "synchronized": service.synchronized, "offset_s": service.offset,
                 "server": service.server}
        if service.synchronized:
            items.append(Item("clock", OK, f"clock synchronised ({_service_words(service)})", facts=facts,
                              label="clock", summary=f"synchronised ({_service_words(service)})"))
        else:
            items.append(Item("clock", FAIL, f"clock synchronised: {service.name} says no ({service.detail})",
                              _time_service_fix(service.name), facts=facts, label="clock",
                              summary=f"NOT synchronised ({service.name}: {service.detail})"))
        if service.offset is not None and abs(service.offset) > max_offset:
            items.append(Item("ntp-offset", FAIL, f"clock offset {service.offset * 1000:+.1f} ms"
                                                  f" (limit {max_offset * 1000:.0f} ms, {service.name})",
                              f"wait for {service.name} to slew the clock, or step it: {_step_command(service.name)}",
                              facts={"offset_s": service.offset, "limit_s": max_offset}, label="clock offset"))
    else:
        try:
            kernel = kernel_clock_state()
        except OSError as exc:
            items.append(Item("clock", FAIL, f"clock synchronised: the kernel cannot be asked ({exc.strerror})",
                              "install a time service: apt install chrony", label="clock"))
        else:
            words = describe_kernel_clock(kernel)
            facts = {"service": None, "synchronized": kernel.synchronized, "maxerror_ms": kernel.maxerror_us // 1000}
            if kernel.synchronized:
                items.append(Item("clock", OK, f"clock synchronised: {words}", facts=facts, label="clock",
                                  summary=f"synchronised ({words})"))
            else:
                items.append(Item("clock", FAIL, f"clock synchronised: no time service answers and {words}",
                                  "install and start one: apt install chrony (or systemctl enable --now systemd-timesyncd)",
                                  facts=facts, label="clock", summary=f"NOT synchronised ({words})"))
    if measure and (ntp_servers or service is None):
        servers = tuple(ntp_servers) or DEFAULT_NTP_SERVERS
        try:
            measured = measure_ntp_offset(servers, timeout)
        except NtpUnavailable as exc:
            items.append(Item("ntp-offset", FAIL, f"NTP offset: no server answered ({exc})",
                              "name a reachable NTP server with --ntp-server HOST (your network's own)",
                              facts={"servers": list(servers)}, label="clock offset"))
        else:
            ok = abs(measured.offset) <= max_offset
            items.append(Item("ntp-offset", OK if ok else FAIL,
                              f"NTP offset {measured.offset * 1000:+.1f} ms against {measured.server}"
                              f" (limit {max_offset * 1000:.0f} ms)",
                              None if ok else (f"point {service.name} at a server that agrees, then run"
                                               f" {_step_command(service.name)}" if service is not None else
                                               "run a time service: apt install chrony (or systemctl enable --now"
                                               " systemd-timesyncd)"),
                              facts={"offset_s": measured.offset, "server": measured.server, "limit_s": max_offset},
                              label="clock offset"))
    return items


def _time_service_fix(name: str) -> str:
    return {"chronyd": "let it reach a server on UDP 123 (chronyc sources shows which answer), then run chronyc makestep",
            "ntpd": "let it reach a peer on UDP 123 (ntpq -pn shows which answer), then run systemctl restart ntp"}.get(
        name, "let it reach a server on UDP 123 (timedatectl timesync-status shows the one it tries),"
              " then run timedatectl set-ntp true")


def _step_command(name: str) -> str:
    return {"chronyd": "chronyc makestep", "ntpd": "systemctl restart ntp"}.get(name, "systemctl restart systemd-timesyncd")


def probe_endpoints(subject: Subject) -> List[Tuple[str, int]]:
    """Where to knock: each listen address (wildcards through loopback), else 127.0.0.1 on the port."""
    endpoints = []
    for text in subject.listen or ("127.0.0.1",):
        host, port = split_listen_address(text)
        endpoints.append((LOOPBACK_FOR_WILDCARD.get(host, host), subject.port if port is None else port))
    return endpoints


# The software field of our SSH banner: another server on the port (the official agent's sshd, say)
# shows another one, and polls reach it, not us.
AGENT_BANNER = f"SSH-2.0-{SERVER_VERSION}".encode()


@dataclass(frozen=True)
class PortProblem:
    """Why the agent does not answer at an address: ``other`` when another program holds the port."""

    sentence: str
    other: bool = False


def probe_ssh_port(host: str, port: int, timeout: float) -> Optional[PortProblem]:
    """None if the agent answers at host:port, else why not.

    The agent is told from any other SSH server by its banner.  The probe
    says who it is (CHECK_PROBE_VERSION) before it hangs up, so the agent
    does not count it as a failed login.
    """
    where = format_address(host, port)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            banner = sock.makefile("rb").readline(256)
            if banner.startswith(SSH_BANNER_PREFIX):
                try:
                    sock.sendall(CHECK_PROBE_VERSION.encode() + b"\r\n")
                except OSError:
                    pass
    except socket.timeout:
        return PortProblem(f"nothing answers on {where} within {timeout:g} s")
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        return PortProblem(f"nothing listening on {where} ({reason})")
    if not banner.startswith(SSH_BANNER_PREFIX):
        return PortProblem(f"{where} does not speak SSH: another program holds the port", other=True)
    if banner.rstrip(b"\r\n") != AGENT_BANNER and not banner.startswith(AGENT_BANNER + b" "):
        shown = banner.rstrip(b"\r\n").decode("ascii", "backslashreplace")[:80]
        return PortProblem(f"another SSH server answers on {where} ({shown}), not the agent:"
                           " MITIGATOR's polls reach it", other=True)
    return None


def listening_items(subject: Subject, timeout: float, service_fix: str) -> List[Item]:
    items = []
    for host, port in probe_endpoints(subject):
        where = format_address(host, port)
        problem = probe_ssh_port(host, port, timeout)
        if problem is None:
            items.append(Item("listening", OK, f"agent listening on {where}", facts={"address": where},
                              label="listening", summary=where))
        else:
            fix = (f"find what holds port {port}: ss -ltnp 'sport = :{port}' (the official agent's sshd:"
                   " install this agent over it with sh mitigator-agent, or stop it)" if problem.other else service_fix)
            items.append(Item("listening", FAIL, f"agent listening: {problem.sentence}", fix,
                              facts={"address": where, "other_program": problem.other}, label="listening",
                              summary=problem.sentence))
    return items


def systemd_running() -> bool:
    return os.path.isdir(SYSTEMD_RUNNING)


def service_item() -> Item:
    """``systemctl is-active mitigator-agent`` where systemd runs; info elsewhere."""
    import subprocess
    if not systemd_running():
        return Item("service", INFO, f"service {SERVICE}: systemd is not running here, not judged",
                    label="service", summary="not judged (systemd is not running)")
    try:
        result = subprocess.run(["systemctl", "is-active", SERVICE], capture_output=True, text=True, timeout=10)
        state = result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError) as exc:
        state = f"unknown ({exc})"
    if state == "active":
        return Item("service", OK, f"service {SERVICE} active", facts={"state": state}, label="service", summary="active")
    return Item("service", FAIL, f"service {SERVICE} is {state}",
                f"run systemctl enable --now {SERVICE}; why it stopped: journalctl -u {SERVICE} -n 20",
                facts={"state": state}, label="service", summary=state)


def _ago(seconds: float) -> str:
    seconds = max(0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


# MITIGATOR polls every few seconds while it protects the server: this long without a poll means it
# no longer does (its configuration, the network or the firewall in between).
STALE_POLL_SECONDS = 900


def last_poll_items(instances: Sequence[str], runtime_dir: str, now: Optional[float] = None,
                    agent_answers: bool = True) -> List[Item]:
    """The last poll of each instance the keys file admits now, dated.

    Instances whose key was removed since are not shown (they cannot poll any more).  A poll
    older than STALE_POLL_SECONDS is a warning; while the agent does not answer on its port
    (``agent_answers`` False) a recorded poll is history, not a sign of health: it is shown as
    such, never as ``ok``.
    """
    now = time.time() if now is None else now
    try:
        polls = read_polls(runtime_dir)
    except RuntimeStateError as exc:
        return [Item("last-poll", WARN, f"last polls unknown: {exc}", "restart the agent: it rewrites the file",
                     label="last poll")]
    items = []
    for name in dict.fromkeys(instances):
        record = polls.get(name)
        if record is None:
            items.append(Item("last-poll", INFO, f"last poll by {name}: none recorded",
                              facts={"instance": name, "time": None}, label="last poll",
                              summary=f"{name}: none recorded"))
            continue
        age = now - record.time
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.time))
        words = (f"{name} from {record.source} at {stamp} ({_ago(age)}):"
                 f" {record.command}, exit status {record.status}, {record.result}")
        facts = {"instance": name, "source": record.source, "key": record.key, "time": record.time,
                 "command": record.command, "status": record.status, "result": record.result,
                 "age_s": round(age, 1)}
        if not agent_answers:
            status, fix = INFO, None
            words += ", before the agent stopped answering"
        elif record.status != 0:
            status, fix = WARN, "see the agent's log for that poll (journalctl -u mitigator-agent)"
        elif age > STALE_POLL_SECONDS:
            status = WARN
            words += f"; no poll for longer than {STALE_POLL_SECONDS // 60} min"
            fix = ("check that MITIGATOR still lists this agent and reaches its port (firewall, listen address);"
                   " its own log says why it stopped")
        else:
            status, fix = OK, None
        items.append(Item("last-poll", status, f"last poll by {words}", fix, facts=facts, label="last poll",
                          summary=words))
    return items


def judge(subject: Subject, *, command: str, probe_timeout: float = 3.0, ntp_servers: Sequence[str] = (),
          max_offset: float = 0.1, measure_ntp: bool = True) -> List[Item]:
    """Every finding about ``subject``, in the order an admin fixes them."""
    items: List[Item] = []
    try:
        user = account(subject.user)
    except Exception as exc:  # UserUnknown
        return [Item("user", FAIL, str(exc), f"useradd --system --home-dir /opt/mitigator_agent {subject.user}",
                     label="user")]
    group = group_name(user.pw_gid)
    if not can_become(user):
        items.append(Item("user", WARN, f"judged as you, not as {subject.user}: only root can try files as another user",
                          "run this as root", label="user"))
    view = call_as(user, lambda: _as_user_view(subject))
    items.append(_host_key_item(view, subject))
    items.extend(_keys_items(view, subject, group))
    items.extend(_device_items(view, subject, user.pw_gid, group))
    snapshot = view["device"]["snapshot"]
    syncookies = snapshot["tcp_syncookies"] if snapshot else read_syncookies()
    items.append(syncookies_item(syncookies))
    if command == "check" and snapshot is not None and _is_char_device(subject.device):
        items.extend(_namespace_items())  # a snapshot file (tests) has no namespace table
    items.extend(clock_items(ntp_servers, max_offset, probe_timeout, measure=measure_ntp))
    service = service_item()
    service_fix = (f"run systemctl start {SERVICE}; why it stopped: journalctl -u {SERVICE} -n 20"
                   if systemd_running() else "start the agent: mitigator-agent serve")
    listening = listening_items(subject, probe_timeout, service_fix)
    items.extend(listening)
    items.append(service)
    if subject.runtime_dir:
        instances = [entry["instance"] or "-" for entry in view["keys"]["admitted"]]
        items.extend(last_poll_items(instances, subject.runtime_dir,
                                     agent_answers=not any(item.status == FAIL for item in listening)))
    return items


def report(items: Sequence[Item], command: str, user: str, config: Optional[str]) -> Dict[str, Any]:
    """The JSON report (REPORT_SCHEMA)."""
    return {"version": SCHEMA_VERSION, "command": command, "ok": not any(i.status == FAIL for i in items),
            "user": user, "config": config, "items": [item.as_json() for item in items]}


def startup_items(subject: Subject) -> List[Item]:
    """What will not work, as ``serve`` sees it at start (as itself; no subprocess, no network).

    Module missing or unreadable, tcp_syncookies not 2, the kernel clock
    not synchronised.  (The keys file reports itself: keys-file-admits-nobody.)
    """
    view = _as_user_view(subject)
    items = _device_items(view, subject, os.getegid(), group_name(os.getegid()))
    snapshot = view["device"]["snapshot"]
    items.append(syncookies_item(snapshot["tcp_syncookies"] if snapshot else read_syncookies()))
    try:
        kernel: Optional[ClockState] = kernel_clock_state()
    except OSError:
        kernel = None
    if kernel is not None and not kernel.synchronized:
        items.append(Item("clock", FAIL, "clock not synchronised: the kernel says no NTP daemon keeps it"
                                         " synchronised, and MITIGATOR computes this host's cookies from its own clock",
                          "run a time service: apt install chrony (or systemctl enable --now systemd-timesyncd)"))
    return [item for item in items if item.status == FAIL]
