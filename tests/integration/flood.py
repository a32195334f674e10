"""A connection flood that never authenticates (run as a program by test_lockout_flood).

    python flood.py HOST PORT --per-source 127.0.0.10 ...   # two connections per source
    python flood.py HOST PORT --cycling fd00:db8:9:1::1 ...  # the sources in turn

``--per-source``: two connections at a time from each source, one that
reads the server's banner and then sits idle, one that sends its own
banner a byte a second and never finishes it.  ``--cycling``: CYCLING_HOLDERS
idle connections, each new one from the next source (one IPv6 host walking
through its /64).  Every connection that ends (closed by the server at its
login timeout, refused before the banner, or refused at connect) is
reopened after RETRY_SECONDS.  Runs until SIGTERM or SIGINT, then prints
one JSON line of counts on stdout: ``connects`` (TCP connections made),
``banners`` (the server's banner received), ``dropped`` (closed before a
banner: refused at admission), ``connect_errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
from collections import Counter
from typing import Iterator, List

RETRY_SECONDS = 0.5  # a stopping-and-starting flood, not a CPU burner on a shared machine
CYCLING_HOLDERS = 8  # twice the agent's per-/64 cap: the cap, not the flooder, is what limits it
SLOW_BANNER = b"SSH-2.0-slowloris-never-ends"


async def one_connection(host: str, port: int, source: str, slow: bool, counts: Counter) -> None:
    """Connect from ``source``, then idle or trickle a banner until the server closes."""
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError:
        counts["connect_errors"] += 1
        return
    counts["connects"] += 1
    try:
        banner = await reader.readline()
        if not banner.startswith(b"SSH-"):
            counts["dropped"] += 1
            return
        counts["banners"] += 1
        if slow:
            for byte in SLOW_BANNER:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                        return
                except asyncio.TimeoutError:
                    pass
        while await reader.read(4096):
            pass  # the server's KEXINIT, then nothing until it gives up on us
    except OSError:
        counts["dropped"] += 1
    finally:
        writer.close()


async def keep_connecting(host: str, port: int, sources: Iterator[str], slow: bool, counts: Counter) -> None:
    while True:
        await one_connection(host, port, next(sources), slow, counts)
        await asyncio.sleep(RETRY_SECONDS)


async def flood(host: str, port: int, per_source: List[str], cycling: List[str]) -> Counter:
    counts: Counter = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [loop.create_task(keep_connecting(host, port, itertools.repeat(source), slow, counts))
             for source in per_source for slow in (False, True)]
    if cycling:
        cycle = itertools.cycle(cycling)
        tasks += [loop.create_task(keep_connecting(host, port, cycle, False, counts))
                  for _ in range(CYCLING_HOLDERS)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--per-source", nargs="+", default=[])
    parser.add_argument("--cycling", nargs="+", default=[])
    args = parser.parse_args()
    counts = asyncio.run(flood(args.host, args.port, args.per_source, args.cycling))
    print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    main()
