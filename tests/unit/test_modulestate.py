"""modulestate.diagnose on real directory trees laid out as /lib/modules is after each kind of kernel update."""

from __future__ import annotations

from pathlib import Path

import pytest

from mitigator_agent import modulestate

KERNEL = "6.1.0-57-amd64"


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    root = tmp_path / "modules"
    (root / "6.1.0-50-amd64" / "updates" / "dkms").mkdir(parents=True)
    (root / "6.1.0-50-amd64" / "updates" / "dkms" / "tcpsecrets.ko").write_bytes(b"\x7fELF")  # the old kernel's
    (root / KERNEL / "kernel").mkdir(parents=True)
    return root


def test_no_headers_names_the_package_to_install(modules):
    absence = modulestate.diagnose(KERNEL, str(modules))
    assert (absence.kind, absence.kernel) == ("no-headers", KERNEL)
    assert absence.sentence == (f"tcpsecrets is not built for kernel {KERNEL}: its headers (linux-headers-{KERNEL})"
                                " are not installed, so DKMS could not build it")
    assert absence.remedy.startswith(f"run apt install linux-headers-{KERNEL} (DKMS then builds tcpsecrets)")


def test_headers_without_a_build_asks_dkms_for_this_kernel(modules):
    (modules / KERNEL / "build").mkdir()
    absence = modulestate.diagnose(KERNEL, str(modules))
    assert absence.kind == "not-built"
    assert absence.remedy.startswith(f"run dkms autoinstall -k {KERNEL} && modprobe tcpsecrets")


@pytest.mark.parametrize("where", ["updates/dkms/tcpsecrets.ko", "updates/tcpsecrets.ko.xz", "extra/tcpsecrets.ko.zst"])
def test_a_built_module_that_is_not_loaded(modules, where):
    path = modules / KERNEL / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    absence = modulestate.diagnose(KERNEL, str(modules))
    assert absence.kind == "not-loaded"
    assert absence.sentence == f"tcpsecrets is built for kernel {KERNEL} ({path}) but not loaded"
    assert absence.remedy == "run modprobe tcpsecrets (if it fails, dmesg says why)"


def test_a_module_of_another_name_is_not_ours(modules):
    (modules / KERNEL / "build").mkdir()
    (modules / KERNEL / "updates").mkdir()
    (modules / KERNEL / "updates" / "tcpsecrets_old.ko").write_bytes(b"")
    assert modulestate.diagnose(KERNEL, str(modules)).kind == "not-built"


def test_unreadable_modules_root_is_unknown_with_both_remedies(tmp_path):
    # what the agent's own service sees: ProtectKernelModules= hides /lib/modules
    absence = modulestate.diagnose(KERNEL, str(tmp_path / "hidden"))
    assert absence.kind == "unknown"
    assert absence.sentence == f"tcpsecrets is not loaded on kernel {KERNEL}"
    assert f"install linux-headers-{KERNEL} and run dkms autoinstall -k {KERNEL}" in absence.remedy


def test_the_running_kernel_and_root_are_the_defaults(modules, monkeypatch):
    monkeypatch.setattr(modulestate, "MODULES_ROOT", str(modules))
    monkeypatch.setattr(modulestate, "running_kernel", lambda: "6.1.0-50-amd64")
    absence = modulestate.diagnose()
    assert (absence.kind, absence.kernel) == ("not-loaded", "6.1.0-50-amd64")
