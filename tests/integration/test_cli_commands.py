"""The console script end to end: serve's start and stop, poll, check against a live agent."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import AGENT, WAIT_SECONDS, AgentProcess, run_agent
from mitigator_agent import __version__
from mitigator_agent.answers import HostFacts, json_answer
from mitigator_agent.clock import kernel_clock_synced

ME = pwd.getpwuid(os.geteuid()).pw_name


def host_fingerprint(agent: AgentProcess) -> str:
    result = subprocess.run(["ssh-keygen", "-l", "-f", str(agent.host_key_path)],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_poll_pinned_fingerprint_prints_validated_json(agent, client_key, snapshot, host):
    result = run_agent("poll", host, "--port", str(agent.port(host)), "--key", str(client_key.path),
                       "--host-fingerprint", host_fingerprint(agent))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    facts = HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())
    assert json.loads(result.stdout) == json_answer(snapshot, facts)


def test_poll_with_known_hosts_file(agent, client_key):
    result = run_agent("poll", "127.0.0.1", "--port", str(agent.port("127.0.0.1")),
                       "--key", str(client_key.path), "--known-hosts", str(agent.known_hosts))
    assert result.returncode == 0 and result.stderr == ""


def poll_as(home: Path, *args: str) -> subprocess.CompletedProcess:
    """`mitigator-agent poll ARGS` with HOME=home: its default known_hosts is home/.ssh/known_hosts."""
    return subprocess.run([AGENT, "poll", *args], capture_output=True, text=True, timeout=WAIT_SECONDS,
                          env={**os.environ, "HOME": str(home)})


def test_poll_refuses_a_host_key_nothing_verifies_and_accept_new_adds_it(agent, client_key, workdir):
    """As ssh in batch mode: no unverified key is trusted; --accept-new is StrictHostKeyChecking=accept-new."""
    port = agent.port("127.0.0.1")
    known_hosts = workdir / ".ssh" / "known_hosts"
    refused = poll_as(workdir, "127.0.0.1", "--port", str(port), "--key", str(client_key.path))
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (f"poll: Host key verification failed: no host key of 127.0.0.1 port {port} is known in"
                              f" {known_hosts}; it has {host_fingerprint(agent)}: pin it with --host-fingerprint"
                              " (compare with what `mitigator-agent host-key` prints on the agent), or take it on"
                              " first use with --accept-new\n")
    assert not known_hosts.exists()
    added = poll_as(workdir, f"127.0.0.1:{port}", "--key", str(client_key.path), "--accept-new")
    assert added.returncode == 0, added.stderr
    assert added.stderr == (f"Warning: Permanently added '[127.0.0.1]:{port}' ({host_fingerprint(agent)})"
                            f" to {known_hosts}\n")
    assert json.loads(added.stdout)["net_secret"]
    # Now known: ssh itself agrees with the line written.
    check = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{port}", "-f", str(known_hosts)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and host_fingerprint(agent) in subprocess.run(
        ["ssh-keygen", "-lf", str(known_hosts)], capture_output=True, text=True).stdout
    again = poll_as(workdir, f"127.0.0.1:{port}", "--key", str(client_key.path))
    assert (again.returncode, again.stderr) == (0, "")


def test_poll_says_changed_for_a_changed_host_key_even_with_accept_new(agent, client_key, workdir):
    port = agent.port("127.0.0.1")
    known_hosts = workdir / "known_hosts"
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "old-host")], check=True)
    assert other.returncode == 0
    old_line = (workdir / "old-host.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {old_line[0]} {old_line[1]}\n")
    old_fingerprint = subprocess.run(["ssh-keygen", "-lf", str(workdir / "old-host.pub")], capture_output=True,
                                     text=True, check=True).stdout.split()[1]
    for extra in ([], ["--accept-new"]):
        result = poll_as(workdir, "127.0.0.1", "--port", str(port), "--key", str(client_key.path),
                         "--known-hosts", str(known_hosts), *extra)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == (f"poll: Host key verification failed: the host key of 127.0.0.1 port {port} has"
                                 f" CHANGED: it is {host_fingerprint(agent)}, {known_hosts} has {old_fingerprint};"
                                 " if the agent's key was replaced on purpose, remove the old entry (ssh-keygen -R"
                                 f" '[127.0.0.1]:{port}' -f {known_hosts}); else someone may be in between\n")
    assert known_hosts.read_text().count("\n") == 1  # nothing added


@pytest.mark.parametrize("target", ["[::1]", "[::1]:{port}", "::1"])
def test_poll_reads_bracketed_ipv6_and_host_port(agent, client_key, target):
    port = agent.port("::1")
    args = [target.format(port=port)] + ([] if "{port}" in target else ["--port", str(port)])
    result = run_agent("poll", *args, "--key", str(client_key.path), "--host-fingerprint", host_fingerprint(agent))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert json.loads(result.stdout)["net_secret"]


@pytest.mark.parametrize("target, why", [
    ("127.0.0.1:99999", "'127.0.0.1:99999': the port must be a number from 1 to 65535"),
    ("127.0.0.1:22", "'127.0.0.1:22' names port 22, --port 7100: give one"),
    ("[::1", "'[::1': write [IPv6] or [IPv6]:PORT"),
])
def test_poll_refuses_a_target_it_cannot_read(client_key, target, why):
    extra = ["--port", "7100"] if target.endswith(":22") else []
    result = run_agent("poll", target, *extra, "--key", str(client_key.path))
    assert result.returncode == 2 and f"Invalid value for HOST: {why}" in result.stderr


def test_poll_failures_exit_1_with_the_reason(agent, client_key, second_key):
    port = str(agent.port("127.0.0.1"))
    wrong_pin = run_agent("poll", "127.0.0.1", "--port", port, "--key", str(client_key.path),
                          "--host-fingerprint", "SHA256:" + "A" * 43)
    assert wrong_pin.returncode == 1 and wrong_pin.stdout == ""
    assert wrong_pin.stderr == (f"poll: Host key verification failed: 127.0.0.1 port {port} has host key"
                                f" {host_fingerprint(agent)}, expected SHA256:{'A' * 43}; compare with what"
                                " `mitigator-agent host-key` prints on the agent\n")

    not_admitted = run_agent("poll", "127.0.0.1", "--port", port, "--key", str(second_key.path),
                             "--known-hosts", str(agent.known_hosts))
    assert not_admitted.returncode == 1
    assert not_admitted.stderr == (f"poll: mitigator_agent@127.0.0.1: Permission denied (publickey): the agent does not"
                                   f" admit {second_key.fingerprint}; add its public key on the agent:"
                                   " mitigator-agent keys add 'ssh-ed25519 ... NAME'\n")

    agent.device_path.unlink()
    no_module = run_agent("poll", "127.0.0.1", "--port", port, "--key", str(client_key.path),
                          "--known-hosts", str(agent.known_hosts))
    assert no_module.returncode == 1
    assert "agent answered exit status 2: tcpsecrets module not loaded" in no_module.stderr


def test_poll_understands_a_fingerprint_without_its_prefix(agent, client_key):
    bare = host_fingerprint(agent).split(":", 1)[1]
    result = run_agent("poll", "127.0.0.1", "--port", str(agent.port("127.0.0.1")), "--key", str(client_key.path),
                       "--host-fingerprint", bare)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout)["net_secret"]


def test_poll_errors_read_like_ssh(agent, client_key, workdir):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        port = closed.getsockname()[1]
        refused = run_agent("poll", "127.0.0.1", "--port", str(port), "--key", str(client_key.path))
    assert refused.returncode == 1
    assert refused.stderr == (f"poll: connect to host 127.0.0.1 port {port}: Connection refused"
                              " (is the agent running and listening there? mitigator-agent check)\n")

    unknown = run_agent("poll", "no-such-host.invalid", "--key", str(client_key.path))
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("poll: Could not resolve hostname no-such-host.invalid: ")
    assert unknown.stderr.count("\n") == 1 and "gaierror" not in unknown.stderr

    public = workdir / "mitigator1.key.pub"
    public.write_text(client_key.public_line + "\n")
    given_pub = run_agent("poll", "127.0.0.1", "--port", str(agent.port("127.0.0.1")), "--key", str(public))
    assert given_pub.returncode == 1
    assert given_pub.stderr == (f'poll: Load key "{public}": invalid format: that is a public key; give the private'
                                " key (the file without .pub)\n")

    client_key.path.chmod(0o644)  # ssh refuses such a key: so does poll
    too_open = run_agent("poll", "127.0.0.1", "--port", str(agent.port("127.0.0.1")), "--key", str(client_key.path))
    assert too_open.returncode == 1
    assert too_open.stderr == (f"poll: Permissions 0644 for '{client_key.path}' are too open: a private key must not"
                               f" be accessible by others; run chmod 600 {client_key.path}\n")
    ssh = agent.ssh(client_key, "get")
    assert b"are too open" in ssh.stderr  # the words are OpenSSH's own


def test_check_sees_the_listening_agent(agent):
    result = run_agent("check", "--device", str(agent.device_path), "--keys", str(agent.keys_path),
                       "--host-key", str(agent.host_key_path), "--port", str(agent.port("127.0.0.1")),
                       "--listen", "127.0.0.1", "--listen", "::1", "--ntp-server", "127.0.0.1:9", "--timeout", "0.2")
    lines = result.stdout.splitlines()
    assert f"ok   agent listening on 127.0.0.1:{agent.port('127.0.0.1')}" in lines
    # ::1 has its own port in this setup: check says so instead of guessing.
    assert (f"FAIL agent listening: nothing listening on [::1]:{agent.port('127.0.0.1')} (connection refused):"
            " start the agent: mitigator-agent serve") in lines or any(
        line.startswith(f"FAIL agent listening: nothing listening on [::1]:{agent.port('127.0.0.1')}") for line in lines)
    with_ports = run_agent("check", "--device", str(agent.device_path), "--keys", str(agent.keys_path),
                           "--host-key", str(agent.host_key_path), "--listen", f"127.0.0.1:{agent.port('127.0.0.1')}",
                           "--listen", f"[::1]:{agent.port('::1')}", "--ntp-server", "127.0.0.1:9", "--timeout", "0.2")
    assert f"ok   agent listening on [::1]:{agent.port('::1')}" in with_ports.stdout.splitlines()
    assert result.returncode == 1


def test_default_listen_is_every_address(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", listen=())
    assert set(agent.ports) == {"0.0.0.0", "::"}
    assert agent.ssh(client_key, "get", host="127.0.0.1").returncode == 0
    assert agent.ssh(client_key, "get", host="::1").returncode == 0


def test_host_key_kept_across_restarts_and_sigterm_stops_cleanly(start_agent, client_key):
    first = start_agent(client_key.public_line + "\n")
    key_bytes = first.host_key_path.read_bytes()
    first.wait_for(r"host-key-created")
    first.stop()
    assert first.process.returncode == 0
    first.wait_for(r"^INFO stopping$")

    second = start_agent(client_key.public_line + "\n")
    assert second.host_key_path.read_bytes() == key_bytes
    assert second.count("host-key-created") == 0
    # The known_hosts written from the first key still pins the second run.
    assert second.ssh(client_key, "get").returncode == 0


def test_serve_refuses_to_start_with_unusable_host_key(workdir):
    host_key = workdir / "host.ed25519"
    host_key.write_text("garbage")
    host_key.chmod(0o600)
    result = run_agent("serve", "--port", "0", "--listen", "127.0.0.1", "--host-key", str(host_key),
                       "--keys", str(workdir / "keys"), "--device", str(workdir / "snapshot"))
    assert result.returncode == 1
    assert result.stderr == (f'ERROR cannot-start reason="host key {host_key} is not a usable private key'
                             ' (Invalid private key); it is not replaced because MITIGATOR pins it"\n')
    assert host_key.read_text() == "garbage"


def test_serve_names_the_missing_host_key_directory_never_a_temporary_file(workdir):
    missing = workdir / "nowhere" / "host.ed25519"
    result = run_agent("serve", "--port", "0", "--listen", "127.0.0.1", "--host-key", str(missing),
                       "--keys", str(workdir / "keys"), "--device", str(workdir / "snapshot"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f'ERROR cannot-start reason="cannot create host key {missing}: its directory'
                             f' {missing.parent} does not exist; create it for the key\'s owner: mkdir -p'
                             f' {missing.parent} && chown {ME} {missing.parent}"\n')


def test_serve_reports_a_port_in_use(workdir):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_agent("serve", "--port", str(port), "--listen", "127.0.0.1",
                           "--host-key", str(workdir / "host.ed25519"), "--keys", str(workdir / "keys"),
                           "--device", str(workdir / "snapshot"), "--runtime-dir", str(workdir / "run"))
    assert result.returncode == 1
    # (before it, the module's absence: an error too)
    assert result.stderr.splitlines()[-1] == (
        f'ERROR cannot-start reason="cannot listen on 127.0.0.1:{port}: another program has'
        f" that port (ss -ltnp 'sport = :{port}' shows which); stop it or choose another port\"")


def test_host_key_command_creates_once_then_prints_the_same_fingerprint(workdir):
    host_key = workdir / "host.ed25519"
    first = run_agent("host-key", "--host-key", str(host_key))
    assert first.returncode == 0, first.stderr
    assert first.stderr == f"created {host_key}\n"
    assert oct(host_key.stat().st_mode & 0o777) == "0o600"
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(host_key)], capture_output=True, text=True, check=True)
    assert first.stdout.split()[1] == keygen.stdout.split()[1]
    key_bytes = host_key.read_bytes()
    second = run_agent("host-key", "--host-key", str(host_key))
    assert (second.returncode, second.stderr, second.stdout) == (0, "", first.stdout)
    assert host_key.read_bytes() == key_bytes


def test_host_key_command_given_a_directory_names_the_file_to_give(workdir):
    result = run_agent("host-key", "--host-key", str(workdir))
    assert result.returncode == 1
    assert result.stderr == (f"host key {workdir} is a directory; name the key file itself,"
                             f" e.g. {workdir / 'host.ed25519'}\n")  # not `chmod 600` on the directory


def test_host_key_command_in_a_missing_directory_says_so(workdir):
    missing = workdir / "nowhere" / "host.ed25519"
    result = run_agent("host-key", "--host-key", str(missing))
    assert result.returncode == 1
    assert result.stderr == (f"cannot create host key {missing}: its directory {missing.parent} does not exist;"
                             f" create it for the key's owner: mkdir -p {missing.parent} && chown {ME} {missing.parent}\n")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_flags(flag):
    result = run_agent(flag)
    assert result.returncode == 0 and result.stdout.startswith("Usage: mitigator-agent [OPTIONS] [COMMAND] [ARGS]...")
    assert run_agent("check", flag).stdout.startswith("Usage: mitigator-agent check [OPTIONS]")


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flags(flag):
    result = run_agent(flag)
    assert (result.returncode, result.stdout) == (0, f"mitigator-agent, version {__version__}\n")


def test_host_key_command_shows_the_key_the_config_names(start_agent, client_key, workdir):
    """The fingerprint an admin hands MITIGATOR is the one serve uses, not the default path's."""
    agent = start_agent(client_key.public_line + "\n")
    config = workdir / "serve.toml"
    config.write_text(f'host-key = "{agent.host_key_path}"\n')
    config.chmod(0o644)
    result = run_agent("host-key", "--config", str(config))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split()[1] == host_fingerprint(agent)
    # The command line still wins over the file.
    other = run_agent("host-key", "--config", str(config), "--host-key", str(workdir / "other.ed25519"))
    assert other.returncode == 0 and other.stdout.split()[1] != host_fingerprint(agent)


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
def test_a_host_key_that_is_not_ed25519_is_refused_never_served(workdir, key_type):
    host_key = workdir / f"host.{key_type}"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(host_key)], check=True)
    for command in (["host-key", "--host-key", str(host_key)],
                    ["serve", "--port", "0", "--listen", "127.0.0.1", "--host-key", str(host_key),
                     "--keys", str(workdir / "keys")]):
        result = run_agent(*command)
        assert result.returncode != 0
        assert f"host key {host_key} is {'ssh-rsa' if key_type == 'rsa' else 'ecdsa-sha2-nistp256'}," \
               f" not ssh-ed25519: the agent serves ed25519 host keys only" in result.stderr, result.stderr
