"""Bash completion for mitigator-agent, written by click from the command line itself.

``python -m mitigator_agent.completion > mitigator-agent`` writes the script
for /usr/share/bash-completion/completions/.  It is click's own completion:
the script asks the installed ``mitigator-agent`` for candidates (with
``_MITIGATOR_AGENT_COMPLETE=bash_complete``), so commands and options always
match the installed version.
"""

from __future__ import annotations

import sys

from click.shell_completion import BashComplete

from .cli import main

PROGRAM = "mitigator-agent"
COMPLETE_VAR = "_MITIGATOR_AGENT_COMPLETE"  # click's name for it: _{PROG_NAME}_COMPLETE, upper case


def bash_script() -> str:
    """The bash completion script (what ``_MITIGATOR_AGENT_COMPLETE=bash_source mitigator-agent`` prints)."""
    return BashComplete(main, {}, PROGRAM, COMPLETE_VAR).source()


if __name__ == "__main__":  # pragma: no cover - the entry point
    sys.stdout.write(bash_script())
