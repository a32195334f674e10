"""Fixtures for tests that run as root inside a booted test kernel."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

NOBODY_UID = 65534
KO = Path(os.environ.get("TCPSECRETS_KO", "/nonexistent/tcpsecrets.ko"))
DEVICE = Path("/dev/tcpsecrets")
PROC = Path("/proc/tcp_secrets")


def module_loaded() -> bool:
    return Path("/sys/module/tcpsecrets").exists()


_local_ko: Path | None = None


def local_module() -> Path:
    """The module, copied once into the guest's RAM (/run) and checked against the host's hash.

    Every load then reads the very bytes the host built and hashed
    (TCPSECRETS_KO_SHA256), not the shared filesystem, which is slow under
    TCG and which the host may change meanwhile.
    """
    global _local_ko
    if _local_ko is None:
        data = KO.read_bytes()
        want = os.environ.get("TCPSECRETS_KO_SHA256")
        if want is not None:
            got = hashlib.sha256(data).hexdigest()
            assert got == want, f"{KO} read in the guest has SHA-256 {got}, the host's is {want}"
        target = Path("/run/tcpsecrets-module")
        target.mkdir(mode=0o700, exist_ok=True)
        (target / KO.name).write_bytes(data)
        _local_ko = target / KO.name
    return _local_ko


def insmod(*params: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["insmod", str(local_module()), *params], capture_output=True, text=True)


def load(*params: str) -> None:
    result = insmod(*params)
    assert result.returncode == 0, f"insmod failed: {result.stderr}"


def unload() -> None:
    if module_loaded():
        subprocess.run(["rmmod", "tcpsecrets"], check=True)


def sysctl(name: str, value: int | None = None) -> int:
    path = Path("/proc/sys/net/ipv4") / name
    if value is not None:
        path.write_text(f"{value}\n")
    return int(path.read_text())


# jiffies_64 starts 300 s before the 32-bit wrap (INITIAL_JIFFIES), and a
# listener's last-SYN-queue-overflow stamp starts at 0. The kernel takes
# "now within [stamp - 1 s, stamp + 120 s]" as a recent overflow, so for the
# two minutes after the wrap (uptime 299-420 s) every fresh listener accepts
# valid cookies by itself, module or not.
JIFFIES_WRAP_WINDOW = (298.0, 422.0)

# The files run in this order: those whose tests never wait out the window first, so that the
# ones that do (clear_of_jiffies_wrap) mostly start after it instead of sleeping through it.
MODULE_ORDER = ("test_agent_in_guest", "test_mitigator_contract", "test_selftest", "test_containers", "test_handover",
                "test_tcpsecrets")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put this directory's tests in MODULE_ORDER, in their slots of the session's list.

    (This hook sees every collected item: the others keep their places.)
    """
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if item.path.parent == here]
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    ordered = sorted((items[i] for i in slots), key=lambda item: rank.get(item.path.stem, len(rank)))
    for i, item in zip(slots, ordered):
        items[i] = item


def clear_of_jiffies_wrap() -> None:
    """Before asserting that a cookie is refused: wait out that window if we are in it."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    if JIFFIES_WRAP_WINDOW[0] <= uptime < JIFFIES_WRAP_WINDOW[1]:
        time.sleep(JIFFIES_WRAP_WINDOW[1] - uptime)


def agent_home(prefix: str) -> Path:
    """A fresh directory for an agent's files, owned by nobody, 0700.

    Below a root-owned 0755 chain (not /tmp, which is 1777): the agent
    checks every directory up to / as sshd's StrictModes does.
    """
    base = Path("/run/tcpsecrets-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    home = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chown(home, NOBODY_UID, NOBODY_UID)
    home.chmod(0o700)
    return home


def dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="session", autouse=True)
def guest_only() -> None:
    if os.environ.get("TCPSECRETS_IN_GUEST") != "1" or os.getuid() != 0:
        pytest.skip("runs only as root inside a test kernel (see tests/kernel/test_guest_kernels.py)")
    assert KO.exists(), f"module not built: {KO}"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@pytest.fixture
def syncookies() -> Iterator[Callable[[int], None]]:
    """Set net.ipv4.tcp_syncookies for one test, restoring it afterwards."""
    before = sysctl("tcp_syncookies")
    yield lambda value: sysctl("tcp_syncookies", value)
    sysctl("tcp_syncookies", before)


@pytest.fixture
def tcpsecrets() -> Iterator[Callable[..., None]]:
    """Load the module (call with module parameters); it is unloaded afterwards."""
    unload()
    yield load
    unload()
