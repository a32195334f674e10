"""The asyncssh internals server.py relies on are still there, in the shape it uses them.

asyncssh has no public hook for a wrong first-kex guess, a repeated ssh-userauth service
request, or the env/X11/agent/exec channel requests (server.py says why each is needed), so
server.py overrides or reads these private names. pyproject.toml caps asyncssh below its next
minor release; this test is what a bump of that cap (`make lock`, `make test-newest`) meets
first when one of them moved: a named failure here instead of a connection that misbehaves.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import asyncssh
import pytest
from asyncssh import connection as asyncssh_connection
from asyncssh.constants import MSG_KEXINIT, MSG_SERVICE_REQUEST

from mitigator_agent import server

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 11's Python 3.9
    import tomli as tomllib

# Attributes of a connection that server.KexGuessServerConnection reads or sets.
CONNECTION_ATTRIBUTES = ["_client_kexinit", "_kex_algs", "_server_host_key_algs", "_ignore_first_kex",
                         "_auth_in_progress", "_auth_complete"]

# Channel request handlers server.RestrictedChannel overrides: (name, parameters after self).
CHANNEL_HANDLERS = [("_process_env_request", ["packet"]),
                    ("_process_x11_req_request", ["packet"]),
                    ("_process_auth_agent_req_at_openssh_dot_com_request", ["packet"]),
                    ("_process_exec_request", ["packet"])]


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)[1:]


def test_the_packet_handlers_it_wraps_are_asyncssh_s_own():
    handlers = asyncssh.SSHServerConnection._packet_handlers
    assert handlers[MSG_KEXINIT] is asyncssh.SSHServerConnection._process_kexinit
    assert handlers[MSG_SERVICE_REQUEST] is asyncssh.SSHServerConnection._process_service_request
    for name in ("_process_kexinit", "_process_service_request"):
        # Called positionally, (pkttype, pktid, packet), as asyncssh's dispatcher calls them.
        assert len(parameters(getattr(asyncssh.SSHServerConnection, name))) == 3, name


def test_the_override_keeps_every_other_handler():
    ours = server.KexGuessServerConnection._packet_handlers
    theirs = asyncssh.SSHServerConnection._packet_handlers
    assert set(ours) == set(theirs)
    assert {k for k in ours if ours[k] is not theirs[k]} == {MSG_KEXINIT, MSG_SERVICE_REQUEST}


@pytest.mark.parametrize("name", CONNECTION_ATTRIBUTES)
def test_the_connection_attributes_it_reads_are_set_by_asyncssh(name):
    assert f"self.{name} = " in inspect.getsource(asyncssh_connection), \
        f"asyncssh {asyncssh.__version__} no longer sets SSHConnection.{name}"


@pytest.mark.parametrize(("name", "args"), CHANNEL_HANDLERS)
def test_the_channel_request_handlers_it_overrides_exist(name, args):
    assert parameters(getattr(asyncssh.SSHServerChannel, name)) == args, name


def test_an_exec_request_still_starts_a_session_by_keyword():
    assert "command" in inspect.signature(asyncssh.SSHServerChannel._start_session).parameters


def test_pyproject_caps_asyncssh_below_a_release_these_names_were_not_checked_on():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    requirement = next(r for r in pyproject["project"]["dependencies"] if r.startswith("asyncssh"))
    cap = re.search(r"<\s*([0-9]+)\.([0-9]+)\b", requirement)
    assert cap, f"{requirement!r}: no upper bound"
    running = tuple(int(part) for part in asyncssh.__version__.split(".")[:2])
    assert running < (int(cap.group(1)), int(cap.group(2))), (asyncssh.__version__, requirement)
