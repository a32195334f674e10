"""`keys add|list|remove` as a new admin types them, checked against the running agent with OpenSSH.

Each case of issue 11: a pasted private key, stdin comments, several
selectors to `keys remove`, a duplicate instance name, a keys file that
cannot be written.  Every test asserts the exact lines and exit status,
then asks the agent (a real OpenSSH login) what it now admits.
"""

from __future__ import annotations


from conftest import AgentProcess, ClientKey, keys_cmd, make_client_key

PRIVATE_REFUSAL = ("refused: that is a private key: it stays with MITIGATOR; give its public half"
                   " (the .pub file, or ssh-keygen -y -f KEYFILE)\n")


def logs_in(agent: AgentProcess, key: ClientKey) -> bool:
    """Whether OpenSSH gets `get` answered with this key (255 + publickey: refused)."""
    result = agent.ssh(key, "get")
    assert result.returncode == 0 or b"Permission denied (publickey)" in result.stderr, result.stderr
    return result.returncode == 0


def test_a_pasted_private_key_is_refused_never_echoed_and_admits_nothing(agent, client_key, second_key):
    private = second_key.path.read_text()
    body = [line for line in private.splitlines() if "-----" not in line]
    for args, stdin in ((["add", "--keys", str(agent.keys_path), private], ""),  # keys add "$(cat id_ed25519)"
                        (["add", "--keys", str(agent.keys_path), "-"], private)):  # keys add - < id_ed25519
        result = keys_cmd(*args, stdin=stdin)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", PRIVATE_REFUSAL)
        assert not any(line[:16] in result.stderr for line in body)
    assert agent.keys_path.read_text() == client_key.public_line + "\n"
    assert not logs_in(agent, second_key) and logs_in(agent, client_key)


def test_comments_and_blank_lines_on_stdin_are_skipped(agent, second_key):
    stdin = f"# from MITIGATOR's admin, 2026-11-30\n\n{second_key.public_line}\n   # the second instance\n"
    result = keys_cmd("add", "--keys", str(agent.keys_path), "-", stdin=stdin)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"added: line 2 {second_key.fingerprint} mitigator2\n"
    assert logs_in(agent, second_key)


def test_keys_remove_takes_several_selectors_and_the_agent_refuses_them_at_once(agent, client_key, workdir):
    m3, m4 = make_client_key(workdir, "m3"), make_client_key(workdir, "m4")
    added = keys_cmd("add", "--keys", str(agent.keys_path), "-", stdin=f"{m3.public_line}\n{m4.public_line}\n")
    assert added.returncode == 0 and logs_in(agent, m3) and logs_in(agent, m4)
    result = keys_cmd("remove", "--keys", str(agent.keys_path), "m3", "m4")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"removed: line 2 {m3.fingerprint} m3\nremoved: line 2 {m4.fingerprint} m4\n"
    assert not logs_in(agent, m3) and not logs_in(agent, m4) and logs_in(agent, client_key)


def test_a_duplicate_instance_name_is_warned_about_and_never_removes_both(agent, client_key, workdir):
    (workdir / "twin").mkdir()
    twin = make_client_key(workdir / "twin", "mitigator1")  # a second key, the same name
    warning = ("instance name mitigator1 is on lines 1, 2: logs and `keys remove` cannot tell them apart:"
               " give each key its own name (mitigator-agent keys add 'KEY NEWNAME')")
    added = keys_cmd("add", "--keys", str(agent.keys_path), twin.public_line)
    assert (added.returncode, added.stdout) == (0, f"added: line 2 {twin.fingerprint} mitigator1\n")
    assert added.stderr == (f"warning: instance name mitigator1 is also on line 1 ({client_key.fingerprint}): logs"
                            " and `keys remove mitigator1` cannot tell them apart; give this key another name\n")
    listed = keys_cmd("list", "--keys", str(agent.keys_path))
    assert listed.returncode == 0
    assert listed.stdout == f"1: {client_key.fingerprint} mitigator1\n2: {twin.fingerprint} mitigator1\n"
    assert listed.stderr == f"warning: {warning}\n"
    assert keys_cmd("list", "--keys", str(agent.keys_path), "--json").stdout.count(warning) == 1
    removed = keys_cmd("remove", "--keys", str(agent.keys_path), "mitigator1")
    assert (removed.returncode, removed.stdout) == (1, "")
    assert removed.stderr == (f"refused: instance name 'mitigator1' is on lines 1, 2; nothing removed: name one key"
                              f" by its fingerprint (mitigator-agent keys remove {client_key.fingerprint})\n")
    assert logs_in(agent, client_key) and logs_in(agent, twin)


def test_a_keys_file_that_cannot_be_written_says_what_to_do(workdir, client_key):
    keys = workdir / "missing" / "keys"
    result = keys_cmd("add", "--keys", str(keys), client_key.public_line)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"refused: cannot write {keys}: its directory {keys.parent} does not exist;"
                             f" create it: mkdir -p {keys.parent}\n")  # and no 'run keys add' advice after it
