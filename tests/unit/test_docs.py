"""The man page and the bash completion come from the command line itself, and work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from mitigator_agent.cli import main
from mitigator_agent.completion import bash_script
from mitigator_agent.manpage import render, walk

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2] / "agent")


def plain(roff: str) -> str:
    return roff.replace("\\-", "-").replace("\\e", "\\")


def test_the_man_page_has_every_command_and_every_option():
    page = plain(render())
    commands = list(walk(main))
    assert {" ".join(path) for path, _ in commands} >= {"serve", "status", "check", "poll", "host-key",
                                                        "keys", "keys add", "keys list", "keys remove"}
    for path, command in commands:
        assert f".SS mitigator-agent {' '.join(path)}" in page
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert any(flag in page for flag in param.opts), (path, param.opts)
    assert "MITIGATOR_AGENT_CONFIG" in page and "JOURNAL_STREAM" in page and '"$schema"' in page


def test_the_man_page_is_written_by_its_entry_point_and_renders_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    written = subprocess.run([sys.executable, "-m", "mitigator_agent.manpage", "2026-01-01"], capture_output=True,
                             text=True, env=env, check=True).stdout
    assert written == render("2026-01-01")
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=written, capture_output=True, text=True)
    assert (rendered.returncode, rendered.stderr) == (0, "")


def test_bash_completion_completes_commands_and_options(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = tmp_path / "mitigator-agent.bash"
    script.write_text(bash_script())
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mitigator-agent").exists():
        pytest.skip("the console script is not installed next to this python")

    def complete(*words: str) -> list:
        probe = (f'source "{script}"; COMP_WORDS=({" ".join(words)}); COMP_CWORD={len(words) - 1};'
                 ' _mitigator_agent_completion mitigator-agent; printf "%s\\n" "${COMPREPLY[@]}"')
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHONPATH": PACKAGE_ROOT}
        result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, check=True)
        return result.stdout.split()

    assert complete("mitigator-agent", "sta") == ["status"]
    assert complete("mitigator-agent", "keys", "") == ["add", "list", "remove"]
    assert "--ntp-server" in complete("mitigator-agent", "check", "--ntp")
