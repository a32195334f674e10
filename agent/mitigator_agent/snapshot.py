"""Read and decode tcpsecrets snapshots; encode and write anycast sets.

The layouts are the C structs of ``kmod/include/uapi/tcpsecrets.h``; this
module feeds that very header to cffi's ``cdef`` (ABI mode, no compiler
needed), so the kernel and the agent can never disagree about offsets.

A snapshot comes from one ``read()`` of ``/dev/tcpsecrets`` or of a regular
file holding one (tests and demos).  Two ABI versions are understood:

- ABI 2 (this header, 200 bytes): adds the clocks the kernel's cookies and
  timestamps run on (``cookie_clock``, ``cookie_count``, ``ts_shift_ms``),
  ``set_generation``, ``sendsyn_dropped``, and the network-namespace view
  (``netns_inum``, ``netns_refusing``, ``cookies_refused``).
- ABI 1 (160 bytes, the first module generation; recorded test vectors
  come from it): decoded with the ABI-2 fields as that module behaved —
  jiffies cookie clock, ``cookie_count = jiffies64 // (60 * hz)``, no TS
  shift, no set applied, nothing dropped.

A set (``struct tcpsecrets_set``, 120 bytes) is what one ``write()`` to the
device applies atomically: the four secrets and four sysctls of anycast
mode.  :func:`write_set` does exactly one such write.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, List

import cffi

HEADER_NAME = "tcpsecrets.h"
DEFAULT_DEVICE = "/dev/tcpsecrets"
# The install script and the package's postinst create this file (root only: /run) just before they
# unload the module to load its new version, and remove it once the new one is loaded. While it is
# there, a poll waits for the device instead of answering "not loaded" (read_snapshot_across_swap).
SWAP_MARKER = "/run/tcpsecrets-swap"
SWAP_WAIT_SECONDS = 10.0   # longest wait for the device during a swap
SWAP_MARKER_MAX_AGE = 120  # seconds: a marker left by a swap that was killed is ignored after this

# A read asks for more than the struct so that a newer, larger kernel
# struct arrives whole; `size` then says how much of it is meaningful.
READ_SIZE = 4096

_INT_DEFINE = re.compile(r"#define\s+\w+\s+(0x[0-9a-fA-F]+|\d+)\b")
_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def _cdef_text(header: str) -> str:
    """Keep what cffi's cdef understands: declarations and integer #defines.

    Comments go first, whole: a comment may run over several lines (after a
    #define or a field), and a leftover line of one is not C.
    """
    kept = []
    for line in _C_COMMENT.sub(" ", header).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            match = _INT_DEFINE.match(stripped)
            if match is None:
                continue
            line = match.group(0)
        elif stripped.startswith("typedef") and "__" in stripped:
            continue  # fixed-width aliases are declared below, once
        kept.append(line)
    prelude = (
        "typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32;"
        " typedef uint64_t __u64; typedef int32_t __s32;\n"
    )
    return prelude + "\n".join(kept)


def _load_ffi() -> tuple[cffi.FFI, Any]:
    header = resources.files(__package__).joinpath(HEADER_NAME).read_text()
    ffi = cffi.FFI()
    ffi.cdef(_cdef_text(header))
    return ffi, ffi.dlopen(None)


_ffi, _lib = _load_ffi()

MAGIC: int = _lib.TCPSECRETS_MAGIC
ABI_VERSION: int = _lib.TCPSECRETS_ABI_VERSION
STRUCT_SIZE: int = _ffi.sizeof("struct tcpsecrets_snapshot")
# ABI 1 ended where ABI 2's first field starts.
ABI1_VERSION = 1
ABI1_SIZE: int = _ffi.offsetof("struct tcpsecrets_snapshot", "cookie_clock")

SET_MAGIC: int = _lib.TCPSECRETS_SET_MAGIC
SET_SIZE: int = _ffi.sizeof("struct tcpsecrets_set")

F_SYNCOOKIE: int = _lib.TCPSECRETS_F_SYNCOOKIE
F_SYNCOOKIE6: int = _lib.TCPSECRETS_F_SYNCOOKIE6
F_NET_SECRET: int = _lib.TCPSECRETS_F_NET_SECRET
F_TS_SECRET: int = _lib.TCPSECRETS_F_TS_SECRET
F_ALG_TS_SECRET: int = _lib.TCPSECRETS_F_ALG_TS_SECRET
F_ALG_SEQ_AND_TS_OFF: int = _lib.TCPSECRETS_F_ALG_SEQ_AND_TS_OFF
F_COOKIE_ACCEPT: int = _lib.TCPSECRETS_F_COOKIE_ACCEPT
F_WALL_CLOCK: int = _lib.TCPSECRETS_F_WALL_CLOCK
F_TS_OFFSET_HOOK: int = _lib.TCPSECRETS_F_TS_OFFSET_HOOK
F_SENDSYN_DROP: int = _lib.TCPSECRETS_F_SENDSYN_DROP
F_SET_ALLOWED: int = _lib.TCPSECRETS_F_SET_ALLOWED
F_ACCEPT_ALL_NETNS: int = _lib.TCPSECRETS_F_ACCEPT_ALL_NETNS

CLOCK_JIFFIES: int = _lib.TCPSECRETS_CLOCK_JIFFIES
CLOCK_WALL: int = _lib.TCPSECRETS_CLOCK_WALL
CLOCK_NAMES = {CLOCK_JIFFIES: "jiffies", CLOCK_WALL: "wall"}

ALG_TS_SECRET = "ts_secret"
ALG_SEQ_AND_TS_OFF = "seq_and_ts_off"

NS_PER_COOKIE_MINUTE = 60 * 10**9
U32 = 0xFFFFFFFF
DERIVED = -1  # Snapshot.cookie_clock / cookie_count default: derive from the other fields


class SnapshotError(Exception):
    """The bytes are not a snapshot this agent understands."""


class DeviceMissing(SnapshotError):
    """There is no snapshot source: the tcpsecrets module is not loaded."""


def derived_cookie_count(cookie_clock: int, realtime_ns: int, jiffies64: int, hz: int) -> int:
    """The counter the kernel's cookies use for this clock (32 bits).

    Wall clock: CLOCK_REALTIME seconds // 60.  Jiffies (the stock kernel):
    jiffies64 // (60 * hz).
    """
    if cookie_clock == CLOCK_WALL:
        return (realtime_ns // NS_PER_COOKIE_MINUTE) & U32
    return (jiffies64 // (60 * hz)) & U32


@dataclass(frozen=True)
class Snapshot:
    """One decoded ``struct tcpsecrets_snapshot``; secrets are raw bytes.

    The ABI-2 fields default to what the flags and clocks imply:
    ``cookie_clock`` left at DERIVED follows the F_WALL_CLOCK flag (an ABI-1
    module never sets it: jiffies), ``cookie_count`` left at DERIVED is
    computed from the clock as the kernel does; no TS shift, no set, nothing
    dropped.  A decoded ABI-2 snapshot carries the kernel's own values.  A
    ``cookie_clock`` that disagrees with the F_WALL_CLOCK flag is a
    ValueError.
    """

    abi_version: int
    size: int
    flags: int
    hz: int
    realtime_ns: int
    tcp_clock_ms: int
    jiffies64: int
    syncookie_secret: bytes = field(repr=False)
    syncookie6_secret: bytes = field(repr=False)
    net_secret: bytes = field(repr=False)
    ts_secret: bytes = field(repr=False)
    tcp_syncookies: int
    tcp_timestamps: int
    tcp_sack: int
    tcp_window_scaling: int
    tcp_ecn: int
    cookie_clock: int = DERIVED
    cookie_count: int = DERIVED
    ts_shift_ms: int = 0
    set_generation: int = 0
    sendsyn_dropped: int = 0
    netns_inum: int = 0
    netns_refusing: int = 0
    cookies_refused: int = 0

    def __post_init__(self) -> None:
        # frozen: __post_init__ is the one place fields are set after construction
        if self.cookie_clock == DERIVED:
            object.__setattr__(self, "cookie_clock", CLOCK_WALL if self.flags & F_WALL_CLOCK else CLOCK_JIFFIES)
        if self.cookie_clock not in CLOCK_NAMES:
            raise ValueError(f"unknown cookie_clock {self.cookie_clock}")
        if bool(self.flags & F_WALL_CLOCK) != (self.cookie_clock == CLOCK_WALL):
            raise ValueError(f"cookie_clock {self.cookie_clock} disagrees with flags 0x{self.flags:x}")
        if self.cookie_count == DERIVED:
            object.__setattr__(self, "cookie_count", derived_cookie_count(
                self.cookie_clock, self.realtime_ns, self.jiffies64, self.hz))

    @property
    def algorithm(self) -> str:
        """The kernel's own ISN/TS-offset scheme: ``ts_secret`` (older) or ``seq_and_ts_off``."""
        if self.flags & F_ALG_SEQ_AND_TS_OFF:
            return ALG_SEQ_AND_TS_OFF
        return ALG_TS_SECRET

    @property
    def cookie_accept(self) -> bool:
        """Whether the module makes the kernel accept upstream-issued cookies."""
        return bool(self.flags & F_COOKIE_ACCEPT)

    @property
    def wall_clock(self) -> bool:
        """Whether the kernel's cookie counter runs on CLOCK_REALTIME minutes."""
        return self.cookie_clock == CLOCK_WALL

    @property
    def cookie_clock_name(self) -> str:
        """``wall`` or ``jiffies``."""
        return CLOCK_NAMES[self.cookie_clock]

    @property
    def ts_offset_hook(self) -> bool:
        """Whether every TS offset is SipHash(ts_secret; saddr, daddr) + ts_shift_ms."""
        return bool(self.flags & F_TS_OFFSET_HOOK)

    @property
    def sendsyn_drop(self) -> bool:
        """Whether SYNs carrying MITIGATOR's SendSyn marker are dropped."""
        return bool(self.flags & F_SENDSYN_DROP)

    @property
    def accept_all_netns(self) -> bool:
        """Whether cookies are accepted in every netns while init_net's tcp_syncookies is 2."""
        return bool(self.flags & F_ACCEPT_ALL_NETNS)

    @property
    def set_allowed(self) -> bool:
        """Whether the module lets a writer group apply a tcpsecrets_set."""
        return bool(self.flags & F_SET_ALLOWED)

    @property
    def ts_clock_ms(self) -> int:
        """The clock the kernel's TSvals count, 32 bits: tcp_clock_ms + ts_shift_ms.

        A connection's TSval is this plus its SipHash(ts_secret) part; in
        jiffies mode the shift is 0 and this is the plain TCP clock.
        """
        return (self.tcp_clock_ms + self.ts_shift_ms) & U32

    def to_bytes(self) -> bytes:
        """Encode back into the struct layout (used to write snapshot files)."""
        return encode(self)


def decode(data: bytes) -> Snapshot:
    """Decode one snapshot (ABI 1 or 2); raise SnapshotError on anything doubtful."""
    if len(data) < 8:
        raise SnapshotError(f"snapshot too short: {len(data)} bytes")
    # Padded so that a short read still decodes far enough to be judged.
    s = _ffi.from_buffer("struct tcpsecrets_snapshot *", data + bytes(STRUCT_SIZE))
    if s.magic != MAGIC:
        raise SnapshotError(f"bad snapshot magic 0x{s.magic:08x}")
    if s.abi_version == ABI_VERSION:
        needed = STRUCT_SIZE
    elif s.abi_version == ABI1_VERSION:
        needed = ABI1_SIZE
    else:
        raise SnapshotError(f"unsupported snapshot ABI version {s.abi_version}")
    if s.size < needed or s.size > len(data):
        raise SnapshotError(
            f"snapshot size field {s.size} does not fit {len(data)} bytes read"
            f" (ABI {s.abi_version} needs at least {needed})"
        )
    if s.hz == 0:
        raise SnapshotError("snapshot has hz = 0")
    newer = {}
    if s.abi_version == ABI_VERSION:
        newer = dict(cookie_clock=s.cookie_clock, cookie_count=s.cookie_count, ts_shift_ms=s.ts_shift_ms,
                     set_generation=s.set_generation, sendsyn_dropped=s.sendsyn_dropped,
                     netns_inum=s.netns_inum, netns_refusing=s.netns_refusing,
                     cookies_refused=s.cookies_refused)
    elif s.flags & F_WALL_CLOCK:
        raise SnapshotError("ABI 1 snapshot claims a wall cookie clock")
    try:
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
            **newer,
        )
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None


def _copy_bytes(target: object, value: bytes, name: str) -> None:
    size = _ffi.sizeof(target)
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")
    _ffi.memmove(target, value, size)


def encode(snap: Snapshot) -> bytes:
    """Lay a Snapshot out as the C struct of its ABI version.

    ABI 2: the whole struct, size field = this agent's struct.  ABI 1: the
    first 160 bytes with size 160, as that module wrote them (the ABI-2
    fields cannot be represented and are left out).
    """
    buf = _ffi.new("struct tcpsecrets_snapshot *")
    old = snap.abi_version == ABI1_VERSION
    for item in dataclasses.fields(snap):
        value = getattr(snap, item.name)
        if isinstance(value, bytes):
            _copy_bytes(getattr(buf, item.name), value, item.name)
        elif not (old and _ffi.offsetof("struct tcpsecrets_snapshot", item.name) >= ABI1_SIZE):
            setattr(buf, item.name, value)
    buf.magic = MAGIC
    buf.size = ABI1_SIZE if old else STRUCT_SIZE
    return bytes(_ffi.buffer(buf))[:buf.size]


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


def swap_under_way(marker: str = SWAP_MARKER) -> bool:
    """True while `marker` exists and is younger than SWAP_MARKER_MAX_AGE seconds."""
    try:
        age = time.time() - os.stat(marker).st_mtime
    except OSError:
        return False
    return age < SWAP_MARKER_MAX_AGE


def read_snapshot_across_swap(path: str = DEFAULT_DEVICE, marker: str = SWAP_MARKER,
                              wait: float = SWAP_WAIT_SECONDS) -> Snapshot:
    """read_snapshot(), which waits up to `wait` seconds for the device while a module swap is under way.

    Without a swap under way a missing device raises DeviceMissing at once,
    as read_snapshot does. The wait blocks the caller (the agent's event
    loop: every poll waits for the same device anyway).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return read_snapshot(path)
        except DeviceMissing:
            if time.monotonic() >= deadline or not swap_under_way(marker):
                raise
        time.sleep(0.05)


# --- anycast sets -------------------------------------------------------------

# Allowed sysctl values: what the kernel's own sysctl handlers accept.
SET_RANGES = {"tcp_ecn": (0, 2), "tcp_sack": (0, 1), "tcp_timestamps": (0, 2), "tcp_window_scaling": (0, 1)}


class SetError(Exception):
    """A set could not be applied; the message says why (never a value)."""


class SetNotAllowed(SetError):
    """The device refused to open for writing: not root, not in the module's write group."""


class SetRejected(SetError):
    """The module refused the set (EINVAL: bad magic, size or value)."""


@dataclass(frozen=True)
class SetValues:
    """One ``struct tcpsecrets_set``: the secrets and sysctls anycast mode copies.

    Construction checks nothing, so that a test can hand the kernel bad
    values; :meth:`problems` says what the kernel would refuse, and
    :meth:`to_bytes` refuses secrets of the wrong length.  Secrets are kept
    out of ``repr`` so that an accidental log line cannot carry them.
    """

    net_secret: bytes = field(repr=False)
    syncookie_secret: bytes = field(repr=False)
    syncookie6_secret: bytes = field(repr=False)
    ts_secret: bytes = field(repr=False)
    tcp_ecn: int
    tcp_sack: int
    tcp_timestamps: int
    tcp_window_scaling: int

    def problems(self) -> List[str]:
        """What is wrong with these values, one phrase each (values never quoted)."""
        found = []
        for name in ("net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret"):
            size = _ffi.sizeof(getattr(_ffi.new("struct tcpsecrets_set *"), name))
            if len(getattr(self, name)) != size:
                found.append(f"{name} must be {size} bytes")
        for name, (low, high) in SET_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                found.append(f"{name} must be {low}..{high}")
        return found

    def to_bytes(self) -> bytes:
        """The struct as write_set sends it (see :func:`encode_set`)."""
        return encode_set(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SetValues":
        """Decode a struct (see :func:`decode_set`)."""
        return decode_set(data)


def encode_set(values: SetValues) -> bytes:
    """Lay ``values`` out as ``struct tcpsecrets_set`` (magic, ABI version, size filled in).

    Raises ValueError for a secret of the wrong length; sysctl values are
    encoded as given (the kernel judges them).
    """
    buf = _ffi.new("struct tcpsecrets_set *")
    buf.magic = SET_MAGIC
    buf.abi_version = ABI_VERSION
    buf.size = SET_SIZE
    for item in dataclasses.fields(values):
        value = getattr(values, item.name)
        if isinstance(value, bytes):
            _copy_bytes(getattr(buf, item.name), value, item.name)
        else:
            setattr(buf, item.name, value)
    return bytes(_ffi.buffer(buf))


def decode_set(data: bytes) -> SetValues:
    """Decode exactly one ``struct tcpsecrets_set``; ValueError if it is not one.

    Checks magic, ABI version, size and the sysctl ranges, so that what
    decodes is what the module would accept.
    """
    if len(data) != SET_SIZE:
        raise ValueError(f"a set is {SET_SIZE} bytes, not {len(data)}")
    s = _ffi.from_buffer("struct tcpsecrets_set *", data)
    if s.magic != SET_MAGIC:
        raise ValueError("bad set magic")  # the bytes may be a secret: not shown
    if s.abi_version != ABI_VERSION or s.size != SET_SIZE:
        raise ValueError(f"set of ABI {s.abi_version}, size {s.size}; this agent writes ABI {ABI_VERSION},"
                         f" size {SET_SIZE}")
    values = SetValues(
        net_secret=bytes(_ffi.buffer(s.net_secret)),
        syncookie_secret=bytes(_ffi.buffer(s.syncookie_secret)),
        syncookie6_secret=bytes(_ffi.buffer(s.syncookie6_secret)),
        ts_secret=bytes(_ffi.buffer(s.ts_secret)),
        tcp_ecn=s.tcp_ecn,
        tcp_sack=s.tcp_sack,
        tcp_timestamps=s.tcp_timestamps,
        tcp_window_scaling=s.tcp_window_scaling,
    )
    problems = values.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return values


def write_set(device_path: str, values: SetValues) -> None:
    """Apply ``values`` with ONE write() of the packed struct to ``device_path``.

    The device is opened O_WRONLY|O_CLOEXEC; the module applies the whole
    set at once or nothing.  A regular file standing in for the device just
    receives the bytes at offset 0.  Raises DeviceMissing (module not
    loaded), SetNotAllowed (EACCES/EPERM: not root or in the module's write
    group), SetRejected (EINVAL: the module refused the values) or SetError
    (anything else, including a short write).  No message carries a value.
    """
    data = encode_set(values)
    try:
        fd = os.open(device_path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise DeviceMissing("tcpsecrets module not loaded") from exc
    except OSError as exc:
        raise _set_error(device_path, exc) from exc
    try:
        written = os.write(fd, data)
    except OSError as exc:
        raise _set_error(device_path, exc) from exc
    finally:
        os.close(fd)
    if written != len(data):
        raise SetError(f"short write to {device_path}: {written} of {len(data)} bytes")


def _set_error(device_path: str, exc: OSError) -> Exception:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SetNotAllowed(f"not allowed to write {device_path}"
                             " (the agent must be root or in the module's write_gid group)")
    if exc.errno == errno.EINVAL:
        return SetRejected(f"rejected by the module ({device_path}: invalid argument)")
    if exc.errno in (errno.ENODEV, errno.ENXIO):
        return DeviceMissing("tcpsecrets module not loaded")
    return SetError(f"cannot write {device_path}: {exc.strerror or exc}")
