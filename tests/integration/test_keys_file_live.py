"""The keys file against the running agent and the real `keys` commands."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

from conftest import WAIT_SECONDS, keys_cmd, make_client_key


def test_twenty_concurrent_keys_add_processes_lose_no_key_thanks_to_the_lock(workdir):
    keys = workdir / "keys"
    clients = [make_client_key(workdir, f"m{n}") for n in range(20)]
    # All 20 start at once and take the lock in turn, each after a Python
    # start-up that competes for the CPU with the other 19: the upper bound
    # is per process and must cover all of them.
    bound = WAIT_SECONDS * len(clients)
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(lambda c: keys_cmd("add", "--keys", str(keys), c.public_line, bound=bound),
                                clients))
    assert all(r.returncode == 0 and r.stdout.startswith("added: line ") for r in results), results
    listed = keys_cmd("list", "--keys", str(keys))
    assert sorted(line.split()[1] for line in listed.stdout.splitlines()) == sorted(c.fingerprint for c in clients)
    assert sorted(int(r.stdout.split()[2]) for r in results) == list(range(1, 21))  # each its own line


def test_keys_add_says_replaced_and_the_agent_then_enforces_the_new_from(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n")
    assert agent.ssh(client_key, "get", host="::1").returncode == 0
    result = keys_cmd("add", "--keys", str(agent.keys_path), f'from="127.0.0.1" {client_key.public_line}')
    assert result.returncode == 0 and result.stdout.startswith("replaced: line 1 ")
    assert "(options or instance name changed)" in result.stdout
    assert agent.ssh(client_key, "get", host="::1").returncode == 255
    agent.wait_for(r'refused src=\[::1\]:\d+ user=mitigator_agent request=publickey .*'
                   r'reason="from= of line 1 does not admit ::1"')
    assert agent.ssh(client_key, "get", host="127.0.0.1").returncode == 0


def test_a_0x1c_separated_second_key_from_stdin_is_refused_and_never_admitted(start_agent, client_key,
                                                                               second_key):
    agent = start_agent(client_key.public_line + "\n")
    smuggled = f'from="10.9.9.9" {second_key.public_line}\x1c{second_key.public_line}\n'
    result = keys_cmd("add", "--keys", str(agent.keys_path), "-", stdin=smuggled)
    assert result.returncode == 1 and "control character U+001C" in result.stderr
    assert agent.ssh(second_key, "get").returncode == 255
    assert agent.ssh(client_key, "get").returncode == 0


def test_cp_p_same_size_replacement_revokes_the_old_key_for_the_next_connection(start_agent, client_key,
                                                                                  second_key, workdir):
    agent = start_agent(f"{client_key.public_line}\n")
    assert agent.ssh(client_key, "get").returncode == 0
    replacement = workdir / "keys.new"
    # Same length: both ed25519, and the comment padded to the same size.
    replacement.write_text(f"{second_key.public_line[:-len('mitigator2')]}mitigator1\n")
    assert replacement.stat().st_size == agent.keys_path.stat().st_size
    old = agent.keys_path.stat()
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    subprocess.run(["cp", "-p", str(replacement), str(agent.keys_path)], check=True)
    assert agent.keys_path.stat().st_mtime_ns == old.st_mtime_ns
    assert agent.ssh(client_key, "get").returncode == 255
    assert agent.ssh(second_key, "get").returncode == 0


def test_keys_add_of_a_0x1c_joined_argument_adds_nothing_and_admits_nobody_new(start_agent, client_key,
                                                                             second_key):
    # The exact command: one argv string that str.splitlines() cut
    # in two (one key printed as added, the second admitted from anywhere).
    agent = start_agent(client_key.public_line + "\n")
    before = agent.keys_path.read_bytes()
    smuggled = f'from="10.9.9.9" {second_key.public_line}\x1c{second_key.public_line}'
    result = keys_cmd("add", "--keys", str(agent.keys_path), smuggled)
    assert result.returncode == 1 and "control character U+001C at column" in result.stderr
    assert result.stdout == "" and agent.keys_path.read_bytes() == before
    assert agent.ssh(second_key, "get").returncode == 255


def test_a_keys_file_through_a_0777_directory_admits_nobody_as_sshd_walks_up_to_root(start_agent, client_key,
                                                                                    workdir):
    # sshd's safe_path checks every directory up to /; the old check looked
    # at the file's own directory only, so this path was accepted.
    open_dir = workdir / "open"
    keys = open_dir / "sub" / "keys"
    keys.parent.mkdir(parents=True)
    keys.write_text(client_key.public_line + "\n")
    open_dir.chmod(0o777)
    agent = start_agent(None, "--keys", str(keys))
    assert agent.ssh(client_key, "get").returncode == 255
    agent.wait_for(rf'keys-file-admits-nobody reason="keys directory {open_dir} is writable by group or others'
                   rf' \(mode 0777\)"')
    open_dir.chmod(0o755)
    assert agent.ssh(client_key, "get").returncode == 0  # next connection: no restart needed


def test_a_keys_file_that_is_a_symlink_admits_nobody_as_o_nofollow_refuses_it(start_agent, client_key, workdir):
    real = workdir / "real-keys"
    real.write_text(client_key.public_line + "\n")
    real.chmod(0o644)
    link = workdir / "keys"
    link.symlink_to(real)
    agent = start_agent(None)
    assert agent.ssh(client_key, "get").returncode == 255
    agent.wait_for(rf'keys-file-admits-nobody reason="keys file {link} is a symbolic link \(never followed\)"')
    link.unlink()
    real.rename(link)
    assert agent.ssh(client_key, "get").returncode == 0


def test_a_from_that_does_not_parse_locks_the_line_out_and_keeps_its_exclusion(start_agent, client_key,
                                                                                second_key):
    """The exclusion a lenient matcher dropped (127.0.0.1/8 is no network): the line admits nobody."""
    agent = start_agent(f'from="!127.0.0.1/8,127.0.0.0/8" {client_key.public_line}\n{second_key.public_line}\n',
                        listen=("0.0.0.0",))
    agent.wait_for(r"keys-file-warning problem=\".*:1: from= refused: '127.0.0.1/8' has address bits set beyond"
                   r" its prefix: write 127.0.0.0/8; the line admits nobody until it is fixed; line skipped\"")
    assert agent.ssh(client_key, "get", options=["-b", "127.0.0.34"]).returncode == 255
    assert agent.ssh(second_key, "get", options=["-b", "127.0.0.34"]).returncode == 0
    listed = keys_cmd("list", "--keys", str(agent.keys_path))
    assert listed.returncode == 0 and "from= refused: '127.0.0.1/8'" in listed.stderr
    for bad in ('from="10.0.0.0/33"', 'from="a, b"', 'from="!127.0.0.1/8,127.0.0.0/8"'):
        refused = keys_cmd("add", "--keys", str(agent.keys_path), f"{bad} {client_key.public_line}")
        assert refused.returncode == 1 and refused.stderr.startswith("refused: from= refused: "), refused


def test_a_key_appended_to_a_file_without_a_final_newline_is_named_not_lost(start_agent, client_key,
                                                                            second_key):
    """The README's `echo KEY >> keys` on a file whose last line has no newline."""
    agent = start_agent(client_key.public_line)  # no final newline
    with open(agent.keys_path, "a") as keys:
        keys.write(second_key.public_line + "\n")
    assert agent.ssh(second_key, "get").returncode == 255
    agent.wait_for(r"keys-file-warning problem=\".*:1: two keys merged on one line")
    listed = keys_cmd("list", "--keys", str(agent.keys_path))
    assert "two keys merged on one line" in listed.stderr and "put that key on a line of its own" in listed.stderr
