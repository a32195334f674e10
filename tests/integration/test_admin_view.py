"""The admin's view against the real agent and OpenSSH: status, check, start-up warnings, listen forms, journald."""

from __future__ import annotations

import dataclasses
import glob
import grp
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from conftest import AGENT, WAIT_SECONDS, AgentProcess, make_snapshot, run_agent
from mitigator_agent import modulestate
from mitigator_agent.hostkey import fingerprint_line, load_host_key
from mitigator_agent.snapshot import encode

ME = pwd.getpwuid(os.geteuid()).pw_name
MODULE = "ABI 2, HZ 250, isn_algorithm seq_and_ts_off, cookie_clock wall, set_generation 0, tcp_syncookies 2"
JOURNAL_SOCKET = "/run/systemd/journal/stdout"
JOURNALD = "/lib/systemd/systemd-journald"


def config_for(agent: AgentProcess) -> Path:
    """The agent's settings as a config file, as an installed machine has them (listen with its port)."""
    path = agent.workdir / "admin.toml"
    path.write_text(f'keys = "{agent.keys_path}"\nhost-key = "{agent.host_key_path}"\n'
                    f'device = "{agent.device_path}"\nruntime-dir = "{agent.runtime_dir}"\n'
                    f'state-dir = "{agent.workdir / "state"}"\n'
                    f'listen = ["127.0.0.1:{agent.port("127.0.0.1")}", "[::1]:{agent.port("::1")}"]\nuser = "{ME}"\n')
    path.chmod(0o644)
    return path


def test_status_reads_serves_config_and_shows_the_last_poll_per_instance(agent, client_key):
    config = config_for(agent)
    before = run_agent("status", "--config", str(config))
    assert "last poll: mitigator1: none recorded" in before.stdout.splitlines()
    assert agent.ssh(client_key, "get").returncode == 0  # a stock OpenSSH client polls
    agent.wait_for(r"^INFO poll .*instance=mitigator1 .*command=get status=0")
    # the agent writes its runtime file once per burst of polls (runstate.WRITE_DELAY after the first)
    deadline = time.monotonic() + WAIT_SECONDS
    while "last poll: mitigator1: none recorded" in (result := run_agent("status", "--config", str(config))).stdout:
        assert time.monotonic() < deadline, result.stdout
        time.sleep(0.2)
    lines = result.stdout.splitlines()
    host_key = fingerprint_line(load_host_key(str(agent.host_key_path)))
    assert lines[:5] == [
        f"host key: {host_key} ({agent.host_key_path}; MITIGATOR pins it)",
        f"keys: 1 admitted (mitigator1) from {agent.keys_path}",
        f"module: loaded, {MODULE} ({agent.device_path})",
        f"device: readable by {ME}",
        "tcp_syncookies: 2",
    ]
    assert f"listening: 127.0.0.1:{agent.port('127.0.0.1')}" in lines
    assert f"listening: [::1]:{agent.port('::1')}" in lines
    last = [line for line in lines if line.startswith("last poll: ")]
    assert len(last) == 1
    assert re.fullmatch(r"last poll: mitigator1 from 127\.0\.0\.1 at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+ s ago\):"
                        r" get, exit status 0, ok", last[0]), last[0]
    document = json.loads(run_agent("status", "--config", str(config), "--json").stdout)
    poll = next(item for item in document["items"] if item["name"] == "last-poll")
    assert poll["facts"]["source"] == "127.0.0.1" and poll["facts"]["key"] == client_key.fingerprint
    assert result.returncode == (0 if document["ok"] else 1)
    # The runtime state holds no secret: none of the snapshot's bytes, no answer.
    stored = (agent.runtime_dir / "last-polls.json").read_text()
    assert "secret" not in stored and oct((agent.runtime_dir / "last-polls.json").stat().st_mode & 0o777) == "0o644"


def test_status_check_and_keys_list_json_follow_the_documented_schemas(agent, workdir):
    """Every --json document, healthy or not, validates against the schema the man page prints."""
    import jsonschema  # a test dependency (pyproject's test extra): never skipped
    from mitigator_agent.health import KEYS_LIST_SCHEMA, REPORT_SCHEMA
    healthy = config_for(agent)
    broken = workdir / "broken.toml"  # nothing there: no keys, no host key, no module, nobody listening
    broken.write_text(f'keys = "{workdir / "nokeys"}"\nhost-key = "{workdir / "nokey"}"\n'
                      f'device = "{workdir / "nodevice"}"\nruntime-dir = "{workdir / "norun"}"\nport = 1\n'
                      f'user = "{ME}"\n')
    nobody_there = workdir / "nouser.toml"
    nobody_there.write_text('user = "no-such-user-here"\n')
    for path in (broken, nobody_there):
        path.chmod(0o644)
    seen = set()
    for config in (healthy, broken, nobody_there):
        for command in (["status"], ["check", "--ntp-server", "127.0.0.1:9", "--timeout", "0.2"]):
            result = run_agent(*command, "--config", str(config), "--json")
            document = json.loads(result.stdout)
            jsonschema.validate(document, REPORT_SCHEMA)
            assert document["config"] == str(config) and document["command"] == command[0]
            assert result.returncode == (0 if document["ok"] else 1)
            assert document["ok"] == all(item["status"] != "fail" for item in document["items"])
            seen.update((item["name"], item["status"]) for item in document["items"])
        listed = run_agent("keys", "list", "--config", str(config), "--json")
        document = json.loads(listed.stdout)
        jsonschema.validate(document, KEYS_LIST_SCHEMA)
        assert listed.returncode == (0 if document["admits_nobody_because"] is None else 1)
    assert {("keys", "ok"), ("keys", "fail"), ("host-key", "fail"), ("module", "fail"), ("listening", "ok"),
            ("listening", "fail"), ("user", "fail")} <= seen


def test_the_check_probe_is_not_logged_as_an_attack(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--verbose")
    start = agent.mark()
    result = run_agent("check", "--config", str(config_for(agent)), "--ntp-server", "127.0.0.1:9", "--timeout", "0.2")
    assert f"ok   agent listening on 127.0.0.1:{agent.port('127.0.0.1')}" in result.stdout.splitlines()
    agent.wait_for_all(r"^DEBUG check-probe src=(127\.0\.0\.1|\[::1\]):\d+$", 2, start)
    assert agent.count(r"refused|penalised|WARNING", start) == 0


def test_serve_says_at_start_what_will_not_work_and_keeps_serving(start_agent, client_key, snapshot, workdir):
    one = workdir / "syncookies-1"
    one.write_bytes(encode(dataclasses.replace(snapshot, tcp_syncookies=1)))
    agent = start_agent(client_key.public_line + "\n", "--device", str(one))
    agent.wait_for('^WARNING will-not-work check=tcp-syncookies problem="tcp_syncookies = 2 \\(is 1\\)"'
                   ' fix="run sysctl -w net.ipv4.tcp_syncookies=2 and keep it in /etc/sysctl.d/90-tcpsecrets.conf"$')
    assert agent.ssh(client_key, "get").returncode == 0  # still serving

    absent = workdir / "absent"
    no_module = start_agent(client_key.public_line + "\n", "--device", str(absent))
    # an error, naming this host's kernel and why (this host's /lib/modules, as the agent sees it)
    absence = modulestate.diagnose()
    assert absence.kernel == os.uname().release
    no_module.wait_for(f'^ERROR will-not-work check=module problem="module loaded: tcpsecrets module not loaded'
                       f' \\(no {re.escape(str(absent))}\\): {re.escape(absence.sentence)}"'
                       f' fix="{re.escape(absence.remedy)}"$')
    assert no_module.process.poll() is None


def test_keys_that_admit_nobody_are_reported_at_start(start_agent, workdir):
    agent = start_agent(None)  # no keys file at all
    keys = re.escape(str(workdir / "keys"))
    # The fix names the file the agent reads (not the default one), so the admin edits the right file.
    agent.wait_for(f'^WARNING keys-file-admits-nobody reason="keys file {keys} does not exist"'
                   f' fix="run mitigator-agent keys add --keys {keys} \'ssh-ed25519 AAAA... mitigator1\' with the key'
                   ' from MITIGATOR\'s admin"$')


@pytest.mark.parametrize("form", ["[::1]", "::1", "127.0.0.1:PORT", "[::1]:PORT"])
def test_listen_takes_sshds_address_forms(start_agent, client_key, form):
    if "PORT" in form:
        with socket.socket(socket.AF_INET6 if "::" in form else socket.AF_INET) as probe:
            probe.bind(("::1" if "::" in form else "127.0.0.1", 0))
            port = probe.getsockname()[1]
        form = form.replace("PORT", str(port))
    agent = start_agent(client_key.public_line + "\n", listen=[form])
    host = "::1" if "::" in form else "127.0.0.1"
    assert agent.ssh(client_key, "get", host=host).returncode == 0
    if form.endswith("]") or form == "::1":
        assert set(agent.ports) == {"::1"}
    else:
        assert agent.ports == {host: port}  # the address's own port wins over --port 0


@pytest.mark.parametrize("form, reason", [
    ("[::1", "'[::1' is not an address"),
    ("localhost", "'localhost' is not an IP address"),
    ("127.0.0.1:http", "'127.0.0.1:http': port 'http' is not a number from 0 to 65535"),
])
def test_a_bad_listen_address_is_named_with_the_forms_it_takes(workdir, form, reason):
    result = run_agent("serve", "--listen", form, "--keys", str(workdir / "keys"))
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '--listen': {reason}")
    assert "Errno" not in result.stderr


def _serve_to(stdout_fd: int, env: dict, workdir: Path) -> subprocess.Popen:
    """serve with stdout and stderr on `stdout_fd`, as systemd connects a service's (StandardError=inherit)."""
    return subprocess.Popen(
        [AGENT, "serve", "--config", str(workdir / "empty.toml"), "--port", "0", "--listen", "127.0.0.1",
         "--keys", str(workdir / "keys"), "--host-key", str(workdir / "host.ed25519"),
         "--device", str(workdir / "absent"), "--runtime-dir", str(workdir / "run")],
        stdout=stdout_fd, stderr=stdout_fd, env=env)


@pytest.fixture
def empty_config(workdir: Path) -> Path:
    path = workdir / "empty.toml"
    path.write_text("")
    path.chmod(0o644)
    return path


def test_journal_priority_prefixes_when_stdout_is_the_journal_stream(workdir, empty_config):
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}  # what systemd sets for a service
    proc = _serve_to(write_end, env, workdir)
    os.close(write_end)
    lines = []
    with os.fdopen(read_end, "r") as pipe:
        for line in pipe:
            lines.append(line.rstrip("\n"))
            if "listening on" in line:
                break
        proc.terminate()
        proc.wait(WAIT_SECONDS)
    assert lines[-1].startswith("<6>listening on 127.0.0.1:")
    assert any(line.startswith("<6>starting version=") for line in lines)
    assert any(line.startswith("<3>will-not-work check=module ") for line in lines)  # an error: see cli.py
    assert any(line.startswith('<4>keys-file-admits-nobody reason=') for line in lines)
    assert not any(line.startswith(("INFO", "WARNING", "ERROR")) for line in lines)


def test_plain_levels_when_stdout_is_not_the_journal(workdir, empty_config):
    read_end, write_end = os.pipe()
    env = {**os.environ, "JOURNAL_STREAM": "1:2"}  # some other stream (inherited, not ours)
    proc = _serve_to(write_end, env, workdir)
    os.close(write_end)
    with os.fdopen(read_end, "r") as pipe:
        first = pipe.readline()
        proc.terminate()
        proc.wait(WAIT_SECONDS)
    assert first.startswith("INFO ") or first.startswith("WARNING ")


@pytest.fixture
def journal() -> Iterator[Tuple[str, List[str]]]:
    """A running journald: (its stdout stream socket, the journalctl arguments that read what it stored).

    The machine's own when it runs one; else (a container, a build host
    without systemd as PID 1) a private instance started here in a journal
    namespace of its own (``systemd-journald NAMESPACE``, as
    systemd-journald@.service runs it), removed with everything it wrote
    afterwards.  Skipped only where neither exists or this is not root.
    """
    if shutil.which("journalctl") is None:
        pytest.skip("no journalctl on this machine")
    if os.path.exists(JOURNAL_SOCKET):
        yield JOURNAL_SOCKET, []
        return
    if os.geteuid() != 0 or not os.access(JOURNALD, os.X_OK):
        pytest.skip(f"no journald running, and {JOURNALD} cannot be started here (needs root)")
    namespace = f"mitigatortest{uuid.uuid4().hex[:8]}"
    stdout_socket = f"/run/systemd/journal.{namespace}/stdout"
    daemon = subprocess.Popen([JOURNALD, namespace], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not os.path.exists(stdout_socket):
            assert daemon.poll() is None, f"{JOURNALD} {namespace} exited ({daemon.returncode})"
            assert time.monotonic() < deadline, f"{JOURNALD} {namespace} made no {stdout_socket}"
            time.sleep(0.05)
        yield stdout_socket, [f"--namespace={namespace}"]
    finally:
        daemon.terminate()
        daemon.wait(WAIT_SECONDS)
        for leftover in (f"/run/systemd/journal.{namespace}", *glob.glob(f"/run/log/journal/*.{namespace}"),
                         *glob.glob(f"/var/log/journal/*.{namespace}")):
            shutil.rmtree(leftover, ignore_errors=True)


def test_journalctl_priority_filter_selects_the_agents_warnings(workdir, empty_config, journal):
    """A real journal stream, as systemd connects a service's stdout: journalctl -p warning selects by priority."""
    stdout_socket, namespace = journal
    identifier = f"mitigator-test-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.connect(stdout_socket)
        # sd-journal stream header: identifier, unit, priority, level prefix, syslog, kmsg, console.
        stream.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        stream.shutdown(socket.SHUT_RD)
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = _serve_to(stream.fileno(), env, workdir)

    def journalctl(*args: str) -> List[str]:
        return subprocess.run(["journalctl", *namespace, "-t", identifier, *args, "-o", "cat", "--no-pager"],
                              capture_output=True, text=True, timeout=WAIT_SECONDS).stdout.splitlines()

    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not any("listening on" in line for line in journalctl()):
            assert time.monotonic() < deadline, journalctl()
            subprocess.run(["journalctl", *namespace, "--sync"], capture_output=True, timeout=WAIT_SECONDS)
    finally:
        proc.terminate()
        proc.wait(WAIT_SECONDS)
    everything = journalctl()
    warnings = journalctl("-p", "warning")
    assert all(not line.startswith("<") for line in everything)  # journald took the prefixes as priorities
    assert warnings == [line for line in everything if line.startswith(("will-not-work", "keys-file-admits-nobody"))]
    assert any(line.startswith("will-not-work check=module ") for line in journalctl("-p", "err"))
    assert any(line.startswith("keys-file-admits-nobody ") for line in warnings)
    assert any(line.startswith("starting version=") for line in everything)


def test_check_says_why_no_ntp_server_answered_in_words(agent):
    """A name that does not resolve and a server that stays silent: the reason, never an errno."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes the query, never answers
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        result = run_agent("check", "--config", str(config_for(agent)), "--ntp-server", "no-such-host.invalid",
                           "--ntp-server", server, "--timeout", "0.2")
    assert result.returncode == 1
    offset = [line for line in result.stdout.splitlines() if "NTP offset" in line]
    assert len(offset) == 1
    # the resolver's own words vary (no DNS at all: "Temporary failure in name resolution")
    assert re.fullmatch(r"FAIL NTP offset: no server answered \(no-such-host\.invalid: cannot resolve"
                        r" no-such-host\.invalid \([A-Za-z ]+\); " + re.escape(server) + r": no answer within 0\.2 s\):"
                        r" name a reachable NTP server with --ntp-server HOST \(your network's own\)", offset[0]), offset[0]
    assert "Errno" not in result.stdout + result.stderr


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A StrictModes-safe directory another account can traverse (/run is root's, 0755)."""
    if os.geteuid() != 0:
        pytest.skip("judging files as another user needs root")
    path = Path(tempfile.mkdtemp(prefix="mitigator-test-", dir="/run"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_keys_file_and_device_only_root_reads_are_judged_as_the_service_user(shared_dir, client_key):
    """Keys file and device root:root 0600, `user = "nobody"` in the config: root's commands see what nobody sees."""
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    keys, device, host_key = shared_dir / "keys", shared_dir / "snapshot", shared_dir / "host.ed25519"
    keys.write_text(client_key.public_line + "\n")
    device.write_bytes(encode(make_snapshot()))
    for path in (keys, device):
        path.chmod(0o600)
    config = shared_dir / "agent.toml"
    config.write_text(f'keys = "{keys}"\ndevice = "{device}"\nhost-key = "{host_key}"\n'
                      f'runtime-dir = "{shared_dir / "run"}"\nport = 1\nuser = "nobody"\n')
    config.chmod(0o644)
    keys_fix = f"run chgrp {group} {keys} && chmod 640 {keys} (and let nobody into its directories)"
    status = run_agent("status", "--config", str(config))
    assert status.returncode == 1
    assert f"keys: none admitted: keys file {keys} cannot be opened: Permission denied: {keys_fix}" in status.stdout.splitlines()
    assert (f"device: not readable by nobody: Permission denied: run chgrp {group} {device} && chmod g+r {device}"
            in status.stdout.splitlines())
    listed = run_agent("keys", "list", "--config", str(config))
    assert (listed.returncode, listed.stdout) == (1, "")
    assert listed.stderr == (f"warning: the agent (nobody) admits nobody: keys file {keys} cannot be opened:"
                             f" Permission denied: {keys_fix}\n")
    check = run_agent("check", "--config", str(config), "--ntp-server", "127.0.0.1:9", "--timeout", "0.2")
    assert check.returncode == 1
    lines = check.stdout.splitlines()
    assert f"FAIL keys file admits nobody: keys file {keys} cannot be opened: Permission denied: {keys_fix}" in lines
    assert (f"FAIL device {device} not readable by nobody: Permission denied: run chgrp {group} {device}"
            f" && chmod g+r {device}") in lines
    assert (f"FAIL host key {host_key} does not exist yet: run chown nobody {shared_dir}, then runuser -u nobody --"
            f" mitigator-agent host-key --host-key {host_key}") in lines  # nobody may not create it there
    for path in (keys, device):  # what the FAIL lines said
        os.chown(path, 0, nobody.pw_gid)
        path.chmod(0o640)
    fixed = run_agent("check", "--config", str(config), "--ntp-server", "127.0.0.1:9", "--timeout", "0.2").stdout
    assert f"ok   keys file {keys} admits 1 key (mitigator1)" in fixed.splitlines()
    assert f"ok   device {device} readable by nobody" in fixed.splitlines()


@pytest.mark.parametrize("args, last_line", [
    (["check", "--timeout", "-1"], "Error: Invalid value for '--timeout': -1.0 is not in the range x>0."),
    (["check", "--ntp-server", "127.0.0.1:abc"],
     "Error: Invalid value for '--ntp-server': '127.0.0.1:abc': port 'abc' is not a number from 1 to 65535"),
    (["poll", "127.0.0.1", "--key", "id", "--host-fingerprint", "aa:bb:cc"],
     "Error: Invalid value for '--host-fingerprint': 'aa:bb:cc' is not a SHA256 fingerprint; give what"
     " `mitigator-agent host-key` prints on the agent (SHA256:...)"),
])
def test_a_bad_flag_is_one_line_naming_it_never_a_traceback(args, last_line):
    result = run_agent(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == last_line
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr
