"""One anycast server in a booted test kernel, driven by tests/kernel/test_anycast.py.

Two guests run this at once, booted about a minute apart (so their uptimes,
and the stock jiffies cookie counters, differ). Each loads the module, runs
the agent as nobody with the anycast `set` enabled for instance `mitigator1`,
and then:
- `first`: receives MITIGATOR's `set` over OpenSSH (after checking that a
  disabled instance, a malformed set and a stranger change nothing) and
  hands the agent's stored set to the host, as a disk would keep it;
- `second` (the rebooted server): gets that stored set back before its agent
  starts, and its first poll must already answer the set's secrets.
Both then wait for the host's go, send the same SYN at the same wall-clock
moment, and report the SYN-ACK ISN, what the v23.08 emulator (fed by their
own `get`) predicts, and whether the emulator's cookie ACK opens a
connection. Results go to $ANYCAST_DIR/<role>.json; the host compares.

Usage: python -m tests.kernel.guest.anycast_server first|second
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scapy.layers.inet import TCP

from mitigator_agent.snapshot import read_snapshot
from tests.emulators import MitigatorV2308

from . import packets
from .conftest import agent_home, load, sysctl
from .test_agent_in_guest import AGENT, ssh, wait_for_port

NOBODY, READER_GID, WRITER_GID = 65534, 4242, 4243
SHARED = Path(os.environ.get("ANYCAST_DIR", "/nonexistent"))
LISTEN_PORT = 18100
SYN_SPORT, SYN_ISN = 42000, 287454020
SET_VALUES = dict(  # what MITIGATOR copies from one server to the others
    net="01eb628ac0792a5f99b1e469590195b0",
    syncookie="3ee73aa8718c1fd7092b2e780fd78f8a8487fd2cdb43aa9971e0304d343662f8",
    syncookie6="ddaea584a709a2aa82d5aa5c2757f70f81e1604e89d08de238232e8345dd05e3",
    ts="3f6bf3326dda3569cdd7dac7a541e71b",
    ecn=2, sack=1, timestamps=1, wscale=1,
)
SET_COMMAND = "set;{net};{syncookie};{syncookie6};{ts};{ecn};{sack};{timestamps};{wscale}".format(**SET_VALUES)


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def keypair(home: Path, name: str) -> Path:
    key = home / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def start_agent(home: Path, state: Path) -> tuple[int, subprocess.Popen, Path]:
    keys = home / "keys"
    keys.write_text("".join((home / f"{n}.pub").read_text() for n in ("mitigator1", "mitigator2")))
    os.chmod(keys, 0o600)
    os.chown(keys, NOBODY, NOBODY)
    log = home / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(AGENT), "serve", "--listen", "127.0.0.1", "--port", "0", "--keys", str(keys),
             "--host-key", str(home / "host.ed25519"), "--device", "/dev/tcpsecrets",
             "--anycast-instance", "mitigator1", "--state-dir", str(state)],
            user=NOBODY, group=NOBODY, extra_groups=[READER_GID, WRITER_GID],
            stdout=out, stderr=subprocess.STDOUT)
    return wait_for_port(proc, log), proc, log


def get_fields(port: int, key: Path) -> dict[str, str]:
    answer = ssh(port, key, "get")
    assert answer.returncode == 0, answer.stderr
    return dict(line.split(": ", 1) for line in answer.stdout.splitlines())


def set_refusals_change_nothing(port: int, home: Path) -> list[str]:
    """A set from a disabled instance, a malformed one: refused, nothing changed."""
    problems = []
    before = get_fields(port, home / "mitigator1")
    for key, command in (("mitigator2", SET_COMMAND),                       # instance not allowed
                         ("mitigator1", SET_COMMAND.rsplit(";", 1)[0]),     # 7 arguments
                         ("mitigator1", SET_COMMAND.replace(";2;1;1;1", ";3;1;1;1")),  # ECN 3
                         ("mitigator1", SET_COMMAND.replace(SET_VALUES["net"], "zz" * 16))):
        refused = ssh(port, home / key, command)
        if refused.returncode == 0:
            problems.append(f"accepted: {key} {command[:12]}...")
    after = get_fields(port, home / "mitigator1")
    for name in ("net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret"):
        if before[name] != after[name]:
            problems.append(f"{name} changed by a refused set")
    return problems


def main(role: str) -> None:
    result: dict[str, object] = {"role": role}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    load(f"read_gid={READER_GID}", f"write_gid={WRITER_GID}")
    sysctl("tcp_syncookies", 2)
    home = agent_home("anycast-")
    for name in ("mitigator1", "mitigator2"):
        keypair(home, name)
    state = home / "state"
    if role == "second":
        shutil.copytree(SHARED / "stored-state", state)  # the disk that survived the reboot
        for path in [state, *state.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
    else:
        state.mkdir(mode=0o700)
        os.chown(state, NOBODY, NOBODY)
    port, agent, log = start_agent(home, state)

    if role == "first":
        result["refusal_problems"] = set_refusals_change_nothing(port, home)
        applied = ssh(port, home / "mitigator1", SET_COMMAND)
        result["set_status"] = applied.returncode
        result["set_stderr"] = applied.stderr
        shutil.copytree(state, SHARED / "stored-state")
        stored = [p for p in state.rglob("*") if p.is_file()]
        result["stored_modes"] = [oct(p.stat().st_mode & 0o777) for p in stored]
    fields = get_fields(port, home / "mitigator1")  # on `second`, its very first poll
    result["get"] = fields
    result["log_has_secret"] = any(v in log.read_text() for v in SET_VALUES.values() if isinstance(v, str))

    # Wait for the go: both servers send the same SYN at the same wall-clock moment.
    (SHARED / f"{role}.ready").write_text(str(uptime()))
    # The host gives the other guest as long to get ready (ANYCAST_GO_TIMEOUT, from the host's own
    # wait): on a loaded host the second boot alone can take many minutes under TCG.
    deadline = time.monotonic() + float(os.environ["ANYCAST_GO_TIMEOUT"])
    while not (SHARED / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not (SHARED / "go").exists():
        sys.exit(f"{role}: no go from the host within {os.environ['ANYCAST_GO_TIMEOUT']} s")
    at = float((SHARED / "go").read_text())
    while time.time() < at:
        time.sleep(0.01)
    emulator = MitigatorV2308.from_get("".join(f"{k}: {v}\n" for k, v in fields.items()))
    src, dst = packets.client_address(4), packets.loopback(4)
    with packets.listener(4, LISTEN_PORT), packets.capture() as cap:
        before = time.time_ns()
        packets.send(packets.segment(src, dst, SYN_SPORT, LISTEN_PORT, flags="S", seq=SYN_ISN,
                                     options=[("MSS", 1460)]), dst)
        synack = packets.wait_for(cap, 4, SYN_SPORT)
        after = time.time_ns()
    snap = read_snapshot("/dev/tcpsecrets")
    result.update(
        uptime=uptime(),
        stock_counter=snap.jiffies64 // (60 * snap.hz),  # what a stock kernel would use now
        synack_isn=synack[TCP].seq if synack is not None else None,
        predicted=sorted({emulator.cookie(src, dst, SYN_SPORT, LISTEN_PORT, SYN_ISN, 1460, t)
                          for t in (before, after)}),
        wall_minute=before // (60 * 10**9),
    )
    with packets.listener(4) as fresh:
        sport = packets.random_port()
        cookie = emulator.cookie(src, dst, sport, fresh.getsockname()[1], 7, 1460, time.time_ns())
        packets.send(packets.segment(src, dst, sport, fresh.getsockname()[1], flags="A", seq=8,
                                     ack=(cookie + 1) & 0xFFFFFFFF), dst)
        result["cookie_ack_accepted"] = packets.accepts(fresh)
    agent.terminate()
    agent.wait(timeout=30)
    (SHARED / f"{role}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
