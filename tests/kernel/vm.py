"""Boot a Debian kernel under qemu (TCG) with virtme-ng and run a command in it.

The guest sees the host's filesystem (read-only, with `rwdirs` writable), so
the project's venv, sources and built module are used in place; the trees
programs start from come through a second, cached export (cached-root.sh).
KVM is off on purpose: on our machines qemu with KVM aborts or hangs (shared
notes).

The kernels are the matrix of tests/kernel/test-kernels (one per Debian
release); the module each guest loads is the one DKMS built in a chroot of
that release (tests/kernel/matrix.py), kept at build/matrix/KVER/tcpsecrets.ko.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from . import matrix

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BOOT_TIMEOUT = 2700  # seconds for a whole guest run under TCG (5.10 on a loaded host: ~20 min)


def test_kvers() -> list[str]:
    """Kernels to test: $TEST_KVERS (set by `make test`), else tests/kernel/test-kernels."""
    return matrix.kernels_in_run()


def host_kvers() -> list[str]:
    """The test kernels of the host's own release, installed with their headers by apt."""
    return [kver for kver in test_kvers()
            if matrix.suite_of(kver) in (None, matrix.host_suite())]


def kernel_image(kver: str) -> Path:
    """The image to boot: the host's /boot/vmlinuz-KVER, else the one provisioning extracted."""
    return matrix.kernel_image(kver)


def can_boot() -> tuple[bool, str]:
    """Whether this machine can boot guests at all, and if not, why."""
    if shutil.which("qemu-system-x86_64") is None:
        return False, "qemu-system-x86_64 is not installed (run tests/provision-host.sh)"
    if os.uname().machine != "x86_64":
        return False, f"guest kernels are amd64; this host is {os.uname().machine}"
    return True, ""


def build_module(kver: str) -> Path:
    """A copy of the DKMS-built module for `kver` (matrix.module()) that a guest may read.

    Named by its SHA-256 under build/matrix/KVER/by-hash/ and never rewritten,
    so a rebuild meanwhile cannot change what a running guest reads. Not
    under /tmp: virtme-ng gives the guest /tmp as an overlay on the host's,
    and overlayfs leaves changes to its lower layer under a running guest
    (other pytest sessions make them) undefined.
    """
    return _by_hash(matrix.out_dir(kver) / "by-hash", matrix.module(kver).read_bytes(), ".ko")


def _by_hash(directory: Path, data: bytes, suffix: str) -> Path:
    """`data` in `directory`, named by its SHA-256 (+ `suffix`): written once, atomically."""
    path = directory / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def guest_env(kver: str, ko: Path) -> dict[str, str]:
    """What every guest program needs to know: the kernel, its .config and the module.

    `ko` comes from build_module(): its name is its SHA-256, which the guest
    checks its copy against.
    """
    return {"TCPSECRETS_IN_GUEST": "1", "TCPSECRETS_KVER": kver,
            "TCPSECRETS_KCONFIG": str(matrix.kernel_config(kver)),
            "TCPSECRETS_KO": str(ko), "TCPSECRETS_KO_SHA256": ko.stem}


def kbuild_on_host(kver: str, out_dir: Path) -> Path:
    """Build kmod/ with plain kbuild against the host's headers of `kver`; return the .ko."""
    src = out_dir / "kmod"
    shutil.copytree(REPO / "kmod", src, ignore=shutil.ignore_patterns(
        "*.o", "*.ko", "*.mod*", ".*.cmd", "*.order", "*.symvers", ".tmp_versions"))
    subprocess.run(["make", "-C", str(src), f"KVER={kver}"], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src / "tcpsecrets.ko"


# virtme-ng gives the guest the host's root over 9p without caching, so every stat, open and
# read is a round trip to qemu; under TCG that made each start of the agent's Python take
# ~30 s (5.10). The root is exported a second time, read-only, and mounted with the guest's
# caches on (cache=loose) over the trees programs are started from: the interpreter, the
# venv, the repository's code and /usr (as an overlay, so the guest may still write there).
# Nothing under them changes while a guest runs (modules are named by their hash; the
# guests' outputs go to --rwdir mounts, outside these trees). Before that, open-paths.sh lets
# every user reach the repository and those trees (the guest tests run the agent as nobody,
# and root's clones and interpreters live under /root, mode 0700), in the guest only.
CACHED_ROOT_TAG = "cachedroot"


def guest_script(lines: list[str]) -> Path:
    """A shell script the guest runs, written before boot under build/guest-scripts/.

    virtme-ng hands the guest its command on the kernel's command line (base64),
    whose 2 KiB limit a long command overflows, and the guest then hangs at boot;
    so the guest gets `sh SCRIPT`. Named by its SHA-256 and never rewritten, like
    build_module()'s copies, so what a running guest reads cannot change.
    """
    text = "".join(f"{line}\n" for line in ["#!/bin/sh", *lines])
    return _by_hash(REPO / "build" / "guest-scripts", text.encode(), ".sh")


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
    trees = sorted({sys.base_prefix, sys.prefix, str(REPO / "agent"), str(REPO / "tests")})
    script = guest_script([
        shlex.join(["sh", str(HERE / "open-paths.sh"), str(REPO), *trees]) + " || exit 1",
        shlex.join(["sh", str(HERE / "cached-root.sh"), CACHED_ROOT_TAG, *trees]) + " || exit 1",
        f"cd {shlex.quote(str(REPO))} && env {exports} {command}"])
    argv += ["--exec", f"sh {shlex.quote(str(script))}"]
    # Last: vng passes everything after --qemu-opts to qemu.
    argv += [f"--qemu-opts=-virtfs local,path=/,mount_tag={CACHED_ROOT_TAG},security_model=none,"
             "readonly=on,multidevs=remap"]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=host_env,
                          stdin=subprocess.DEVNULL)
