"""Why the tcpsecrets module is not loaded on the running kernel, as a value with its remedy.

After a kernel update the module is only there if DKMS built it for the new
kernel, which needs that kernel's headers. ``diagnose`` looks at what the
running kernel has under /lib/modules and names the cause:

``not-loaded``
    a built module is installed for this kernel, but nothing loaded it
    (modprobe failed at boot, or the modules-load.d file is gone);
``not-built``
    the kernel's headers are there, DKMS's build for it is not (a build that
    failed, or DKMS never ran for this kernel);
``no-headers``
    the kernel's headers are not installed, so DKMS could not build it (the
    usual cause after a kernel update without the headers metapackage);
``unknown``
    /lib/modules cannot be read (the agent's own service cannot: systemd's
    ProtectKernelModules= hides it), so only root's ``check`` can tell.

Every remedy names the kernel: the admin types it as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

MODULE = "tcpsecrets"
MODULES_ROOT = "/lib/modules"
# Where DKMS installs the module (dkms.conf's DEST_MODULE_LOCATION) and where other builds put theirs.
MODULE_DIRS = ("updates", "extra")
MODULE_FILES = tuple(f"{MODULE}.ko{suffix}" for suffix in ("", ".xz", ".zst", ".gz"))


@dataclass(frozen=True)
class ModuleAbsence:
    """The cause (`kind`, see the module's docstring), on which kernel, in a sentence, and the remedy."""

    kind: str
    kernel: str
    sentence: str
    remedy: str


def running_kernel() -> str:
    """The running kernel's release (``uname -r``)."""
    return os.uname().release


def _installed_module(kernel_dir: str) -> Optional[str]:
    """The path of a tcpsecrets module file installed for the kernel of `kernel_dir`, if any."""
    for sub in MODULE_DIRS:
        for where, _dirs, files in os.walk(os.path.join(kernel_dir, sub)):
            for name in MODULE_FILES:
                if name in files:
                    return os.path.join(where, name)
    return None


def diagnose(kernel: Optional[str] = None, modules_root: Optional[str] = None) -> ModuleAbsence:
    """Why tcpsecrets is not loaded on `kernel` (default: the running one), judged from `modules_root`
    (default: MODULES_ROOT)."""
    kernel = kernel or running_kernel()
    modules_root = modules_root or MODULES_ROOT
    headers = f"linux-headers-{kernel}"
    build = f"dkms autoinstall -k {kernel} && modprobe {MODULE}"
    kernel_dir = os.path.join(modules_root, kernel)
    try:
        os.listdir(modules_root)
    except OSError:
        return ModuleAbsence(
            "unknown", kernel, f"{MODULE} is not loaded on kernel {kernel}",
            f"run modprobe {MODULE}; if it is not found, install {headers} and run {build}"
            " (as root, `mitigator-agent check` says which is needed)")
    found = _installed_module(kernel_dir)
    if found is not None:
        return ModuleAbsence(
            "not-loaded", kernel, f"{MODULE} is built for kernel {kernel} ({found}) but not loaded",
            f"run modprobe {MODULE} (if it fails, dmesg says why)")
    if os.path.isdir(os.path.join(kernel_dir, "build")):
        return ModuleAbsence(
            "not-built", kernel,
            f"{MODULE} is not built for kernel {kernel} (its headers are installed; DKMS's build is missing or failed)",
            f"run {build} (a failed build leaves its make.log under /var/lib/dkms/{MODULE})")
    return ModuleAbsence(
        "no-headers", kernel,
        f"{MODULE} is not built for kernel {kernel}: its headers ({headers}) are not installed, so DKMS could not build it",
        f"run apt install {headers} (DKMS then builds {MODULE}), then modprobe {MODULE}; keep your kernel"
        " flavour's headers metapackage (e.g. linux-headers-amd64) installed, so that every kernel update brings"
        " its headers")
