"""`make bench`, part two: what the module's cookie-accept hook costs the kernel, in a booted guest.

    python bench/cookie_hook.py [--kver KVER] [--connections N] [--rounds R] [--versions 4,6]

Boots KVER (default: the kernel of this host's release in
tests/kernel/test-kernels, provisioned by tests/provision-host.sh) under
qemu with virtme-ng (tests/kernel/vm.py), with the module DKMS built for it,
and runs bench/cookie_hook_guest.py there as root: N cookie ACKs, each for a
SYN the kernel never saw, sent at a fresh loopback listener as fast as the
kernel takes them, with the module loaded (its defaults, and with
cookie_clock=jiffies: the accept hook alone) and without it after a real
SYN-queue overflow stamp (the stock kernel's own cookie path), plus two
controls (no module and no overflow: all refused; bad checksums: the send
path alone). R rounds, the configurations interleaved; medians reported.

The bench fails (exit 1) when a cookie connection is missing where the
kernel must accept them all, when the control accepts any outside the two
minutes after the jiffies wrap, or when the guest's kernel log shows a
warning. Prints the table and writes it to build/bench/cookie-hook.md (the
guest's raw figures: cookie-hook.json; its console: cookie-hook-guest.log).
Timing depends on the machine and its load (TCG emulation is slow); the
ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from tests.kernel import matrix, vm  # noqa: E402

OUT = REPO / "build" / "bench"
GUEST_SCRIPT = "bench/cookie_hook_guest.py"
BASELINE = "stock-overflow"
HOOKS = ("hook-wall", "hook-jiffies")
MUST_ACCEPT_ALL = HOOKS + (BASELINE,)
MUST_REFUSE_ALL = ("stock-refused", "floor")


def default_kver() -> str:
    """The matrix kernel of this host's own release (Debian 12: 6.1), else the matrix's first."""
    listed = matrix.listed()
    for suite, kver in listed:
        if suite == matrix.host_suite():
            return kver
    return listed[0][1]


def run_guest(kver: str, connections: int, rounds: int, versions: str) -> dict[str, Any]:
    """Boot ``kver`` once, run the guest side, return its JSON report (the console goes to OUT)."""
    ok, why = vm.can_boot()
    if not ok:
        raise SystemExit(f"cookie-hook: cannot boot a guest: {why}")
    if not vm.kernel_image(kver).exists():
        raise SystemExit(f"cookie-hook: kernel {kver} is not provisioned: run tests/provision-host.sh bookworm:{kver}")
    ko = vm.build_module(kver)
    OUT.mkdir(parents=True, exist_ok=True)
    report_path = OUT / "cookie-hook.json"
    report_path.unlink(missing_ok=True)
    command = " ".join(shlex.quote(part) for part in (
        sys.executable, GUEST_SCRIPT, "--out", str(report_path), "--connections", str(connections),
        "--rounds", str(rounds), "--versions", versions))
    print(f"cookie-hook: booting {kver} under qemu (TCG) for {rounds} rounds of {connections} cookie ACKs",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    result = vm.run_in_guest(kver, command, [OUT], vm.guest_env(kver, ko))
    (OUT / "cookie-hook-guest.log").write_text(result.stdout)
    if result.returncode != 0 or not report_path.exists():
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise SystemExit(f"cookie-hook: the guest run failed (exit {result.returncode}):\n{tail}")
    print(f"cookie-hook: guest run took {time.monotonic() - started:.0f} s", file=sys.stderr)
    return json.loads(report_path.read_text())


def per_connection_us(m: dict[str, Any]) -> float:
    """Microseconds of kernel work per ACK: first send to the last connection queued, over the ACKs sent."""
    return m["done_seconds"] / m["sent"] * 1e6


def rate(m: dict[str, Any]) -> float:
    """Cookie connections per second of one run."""
    return m["accepted"] / m["done_seconds"]


def counts(m: dict[str, Any]) -> bool:
    """Whether a run enters the figures: the control is void in the two minutes after the jiffies wrap."""
    return not (m["config"] == "stock-refused" and m["in_jiffies_wrap_window"])


def problems(report: dict[str, Any]) -> list[str]:
    """What makes the run invalid: missing or unexpected connections, kernel warnings."""
    found = [f"kernel log: {line}" for line in report["dmesg_problems"]]
    for m in report["measurements"]:
        where = f"round {m['round']} IPv{m['version']} {m['config']}"
        if m["config"] in MUST_ACCEPT_ALL and m["accepted"] != m["sent"]:
            found.append(f"{where}: {m['accepted']} of {m['sent']} cookie ACKs opened a connection")
        if m["config"] in MUST_REFUSE_ALL and m["accepted"] and counts(m):
            found.append(f"{where}: {m['accepted']} connections opened where none may")
    return found


def spread(values: list[float], fmt: str) -> str:
    """Median and range of per-round values, e.g. '0.97 (0.93–1.01)'."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def table(report: dict[str, Any], started: str) -> str:
    """The Markdown result: one table per IP version, each configuration against the stock baseline.

    Comparisons are paired by round (the configurations of a round run
    back to back), which keeps slow drifts of the host's load out of them.
    """
    labels = {c["name"]: c["label"] for c in report["configs"]}
    lines = [
        f"Cookie-accept hook bench of {started}: kernel {report['kernel']} booted under qemu TCG "
        f"({report['cpus']} vCPUs; host: 2 shared cores), {report['connections']:,} cookie ACKs per run, "
        f"each for a SYN the kernel never saw, from distinct client ports on loopback, sent prebuilt "
        f"{report['batch']} per sendmmsg(2) at a fresh listener; {report['rounds']} rounds after a warm-up "
        "round, configurations interleaved. connections/s: connections in the accept queue over the time "
        "from the first send to the last one queued (on loopback the kernel handles each ACK inside the "
        "send call). Figures are medians over the rounds, ranges in brackets; the last column compares "
        "each round with the same round's baseline.",
    ]
    void = 0
    for version in sorted({m["version"] for m in report["measurements"]}):
        runs = [m for m in report["measurements"] if m["version"] == version]
        void += sum(not counts(m) for m in runs)
        base = {m["round"]: m for m in runs if m["config"] == BASELINE}
        lines += ["", f"IPv{version}:", "",
                  "| configuration | connections opened | connections/s | ACKs/s sent | µs per ACK "
                  "| against no module, recent overflow |",
                  "|---|---|---|---|---|---|"]
        for name, label in labels.items():
            ms = [m for m in runs if m["config"] == name and counts(m)]
            if not ms:
                continue
            opened = f"{sum(m['accepted'] for m in ms):,}/{sum(m['sent'] for m in ms):,}"
            sent_rate = statistics.median(m["sent"] / m["send_seconds"] for m in ms)
            us = spread([per_connection_us(m) for m in ms], ".1f")
            if name == BASELINE:
                versus = "baseline"
            elif name in MUST_ACCEPT_ALL:
                ratios = [rate(m) / rate(base[m["round"]]) for m in ms]
                extra = [per_connection_us(m) - per_connection_us(base[m["round"]]) for m in ms]
                versus = f"{spread(ratios, '.2f')}x the rate; {spread(extra, '+.1f')} µs per connection"
            else:
                ratios = [per_connection_us(m) / per_connection_us(base[m["round"]]) for m in ms]
                versus = f"{spread(ratios, '.2f')}x the time per ACK"
            connections = spread([rate(m) for m in ms], ",.0f") if name in MUST_ACCEPT_ALL else "—"
            lines.append(f"| {label} | {opened} | {connections} | {sent_rate:,.0f} | {us} | {versus} |")
    if void:
        lines += ["", f"Left out: {void} control run(s) sent in the two minutes after the jiffies wrap "
                      "(uptime 298–422 s), when every fresh listener counts as overflowed and the stock "
                      "kernel accepts cookies by itself."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="The module's cookie-accept hook against the stock kernel's "
                                                 "cookie path, in a booted guest.")
    parser.add_argument("--kver", default=default_kver(), help="guest kernel (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=20000, help="cookie ACKs per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every configuration (default: %(default)s)")
    parser.add_argument("--versions", default="4,6", help="IP versions, comma-separated (default: %(default)s)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = run_guest(args.kver, args.connections, args.rounds, args.versions)
    text = table(report, started)
    found = problems(report)
    if found:
        text += "\nINVALID RUN:\n" + "".join(f"- {line}\n" for line in found)
    (OUT / "cookie-hook.md").write_text(text)
    print(text)
    print(f"written to {OUT / 'cookie-hook.md'}", file=sys.stderr)
    if found:
        sys.exit(1)


if __name__ == "__main__":
    main()
