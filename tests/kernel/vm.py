"""Boot a Debian kernel under qemu (TCG) with virtme-ng and run a command in it.

The guest sees the host's filesystem (read-only, with `rwdirs` writable), so
the project's venv, sources and built module are used in place. KVM is off on
purpose: on our machines qemu with KVM aborts or hangs (shared notes).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 1200  # seconds for a whole guest run under TCG


def test_kvers() -> list[str]:
    """Kernels to test: $TEST_KVERS (set by `make test`), else tests/kernel/test-kernels."""
    listed = os.environ.get("TEST_KVERS")
    if listed is None:
        text = (Path(__file__).parent / "test-kernels").read_text()
        listed = " ".join(line.split("#", 1)[0] for line in text.splitlines())
    return listed.split()


def kernel_image(kver: str) -> Path:
    return Path("/boot") / f"vmlinuz-{kver}"


def can_boot() -> tuple[bool, str]:
    """Whether this machine can boot guests at all, and if not, why."""
    if shutil.which("qemu-system-x86_64") is None:
        return False, "qemu-system-x86_64 is not installed (run tests/provision-host.sh)"
    if os.uname().machine != "x86_64":
        return False, f"guest kernels are amd64; this host is {os.uname().machine}"
    return True, ""


def build_module(kver: str, out_dir: Path) -> Path:
    """Build kmod/ against the headers of `kver` in a private copy; return the .ko."""
    src = out_dir / "kmod"
    shutil.copytree(REPO / "kmod", src, ignore=shutil.ignore_patterns(
        "*.o", "*.ko", "*.mod*", ".*.cmd", "*.order", "*.symvers", ".tmp_versions"))
    subprocess.run(["make", "-C", str(src), f"KVER={kver}"], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src / "tcpsecrets.ko"


def run_in_guest(kver: str, command: str, rwdirs: list[Path], env: dict[str, str],
                 timeout: int = BOOT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Boot `kver`, run `command` (a shell line) as root in the repo, return its result."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    venv_bin = Path(sys.executable).parent
    host_env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")
    argv = [
        str(venv_bin / "vng"), "--run", str(kernel_image(kver)), "--disable-kvm",
        "--cpus", "2", "--memory", "2G", "--user", "root", "--cwd", str(REPO),
    ]
    for d in rwdirs:
        argv += ["--rwdir", str(d)]
    argv += ["--exec", f"cd {shlex.quote(str(REPO))} && env {exports} {command}"]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=host_env,
                          stdin=subprocess.DEVNULL)
