"""mitigator_agent.snapshot: the cffi view of kmod/include/uapi/tcpsecrets.h."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mitigator_agent import snapshot
from mitigator_agent.snapshot import DeviceMissing, SnapshotError, decode, read_snapshot

KERNEL_SNAPSHOT = bytes.fromhex(json.loads(
    (Path(__file__).parent / "vectors" / "debian-6.1.0-56-amd64.json").read_text())[0]["snapshot"])


def test_struct_layout_is_the_abi():
    # Offsets are ABI: a change here breaks deployed agents or modules.
    assert snapshot.STRUCT_SIZE == 160
    ffi = snapshot._ffi
    offsets = {name: ffi.offsetof("struct tcpsecrets_snapshot", name) for name in (
        "magic", "abi_version", "size", "flags", "hz", "realtime_ns", "tcp_clock_ms", "jiffies64",
        "syncookie_secret", "syncookie6_secret", "net_secret", "ts_secret", "tcp_syncookies",
        "tcp_timestamps", "tcp_sack", "tcp_window_scaling", "tcp_ecn", "reserved")}
    assert offsets == {"magic": 0, "abi_version": 4, "size": 6, "flags": 8, "hz": 12, "realtime_ns": 16,
                       "tcp_clock_ms": 24, "jiffies64": 32, "syncookie_secret": 40, "syncookie6_secret": 72,
                       "net_secret": 104, "ts_secret": 120, "tcp_syncookies": 136, "tcp_timestamps": 140,
                       "tcp_sack": 144, "tcp_window_scaling": 148, "tcp_ecn": 152, "reserved": 156}


def test_decodes_a_kernel_snapshot():
    snap = decode(KERNEL_SNAPSHOT)
    assert snap.hz == 250 and snap.size == 160 and snap.abi_version == 1
    assert snap.algorithm == snapshot.ALG_SEQ_AND_TS_OFF and snap.cookie_accept
    assert snap.net_secret != bytes(16) and snap.ts_secret == bytes(16)
    assert snap.tcp_syncookies == 2
    assert snap.cookie_count == snap.jiffies64 // (60 * 250)
    assert snap.to_bytes() == KERNEL_SNAPSHOT


def test_a_larger_newer_struct_is_read_up_to_what_we_know():
    grown = bytearray(KERNEL_SNAPSHOT + b"\x01" * 24)
    grown[6:8] = (160 + 24).to_bytes(2, "little")
    assert decode(bytes(grown)).net_secret == decode(KERNEL_SNAPSHOT).net_secret


@pytest.mark.parametrize("data, message", [
    (b"", "too short"),
    (KERNEL_SNAPSHOT[:100], "does not fit"),
    (b"XXXX" + KERNEL_SNAPSHOT[4:], "magic"),
    (KERNEL_SNAPSHOT[:4] + b"\x07\x00" + KERNEL_SNAPSHOT[6:], "ABI version 7"),
    (KERNEL_SNAPSHOT[:6] + b"\x10\x00" + KERNEL_SNAPSHOT[8:], "size field 16"),
    (KERNEL_SNAPSHOT[:12] + bytes(4) + KERNEL_SNAPSHOT[16:], "hz = 0"),
])
def test_rejects_what_is_not_a_snapshot(data, message):
    with pytest.raises(SnapshotError, match=message):
        decode(data)


def test_read_snapshot_from_a_file_and_a_missing_device(tmp_path):
    path = tmp_path / "snapshot"
    path.write_bytes(KERNEL_SNAPSHOT)
    assert read_snapshot(str(path)) == decode(KERNEL_SNAPSHOT)
    with pytest.raises(DeviceMissing, match="tcpsecrets module not loaded"):
        read_snapshot(str(tmp_path / "absent"))
