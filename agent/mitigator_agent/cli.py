"""``mitigator-agent`` command line.

- ``serve``: run the SSH server (see server.py); says at start what will
  not work (module, tcp_syncookies, clock, keys) and keeps serving.
- ``host-key``: print the pinned host key's fingerprint (create it first).
- ``keys add|list|remove``: edit the keys file (atomic, keeps owner and mode).
- ``status``: what the agent sees, judged as the service's user: host key,
  keys, module, tcp_syncookies, clock, listening, service, last poll per
  instance; exit status 1 when something is wrong.
- ``check``: the same and more (NTP offset, containers), one ``ok``/``FAIL``
  line per item, each FAIL with the command that fixes it; exit status 1
  when any item failed.
- ``poll HOST``: do what a MITIGATOR instance does (``get json`` over SSH),
  validate and print the answer; exit status 0 only if all of that worked.

``status``, ``check`` and ``keys`` read the same config file as ``serve``
(``--config``), so they look at the files the agent uses.  ``--json`` on
``status``, ``check`` and ``keys list`` prints one object (schemas:
health.REPORT_SCHEMA and health.KEYS_LIST_SCHEMA).  Every error a user can
cause is one line naming the thing and the fix.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import click

from . import __version__, health, logs
from .activation import ActivationError, inherited_listeners
from .answers import PROTOCOL_LEVELS
from .authkeys import (ADMITTED_KEY_TYPE, DEFAULT_KEYS_PATH, REPLACED, KeysFileError, add_key,
                       parse_keys, refusal_remedy, remove_keys, split_lines)
from .clock import DEFAULT_NTP_SERVERS, parse_ntp_server
from .config import config_option, user_option
from .hostkey import DEFAULT_HOST_KEY_PATH, HostKeyError, fingerprint_line, load_or_create_host_key
from .poll import PollError, normalise_fingerprint, parse_target, poll as poll_agent
from .runas import UserUnknown, account, call_as, current_user_name, group_name
from .runstate import DEFAULT_RUNTIME_DIR
from .server import (DEFAULT_PORT, ListenError, ServerSettings, disable_core_dumps, run_until_signalled,
                     split_listen_address)
from .snapshot import DEFAULT_DEVICE

DEFAULTS = ServerSettings()
SSH_USER = "mitigator_agent"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _keys_option(function: Callable) -> Callable:
    return click.option("--keys", "keys_path", default=DEFAULT_KEYS_PATH, show_default=True, metavar="FILE",
                        help="Keys file (OpenSSH authorized_keys format).")(function)


def _device_option(function: Callable) -> Callable:
    return click.option("--device", default=DEFAULT_DEVICE, show_default=True, metavar="PATH",
                        help="Snapshot source: the tcpsecrets device or a file holding one snapshot.")(function)


def _host_key_option(function: Callable) -> Callable:
    return click.option("--host-key", "host_key_path", default=DEFAULT_HOST_KEY_PATH, show_default=True,
                        metavar="FILE",
                        help="SSH host key (ed25519; created on first serve, never regenerated).")(function)


def _runtime_dir_option(function: Callable) -> Callable:
    return click.option("--runtime-dir", default=DEFAULT_RUNTIME_DIR, show_default=True, metavar="DIR",
                        help="Where the agent keeps the last poll per instance (no secrets).")(function)


def _reservation_options(function: Callable) -> Callable:
    """serve's --state-dir and --allow, for status and check: which keys' sources are reserved."""
    function = click.option("--allow", multiple=True, metavar="CIDR", callback=_check_networks,
                            help="serve's --allow: MITIGATOR's networks, reserved before anyone polls.")(function)
    return click.option("--state-dir", default=DEFAULTS.state_dir, show_default=True, metavar="DIR",
                        help="serve's state directory, where it keeps the sources MITIGATOR polled from.")(function)


def _json_option(function: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object (schema: see the man page, JSON OUTPUT).")(function)


def _check_instance_names(ctx: click.Context, param: click.Parameter,
                          value: Tuple[str, ...]) -> Tuple[str, ...]:
    """Refuse empty instance names: an empty name would match keys without a comment."""
    if any(not name.strip() for name in value):
        raise click.BadParameter("an instance name must not be empty", ctx=ctx, param=param)
    return value


def _check_networks(ctx: click.Context, param: click.Parameter, value: Tuple[str, ...]) -> Tuple[str, ...]:
    """Refuse anything that is not an IPv4/IPv6 address or CIDR; return them normalised.

    Host bits are allowed (``192.0.2.7/24`` means 192.0.2.0/24), as in the
    keys file's from= patterns.  ``0.0.0.0/0`` or ``::/0`` would make every
    stranger one of MITIGATOR's sources, so they are refused.
    """
    networks = []
    for text in value:
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise click.BadParameter(f"{text!r} is not an IP address or CIDR", ctx=ctx, param=param) from None
        if network.prefixlen == 0:
            raise click.BadParameter(f"{text!r} allows every address; name MITIGATOR's addresses",
                                     ctx=ctx, param=param)
        networks.append(str(network))
    return tuple(networks)


def _each_parses_with(parse: Callable[[str], object]) -> Callable[..., Tuple[str, ...]]:
    """A click callback refusing any value of a repeatable option that ``parse`` rejects (ValueError)."""

    def check(ctx: click.Context, param: click.Parameter, value: Tuple[str, ...]) -> Tuple[str, ...]:
        for text in value:
            try:
                parse(text)
            except ValueError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value

    return check


# ADDR, [ADDR], ADDR:PORT or [ADDR]:PORT, as sshd's ListenAddress.
_check_listen = _each_parses_with(split_listen_address)
_check_ntp_servers = _each_parses_with(parse_ntp_server)


def _check_fingerprint(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    try:
        return normalise_fingerprint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


INSTALL_SCRIPT = "/usr/lib/mitigator-agent/install.sh"  # the install script, shipped by the package, for -d


def _uninstall(purge: bool, yes: bool) -> None:
    """Run the install script's uninstall (the package's copy, or an older script's kept one); never returns.

    At a terminal the script asks before --purge removes the host key MITIGATOR pins; --yes
    skips the question.
    """
    if not os.path.exists(INSTALL_SCRIPT):
        click.echo(f"mitigator-agent: {INSTALL_SCRIPT} is missing: remove the Debian packages with"
                   " apt remove mitigator-agent tcpsecrets-dkms", err=True)
        sys.exit(1)
    argv = ["sh", INSTALL_SCRIPT, "-d"] + (["--purge"] if purge else []) + (["--yes"] if yes else [])
    os.execvp("sh", argv)


@click.group(context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@click.version_option(__version__, "-V", "--version", prog_name="mitigator-agent")
@click.option("-d", "--uninstall", is_flag=True,
              help="Uninstall (as root): the service, the module, the agent and the system settings;"
                   " the keys file and the host key stay.")
@click.option("--purge", is_flag=True, help="With -d: also remove the keys file, the host key and the user"
                                           " (at a terminal it asks first).")
@click.option("--yes", is_flag=True, help="With -d --purge: do not ask (scripts).")
@click.pass_context
def main(ctx: click.Context, uninstall: bool, purge: bool, yes: bool) -> None:
    """Serve this server's TCP SYN-cookie/ISN secrets to MITIGATOR over SSH."""
    if purge and not uninstall:
        raise click.UsageError("--purge goes with -d")
    if yes and not purge:
        raise click.UsageError("--yes goes with -d --purge")
    if uninstall:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("-d takes no command")
        _uninstall(purge, yes)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@config_option
@click.option("--listen", multiple=True, metavar="ADDR", callback=_check_listen,
              help="Address to listen on: ADDR, [ADDR], ADDR:PORT or [ADDR]:PORT (repeatable; IPv4 or IPv6)."
                   " Default: all addresses.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULTS.port, show_default=True,
              help="TCP port (for listen addresses without one); 0 picks a free one (logged).")
@_keys_option
@_host_key_option
@_device_option
@click.option("--login-timeout", type=click.FloatRange(min=0.1), default=DEFAULTS.login_timeout,
              show_default=True, help="Seconds a client has to authenticate.")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=DEFAULTS.idle_timeout, show_default=True,
              help="Seconds an authenticated connection may stay open with no session (0: forever).")
@click.option("--max-unauthenticated", type=click.IntRange(min=1), default=DEFAULTS.max_unauthenticated,
              show_default=True, help="Connections allowed at once before authentication.")
@click.option("--max-unauthenticated-per-source", type=click.IntRange(min=1),
              default=DEFAULTS.max_unauthenticated_per_source, show_default=True,
              help="Of those, connections allowed from one address.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.rate,
              show_default=True, help="New connections per second per source address (sustained).")
@click.option("--burst", type=click.IntRange(min=1), default=DEFAULTS.burst, show_default=True,
              help="New connections a source address may open at once.")
@click.option("--protocol", type=click.Choice(PROTOCOL_LEVELS), default=DEFAULTS.protocol, show_default=True,
              help="The isn_sync release whose `get` answer to give: the MITIGATOR versions that came with it"
                   " expect exactly its lines (23.08: 8 lines; 24.10, 25.02: +version; 25.06: +time;"
                   " 26.04: +syncookie6_secret).")
@click.option("--anycast-instance", "anycast_instances", multiple=True, metavar="NAME",
              callback=_check_instance_names,
              help="Key instance (the keys file line's comment) allowed to `set` (repeatable)."
                   " None: set is disabled.")
@click.option("--state-dir", default=DEFAULTS.state_dir, show_default=True, metavar="DIR",
              help="Directory for the last accepted anycast set (replayed into a reloaded module) and the"
                   " sources MITIGATOR polled from (admitted ahead of strangers).")
@_runtime_dir_option
@click.option("--allow", multiple=True, metavar="CIDR", callback=_check_networks,
              help="MITIGATOR's addresses (repeatable): admission of their own, like sources the keys"
                   " file's from= names and sources that polled before.")
@click.option("--max-unauthenticated-allowed", type=click.IntRange(min=1),
              default=DEFAULTS.max_unauthenticated_allowed, show_default=True,
              help="Connections allowed at once before authentication from --allow and from= sources"
                   " (a pool of their own).")
@click.option("--strict-allow", is_flag=True, default=DEFAULTS.strict_allow,
              help="Drop connections from anyone but --allow and from= sources before the SSH banner.")
@user_option
@click.option("--verbose", is_flag=True, help="Also log debug events (check probes, ignored env requests).")
def serve(listen: Tuple[str, ...], port: int, keys_path: str, host_key_path: str, device: str,
          login_timeout: float, idle_timeout: float, max_unauthenticated: int, max_unauthenticated_per_source: int,
          rate: float, burst: int, protocol: str, anycast_instances: Tuple[str, ...], state_dir: str,
          runtime_dir: str,
          allow: Tuple[str, ...], max_unauthenticated_allowed: int, strict_allow: bool,
          service_user: str, verbose: bool) -> None:
    """Run the SSH server (events on stdout, errors on stderr; journald priorities under systemd)."""
    # First of all: the host key and the secrets must never end up in a core file.
    core_dump_problem = disable_core_dumps()
    logs.setup(logging.DEBUG if verbose else logging.INFO)
    log = logs.get_logger()
    if core_dump_problem:
        log.warning(logs.event("core-dumps-not-disabled", reason=core_dump_problem))
    settings = ServerSettings(port=port, listen=listen, keys_path=keys_path, host_key_path=host_key_path,
                              device=device, login_timeout=login_timeout, idle_timeout=idle_timeout,
                              max_unauthenticated=max_unauthenticated,
                              max_unauthenticated_per_source=max_unauthenticated_per_source,
                              rate=rate, burst=burst, protocol=protocol, anycast_instances=anycast_instances,
                              state_dir=state_dir, allow=allow,
                              max_unauthenticated_allowed=max_unauthenticated_allowed,
                              strict_allow=strict_allow, runtime_dir=runtime_dir)
    try:
        host_key, created = load_or_create_host_key(host_key_path)
    except HostKeyError as exc:
        log.error(logs.event("cannot-start", whole=True, reason=str(exc)))
        sys.exit(1)
    except OSError as exc:
        log.error(logs.event("cannot-start", whole=True, reason=f"host key {host_key_path}: {exc.strerror or exc}"))
        sys.exit(1)
    if created:
        log.info(logs.event("host-key-created", path=host_key_path))
    log.info(logs.event("starting", version=__version__, host_key=fingerprint_line(host_key),
                        keys=keys_path, device=device, protocol=protocol,
                        anycast=",".join(anycast_instances) if anycast_instances else "disabled"))
    _log_what_will_not_work(log, settings, service_user)
    try:
        listeners = inherited_listeners()
        asyncio.run(run_until_signalled(settings, host_key, listeners=listeners))
    except ActivationError as exc:
        log.error(logs.event("cannot-start", whole=True, reason=exc.problem.sentence, fix=exc.problem.remedy))
        sys.exit(1)
    except ListenError as exc:
        log.error(logs.event("cannot-start", whole=True, reason=str(exc)))
        sys.exit(1)
    except OSError as exc:
        log.error(logs.event("cannot-start", whole=True, reason=exc.strerror or str(exc)))
        sys.exit(1)


def _log_what_will_not_work(log: logging.Logger, settings: ServerSettings, service_user: str) -> None:
    """One warning per thing MITIGATOR relies on that is broken at start, with its fix; serving goes on."""
    current = current_user_name()
    if service_user != current:
        log.warning(logs.event("running-as-another-user", whole=True, user=current, configured=service_user,
                               fix=f"run the agent as {service_user} (the unit's User=), or set user"))
    subject = health.Subject(settings.keys_path, settings.host_key_path, settings.device, current)
    for item in health.startup_items(subject):
        # Without the module MITIGATOR's cookies are refused while it believes they are accepted: an error.
        level = logging.ERROR if item.name == "module" else logging.WARNING
        log.log(level, logs.event("will-not-work", whole=True, check=item.name, problem=item.text, fix=item.fix))


@main.command("host-key")
@config_option
@_host_key_option
def host_key_command(host_key_path: str) -> None:
    """Print the host key's fingerprint (MITIGATOR pins it); create the key first if there is none.

    The key is the one ``serve`` uses: ``--host-key``, else the config
    file's ``host-key``, else the default. Run as the agent's user, so the
    key is theirs (mode 0600), exactly as ``serve`` would create it. An
    existing key is never replaced.
    """
    try:
        key, created = load_or_create_host_key(host_key_path)
    except HostKeyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"host key {host_key_path}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    if created:
        click.echo(f"created {host_key_path}", err=True)
    click.echo(fingerprint_line(key))


@main.command()
@_device_option
def selftest(device: str) -> None:
    """Prove on this server what MITIGATOR relies on (root; IPv4 and IPv6, on a private loopback listener).

    The kernel's cookie SYN-ACK must equal the cookie computed from the
    agent's own answer, and a cookie ACK for a SYN the kernel never saw must
    open a connection. One ok/FAIL line per check; exit status 1 on any FAIL.
    """
    from . import selftest as checks  # scapy is loaded only here

    results = checks.run(device)
    for result in results:
        click.echo(f"{'ok  ' if result.ok else 'FAIL'} {result.text}")
    sys.exit(1 if any(not result.ok for result in results) else 0)


@main.group()
def keys() -> None:
    """List or edit the keys file (edits are atomic and keep owner and mode)."""


PRIVATE_KEY_MARKERS = ("PRIVATE KEY-----", "PuTTY-User-Key-File")
PRIVATE_KEY_REFUSAL = ("refused: that is a private key: it stays with MITIGATOR; give its public half"
                       " (the .pub file, or ssh-keygen -y -f KEYFILE)")


def _key_lines(text: str) -> Tuple[List[str], bool]:
    """Candidate key lines of ``text`` and whether a private key was in it (its lines left out).

    Blank lines and ``#`` comments are skipped; everything from a
    ``-----BEGIN ... PRIVATE KEY-----`` line to its END line (or to the end
    of the text) is dropped unread, so not a byte of it is ever echoed.
    """
    lines: List[str] = []
    private = False
    inside = False
    for line in split_lines(text):
        stripped = line.strip(" \t")
        if any(marker in stripped for marker in PRIVATE_KEY_MARKERS):
            private = True
            inside = "-----BEGIN" in stripped or stripped.startswith("PuTTY-User-Key-File")
            continue
        if inside or not stripped or stripped.startswith("#"):
            continue
        lines.append(line)
    return lines, private


def _duplicate_instance_warnings(keys_path: str, added_line: int, instance: str) -> List[str]:
    """Other lines carrying ``instance`` (the name logs and ``keys remove`` go by)."""
    try:
        with open(keys_path, "rb") as handle:
            parsed = parse_keys(handle.read().decode("utf-8", "surrogateescape"), keys_path)
    except OSError:
        return []
    return [f"warning: instance name {instance} is also on line {entry.line_number} ({entry.fingerprint}):"
            f" logs and `keys remove {instance}` cannot tell them apart; give this key another name"
            for entry in parsed.entries if entry.instance == instance and entry.line_number != added_line]


# A pasted key may start with "-" (a private key's -----BEGIN line): an argument, never an option,
# so click never echoes it back in "No such option".
@keys.command("add", context_settings={"ignore_unknown_options": True})
@config_option
@_keys_option
@user_option
@click.argument("key", nargs=-1, required=True)
def keys_add(keys_path: str, service_user: str, key: Tuple[str, ...]) -> None:
    """Add KEY (`ssh-ed25519 BASE64 [instance-name]`, options allowed; `-` reads lines from stdin).

    A key already present with other options or another instance name has
    its line replaced (`replaced: ...`). Lines split at newlines only; a line
    with a control character or non-ASCII white space is refused whole.
    Blank lines and `#` comments are skipped; a private key is refused
    without being shown.
    """
    if key == ("-",):
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    else:
        text = " ".join(key)
    lines, private = _key_lines(text)
    failed = private
    unwritten = False  # the file could not be written: what it admits is not this command's doing
    if private:
        click.echo(PRIVATE_KEY_REFUSAL, err=True)
    if not lines and not private:
        click.echo("refused: no key given (only blank lines or # comments)", err=True)
        failed = True
    for line in lines:
        try:
            entry, outcome = add_key(keys_path, line)
        except KeysFileError as exc:
            click.echo(f"refused: {exc}", err=True)
            failed = True
            continue
        except OSError as exc:
            click.echo(f"refused: {_write_problem(keys_path, exc)}", err=True)
            failed = unwritten = True
            continue
        detail = " (options or instance name changed)" if outcome == REPLACED else ""
        click.echo(f"{outcome}: line {entry.line_number} {entry.fingerprint} {entry.instance or '-'}{detail}")
        if entry.instance:
            for warning in _duplicate_instance_warnings(keys_path, entry.line_number, entry.instance):
                click.echo(warning, err=True)
    refusal = None if unwritten else _keys_as_user(keys_path, service_user)["refusal"]
    if refusal is not None:
        click.echo(f"warning: the agent ({service_user}) would admit nobody: {refusal}:"
                   f" {_remedy(refusal, keys_path, service_user)}", err=True)
    sys.exit(1 if failed else 0)


def _write_problem(keys_path: str, exc: OSError) -> str:
    """Why the keys file could not be written, and what to do: one line, no errno."""
    directory = os.path.dirname(os.path.abspath(keys_path))
    if exc.errno == errno.ENOENT and not os.path.isdir(directory):
        return f"cannot write {keys_path}: its directory {directory} does not exist; create it: mkdir -p {directory}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {keys_path}: permission denied; the keys file is root's: run this command as root"
    return f"cannot write {keys_path}: {(exc.strerror or str(exc)).lower()}"


def _keys_as_user(keys_path: str, user: str) -> dict:
    """The keys file as ``user`` sees it (admitted entries, refusal, warnings); as yourself if unknown."""
    try:
        who = account(user)
    except UserUnknown:
        return health.keys_view(keys_path)
    return call_as(who, lambda: health.keys_view(keys_path))


def _remedy(refusal: str, keys_path: str, user: str) -> str:
    try:
        group = group_name(account(user).pw_gid)
    except UserUnknown:
        group = user
    return refusal_remedy(refusal, keys_path, user, group)


@keys.command("list")
@config_option
@_keys_option
@user_option
@_json_option
def keys_list(keys_path: str, service_user: str, as_json: bool) -> None:
    """List the keys the agent admits, judged as the service's user: line, fingerprint, instance, options.

    Exit status 1 when the agent would admit nobody (the reason and the fix on stderr).
    """
    try:
        view = _keys_as_user(keys_path, service_user)
    except RuntimeError as exc:
        click.echo(f"cannot judge {keys_path} as {service_user}: {exc}", err=True)
        sys.exit(1)
    warnings = view["warnings"] + [f"{health.duplicate_words(instance, lines)}: {health.DUPLICATE_FIX}"
                                   for instance, lines in health.duplicate_instances(view["admitted"]).items()]
    if as_json:
        click.echo(json.dumps({"version": health.SCHEMA_VERSION, "path": keys_path, "user": service_user,
                               "admits_nobody_because": view["refusal"], "keys": view["admitted"],
                               "warnings": warnings}, indent=2))
    else:
        for entry in view["admitted"]:
            options = f" [{','.join(entry['options'])}]" if entry["options"] else ""
            click.echo(f"{entry['line']}: {entry['fingerprint']} {entry['instance'] or '-'}{options}")
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        if view["refusal"] is not None:
            click.echo(f"warning: the agent ({service_user}) admits nobody: {view['refusal']}:"
                       f" {_remedy(view['refusal'], keys_path, service_user)}", err=True)
    sys.exit(1 if view["refusal"] is not None else 0)


def _selectors(words: Sequence[str]) -> List[str]:
    """Group ``keys remove`` arguments into selectors: each word is one, except a key type and its base64.

    ``keys remove $(cat key.pub)`` gives ``ssh-ed25519 BASE64 NAME``: the
    first two words are one public-key selector, and the name after them is
    taken as that key's comment (not a selector of its own).
    """
    if len(words) == 3 and words[0] == ADMITTED_KEY_TYPE:  # one whole .pub line, unquoted
        return [f"{words[0]} {words[1]}"]
    selectors: List[str] = []
    index = 0
    while index < len(words):
        if words[index] == ADMITTED_KEY_TYPE and index + 1 < len(words):
            selectors.append(f"{words[index]} {words[index + 1]}")
            index += 2
        else:
            selectors.append(words[index])
            index += 1
    return selectors


@keys.command("remove", context_settings={"ignore_unknown_options": True})
@config_option
@_keys_option
@click.argument("selector", nargs=-1, required=True)
def keys_remove(keys_path: str, selector: Tuple[str, ...]) -> None:
    """Remove the keys each SELECTOR names: a fingerprint (SHA256:...), a public key or an instance name.

    Each selector is its own removal; one that matches nothing, or an
    instance name on several lines, is refused (exit status 1) without
    stopping the others.
    """
    failed = False
    for one in _selectors(selector):
        try:
            removed = remove_keys(keys_path, one)
        except KeysFileError as exc:
            click.echo(f"refused: {exc}", err=True)
            failed = True
            continue
        except OSError as exc:
            click.echo(f"refused: {_write_problem(keys_path, exc)}", err=True)
            failed = True
            continue
        for entry in removed:
            click.echo(f"removed: line {entry.line_number} {entry.fingerprint} {entry.instance or '-'}")
    sys.exit(1 if failed else 0)


def _listen_option(help_text: str) -> Callable:
    return click.option("--listen", multiple=True, metavar="ADDR", callback=_check_listen, help=help_text)


def _config_path_used() -> Optional[str]:
    """The config file that was read, if there was one."""
    from .config import CONFIG_META_KEY
    ctx = click.get_current_context()
    path, _ = ctx.meta.get(CONFIG_META_KEY, (None, False))
    return path if path and os.path.exists(path) else None


def _print_report(items: Sequence[health.Item], command: str, user: str, as_json: bool) -> None:
    """Print the findings (lines or JSON) and exit 1 if any failed."""
    if as_json:
        click.echo(json.dumps(health.report(items, command, user, _config_path_used()), indent=2))
    else:
        for item in items:
            click.echo(item.check_line() if command == "check" else item.status_line())
    sys.exit(1 if any(item.status == health.FAIL for item in items) else 0)


@main.command()
@config_option
@_keys_option
@_host_key_option
@_device_option
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="The agent's port (for listen addresses without one).")
@_listen_option("Address(es) the agent listens on (default: 127.0.0.1).")
@_runtime_dir_option
@_reservation_options
@user_option
@_json_option
def status(keys_path: str, host_key_path: str, device: str, port: int, listen: Tuple[str, ...],
           runtime_dir: str, state_dir: str, allow: Tuple[str, ...], service_user: str, as_json: bool) -> None:
    """What the agent sees, judged as the service's user; exit 1 when something is wrong.

    Host key fingerprint (MITIGATOR pins it), keys admitted, module and
    device, tcp_syncookies, clock (the host's time service), listening,
    the service's state and the last poll of each instance.
    """
    subject = health.Subject(keys_path, host_key_path, device, service_user, port, listen, runtime_dir,
                             state_dir, allow)
    _print_report(health.judge(subject, command="status", probe_timeout=3.0, measure_ntp=False),
                  "status", service_user, as_json)


@main.command()
@config_option
@_keys_option
@_host_key_option
@_device_option
@user_option
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="The agent's port (for listen addresses without one).")
@_listen_option("Address(es) the agent listens on (default: probe 127.0.0.1).")
@_runtime_dir_option
@_reservation_options
@click.option("--ntp-server", "ntp_servers", multiple=True, metavar="HOST[:PORT]", callback=_check_ntp_servers,
              help="NTP server to measure the offset against (repeatable). Default: ask the host's time"
                   f" service; {DEFAULT_NTP_SERVERS[0]} when none runs.")
@click.option("--max-offset", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Largest acceptable clock offset, seconds.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="Network timeout, seconds.")
@_json_option
def check(keys_path: str, host_key_path: str, device: str, service_user: str, port: int, listen: Tuple[str, ...],
          runtime_dir: str, state_dir: str, allow: Tuple[str, ...], ntp_servers: Tuple[str, ...], max_offset: float,
          timeout: float, as_json: bool) -> None:
    """Check everything MITIGATOR relies on, as the service's user; exit 1 if anything failed.

    One line per item: `ok` or `FAIL` with the reason and the command that
    fixes it (`warn`: worth knowing, does not fail).
    """
    subject = health.Subject(keys_path, host_key_path, device, service_user, port, listen, runtime_dir,
                             state_dir, allow)
    _print_report(health.judge(subject, command="check", probe_timeout=timeout, ntp_servers=ntp_servers,
                               max_offset=max_offset), "check", service_user, as_json)


@main.command()
@click.argument("host")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help=f"The agent's port [default: {DEFAULT_PORT}, or the one HOST:PORT names].")
@click.option("--key", "key_path", required=True, metavar="FILE",
              help="Private ed25519 key of the polling instance (mode 0600, as ssh requires).")
@click.option("--user", default=SSH_USER, show_default=True, help="SSH user name (logged by the agent, not checked).")
@click.option("--known-hosts", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="known_hosts file to verify the agent's host key with [default: ~/.ssh/known_hosts].")
@click.option("--host-fingerprint", default=None, metavar="SHA256:...", callback=_check_fingerprint,
              help="Expected host key fingerprint, as `host-key` prints it (pinning, as MITIGATOR does).")
@click.option("--accept-new", is_flag=True,
              help="Trust the host key of an agent known_hosts does not know yet, and add it there"
                   " (ssh's StrictHostKeyChecking=accept-new); a changed key is refused all the same.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds to wait for the connection and for the answer.")
def poll(host: str, port: Optional[int], key_path: str, user: str, known_hosts: Optional[str],
         host_fingerprint: Optional[str], accept_new: bool, timeout: float) -> None:
    """Poll HOST like a MITIGATOR instance: `get json`, validated, printed.

    HOST is a name or an address, [IPv6], HOST:PORT or [IPv6]:PORT. The agent's host key must
    verify (--host-fingerprint, else known_hosts) before anything is run.
    """
    try:
        host, port = parse_target(host, port, DEFAULT_PORT)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="HOST") from None
    try:
        result = asyncio.run(poll_agent(host, port, user, key_path, known_hosts, host_fingerprint, timeout,
                                        accept_new))
    except PollError as exc:
        click.echo(f"poll: {exc}", err=True)
        sys.exit(1)
    for problem in result.problems:
        click.echo(problem, err=True)
    click.echo(result.output, nl=False)
    sys.exit(result.exit_status)
