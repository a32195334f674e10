"""Anycast: two servers with different uptimes, one `set`, the same cookies.

Boots the same kernel twice at once, the second about 75 s after the first
(so the stock jiffies counters of the two differ), each running
guest/anycast_server.py. The first receives MITIGATOR's `set` through its
agent; the second is "the first, rebooted": it starts from the stored set
alone, and its first poll must already carry the set's secrets. Then both
answer the same SYN at the same wall-clock moment: each SYN-ACK must carry
the cookie the v23.08 emulator computes from the set, and so the same ISN;
and each accepts the emulator's cookie ACK on a fresh listener.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from . import vm

pytestmark = pytest.mark.kernel

SECOND_BOOT_DELAY = 75  # seconds after the first boot: > 60 s apart in uptime
READY_TIMEOUT = 900
# How long a ready guest waits for the go: the first waits for the second's delayed boot, then for
# its readiness.
GO_TIMEOUT = SECOND_BOOT_DELAY + READY_TIMEOUT + 120
KVERS = vm.test_kvers()


def boot(kver: str, ko: Path, shared: Path, role: str, results: dict) -> None:
    results[role] = vm.run_in_guest(
        kver, f"{sys.executable} -m tests.kernel.guest.anycast_server {role}",
        rwdirs=[shared],
        env={**vm.guest_env(kver, ko), "ANYCAST_DIR": str(shared), "ANYCAST_GO_TIMEOUT": str(GO_TIMEOUT)})


def wait_for(path: Path, results: dict, role: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not path.exists():
        if role in results:
            pytest.fail(f"the {role} guest ended before it was ready:\n{results[role].stdout[-6000:]}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.5)


def go_time() -> float:
    """A moment a few seconds ahead, not in the last 10 s of a wall-clock minute."""
    at = time.time() + 4
    if at % 60 > 50:
        at += 60 - at % 60 + 1
    return at


@pytest.mark.parametrize("kver", KVERS)
def test_two_servers_one_set_same_cookies(kver: str, tmp_path: Path) -> None:
    ok, why = vm.can_boot()
    if not ok:
        pytest.skip(why)
    ko = vm.build_module(kver)
    shared = tmp_path / "shared"
    shared.mkdir()
    results: dict = {}
    first = threading.Thread(target=boot, args=(kver, ko, shared, "first", results))
    first.start()
    launched = time.monotonic()
    wait_for(shared / "first.ready", results, "first")
    time.sleep(max(0.0, SECOND_BOOT_DELAY - (time.monotonic() - launched)))
    second = threading.Thread(target=boot, args=(kver, ko, shared, "second", results))
    second.start()
    wait_for(shared / "second.ready", results, "second")
    (shared / "go").write_text(str(go_time()))
    first.join()
    second.join()

    outcome = {}
    for role in ("first", "second"):
        report = shared / f"{role}.json"
        assert report.exists(), f"no report from the {role} guest:\n{results[role].stdout[-6000:]}"
        outcome[role] = json.loads(report.read_text())
    one, two = outcome["first"], outcome["second"]

    assert one["refusal_problems"] == [], one["refusal_problems"]
    assert one["set_status"] == 0, one["set_stderr"]
    assert one["stored_modes"] and set(one["stored_modes"]) == {"0o600"}
    # the rebooted server's very first poll already answers the stored set
    for name in ("net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret"):
        assert one["get"][name] == two["get"][name], name
    assert not one["log_has_secret"] and not two["log_has_secret"]
    # different uptimes: a stock kernel would count differently ...
    assert one["stock_counter"] != two["stock_counter"], (one["uptime"], two["uptime"])
    # ... yet the same SYN gets the same, predicted, wall-clock cookie from both
    assert one["wall_minute"] == two["wall_minute"]
    assert one["synack_isn"] is not None and one["synack_isn"] in one["predicted"]
    assert two["synack_isn"] is not None and two["synack_isn"] in two["predicted"]
    assert one["synack_isn"] == two["synack_isn"]
    assert one["cookie_ack_accepted"] and two["cookie_ack_accepted"]
