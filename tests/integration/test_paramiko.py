"""paramiko, a third SSH implementation MITIGATOR-side tools use, completes a `get` against our algorithm lists."""

from __future__ import annotations

import os
import re

import paramiko
import pytest

from conftest import SSH_USER, WAIT_SECONDS, AgentProcess, ClientKey
from mitigator_agent import __version__
from mitigator_agent.answers import HostFacts, get_text
from mitigator_agent.clock import kernel_clock_synced


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_paramiko_get(agent: AgentProcess, client_key: ClientKey, snapshot, host: str) -> None:
    host_key = paramiko.Ed25519Key.from_private_key_file(str(agent.host_key_path))
    client = paramiko.SSHClient()
    # Pinned, as MITIGATOR pins the fingerprint: any other host key is refused.
    client.get_host_keys().add(f"[{host}]:{agent.port(host)}", "ssh-ed25519", host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(host, port=agent.port(host), username=SSH_USER, key_filename=str(client_key.path),
                       allow_agent=False, look_for_keys=False, timeout=WAIT_SECONDS,
                       auth_timeout=WAIT_SECONDS, banner_timeout=WAIT_SECONDS)
        transport = client.get_transport()
        assert transport is not None
        _, stdout, _ = client.exec_command("get", timeout=WAIT_SECONDS)
        answer = stdout.read().decode()
        status = stdout.channel.recv_exit_status()
        negotiated = (transport.kex_engine.__class__.__name__, transport.remote_cipher)
    finally:
        client.close()
    facts = HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())
    assert (status, answer) == (0, get_text(snapshot, facts))
    assert negotiated[1] in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com"), negotiated


def test_paramiko_offering_an_unlisted_key_first_gets_in_with_the_listed_one(
        agent: AgentProcess, client_key: ClientKey, second_key: ClientKey, snapshot) -> None:
    """paramiko asks for the ssh-userauth service again before each key it tries; sshd allows that."""
    host_key = paramiko.Ed25519Key.from_private_key_file(str(agent.host_key_path))
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{agent.port('127.0.0.1')}", "ssh-ed25519", host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect("127.0.0.1", port=agent.port("127.0.0.1"), username=SSH_USER,
                       key_filename=[str(second_key.path), str(client_key.path)],
                       allow_agent=False, look_for_keys=False, timeout=WAIT_SECONDS,
                       auth_timeout=WAIT_SECONDS, banner_timeout=WAIT_SECONDS)
        _, stdout, _ = client.exec_command("get", timeout=WAIT_SECONDS)
        answer = stdout.read().decode()
        status = stdout.channel.recv_exit_status()
    finally:
        client.close()
    facts = HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())
    assert (status, answer) == (0, get_text(snapshot, facts))
    agent.wait_for(rf"refused .*request=publickey offered={re.escape(second_key.fingerprint)}")
    agent.wait_for(r"poll .*instance=mitigator1 .*command=\"?get")
