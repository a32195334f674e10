"""The agent's config file: defaults for ``serve``'s flags; flags on the command line win.

TOML, one key per long flag, named as the flag without its dashes::

    port = 7100
    listen = ["192.0.2.10", "2001:db8::10"]
    keys = "/opt/mitigator_agent/keys"
    host-key = "/opt/mitigator_agent/host.ed25519"
    device = "/dev/tcpsecrets"
    login-timeout = 10
    rate = 2.0
    anycast-instance = ["mitigator1"]   # may send `set`; absent or empty: set disabled
    state-dir = "/opt/mitigator_agent/state"

The default file, /opt/mitigator_agent/agent.toml, may be absent. Anything
doubtful stops the agent instead of being guessed around (a config can
point the keys path elsewhere, so it is trusted like the keys file): a file
named with --config that is missing, a file that is not valid TOML, an
unknown key, a list where one value is expected or the reverse, and a file
that is writable by group or others or owned by someone other than root or
the agent's user, or that sits in a directory (any up to ``/``) that is,
or that is a symbolic link (sshd's StrictModes, as for the keys file).
Values are then checked by the flags' own types, with the flag's name in
the message.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Dict

import click

from .authkeys import default_allowed_owners, open_no_follow, secure_path_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 11's Python 3.9
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/opt/mitigator_agent/agent.toml"
CONFIG_META_KEY = "mitigator_agent.config"  # ctx.meta: (path, whether it was named with --config)


class ConfigError(Exception):
    """The config file cannot be used; the message says why."""


def _option_names(command: click.Command) -> Dict[str, click.Option]:
    """Config key (long flag without dashes) -> option, for every option but --config."""
    names = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.expose_value:
            for flag in param.opts:
                if flag.startswith("--"):
                    names[flag[2:]] = param
    return names


def load_defaults(path: str, command: click.Command, required: bool) -> Dict[str, Any]:
    """Read ``path`` into click's default_map for ``command`` ({} if absent and not required)."""
    try:
        with os.fdopen(open_no_follow(path), "rb") as handle:
            problem = secure_path_problem(path, os.fstat(handle.fileno()), default_allowed_owners(),
                                          label="config")
            if problem:
                raise ConfigError(problem)
            data = tomllib.load(handle)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"config file {path} is a symbolic link (never followed)") from None
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None

    options = _option_names(command)
    defaults: Dict[str, Any] = {}
    for key, value in data.items():
        option = options.get(key)
        if option is None:
            known = ", ".join(sorted(options))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {known})")
        if option.multiple != isinstance(value, list):
            wanted = "a list" if option.multiple else "a single value"
            raise ConfigError(f"config file {path}: {key} must be {wanted}")
        if isinstance(value, (dict, list)) and not option.multiple:
            raise ConfigError(f"config file {path}: {key} must be a single value")
        assert option.name is not None
        defaults[option.name] = value
    return defaults


def config_option(function: Any) -> Any:
    """The --config flag: loads the file before the other flags are processed."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        try:
            defaults = load_defaults(value or DEFAULT_CONFIG_PATH, ctx.command, required=value is not None)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        ctx.meta[CONFIG_META_KEY] = (value or DEFAULT_CONFIG_PATH, value is not None)

    return click.option(
        "--config", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
        callback=load, help=f"Config file with defaults for these flags [default: {DEFAULT_CONFIG_PATH}, if present].",
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
    path, named = ctx.meta.get(CONFIG_META_KEY, (DEFAULT_CONFIG_PATH, False))
    fresh = ctx.command.make_context(ctx.info_name, ["--config", path] if named else [], parent=ctx.parent)
    params = dict(fresh.params)
    for name, value in ctx.params.items():
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            params[name] = value
    return params
