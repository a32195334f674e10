"""`serve --config FILE`: the file gives defaults, flags win, anything doubtful stops the agent."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import asyncssh
import pytest

from mitigator_agent.snapshot import encode

from conftest import AGENT, SSH_USER, WAIT_SECONDS, ClientKey


def write_config(workdir: Path, text: str, mode: int = 0o644) -> Path:
    path = workdir / "agent.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def full_config(workdir: Path) -> str:
    return (f'port = 0\nlisten = ["::1"]\nkeys = "{workdir / "keys"}"\n'
            f'host-key = "{workdir / "host.ed25519"}"\ndevice = "{workdir / "snapshot"}"\n'
            f'login-timeout = 5\nrate = 5.0\nburst = 10\nruntime-dir = "{workdir / "run"}"\n')


@pytest.fixture
def configured(workdir, snapshot, client_key):
    (workdir / "keys").write_text(client_key.public_line + "\n")
    (workdir / "snapshot").write_bytes(encode(snapshot))
    return write_config(workdir, full_config(workdir))


def serve_until_listening(*args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start serve; return it with the addresses it reports listening on (after 'starting')."""
    proc = subprocess.Popen([AGENT, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    listening = []
    for line in proc.stdout:
        found = re.search(r"listening on (\S+)$", line)
        if found:
            listening.append(found.group(1))
            break
    return proc, listening


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=WAIT_SECONDS)
    return out


def get(port: int, key: ClientKey) -> str:
    async def run() -> str:
        async with asyncssh.connect("::1", port, username=SSH_USER, client_keys=[key.key],
                                    known_hosts=None, agent_path=None, config=None) as conn:
            result = await conn.run("get", check=True)
            return str(result.stdout)
    return asyncio.run(asyncio.wait_for(run(), WAIT_SECONDS))


def test_config_file_supplies_every_setting(configured, client_key, snapshot):
    proc, listening = serve_until_listening("--config", str(configured))
    try:
        assert len(listening) == 1 and listening[0].startswith("[::1]:")
        port = int(listening[0].rsplit(":", 1)[1])
        lines = get(port, client_key).splitlines()  # keys, host key and device came from the file
        assert lines[3:6] == [f"net_secret: {snapshot.net_secret.hex()}",
                              f"syncookie_secret: {snapshot.syncookie_secret.hex()}",
                              f"syncookie6_secret: {snapshot.syncookie6_secret.hex()}"]
    finally:
        stop(proc)


def test_flags_win_over_the_config_file(configured):
    proc, listening = serve_until_listening("--config", str(configured), "--listen", "127.0.0.1")
    try:
        assert len(listening) == 1 and listening[0].startswith("127.0.0.1:")
    finally:
        log = stop(proc)
    assert "[::1]" not in log


@pytest.mark.parametrize("text, message", [
    ('colour = "blue"\n', "line 1: unknown key 'colour' (known: "),
    ('listen = "127.0.0.1"\n', 'line 1: listen must be a list, e.g. ["..."]'),
    ('port = [1, 2]\n', "line 1: port must be a single value"),
    ('port = "seven"\n', 'line 1: port must be a whole number (no quotes) (is "seven")'),
    ("port = \n", "is not valid TOML"),
])
def test_a_doubtful_config_stops_the_agent(workdir, text, message):
    path = write_config(workdir, text)
    result = subprocess.run([AGENT, "serve", "--config", str(path)], capture_output=True, text=True,
                            timeout=WAIT_SECONDS)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("text, line", [
    ("# the agent's config\nkeys = 5\n", "line 2: keys must be a string in double quotes (is 5)"),
    ("rate = true\n", "line 1: rate must be a number (no quotes) (is true)"),
    ('port = "17107"\n', 'line 1: port must be a whole number (no quotes) (is "17107")'),
    ("port = 99999\n", "line 1: port 99999 is not in the range 0<=x<=65535"),
    ("burst = 0\n", "line 1: burst 0 is not in the range x>=1"),
    ('listen = ["[::1"]\n', "line 1: listen '[::1' is not an address; give ADDR, [ADDR], ADDR:PORT or [ADDR]:PORT,"
                             " e.g. 192.0.2.10 or [2001:db8::10]:7100"),
    ('allow = ["0.0.0.0/0"]\n', "line 1: allow '0.0.0.0/0' allows every address; name MITIGATOR's addresses"),
])
def test_config_kinds_and_ranges_are_strict_and_named_by_file_line_and_key(workdir, text, line):
    path = write_config(workdir, text)
    for command in (["serve"], ["status"], ["check"], ["keys", "list"]):
        result = subprocess.run([AGENT, *command, "--config", str(path)], capture_output=True, text=True,
                                timeout=WAIT_SECONDS)
        assert result.returncode == 2
        assert result.stderr == f"Error: config file {path} {line}\n"  # the key, never the flag (--port)


def test_a_config_others_could_edit_is_refused(workdir, configured):
    configured.chmod(0o664)
    result = subprocess.run([AGENT, "serve", "--config", str(configured)], capture_output=True, text=True,
                            timeout=WAIT_SECONDS)
    assert result.returncode == 2
    assert result.stderr == (f"Error: config file {configured} is writable by group or others (mode 0664):"
                             f" run chmod go-w {configured}\n")


def test_a_config_in_a_directory_others_could_edit_gets_a_fix_that_keeps_the_directory_searchable(workdir):
    directory = workdir / "etc"
    directory.mkdir()
    config = directory / "agent.toml"
    config.write_text("port = 7100\n")
    config.chmod(0o644)
    directory.chmod(0o775)
    result = subprocess.run([AGENT, "status", "--config", str(config)], capture_output=True, text=True,
                            timeout=WAIT_SECONDS)
    assert result.returncode == 2
    # chmod go-w, never `chmod 644`: that would take the directory's search bit away.
    assert result.stderr == (f"Error: config directory {directory} is writable by group or others (mode 0775):"
                             f" run chmod go-w {directory}\n")


def test_a_named_config_must_exist(workdir):
    result = subprocess.run([AGENT, "serve", "--config", str(workdir / "absent.toml")],
                            capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
