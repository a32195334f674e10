"""Clients other than OpenSSH complete a `get` (issue 9, "Crypto posture").

Dropbear's dbclient (Debian 12: 2022.83, package dropbear-bin) sends its
KEXDH_INIT right after its KEXINIT, guessing the kex.  RFC 4253 7.1: the
guess is right only if both sides' *first* kex and host key algorithms are
the same; otherwise the guessed packet must be ignored and the client sends
it again.  asyncssh judged the guess by the negotiated algorithm alone, so
with a server list not starting with dbclient's first kex it kept the
guessed packet, then met the re-sent one after the exchange ("Key exchange
not in progress") and dbclient got "Disconnect received".  The agent must
work whatever its kex order, so the server runs here in-process with the
order as a parameter (the order is not a flag).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Tuple

import asyncssh
import pytest

from conftest import SSH_USER, WAIT_SECONDS, ClientKey, make_snapshot
from mitigator_agent import __version__, logs
from mitigator_agent.answers import HostFacts, get_text
from mitigator_agent.clock import kernel_clock_synced
from mitigator_agent.server import KEX_ALGS, AgentServer, ServerSettings
from mitigator_agent.snapshot import encode

DBCLIENT = shutil.which("dbclient")
DROPBEARCONVERT = shutil.which("dropbearconvert")

pytestmark = pytest.mark.skipif(DBCLIENT is None or DROPBEARCONVERT is None,
                                reason="Dropbear client not installed (Debian package dropbear-bin)")

ORDERS = {
    "default": KEX_ALGS,
    # dbclient's first kex is curve25519-sha256: each of these makes its guess wrong.
    "mlkem-first": ("mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"),
    "libssh-first": ("curve25519-sha256@libssh.org", "curve25519-sha256"),
}


async def dbclient_get(workdir: Path, key: ClientKey, kex_algs: Tuple[str, ...]) -> Tuple[int, str, str]:
    """Serve in-process with ``kex_algs``; return dbclient's (status, stdout, stderr) for `get`."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    server = AgentServer(ServerSettings(port=0, listen=("127.0.0.1",), keys_path=str(workdir / "keys"),
                                        device=str(workdir / "snapshot"), kex_algs=kex_algs), host_key)
    (_, port), = await server.start()
    try:
        # Dropbear pins host keys in $HOME/.ssh/known_hosts, by host name only.
        home = workdir / "home"
        (home / ".ssh").mkdir(parents=True, exist_ok=True)
        algorithm, data = host_key.export_public_key().decode().split()[:2]
        (home / ".ssh" / "known_hosts").write_text(f"127.0.0.1 {algorithm} {data}\n")
        # start_new_session: no controlling terminal, so a host key question
        # fails at once instead of waiting for an answer.
        client = await asyncio.create_subprocess_exec(
            DBCLIENT, "-p", str(port), "-i", str(workdir / "client.dropbear"), f"{SSH_USER}@127.0.0.1", "get",
            env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(client.communicate(), WAIT_SECONDS)
        finally:
            if client.returncode is None:  # timed out: a stuck dbclient spins, never leave it
                client.kill()
                await client.wait()
        return client.returncode, out.decode(), err.decode()
    finally:
        await server.close()


@pytest.mark.parametrize("order", ORDERS)
def test_dropbear_dbclient_completes_a_get_whatever_our_kex_order(workdir, client_key, order, caplog):
    snapshot = make_snapshot()
    (workdir / "snapshot").write_bytes(encode(snapshot))
    (workdir / "keys").write_text(client_key.public_line + "\n")
    (workdir / "keys").chmod(0o644)
    subprocess.run([DROPBEARCONVERT, "openssh", "dropbear", str(client_key.path), str(workdir / "client.dropbear")],
                   check=True, capture_output=True, timeout=WAIT_SECONDS)
    with caplog.at_level(logging.INFO, logger=logs.LOGGER_NAME):
        status, out, err = asyncio.run(dbclient_get(workdir, client_key, ORDERS[order]))
    # dbclient exits 0 even after "Disconnect received": the answer is the proof.
    facts = HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())
    assert (status, out) == (0, get_text(snapshot, facts)), err
    assert any(record.getMessage().startswith("poll src=127.0.0.1:") and " status=0 " in record.getMessage()
               for record in caplog.records)
    assert not any("Key exchange not in progress" in record.getMessage() for record in caplog.records)
