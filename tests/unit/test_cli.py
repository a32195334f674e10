"""The command line: keys add|list|remove, status, check (poll and serve: tests/integration)."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest
from click.testing import CliRunner

from mitigator_agent import cli, health, modulestate
from mitigator_agent.health import quiet_logger
from mitigator_agent.hostkey import fingerprint_line, load_or_create_host_key
from mitigator_agent.knownsources import KnownSources
from mitigator_agent.snapshot import encode
from test_answers import SNAP
from test_clock import FakeNtpServer

ED1 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator1")
ED2 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator2")
ED3 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator3")
RSA = asyncssh.generate_private_key("ssh-rsa", key_size=1024, comment="old")


def public(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def invoke(*args: str, input: str = None):
    return CliRunner().invoke(cli.main, list(args), input=input, catch_exceptions=False)


# A kernel without its headers, as after an update without the headers metapackage: what status
# and check say when the module is missing (tests/unit/test_modulestate.py covers every cause).
FAKE_KERNEL = "6.1.0-57-amd64"


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tmp_path.chmod(0o755)
    (tmp_path / "snapshot").write_bytes(encode(SNAP))
    (tmp_path / "lib-modules").mkdir()
    monkeypatch.setattr(modulestate, "MODULES_ROOT", str(tmp_path / "lib-modules"))
    monkeypatch.setattr(modulestate, "running_kernel", lambda: FAKE_KERNEL)
    return tmp_path


# --- keys -------------------------------------------------------------------

def test_keys_add_list_remove(files):
    keys = str(files / "keys")
    added = invoke("keys", "add", "--keys", keys, *public(ED1).split())  # unquoted words work
    assert added.exit_code == 0
    assert added.stdout == f"added: line 1 {ED1.get_fingerprint('sha256')} mitigator1\n"
    assert invoke("keys", "add", "--keys", keys, public(ED1)).stdout.startswith("already present: line 1 ")
    from_stdin = invoke("keys", "add", "--keys", keys, "-", input=f'from="192.0.2.1" {public(ED2)}\n\n')
    assert from_stdin.exit_code == 0 and from_stdin.stdout.startswith("added: line 2 ")

    listed = invoke("keys", "list", "--keys", keys)
    assert listed.exit_code == 0
    assert listed.stdout == (f"1: {ED1.get_fingerprint('sha256')} mitigator1\n"
                             f'2: {ED2.get_fingerprint("sha256")} mitigator2 [from="192.0.2.1"]\n')

    removed = invoke("keys", "remove", "--keys", keys, ED1.get_fingerprint("sha256"))
    assert removed.exit_code == 0 and removed.stdout.startswith("removed: line 1 ")
    assert invoke("keys", "list", "--keys", keys).stdout.startswith("1: " + ED2.get_fingerprint("sha256"))


def test_keys_add_refuses_non_ed25519(files):
    result = invoke("keys", "add", "--keys", str(files / "keys"), public(RSA))
    assert result.exit_code == 1
    assert result.stderr.startswith("refused: key type ssh-rsa refused: only ssh-ed25519 keys are admitted")
    assert not (files / "keys").exists()


def test_keys_remove_unknown_fails(files):
    (files / "keys").write_text(public(ED1) + "\n")
    result = invoke("keys", "remove", "--keys", str(files / "keys"), "nobody")
    assert result.exit_code == 1 and "matches 'nobody'" in result.stderr


ME = pwd.getpwuid(os.geteuid()).pw_name


def test_keys_list_of_a_file_the_agent_refuses_lists_nothing_and_says_why(files):
    keys = files / "keys"
    keys.write_text(f"{public(RSA)}\n{public(ED1)}\n")
    keys.chmod(0o666)
    result = invoke("keys", "list", "--keys", str(keys))
    assert (result.exit_code, result.stdout) == (1, "")  # the agent admits nobody: nothing is "listed"
    assert result.stderr == (f"warning: the agent ({ME}) admits nobody: keys file {keys} is writable by group or"
                             f" others (mode 0666): run chmod go-w {keys}\n")
    keys.chmod(0o644)
    result = invoke("keys", "list", "--keys", str(keys))
    assert (result.exit_code, result.stdout) == (0, f"2: {ED1.get_fingerprint('sha256')} mitigator1\n")
    assert result.stderr == (f"warning: {keys}:1: key type ssh-rsa refused: only ssh-ed25519 keys are admitted;"
                             " line skipped\n")


def test_keys_list_json_follows_its_schema(files):
    import jsonschema  # a test dependency: never skipped
    from mitigator_agent.health import KEYS_LIST_SCHEMA
    keys = files / "keys"
    keys.write_text(f'from="192.0.2.1" {public(ED1)}\n{public(ED2)}\n')
    result = invoke("keys", "list", "--keys", str(keys), "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    jsonschema.validate(document, KEYS_LIST_SCHEMA)
    assert document["keys"] == [
        {"line": 1, "fingerprint": ED1.get_fingerprint("sha256"), "instance": "mitigator1",
         "options": ['from="192.0.2.1"']},
        {"line": 2, "fingerprint": ED2.get_fingerprint("sha256"), "instance": "mitigator2", "options": []}]
    assert (document["user"], document["admits_nobody_because"]) == (ME, None)


PRIVATE_REFUSAL = ("refused: that is a private key: it stays with MITIGATOR; give its public half"
                   " (the .pub file, or ssh-keygen -y -f KEYFILE)\n")


@pytest.mark.parametrize("how", ["argument", "words", "stdin"])
def test_a_pasted_private_key_is_refused_and_never_echoed(files, how):
    private = ED1.export_private_key().decode()
    keys = str(files / "keys")
    if how == "stdin":
        result = invoke("keys", "add", "--keys", keys, "-", input=private)
    elif how == "words":
        result = invoke("keys", "add", "--keys", keys, *private.split())
    else:
        result = invoke("keys", "add", "--keys", keys, private)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(PRIVATE_REFUSAL)
    body = [line for line in private.splitlines() if "-----" not in line]
    assert not any(line[:20] in result.stderr for line in body)
    assert not (files / "keys").exists()


def test_keys_from_stdin_skip_comments_and_a_private_key_among_them(files):
    stdin = (f"# MITIGATOR, first instance\n{public(ED1)}\n\n{ED2.export_private_key().decode()}"
             f"   # indented comment\n")
    result = invoke("keys", "add", "--keys", str(files / "keys"), "-", input=stdin)
    assert result.exit_code == 1  # the private key was refused; the public one added
    assert result.stdout == f"added: line 1 {ED1.get_fingerprint('sha256')} mitigator1\n"
    assert result.stderr == PRIVATE_REFUSAL


def test_a_duplicate_instance_name_is_warned_about(files):
    keys = files / "keys"
    invoke("keys", "add", "--keys", str(keys), public(ED1))
    other = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator1")
    result = invoke("keys", "add", "--keys", str(keys), public(other))
    assert result.exit_code == 0
    assert result.stderr == (f"warning: instance name mitigator1 is also on line 1 ({ED1.get_fingerprint('sha256')}):"
                             " logs and `keys remove mitigator1` cannot tell them apart; give this key another name\n")
    refused = invoke("keys", "remove", "--keys", str(keys), "mitigator1")
    assert refused.exit_code == 1
    assert refused.stderr == (f"refused: instance name 'mitigator1' is on lines 1, 2; nothing removed: name one key by"
                              f" its fingerprint (mitigator-agent keys remove {ED1.get_fingerprint('sha256')})\n")
    assert len(keys.read_text().splitlines()) == 2


def test_keys_remove_takes_several_selectors_each_its_own(files):
    keys = files / "keys"
    third = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator3")
    keys.write_text(f"{public(ED1)}\n{public(ED2)}\n{public(third)}\n")
    result = invoke("keys", "remove", "--keys", str(keys), "mitigator1", "nobody", third.get_fingerprint("sha256"))
    assert result.exit_code == 1  # "nobody" matched nothing; the others were removed all the same
    assert result.stdout == (f"removed: line 1 {ED1.get_fingerprint('sha256')} mitigator1\n"
                             f"removed: line 2 {third.get_fingerprint('sha256')} mitigator3\n")
    assert result.stderr.startswith(f"refused: no key in {keys} matches 'nobody'")
    assert keys.read_text() == public(ED2) + "\n"
    whole_line = invoke("keys", "remove", "--keys", str(keys), *public(ED2).split())  # $(cat key.pub)
    assert whole_line.exit_code == 0 and whole_line.stdout.startswith("removed: line 1 ")


# --- status and check ------------------------------------------------------------

@pytest.fixture
def ssh_banner_port() -> Iterator[int]:
    """A listener that greets like the agent (as many times as asked)."""
    yield from greeting_listener(b"SSH-2.0-mitigator_agent\r\n")


def greeting_listener(banner: bytes) -> Iterator[int]:
    """The port of a listener that sends ``banner`` to each connection, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def greet() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            with connection:
                connection.sendall(banner)

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def ntp_server() -> Iterator[FakeNtpServer]:
    server = FakeNtpServer(skew=0.0)
    yield server
    server.close()


def paths(files: Path, **overrides: str) -> list:
    chosen = {"keys": str(files / "keys"), "host-key": str(files / "host.ed25519"),
              "device": str(files / "snapshot"), "runtime-dir": str(files / "run"),
              "state-dir": str(files / "state"), **overrides}
    return [arg for name, value in chosen.items() for arg in (f"--{name}", value)]


MODULE = "ABI 2, HZ 250, isn_algorithm seq_and_ts_off, cookie_clock wall, set_generation 3, tcp_syncookies 2"


def polled_before(files: Path, key=ED1, address: str = "192.0.2.1") -> None:
    """The agent saw ``key`` authenticate from ``address``: its source is known (reserved)."""
    known = KnownSources(str(files / "state"), quiet_logger())
    known.load()
    known.remember(address, key.get_fingerprint("sha256"), "mitigator1")


def test_status_everything_present(files, ssh_banner_port):
    host_key, _ = load_or_create_host_key(str(files / "host.ed25519"))
    (files / "keys").write_text(public(ED1) + "\n")
    polled_before(files)
    result = invoke("status", *paths(files), "--port", str(ssh_banner_port))
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"host key: {fingerprint_line(host_key)} ({files / 'host.ed25519'}; MITIGATOR pins it)",
        f"keys: 1 admitted (mitigator1) from {files / 'keys'}",
        f"module: loaded, {MODULE} ({files / 'snapshot'})",
        f"device: readable by {ME}",
        "tcp_syncookies: 2",
    ]
    assert lines[5].startswith("clock: ")
    assert lines[6] == f"listening: 127.0.0.1:{ssh_banner_port}"
    assert lines[7].startswith("service: ")
    assert lines[8] == "last poll: mitigator1: none recorded"
    clock_ok = lines[5].startswith("clock: synchronised")
    service_ok = lines[7] in ("service: active", "service: not judged (systemd is not running)")
    assert result.exit_code == (0 if clock_ok and service_ok else 1)


def test_status_nothing_there_yet(files):
    result = invoke("status", *paths(files, device=str(files / "absent")), "--port", "1")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    host_key = files / "host.ed25519"
    assert lines[:3] == [
        f"host key: {host_key} missing: run mitigator-agent host-key --host-key {host_key}"
        " and give MITIGATOR the fingerprint it prints",
        f"keys: none admitted: keys file {files / 'keys'} does not exist: run mitigator-agent keys add"
        f" --keys {files / 'keys'} 'ssh-ed25519 AAAA... mitigator1' with the key from MITIGATOR's admin",
        f"module: not loaded (no {files / 'absent'}): tcpsecrets is not built for kernel {FAKE_KERNEL}: its headers"
        f" (linux-headers-{FAKE_KERNEL}) are not installed, so DKMS could not build it: run apt install"
        f" linux-headers-{FAKE_KERNEL} (DKMS then builds tcpsecrets), then modprobe tcpsecrets; keep your kernel"
        " flavour's headers metapackage (e.g. linux-headers-amd64) installed, so that every kernel update brings"
        " its headers",
    ]
    assert not host_key.exists()  # status never creates the host key


def test_check_all_items(files, ntp_server, ssh_banner_port):
    host_key, _ = load_or_create_host_key(str(files / "host.ed25519"))
    (files / "keys").write_text(public(ED1) + "\n")
    polled_before(files)
    result = invoke("check", *paths(files), "--port", str(ssh_banner_port), "--ntp-server", ntp_server.address)
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"ok   host key {files / 'host.ed25519'}: {fingerprint_line(host_key)}",
        f"ok   keys file {files / 'keys'} admits 1 key (mitigator1)",
        f"ok   module loaded ({files / 'snapshot'}, {MODULE})",
        f"ok   device {files / 'snapshot'} readable by {ME}",
        "ok   tcp_syncookies = 2",
    ]
    measured = next(line for line in lines if "NTP offset" in line)
    assert measured.startswith("ok   NTP offset ") and measured.endswith(f"against {ntp_server.address} (limit 100 ms)")
    assert f"ok   agent listening on 127.0.0.1:{ssh_banner_port}" in lines
    assert result.exit_code == (1 if any(line.startswith("FAIL") for line in lines) else 0)


def test_check_reports_one_reason_and_its_fix_per_failure(files, monkeypatch):
    no_headers = modulestate.diagnose()
    syncookies = files / "tcp_syncookies"
    syncookies.write_text("1\n")
    monkeypatch.setattr(health, "SYNCOOKIES_PROC", str(syncookies))
    monkeypatch.setattr(health.read_syncookies, "__defaults__", (str(syncookies),))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        silent_ntp = f"127.0.0.1:{udp.getsockname()[1]}"
        closed_port = tcp.getsockname()[1]
        result = invoke("check", *paths(files, device=str(files / "absent")), "--port", str(closed_port),
                        "--ntp-server", silent_ntp, "--timeout", "0.2")
    assert result.exit_code == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failures[2] == (f"FAIL module loaded: tcpsecrets module not loaded (no {files / 'absent'}):"
                           f" {no_headers.sentence}: {no_headers.remedy}")
    assert no_headers.kind == "no-headers" and no_headers.kernel == FAKE_KERNEL
    assert failures[3] == ("FAIL tcp_syncookies = 2 (is 1): run sysctl -w net.ipv4.tcp_syncookies=2 and keep it in"
                           " /etc/sysctl.d/90-tcpsecrets.conf")
    assert any(line.startswith(f"FAIL NTP offset: no server answered ({silent_ntp}: ") for line in failures)
    assert f"FAIL agent listening: nothing listening on 127.0.0.1:{closed_port} (connection refused): " \
           "start the agent: mitigator-agent serve" in failures or any(
               line.startswith(f"FAIL agent listening: nothing listening on 127.0.0.1:{closed_port}")
               for line in failures)


def test_check_bad_snapshot_and_syncookies_from_it(files, ntp_server, ssh_banner_port):
    (files / "snapshot").write_bytes(encode(dataclasses.replace(SNAP, tcp_syncookies=1)))
    result = invoke("check", *paths(files), "--port", str(ssh_banner_port), "--ntp-server", ntp_server.address)
    assert ("FAIL tcp_syncookies = 2 (is 1): run sysctl -w net.ipv4.tcp_syncookies=2 and keep it in"
            " /etc/sysctl.d/90-tcpsecrets.conf") in result.stdout.splitlines()
    assert result.exit_code == 1
    (files / "snapshot").write_bytes(bytes(256))
    result = invoke("check", *paths(files), "--port", "1", "--ntp-server", ntp_server.address)
    assert f"FAIL device {files / 'snapshot'} not readable by {ME}: bad snapshot magic" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["check", "--timeout", "-1"], "Error: Invalid value for '--timeout': -1.0 is not in the range x>0."),
    (["check", "--ntp-server", "127.0.0.1:abc"],
     "Error: Invalid value for '--ntp-server': '127.0.0.1:abc': port 'abc' is not a number from 1 to 65535"),
    (["check", "--listen", "[::1"], "Error: Invalid value for '--listen': '[::1' is not an address; give ADDR,"
                                     " [ADDR], ADDR:PORT or [ADDR]:PORT, e.g. 192.0.2.10 or [2001:db8::10]:7100"),
    (["poll", "h", "--key", "k", "--host-fingerprint", "MD5:aa:bb"],
     "Error: Invalid value for '--host-fingerprint': 'MD5:aa:bb' is not a SHA256 fingerprint; give what"
     " `mitigator-agent host-key` prints on the agent (SHA256:...)"),
])
def test_bad_flags_get_one_line_naming_the_flag_and_the_fix(args, message):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == message
    assert "Traceback" not in result.stderr


def test_report_json_follows_its_schema(files, ntp_server, ssh_banner_port):
    import jsonschema  # a test dependency: never skipped
    (files / "keys").write_text(public(ED1) + "\n")
    for command in ("status", "check"):
        result = invoke(command, *paths(files), "--port", str(ssh_banner_port), "--json",
                        *(["--ntp-server", ntp_server.address] if command == "check" else []))
        document = json.loads(result.stdout)
        jsonschema.validate(document, health.REPORT_SCHEMA)
        assert document["command"] == command and document["user"] == ME
        assert result.exit_code == (0 if document["ok"] else 1)
        assert document["ok"] == all(item["status"] != "fail" for item in document["items"])
        keys = next(item for item in document["items"] if item["name"] == "keys")
        assert keys["facts"] == {"path": str(files / "keys"), "admitted": 1, "instances": ["mitigator1"]}


@pytest.fixture
def shared_dir(request) -> Path:
    """A StrictModes-safe directory other users can traverse (/run is root's, 0755)."""
    if os.geteuid() != 0:
        pytest.skip("judging files as another user needs root")
    path = Path(tempfile.mkdtemp(prefix="mitigator-test-", dir="/run"))
    path.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(path))
    return path


def test_check_judges_device_and_keys_as_the_service_user(shared_dir, ntp_server, ssh_banner_port):
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    device, keys = shared_dir / "snapshot", shared_dir / "keys"
    device.write_bytes(SNAP.to_bytes())
    keys.write_text(public(ED1) + "\n")
    for path in (device, keys):
        path.chmod(0o600)  # root:root 0600: root reads them, the agent's account does not
    args = ("check", *paths(shared_dir), "--user", "nobody", "--port", str(ssh_banner_port),
            "--ntp-server", ntp_server.address)
    result = invoke(*args)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert (f"FAIL keys file admits nobody: keys file {keys} cannot be opened: Permission denied: run chgrp {group}"
            f" {keys} && chmod 640 {keys} (and let nobody into its directories)") in lines
    assert (f"FAIL device {device} not readable by nobody: Permission denied: run chgrp {group} {device}"
            f" && chmod g+r {device}") in lines
    for path in (device, keys):  # the fixes check printed
        os.chown(path, 0, nobody.pw_gid)
        path.chmod(0o640)
    lines = invoke(*args).stdout.splitlines()
    assert f"ok   keys file {keys} admits 1 key (mitigator1)" in lines
    assert f"ok   device {device} readable by nobody" in lines


def unreserved_warnings(files: Path, *args: str) -> list:
    result = invoke("check", *paths(files), "--port", "1", "--ntp-server", "127.0.0.1:9", "--timeout", "0.1", *args)
    return [line for line in result.stdout.splitlines() if "has no reserved source yet" in line]


def test_check_warns_about_a_key_whose_sources_nothing_reserves_yet(files):
    """The README's setup (no from=, no allow) before MITIGATOR's first poll: a flood could keep it out."""
    (files / "keys").write_text(f'{public(ED1)}\n{public(ED2)}\nfrom="192.0.2.7" {public(ED3)}\n')
    polled_before(files, ED2)
    assert unreserved_warnings(files) == [
        f"warn key mitigator1 ({ED1.get_fingerprint('sha256')}) has no reserved source yet: until it has polled"
        " once, strangers flooding port 1 can keep it out: let MITIGATOR poll once (its source is then remembered),"
        " or name its addresses: mitigator-agent keys add 'from=\"ADDRESS\" ssh-ed25519 ... mitigator1'"
        " (or allow = [\"CIDR\"] in the config)"]
    assert unreserved_warnings(files, "--allow", "192.0.2.0/24") == []  # allow reserves MITIGATOR's networks
    polled_before(files, ED1, "2001:db8::7")
    assert unreserved_warnings(files) == []


@pytest.mark.parametrize("banner, words", [
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "another SSH server answers on 127.0.0.1:{port}"
                                                     " (SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3), not the agent:"
                                                     " MITIGATOR's polls reach it"),
    (b"HTTP/1.1 400 Bad Request\r\n", "127.0.0.1:{port} does not speak SSH: another program holds the port"),
])
def test_check_tells_the_agent_from_another_program_on_its_port(files, banner, words):
    """The official agent's sshd on 7100 is not our agent, whatever else looks fine."""
    (files / "keys").write_text(public(ED1) + "\n")
    for port in greeting_listener(banner):
        result = invoke("check", *paths(files), "--port", str(port), "--ntp-server", "127.0.0.1:9", "--timeout", "0.5")
        assert result.exit_code == 1
        assert (f"FAIL agent listening: {words.format(port=port)}: find what holds port {port}:"
                f" ss -ltnp 'sport = :{port}' (the official agent's sshd: install this agent over it with"
                " sh mitigator-agent, or stop it)") in result.stdout.splitlines()
