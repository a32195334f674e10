"""The tcpsecrets module against the real kernel it is loaded into.

Runs as root inside a booted Debian kernel (see ../test_guest_kernels.py).
Every expected value comes from the project's own Python code
(mitigator_agent.cookies / .snapshot) fed with a /dev/tcpsecrets snapshot,
and is compared with what the kernel actually puts on the wire.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import TCP

from mitigator_agent import cookies
from mitigator_agent.snapshot import (
    F_ALG_SEQ_AND_TS_OFF, F_ALG_TS_SECRET, F_COOKIE_ACCEPT, F_NET_SECRET,
    F_SYNCOOKIE, F_SYNCOOKIE6, F_TS_SECRET, STRUCT_SIZE, Snapshot, decode,
    read_snapshot,
)

from . import packets
from .conftest import DEVICE, PROC, clear_of_jiffies_wrap, dmesg, insmod, load, module_loaded, sysctl, unload

NOBODY = 65534
READER_GID = 4242
BAD_DMESG = re.compile(r"WARNING:|BUG:|Call Trace|general protection|Oops", re.I)


def snapshot() -> Snapshot:
    return read_snapshot(str(DEVICE))


def syn_synack(version: int, port: int, mss: int = 1460, **tcp):
    """Send a SYN to the listener on `port`; return (client port, client ISN, SYN-ACK)."""
    src, dst = packets.client_address(version), packets.loopback(version)
    sport, isn = packets.random_port(), random.getrandbits(32)
    options = [("MSS", mss)] + tcp.pop("options", [])
    with packets.capture() as cap:
        packets.send(packets.segment(src, dst, sport, port, flags="S", seq=isn,
                                     options=options, **tcp), dst)
        synack = packets.wait_for(cap, version, sport)
    assert synack is not None, "no SYN-ACK from the listener"
    assert synack[TCP].flags == "SA" and synack[TCP].ack == (isn + 1) & 0xFFFFFFFF
    return sport, isn, synack


def synack_between_snapshots(version: int, **syn):
    """Snapshot, SYN to a fresh listener and its SYN-ACK, snapshot: (before, port, sport, isn, synack, after)."""
    with packets.listener(version) as lsock:
        port = lsock.getsockname()[1]
        before = snapshot()
        sport, isn, synack = syn_synack(version, port, **syn)
        after = snapshot()
    return before, port, sport, isn, synack, after


def forged_cookie_ack(version: int, port: int, snap: Snapshot) -> None:
    """ACK a cookie the kernel never sent, computed as MITIGATOR would."""
    src, dst = packets.client_address(version), packets.loopback(version)
    sport, isn = packets.random_port(), random.getrandbits(32)
    cookie = cookies.make_cookie(snap, src, dst, sport, port, isn, mss=1460)
    packets.send(packets.segment(src, dst, sport, port, flags="A",
                                 seq=(isn + 1) & 0xFFFFFFFF, ack=(cookie + 1) & 0xFFFFFFFF), dst)


def as_user(argv: list[str], groups: list[int] = ()) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, user=NOBODY, group=NOBODY, extra_groups=list(groups),
                          capture_output=True)


# 1. The kernel's cookie SYN-ACK carries exactly the cookie our code computes.
@pytest.mark.parametrize("version", [4, 6])
def test_synack_isn_is_our_cookie(tcpsecrets, syncookies, version):
    tcpsecrets()
    syncookies(2)
    before, port, sport, isn, synack, after = synack_between_snapshots(
        version, mss=1460, options=[("SAckOK", b""), ("Timestamp", (12345, 0)), ("WScale", 7)])
    src, dst = packets.client_address(version), packets.loopback(version)
    expected = {cookies.make_cookie(s, src, dst, sport, port, isn, 1460) for s in (before, after)}
    assert synack[TCP].seq in expected
    assert (cookies.check_cookie(after, src, dst, sport, port, isn, synack[TCP].seq)
            == cookies.encoded_mss(version, 1460))

    # The timestamp: clock in the high bits, wscale 7 + SACK in the low six, plus ts_off.
    _, ts_off = cookies.isn_and_ts_offset(after, dst, src, port, sport)
    tsval = dict(synack[TCP].options)["Timestamp"][0]
    low = cookies.cookie_tsval(before.tcp_clock_ms, 7, True, False, ts_off)
    high = cookies.cookie_tsval(after.tcp_clock_ms, 7, True, False, ts_off)
    assert (tsval - ts_off) & 0x3F == 7 | cookies.TS_SACK
    assert (tsval - low) & 0xFFFFFFFF <= (high - low) & 0xFFFFFFFF


# 1b. Without cookies the ISN is net_secret's hash plus the 64 ns clock.
@pytest.mark.parametrize("version", [4, 6])
def test_plain_synack_isn_matches_net_secret(tcpsecrets, syncookies, version):
    tcpsecrets()
    syncookies(1)
    before, port, sport, _, synack, after = synack_between_snapshots(version)
    src, dst = packets.client_address(version), packets.loopback(version)
    lo, _ = cookies.isn_and_ts_offset(before, dst, src, port, sport)
    hi, _ = cookies.isn_and_ts_offset(after, dst, src, port, sport)
    assert (synack[TCP].seq - lo) & 0xFFFFFFFF <= (hi - lo) & 0xFFFFFFFF


# 2. A cookie ACK for a SYN the kernel never saw opens a connection.
@pytest.mark.parametrize("version", [4, 6])
def test_forged_cookie_ack_accepted_with_module(tcpsecrets, syncookies, version):
    tcpsecrets()
    syncookies(2)
    assert snapshot().cookie_accept
    with packets.listener(version) as fresh:
        forged_cookie_ack(version, fresh.getsockname()[1], snapshot())
        assert packets.accepts(fresh), "a valid cookie ACK was refused"


@pytest.mark.parametrize("version", [4, 6])
def test_forged_cookie_ack_refused_without_module(tcpsecrets, syncookies, version):
    tcpsecrets()
    snap = snapshot()
    unload()
    syncookies(2)
    clear_of_jiffies_wrap()
    with packets.listener(version) as fresh:
        forged_cookie_ack(version, fresh.getsockname()[1], snap)
        assert not packets.accepts(fresh), "the stock kernel accepted a cookie it never sent"


@pytest.mark.parametrize("version", [4, 6])
def test_forged_cookie_ack_refused_unless_syncookies_2(tcpsecrets, syncookies, version):
    tcpsecrets()
    syncookies(1)
    clear_of_jiffies_wrap()
    with packets.listener(version) as fresh:
        forged_cookie_ack(version, fresh.getsockname()[1], snapshot())
        assert not packets.accepts(fresh), "cookie accepted with tcp_syncookies=1"


def test_accept_cookies_parameter_off(tcpsecrets, syncookies):
    tcpsecrets("accept_cookies=0")
    syncookies(2)
    assert not snapshot().cookie_accept
    clear_of_jiffies_wrap()
    with packets.listener(4) as fresh:
        forged_cookie_ack(4, fresh.getsockname()[1], snapshot())
        assert not packets.accepts(fresh)


# 3. The device and /proc agree with each other and with the guest's clocks.
def test_snapshot_layout_and_secrets(tcpsecrets):
    tcpsecrets()
    fd = os.open(DEVICE, os.O_RDONLY)
    try:
        raw = os.read(fd, 4096)
        assert os.read(fd, 4096) == b"", "a second read must be end-of-file"
        again = os.pread(fd, 4096, 0)
        with pytest.raises(OSError) as short:
            os.pread(fd, STRUCT_SIZE - 1, 0)
        assert short.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert len(raw) == STRUCT_SIZE and len(again) == STRUCT_SIZE
    snap = decode(raw)
    assert snap.size == STRUCT_SIZE
    for flag in (F_SYNCOOKIE, F_SYNCOOKIE6, F_NET_SECRET, F_COOKIE_ACCEPT):
        assert snap.flags & flag
    for key in (snap.syncookie_secret[:16], snap.syncookie_secret[16:],
                snap.syncookie6_secret[:16], snap.syncookie6_secret[16:], snap.net_secret):
        assert key != bytes(16)
    has_ts_secret = "ts_secret" in {line.split()[2] for line in Path("/proc/kallsyms").read_text().splitlines()}
    # the kernel's own scheme is reported as it is ...
    assert bool(snap.flags & F_ALG_TS_SECRET) == has_ts_secret
    assert bool(snap.flags & F_ALG_SEQ_AND_TS_OFF) == (not has_ts_secret)
    # ... and the module's ts_secret keys every TS offset, on either scheme
    assert snap.flags & F_TS_SECRET and snap.ts_offset_hook and snap.ts_secret != bytes(16)
    assert snap.wall_clock and snap.cookie_count == snap.realtime_ns // (60 * 10**9)


@pytest.mark.parametrize("clock", ["jiffies", "wall"])
def test_proc_text_matches_device(tcpsecrets, clock):
    tcpsecrets(f"cookie_clock={clock}")
    before = snapshot()
    text = PROC.read_text()
    after = snapshot()
    lines = [line.split(" ") for line in text.splitlines()]
    assert [name for name, _ in lines] == [
        "time_sec", "time_ms", "uptime_ms", "jiffies", "cookie_secret", "net_secret", "timestamp_secret"]
    values = dict(lines)
    assert values["cookie_secret"] == after.syncookie_secret.hex()
    assert values["net_secret"] == after.net_secret.hex()
    assert values["timestamp_secret"] == after.ts_secret.hex()
    assert before.realtime_ns // 10**9 <= int(values["time_sec"]) <= after.realtime_ns // 10**9
    assert before.realtime_ns // 10**6 <= int(values["time_ms"]) <= after.realtime_ns // 10**6
    if clock == "jiffies":
        assert before.jiffies64 <= int(values["jiffies"]) <= after.jiffies64
        assert before.ts_shift_ms == after.ts_shift_ms == 0
    else:
        # wall mode: the cookie clock in jiffies, and the TS clock as the kernel now runs it
        hz = after.hz
        assert before.realtime_ns * hz // 10**9 <= int(values["jiffies"]) <= after.realtime_ns * hz // 10**9
        assert int(values["jiffies"]) // (60 * hz) in (before.cookie_count, after.cookie_count)
    # uptime_ms = the TCP clock + the shift of the read in between. The shift
    # is ((wall_ms - tcp_ms + 5000) & ~63) of that read: wall_ms - tcp_ms
    # flickers by 1 ms from read to read (two clocks floored separately), so
    # where it sits on a multiple of 64 two reads may differ by one step.
    if clock == "jiffies":
        shifts = {0}
    else:
        differences = [s.realtime_ns // 10**6 - s.tcp_clock_ms for s in (before, after)]
        shifts = {cookies.wall_ts_shift_ms(d, 0) for d in range(min(differences) - 1, max(differences) + 2)}
        assert after.ts_shift_ms in shifts and len(shifts) <= 2, (differences, after.ts_shift_ms)
    elapsed = after.tcp_clock_ms - before.tcp_clock_ms
    assert any((int(values["uptime_ms"]) - shift - before.tcp_clock_ms) & 0xFFFFFFFF <= elapsed
               for shift in shifts), (values["uptime_ms"], shifts, before.tcp_clock_ms, elapsed)
    assert text.endswith("\n") and all(re.fullmatch(r"[0-9a-f]+", v) for v in values.values())


def test_clocks_agree_with_guest(tcpsecrets):
    tcpsecrets()
    kver = os.environ["TCPSECRETS_KVER"]
    # the kernel's .config: /boot/config-KVER, or its headers' where the
    # image was unpacked rather than installed (tests/kernel/matrix.py)
    config = Path(os.environ.get("TCPSECRETS_KCONFIG", f"/boot/config-{kver}")).read_text()
    hz = int(re.search(r"^CONFIG_HZ=(\d+)$", config, re.M).group(1))

    wall0, mono0 = time.time_ns(), time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    first = snapshot()
    time.sleep(1.0)
    second = snapshot()
    wall1, mono1 = time.time_ns(), time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    assert first.hz == second.hz == hz
    assert wall0 <= first.realtime_ns <= second.realtime_ns <= wall1
    assert mono0 // 10**6 <= first.tcp_clock_ms <= second.tcp_clock_ms <= mono1 // 10**6
    # jiffies advance at HZ. Under TCG on a loaded host a vCPU can sit
    # descheduled with its tick pending, so either read may lag by tens of
    # ticks: allow 100 ms, which still tells HZ from any other rate (250 vs
    # 1000 is 75% off) and a clock that does not run.
    ticks = second.jiffies64 - first.jiffies64
    span = (second.tcp_clock_ms - first.tcp_clock_ms) * hz / 1000
    assert span >= hz * 0.9 and abs(ticks - span) <= 3 + hz // 10, (ticks, span, hz)
    # jiffies_64 starts at 2^32 - 300 s worth of ticks (INITIAL_JIFFIES)
    boot_ms = first.tcp_clock_ms
    assert abs(first.jiffies64 - (2**32 - 300 * hz) - boot_ms * hz / 1000) <= hz * 2


def test_sysctls_agree_with_proc(tcpsecrets, syncookies):
    tcpsecrets()
    syncookies(2)
    snap = snapshot()
    for name in ("tcp_syncookies", "tcp_timestamps", "tcp_sack", "tcp_window_scaling", "tcp_ecn"):
        assert getattr(snap, name) == sysctl(name), name


# 4. Only root, or the group named at load, may read the secrets.
def test_unprivileged_user_cannot_read(tcpsecrets):
    tcpsecrets()
    for path in (DEVICE, PROC):
        result = as_user(["cat", str(path)])
        assert result.returncode != 0 and result.stdout == b""
        assert b"Permission denied" in result.stderr
    assert oct(DEVICE.stat().st_mode & 0o777) == "0o600"
    assert oct(PROC.stat().st_mode & 0o777) == "0o400"


def test_reader_group_can_read(tcpsecrets):
    tcpsecrets(f"read_gid={READER_GID}")
    for path in (DEVICE, PROC):
        granted = as_user(["cat", str(path)], groups=[READER_GID])
        assert granted.returncode == 0, granted.stderr
        assert len(granted.stdout) == (STRUCT_SIZE if path == DEVICE else len(granted.stdout))
        refused = as_user(["cat", str(path)], groups=[READER_GID + 1])
        assert refused.returncode != 0 and refused.stdout == b""
    assert decode(as_user(["cat", str(DEVICE)], groups=[READER_GID]).stdout).net_secret == snapshot().net_secret
    assert PROC.stat().st_gid == READER_GID and oct(PROC.stat().st_mode & 0o777) == "0o440"


# 5. A failed load leaves nothing; rmmod restores the kernel; no warnings over many rounds.
def test_bad_parameter_fails_cleanly(tcpsecrets):
    result = insmod("read_gid=-7")
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr or "Invalid parameters" in result.stderr
    assert not module_loaded() and not DEVICE.exists() and not PROC.exists()
    assert "tcpsecrets: read_gid=-7 is not a valid group id" in dmesg()


def test_rmmod_restores_the_kernel(syncookies):
    unload()
    kprobes = Path("/sys/kernel/debug/kprobes/list")
    if not kprobes.parent.exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=True)
    load()
    listed = kprobes.read_text()
    assert "cookie_v4_check" in listed and "cookie_v6_check" in listed
    snap = snapshot()
    unload()
    assert not DEVICE.exists() and not PROC.exists() and not module_loaded()
    assert "cookie_v4_check" not in kprobes.read_text()
    assert "cookie_v6_check" not in kprobes.read_text()
    syncookies(2)
    clear_of_jiffies_wrap()
    for version in (4, 6):
        with packets.listener(version) as fresh:
            forged_cookie_ack(version, fresh.getsockname()[1], snap)
            assert not packets.accepts(fresh), f"IPv{version} cookie accepted after rmmod"


def test_many_load_read_unload_rounds_stay_clean():
    unload()
    start = len(dmesg().splitlines())
    for _ in range(50):
        load()
        assert snapshot().net_secret != bytes(16)
        assert PROC.read_text().startswith("time_sec ")
        unload()
    new = "\n".join(dmesg().splitlines()[start:])
    assert not BAD_DMESG.search(new), new
