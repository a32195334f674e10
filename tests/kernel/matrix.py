"""The kernel matrix: each Debian release's kernel, the module built for it
with DKMS in a chroot of that release, and the table of results.

    python -m tests.kernel.matrix run [--kernel-only] [--jobs N] [-- PYTEST_ARGS]
        DKMS builds, then pytest: the `system` tests (a booted Debian
        image: installer and packages, two runs; build/matrix/system-*/pytest.log;
        not with --kernel-only) start first and run beside the rest: the
        tests marked neither `kernel` nor `system` once, then the `kernel`
        tests once per kernel, N kernels at a time (default 2), each in its
        own pytest (build/matrix/KVER/pytest.log); then the results table.
        Exit status 1 if any pytest failed. --table long: `make test-long`,
        the kernels of tests/kernel/test-kernels-long and the system scenarios
        marked `long` (build/matrix/system-long-*/), no other tests; its table.
    python -m tests.kernel.matrix build [--force] [KVER...]
        DKMS-build the module for each kernel (builds of the current kmod/ are kept)
    python -m tests.kernel.matrix results [--junit FILE]...
        write build/matrix/results.md
    python -m tests.kernel.matrix readme [--table long]
        put build/matrix/results.md into README.md, between its
        kernel-matrix markers (`make matrix` does this after its run);
        with --table long, build/matrix/results-long.md between its
        test-long markers (`make test-long`)
    python -m tests.kernel.matrix refresh
        ask each release's archive for its current kernel and move the pins of
        tests/kernel/test-kernels to it (`make matrix-refresh`, which then
        provisions and DKMS-builds the new pins)

Provisioning (chroots, kernel images) is tests/provision-host.sh, which calls
matrix-chroot.sh; that script also runs the build inside the chroot. Here:
the bookkeeping around it. Per kernel, build/matrix/KVER/ holds

    tcpsecrets.ko   the module DKMS built and signed (decompressed)
    build.log       DKMS's output (and make.log when the build failed)
    status.json     suite, the headers' Debian version, DKMS build ok/failed,
                    compiler, signer, probed features, and the hash of the kmod/
                    sources it was built from
    guest.json      each guest test's outcome (written by test_guest_kernels.py)
    guest.log, dmesg.txt   the guest's console and its kernel log after the suite
    pytest.log, junit.xml  that kernel's pytest run (`run`)

A build is redone only when kmod/ (or the build script) changed since.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KMOD = REPO / "kmod"
LIST = HERE / "test-kernels"
# The kernels of `make test-long`: servers run them, `make test` does not boot them.
LONG_LIST = HERE / "test-kernels-long"
CHROOT_TOOL = HERE / "matrix-chroot.sh"
OUT = REPO / "build" / "matrix"
CACHE = Path(os.environ.get("TCPSECRETS_MATRIX_CACHE", "/var/cache/tcpsecrets-matrix"))

# Kbuild output in a kmod/ tree: not part of the sources.
_ARTIFACT = re.compile(r"(\.o|\.ko|\.mod|\.mod\.c|\.order|\.symvers|\.cmd)$|^\.tmp_versions$")


class BuildFailed(Exception):
    pass


# --- which kernels ---------------------------------------------------------------

def listed(path: Path = LIST) -> list[tuple[str, str]]:
    """(suite, kver) of each line of tests/kernel/test-kernels (or of another list `path`)."""
    kernels = []
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2:
            kernels.append((fields[0], fields[1]))
        elif fields:
            raise ValueError(f"{path}: expected 'SUITE KVER', got {line!r}")
    return kernels


def published(suite: str) -> Optional[tuple[str, str]]:
    """(kver, Debian version) of `suite`'s current kernel, as the last provisioning asked its archive.

    Written by matrix-chroot.sh (`newest`, which `kernel` runs at every provisioning) to
    CACHE/newest/SUITE; None when no provisioning has asked yet.
    """
    try:
        fields = (CACHE / "newest" / suite).read_text().split()
    except OSError:
        return None
    return (fields[0], fields[1]) if len(fields) == 2 else None


def refresh_pins() -> list[str]:
    """Move every pin of tests/kernel/test-kernels to its release's current kernel; what moved.

    Asks each release's archive (matrix-chroot.sh newest, preparing the chroot first if
    needed), then rewrites the file (rewrite_pins).
    """
    current = {}
    for suite, _ in listed():
        subprocess.run([str(CHROOT_TOOL), "prepare", suite], check=True)
        out = subprocess.run([str(CHROOT_TOOL), "newest", suite], check=True, capture_output=True,
                             text=True).stdout.split()
        current[suite] = (out[0], out[1])
    text, moved = rewrite_pins(LIST.read_text(), current, time.strftime("%Y-%m-%d", time.gmtime()))
    tmp = LIST.with_name(f".{LIST.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, LIST)
    return moved


def rewrite_pins(text: str, current: dict[str, tuple[str, str]], today: str) -> tuple[str, list[str]]:
    """`text` (a test-kernels file) with each pin set to current[suite] = (kver, Debian version) and
    the `# refreshed:` line to `today`; every other line as it was. Also what moved, a line each."""
    moved = []
    lines = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if line.startswith("# refreshed:"):
            line = f"# refreshed: {today}"
        elif len(fields) == 2 and fields[0] in current:
            suite, kver = fields
            new_kver, version = current[suite]
            if new_kver != kver:
                moved.append(f"{suite}: {kver} -> {new_kver} ({version})")
            line = f"{f'{suite} {new_kver}':<31} # {version}"
        lines.append(line)
    return "\n".join(lines) + "\n", moved


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def suite_of(kver: str) -> Optional[str]:
    """The Debian suite `kver` comes from: listed (in either list), or whose chroot has its headers."""
    for suite, listed_kver in listed() + listed(LONG_LIST):
        if listed_kver == kver:
            return suite
    chroots = CACHE / "chroot"
    if chroots.is_dir():
        for root in sorted(chroots.iterdir()):
            if (root / "usr" / "src" / f"linux-headers-{kver}").is_dir():
                return root.name
    return None


def kernel_image(kver: str) -> Path:
    """The kernel image virtme-ng boots: the host's own, or the one provisioning extracted."""
    installed = Path("/boot") / f"vmlinuz-{kver}"
    if installed.exists():
        return installed
    return CACHE / "kernel" / kver / "vmlinuz"


def kernel_config(kver: str) -> Path:
    """The kernel's build configuration, at a path a guest can read.

    /boot/config-KVER where the kernel is installed; else a copy of the
    .config its headers carry in the release's chroot, kept beside the
    builds (the guest sees a tmpfs over /var/cache, where the chroot is).
    """
    installed = Path("/boot") / f"config-{kver}"
    if installed.exists():
        return installed
    copy = out_dir(kver) / f"config-{kver}"
    if not copy.exists():
        suite = suite_of(kver)
        headers = CACHE / "chroot" / (suite or "?") / "usr" / "src" / f"linux-headers-{kver}" / ".config"
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
        shutil.copyfile(headers, tmp)
        os.replace(tmp, copy)
    return copy


# --- builds ----------------------------------------------------------------------

def source_hash() -> str:
    """Hash of what a build depends on: kmod/'s sources and the build script."""
    h = hashlib.sha256()
    files = [p for p in sorted(KMOD.rglob("*")) if p.is_file()
             and not any(_ARTIFACT.search(part) for part in p.relative_to(KMOD).parts)
             and p.relative_to(KMOD).as_posix() != "compat/generated.h"]
    for path in files + [CHROOT_TOOL]:
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def out_dir(kver: str) -> Path:
    return OUT / kver


def status(kver: str) -> Optional[dict]:
    try:
        return json.loads((out_dir(kver) / "status.json").read_text())
    except (OSError, ValueError):
        return None


def is_fresh(kver: str) -> bool:
    st = status(kver)
    return st is not None and st.get("source_hash") == source_hash()


@contextlib.contextmanager
def _locked(suite: str) -> Iterator[None]:
    """One build at a time per chroot (pytest and `make matrix` may overlap)."""
    (CACHE / "chroot").mkdir(parents=True, exist_ok=True)
    with open(CACHE / "chroot" / f"{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _compiler(ko: Path, log: str) -> str:
    """The compiler that built the module (its .comment), else the kernel's."""
    if ko.exists():
        text = subprocess.run(["readelf", "-p", ".comment", str(ko)], capture_output=True,
                              text=True).stdout
        found = sorted({m.group(1).strip() for m in re.finditer(r"\]\s+(GCC: .*)", text)})
        if found:
            return "; ".join(s.replace("GCC: ", "gcc ") for s in found)
    m = re.search(r"^# dkms \S+, (.*)$", log, re.M)
    return m.group(1) if m else "unknown"


def modinfo(ko: Path, field: str) -> str:
    return subprocess.run(["modinfo", "-F", field, str(ko)], capture_output=True, text=True,
                          check=True).stdout.strip()


def build(kver: str) -> dict:
    """DKMS-build kmod/ for `kver` in its release's chroot, record the outcome."""
    suite = suite_of(kver)
    if suite is None:
        raise BuildFailed(f"{kver}: unknown suite; list it in {LIST} and run tests/provision-host.sh")
    out = out_dir(kver)
    out.mkdir(parents=True, exist_ok=True)
    digest = source_hash()
    started = time.monotonic()
    # Built aside, then each file renamed into place: a guest, or another
    # pytest, may be reading out/ meanwhile (they load copies, see vm.py).
    aside = out.parent / f".{kver}.build-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    with _locked(suite):
        result = subprocess.run([str(CHROOT_TOOL), "build", suite, kver, str(KMOD), str(aside)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ko = out / "tcpsecrets.ko"
    for name in ("tcpsecrets.ko", "build.log", "signing-cert.der"):
        if (aside / name).exists():
            os.replace(aside / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(aside, ignore_errors=True)
    log_path = out / "build.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else result.stdout
    ok = result.returncode == 0 and ko.exists()
    headers = re.search(rf"^# linux-headers-{re.escape(kver)} (\S+)$", log, re.M)
    st = {
        "kver": kver,
        "suite": suite,
        "debian_version": headers.group(1) if headers else "",
        "dkms": "ok" if ok else "failed",
        "compiler": _compiler(ko, log),
        "signer": modinfo(ko, "signer") if ok else "",
        "features": sorted(set(re.findall(r"TCPSECRETS_HAVE_\w+", _probed(log)))),
        "seconds": round(time.monotonic() - started, 1),
        "source_hash": digest,
        "tool_output": result.stdout[-4000:],
    }
    tmp = out / f".status.json.{os.getpid()}"
    tmp.write_text(json.dumps(st, indent=2) + "\n")
    os.replace(tmp, out / "status.json")
    return st


def _probed(log: str) -> str:
    m = re.search(r"^# probed: (.*)$", log, re.M)
    return m.group(1) if m else ""


def ensure_built(kver: str) -> dict:
    """The status of a build of the current kmod/ for `kver`, building it if needed."""
    if is_fresh(kver):
        return status(kver)  # type: ignore[return-value]
    if os.getuid() != 0:
        raise BuildFailed(f"no build of the current kmod/ for {kver} and not root: run `make matrix`")
    return build(kver)


def module(kver: str) -> Path:
    """The DKMS-built, signed module for `kver` (built now if kmod/ changed)."""
    st = ensure_built(kver)
    if st["dkms"] != "ok":
        raise BuildFailed(f"DKMS build for {kver} ({st['suite']}) failed:\n" + build_log_tail(kver))
    return out_dir(kver) / "tcpsecrets.ko"


def build_log_tail(kver: str, lines: int = 60) -> str:
    path = out_dir(kver) / "build.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# --- the static check -------------------------------------------------------------

# An indirect call or jump, in objdump's AT&T syntax (`call *%rax`,
# `jmp *0x8(%rdi)`, `notrack jmp *...`), or a call/jump through a retpoline or
# indirect-branch thunk (what -mindirect-branch=thunk-extern makes of them).
_INDIRECT_INSN = re.compile(r"\t(?:notrack\s+)?(?:call|jmp)[lqw]?\s+\*")
_THUNK = re.compile(r"__x86_indirect_|__x86_retpoline_|__llvm_retpoline_")


def indirect_branches(ko: Path) -> list[str]:
    """Lines of `objdump -dr ko` that make an indirect call or jump."""
    text = subprocess.run(["objdump", "-dr", str(ko)], capture_output=True, text=True,
                          check=True).stdout
    function = "?"
    found = []
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            function = m.group(1)
        elif _INDIRECT_INSN.search(line) or _THUNK.search(line):
            found.append(f"{function}: {line.strip()}")
    return found


# --- the results table --------------------------------------------------------------

def kernels_in_run() -> list[str]:
    """$TEST_KVERS (set by `make test`), else every kernel of tests/kernel/test-kernels."""
    env = os.environ.get("TEST_KVERS")
    if env:
        return env.split()
    return [kver for _, kver in listed()]


def _host_outcomes(junits: list[Path], kvers: list[str]) -> dict[str, dict[str, str]]:
    """test name -> {kver -> outcome} for host tests parametrized by kernel."""
    table: dict[str, dict[str, str]] = {}
    cases = []
    for junit in junits:
        if junit.exists():
            cases += list(ET.parse(junit).getroot().iter("testcase"))
    for case in cases:
        name = case.get("name", "")
        if "[" not in name or name.startswith("test_in_guest["):
            continue
        base, params = name.split("[", 1)
        params = params.rstrip("]")
        kver = next((k for k in kvers if params == k or params.endswith("-" + k)
                     or params.startswith(k + "-")), None)
        if kver is None:
            continue
        table.setdefault(base, {})[kver] = _case_outcome(case)
    return table


_MARK = {"passed": "pass", "failed": "**FAIL**", "skipped": "skip", None: "—"}


def _case_outcome(case: ET.Element) -> str:
    outcome = "passed"
    for child in case:
        if child.tag in ("failure", "error"):
            outcome = "failed"
        elif child.tag == "skipped" and outcome == "passed":
            outcome = "skipped"
    return outcome


def _scenario_lines(junits: list[Path]) -> list[str]:
    """The long system scenarios' table (one row per test, in run order) from their junits, or why none."""
    lines = ["", "System scenarios (marker `long`: tests/installer, each in a Debian system image of its own"
                 " booted under qemu TCG with systemd; build/matrix/system-long-*/pytest.log):", ""]
    present = [junit for junit in junits if junit.exists()]
    if not present:
        return lines + ["Not run (no build/matrix/system-long-*/junit.xml)."]
    lines += ["| scenario | test | result | seconds |", "|---|---|---|---|"]
    cases = [case for junit in present for case in ET.parse(junit).getroot().iter("testcase")]
    for case in cases:
        module = case.get("classname", "").rsplit(".", 1)[-1]
        seconds = float(case.get("time") or 0)
        lines.append(f"| {module} | {case.get('name', '')} | {_MARK[_case_outcome(case)]} | {seconds:.0f} |")
    return lines


# The two tables a run can write: `make matrix`/`make test` (the pins), `make test-long`.
TABLES = {
    "matrix": {"file": "results.md", "producer": "`make matrix` (tests/kernel/matrix.py)",
               "markers": ("<!-- kernel-matrix:begin -->", "<!-- kernel-matrix:end -->")},
    "long": {"file": "results-long.md", "producer": "`make test-long` (tests/kernel/matrix.py)",
             "markers": ("<!-- test-long:begin -->", "<!-- test-long:end -->")},
}


def results(junits: Optional[list[Path]] = None, table: str = "matrix") -> str:
    """Write OUT/<the table's file> from what the run left (junits, guest.json, status.json); its text.

    The "matrix" table also says which releases' current kernels have moved past the pins; the
    "long" one lists older kernels on purpose and says nothing of the kind.
    """
    kvers = kernels_in_run()
    if junits is None:
        junits = [OUT / "junit-host.xml"] + [out_dir(k) / "junit.xml" for k in kvers]
    host = _host_outcomes(junits, kvers)
    guests: dict[str, dict[str, list]] = {}
    for kver in kvers:
        path = out_dir(kver) / "guest.json"
        try:
            guests[kver] = json.loads(path.read_text())
        except (OSError, ValueError):
            guests[kver] = {}
    host_cols = sorted(host)
    lines = [
        f"<!-- produced by {TABLES[table]['producer']}; do not edit by hand -->",
        f"Kernel matrix run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"kmod/ sources {source_hash()[:12]}: the module built with DKMS in a chroot "
        "of each release, then the guest suite in that kernel under qemu (TCG). "
        "Kernel: the ABI tested (its Debian version).",
        "",
        "| kernel | suite | compiler | DKMS build | signer | features probed | guest tests passed |"
        + "".join(f" {c.removeprefix('test_')} |" for c in host_cols),
        "|---|---|---|---|---|---|---|" + "---|" * len(host_cols),
    ]
    moved_on = []
    for kver in kvers:
        st = status(kver) or {}
        fresh = st.get("source_hash") == source_hash()
        g = guests[kver]
        passed = sum(1 for outcome, _ in g.values() if outcome == "passed")
        guest_cell = f"{passed}/{len(g)}" if g else "not run"
        dkms = st.get("dkms", "not built")
        if st and not fresh:
            dkms += " (stale)"
        features = ", ".join(f.removeprefix("TCPSECRETS_HAVE_") for f in st.get("features", []))
        suite = st.get("suite") or suite_of(kver) or "?"
        current = published(suite)
        if table == "matrix" and current is not None and current[0] != kver:
            moved_on.append(f"{suite}'s current kernel is {current[0]} ({current[1]}), not {kver}")
        version = f" ({st['debian_version']})" if st.get("debian_version") else ""
        lines.append(
            f"| {kver}{version} | {suite} | {st.get('compiler', '?')} "
            f"| {dkms} | {st.get('signer') or '—'} | {features or '—'} | {guest_cell} |"
            + "".join(f" {_MARK.get(host[c].get(kver))} |" for c in host_cols))
    if moved_on:
        lines += ["", "Newer than the pins, published since tests/kernel/test-kernels was refreshed (not tested "
                  "by this run; `make matrix-refresh` moves the pins): " + "; ".join(moved_on) + "."]
    elif table == "matrix" and all(published(matrix_suite) for matrix_suite, _ in listed()):
        lines += ["", "Every kernel above is its release's current one, as its archive said at this run."]
    test_ids = sorted({t for g in guests.values() for t in g})
    if test_ids:
        lines += ["", "Guest tests (tests/kernel/guest/), one boot per kernel:", "",
                  "| guest test | " + " | ".join(kvers) + " |",
                  "|---|" + "---|" * len(kvers)]
        for t in test_ids:
            cells = [_MARK.get((guests[k].get(t) or [None])[0]) for k in kvers]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if table == "long":
        lines += _scenario_lines([OUT / f"system-{group}" / "junit.xml" for group in LONG_SYSTEM_GROUPS])
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / TABLES[table]["file"]).write_text(text)
    return text


# --- the README's copy ---------------------------------------------------------------

README = REPO / "README.md"
README_BEGIN, README_END = TABLES["matrix"]["markers"]


def splice_readme(table: str, readme: str, markers: tuple[str, str] = (README_BEGIN, README_END)) -> str:
    """`readme` with the text between its `markers` (the kernel-matrix ones) replaced by `table`.

    Raises ValueError when the markers are missing or out of order: the README
    says where the table goes, this never guesses.
    """
    begin_mark, end_mark = markers
    begin = readme.find(begin_mark)
    end = readme.find(end_mark)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md lacks {begin_mark} ... {end_mark}")
    head = readme[:begin + len(begin_mark)]
    return head + "\n" + table.rstrip("\n") + "\n" + readme[end:]


def update_readme(table: str = "matrix") -> None:
    """Copy the table the last run wrote (build/matrix/results.md, or results-long.md) into README.md."""
    source = OUT / TABLES[table]["file"]
    if not source.exists():
        raise SystemExit(f"matrix: no {source.relative_to(REPO)}: the run ended before its tests "
                         "(see its output above); README.md is unchanged")
    text = README.read_text()
    new = splice_readme(source.read_text(), text, TABLES[table]["markers"])
    if new != text:
        tmp = README.with_name(f".README.md.{os.getpid()}")
        tmp.write_text(new)
        os.replace(tmp, README)
    _say(f"README.md: {table} table updated from {source.relative_to(REPO)}")


# --- the whole run ------------------------------------------------------------------

def _say(msg: str) -> None:
    # One write per message: the system and kernel jobs report from their own threads.
    sys.stderr.write(f"matrix: {msg}\n")
    sys.stderr.flush()


def _summary(log: Path) -> str:
    """The last line of a pytest log ("N passed, M failed in T"), and its failures."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return "\n".join(failures + lines[-1:])


# The system tests' temporary files (guest overlays, console logs): outside pytest's shared,
# pruned /tmp/pytest-of-USER/, and on the host's disk rather than in the repository. Each group's
# pytest empties its own --basetemp below it; the directory itself is made by the run
# (system_basetemp), since pytest makes a basetemp's last component only.
SYSTEM_BASETEMP = Path("/tmp/mitigator-agent-system-tests")


def system_basetemp() -> Path:
    """SYSTEM_BASETEMP, made now if it is missing: ours (this user's, 0700), never a link."""
    SYSTEM_BASETEMP.mkdir(mode=0o700, exist_ok=True)
    st = SYSTEM_BASETEMP.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SystemExit(f"matrix: {SYSTEM_BASETEMP} is not a directory of uid {os.getuid()}: "
                         "remove it (the system tests keep their temporary files there)")
    SYSTEM_BASETEMP.chmod(0o700)
    return SYSTEM_BASETEMP

# The install script's tests in one run; every other system test (a server's later life: an older script's
# install moved to the packages, a kernel update; the image) in the other. Scenarios marked `long` (the
# whole security update, a release upgrade) are `make test-long`'s, in runs of their own beside its kernels.
INSTALL_SCRIPT_TESTS = "tests/installer/test_install_script.py"
SYSTEM_GROUPS = {"install-script": ["-m", "system and not long", INSTALL_SCRIPT_TESTS],
                 "server-life-and-image": ["-m", "system and not long", f"--ignore={INSTALL_SCRIPT_TESTS}"]}
LONG_SYSTEM_GROUPS = {"long-script": ["-m", "system and long", "tests/installer/test_kernel_update_script.py"],
                      "long-failed-move": ["-m", "system and long", "tests/installer/test_failed_move.py"],
                      "long-upgrade-11-12": ["-m", "system and long", "-k", "bullseye",
                                             "tests/installer/test_release_upgrade_packages.py"],
                      "long-upgrade-12-13": ["-m", "system and long", "-k", "trixie",
                                             "tests/installer/test_release_upgrade_packages.py"]}


def _pytest_job(title: str, out: Path, command: list[str], env: dict[str, str]) -> int:
    """Run a pytest `command` with its output in OUT/pytest.log and its junit in OUT/junit.xml,
    saying when it starts and ends (with the summary); its exit status."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "junit.xml").unlink(missing_ok=True)
    t0 = time.monotonic()
    _say(f"{title} started (log: {(out / 'pytest.log').relative_to(REPO)})")
    with open(out / "pytest.log", "w") as log:
        rc = subprocess.run(command + [f"--junitxml={out / 'junit.xml'}"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, **env)).returncode
    _say(f"{title} done in {time.monotonic() - t0:.0f} s (exit {rc})\n" + _summary(out / "pytest.log"))
    return rc


def run(pytest_args: list[str], kernel_only: bool = False, jobs: int = 2, table: str = "matrix") -> int:
    kvers = kernels_in_run()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def build_one(kver: str) -> None:
        try:
            st = ensure_built(kver)
        except BuildFailed as e:
            _say(str(e))
            return
        _say(f"{kver} ({st['suite']}, linux-headers {st.get('debian_version') or '?'}): DKMS build "
             f"{st['dkms']}, {st['compiler']}, signer {st['signer'] or '-'}")

    # Each release has its own chroot: two builds at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(build_one, kvers))
    _say(f"builds done in {time.monotonic() - started:.0f} s")

    failed = False
    pytest = [sys.executable, "-m", "pytest"]

    def kernel_suite(kver: str) -> int:
        return _pytest_job(f"{kver}: kernel tests", out_dir(kver), pytest + ["-m", "kernel", *pytest_args],
                           {"TEST_KVERS": kver})

    def system_suite(group: str, selection: list[str]) -> int:
        """One group of the tests in a booted Debian system (tests/installer), its own pytest."""
        # A base temp of its own: each kernel's pytest, starting later, would otherwise prune
        # /tmp/pytest-of-USER/ down to its 3 newest and take this run's guest overlays and logs.
        return _pytest_job(f"system tests ({group})", OUT / f"system-{group}",
                           pytest + [f"--basetemp={system_basetemp() / group}", *selection, *pytest_args],
                           {"SYSTEM_TESTS": "required"})

    # The system tests are the longest part of the run: they start first, in two groups of about
    # equal length (each boots its own guest), and run beside the tests that boot nothing and then
    # beside the kernel pool; much of their time is spent waiting on the guest (apt, SSH round
    # trips, reboots), which the others fill.
    # `make test` (table matrix): the tests that boot no kernel and the system groups; `make test-long`:
    # the long scenarios. --kernel-only: neither.
    groups = {} if kernel_only else SYSTEM_GROUPS if table == "matrix" else LONG_SYSTEM_GROUPS
    host_tests = not kernel_only and table == "matrix"
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as system_pool:
        system_runs = [system_pool.submit(system_suite, group, selection) for group, selection in groups.items()]
        if host_tests:
            junit = OUT / "junit-host.xml"
            junit.unlink(missing_ok=True)
            _say("the tests that boot no kernel")
            failed |= subprocess.run(pytest + ["-m", "not kernel and not system", f"--junitxml={junit}",
                                               *pytest_args], cwd=REPO).returncode != 0
        else:
            (OUT / "junit-host.xml").unlink(missing_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            codes = list(pool.map(kernel_suite, kvers))
        failed |= any(rc != 0 for rc in codes)
        if system_runs:
            system_codes = [job.result() for job in system_runs]
            failed |= any(rc != 0 for rc in system_codes)
            _say(f"system tests: {'passed' if not any(system_codes) else 'FAILED'}")

    results(table=table)
    _say(f"results: {(OUT / TABLES[table]['file']).relative_to(REPO)}; "
         f"whole run {time.monotonic() - started:.0f} s")
    for kver, rc in zip(kvers, codes):
        _say(f"{kver}: {'passed' if rc == 0 else 'FAILED'}")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kernel.matrix")
    sub = parser.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("run", help="builds, pytest (per kernel, in parallel), results table")
    u.add_argument("--kernel-only", action="store_true", help="only the tests marked kernel")
    u.add_argument("--jobs", type=int, default=int(os.environ.get("MATRIX_JOBS", "2")),
                   help="kernels tested at a time (default: $MATRIX_JOBS or 2)")
    u.add_argument("--table", choices=sorted(TABLES), default="matrix",
                   help="which results table the run writes (default: matrix)")
    u.add_argument("pytest_args", nargs="*", help="passed to every pytest (after --)")
    b = sub.add_parser("build", help="DKMS-build the module for each kernel (fresh builds are kept)")
    b.add_argument("kvers", nargs="*")
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("results", help="write build/matrix/results.md")
    r.add_argument("--junit", type=Path, action="append")
    rd = sub.add_parser("readme", help="copy build/matrix/results.md into README.md")
    rd.add_argument("--table", choices=sorted(TABLES), default="matrix",
                    help="long: build/matrix/results-long.md, between the test-long markers")
    sub.add_parser("refresh", help="move the pins of tests/kernel/test-kernels to each release's current kernel")
    args = parser.parse_args(argv)
    if args.cmd == "readme":
        update_readme(args.table)
        return 0
    if args.cmd == "refresh":
        moved = refresh_pins()
        _say(f"{LIST.relative_to(REPO)}: " + ("; ".join(moved) if moved else "every pin is its release's current kernel"))
        return 0
    if args.cmd == "run":
        return run(args.pytest_args, args.kernel_only, args.jobs, args.table)
    if args.cmd == "build":
        failed = []
        for kver in args.kvers or kernels_in_run():
            st = build(kver) if args.force else ensure_built(kver)
            _say(f"{kver} ({st['suite']}, linux-headers {st.get('debian_version') or '?'}): DKMS build "
                 f"{st['dkms']}, {st['compiler']}, signer {st['signer'] or '-'}")
            if st["dkms"] != "ok":
                _say(f"{kver}: the end of {(out_dir(kver) / 'build.log').relative_to(REPO)}:\n" + build_log_tail(kver, 30))
                failed.append(kver)
        return 1 if failed else 0
    print(results(args.junit), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
