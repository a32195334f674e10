"""Read and decode tcpsecrets snapshots.

The layout is the C struct of ``kmod/include/uapi/tcpsecrets.h``; this module
feeds that very header to cffi's ``cdef`` (ABI mode, no compiler needed), so
the kernel and the agent can never disagree about offsets.  A snapshot comes
from one ``read()`` of ``/dev/tcpsecrets`` or of a regular file holding one
(tests and demos).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from dataclasses import dataclass
from importlib import resources

import cffi

HEADER_NAME = "tcpsecrets.h"
DEFAULT_DEVICE = "/dev/tcpsecrets"

# A read asks for more than the struct so that a newer, larger kernel
# struct arrives whole; `size` then says how much of it is meaningful.
READ_SIZE = 4096

_INT_DEFINE = re.compile(r"#define\s+\w+\s+(0x[0-9a-fA-F]+|\d+)\b")


def _cdef_text(header: str) -> str:
    """Keep what cffi's cdef understands: declarations and integer #defines."""
    kept = []
    for line in header.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            match = _INT_DEFINE.match(stripped)
            if match is None:
                continue
            line = match.group(0)  # drop the trailing comment
        elif stripped.startswith("typedef") and "__" in stripped:
            continue  # fixed-width aliases are declared below, once
        kept.append(line)
    prelude = (
        "typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32;"
        " typedef uint64_t __u64; typedef int32_t __s32;\n"
    )
    return prelude + "\n".join(kept)


def _load_ffi() -> tuple[cffi.FFI, object]:
    header = resources.files(__package__).joinpath(HEADER_NAME).read_text()
    ffi = cffi.FFI()
    ffi.cdef(_cdef_text(header))
    return ffi, ffi.dlopen(None)


_ffi, _lib = _load_ffi()

MAGIC: int = _lib.TCPSECRETS_MAGIC
ABI_VERSION: int = _lib.TCPSECRETS_ABI_VERSION
STRUCT_SIZE: int = _ffi.sizeof("struct tcpsecrets_snapshot")

F_SYNCOOKIE: int = _lib.TCPSECRETS_F_SYNCOOKIE
F_SYNCOOKIE6: int = _lib.TCPSECRETS_F_SYNCOOKIE6
F_NET_SECRET: int = _lib.TCPSECRETS_F_NET_SECRET
F_TS_SECRET: int = _lib.TCPSECRETS_F_TS_SECRET
F_ALG_TS_SECRET: int = _lib.TCPSECRETS_F_ALG_TS_SECRET
F_ALG_SEQ_AND_TS_OFF: int = _lib.TCPSECRETS_F_ALG_SEQ_AND_TS_OFF
F_COOKIE_ACCEPT: int = _lib.TCPSECRETS_F_COOKIE_ACCEPT

ALG_TS_SECRET = "ts_secret"
ALG_SEQ_AND_TS_OFF = "seq_and_ts_off"


class SnapshotError(Exception):
    """The bytes are not a snapshot this agent understands."""


class DeviceMissing(SnapshotError):
    """There is no snapshot source: the tcpsecrets module is not loaded."""


@dataclass(frozen=True)
class Snapshot:
    """One decoded ``struct tcpsecrets_snapshot``; secrets are raw bytes."""

    abi_version: int
    size: int
    flags: int
    hz: int
    realtime_ns: int
    tcp_clock_ms: int
    jiffies64: int
    syncookie_secret: bytes
    syncookie6_secret: bytes
    net_secret: bytes
    ts_secret: bytes
    tcp_syncookies: int
    tcp_timestamps: int
    tcp_sack: int
    tcp_window_scaling: int
    tcp_ecn: int

    @property
    def algorithm(self) -> str:
        """The ISN/TS-offset scheme: ``ts_secret`` (older) or ``seq_and_ts_off``."""
        if self.flags & F_ALG_SEQ_AND_TS_OFF:
            return ALG_SEQ_AND_TS_OFF
        return ALG_TS_SECRET

    @property
    def cookie_count(self) -> int:
        """The kernel's SYN-cookie minute counter at sampling time."""
        return (self.jiffies64 // (60 * self.hz)) & 0xFFFFFFFF

    @property
    def cookie_accept(self) -> bool:
        """Whether the module makes the kernel accept upstream-issued cookies."""
        return bool(self.flags & F_COOKIE_ACCEPT)

    def to_bytes(self) -> bytes:
        """Encode back into the struct layout (used to write snapshot files)."""
        return encode(self)


def decode(data: bytes) -> Snapshot:
    """Decode one snapshot; raise SnapshotError on anything doubtful."""
    if len(data) < 8:
        raise SnapshotError(f"snapshot too short: {len(data)} bytes")
    head = _ffi.from_buffer("struct tcpsecrets_snapshot *", data + bytes(STRUCT_SIZE))
    if head.magic != MAGIC:
        raise SnapshotError(f"bad snapshot magic 0x{head.magic:08x}")
    if head.abi_version != ABI_VERSION:
        raise SnapshotError(f"unsupported snapshot ABI version {head.abi_version}")
    if head.size < STRUCT_SIZE or head.size > len(data):
        raise SnapshotError(
            f"snapshot size field {head.size} does not fit {len(data)} bytes read"
            f" (this agent needs at least {STRUCT_SIZE})"
        )
    s = _ffi.from_buffer("struct tcpsecrets_snapshot *", data)
    if s.hz == 0:
        raise SnapshotError("snapshot has hz = 0")
    return Snapshot(
        abi_version=s.abi_version,
        size=s.size,
        flags=s.flags,
        hz=s.hz,
        realtime_ns=s.realtime_ns,
        tcp_clock_ms=s.tcp_clock_ms,
        jiffies64=s.jiffies64,
        syncookie_secret=bytes(_ffi.buffer(s.syncookie_secret)),
        syncookie6_secret=bytes(_ffi.buffer(s.syncookie6_secret)),
        net_secret=bytes(_ffi.buffer(s.net_secret)),
        ts_secret=bytes(_ffi.buffer(s.ts_secret)),
        tcp_syncookies=s.tcp_syncookies,
        tcp_timestamps=s.tcp_timestamps,
        tcp_sack=s.tcp_sack,
        tcp_window_scaling=s.tcp_window_scaling,
        tcp_ecn=s.tcp_ecn,
    )


def encode(snap: Snapshot) -> bytes:
    """Lay a Snapshot out as the C struct (size field = this agent's struct)."""
    buf = _ffi.new("struct tcpsecrets_snapshot *")
    buf.magic = MAGIC
    for field in dataclasses.fields(snap):
        value = getattr(snap, field.name)
        if isinstance(value, bytes):
            target = getattr(buf, field.name)
            if len(value) != _ffi.sizeof(target):
                raise ValueError(f"{field.name} must be {_ffi.sizeof(target)} bytes")
            _ffi.memmove(target, value, len(value))
        else:
            setattr(buf, field.name, value)
    buf.size = STRUCT_SIZE
    return bytes(_ffi.buffer(buf))


def read_snapshot(path: str = DEFAULT_DEVICE) -> Snapshot:
    """Take one snapshot with a single read() of the device (or a file).

    Raises DeviceMissing when the path does not exist, SnapshotError when
    what was read is not a valid snapshot, PermissionError as usual.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise DeviceMissing("tcpsecrets module not loaded") from exc
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise DeviceMissing("tcpsecrets module not loaded") from exc
        raise
    try:
        data = os.read(fd, READ_SIZE)
    finally:
        os.close(fd)
    return decode(data)
