"""Functions of the install script run by sh on their own (the system tests run the whole script)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "installer" / "mitigator-agent.sh"


def function(name: str) -> str:
    """The text of one shell function of the script, from its `name() {` line to the closing `}`."""
    text = SCRIPT.read_text()
    match = (re.search(rf"^{name}\(\) {{ .* }}\n", text, re.M)  # a one-line function
             or re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.M | re.S))
    assert match, f"no function {name} in {SCRIPT}"
    return match.group(0)


def call(functions: list[str], line: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    program = "".join(function(f) for f in functions) + line + "\n"
    return subprocess.run(["sh", "-c", program], capture_output=True, text=True, env=env or {"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("release, flavour", [
    ("6.1.0-57-amd64", "amd64"),                # Debian 12
    ("6.12.118+deb13-amd64", "amd64"),          # Debian 13: no ABI number
    ("5.10.0-32-cloud-amd64", "cloud-amd64"),   # Debian's other flavours
    ("6.1.0-57-rt-amd64", "rt-amd64"),
    ("5.15.0-91-generic", "generic"),           # Ubuntu
    ("6.8.0-45-generic-64k", "generic-64k"),
    ("6.18.44", ""),                            # a kernel built by hand: no metapackage to follow
])
def test_kernel_flavour(release, flavour):
    result = call(["kernel_flavour"], f"kernel_flavour {release}")
    assert (result.returncode, result.stdout) == (0, flavour + "\n" if flavour else "")


def test_the_headers_metapackage_follows_the_running_kernel():
    functions = ["kernel_release", "kernel_flavour", "headers_metapackage"]
    result = call(functions, "headers_metapackage", {"PATH": "/usr/bin:/bin", "MITIGATOR_AGENT_KERNEL": "6.1.0-50-amd64"})
    assert result.stdout == "linux-headers-amd64\n"
    hand_built = call(functions, "headers_metapackage", {"PATH": "/usr/bin:/bin", "MITIGATOR_AGENT_KERNEL": "6.18.44"})
    assert (hand_built.returncode, hand_built.stdout) == (1, "")
