"""The man page, mitigator-agent(8), generated from the command line's own help.

``python -m mitigator_agent.manpage > mitigator-agent.8`` writes it (roff,
man(7) macros).  Every command and option comes from the click objects
themselves, so the page cannot drift from ``--help``: one section per
command with its help text and options, then the files, the environment,
the exit statuses and the JSON output's schemas.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Iterator, List, Optional, Tuple

import click

from . import __version__
from .cli import main
from .config import CONFIG_ENV, DEFAULT_CONFIG_PATH
from .health import KEYS_LIST_SCHEMA, REPORT_SCHEMA

PROGRAM = "mitigator-agent"


def roff_escape(text: str) -> str:
    """Text safe in roff: backslashes doubled, a leading dot or quote neutralised, dashes kept literal."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _paragraphs(text: str) -> Iterator[str]:
    """click help text -> paragraphs, with click's \\b (no rewrap) blocks kept as they are."""
    for block in inspect.cleandoc(text).split("\n\n"):
        block = block.strip("\n")
        if block:
            yield block.lstrip("\b\n")


def walk(group: click.Group, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], click.Command]]:
    """Every command below ``group`` (subgroups' commands included), in name order, with its path."""
    ctx = click.Context(group, info_name=PROGRAM)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from walk(command, (*prefix, name))


def _option_rows(command: click.Command, ctx: click.Context) -> List[Tuple[str, str]]:
    rows = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            rows.append(record)
    return rows


def _command_section(path: Tuple[str, ...], command: click.Command) -> List[str]:
    # make_context, not Context(): it applies the group's context_settings (-h as well as --help).
    root = main.make_context(PROGRAM, [], resilient_parsing=True)
    ctx = command.make_context(" ".join(path), [], parent=root, resilient_parsing=True)
    out = [f".SS {roff_escape(' '.join((PROGRAM, *path)))}"]
    usage = " ".join(command.collect_usage_pieces(ctx))
    out.append(f".B {roff_escape(' '.join((PROGRAM, *path)))}")
    out.append(roff_escape(usage))
    out.append(".PP")
    for paragraph in _paragraphs(command.help or ""):
        out.append(roff_escape(paragraph))
        out.append(".PP")
    for flags, help_text in _option_rows(command, ctx):
        out.append(".TP")
        out.append(f".B {roff_escape(flags)}")
        out.append(roff_escape(help_text))
    return out


def render(date: Optional[str] = None) -> str:
    """The whole page as roff text."""
    lines = [
        f'.TH MITIGATOR\\-AGENT 8 "{date or ""}" "{PROGRAM} {__version__}" "System Administration"',
        ".SH NAME",
        f"{PROGRAM} \\- {roff_escape(main.help.splitlines()[0] if main.help else '')}",
        ".SH SYNOPSIS",
        f".B {PROGRAM}",
        "[\\fB\\-h\\fR] [\\fB\\-V\\fR]",
        ".I command",
        "[\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        roff_escape("The agent serves this server's TCP SYN-cookie and ISN secrets, read from the tcpsecrets"
                    " kernel module's /dev/tcpsecrets, to MITIGATOR instances that poll it over SSH"
                    " (port 7100). It runs as an unprivileged user (mitigator_agent) whose group the module"
                    " names in read_gid."),
        ".SH COMMANDS",
    ]
    for path, command in walk(main):
        if isinstance(command, click.Group):
            lines.append(f".SS {roff_escape(' '.join((PROGRAM, *path)))}")
            lines.append(roff_escape(command.help or ""))
            continue
        lines.extend(_command_section(path, command))
    lines += [
        ".SH FILES",
        ".TP", f".B {roff_escape(DEFAULT_CONFIG_PATH)}",
        roff_escape("Optional config file: one key per long option of serve, without its dashes (TOML)."
                    " status, check and keys read it too, so they judge the files serve uses."),
        ".TP", ".B /opt/mitigator_agent/keys",
        roff_escape("MITIGATOR's public keys (authorized_keys format, ssh-ed25519 only)."),
        ".TP", ".B /opt/mitigator_agent/host.ed25519",
        roff_escape("The SSH host key; MITIGATOR pins its fingerprint (mitigator-agent host-key prints it)."),
        ".TP", ".B /run/mitigator\\-agent/last\\-polls.json",
        roff_escape("The last poll per instance (no secrets), read by status and check."),
        ".TP", ".B /dev/tcpsecrets",
        roff_escape("The tcpsecrets module's snapshot device."),
        ".SH ENVIRONMENT",
        ".TP", f".B {roff_escape(CONFIG_ENV)}",
        roff_escape(f"The config file used when --config is not given (default {DEFAULT_CONFIG_PATH})."),
        ".TP", ".B JOURNAL_STREAM",
        roff_escape("Set by systemd: when it names stdout, log lines carry journald priority prefixes"
                    " (<3> error, <4> warning, <6> info, <7> debug) instead of level words."),
        ".SH EXIT STATUS",
        roff_escape("0: success. 1: the command ran and found something wrong (check, status, keys list: an"
                    " item failed; poll: no valid answer; serve: could not start). 2: bad usage or an unusable"
                    " config file."),
        ".SH JSON OUTPUT",
        roff_escape("status --json and check --json print one object following this JSON Schema:"),
        ".PP", ".nf", roff_escape(json.dumps(REPORT_SCHEMA, indent=2)), ".fi",
        ".PP", roff_escape("keys list --json:"), ".PP", ".nf", roff_escape(json.dumps(KEYS_LIST_SCHEMA, indent=2)),
        ".fi",
        ".SH SEE ALSO",
        ".BR ssh (1),",
        ".BR sshd (8),",
        ".BR systemctl (1),",
        ".BR journalctl (1),",
        ".BR modprobe (8)",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - the entry point
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else None))
