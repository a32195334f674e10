"""A ``tmp_path`` that passes sshd-style StrictModes all the way up to ``/``.

The agent refuses a keys or config file if any directory of its path up to
``/`` is writable by group or others, as sshd does; ``/tmp`` (mode 1777)
fails that.  Tests therefore work below the user's home directory
(``~/.cache/mitigator-tests``), whose chain is safe on any sane
machine; if it is not, the fixture says so instead of letting every test
fail with a StrictModes refusal.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mitigator_agent.authkeys import default_allowed_owners, secure_path_problem


def safe_base() -> Path:
    """The directory temporary test directories are created in (made 0700 if missing)."""
    base = Path.home() / ".cache" / "mitigator-tests"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    probe = base / ".probe"
    probe.write_text("")
    try:
        problem = secure_path_problem(str(probe), probe.stat(), default_allowed_owners(), label="test")
    finally:
        probe.unlink()
    if problem is not None:
        raise RuntimeError(f"no StrictModes-safe place for test files: {problem}")
    return base


def safe_tmp_path(name: str) -> Iterator[Path]:
    """Yield a fresh 0755 directory below safe_base(); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"{name[:10]}-", dir=safe_base()))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def isolate_from_the_machine() -> Path:
    """Point the agent's default config at a test config, never the machine's own.

    Sets ``MITIGATOR_AGENT_CONFIG`` (honoured by config.default_config_path)
    to a file below safe_base() naming the current user as the service's
    account (so an installed ``mitigator_agent`` account does not change
    what the tests judge) and a runtime directory of its own.  Returns it.
    """
    base = safe_base()
    path = base / "isolated-agent.toml"
    user = pwd.getpwuid(os.geteuid()).pw_name
    text = f'user = "{user}"\nruntime-dir = "{base / "isolated-run"}"\n'
    if not path.exists() or path.read_text() != text:
        temp = base / f".isolated-agent.toml.{os.getpid()}"
        temp.write_text(text)
        temp.chmod(0o644)
        temp.replace(path)
    os.environ["MITIGATOR_AGENT_CONFIG"] = str(path)
    return path
