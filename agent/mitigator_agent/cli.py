"""``mitigator-agent`` command line.

- ``serve``: run the SSH server (see server.py).
- ``keys add|list|remove``: edit the keys file (atomic, keeps owner and mode).
- ``status``: host key fingerprint, module and ABI, keys, clock state.
- ``check``: one line per item, ``ok`` or ``FAIL`` with the reason; exit
  status 1 when any item failed.
- ``poll HOST``: do what a MITIGATOR instance does (``get json`` over SSH),
  validate and print the answer; exit status 0 only if all of that worked.
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import json
import logging
import os
import pwd
import socket
import stat
import sys
from typing import Callable, List, Optional, Tuple

import asyncssh
import click

from . import __version__, logs, namespaces
from .answers import GET_JSON_COMMAND, validate_json_answer
from .authkeys import (DEFAULT_KEYS_PATH, REPLACED, KeysFile, KeysFileError, add_key, parse_keys,
                       remove_keys, split_lines)
from .config import config_option
from .clock import DEFAULT_NTP_SERVERS, NtpUnavailable, kernel_clock_state, measure_ntp_offset
from .hostkey import (
    DEFAULT_HOST_KEY_PATH,
    HostKeyError,
    fingerprint_line,
    load_host_key,
    load_or_create_host_key,
)
from .server import DEFAULT_PORT, ServerSettings, disable_core_dumps, format_address, run_until_signalled
from .snapshot import DEFAULT_DEVICE, DeviceMissing, Snapshot, SnapshotError, read_snapshot

DEFAULTS = ServerSettings()
SSH_USER = "mitigator_agent"
SYNCOOKIES_PROC = "/proc/sys/net/ipv4/tcp_syncookies"
SSH_BANNER_PREFIX = b"SSH-2.0-"


def _keys_option(function: Callable) -> Callable:
    return click.option("--keys", "keys_path", default=DEFAULT_KEYS_PATH, show_default=True,
                        help="Keys file (OpenSSH authorized_keys format).")(function)


def _device_option(function: Callable) -> Callable:
    return click.option("--device", default=DEFAULT_DEVICE, show_default=True,
                        help="Snapshot source: the tcpsecrets device or a file holding one snapshot.")(function)


def _host_key_option(function: Callable) -> Callable:
    return click.option("--host-key", "host_key_path", default=DEFAULT_HOST_KEY_PATH, show_default=True,
                        help="SSH host key (ed25519; created on first serve, never regenerated).")(function)


def _quiet_logger() -> logging.Logger:
    """A logger that drops records: CLI commands print their own findings."""
    logger = logging.getLogger("mitigator_agent.cli")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


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


INSTALL_SCRIPT = "/usr/lib/mitigator-agent/install.sh"  # kept by the install script, for -d


def _uninstall(purge: bool) -> None:
    """Run the install script's own uninstall (the copy kept at install time); never returns."""
    if not os.path.exists(INSTALL_SCRIPT):
        click.echo(f"mitigator-agent: {INSTALL_SCRIPT} is missing, so the install script did not install this"
                   " agent: remove the Debian package with apt remove mitigator-agent", err=True)
        sys.exit(1)
    argv = ["sh", INSTALL_SCRIPT, "-d"] + (["--purge"] if purge else [])
    os.execvp("sh", argv)


@click.group(invoke_without_command=True)
@click.version_option(__version__, prog_name="mitigator-agent")
@click.option("-d", "--uninstall", is_flag=True,
              help="Uninstall (as root): the service, the module, the agent and the system settings;"
                   " the keys file and the host key stay.")
@click.option("--purge", is_flag=True, help="With -d: also remove the keys file, the host key and the user.")
@click.pass_context
def main(ctx: click.Context, uninstall: bool, purge: bool) -> None:
    """Serve this server's TCP SYN-cookie/ISN secrets to MITIGATOR over SSH."""
    if purge and not uninstall:
        raise click.UsageError("--purge goes with -d")
    if uninstall:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("-d takes no command")
        _uninstall(purge)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@config_option
@click.option("--listen", multiple=True, metavar="ADDR",
              help="Address to listen on (repeatable; IPv4 or IPv6). Default: all addresses.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULTS.port, show_default=True,
              help="TCP port; 0 picks a free one (logged).")
@_keys_option
@_host_key_option
@_device_option
@click.option("--login-timeout", type=click.FloatRange(min=0.1), default=DEFAULTS.login_timeout,
              show_default=True, help="Seconds a client has to authenticate.")
@click.option("--max-unauthenticated", type=click.IntRange(min=1), default=DEFAULTS.max_unauthenticated,
              show_default=True, help="Connections allowed at once before authentication.")
@click.option("--max-unauthenticated-per-source", type=click.IntRange(min=1),
              default=DEFAULTS.max_unauthenticated_per_source, show_default=True,
              help="Of those, connections allowed from one address.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.rate,
              show_default=True, help="New connections per second per source address (sustained).")
@click.option("--burst", type=click.IntRange(min=1), default=DEFAULTS.burst, show_default=True,
              help="New connections a source address may open at once.")
@click.option("--anycast-instance", "anycast_instances", multiple=True, metavar="NAME",
              callback=_check_instance_names,
              help="Key instance (the keys file line's comment) allowed to `set` (repeatable)."
                   " None: set is disabled.")
@click.option("--state-dir", default=DEFAULTS.state_dir, show_default=True,
              help="Directory for the last accepted anycast set (replayed into a reloaded module).")
@click.option("--allow", multiple=True, metavar="CIDR", callback=_check_networks,
              help="MITIGATOR's addresses (repeatable): admission of their own, like sources the keys"
                   " file's from= names.")
@click.option("--max-unauthenticated-allowed", type=click.IntRange(min=1),
              default=DEFAULTS.max_unauthenticated_allowed, show_default=True,
              help="Connections allowed at once before authentication from --allow and from= sources"
                   " (a pool of their own).")
@click.option("--strict-allow", is_flag=True, default=DEFAULTS.strict_allow,
              help="Drop connections from anyone but --allow and from= sources before the SSH banner.")
def serve(listen: Tuple[str, ...], port: int, keys_path: str, host_key_path: str, device: str,
          login_timeout: float, max_unauthenticated: int, max_unauthenticated_per_source: int,
          rate: float, burst: int, anycast_instances: Tuple[str, ...], state_dir: str,
          allow: Tuple[str, ...], max_unauthenticated_allowed: int, strict_allow: bool) -> None:
    """Run the SSH server (logs on stdout, one line per event)."""
    # First of all: the host key and the secrets must never end up in a core file.
    core_dump_problem = disable_core_dumps()
    logs.setup()
    log = logs.get_logger()
    if core_dump_problem:
        log.warning(logs.event("core-dumps-not-disabled", reason=core_dump_problem))
    settings = ServerSettings(port=port, listen=listen, keys_path=keys_path, host_key_path=host_key_path,
                              device=device, login_timeout=login_timeout,
                              max_unauthenticated=max_unauthenticated,
                              max_unauthenticated_per_source=max_unauthenticated_per_source,
                              rate=rate, burst=burst, anycast_instances=anycast_instances,
                              state_dir=state_dir, allow=allow,
                              max_unauthenticated_allowed=max_unauthenticated_allowed,
                              strict_allow=strict_allow)
    try:
        host_key, created = load_or_create_host_key(host_key_path)
    except (HostKeyError, OSError) as exc:
        log.error(logs.event("cannot-start", reason=str(exc)))
        sys.exit(1)
    if created:
        log.info(logs.event("host-key-created", path=host_key_path))
    log.info(logs.event("starting", version=__version__, host_key=fingerprint_line(host_key),
                        keys=keys_path, device=device,
                        anycast=",".join(anycast_instances) if anycast_instances else "disabled"))
    try:
        asyncio.run(run_until_signalled(settings, host_key))
    except OSError as exc:
        log.error(logs.event("cannot-start", reason=str(exc)))
        sys.exit(1)


@main.command("host-key")
@_host_key_option
def host_key_command(host_key_path: str) -> None:
    """Print the host key's fingerprint (MITIGATOR pins it); create the key first if there is none.

    Run as the agent's user, so the key is theirs (mode 0600), exactly as
    ``serve`` would create it. An existing key is never replaced.
    """
    try:
        key, created = load_or_create_host_key(host_key_path)
    except FileNotFoundError:
        click.echo(f"cannot create host key {host_key_path}: its directory does not exist", err=True)
        sys.exit(1)
    except PermissionError:
        click.echo(f"cannot create host key {host_key_path}: no write permission in its directory"
                   " (run this as the agent's user)", err=True)
        sys.exit(1)
    except (HostKeyError, OSError) as exc:
        click.echo(f"host key: {exc}", err=True)
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


@keys.command("add")
@_keys_option
@click.argument("key", nargs=-1, required=True)
def keys_add(keys_path: str, key: Tuple[str, ...]) -> None:
    """Add KEY (`ssh-ed25519 BASE64 [instance-name]`, options allowed; `-` reads lines from stdin).

    A key already present with other options or another instance name has
    its line replaced (`replaced: ...`). Lines split at newlines only; a line
    with a control character or non-ASCII white space is refused whole.
    """
    if key == ("-",):
        lines = split_lines(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"))
    else:
        lines = [" ".join(key)]
    failed = False
    for line in lines:
        if not line.strip(" \t"):
            continue
        try:
            entry, outcome = add_key(keys_path, line)
        except (KeysFileError, OSError) as exc:
            click.echo(f"refused: {exc}", err=True)
            failed = True
            continue
        detail = " (options or instance name changed)" if outcome == REPLACED else ""
        click.echo(f"{outcome}: line {entry.line_number} {entry.fingerprint} {entry.instance or '-'}{detail}")
    refusal = KeysFile(keys_path, logger=_quiet_logger()).state().refusal
    if refusal is not None:
        click.echo(f"warning: the agent would admit nobody: {refusal}", err=True)
    sys.exit(1 if failed else 0)


@keys.command("list")
@_keys_option
def keys_list(keys_path: str) -> None:
    """List admitted keys: line, fingerprint, instance name, options."""
    try:
        with open(keys_path, "rb") as handle:
            text = handle.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        click.echo(f"{keys_path} does not exist", err=True)
        sys.exit(1)
    parsed = parse_keys(text, keys_path)
    for entry in parsed.entries:
        options = f" [{','.join(entry.options)}]" if entry.options else ""
        click.echo(f"{entry.line_number}: {entry.fingerprint} {entry.instance or '-'}{options}")
    for warning in parsed.warnings:
        click.echo(f"warning: {warning}", err=True)
    refusal = KeysFile(keys_path, logger=_quiet_logger()).state().refusal
    if refusal is not None:
        click.echo(f"warning: the agent admits nobody: {refusal}", err=True)


@keys.command("remove")
@_keys_option
@click.argument("selector", nargs=-1, required=True)
def keys_remove(keys_path: str, selector: Tuple[str, ...]) -> None:
    """Remove keys matching SELECTOR: a fingerprint (SHA256:...), a public key or an instance name."""
    try:
        removed = remove_keys(keys_path, " ".join(selector))
    except (KeysFileError, OSError) as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(1)
    for entry in removed:
        click.echo(f"removed: line {entry.line_number} {entry.fingerprint} {entry.instance or '-'}")


def _describe_snapshot(snap: Snapshot) -> str:
    """One line about the module: ABI, HZ, algorithms, cookie clock, sets applied."""
    return (f"ABI {snap.abi_version}, HZ {snap.hz}, isn_algorithm {snap.algorithm},"
            f" cookie_clock {snap.cookie_clock_name}, set_generation {snap.set_generation},"
            f" tcp_syncookies {snap.tcp_syncookies}")


@main.command()
@_keys_option
@_host_key_option
@_device_option
def status(keys_path: str, host_key_path: str, device: str) -> None:
    """Show host key fingerprint, module state, keys and clock state."""
    try:
        click.echo(f"host key: {fingerprint_line(load_host_key(host_key_path))} ({host_key_path})")
    except FileNotFoundError:
        click.echo(f"host key: {host_key_path} missing (serve creates it)")
    except (HostKeyError, OSError) as exc:
        click.echo(f"host key: unusable: {exc}")

    try:
        click.echo(f"module: loaded, {_describe_snapshot(read_snapshot(device))} ({device})")
    except DeviceMissing:
        click.echo(f"module: not loaded (no {device})")
    except SnapshotError as exc:
        click.echo(f"module: bad snapshot from {device}: {exc}")
    except OSError as exc:
        click.echo(f"module: {device} unreadable: {exc.strerror or exc}")

    state = KeysFile(keys_path, logger=_quiet_logger()).state()
    if state.refusal is None:
        click.echo(f"keys: {len(state.entries)} admitted ({keys_path})")
    else:
        click.echo(f"keys: none admitted: {state.refusal}")
    for warning in state.warnings:
        click.echo(f"keys: warning: {warning}")

    try:
        clock = kernel_clock_state()
    except OSError as exc:
        click.echo(f"clock: unknown (adjtimex failed: {exc.strerror})")
    else:
        word = "synchronised" if clock.synchronized else "NOT synchronised"
        click.echo(f"clock: {word} (adjtimex state {clock.state}, maxerror {clock.maxerror_us // 1000} ms)")


def _user_can_read(path: str, user: str) -> Tuple[bool, str]:
    """Whether ``user`` can read ``path``, and if not, why.

    As root this is tried for real, in a child process that takes the
    user's uid and groups: the tcpsecrets module decides in its open()
    (its node may show 0444 while it admits only root and one group), so
    mode bits alone can be wrong. Without root only the mode bits are
    judged, and the answer says so.
    """
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return False, f"no such user {user}"
    if account.pw_uid == 0:
        return True, ""
    if os.geteuid() == 0:
        return _try_read_as(path, user, account)
    st = os.stat(path)
    groups = set(os.getgrouplist(user, account.pw_gid))
    if st.st_uid == account.pw_uid:
        allowed = bool(st.st_mode & stat.S_IRUSR)
    elif st.st_gid in groups:
        allowed = bool(st.st_mode & stat.S_IRGRP)
    else:
        allowed = bool(st.st_mode & stat.S_IROTH)
    if allowed:
        return True, ""
    try:
        owner_group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        owner_group = str(st.st_gid)
    return False, (f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, group {owner_group})"
                   f" is not readable by {user} (judged from mode bits; run as root to try it)")


def _try_read_as(path: str, user: str, account: pwd.struct_passwd) -> Tuple[bool, str]:
    """Open and read ``path`` in a forked child running as ``account``."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        error = ""
        try:
            os.setgroups(os.getgrouplist(user, account.pw_gid))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 4096)
        except OSError as exc:
            error = exc.strerror or str(exc)
        os.write(write_end, error.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        error = pipe.read().decode()
    os.waitpid(child, 0)
    if error:
        return False, f"{path}: {error} (tried as {user})"
    return True, ""


def _probe_ssh_port(host: str, port: int, timeout: float) -> Optional[str]:
    """None if an SSH server answers at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            banner = sock.makefile("rb").readline(256)
    except OSError as exc:
        return f"nothing listening on {format_address(host, port)} ({exc.strerror or exc})"
    if not banner.startswith(SSH_BANNER_PREFIX):
        return f"{format_address(host, port)} does not speak SSH"
    return None


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _check_namespaces(report: Callable[[bool, str], None]) -> None:
    """Network namespaces (containers) that would refuse MITIGATOR's cookies, and DNAT rules."""
    try:
        table = namespaces.read_table()
    except namespaces.TableUnavailable as exc:
        report(False, f"network namespaces: {exc}")
        return
    namespaces.add_processes(table)
    losing = namespaces.losing_cookies(table)
    if not losing:
        report(True, f"cookies accepted in every network namespace with listeners ({len(table)} namespaces)")
    for ns in losing:
        where = ", ".join(ns.processes[:3]) or "processes not visible (run as root)"
        ports = ",".join(map(str, ns.listening_ports)) or "-"
        report(False, f"network namespace {ns.name} refuses MITIGATOR's cookies (tcp_syncookies={ns.syncookies},"
                      f" {ns.refused} refused so far; listening ports {ports}; {where}): {namespaces.remedy(ns)}")
    rules = namespaces.dnat_rules()
    if rules:
        click.echo(f"warn DNAT rules found ({len(rules)}): services reached through destination NAT cannot accept"
                   f" MITIGATOR's cookies (use host networking, macvlan/ipvlan or routed addresses); first: {rules[0]}")


@main.command()
@_device_option
@click.option("--user", default=None, help="The user the agent runs as (default: the current user).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--listen", multiple=True, metavar="ADDR",
              help="Address(es) the agent listens on (default: probe 127.0.0.1).")
@click.option("--ntp-server", "ntp_servers", multiple=True, metavar="HOST[:PORT]",
              help=f"NTP server to measure the offset against (repeatable; default {DEFAULT_NTP_SERVERS[0]}).")
@click.option("--max-offset", type=float, default=0.1, show_default=True,
              help="Largest acceptable NTP offset, seconds.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Network timeout, seconds.")
def check(device: str, user: Optional[str], port: int, listen: Tuple[str, ...],
          ntp_servers: Tuple[str, ...], max_offset: float, timeout: float) -> None:
    """Check everything MITIGATOR relies on; exit 1 with one reason per failed item."""
    failures = 0

    def report(ok: bool, text: str) -> None:
        nonlocal failures
        failures += not ok
        click.echo(f"{'ok  ' if ok else 'FAIL'} {text}")

    snap: Optional[Snapshot] = None
    try:
        snap = read_snapshot(device)
    except DeviceMissing:
        report(False, f"module loaded: tcpsecrets module not loaded (no {device})")
    except (SnapshotError, OSError) as exc:
        report(True, f"module loaded ({device} exists)")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        report(False, f"device readable: {device}: {reason}")
    else:
        report(True, f"module loaded ({device}, {_describe_snapshot(snap)})")
        if user is not None and user != pwd.getpwuid(os.geteuid()).pw_name:
            readable, reason = _user_can_read(device, user)
            report(readable, f"device readable by {user}" + (f": {reason}" if reason else ""))
        else:
            report(True, "device readable by the current user")

    if snap is not None:
        syncookies: Optional[int] = snap.tcp_syncookies
    else:
        try:
            with open(SYNCOOKIES_PROC) as handle:
                syncookies = int(handle.read())
        except (OSError, ValueError):
            syncookies = None
    report(syncookies == 2, f"tcp_syncookies = 2 (is {syncookies if syncookies is not None else 'unknown'})")

    if snap is not None and _is_char_device(device):  # a snapshot file has no namespace table
        _check_namespaces(report)

    try:
        clock = kernel_clock_state()
        report(clock.synchronized, "kernel clock synchronised by NTP" if clock.synchronized else
               f"kernel clock synchronised: no (adjtimex state {clock.state}, status 0x{clock.status:x})")
    except OSError as exc:
        report(False, f"kernel clock synchronised: adjtimex failed ({exc.strerror})")

    try:
        measured = measure_ntp_offset(ntp_servers or DEFAULT_NTP_SERVERS, timeout)
        report(abs(measured.offset) <= max_offset,
               f"NTP offset {measured.offset * 1000:+.1f} ms against {measured.server}"
               f" (limit {max_offset * 1000:.0f} ms)")
    except NtpUnavailable as exc:
        report(False, f"NTP offset: no server answered ({exc})")

    for host in listen or ("127.0.0.1",):
        problem = _probe_ssh_port(host, port, timeout)
        report(problem is None, f"agent listening on {format_address(host, port)}" if problem is None else
               f"agent listening: {problem}")

    sys.exit(1 if failures else 0)


async def _poll(host: str, port: int, user: str, key_path: str, known_hosts: Optional[str],
                host_fingerprint: Optional[str], timeout: float) -> Tuple[int, str, List[str]]:
    """Run `get json` like MITIGATOR; return (exit status, stdout, problems)."""
    client_key = asyncssh.read_private_key(key_path)
    conn = await asyncio.wait_for(asyncssh.connect(
        host, port, username=user, client_keys=[client_key], known_hosts=known_hosts,
        agent_path=None, config=None, preferred_auth="publickey"), timeout)
    async with conn:
        server_key = conn.get_server_host_key()
        seen = server_key.get_fingerprint("sha256") if server_key else "?"
        if host_fingerprint is not None and seen != host_fingerprint:
            return 1, "", [f"host key is {seen}, expected {host_fingerprint}"]
        problems = [] if known_hosts or host_fingerprint else [f"warning: host key {seen} not verified"]
        result = await asyncio.wait_for(conn.run(GET_JSON_COMMAND), timeout)
    stdout = str(result.stdout or "")
    if result.exit_status != 0:
        return 1, "", problems + [f"agent answered exit status {result.exit_status}: {str(result.stderr).strip()}"]
    try:
        answer = json.loads(stdout)
    except ValueError as exc:
        return 1, "", problems + [f"answer is not JSON: {exc}"]
    invalid = validate_json_answer(answer)
    if invalid:
        return 1, "", problems + [f"invalid answer: {problem}" for problem in invalid]
    return 0, json.dumps(answer, indent=2) + "\n", problems


@main.command()
@click.argument("host")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Private ed25519 key of the polling instance.")
@click.option("--user", default=SSH_USER, show_default=True)
@click.option("--known-hosts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="known_hosts file to verify the agent's host key with.")
@click.option("--host-fingerprint", default=None, metavar="SHA256:...",
              help="Expected host key fingerprint (pinning, as MITIGATOR does).")
@click.option("--timeout", type=float, default=10.0, show_default=True)
def poll(host: str, port: int, key_path: str, user: str, known_hosts: Optional[str],
         host_fingerprint: Optional[str], timeout: float) -> None:
    """Poll HOST like a MITIGATOR instance: `get json`, validated, printed."""
    try:
        status_code, output, problems = asyncio.run(
            _poll(host, port, user, key_path, known_hosts, host_fingerprint, timeout))
    except (OSError, asyncssh.Error, asyncio.TimeoutError, asyncssh.KeyImportError) as exc:
        click.echo(f"poll failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    for problem in problems:
        click.echo(problem, err=True)
    click.echo(output, nl=False)
    sys.exit(status_code)

