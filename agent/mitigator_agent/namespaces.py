"""Network namespaces (containers) as the tcpsecrets module sees them.

The module lists every network namespace in /proc/tcpsecrets_netns, one
line each: ``netns INUM syncookies N accepts yes|no refused COUNT``. A
namespace that does not accept cookies loses MITIGATOR's cookie ACKs for
the services listening in it; ``refused`` counts the valid ones it lost.

As root, the processes in a namespace and its TCP listeners are found
through /proc/PID/ns/net (a link to ``net:[INUM]``) and /proc/PID/net/tcp{,6}.
Destination NAT (Docker's ``-p``, kube-proxy) rewrites the address a cookie
was computed for, so such services cannot accept MITIGATOR's cookies at all;
:func:`dnat_rules` finds those rules in the ruleset.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional

NETNS_TABLE = "/proc/tcpsecrets_netns"
TCP_LISTEN_STATE = "0A"
_LINE = re.compile(r"netns (\d+) syncookies (-?\d+) accepts (yes|no) refused (\d+)")


@dataclass
class Namespace:
    """One line of the module's namespace table, plus what /proc tells about it."""

    inum: int
    syncookies: int
    accepts: bool
    refused: int
    processes: List[str] = field(default_factory=list)  # "PID COMM", root only
    listening_ports: List[int] = field(default_factory=list)  # root only

    @property
    def name(self) -> str:
        return f"net:[{self.inum}]"


class TableUnavailable(Exception):
    """The module's namespace table cannot be read; the message says why."""


def read_table(path: str = NETNS_TABLE) -> List[Namespace]:
    """Parse /proc/tcpsecrets_netns (raises TableUnavailable)."""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise TableUnavailable(f"{path} is missing: the tcpsecrets module is not loaded or too old") from None
    except OSError as exc:
        raise TableUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TableUnavailable(f"{path} is not ASCII text (byte {exc.start})") from None
    table = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise TableUnavailable(f"{path} line {number} is not understood")
        inum, syncookies, accepts, refused = match.groups()
        table.append(Namespace(int(inum), int(syncookies), accepts == "yes", int(refused)))
    return table


def _listening_ports(proc: str, pid: str) -> List[int]:
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/{pid}/net/{name}", encoding="ascii") as handle:
                next(handle, None)  # header
                for row in handle:
                    fields = row.split()
                    if len(fields) > 3 and fields[3] == TCP_LISTEN_STATE:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return sorted(ports)


def add_processes(table: List[Namespace], proc: str = "/proc") -> None:
    """Fill in each namespace's processes and listening TCP ports (needs root to see all)."""
    by_inum: Dict[int, Namespace] = {ns.inum: ns for ns in table}
    for pid in filter(str.isdigit, os.listdir(proc)):
        try:
            link = os.readlink(f"{proc}/{pid}/ns/net")
            with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as handle:
                comm = handle.read().strip()
        except OSError:
            continue  # gone, or not ours to see
        match = re.fullmatch(r"net:\[(\d+)\]", link)
        ns = by_inum.get(int(match.group(1))) if match else None
        if ns is None:
            continue
        ns.processes.append(f"{pid} {comm}")
        if not ns.listening_ports:
            ns.listening_ports = _listening_ports(proc, pid)


def losing_cookies(table: List[Namespace]) -> List[Namespace]:
    """Namespaces that refuse cookies and either lost some or have TCP listeners."""
    return [ns for ns in table if not ns.accepts and (ns.refused or ns.listening_ports)]


def remedy(ns: Namespace) -> str:
    """What the admin can do for a namespace that refuses cookies."""
    if ns.syncookies == 0:
        return ("its tcp_syncookies is 0 (an explicit opt-out): set it to 2 in that namespace "
                "(docker run --sysctl net.ipv4.tcp_syncookies=2; Kubernetes: the pod sysctl)")
    return ("set its tcp_syncookies to 2 (docker run --sysctl net.ipv4.tcp_syncookies=2; Kubernetes: "
            "the pod sysctl net.ipv4.tcp_syncookies), or load tcpsecrets with accept_all_netns=1 and "
            "the host's net.ipv4.tcp_syncookies=2")


def dnat_rules() -> Optional[List[str]]:
    """Destination-NAT rules in the ruleset (nft, else iptables-save); None if it cannot be read."""
    commands = []
    if shutil.which("nft"):
        commands.append(["nft", "list", "ruleset"])
    if shutil.which("iptables-save"):
        commands.append(["iptables-save", "-t", "nat"])
    found, read_any = [], False
    for argv in commands:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode != 0:
            continue
        read_any = True
        found += [line.strip() for line in result.stdout.splitlines()
                  if re.search(r"\bdnat\b|-j DNAT\b", line, re.I)]
    return found if read_any else None
