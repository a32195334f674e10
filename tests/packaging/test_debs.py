"""The .debs as built by ``make deb``: lintian, contents, dependencies, versions.

Fast, no VM: the packages are built once for the module (about 20 s with the
wheels cached), inspected with dpkg-deb, and the agent's launcher runs from an
extracted copy with the package's own site-packages. Installing them in a
booted Debian 12 is the install script's (tests/installer/test_install_script.py:
it has apt install them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.packaging.debs import REPO, Debs, build_debs, build_debs_for_test, supported_pythons, tree_version

pytestmark = pytest.mark.skipif(not Path("/etc/debian_version").exists() or not shutil.which("dpkg-deb"),
                                reason="builds Debian packages: needs a Debian host")

LIB = "usr/lib/mitigator-agent"
SITE = f"{LIB}/site-packages"
# The python3 of each supported release (packaging/pythons), as X.Y: the package serves them all.
PYTHONS = [".".join(python.split(".")[:2]) for python in supported_pythons()]
# The build host's, on which the launcher runs here.
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    return build_debs_for_test(tmp_path_factory)


@pytest.fixture(scope="module")
def extracted(debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Each package's payload, unpacked with dpkg-deb -x."""
    roots = {}
    for name, deb in (("dkms", debs.dkms), ("agent", debs.agent)):
        root = tmp_path_factory.mktemp(f"x-{name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[name] = root
    return roots


def listing(deb: Path) -> Dict[str, str]:
    """path (without the leading ./) -> the dpkg-deb -c line."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True).stdout
    entries = {}
    for line in out.splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0]
        entries[path.removeprefix("./").rstrip("/")] = line
    return entries


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True,
                          text=True).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--info", str(deb), name], check=True, capture_output=True,
                          text=True).stdout


def test_lintian_finds_no_errors_and_no_warnings(debs: Debs) -> None:
    done = subprocess.run(["lintian", "--fail-on", "error,warning", str(debs.dkms), str(debs.agent)],
                          capture_output=True, text=True)
    tags = [line for line in done.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert done.returncode == 0 and not tags, done.stdout + done.stderr


def test_versions_are_kmod_VERSION_with_revision_1(debs: Debs, extracted: Dict[str, Path]) -> None:
    version = tree_version()
    assert field(debs.dkms, "Version") == field(debs.agent, "Version") == f"{version}-1"
    assert (extracted["dkms"] / f"usr/src/tcpsecrets-{version}/VERSION").read_text().strip() == version
    assert (extracted["agent"] / SITE / f"mitigator_agent-{version}.dist-info").is_dir()


def test_agent_depends_on_exactly_its_dkms_package_and_every_supported_python(debs: Debs) -> None:
    depends = [d.strip() for d in field(debs.agent, "Depends").split(",")]
    assert f"tcpsecrets-dkms (= {debs.debian_version})" in depends
    major, last = PYTHONS[-1].split(".")
    assert {f"python3 (>= {PYTHONS[0]}~)", f"python3 (<< {major}.{int(last) + 1}~)"} <= set(depends)
    # the wheels' own glibc symbol versions (manylinux_2_28 at most), not the build host's libc6:
    # Debian 11 has glibc 2.31
    assert [d for d in depends if d.startswith("libc6")] == ["libc6 (>= 2.28)"]
    assert field(debs.agent, "Architecture") == "amd64"
    assert field(debs.dkms, "Architecture") == "all"
    assert re.match(r"dkms( |,|$)", field(debs.dkms, "Depends"))
    assert "linux-headers-amd64" in field(debs.dkms, "Recommends")


def test_dkms_package_holds_the_module_source_beside_its_VERSION(debs: Debs,
                                                                   extracted: Dict[str, Path]) -> None:
    src = f"usr/src/tcpsecrets-{debs.version}"
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "kmod"], check=True, capture_output=True,
                             text=True).stdout.split()
    expected = {f"{src}/{path.removeprefix('kmod/')}" for path in tracked}
    files = {path for path, line in listing(debs.dkms).items()
             if path.startswith(src + "/") and not line.startswith("d")}
    assert files == expected
    shipped = extracted["dkms"] / src
    assert (shipped / "dkms.conf").read_bytes() == (REPO / "kmod/dkms.conf").read_bytes()
    # The hooks that make a kernel without a module loud in apt's output, after DKMS's own.
    hooks = ["/etc/kernel/header_postinst.d/zz-tcpsecrets", "/etc/kernel/postinst.d/zz-tcpsecrets"]
    assert sorted(control_file(debs.dkms, "conffiles").split()) == hooks
    for hook in hooks:
        assert listing(debs.dkms)[hook.lstrip("/")].startswith("-rwxr-xr-x root/root")
        assert (extracted["dkms"] / hook.lstrip("/")).read_bytes() == (REPO / "packaging/system/kernel-hook").read_bytes()
    # DKMS sources dkms.conf: the version it reads is the VERSION file beside it.
    seen = subprocess.run(["bash", "-c", f'. "{shipped}/dkms.conf"; echo "$PACKAGE_NAME $PACKAGE_VERSION"'],
                          check=True, capture_output=True, text=True).stdout.split()
    assert seen == ["tcpsecrets", debs.version]


def test_agent_package_installs_the_documented_layout(debs: Debs, extracted: Dict[str, Path]) -> None:
    entries = listing(debs.agent)
    assert entries[f"{LIB}/mitigator-agent"].startswith("-rwxr-xr-x root/root")
    assert entries["usr/sbin/mitigator-agent"].endswith("-> ../lib/mitigator-agent/mitigator-agent")
    root = extracted["agent"]
    for installed, source in (("lib/systemd/system/mitigator-agent.service", "systemd/mitigator-agent.service"),
                              ("lib/systemd/system/mitigator-agent.socket", "systemd/mitigator-agent.socket"),
                              ("usr/share/mitigator-agent/modules-load.conf", "system/modules-load.conf"),
                              ("usr/share/mitigator-agent/sysctl.conf", "system/sysctl.conf"),
                              ("usr/share/mitigator-agent/modprobe.conf.in", "system/modprobe.conf.in")):
        assert (root / installed).read_bytes() == (REPO / "packaging" / source).read_bytes(), installed
    # The install script, which `mitigator-agent -d` runs: the same file as the one make dist carries.
    assert entries[f"{LIB}/install.sh"].startswith("-rwxr-xr-x root/root")
    assert (root / LIB / "install.sh").read_bytes() == (REPO / "installer" / "mitigator-agent.sh").read_bytes()
    # The man page (the unit's Documentation=) and the completion, from the packaged CLI itself.
    assert ".TH" in subprocess.run(["zcat", str(root / "usr/share/man/man8/mitigator-agent.8.gz")],
                                   check=True, capture_output=True, text=True).stdout
    assert "_MITIGATOR_AGENT_COMPLETE" in \
        (root / "usr/share/bash-completion/completions/mitigator-agent").read_text()
    # No conffiles: what postinst writes into /etc acts on the system, and a remove takes it away.
    assert not [path for path in entries if path.startswith("etc")]
    owners = {line.split()[1] for line in entries.values()}
    assert owners == {"root/root"}
    # /opt, the keys and the host key are the postinst's, never files of the package.
    assert not [path for path in entries if path.startswith("opt") or "modprobe.d" in path]


def test_payload_has_no_bytecode_scripts_or_build_paths(debs: Debs, extracted: Dict[str, Path]) -> None:
    paths: List[str] = list(listing(debs.agent)) + list(listing(debs.dkms))
    assert not [p for p in paths if "__pycache__" in p or p.endswith((".pyc", ".pyo"))]
    assert not [p for p in paths if p.startswith(f"{SITE}/bin")]
    assert not [p for p in paths if p.endswith("direct_url.json")]
    needles = [str(debs.build_dir).encode(), str(REPO).encode()]
    for root in extracted.values():
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not [n for n in needles if n in data], f"{path.relative_to(root)} names the build"


def test_the_tree_has_every_supported_pythons_extension_modules(debs: Debs, extracted: Dict[str, Path]) -> None:
    lib = extracted["agent"] / LIB
    assert (lib / "pythons").read_text().split() == PYTHONS
    overlays = sorted(p.name for p in lib.glob("site-packages-*"))
    assert set(overlays) <= {f"site-packages-{python}" for python in PYTHONS}, overlays

    def modules(python: str) -> set:
        tag = f".cpython-{python.replace('.', '')}-x86_64-linux-gnu.so"
        found = set()
        for tree in (lib / "site-packages", lib / f"site-packages-{python}"):
            found |= {str(p.relative_to(tree)).removesuffix(tag) for p in tree.rglob(f"*{tag}")}
        return found

    # each Python finds the same extension modules, built for it (cffi's backend, siphash24, ...)
    assert modules(PYTHONS[0]) >= {"_cffi_backend", "siphash24"}
    assert all(modules(python) == modules(PYTHONS[0]) for python in PYTHONS), {p: modules(p) for p in PYTHONS}
    # the bytecode of the python3 of the day: compiled at install and when a release upgrade moves it
    hook = "usr/share/python3/runtime.d/mitigator-agent.rtupdate"
    assert listing(debs.agent)[hook].startswith("-rwxr-xr-x root/root")


def test_launcher_refuses_a_python_the_tree_does_not_serve(extracted: Dict[str, Path], tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    shutil.copytree(extracted["agent"] / LIB, lib, symlinks=True)
    (lib / "pythons").write_text("3.9\n")
    result = subprocess.run([PYTHON, "-I", "-S", str(lib / "mitigator-agent"), "--version"], capture_output=True,
                            text=True)
    running = subprocess.run([PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"mitigator-agent: this package runs on python3 3.9; {PYTHON} is {running}: install"
                             f" the mitigator-agent package made for this release\n")


def test_launcher_runs_on_the_packaged_wheels_alone(debs: Debs, extracted: Dict[str, Path],
                                                     tmp_path: Path) -> None:
    launcher = extracted["agent"] / LIB / "mitigator-agent"
    # -S: the system's dist-packages stay out (asyncssh would import a python3-openssl found there)
    assert launcher.read_text().startswith("#!/usr/bin/python3 -IS\n")
    # -S: not even the host's dist-packages; everything imported comes from the package.
    run = [PYTHON, "-I", "-S", str(launcher)]
    version = subprocess.run(run + ["--version"], check=True, capture_output=True, text=True).stdout
    assert version.strip() == f"mitigator-agent, version {debs.version}"
    # The bundled cryptography and asyncssh at work: a host key ssh-keygen agrees with.
    key = tmp_path / "host.ed25519"
    printed = subprocess.run(run + ["host-key", "--host-key", str(key)], check=True, capture_output=True,
                             text=True).stdout.split()
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], check=True, capture_output=True,
                            text=True).stdout.split()
    assert printed[:2] == keygen[:2] and printed[1].startswith("SHA256:")
    assert not list((extracted["agent"] / SITE).rglob("__pycache__")), "the launcher wrote bytecode"


def test_maintainer_scripts_are_valid_posix_sh(debs: Debs, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(debs.agent), str(tmp_path / "control")], check=True)
    for script in ("preinst", "postinst", "prerm", "postrm"):
        subprocess.run(["dash", "-n", str(tmp_path / "control" / script)], check=True)


def test_another_version_builds_without_editing_the_tree(tmp_path: Path) -> None:
    before = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], check=True,
                            capture_output=True, text=True).stdout
    other = ".".join(tree_version().split(".")[:-1] + [str(int(tree_version().split(".")[-1]) + 1)])
    higher = build_debs(tmp_path, other)
    assert field(higher.agent, "Version") == f"{other}-1"
    assert f"tcpsecrets-dkms (= {other}-1)" in field(higher.agent, "Depends")
    assert f"./usr/src/tcpsecrets-{other}/VERSION" in "\n".join(listing(higher.dkms).values())
    assert subprocess.run(["dpkg", "--compare-versions", f"{other}-1", "gt", f"{tree_version()}-1"]).returncode == 0
    after = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], check=True,
                           capture_output=True, text=True).stdout
    assert after == before
