"""`make bench`: the agent's `get` over SSH against a reference and a floor, and a soak.

    python bench/bench.py [--polls N] [--seconds S] [--soak N] [--parallel N]

Three servers run at once on 127.0.0.1, serving the same answer bytes:

- agent: ``mitigator-agent serve`` (this checkout), a snapshot file as its
  device, the client key listed with from="127.0.0.1" (MITIGATOR's
  admission, so the per-source rate limit stays out of the way);
- reference: OpenSSH's sshd with the key's ForceCommand ``cat`` of the
  answer, as the public agents serve it (a shell and cat per poll).  Run
  from its own config on a free port, in a private mount namespace that
  gives it its privilege-separation user and /run/sshd without touching
  the host; if the host has no sshd, Debian's openssh-server package is
  downloaded and unpacked into build/bench/openssh (nothing installed).
  Needs root;
- floor: a bare asyncssh server with default settings writing the same
  bytes (bench/floor_server.py): what any asyncssh agent starts from.

Measured, per server, with the same clients: OpenSSH-client polls on a new
connection each (sequential: latency p50/p95 and server CPU per poll; then
``--parallel`` clients for ``--seconds``: polls/s), and polls on kept
connections (``--parallel`` asyncssh connections, a session per poll, for
``--seconds``: polls/s and server CPU per poll).  Server CPU is the
process's user+system time (sshd: with its reaped children).  Every
answer is checked byte for byte; one wrong answer fails the bench.  Then
the soak: ``--soak`` polls on the agent over kept connections (each
reopened every 1,000 polls), RSS and open fds after warm-up and at the end.

Prints a table and writes it to build/bench/results.md.  Timing numbers
depend on the machine and its load; the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import asyncssh

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "agent"))

from mitigator_agent.cookies import wall_ts_shift_ms  # noqa: E402
from mitigator_agent.snapshot import (  # noqa: E402
    ABI_VERSION,
    CLOCK_WALL,
    F_ALG_SEQ_AND_TS_OFF,
    F_COOKIE_ACCEPT,
    F_NET_SECRET,
    F_SYNCOOKIE,
    F_SYNCOOKIE6,
    F_TS_OFFSET_HOOK,
    F_TS_SECRET,
    F_WALL_CLOCK,
    STRUCT_SIZE,
    Snapshot,
    encode,
)

OUT = REPO / "build" / "bench"
AGENT = str(Path(sys.executable).with_name("mitigator-agent"))
SSH = shutil.which("ssh") or "/usr/bin/ssh"
WAIT_SECONDS = 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REOPEN_EVERY = 1000  # soak: polls per kept connection before it is reopened
# The targets (agent against reference and floor; soak).
TARGETS = {"cpu_vs_reference": 10.0, "new_rate_vs_reference": 4.0, "kept_rate_vs_reference": 10.0,
           "cpu_vs_floor": 1.2, "kept_rate_vs_floor": 0.7, "soak_rss_mb": 2.0}


def snapshot() -> Snapshot:
    """A module snapshot as a 6.1 kernel with the module gives it, random secrets."""
    realtime_ns, tcp_clock_ms = 1_763_894_400_123_456_789, 0x1_2345_6789
    return Snapshot(
        abi_version=ABI_VERSION, size=STRUCT_SIZE,
        flags=(F_SYNCOOKIE | F_SYNCOOKIE6 | F_NET_SECRET | F_TS_SECRET | F_ALG_SEQ_AND_TS_OFF | F_COOKIE_ACCEPT
               | F_WALL_CLOCK | F_TS_OFFSET_HOOK),
        hz=250, realtime_ns=realtime_ns, tcp_clock_ms=tcp_clock_ms, jiffies64=(1 << 32) + 250 * 3600,
        syncookie_secret=os.urandom(32), syncookie6_secret=os.urandom(32), net_secret=os.urandom(16),
        ts_secret=os.urandom(16), tcp_syncookies=2, tcp_timestamps=1, tcp_sack=1, tcp_window_scaling=1,
        tcp_ecn=2, cookie_clock=CLOCK_WALL,
        ts_shift_ms=wall_ts_shift_ms(realtime_ns // 10**6 - 1000, tcp_clock_ms - 1000),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Server:
    """One running server under measurement."""

    name: str
    process: subprocess.Popen
    port: int
    user: str
    known_hosts: Path

    def cpu_seconds(self) -> float:
        """User+system CPU of the server process and its reaped children."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def known_hosts_file(work: Path, name: str, port: int, public_key_path: Path) -> Path:
    path = work / f"known_hosts.{name}"
    key_type, key_data = public_key_path.read_text().split()[:2]
    path.write_text(f"[127.0.0.1]:{port} {key_type} {key_data}\n")
    return path


def start_agent(work: Path, client_public: str) -> Server:
    keys = work / "agent-keys"
    keys.write_text(f'from="127.0.0.1" {client_public}\n')
    keys.chmod(0o644)
    config = work / "agent-isolated.toml"  # empty: this machine's own config plays no part
    config.write_text("")
    config.chmod(0o644)
    log = work / "agent.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "agent"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [AGENT, "serve", "--config", str(config), "--port", "0", "--listen", "127.0.0.1", "--keys", str(keys),
             "--host-key", str(work / "agent-host.ed25519"), "--device", str(work / "snapshot"),
             "--runtime-dir", str(work / "agent-run")],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    port: List[int] = []

    def listening() -> bool:
        if process.poll() is not None:
            raise SystemExit(f"bench: the agent exited:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if "listening on 127.0.0.1:" in line:
                port.append(int(line.rsplit(":", 1)[1]))
                return True
        return False
    wait_until(listening, "the agent to listen")
    return Server("agent", process, port[0], "mitigator_agent",
                  known_hosts_file(work, "agent", port[0], work / "agent-host.ed25519.pub"))


def openssh_server_root() -> Tuple[Path, Dict[str, str]]:
    """sshd and the environment to run it with: the host's, or Debian's package unpacked in build/bench."""
    for candidate in ("/usr/sbin/sshd", shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate), {}
    root = OUT / "openssh"
    sshd = root / "usr" / "sbin" / "sshd"
    if not sshd.exists():
        debs = OUT / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        print("bench: no sshd on this host; unpacking Debian's openssh-server into build/bench/openssh"
              " (nothing is installed)", file=sys.stderr)
        subprocess.run(["apt-get", "download", "-q", "openssh-server", "libwrap0"], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL)
        for deb in debs.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    libraries = [str(path) for path in (root / "usr" / "lib" / "x86_64-linux-gnu", root / "lib" / "x86_64-linux-gnu")
                 if path.exists()]
    return sshd, {"LD_LIBRARY_PATH": os.pathsep.join(libraries)}


def start_reference(work: Path, client_public: str, answer_file: Path) -> Server:
    if os.geteuid() != 0:
        raise SystemExit("bench: the sshd reference needs root (it runs sshd as sshd runs in production)")
    sshd, env = openssh_server_root()
    host_key = work / "sshd-host.ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    authorized = work / "sshd-authorized_keys"
    authorized.write_text(client_public + "\n")
    # The user's own shell runs the forced command: `cat` of the answer, as a script would.
    port = free_port()
    config = work / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", "PidFile none",
        f"AuthorizedKeysFile {authorized}", f"ForceCommand cat {answer_file}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "UseDNS no",
        "PrintMotd no", "PrintLastLog no", "StrictModes no", "MaxStartups 100", "MaxSessions 100", ""]))
    # A private mount namespace: the privilege-separation user (sshd) and
    # /run/sshd exist there whether or not the host has them.
    passwd = work / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text() + "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin\n")
    script = (f"mount --bind {passwd} /etc/passwd && mount -t tmpfs -o mode=755 tmpfs /run"
              f" && mkdir -m 755 /run/sshd && exec {sshd} -D -e -f {config}")
    log = open(work / "sshd.log", "w")
    process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    log.close()
    wait_until(lambda: accepting(port) or process.poll() is not None, "sshd to listen")
    if process.poll() is not None:
        raise SystemExit(f"bench: sshd exited:\n{(work / 'sshd.log').read_text()}")
    return Server("reference", process, port, "root", known_hosts_file(work, "reference", port,
                                                                        host_key.with_suffix(".ed25519.pub")))


def start_floor(work: Path, client_public: str, answer_file: Path) -> Server:
    host_key = work / "floor-host.ed25519"
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(host_key))
    key.write_public_key(str(host_key) + ".pub")
    authorized = work / "floor-authorized_keys"
    authorized.write_text(client_public + "\n")
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor_server.py")), str(host_key),
                                str(authorized), str(answer_file)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        raise SystemExit(f"bench: the floor server did not start ({line!r})")
    port = int(line.split()[-1])
    return Server("floor", process, port, "bench", known_hosts_file(work, "floor", port, Path(str(host_key) + ".pub")))


# --- clients ---------------------------------------------------------------------------

def openssh_command(server: Server, key: Path) -> List[str]:
    return [SSH, "-F", "/dev/null", "-p", str(server.port), "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={server.known_hosts}",
            f"{server.user}@127.0.0.1", "get"]


def openssh_poll(command: Sequence[str], answer: bytes) -> float:
    """One poll on a new connection; its wall time.  A wrong answer ends the bench."""
    start = time.perf_counter()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT_SECONDS)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or result.stdout != answer:
        raise SystemExit(f"bench: wrong answer from {command[-2]} (status {result.returncode}):"
                         f" {result.stderr.decode(errors='replace').strip()}")
    return elapsed


async def kept_polls(server: Server, key: asyncssh.SSHKey, answer: bytes, parallel: int,
                     until: Callable[[int], bool], reopen_every: int = 0) -> int:
    """Polls on ``parallel`` kept connections (a session each) until ``until(total)``; returns the total."""
    total = 0

    async def one_client() -> None:
        nonlocal total
        while not until(total):
            async with asyncssh.connect("127.0.0.1", server.port, username=server.user, client_keys=[key],
                                        known_hosts=str(server.known_hosts), agent_path=None, config=None) as conn:
                done = 0
                while not until(total) and not (reopen_every and done >= reopen_every):
                    result = await conn.run("get", encoding=None)
                    if result.exit_status != 0 or result.stdout != answer:
                        raise SystemExit(f"bench: wrong answer from {server.name} on a kept connection")
                    total += 1
                    done += 1
    await asyncio.gather(*(one_client() for _ in range(parallel)))
    return total


# --- measurements ----------------------------------------------------------------------

@dataclass
class Result:
    latencies: List[float] = field(default_factory=list)
    latency_cpu: float = 0.0
    new_polls: int = 0
    new_seconds: float = 0.0
    kept_polls: int = 0
    kept_seconds: float = 0.0
    kept_cpu: float = 0.0

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def measure(servers: List[Server], key_path: Path, key: asyncssh.SSHKey, answer: bytes,
            polls: int, seconds: float, parallel: int, rounds: int = 5) -> Dict[str, Result]:
    results = {server.name: Result() for server in servers}
    # Sequential new-connection polls, interleaved in rounds so load from
    # elsewhere on the machine falls on every server alike.
    for _ in range(rounds):
        for server in servers:
            command = openssh_command(server, key_path)
            before = server.cpu_seconds()
            results[server.name].latencies += [openssh_poll(command, answer) for _ in range(polls // rounds)]
            results[server.name].latency_cpu += server.cpu_seconds() - before
    for server in servers:
        command = openssh_command(server, key_path)
        start = time.perf_counter()
        deadline = start + seconds
        with ThreadPoolExecutor(parallel) as pool:
            def loop(_: int) -> int:
                count = 0
                while time.perf_counter() < deadline:
                    openssh_poll(command, answer)
                    count += 1
                return count
            results[server.name].new_polls = sum(pool.map(loop, range(parallel)))
        results[server.name].new_seconds = time.perf_counter() - start
    for server in servers:
        before = server.cpu_seconds()
        start = time.perf_counter()
        deadline = start + seconds
        results[server.name].kept_polls = asyncio.run(
            kept_polls(server, key, answer, parallel, lambda _: time.perf_counter() >= deadline))
        results[server.name].kept_seconds = time.perf_counter() - start
        time.sleep(0.2)  # sshd: the connections' processes are reaped, their CPU counted
        results[server.name].kept_cpu = server.cpu_seconds() - before
    return results


@dataclass
class Soak:
    polls: int
    warmup: int
    rss_warm_kib: int
    rss_end_kib: int
    rss_max_kib: int
    fds_warm: int
    fds_end: int
    seconds: float
    rss_samples: List[Tuple[int, int]]  # (polls done, RSS KiB) after each slice


def soak(agent: Server, key: asyncssh.SSHKey, answer: bytes, polls: int, parallel: int) -> Soak:
    warmup = min(2000, polls // 10)
    asyncio.run(kept_polls(agent, key, answer, parallel, lambda total: total >= warmup, REOPEN_EVERY))
    rss_warm, fds_warm = agent.rss_kib(), agent.fds()
    samples = [(warmup, rss_warm)]
    start = time.perf_counter()
    done = warmup
    while done < polls:  # in slices, to see the trend and the peak
        target = min(polls, done + 5000)
        done += asyncio.run(kept_polls(agent, key, answer, parallel, lambda total: done + total >= target,
                                       REOPEN_EVERY))
        samples.append((done, agent.rss_kib()))
    time.sleep(0.5)  # the last connections' teardown
    return Soak(done, warmup, rss_warm, agent.rss_kib(), max(rss for _, rss in samples), fds_warm, agent.fds(),
                time.perf_counter() - start, samples)


# --- report ----------------------------------------------------------------------------

def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()},"
            f" asyncssh {asyncssh.__version__}; load average at the start {load}")


def report(results: Dict[str, Result], soaked: Optional[Soak], args: argparse.Namespace, started: str,
           ssh_version: str) -> str:
    names = list(results)
    rows = [
        ("new-connection poll, p50 (ms)", [f"{r.percentile(50) * 1000:.1f}" for r in results.values()]),
        ("new-connection poll, p95 (ms)", [f"{r.percentile(95) * 1000:.1f}" for r in results.values()]),
        ("server CPU per new-connection poll (ms)",
         [f"{r.latency_cpu / len(r.latencies) * 1000:.2f}" for r in results.values()]),
        (f"new-connection polls/s, {args.parallel} clients",
         [f"{r.new_polls / r.new_seconds:.1f}" for r in results.values()]),
        (f"kept-connection polls/s, {args.parallel} connections",
         [f"{r.kept_polls / r.kept_seconds:.1f}" for r in results.values()]),
        ("server CPU per kept-connection poll (ms)",
         [f"{r.kept_cpu / r.kept_polls * 1000:.2f}" for r in results.values()]),
    ]
    lines = [f"Bench run of {started}: {machine()}.  Clients: {ssh_version} (new connections),"
             f" asyncssh (kept connections).  {args.polls} sequential polls per server, then {args.seconds:g} s"
             f" of each load per server.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]

    def cpu(name: str) -> float:
        return results[name].latency_cpu / len(results[name].latencies)

    def rate(name: str, kind: str) -> float:
        r = results[name]
        return r.new_polls / r.new_seconds if kind == "new" else r.kept_polls / r.kept_seconds

    ratios = []
    if "reference" in results:
        ratios += [
            ("reference CPU / agent CPU per new-connection poll", cpu("reference") / cpu("agent"),
             TARGETS["cpu_vs_reference"], True),
            ("agent / reference new-connection polls/s", rate("agent", "new") / rate("reference", "new"),
             TARGETS["new_rate_vs_reference"], True),
            ("agent / reference kept-connection polls/s", rate("agent", "kept") / rate("reference", "kept"),
             TARGETS["kept_rate_vs_reference"], True),
        ]
    ratios += [
        ("agent CPU / floor CPU per new-connection poll", cpu("agent") / cpu("floor"), TARGETS["cpu_vs_floor"], False),
        ("agent / floor kept-connection polls/s", rate("agent", "kept") / rate("floor", "kept"),
         TARGETS["kept_rate_vs_floor"], True),
    ]
    lines += ["", "| ratio | measured | issue 9 target |", "|---|---|---|"]
    for label, value, target, at_least in ratios:
        met = value >= target if at_least else value <= target
        lines.append(f"| {label} | {value:.2f} | {'≥' if at_least else '≤'} {target:g} ({'met' if met else 'NOT met'}) |")
    if soaked:
        growth_mb = (soaked.rss_end_kib - soaked.rss_warm_kib) / 1024
        lines += ["", f"Soak: {soaked.polls - soaked.warmup} polls on the agent after {soaked.warmup} warm-up polls,"
                      f" over {args.parallel} kept connections (each reopened every {REOPEN_EVERY} polls),"
                      f" in {soaked.seconds:.0f} s:"
                      f" RSS {soaked.rss_warm_kib / 1024:.1f} MB after warm-up, {soaked.rss_end_kib / 1024:.1f} MB"
                      f" at the end (growth {growth_mb:+.2f} MB, target ≤ {TARGETS['soak_rss_mb']:g} MB:"
                      f" {'met' if growth_mb <= TARGETS['soak_rss_mb'] else 'NOT met'}; peak"
                      f" {soaked.rss_max_kib / 1024:.1f} MB); open fds {soaked.fds_warm} after warm-up,"
                      f" {soaked.fds_end} at the end.",
                  "", "RSS (MB) by polls done: " + ", ".join(f"{polls}: {rss / 1024:.1f}"
                                                           for polls, rss in soaked.rss_samples) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the agent's get against sshd and a bare asyncssh server.")
    parser.add_argument("--polls", type=int, default=100, help="sequential new-connection polls per server")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput load per server")
    parser.add_argument("--parallel", type=int, default=4, help="parallel clients / kept connections")
    parser.add_argument("--soak", type=int, default=50_000, help="polls in the agent's soak (0: no soak)")
    parser.add_argument("--no-reference", action="store_true", help="leave out the sshd reference")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755)
    (work / "snapshot").write_bytes(encode(snapshot()))
    client = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator1")
    key_path = work / "client.ed25519"
    client.write_private_key(str(key_path))
    key_path.chmod(0o600)
    client_public = client.export_public_key().decode().strip()
    ssh_version = subprocess.run([SSH, "-V"], capture_output=True, text=True).stderr.strip().split(",")[0]

    servers: List[Server] = []
    try:
        agent = start_agent(work, client_public)
        servers.append(agent)
        answer = subprocess.run(openssh_command(agent, key_path), stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=WAIT_SECONDS, check=True).stdout
        assert answer.startswith(b"uname: Linux\n") and b"net_secret: " in answer, answer
        answer_file = work / "answer"
        answer_file.write_bytes(answer)
        answer_file.chmod(0o644)
        if not args.no_reference:
            servers.append(start_reference(work, client_public, answer_file))
        servers.append(start_floor(work, client_public, answer_file))
        print(f"bench: {', '.join(f'{s.name} on port {s.port}' for s in servers)}", file=sys.stderr)
        results = measure(servers, key_path, client, answer, args.polls, args.seconds, args.parallel)
        soaked = soak(agent, client, answer, args.soak, args.parallel) if args.soak else None
    finally:
        for server in servers:
            server.stop()
    text = report(results, soaked, args, started, ssh_version)
    (OUT / "results.md").write_text(text)
    print(text)
    print(f"written to {OUT / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
