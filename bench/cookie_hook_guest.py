"""Guest side of bench/cookie_hook.py: cookie connections/s on loopback, as root in a test kernel.

    python bench/cookie_hook_guest.py --out FILE.json [--connections N] [--rounds R] [--versions 4,6]

Each round measures, for each IP version, these configurations one after
the other (each round starting one configuration later; an unreported
round 0 warms up), each on a fresh listener on loopback:

- ``hook-wall``: the module loaded with its defaults (wall-clock cookies:
  the cookie check redirected to the module's, plus the accept kprobe);
- ``hook-jiffies``: the module with ``cookie_clock=jiffies``, so only the
  accept kprobe is in the path and the kernel's own cookie check runs;
- ``stock-overflow``: no module; the listener's SYN queue overflowed just
  before (the kernel sent it a cookie for a SYN, which stamps the
  overflow for two minutes), so the stock kernel checks and accepts cookies;
- ``stock-refused`` (control): no module, no overflow: the same cookie ACKs
  must all be refused (unless uptime is in the two minutes after the
  jiffies wrap, when every fresh listener counts as overflowed);
- ``floor``: the same ACKs with a wrong TCP checksum, dropped by TCP before
  any socket lookup: what sending and the IP layer cost by themselves.

The ACKs carry valid cookies (mitigator_agent.cookies, with the secrets the
module exports; they stay in the kernel when it is unloaded), one per
distinct client address and port. They are built before the clock starts
and sent as prebuilt bytes with sendmmsg(2) in batches, so Python does no
per-packet work while timing. On loopback the kernel runs the receive path
(softirq) inside the sending call, so the time to send and the time until
the last connection sits in the accept queue both measure the kernel's
per-ACK work. The connections are accepted afterwards and counted, then
reset.

Writes a JSON report; prints one line per measurement on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
# This checkout's agent and tests, not whatever the venv has installed.
sys.path[:0] = [str(REPO / "agent"), str(REPO)]

from mitigator_agent import cookies, packets  # noqa: E402
from mitigator_agent.snapshot import Snapshot, read_snapshot  # noqa: E402
from tests.kernel.guest.conftest import (  # noqa: E402
    JIFFIES_WRAP_WINDOW, load, module_loaded, sysctl, unload,
)

DEVICE = "/dev/tcpsecrets"
MSS = 1460
BACKLOG = 65535  # every connection of a run waits in the accept queue
BATCH = 512  # packets per sendmmsg(2) call
SETTLE_SECONDS = 0.5  # accept queue unchanged this long after the last send: done
OVERFLOW_MARK_SECONDS = 120  # TCP_SYNCOOKIE_VALID: how long the kernel honours an overflow stamp
CLIENT_PORT_BASE = 10000
CLIENTS_V4 = [ipaddress.ip_address(f"127.0.0.{host}") for host in range(2, 18)]
CLIENTS_V6 = [ipaddress.ip_address("::1")]  # lo carries no other IPv6 address
SYN_SOURCE_PORT = 9000  # the overflow trigger's SYNs: outside the ACKs' ports
TCP_INFO_UNACKED = struct.Struct("=24xI")  # struct tcp_info: tcpi_unacked (on a listener: accept queue length)

LIBC = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    """struct iovec."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    """struct msghdr."""

    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class MMsgHdr(ctypes.Structure):
    """struct mmsghdr: one message of sendmmsg(2)."""

    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


@dataclass(frozen=True)
class Config:
    """One way of running the kernel under the same cookie ACKs."""

    name: str
    label: str
    module_params: Optional[tuple[str, ...]]  # None: no module
    overflow: bool  # stamp a SYN-queue overflow on the listener first
    corrupt_checksum: bool = False


CONFIGS = [
    Config("hook-wall", "module loaded (defaults: wall-clock cookies)", (), False),
    Config("hook-jiffies", "module loaded, cookie_clock=jiffies (accept hook only)", ("cookie_clock=jiffies",), False),
    Config("stock-overflow", "no module, recent SYN-queue overflow", None, True),
    Config("stock-refused", "no module, no overflow (control: all refused)", None, False),
    Config("floor", "bad TCP checksum (control: send path and IP only)", None, False, corrupt_checksum=True),
]


@dataclass
class Measurement:
    """One configuration, one round, one IP version."""

    config: str
    version: int
    round: int
    sent: int
    accepted: int
    send_seconds: float  # first sendmmsg to the return of the last
    done_seconds: float  # first sendmmsg to the accept queue's final length
    counters: dict[str, int]  # TcpExt / Tcp counters that moved
    uptime: float  # when the first ACK was sent
    in_jiffies_wrap_window: bool


def tcp_checksum(pseudo_header: bytes, segment: bytes) -> int:
    """The Internet checksum of a TCP segment (its checksum field zero) with its pseudo-header."""
    data = pseudo_header + segment
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header(src: packets.Address, dst: packets.Address, length: int) -> bytes:
    """The TCP pseudo-header of IPv4 (RFC 793) or IPv6 (RFC 8200)."""
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, socket.IPPROTO_TCP)


class AckFactory:
    """Cookie ACK bytes from one scapy template per client address, patched per packet.

    scapy takes milliseconds per packet under TCG; the template is
    packets.segment()'s, and the patched packets are checked against it.
    """

    def __init__(self, clients: Sequence[packets.Address], dst: packets.Address, dport: int) -> None:
        self.dst, self.dport = dst, dport
        self.templates = {src: bytearray(packets.segment(src, dst, CLIENT_PORT_BASE, dport, flags="A", seq=0, ack=0))
                          for src in clients}

    def ack(self, src: packets.Address, sport: int, seq: int, ack: int, corrupt_checksum: bool) -> bytes:
        """One ACK from src:sport with these sequence numbers; its checksum right unless told."""
        packet = bytearray(self.templates[src])
        tcp_at = 20 if src.version == 4 else 40
        struct.pack_into("!HH", packet, tcp_at, sport, self.dport)
        struct.pack_into("!II", packet, tcp_at + 4, seq, ack)
        struct.pack_into("!H", packet, tcp_at + 16, 0)
        checksum = tcp_checksum(pseudo_header(src, self.dst, len(packet) - tcp_at), bytes(packet[tcp_at:]))
        struct.pack_into("!H", packet, tcp_at + 16, checksum ^ (1 if corrupt_checksum else 0))
        return bytes(packet)


def check_factory(factory: AckFactory, src: packets.Address) -> None:
    """The patched bytes equal scapy's own segment for the same fields."""
    sport, seq, ack = CLIENT_PORT_BASE + 7, 0x12345678, 0x9ABCDEF0
    want = packets.segment(src, factory.dst, sport, factory.dport, flags="A", seq=seq, ack=ack)
    got = factory.ack(src, sport, seq, ack, corrupt_checksum=False)
    if got != want:
        raise SystemExit(f"cookie-hook: patched ACK differs from scapy's:\n{got.hex()}\n{want.hex()}")


def cookie_acks(snap: Snapshot, version: int, dport: int, count: int, corrupt_checksum: bool) -> list[bytes]:
    """``count`` ACKs, each from a distinct client address:port, each with a cookie valid now."""
    clients = CLIENTS_V4 if version == 4 else CLIENTS_V6
    if count > (0x10000 - CLIENT_PORT_BASE) * len(clients):
        raise SystemExit(f"cookie-hook: {count} ACKs need more client ports than IPv{version} has here")
    dst = packets.loopback(version)
    factory = AckFactory(clients, dst, dport)
    for src in clients:
        check_factory(factory, src)
    counter = cookies.cookie_count_at(snap, time.time_ns())
    acks = []
    for index in range(count):
        src = clients[index % len(clients)]
        sport = CLIENT_PORT_BASE + index // len(clients)
        isn = random.getrandbits(32)
        cookie = cookies.make_cookie(snap, src, dst, sport, dport, isn, MSS, count=counter)
        acks.append(factory.ack(src, sport, (isn + 1) & 0xFFFFFFFF, (cookie + 1) & 0xFFFFFFFF, corrupt_checksum))
    return acks


def sockaddr(address: packets.Address) -> bytes:
    """struct sockaddr_in / sockaddr_in6 for ``address``, port 0."""
    if address.version == 4:
        return struct.pack("=H2x4s8x", socket.AF_INET, address.packed)
    return struct.pack("=H2xI16sI", socket.AF_INET6, 0, address.packed, 0)


class BatchSender:
    """Prebuilt packets sent through a raw socket, BATCH per sendmmsg(2) call."""

    def __init__(self, datagrams: list[bytes], dst: packets.Address) -> None:
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        self.sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 24)
        self.name = ctypes.create_string_buffer(sockaddr(dst))
        # Kept referenced: the iovecs point into these buffers.
        self.buffers = [ctypes.create_string_buffer(data, len(data)) for data in datagrams]
        self.batches = []
        for start in range(0, len(datagrams), BATCH):
            chunk = self.buffers[start:start + BATCH]
            iovecs = (IoVec * len(chunk))(*[IoVec(ctypes.cast(b, ctypes.c_void_p), len(b)) for b in chunk])
            messages = (MMsgHdr * len(chunk))()
            for i in range(len(chunk)):
                messages[i].msg_hdr = MsgHdr(ctypes.cast(self.name, ctypes.c_void_p), len(self.name.raw),
                                             ctypes.pointer(iovecs[i]), 1, None, 0, 0)
            self.batches.append((iovecs, messages))

    def send_all(self) -> None:
        """Send every packet, in order; partial sends are resumed."""
        fd = self.sock.fileno()
        for _, messages in self.batches:
            done = 0
            while done < len(messages):
                sent = LIBC.sendmmsg(fd, ctypes.byref(messages, done * ctypes.sizeof(MMsgHdr)),
                                     len(messages) - done, 0)
                if sent < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"sendmmsg: {os.strerror(err)}")
                done += sent

    def close(self) -> None:
        self.sock.close()


def accept_queue_length(listener: socket.socket) -> int:
    """Connections waiting in the listener's accept queue (TCP_INFO's tcpi_unacked on a listener)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return TCP_INFO_UNACKED.unpack_from(info)[0]


def wait_settled(listener: socket.socket, expected: int, started: float) -> float:
    """Seconds from ``started`` until the accept queue last grew (or reached ``expected``)."""
    length, changed_at = accept_queue_length(listener), time.perf_counter()
    while length < expected and time.perf_counter() - changed_at < SETTLE_SECONDS:
        time.sleep(0.001)
        now_length = accept_queue_length(listener)
        if now_length != length:
            length, changed_at = now_length, time.perf_counter()
    return changed_at - started


def drain(listener: socket.socket) -> int:
    """Accept every queued connection, resetting each (SO_LINGER 0); return how many."""
    listener.setblocking(False)
    accepted = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return accepted
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        accepted += 1


def tcp_counters() -> dict[str, int]:
    """Every Tcp and TcpExt counter of /proc/net/snmp and /proc/net/netstat, as 'TcpExt.Name'."""
    found: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = Path(path).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix, _, rest = names.partition(": ")
            if prefix in ("Tcp", "TcpExt"):
                for name, value in zip(rest.split(), values.partition(": ")[2].split()):
                    found[f"{prefix}.{name}"] = int(value)
    return found


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed, and by how much (only those that tell the cookie story)."""
    wanted = ("SyncookiesSent", "SyncookiesRecv", "SyncookiesFailed", "ListenOverflows", "ListenDrops",
              "PassiveOpens", "InCsumErrors", "InErrs", "OutRsts")
    return {name: after[name] - before.get(name, 0) for name in after
            if name.split(".", 1)[1] in wanted and after[name] != before.get(name, 0)}


def uptime() -> float:
    """Seconds since boot (/proc/uptime)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def stamp_overflow(version: int, port: int) -> None:
    """Make the kernel send the listener a cookie SYN-ACK, which stamps a SYN-queue overflow.

    With tcp_syncookies=2 every SYN is answered with a cookie; the kernel
    calls tcp_synq_overflow() for each one (cookie_init_sequence()), the same
    stamp a full SYN queue leaves. Checked with TcpExt SyncookiesSent.
    """
    src, dst = packets.client_address(version), packets.loopback(version)
    before = tcp_counters()["TcpExt.SyncookiesSent"]
    packets.send(packets.segment(src, dst, SYN_SOURCE_PORT, port, flags="S", seq=random.getrandbits(32),
                                 options=[("MSS", MSS)]), dst)
    deadline = time.monotonic() + 5
    while tcp_counters()["TcpExt.SyncookiesSent"] == before:
        if time.monotonic() > deadline:
            raise SystemExit("cookie-hook: the listener sent no cookie for a SYN; no overflow stamped")
        time.sleep(0.01)


def set_module(config: Config) -> None:
    """Load the module with the configuration's parameters, or leave it unloaded."""
    unload()
    if config.module_params is not None:
        load(*config.module_params)


def measure(config: Config, version: int, round_no: int, count: int, stock: Snapshot) -> Measurement:
    """One run of ``count`` cookie ACKs at a fresh listener in this configuration."""
    set_module(config)
    snap = read_snapshot(DEVICE) if module_loaded() else stock
    with packets.listener(version) as listener:
        listener.listen(BACKLOG)
        port = listener.getsockname()[1]
        building = time.monotonic()
        acks = cookie_acks(snap, version, port, count, config.corrupt_checksum)
        sender = BatchSender(acks, packets.loopback(version))
        built_in = time.monotonic() - building
        if config.overflow:
            stamped = time.monotonic()
            stamp_overflow(version, port)
        before = tcp_counters()
        sent_at_uptime = uptime()
        started = time.perf_counter()
        sender.send_all()
        send_seconds = time.perf_counter() - started
        done_seconds = wait_settled(listener, count, started)
        after = tcp_counters()
        if config.overflow and time.monotonic() - stamped > OVERFLOW_MARK_SECONDS - 10:
            raise SystemExit("cookie-hook: the run outlasted the overflow stamp; use fewer --connections")
        accepted = drain(listener)
        sender.close()
    result = Measurement(config.name, version, round_no, count, accepted, send_seconds,
                         max(done_seconds, send_seconds), moved(before, after), sent_at_uptime,
                         JIFFIES_WRAP_WINDOW[0] <= sent_at_uptime <= JIFFIES_WRAP_WINDOW[1])
    print(f"cookie-hook: round {round_no} IPv{version} {config.name}: built in {built_in:.1f} s, "
          f"{accepted}/{count} accepted, sent in {send_seconds:.3f} s, done in {result.done_seconds:.3f} s "
          f"({accepted / result.done_seconds:,.0f} connections/s) {result.counters}", file=sys.stderr, flush=True)
    return result


def stock_snapshot() -> Snapshot:
    """Secrets and the jiffies counter, read from the module in jiffies mode: what the stock kernel uses."""
    unload()
    load("cookie_clock=jiffies")
    snap = read_snapshot(DEVICE)
    unload()
    return snap


def prepare_kernel() -> dict[str, int]:
    """Loopback up, cookies always on, queues big enough for a whole run; returns what was set."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    settings = {"tcp_syncookies": 2}
    sysctl("tcp_syncookies", 2)
    for name, value in (("somaxconn", BACKLOG), ("netdev_max_backlog", 100000)):
        Path(f"/proc/sys/net/core/{name}").write_text(f"{value}\n")
        settings[name] = value
    return settings


def dmesg_problems() -> list[str]:
    """Kernel log lines that mean the module or the kernel misbehaved."""
    text = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines()
            if any(word in line for word in ("WARNING:", "BUG:", "Call Trace", "Oops", "general protection"))]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cookie_hook_guest.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--versions", default="4,6")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or os.environ.get("TCPSECRETS_IN_GUEST") != "1":
        raise SystemExit("cookie-hook: runs as root in a test guest (bench/cookie_hook.py boots one)")
    versions = [int(v) for v in args.versions.split(",")]
    settings = prepare_kernel()
    stock = stock_snapshot()
    results: list[Measurement] = []
    # Round 0 warms up (socket slabs, the module's first load, page cache) and is not reported.
    for round_no in range(0, args.rounds + 1):
        # Each round starts one configuration later, so none always runs first.
        order = CONFIGS[round_no % len(CONFIGS):] + CONFIGS[:round_no % len(CONFIGS)]
        for version in versions:
            for config in order:
                measured = measure(config, version, round_no, args.connections, stock)
                if round_no > 0:
                    results.append(measured)
    unload()
    report = {"kernel": os.uname().release, "cpus": os.cpu_count(), "hz": stock.hz, "settings": settings,
              "connections": args.connections, "rounds": args.rounds, "batch": BATCH,
              "configs": [asdict(c) for c in CONFIGS], "measurements": [asdict(m) for m in results],
              "dmesg_problems": dmesg_problems()}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
