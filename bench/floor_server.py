"""The floor: a bare asyncssh server, default settings, answering every session with constant bytes.

    python floor_server.py HOST_KEY AUTHORIZED_KEYS ANSWER_FILE

Listens on 127.0.0.1, port 0, prints ``listening on PORT`` and serves
until SIGTERM.  No admission, no keys-file checks, no snapshot read, no
logging: what any asyncssh-based agent costs before doing its own work.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import asyncssh


async def serve(host_key: str, authorized_keys: str, answer: bytes) -> None:
    def session(process: asyncssh.SSHServerProcess) -> None:
        process.stdout.write(answer)
        process.exit(0)

    acceptor = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key],
                                     authorized_client_keys=authorized_keys, process_factory=session,
                                     encoding=None)
    print(f"listening on {acceptor.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    acceptor.close()


def main() -> None:
    host_key, authorized_keys, answer_file = sys.argv[1:4]
    with open(answer_file, "rb") as handle:
        answer = handle.read()
    asyncio.run(serve(host_key, authorized_keys, answer))


if __name__ == "__main__":
    main()
