"""Fuzzing the config file (admin input, read at start and on SIGHUP).

Any bytes in the file: ``serve``'s parameters are processed (as at start
and as SIGHUP re-reads them) or a click error says what is wrong, never
another exception.  A value of the wrong TOML kind is refused (nothing
is converted), and a config file of the right kinds means exactly what
the same values given as flags mean: the same parameters, or both
refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import click
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import safe_dir  # noqa: F401  (fixture; also loads the profile)
from mitigator_agent.cli import main, serve
from mitigator_agent.config import ConfigError, load_defaults

def serve_context(args: List[str]) -> click.Context:
    """``serve``'s context as ``mitigator-agent serve ARGS`` makes it (nothing is run).

    Under the group's own context, as click makes it: a context of the bare
    command would leave click's cached help option without ``-h``.
    """
    root = main.make_context("mitigator-agent", [])
    return serve.make_context("serve", list(args), parent=root)


OPTIONS = {flag[2:]: param for param in serve.params if isinstance(param, click.Option)
           for flag in param.opts if flag.startswith("--") and flag != "--config"}
KEYS = sorted(OPTIONS)

SCALAR = st.one_of(
    st.booleans(),
    st.integers(-2**63, 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["0", "7100", "1.5", "-1", "127.0.0.1", "::1", "192.0.2.0/24", "0.0.0.0/0", "mitigator1", " ",
                     "inf", "1e3"]),
)
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3))


def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def toml(document: Dict[str, Any]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in document.items())


def toml_type_fits(option: click.Option, value: Any) -> bool:
    """The documented rule: TOML says what a value is, nothing is converted.

    Integers for integer flags, numbers for float flags, true/false for
    switches, strings for everything else; a bool is never a number.
    """
    if isinstance(value, list):
        return False
    if option.is_flag:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if isinstance(option.type, click.types.IntParamType):
        return isinstance(value, int)
    if isinstance(option.type, click.types.FloatParamType):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def flags(document: Dict[str, Any]) -> Optional[List[str]]:
    """The command line meaning what ``document`` says; None if flags cannot say it."""
    args: List[str] = []
    for key, value in document.items():
        option = OPTIONS.get(key)
        if option is None:
            return None
        if option.is_flag:
            if not toml_type_fits(option, value):
                return None
            args += [f"--{key}"] if value else []
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) != option.multiple:
            return None
        for item in values:
            if not toml_type_fits(option, item):
                return None
            args += [f"--{key}", repr(item) if isinstance(item, float) and not math.isinf(item) else str(item)]
    return args


def processed(args: List[str]) -> Optional[Dict[str, Any]]:
    """serve's parameters for ``args`` (nothing is run), or None if click refused them."""
    try:
        return serve_context(args).params
    except click.ClickException as exc:
        assert exc.format_message()
        return None


@pytest.fixture(scope="module")
def config_path(safe_dir: Path) -> Path:
    return safe_dir / "agent.toml"


@pytest.fixture(scope="module")
def empty_config(safe_dir: Path) -> str:
    """Named on the flags' side, so that no config file of this machine plays a part."""
    path = safe_dir / "empty.toml"
    path.write_text("")
    path.chmod(0o644)
    return str(path)


DOCUMENT = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUE, max_size=4)


@given(st.one_of(st.binary(max_size=200), DOCUMENT.map(lambda d: toml(d).encode()),
                 st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_any_config_file_is_used_or_refused_with_a_click_error(config_path, data):
    config_path.write_bytes(data)
    config_path.chmod(0o644)
    try:
        defaults = load_defaults(str(config_path), serve, required=True)
    except ConfigError as exc:
        event("refused by the loader")
        assert str(config_path) in str(exc) and "\n" not in str(exc)
    else:
        assert set(defaults) <= {option.name for option in OPTIONS.values()}
    event("processed" if processed(["--config", str(config_path)]) is not None else "refused")


def typed(key: str) -> st.SearchStrategy[Any]:
    """Values of the TOML type ``key`` takes, mostly in and around its range."""
    option = OPTIONS[key]
    if option.is_flag:
        one: st.SearchStrategy[Any] = st.booleans()
    elif isinstance(option.type, click.types.IntParamType):
        one = st.one_of(st.integers(-2, 70000), st.integers(-2**63, 2**63 - 1))
    elif isinstance(option.type, click.types.FloatParamType):
        one = st.one_of(st.integers(-2, 100), st.floats(allow_nan=False))
    else:
        one = st.one_of(st.sampled_from(["127.0.0.1", "::1", "192.0.2.0/24", "2001:db8::/64", "0.0.0.0/0", "::/0",
                                         "mitigator1", "", " ", "/opt/x", "a,b"]), st.text(max_size=12))
    return st.lists(one, max_size=3) if option.multiple else one


TYPED_DOCUMENT = st.lists(st.sampled_from(KEYS), unique=True, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({key: st.one_of(typed(key), typed(key), typed(key), VALUE) for key in keys}))


@given(TYPED_DOCUMENT)
def test_a_config_file_means_what_the_same_flags_mean(config_path, empty_config, document):
    config_path.write_text(toml(document))
    config_path.chmod(0o644)
    from_file = processed(["--config", str(config_path)])
    args = flags(document)
    if args is None:  # a list for a single value, true for a number, "80" for a port...
        event("only a file can say it")
        assert from_file is None, document
        return
    from_flags = processed(["--config", empty_config, *args])
    event("both accepted" if from_flags is not None else "refused")
    assert from_file == from_flags, (document, args)
