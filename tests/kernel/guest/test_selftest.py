"""`mitigator-agent selftest` in a booted kernel: it passes where MITIGATOR's cookies work, fails where not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mitigator_agent import selftest

from .conftest import DEVICE

AGENT = Path(sys.executable).with_name("mitigator-agent")

PASSED = [
    "ok   IPv4 cookie SYN-ACK = the cookie computed from the agent's answer",
    "ok   IPv4 cookie ACK for a SYN the kernel never saw opened a connection",
    "ok   IPv6 cookie SYN-ACK = the cookie computed from the agent's answer",
    "ok   IPv6 cookie ACK for a SYN the kernel never saw opened a connection",
]


def test_selftest_passes_with_the_installed_setup(tcpsecrets, syncookies):
    tcpsecrets("read_gid=0")
    syncookies(2)
    result = subprocess.run([str(AGENT), "selftest"], capture_output=True, text=True, timeout=600)
    assert (result.returncode, result.stdout.splitlines(), result.stderr) == (0, PASSED, "")


def test_selftest_fails_each_check_in_jiffies_mode(tcpsecrets, syncookies):
    # the stock counter: MITIGATOR v23.08's wall-clock cookies are neither sent nor accepted
    tcpsecrets("cookie_clock=jiffies")
    syncookies(2)
    results = selftest.run(str(DEVICE))
    assert [result.ok for result in results] == [False, False, False, False]
    assert results[0].text.startswith("IPv4 cookie SYN-ACK: the kernel's cookie differs")
    assert results[1].text.startswith("IPv4 cookie ACK: a valid cookie ACK did not open a connection")


def test_selftest_names_the_missing_precondition(tcpsecrets, syncookies):
    tcpsecrets()
    syncookies(1)
    assert selftest.run(str(DEVICE)) == [selftest.Result(
        False, "tcp_syncookies is 1, MITIGATOR needs 2: run sysctl -w net.ipv4.tcp_syncookies=2")]
    subprocess.run(["rmmod", "tcpsecrets"], check=True)
    assert selftest.run(str(DEVICE)) == [selftest.Result(
        False, f"module: tcpsecrets is not loaded (no {DEVICE}): run modprobe tcpsecrets")]
