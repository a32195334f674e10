"""kmod/ builds with DKMS unchanged (add, build, install, remove), in private trees.

DKMS's --dkmstree/--sourcetree/--installtree keep the host's own DKMS state
and /lib/modules untouched; the kernel headers are the test kernel's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from . import vm

pytestmark = pytest.mark.kernel

KVERS = vm.test_kvers()
VERSION = (vm.REPO / "kmod" / "VERSION").read_text().strip()


def modinfo(ko: Path, field: str) -> str:
    return subprocess.run(["modinfo", "-F", field, str(ko)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("kver", KVERS)
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
    assert modinfo(ko, "version") == VERSION
    assert modinfo(ko, "vermagic").split()[0] == kver
    assert modinfo(ko, "license") == "GPL"
    assert "read_gid" in modinfo(ko, "parm")

    dkms("remove", "-m", "tcpsecrets", "-v", VERSION, "--all")
    assert not ko.exists()


@pytest.mark.parametrize("kver", KVERS)
def test_kbuild_make_with_kver(tmp_path, kver):
    ko = vm.build_module(kver, tmp_path)
    assert modinfo(ko, "version") == VERSION
    assert modinfo(ko, "vermagic").split()[0] == kver
