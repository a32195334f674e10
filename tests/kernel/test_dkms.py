"""kmod/ builds with DKMS, signed, for every kernel of the matrix, and makes no indirect call.

Per matrix kernel: DKMS (add, build, install) in a debootstrap chroot of that
kernel's Debian release, with that release's compiler, DKMS and headers, and
DKMS's module signing on (tests/kernel/matrix.py, matrix-chroot.sh). The
built module is kept at build/matrix/KVER/tcpsecrets.ko for the guests.

On the host (its own release's kernels only): DKMS in private trees (add,
build, install, remove) and plain kbuild with KVER=.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from . import matrix, vm

pytestmark = pytest.mark.kernel

KVERS = vm.test_kvers()
HOST_KVERS = vm.host_kvers()
VERSION = (vm.REPO / "kmod" / "VERSION").read_text().strip()


def built(kver: str) -> Path:
    """The DKMS-built module for kver; fails the test with the build log if it does not build."""
    try:
        return matrix.module(kver)
    except matrix.BuildFailed as e:
        pytest.fail(str(e), pytrace=False)


# --- every matrix kernel, built in its release's chroot -----------------------

@pytest.mark.parametrize("kver", KVERS)
def test_dkms_build_in_release_chroot(kver):
    ko = built(kver)
    st = matrix.status(kver)
    assert st is not None and st["dkms"] == "ok"
    log = (matrix.out_dir(kver) / "build.log").read_text()
    assert "dkms install" in log and ": installed" in log, log[-3000:]
    assert matrix.modinfo(ko, "version") == VERSION
    assert matrix.modinfo(ko, "vermagic").split()[0] == kver
    assert matrix.modinfo(ko, "license") == "GPL"
    assert "read_gid" in matrix.modinfo(ko, "parm")


@pytest.mark.parametrize("kver", KVERS)
def test_dkms_signed_the_module(kver):
    """DKMS signed it with its MOK key: modinfo's signer is that certificate's subject."""
    ko = built(kver)
    cert = matrix.out_dir(kver) / "signing-cert.der"
    assert cert.exists(), "no signing certificate found in the chroot (/var/lib/dkms/mok.pub)"
    subject = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(cert), "-noout", "-subject",
         "-nameopt", "multiline"], capture_output=True, text=True, check=True).stdout
    serial = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(cert), "-noout", "-serial"],
        capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    signer = matrix.modinfo(ko, "signer")
    assert signer, f"{ko} is not signed"
    assert f"commonName                = {signer}" in subject, (signer, subject)
    assert matrix.modinfo(ko, "sig_key").replace(":", "").lstrip("0") == serial.lstrip("0").upper()
    assert matrix.modinfo(ko, "sig_id") == "PKCS#7"


# The signature sign-file appends: PKCS#7 (CMS) DER, then struct module_signature
# (12 bytes, big-endian sig_len last), then this marker.
SIGNATURE_MARKER = b"~Module signature appended~\n"


def split_signature(ko: bytes) -> tuple[bytes, bytes]:
    """(the signed module contents, its detached PKCS#7 signature)."""
    assert ko.endswith(SIGNATURE_MARKER), "no appended module signature"
    info = ko[-len(SIGNATURE_MARKER) - 12:-len(SIGNATURE_MARKER)]
    algo, hash_algo, id_type, signer_len, key_id_len, _pad, sig_len = struct.unpack(">BBBBB3sI", info)
    assert id_type == 2, f"signature id_type {id_type}, expected 2 (PKCS#7)"
    end = len(ko) - len(SIGNATURE_MARKER) - 12
    return ko[:end - sig_len], ko[end - sig_len:end]


def signature_verifies(contents: bytes, signature: bytes, cert_der: Path, work: Path) -> bool:
    """openssl checks the detached signature over `contents` against DKMS's certificate."""
    (work / "contents").write_bytes(contents)
    (work / "sig.p7").write_bytes(signature)
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(cert_der),
                    "-out", str(work / "cert.pem")], check=True)
    return subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(work / "sig.p7"),
         "-content", str(work / "contents"), "-certfile", str(work / "cert.pem"), "-noverify",
         "-out", "/dev/null"], capture_output=True).returncode == 0


@pytest.mark.parametrize("kver", KVERS)
def test_dkms_signature_verifies_with_its_key(tmp_path, kver):
    """The appended signature is DKMS's key's over these exact bytes: what a Secure Boot
    kernel checks once that key is enrolled (a flipped byte makes it fail)."""
    contents, signature = split_signature(built(kver).read_bytes())
    cert = matrix.out_dir(kver) / "signing-cert.der"
    assert signature_verifies(contents, signature, cert, tmp_path)
    tampered = bytearray(contents)
    tampered[len(tampered) // 2] ^= 0x01
    assert not signature_verifies(bytes(tampered), signature, cert, tmp_path)


@pytest.mark.parametrize("kver", KVERS)
def test_no_indirect_calls(kver):
    """No indirect call or jump, and no call through a retpoline/indirect thunk, anywhere in the .ko."""
    found = matrix.indirect_branches(built(kver))
    assert not found, "indirect branches in the module:\n" + "\n".join(found)


def test_indirect_call_check_finds_them(tmp_path):
    """The check above sees an indirect call, plain and as a retpoline thunk call."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = tmp_path / "f.c"
    src.write_text("int (*volatile fp)(int);\nint f(int x) { return fp(x) + 1; }\n")
    plain = tmp_path / "plain.o"
    thunk = tmp_path / "thunk.o"
    subprocess.run(["gcc", "-O2", "-c", str(src), "-o", str(plain)], check=True)
    subprocess.run(["gcc", "-O2", "-mindirect-branch=thunk-extern", "-c", str(src),
                    "-o", str(thunk)], check=True)
    assert any("call" in line and "*" in line for line in matrix.indirect_branches(plain))
    assert any("__x86_indirect_thunk" in line for line in matrix.indirect_branches(thunk))


# --- the host's own release, with the host's DKMS and headers ----------------

@pytest.mark.parametrize("kver", HOST_KVERS)
def test_dkms_add_build_install_remove(tmp_path, kver):
    if shutil.which("dkms") is None:
        pytest.fail("dkms is not installed: run tests/provision-host.sh")
    if not Path(f"/lib/modules/{kver}/build").exists():
        pytest.fail(f"headers for {kver} are not installed: run tests/provision-host.sh {kver}")
    trees = {name: tmp_path / name for name in ("dkms", "src", "install")}
    for path in trees.values():
        path.mkdir()
    (trees["install"] / kver).mkdir()
    source = tmp_path / "tcpsecrets"
    shutil.copytree(vm.REPO / "kmod", source, ignore=shutil.ignore_patterns(
        "*.o", "*.ko", "*.mod*", ".*.cmd", "*.order", "*.symvers"))
    opts = ["--dkmstree", str(trees["dkms"]), "--sourcetree", str(trees["src"]),
            "--installtree", str(trees["install"])]

    def dkms(*args: str) -> str:
        result = subprocess.run(["dkms", *args, *opts], capture_output=True, text=True)
        assert result.returncode == 0, f"dkms {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    dkms("add", str(source))
    assert (trees["src"] / f"tcpsecrets-{VERSION}" / "dkms.conf").exists()
    dkms("build", "-m", "tcpsecrets", "-v", VERSION, "-k", kver)
    dkms("install", "-m", "tcpsecrets", "-v", VERSION, "-k", kver)
    assert f"tcpsecrets/{VERSION}, {kver}, x86_64: installed" in dkms("status")

    ko = trees["install"] / kver / "updates" / "dkms" / "tcpsecrets.ko"
    assert matrix.modinfo(ko, "version") == VERSION
    assert matrix.modinfo(ko, "vermagic").split()[0] == kver
    assert matrix.modinfo(ko, "license") == "GPL"
    assert "read_gid" in matrix.modinfo(ko, "parm")

    dkms("remove", "-m", "tcpsecrets", "-v", VERSION, "--all")
    assert not ko.exists()


@pytest.mark.parametrize("kver", HOST_KVERS)
def test_kbuild_make_with_kver(tmp_path, kver):
    ko = vm.kbuild_on_host(kver, tmp_path)
    assert matrix.modinfo(ko, "version") == VERSION
    assert matrix.modinfo(ko, "vermagic").split()[0] == kver
