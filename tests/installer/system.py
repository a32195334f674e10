"""A real Debian 12 system under qemu (TCG), driven as root over OpenSSH.

The image is the one tests/installer/system-image.sh builds and caches
(debootstrap, systemd as PID 1, systemd-networkd, OpenSSH server, the
distribution kernel). Each DebianSystem boots it from a fresh qcow2 overlay
whose backing file is the cached raw image, so the image itself is never
written and every system starts from the same state. The guest's network is
qemu's user network: it reaches the host's Debian mirror through the host,
and the host reaches the guest's SSH server (port 22) and the agent's port
(7100) through forwarded 127.0.0.1 ports.

    with DebianSystem() as system:
        system.run("apt-get update")
        system.reboot()
        before = system.state()
        ...
        assert diff_states(before, system.state()) == []
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

CACHE = Path(os.environ.get("SYSTEM_IMAGE_CACHE", "/var/cache/mitigator-agent-tests"))
BUILD_SCRIPT = Path(__file__).resolve().with_name("system-image.sh")

BOOT_TIMEOUT = 900  # seconds from qemu's start to SSH; TCG boots take 20-60 s, far more on a busy host
COMMAND_TIMEOUT = 900  # default per command (apt and DKMS builds under TCG are slow)
SHUTDOWN_TIMEOUT = 180  # seconds for a clean poweroff before qemu is killed
AGENT_PORT = 7100

# What state() lists file by file: the installed layout (packaging/README.md)
# and where an install leaves traces. /usr/src holds the kernel headers too:
# those belong to packages (the package list shows them), so they are skipped.
STATE_ROOTS = ("/etc", "/opt", "/usr/local", "/usr/src", "/usr/lib/mitigator-agent",
               "/var/lib/mitigator-agent", "/var/lib/mitigator-agent-install", "/var/lib/dkms")
STATE_SKIP_PREFIXES = ("/usr/src/linux-headers-", "/usr/src/linux-kbuild-")
# Files that change with no change of what is installed, so a before/after
# comparison would show noise:
STATE_EXCLUDE = (
    # ldconfig's cache, rebuilt by dpkg triggers whenever a package with a
    # library comes or goes; it is derived from the package list.
    "/etc/ld.so.cache",
    # shadow's backups of the previous user databases and its lock file:
    # adding then deleting a user changes them though passwd, group, shadow
    # and gshadow themselves are back as they were.
    "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-", "/etc/subuid-",
    "/etc/subgid-", "/etc/.pwd.lock",
)
SYSCTLS = ("net.ipv4.tcp_syncookies",)

State = Dict[str, Dict[str, str]]


class GuestError(RuntimeError):
    """The guest or qemu failed; the message names the console log to read."""


class GuestCommandError(subprocess.CalledProcessError):
    """A command run in the guest exited non-zero (with its output in the message)."""

    def __str__(self) -> str:
        def tail(data: Union[str, bytes, None]) -> str:
            if not data:
                return ""
            text = data.decode(errors="replace") if isinstance(data, bytes) else data
            return text[-4000:]
        return (f"in the guest, {self.cmd!r} exited {self.returncode}\n"
                f"--- stdout ---\n{tail(self.stdout)}\n--- stderr ---\n{tail(self.stderr)}")


@dataclass(frozen=True)
class SystemImage:
    """The cached image's files (tests/installer/system-image.sh writes them): Debian 12's in the
    cache itself, another release's (`for_suite`) in a subdirectory named by its suite."""

    cache: Path
    suite: str = "bookworm"

    @classmethod
    def for_suite(cls, suite: str) -> "SystemImage":
        return cls(CACHE if suite == "bookworm" else CACHE / suite, suite)

    @property
    def disk(self) -> Path:
        """The raw ext4 root file system; only ever a backing file, never written."""
        return self.cache / f"{self.suite}.raw"

    @property
    def kernel(self) -> Path:
        """The image's own kernel (its /boot/vmlinuz-KVER), for qemu -kernel."""
        return self.cache / "vmlinuz"

    @property
    def initrd(self) -> Path:
        """The image's own initramfs (its /boot/initrd.img-KVER)."""
        return self.cache / "initrd.img"

    @property
    def key(self) -> Path:
        """The private key root's authorized_keys admits (mode 0600)."""
        return self.cache / "id_ed25519"

    @property
    def stamp(self) -> Path:
        """Written last by the build: what the image was built from."""
        return self.cache / "image.stamp"

    @property
    def kernel_release(self) -> str:
        """`uname -r` of the image's kernel."""
        return (self.cache / "kernel-release").read_text().strip()

    def problem(self) -> Optional[str]:
        """Why this image cannot be booted as the current one, or None if it can.

        Absent, half-built, or built by another version of system-image.sh
        (its stamp records the script's SHA-256).
        """
        fix = (f"run {BUILD_SCRIPT} as root (tests/provision-host.sh runs it)" if self.suite == "bookworm" else
               f"run {BUILD_SCRIPT} {self.suite} as root (`make test-long` runs it)")
        if not self.stamp.exists():
            return f"no system image in {self.cache}: {fix}"
        for path in (self.disk, self.kernel, self.initrd, self.key):
            if not path.exists():
                return f"the system image in {self.cache} lacks {path.name}: {fix}"
        script = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()
        if f"script={script} " not in self.stamp.read_text() + " ":
            return f"the system image in {self.cache} was built by another {BUILD_SCRIPT.name}: {fix}"
        return None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In qemu's process before exec: be killed when the test process that started it dies.

    A test run cut short (a timeout's SIGTERM, a kill) runs no fixture teardown, and qemu, in a
    session of its own, would go on using a core under TCG and slow every later run. The signal is
    tied to the thread that started qemu: guests are started from pytest's main thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    # The parent may have died before the line above: then nobody is there to stop us.
    if os.getppid() == 1:
        os._exit(127)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DebianSystem:
    """One booted Debian 12 system: qemu (TCG) on a throwaway overlay of the image.

    `start()` boots it and waits for SSH; `stop()` powers it off (qemu is
    killed if it lingers) and deletes the overlay. Usable as a context
    manager. The serial console goes to `console_log`, named in every error.
    """

    def __init__(self, image: Optional[SystemImage] = None, *, workdir: Optional[Path] = None,
                 memory_mb: int = 2048, cpus: int = 2, boot_timeout: float = BOOT_TIMEOUT) -> None:
        """Prepare (not boot) a system; `workdir` keeps the console log, else a temp dir is used and removed by stop()."""
        self.image = image or SystemImage(CACHE)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="debian-system-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.overlay = self.workdir / "overlay.qcow2"
        self.ssh_port = 0
        self.agent_port = 0
        self._qemu: Optional[subprocess.Popen[bytes]] = None
        # One SSH connection that every command rides on (OpenSSH multiplexing): a login of its
        # own per command costs the guest seconds of TCG time (sshd, key exchange, PAM).
        self._mux_socket = self.workdir / "ssh-mux"
        self._mux: Optional[subprocess.Popen[bytes]] = None
        # The kernel and initramfs qemu boots: the image's, until reboot_onto() picks another.
        self._boot_files: Tuple[Path, Path] = (self.image.kernel, self.image.initrd)

    # --- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Boot the image on a fresh overlay and return once root can log in over SSH."""
        problem = self.image.problem()
        if problem:
            raise GuestError(problem)
        if self._qemu is not None:
            raise GuestError("this system is already started")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                        "-b", str(self.image.disk.resolve()), str(self.overlay)],
                       check=True, capture_output=True)
        self._boot(new_ports=True)

    def _boot(self, new_ports: bool) -> None:
        """Start qemu on the boot files and return once root logs in over SSH; qemu is killed if not.

        With `new_ports`, free ports are picked; they may be taken before qemu
        binds them (other sessions boot guests too): then qemu exits at once,
        and another pair is tried. Without, the current ones are used again.
        """
        for _attempt in range(5 if new_ports else 1):
            if new_ports:
                self.ssh_port, self.agent_port = _free_port(), _free_port()
            self._launch()
            if self._wait_qemu_settled():
                break
        else:
            raise GuestError(f"qemu could not forward ports {self.ssh_port} and {self.agent_port}: "
                             f"{self._qemu_says()}")
        try:
            self._wait_for_ssh(time.monotonic() + self.boot_timeout, previous_boot_id=None)
        except BaseException:
            self._kill_qemu()
            raise
        self._start_mux()

    def _launch(self) -> None:
        """Start qemu in the background (serial console to console_log)."""
        forwards = (f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
                    f"hostfwd=tcp:127.0.0.1:{self.agent_port}-:{AGENT_PORT}")
        command = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max",
            "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{self.console_log}", "-monitor", "none",
            "-kernel", str(self._boot_files[0]), "-initrd", str(self._boot_files[1]),
            "-append", "root=/dev/vda rw console=ttyS0",
            # The overlay is thrown away: qemu need not wait for the host's disk.
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-netdev", f"user,id=net0,{forwards}", "-device", "virtio-net-pci,netdev=net0",
            # Entropy for sshd's and the guest's early getrandom().
            "-device", "virtio-rng-pci",
        ]
        with open(self.qemu_log, "wb") as log:
            self._qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent)

    def _wait_qemu_settled(self) -> bool:
        """True once qemu runs with its forwards set up; False if it exited over a port."""
        assert self._qemu is not None
        try:
            self._qemu.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return True
        said = self._qemu_says()
        self._qemu = None
        if "host forwarding" in said:
            return False
        raise GuestError(f"qemu exited at once: {said}")

    def _qemu_says(self) -> str:
        """qemu's own output (errors), as one line."""
        try:
            return " ".join(self.qemu_log.read_text(errors="replace").split()) or "(nothing)"
        except OSError:
            return "(no output)"

    def _fail(self, what: str) -> GuestError:
        """An error naming what failed, the console log and the console's last lines."""
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()[-25:]
        except OSError:
            lines = []
        tail = "\n".join(lines)
        return GuestError(f"{what} (console log: {self.console_log}; its end:)\n{tail}")

    def _wait_for_ssh(self, deadline: float, previous_boot_id: Optional[str]) -> str:
        """Wait until root logs in over SSH (on a boot other than `previous_boot_id`); its boot id."""
        # A probe can hang past ssh's ConnectTimeout (a session the guest
        # drops as it shuts down): it is cut short and tried again, given
        # longer each time in case the host is merely very busy.
        probe_timeout = 30.0
        while True:
            if self._qemu is None or self._qemu.poll() is not None:
                raise self._fail(f"qemu exited (status {self._qemu.returncode if self._qemu else '?'}) "
                                 f"before SSH came up: {self._qemu_says()}")
            try:
                result = self._ssh(["cat", "/proc/sys/kernel/random/boot_id"],
                                   timeout=probe_timeout, connect_timeout=10)
            except subprocess.TimeoutExpired:
                result = None
                probe_timeout = min(probe_timeout + 15, 120)
            if result is not None and result.returncode == 0:
                boot_id = result.stdout.decode().strip()
                if boot_id and boot_id != previous_boot_id:
                    return boot_id
            if time.monotonic() > deadline:
                raise self._fail("the guest did not answer SSH in time")
            time.sleep(1)

    def reboot(self) -> None:
        """`systemctl reboot`, then wait until SSH answers from the new boot (a new boot id)."""
        before = self.boot_id()
        self._stop_mux()
        try:
            # The connection may drop before ssh sees the command's exit.
            self._ssh(["systemctl", "reboot"], timeout=120)
        except subprocess.TimeoutExpired:
            pass
        self._wait_for_ssh(time.monotonic() + self.boot_timeout, previous_boot_id=before)
        self._start_mux()

    def reboot_onto(self, release: str) -> None:
        """Reboot into the installed kernel `release`, as a boot loader booting the newest kernel would.

        qemu boots the kernel it is given, not the guest's boot loader: the
        guest's /boot/vmlinuz-RELEASE and /boot/initrd.img-RELEASE (made by
        its own kernel package) are copied out, the guest is powered off
        cleanly, and qemu starts again on the same disk with them, on the
        same forwarded ports (clients keep their known_hosts entries).
        """
        kernel, initrd = self.workdir / f"vmlinuz-{release}", self.workdir / f"initrd.img-{release}"
        kernel.write_bytes(self.get(f"/boot/vmlinuz-{release}"))
        initrd.write_bytes(self.get(f"/boot/initrd.img-{release}"))
        self._power_off()
        self._kill_qemu()
        self._boot_files = (kernel, initrd)
        self._boot(new_ports=False)
        booted = self.run("uname -r").stdout.strip()
        if booted != release:
            raise self._fail(f"asked to boot kernel {release}, the guest runs {booted}")

    def _power_off(self) -> None:
        """`systemctl poweroff` and wait for qemu to exit (terminated if it lingers); the disk stays."""
        self._stop_mux()
        qemu = self._qemu
        if qemu is None or qemu.poll() is not None:
            return
        try:
            asked = self._ssh(["systemctl", "poweroff"], timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            asked = False
        try:
            # A guest that did not take the order gets a short grace only.
            qemu.wait(timeout=SHUTDOWN_TIMEOUT if asked else 30)
        except subprocess.TimeoutExpired:
            qemu.terminate()
            try:
                qemu.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass

    def _ssh_options(self) -> List[str]:
        return ["-F", "none", "-i", str(self.image.key), "-p", str(self.ssh_port),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                # A guest that reboots or hangs under a command: ssh notices.
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=6"]

    def _start_mux(self) -> None:
        """Open the shared connection (its output in ssh-mux.log); without it, commands log in each."""
        self._stop_mux()
        with open(self.workdir / "ssh-mux.log", "ab") as log:
            self._mux = subprocess.Popen(
                ["ssh", *self._ssh_options(), "-o", "ConnectTimeout=30", "-N", "-o", "ControlMaster=yes",
                 "-o", f"ControlPath={self._mux_socket}", "root@127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._mux_socket.exists() and self._mux.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)

    def _stop_mux(self) -> None:
        mux, self._mux = self._mux, None
        if mux is not None:
            if mux.poll() is None:
                mux.terminate()
            try:
                mux.wait(timeout=15)
            except subprocess.TimeoutExpired:
                mux.kill()
                mux.wait()
        self._mux_socket.unlink(missing_ok=True)

    def _kill_qemu(self) -> None:
        """Kill qemu at once (no clean shutdown) and reap it."""
        qemu, self._qemu = self._qemu, None
        if qemu is not None:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()

    def stop(self, keep_logs: bool = False) -> None:
        """Power the guest off, kill qemu if it lingers, always reap it; delete the overlay.

        A temporary work directory (no `workdir` given) goes too, unless
        `keep_logs`: then the console and qemu logs stay for the post-mortem.
        """
        try:
            self._power_off()
        finally:
            self._stop_mux()
            self._kill_qemu()
            self.overlay.unlink(missing_ok=True)
            if self._own_workdir and not keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "DebianSystem":
        """Start the system (stopped again if the start fails)."""
        try:
            self.start()
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        """Stop the system; after an error, its logs stay (they are named in the error)."""
        self.stop(keep_logs=exc_type is not None)

    # --- commands and files -------------------------------------------------

    def _ssh(self, command: Sequence[str], *, input: Optional[bytes] = None, timeout: float,
             connect_timeout: int = 30) -> "subprocess.CompletedProcess[bytes]":
        """Run `command` (joined for the guest's shell) as root over OpenSSH; never raises on exit status.

        Over the shared connection while it is up (ssh falls back to a login of its own when the
        socket is gone).
        """
        mux = self._mux is not None and self._mux.poll() is None and self._mux_socket.exists()
        ssh = [
            "ssh", *self._ssh_options(), "-o", f"ConnectTimeout={connect_timeout}",
            *(["-o", "ControlMaster=no", "-o", f"ControlPath={self._mux_socket}"] if mux else []),
            "root@127.0.0.1", "--", shlex.join(command),
        ]
        return subprocess.run(ssh, input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def run(self, cmd: Union[str, Sequence[str]], check: bool = True,
            timeout: float = COMMAND_TIMEOUT,
            input: Union[str, bytes, None] = None) -> "subprocess.CompletedProcess[str]":
        """Run `cmd` in the guest as root: a string goes to the guest's shell as is, a list is quoted.

        Returns the exit status and the output as text; with `check`, a
        non-zero exit raises GuestCommandError (with the output), and a
        timeout raises with the console log named.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        data = input.encode() if isinstance(input, str) else input
        try:
            raw = self._ssh(argv, input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"in the guest, {cmd!r} did not finish in {timeout} s") from None
        result = subprocess.CompletedProcess(cmd, raw.returncode,
                                             raw.stdout.decode(errors="replace"),
                                             raw.stderr.decode(errors="replace"))
        if raw.returncode == 255 and not raw.stdout:
            # OpenSSH's own failure (the guest is unreachable), not the command's.
            if check or self._qemu is None or self._qemu.poll() is not None:
                raise self._fail(f"ssh to the guest failed running {cmd!r}: {result.stderr.strip()}")
        if check and raw.returncode != 0:
            raise GuestCommandError(raw.returncode, cmd, result.stdout, result.stderr)
        return result

    def put(self, local: Union[Path, bytes], remote: str, mode: int = 0o644) -> None:
        """Write a file in the guest (as root): a local file's bytes, or `local` itself if bytes.

        Written to a temporary name with `mode` and renamed over `remote`, so
        the file appears whole.
        """
        data = local if isinstance(local, bytes) else Path(local).read_bytes()
        tmp = f"{remote}.put-tmp"
        quoted_tmp, quoted = shlex.quote(tmp), shlex.quote(remote)
        self.run(f"umask 077 && cat > {quoted_tmp} && chmod {mode:o} {quoted_tmp} "
                 f"&& mv -f {quoted_tmp} {quoted}", input=data)

    def get(self, remote: str) -> bytes:
        """The bytes of a file in the guest."""
        try:
            raw = self._ssh(["cat", "--", remote], timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise self._fail(f"reading {remote} from the guest timed out") from None
        if raw.returncode != 0:
            raise GuestCommandError(raw.returncode, f"cat -- {remote}", raw.stdout, raw.stderr)
        return raw.stdout

    def boot_id(self) -> str:
        """The kernel's id of the current boot (new on every boot)."""
        return self.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()

    # --- system state -------------------------------------------------------

    def state(self, roots: Sequence[str] = STATE_ROOTS) -> State:
        """A snapshot of what an install changes, for before/after comparisons (diff_states).

        Categories, each a mapping of name to a description:
        ``packages`` (dpkg: version and status), ``files`` (every entry under
        `roots`: type, mode, owner, and the SHA-256 of regular files or a
        symlink's target; STATE_EXCLUDE left out), ``users`` and ``groups``
        (getent lines), ``sysctls`` (SYSCTLS), ``modules`` (loaded, as
        lsmod lists them, with the socket-list modules ss loads on demand
        always among them) and ``unit_files`` (systemd's unit files and
        their state: enabled, disabled, static, masked ...).
        """
        config = {"roots": list(roots), "skip_prefixes": list(STATE_SKIP_PREFIXES),
                  "exclude": list(STATE_EXCLUDE), "sysctls": list(SYSCTLS)}
        result = self.run(["python3", "-c", _STATE_PROGRAM, json.dumps(config)], timeout=600)
        state: State = json.loads(result.stdout)
        return state


def diff_states(before: State, after: State) -> List[str]:
    """What differs between two state() snapshots, one line each, sorted; [] if nothing.

    ``+ category name: value`` appeared, ``- category name: value`` went,
    ``~ category name: old -> new`` changed.
    """
    lines: List[str] = []
    for category in sorted(set(before) | set(after)):
        old, new = before.get(category, {}), after.get(category, {})
        for name in sorted(set(old) | set(new)):
            if name not in old:
                lines.append(f"+ {category} {name}: {new[name]}")
            elif name not in new:
                lines.append(f"- {category} {name}: {old[name]}")
            elif old[name] != new[name]:
                lines.append(f"~ {category} {name}: {old[name]} -> {new[name]}")
    return lines


# Runs in the guest (its python3, nothing else installed); prints the state as
# JSON. Arguments: a JSON object with roots, skip_prefixes, exclude, sysctls.
_STATE_PROGRAM = r'''
import grp, hashlib, json, os, pwd, stat, subprocess, sys

config = json.loads(sys.argv[1])

def out(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

def owner(st):
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return user + ":" + group

def describe(path):
    st = os.lstat(path)
    mode = "%04o %s" % (stat.S_IMODE(st.st_mode), owner(st))
    if stat.S_ISLNK(st.st_mode):
        return "symlink %s -> %s" % (mode, os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return "dir " + mode
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return "file %s %s" % (mode, digest.hexdigest())
    return "other %s %o" % (mode, stat.S_IFMT(st.st_mode))

def skipped(path):
    return path in config["exclude"] or path.startswith(tuple(config["skip_prefixes"]))

files = {}
for root in config["roots"]:
    if not os.path.lexists(root) or skipped(root):
        continue
    files[root] = describe(root)
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not skipped(os.path.join(top, d))]
        for name in dirs + names:
            path = os.path.join(top, name)
            if skipped(path):
                continue
            # An entry listed but gone before it is read (a temporary file renamed into place by
            # apt, systemd or the agent) is not part of either state.
            try:
                files[path] = describe(path)
            except FileNotFoundError:
                pass

packages = {}
for line in out("dpkg-query", "-W", "-f", "${binary:Package} ${Version} ${Status}\n").splitlines():
    name, _, rest = line.partition(" ")
    packages[name] = rest

def getent(database):
    return {line.split(":", 1)[0]: line for line in out("getent", database).splitlines()}

sysctls = {}
for name in config["sysctls"]:
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        sysctls[name] = f.read().strip()

# The kernel loads inet_diag and tcp_diag on demand the first time anything asks for the socket
# list (ss, as the installer and the tests do): asked here first, both snapshots have them.
subprocess.run(["ss", "-Htan"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
with open("/proc/modules") as f:
    modules = {line.split()[0]: "loaded" for line in f}

unit_files = {}
for line in out("systemctl", "list-unit-files", "--no-legend", "--no-pager").splitlines():
    fields = line.split()
    if len(fields) >= 2:
        unit_files[fields[0]] = fields[1]

json.dump({"packages": packages, "files": files, "users": getent("passwd"),
           "groups": getent("group"), "sysctls": sysctls, "modules": modules,
           "unit_files": unit_files}, sys.stdout, sort_keys=True)
'''
