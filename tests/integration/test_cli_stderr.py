"""Every command prints only the agent's own words: no warning a dependency raises, no traceback.

The dependencies' own chatter (a deprecation one of them raises about another, on import) reaches
an admin's terminal and the journal before every command's output. These tests run each command
the way an admin does and look at stderr (and serve's log) for lines Python's warnings machinery or
an uncaught exception would print. They run with the locked dependencies in `make test`, and with
the newest releases in `make test-newest`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Sequence

import click
import pytest

from conftest import AGENT, AgentProcess, run_agent
from mitigator_agent import silence_dependency_warnings
from mitigator_agent.cli import main as cli_group

# `file.py:12: SomeWarning: text` (and the source line under it), or a traceback.
FOREIGN = re.compile(r"^\S+\.py:\d+: \w*Warning: |^Traceback \(most recent call last\):")


def foreign_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if FOREIGN.search(line)]


def command_paths(group: click.Group, prefix: Sequence[str] = ()) -> Iterator[List[str]]:
    """Every command and subcommand of the CLI, as argv prefixes (read from click, so new ones count)."""
    for name, command in sorted(group.commands.items()):
        yield [*prefix, name]
        if isinstance(command, click.Group):
            yield from command_paths(command, [*prefix, name])


def test_the_cli_has_commands_to_check():
    names = {" ".join(path) for path in command_paths(cli_group)}
    assert {"serve", "status", "check", "poll", "keys list", "host-key", "selftest"} <= names


@pytest.mark.parametrize("argv", [["--version"], ["--help"]] + [[*path, "--help"] for path in command_paths(cli_group)],
                         ids=" ".join)
def test_help_and_version_write_nothing_to_stderr(argv):
    result = run_agent(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_working_commands_print_only_our_lines(agent: AgentProcess, client_key, workdir: Path):
    config = workdir / "admin.toml"
    config.write_text(f'keys = "{agent.keys_path}"\nhost-key = "{agent.host_key_path}"\n'
                      f'device = "{agent.device_path}"\nruntime-dir = "{agent.runtime_dir}"\n'
                      f'listen = ["127.0.0.1:{agent.port("127.0.0.1")}"]\n')
    config.chmod(0o644)
    port = str(agent.port("127.0.0.1"))
    runs = {
        "poll": run_agent("poll", "127.0.0.1", "--port", port, "--key", str(client_key.path),
                          "--known-hosts", str(agent.known_hosts)),
        "status": run_agent("status", "--config", str(config)),
        "check": run_agent("check", "--config", str(config), "--ntp-server", "127.0.0.1:9", "--timeout", "0.2"),
        "keys list": run_agent("keys", "list", "--config", str(config)),
        "host-key": run_agent("host-key", "--host-key", str(agent.host_key_path)),
        "keys add (refused)": run_agent("keys", "add", "--keys", str(workdir / "other-keys"), "not a key"),
        "poll (refused)": run_agent("poll", "127.0.0.1", "--port", "9", "--key", str(client_key.path)),
    }
    assert runs["poll"].returncode == 0, runs["poll"].stderr
    assert runs["poll"].stderr == ""
    for name, result in runs.items():
        assert foreign_lines(result.stderr) == [], f"{name}: {result.stderr}"
        assert foreign_lines(result.stdout) == [], f"{name}: {result.stdout}"
    # A refusal is said in our words, not as a traceback.
    assert runs["keys add (refused)"].returncode == 1
    assert runs["keys add (refused)"].stderr.startswith("refused: malformed line")
    assert runs["poll (refused)"].returncode == 1 and runs["poll (refused)"].stderr.startswith("poll: ")
    agent.stop()
    assert foreign_lines("\n".join(agent.lines)) == [], "\n".join(agent.lines)


def test_selftest_without_the_module_prints_only_our_lines():
    """Here (no module loaded; as root, or as a user who may not) it fails at once, in our words."""
    result = run_agent("selftest")
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL ") and result.stderr == ""


# The filter itself: narrow enough that only asyncssh's DSA notice goes.

def _shown(message: str, category: type, module: str) -> bool:
    """Whether `message` of `category`, raised from code of `module`, is shown under the agent's filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        silence_dependency_warnings()
        warnings.warn_explicit(message, category, filename=f"/x/{module.replace('.', '/')}.py", lineno=1,
                               module=module, registry={})
    return bool(caught)


def test_only_asyncssh_dsa_notice_is_silenced():
    from cryptography.utils import CryptographyDeprecationWarning as Deprecated

    dsa = "DSA is deprecated and support will be removed in a future release."
    assert not _shown(dsa, Deprecated, "asyncssh.crypto.dsa")
    assert not _shown(dsa, Deprecated, "asyncssh")
    assert _shown(dsa, Deprecated, "mitigator_agent.server")         # ours: shown
    assert _shown(dsa, Deprecated, "asyncsshx.crypto")               # another package of a like name
    assert _shown("RSA is deprecated", Deprecated, "asyncssh.crypto")  # another notice of asyncssh's
    assert _shown(dsa, UserWarning, "asyncssh.crypto.dsa")           # another category
    assert _shown("something else", UserWarning, "mitigator_agent.cli")


def test_importing_the_agent_with_every_warning_on_prints_nothing():
    """`python -W default` shows what Python hides by default too (DeprecationWarning): still nothing."""
    result = subprocess.run([sys.executable, "-W", "default", "-c", "import mitigator_agent.cli, mitigator_agent.server"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
