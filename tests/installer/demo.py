"""`make demo`: the whole system in a VM, as an admin and MITIGATOR see it.

Boots the Debian 12 test image (systemd, its own kernel) under qemu, installs
with `cat mitigator-agent | sh` there, adds a MITIGATOR key with `>>`, then
from this host polls the agent through a forwarded port with OpenSSH (`get`,
the v23.08+ answer) and with `mitigator-agent poll` (`get json`, validated),
and shows `mitigator-agent selftest` in the VM. The VM is powered off at the
end.

    python -m tests.installer.demo dist/mitigator-agent
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .system import DebianSystem

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(sys.executable).with_name("mitigator-agent")


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def show(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        if stream.strip():
            print(stream.rstrip(), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.installer.demo DIST_FILE", file=sys.stderr)
        return 2
    dist = Path(argv[0]).resolve()
    with tempfile.TemporaryDirectory(prefix="mitigator-demo-") as tmp:
        where = Path(tmp)
        key = where / "mitigator1"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitigator1", "-f", str(key)],
                       check=True)
        step("booting Debian 12 (qemu, TCG; about a minute)")
        started = time.monotonic()
        with DebianSystem(workdir=where / "vm") as vm:
            vm.start()
            print(f"up in {time.monotonic() - started:.0f} s: "
                  f"{vm.run('. /etc/os-release && echo $PRETTY_NAME, kernel $(uname -r)').stdout.strip()}")

            step("as root in the VM: cat mitigator-agent | sh")
            vm.put(dist, "/root/mitigator-agent")
            started = time.monotonic()
            result = vm.run("cat /root/mitigator-agent | sh", check=False, timeout=3600)
            show(result)
            if result.returncode != 0:
                print(f"install failed (exit {result.returncode}); console: {vm.console_log}", file=sys.stderr)
                return 1
            print(f"(installed in {time.monotonic() - started:.0f} s)")

            step("as root in the VM: add MITIGATOR's key with >>")
            public = key.with_suffix(".pub").read_text().strip()
            vm.run(f"echo {shlex.quote(public)} >> /opt/mitigator_agent/keys")
            show(vm.run("mitigator-agent keys list"))
            fingerprint = vm.run("ssh-keygen -l -f /opt/mitigator_agent/host.ed25519.pub").stdout.split()[1]

            step(f"from this host, as MITIGATOR: ssh -p {vm.agent_port} mitigator_agent@127.0.0.1 get")
            known_hosts = where / "known_hosts"
            host_public = vm.get("/opt/mitigator_agent/host.ed25519.pub").decode().split()
            known_hosts.write_text(f"[127.0.0.1]:{vm.agent_port} {host_public[0]} {host_public[1]}\n")
            result = subprocess.run(
                ["ssh", "-F", "none", "-i", str(key), "-p", str(vm.agent_port), "-o", "IdentitiesOnly=yes",
                 "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}", "mitigator_agent@127.0.0.1",
                 "get"], capture_output=True, text=True, timeout=300)
            show(result)
            ok = result.returncode == 0

            step(f"from this host: mitigator-agent poll --host-fingerprint {fingerprint}")
            result = subprocess.run(
                [str(AGENT), "poll", "127.0.0.1", "--port", str(vm.agent_port), "--key", str(key),
                 "--host-fingerprint", fingerprint, "--timeout", "120"], capture_output=True, text=True)
            show(result)
            ok &= result.returncode == 0

            step("in the VM: mitigator-agent selftest")
            result = vm.run("mitigator-agent selftest", check=False)
            show(result)
            ok &= result.returncode == 0

            step("in the VM: the agent's log (journalctl -u mitigator-agent)")
            show(vm.run("journalctl -u mitigator-agent --no-pager -n 8 -o cat", check=False))
        step("demo " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
