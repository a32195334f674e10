"""mitigator_agent.snapshot: the cffi view of kmod/include/uapi/tcpsecrets.h.

KERNEL_SNAPSHOT was recorded from the first module generation (ABI 1, 160
bytes) on a real Debian 6.1.0-56 kernel; it stays as recorded and is
decoded as ABI 1.  ABI-2 snapshots are built here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from mitigator_agent import snapshot
from mitigator_agent.snapshot import (
    CLOCK_JIFFIES,
    CLOCK_WALL,
    DeviceMissing,
    SetError,
    SetNotAllowed,
    SetRejected,
    SetValues,
    SnapshotError,
    decode,
    decode_set,
    encode,
    encode_set,
    read_snapshot,
    write_set,
)

KERNEL_SNAPSHOT = bytes.fromhex(json.loads(
    (Path(__file__).parent / "vectors" / "debian-6.1.0-56-amd64.json").read_text())[0]["snapshot"])


def abi2(**changes: object) -> snapshot.Snapshot:
    """The recorded kernel's values as an ABI-2 module in wall mode would report them."""
    old = decode(KERNEL_SNAPSHOT)
    fields = dict(abi_version=2, size=200, flags=old.flags | snapshot.F_WALL_CLOCK | snapshot.F_TS_OFFSET_HOOK,
                  cookie_clock=CLOCK_WALL, cookie_count=old.realtime_ns // (60 * 10**9),
                  ts_shift_ms=123 * 64, set_generation=2, sendsyn_dropped=(1 << 40) + 5)
    fields.update(changes)
    return dataclasses.replace(old, **fields)


VALUES = SetValues(net_secret=bytes(range(16)), syncookie_secret=bytes(range(16, 48)),
                   syncookie6_secret=bytes(range(48, 80)), ts_secret=bytes(range(80, 96)),
                   tcp_ecn=2, tcp_sack=1, tcp_timestamps=0, tcp_window_scaling=1)


def test_struct_layout_is_the_abi():
    # Offsets are ABI: a change here breaks deployed agents or modules.
    assert (snapshot.STRUCT_SIZE, snapshot.ABI1_SIZE, snapshot.ABI_VERSION) == (200, 160, 2)
    ffi = snapshot._ffi
    offsets = {name: ffi.offsetof("struct tcpsecrets_snapshot", name) for name in (
        "magic", "abi_version", "size", "flags", "hz", "realtime_ns", "tcp_clock_ms", "jiffies64",
        "syncookie_secret", "syncookie6_secret", "net_secret", "ts_secret", "tcp_syncookies",
        "tcp_timestamps", "tcp_sack", "tcp_window_scaling", "tcp_ecn", "reserved", "cookie_clock",
        "cookie_count", "ts_shift_ms", "set_generation", "sendsyn_dropped")}
    assert offsets == {"magic": 0, "abi_version": 4, "size": 6, "flags": 8, "hz": 12, "realtime_ns": 16,
                       "tcp_clock_ms": 24, "jiffies64": 32, "syncookie_secret": 40, "syncookie6_secret": 72,
                       "net_secret": 104, "ts_secret": 120, "tcp_syncookies": 136, "tcp_timestamps": 140,
                       "tcp_sack": 144, "tcp_window_scaling": 148, "tcp_ecn": 152, "reserved": 156,
                       "cookie_clock": 160, "cookie_count": 164, "ts_shift_ms": 168, "set_generation": 172,
                       "sendsyn_dropped": 176}


def test_set_struct_layout_is_the_abi():
    assert snapshot.SET_SIZE == 120 and snapshot.SET_MAGIC == 0x54435357
    ffi = snapshot._ffi
    offsets = {name: ffi.offsetof("struct tcpsecrets_set", name) for name in (
        "magic", "abi_version", "size", "net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret",
        "tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling")}
    assert offsets == {"magic": 0, "abi_version": 4, "size": 6, "net_secret": 8, "syncookie_secret": 24,
                       "syncookie6_secret": 56, "ts_secret": 88, "tcp_ecn": 104, "tcp_sack": 108,
                       "tcp_timestamps": 112, "tcp_window_scaling": 116}


def test_flag_and_clock_values_are_the_abi():
    assert (snapshot.F_WALL_CLOCK, snapshot.F_TS_OFFSET_HOOK, snapshot.F_SENDSYN_DROP,
            snapshot.F_SET_ALLOWED) == (0x20000, 0x40000, 0x80000, 0x100000)
    assert (CLOCK_JIFFIES, CLOCK_WALL) == (0, 1)


def test_decodes_the_recorded_abi1_kernel_snapshot_as_abi1():
    snap = decode(KERNEL_SNAPSHOT)
    assert snap.hz == 250 and snap.size == 160 and snap.abi_version == 1
    assert snap.algorithm == snapshot.ALG_SEQ_AND_TS_OFF and snap.cookie_accept
    assert snap.net_secret != bytes(16) and snap.ts_secret == bytes(16)
    assert snap.tcp_syncookies == 2
    # what that module did: jiffies clock, no shift, no set, no SendSyn drops
    assert snap.cookie_clock == CLOCK_JIFFIES and not snap.wall_clock
    assert snap.cookie_count == snap.jiffies64 // (60 * 250)
    assert (snap.ts_shift_ms, snap.set_generation, snap.sendsyn_dropped) == (0, 0, 0)
    assert not (snap.ts_offset_hook or snap.sendsyn_drop or snap.set_allowed)
    assert snap.ts_clock_ms == snap.tcp_clock_ms & 0xFFFFFFFF
    assert snap.to_bytes() == KERNEL_SNAPSHOT  # encoded back as ABI 1, byte for byte


def test_abi2_round_trip_and_fields():
    snap = abi2()
    data = encode(snap)
    assert len(data) == 200 and data[:160] != KERNEL_SNAPSHOT  # version and size differ
    back = decode(data)
    assert back == snap
    assert back.wall_clock and back.ts_offset_hook and back.cookie_clock_name == "wall"
    assert back.cookie_count == back.realtime_ns // (60 * 10**9)
    assert back.sendsyn_dropped == (1 << 40) + 5 and back.set_generation == 2
    assert back.ts_clock_ms == (back.tcp_clock_ms + 123 * 64) & 0xFFFFFFFF


def test_cookie_count_is_the_kernel_field_not_recomputed():
    # the kernel's own value wins, even where a recomputation would differ
    data = bytearray(encode(abi2()))
    data[164:168] = (777).to_bytes(4, "little")
    assert decode(bytes(data)).cookie_count == 777


def test_cookie_count_derived_when_not_given():
    wall = abi2(cookie_count=snapshot.DERIVED)
    assert wall.cookie_count == wall.realtime_ns // (60 * 10**9)
    jiffies = abi2(cookie_count=snapshot.DERIVED, cookie_clock=CLOCK_JIFFIES,
                   flags=wall.flags & ~snapshot.F_WALL_CLOCK)
    assert jiffies.cookie_count == jiffies.jiffies64 // (60 * 250)


def test_cookie_clock_derived_from_the_flag_when_not_given():
    # e.g. a Snapshot rebuilt from a `get json` answer without the ABI-2 keys
    wall = abi2(cookie_clock=snapshot.DERIVED, cookie_count=snapshot.DERIVED)
    assert wall.wall_clock and wall.cookie_count == wall.realtime_ns // (60 * 10**9)
    stock = abi2(cookie_clock=snapshot.DERIVED, cookie_count=snapshot.DERIVED,
                 flags=wall.flags & ~snapshot.F_WALL_CLOCK)
    assert not stock.wall_clock and stock.cookie_count == stock.jiffies64 // (60 * 250)


def test_clock_field_and_flag_must_agree():
    with pytest.raises(ValueError, match="disagrees"):
        abi2(cookie_clock=CLOCK_JIFFIES)
    data = bytearray(encode(abi2()))
    data[160:164] = (0).to_bytes(4, "little")
    with pytest.raises(SnapshotError, match="disagrees"):
        decode(bytes(data))
    data[160:164] = (9).to_bytes(4, "little")
    with pytest.raises(SnapshotError, match="unknown cookie_clock 9"):
        decode(bytes(data))


def test_a_larger_newer_struct_is_read_up_to_what_we_know():
    for base, known in ((KERNEL_SNAPSHOT, 160), (encode(abi2()), 200)):
        grown = bytearray(base + b"\x01" * 24)
        grown[6:8] = (known + 24).to_bytes(2, "little")
        assert dataclasses.replace(decode(bytes(grown)), size=known) == decode(base)


def test_abi2_needs_its_whole_struct():
    short = bytearray(encode(abi2())[:160])
    short[6:8] = (160).to_bytes(2, "little")
    with pytest.raises(SnapshotError, match="ABI 2 needs at least 200"):
        decode(bytes(short))


def test_an_abi1_snapshot_cannot_claim_the_wall_clock():
    data = bytearray(KERNEL_SNAPSHOT)
    data[8:12] = (int.from_bytes(data[8:12], "little") | snapshot.F_WALL_CLOCK).to_bytes(4, "little")
    with pytest.raises(SnapshotError, match="ABI 1 snapshot claims a wall cookie clock"):
        decode(bytes(data))


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


# --- sets ----------------------------------------------------------------------

def test_set_encoding_round_trip():
    data = encode_set(VALUES)
    assert len(data) == 120
    assert data[:8] == (0x54435357).to_bytes(4, "little") + (2).to_bytes(2, "little") + (120).to_bytes(2, "little")
    assert data[8:104] == bytes(range(96))
    assert data[104:] == b"".join(v.to_bytes(4, "little") for v in (2, 1, 0, 1))
    assert decode_set(data) == VALUES == SetValues.from_bytes(VALUES.to_bytes())


def test_set_values_keep_secrets_out_of_repr():
    text = repr(VALUES)
    assert bytes(range(16)).hex() not in text and "net_secret" not in text and "tcp_ecn=2" in text


def test_set_problems_name_rules_not_values():
    bad = dataclasses.replace(VALUES, net_secret=bytes(15), tcp_ecn=3, tcp_sack=-1, tcp_timestamps=True)
    assert bad.problems() == ["net_secret must be 16 bytes", "tcp_ecn must be 0..2", "tcp_sack must be 0..1",
                              "tcp_timestamps must be 0..2"]
    assert VALUES.problems() == []
    with pytest.raises(ValueError, match="net_secret must be 16 bytes"):
        encode_set(bad)
    # out-of-range sysctls still encode: the kernel is the judge of what it is sent
    assert len(encode_set(dataclasses.replace(VALUES, tcp_ecn=3))) == 120


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-1], "a set is 120 bytes, not 119"),
    (lambda d: b"XXXX" + d[4:], "bad set magic"),
    (lambda d: d[:4] + (1).to_bytes(2, "little") + d[6:], "set of ABI 1"),
    (lambda d: d[:104] + (7).to_bytes(4, "little") + d[108:], "tcp_ecn must be 0..2"),
])
def test_decode_set_refuses_what_the_module_would(damage, message):
    with pytest.raises(ValueError, match=message):
        decode_set(damage(encode_set(VALUES)))


def test_write_set_to_a_regular_file_writes_the_struct_once(tmp_path):
    path = tmp_path / "device"
    path.write_bytes(b"\xff" * 200)  # a snapshot file standing in for the device
    write_set(str(path), VALUES)
    data = path.read_bytes()
    assert decode_set(data[:120]) == VALUES and data[120:] == b"\xff" * 80  # one write at offset 0


def test_write_set_error_mapping(tmp_path, monkeypatch):
    with pytest.raises(DeviceMissing, match="tcpsecrets module not loaded"):
        write_set(str(tmp_path / "absent"), VALUES)
    readonly = tmp_path / "readonly"
    readonly.write_bytes(b"")
    readonly.chmod(stat.S_IRUSR)
    if os.geteuid() != 0:  # root ignores mode bits
        with pytest.raises(SetNotAllowed, match="not allowed to write"):
            write_set(str(readonly), VALUES)

    def failing(errno_value: int):
        def write(fd: int, data: bytes) -> int:
            raise OSError(errno_value, os.strerror(errno_value))
        return write

    target = tmp_path / "device"
    target.write_bytes(b"")
    for errno_value, kind, message in ((22, SetRejected, "rejected by the module"),
                                       (1, SetNotAllowed, "not allowed to write"),
                                       (5, SetError, "cannot write")):
        monkeypatch.setattr(snapshot.os, "write", failing(errno_value))
        with pytest.raises(kind, match=message) as caught:
            write_set(str(target), VALUES)
        assert bytes(range(16)).hex() not in str(caught.value)
    monkeypatch.setattr(snapshot.os, "write", lambda fd, data: len(data) - 1)
    with pytest.raises(SetError, match="short write"):
        write_set(str(target), VALUES)
