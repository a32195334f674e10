"""kmod/Makefile without the kernel's headers: one line naming the package, not kbuild's bare error."""

from __future__ import annotations

import subprocess
from pathlib import Path

KMOD = Path(__file__).resolve().parents[2] / "kmod"


def test_missing_headers_name_the_package_to_install():
    result = subprocess.run(["make", "-s", "-C", str(KMOD), "KVER=0.0.0-not-installed"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "tcpsecrets: no kernel build tree at /lib/modules/0.0.0-not-installed/build: install the headers"
        " (Debian/Ubuntu: apt install linux-headers-0.0.0-not-installed) or set KDIR=")
