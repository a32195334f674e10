"""Clients other than OpenSSH complete a `get` (issue 9, "Crypto posture").

PuTTY's plink (Debian 12: 0.78, package putty-tools) polls the live agent
with the host key pinned by fingerprint, as MITIGATOR pins it.

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
import re
import shutil
import subprocess
from pathlib import Path
from typing import Tuple

import asyncssh
import pytest

from conftest import SSH_USER, WAIT_SECONDS, AgentProcess, ClientKey, make_snapshot
from mitigator_agent import __version__, logs
from mitigator_agent.answers import HostFacts, get_text
from mitigator_agent.clock import kernel_clock_synced
from mitigator_agent.server import KEX_ALGS, AgentServer, ServerSettings
from mitigator_agent.snapshot import encode

DBCLIENT = shutil.which("dbclient")
DROPBEARCONVERT = shutil.which("dropbearconvert")

needs_dropbear = pytest.mark.skipif(DBCLIENT is None or DROPBEARCONVERT is None,
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


@needs_dropbear
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


# --- PuTTY's plink ---------------------------------------------------------------

PLINK = shutil.which("plink")
PUTTYGEN = shutil.which("puttygen")
needs_putty = pytest.mark.skipif(PLINK is None or PUTTYGEN is None,
                                 reason="PuTTY tools not installed (Debian package putty-tools)")


def plink_get(agent: AgentProcess, key: ClientKey, host: str, host_key_pin: str) -> Tuple[int, str, str]:
    """plink's (status, stdout, stderr) for `get` against the live ``agent``.

    ``-batch``: any question (an unknown host key above all) fails at once
    instead of waiting for an answer no one gives.  ``-hostkey`` pins the
    host key (plink then never consults its cache, which lives below HOME).
    """
    ppk = key.path.with_suffix(".ppk")
    if not ppk.exists():
        subprocess.run([PUTTYGEN, str(key.path), "-O", "private", "-o", str(ppk)],
                       check=True, capture_output=True, timeout=WAIT_SECONDS)
    home = agent.workdir / "plink-home"
    home.mkdir(exist_ok=True)
    client = subprocess.Popen(
        [PLINK, "-ssh", "-batch", "-noagent", "-P", str(agent.port(host)), "-l", SSH_USER, "-i", str(ppk),
         "-hostkey", host_key_pin, host, "get"],
        env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = client.communicate(timeout=WAIT_SECONDS)
    finally:
        if client.returncode is None:  # timed out: never leave a stuck plink behind
            client.kill()
            client.communicate()
    return client.returncode, out.decode(), err.decode()


@needs_putty
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_putty_plink_completes_a_get_with_the_host_key_pinned(agent, client_key, snapshot, host):
    pin = asyncssh.read_public_key(str(agent.host_key_path) + ".pub").get_fingerprint("sha256")
    start = agent.mark()
    status, out, err = plink_get(agent, client_key, host, pin)
    facts = HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())
    assert (status, out) == (0, get_text(snapshot, facts)), err
    agent.wait_for(rf"poll src=\[?{re.escape(host)}\]?:\d+ user={SSH_USER} instance=mitigator1 .*command=get"
                   r" status=0 ", start)


@needs_putty
def test_putty_plink_refuses_an_agent_whose_host_key_is_not_the_pinned_one(agent, client_key):
    # The pin is what makes the test above mean something: a wrong one must fail.
    wrong = asyncssh.generate_private_key("ssh-ed25519").get_fingerprint("sha256")
    status, out, err = plink_get(agent, client_key, "127.0.0.1", wrong)
    assert status != 0 and out == "", err
    assert "host key" in err.lower(), err
