"""The agent's config file: defaults for ``serve``'s flags; flags on the command line win.

TOML, one key per long flag, named as the flag without its dashes::

    port = 7100
    listen = ["192.0.2.10", "[2001:db8::10]:7100"]
    keys = "/opt/mitigator_agent/keys"
    host-key = "/opt/mitigator_agent/host.ed25519"
    device = "/dev/tcpsecrets"
    login-timeout = 10
    rate = 2.0
    anycast-instance = ["mitigator1"]   # may send `set`; absent or empty: set disabled
    state-dir = "/opt/mitigator_agent/state"
    user = "mitigator_agent"            # the account the service runs as

The default file is /opt/mitigator_agent/agent.toml, or the file named by
the ``MITIGATOR_AGENT_CONFIG`` environment variable; either may be absent.
``status``, ``check`` and ``keys`` read the same file as ``serve`` (the
keys they have flags for), so they look at the files ``serve`` uses.

Anything doubtful stops the agent instead of being guessed around (a
config can point the keys path elsewhere, so it is trusted like the keys
file): a file named with --config that is missing, a file that is not
valid TOML, an unknown key, a list where one value is expected or the
reverse, a value of the wrong kind (``keys = 5``, ``rate = true``,
``port = "17107"``: TOML says what a value is, nothing is converted) or
out of range, and a file that is writable by group or others or owned by
someone other than root or the agent's user, or that sits in a directory
(any up to ``/``) that is, or that is a symbolic link (sshd's StrictModes,
as for the keys file).  Each error is one line naming the file, the line
and the key (never the flag of the same name, which the admin did not
type).
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import sys
from typing import Any, Dict, List, Optional

import click

from .authkeys import default_allowed_owners, open_no_follow, secure_path_problem
from .runas import current_user_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 11's Python 3.9
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/opt/mitigator_agent/agent.toml"
CONFIG_ENV = "MITIGATOR_AGENT_CONFIG"  # names the default config file (tests, other layouts)
CONFIG_META_KEY = "mitigator_agent.config"  # ctx.meta: (path, whether it was named with --config)
SERVICE_USER = "mitigator_agent"  # the account the installer creates for the service
SERVE_COMMAND = "serve"  # the command whose flags the config file's keys are


class ConfigError(Exception):
    """The config file cannot be used; the message says why."""


class ConfigFileError(click.ClickException):
    """A config problem as the command line reports it: ``Error: MESSAGE``, exit status 2."""

    exit_code = 2


def default_config_path() -> str:
    """The config file used when no --config is given: $MITIGATOR_AGENT_CONFIG, else the installed one."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def default_service_user() -> str:
    """``mitigator_agent`` when that account exists, else the user running this command."""
    try:
        pwd.getpwnam(SERVICE_USER)
        return SERVICE_USER
    except KeyError:
        return current_user_name()


def _option_names(command: click.Command) -> Dict[str, click.Option]:
    """Config key (long flag without dashes) -> option, for every option but --config."""
    names = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.expose_value:
            for flag in param.opts:
                if flag.startswith("--"):
                    names[flag[2:]] = param
    return names


def _line_of(text: str, key: str) -> Optional[int]:
    """The line number where ``key = ...`` is set in TOML ``text`` (bare or quoted key), or None."""
    pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def _kind_problem(option: click.Option, value: Any) -> Optional[str]:
    """Why ``value`` (one item as TOML gave it) is the wrong kind for ``option``, or None.

    Integers for integer flags, numbers for float flags, true/false for
    switches, strings for everything else; a bool is never a number.
    """
    param_type = option.type
    if option.is_flag:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(param_type, (click.types.IntParamType,)):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number (no quotes)"
    if isinstance(param_type, click.types.FloatParamType):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        return "must be a number (no quotes)"
    if not isinstance(value, str):
        return 'must be a string in double quotes'
    return None


def _check_value(option: click.Option, value: Any, ctx: Optional[click.Context]) -> Any:
    """Kind, then the option's own type (ranges) and callback; raise ValueError with the reason."""
    items = value if option.multiple else [value]
    converted: List[Any] = []
    for item in items:
        problem = _kind_problem(option, item)
        if problem is not None:
            raise ValueError(f"{problem} (is {_toml_repr(item)})")
        try:
            converted.append(item if option.is_flag else option.type.convert(item, None, None))
        except click.BadParameter as exc:
            raise ValueError(exc.message.rstrip(".")) from None
    result: Any = tuple(converted) if option.multiple else converted[0]
    if option.callback is not None and ctx is not None:
        try:
            result = option.callback(ctx, option, result)
        except click.BadParameter as exc:
            raise ValueError(exc.message.rstrip(".")) from None
    return result


def _toml_char(char: str) -> str:
    """One character of a TOML basic string: quotes and backslashes escaped, anything unprintable as \\uXXXX."""
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    return f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Escaped as TOML writes it: a value must not break the one-line error (a newline, a control character).
        return '"' + "".join(_toml_char(char) for char in value) + '"'
    return repr(value)


def load_defaults(path: str, command: click.Command, required: bool,
                  ctx: Optional[click.Context] = None) -> Dict[str, Any]:
    """Read ``path`` into click's default_map for ``command`` ({} if absent and not required).

    Every value is checked here (kind, range, the option's callback when
    ``ctx`` is given), so an error names the file, line and key.
    """
    try:
        with os.fdopen(open_no_follow(path), "rb") as handle:
            problem = secure_path_problem(path, os.fstat(handle.fileno()), default_allowed_owners(),
                                          label="config")
            if problem:
                raise ConfigError(f"{problem}: {problem.remedy()}")
            raw = handle.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"config file {path} is a symbolic link (never followed);"
                              " name the file itself") from None
        if exc.errno == errno.EISDIR:
            raise ConfigError(f"config file {path} is a directory") from None
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None

    options = _option_names(command)
    defaults: Dict[str, Any] = {}
    for key, value in data.items():
        line = _line_of(text, key)
        where = f"config file {path}" + (f" line {line}" if line else "")
        option = options.get(key)
        if option is None:
            known = ", ".join(sorted(options))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        if option.multiple != isinstance(value, list) or isinstance(value, dict):
            wanted = "a list, e.g. [\"...\"]" if option.multiple else "a single value"
            raise ConfigError(f"{where}: {key} must be {wanted}")
        try:
            _check_value(option, value, ctx)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key} {exc}") from None
        assert option.name is not None
        defaults[option.name] = value
    return defaults


def _serve_command(ctx: click.Context) -> click.Command:
    """The ``serve`` command (whose flags the config keys are), found from any command's context."""
    root = ctx.find_root().command
    if isinstance(root, click.Group):
        serve = root.commands.get(SERVE_COMMAND)
        if serve is not None:
            return serve
    return ctx.command


def config_option(function: Any) -> Any:
    """The --config flag: loads the file before the other flags are processed.

    On ``serve`` every key sets a default; on other commands (status,
    check, keys) the file is judged as ``serve`` would judge it and only
    the keys the command has flags for are used, so both look at the same
    files.
    """

    def load(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
        if ctx.resilient_parsing:  # completion, the man page: the built-in defaults, not this machine's
            return
        path = value or default_config_path()
        serve = _serve_command(ctx)
        try:
            defaults = load_defaults(path, serve, required=value is not None, ctx=ctx)
        except ConfigError as exc:
            raise ConfigFileError(str(exc)) from None
        if serve is not ctx.command:
            own = {param.name for param in ctx.command.params}
            defaults = {name: item for name, item in defaults.items() if name in own}
            if defaults.get("port") == 0:  # serve's "any free port" names nothing to look at
                del defaults["port"]
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        ctx.meta[CONFIG_META_KEY] = (path, value is not None)

    return click.option(
        "--config", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
        callback=load, metavar="FILE",
        help=f"Config file [default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}, if present].",
    )(function)


def user_option(function: Any) -> Any:
    """The --user flag (config key ``user``): the account the service runs as."""
    return click.option(
        "--user", "service_user", default=default_service_user, metavar="NAME",
        help=f"The account the service runs as [default: {SERVICE_USER} if it exists, else you].",
    )(function)


def reload_params(ctx: click.Context) -> Dict[str, Any]:
    """Read the config file again (SIGHUP) and return the command's parameters as they would now be.

    ``ctx`` is the running command's context (``click.get_current_context``).
    The command's parameters are processed again by click itself, exactly
    as at start but with no command line except the ``--config`` that named
    the file (so types, ranges and callbacks apply as they did then); the
    values that were given on the command line then replace theirs, since
    flags keep winning.  Raises click.ClickException (ConfigError arrives
    as click.BadParameter: file unusable, unknown key, bad value); then
    nothing may change.
    """
    path, named = ctx.meta.get(CONFIG_META_KEY, (default_config_path(), False))
    fresh = ctx.command.make_context(ctx.info_name, ["--config", path] if named else [], parent=ctx.parent)
    params = dict(fresh.params)
    for name, value in ctx.params.items():
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            params[name] = value
    return params
