"""Judge files as another user by really being that user (in a forked child).

The tcpsecrets module decides who may read its device in its open() (the
node may show 0444 while it admits only root and one group), and a keys
file's readability depends on every directory above it: mode bits alone
can be wrong, so as root ``check`` and ``status`` fork a child that takes
the user's uid, gid and groups and does the work there.  Only the
function's JSON-able result crosses back, through a pipe.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from typing import Any, Callable, Optional

MAX_RESULT_BYTES = 1 << 20


class UserUnknown(Exception):
    """No such account; the message names it."""


def account(user: str) -> pwd.struct_passwd:
    """The passwd entry of ``user`` (a name or a numeric uid); UserUnknown if none."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    if user.isdigit():
        try:
            return pwd.getpwuid(int(user))
        except KeyError:
            pass
    raise UserUnknown(f"no such user {user!r}: create it (the installer does) or name the service's"
                      " account with --user or `user` in the config")


def current_user_name() -> str:
    """The name of the user this process runs as (its uid as text when the system has none)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def group_name(gid: int) -> str:
    """The name of group ``gid`` (the number as text when the system has none)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def can_become(user: pwd.struct_passwd) -> bool:
    """Whether this process is that user already or may switch to it (root)."""
    return os.geteuid() in (0, user.pw_uid)


def call_as(user: pwd.struct_passwd, function: Callable[[], Any]) -> Any:
    """``function()``'s result, computed as ``user`` (uid, gid, supplementary groups).

    The current process when it already is that user or cannot switch;
    else a forked child that drops to the user, so nothing the function
    does (opening files, reading the device) happens with root's rights.
    The result must be JSON-able; an exception in the child comes back as
    RuntimeError with its message.
    """
    if os.geteuid() == user.pw_uid or os.geteuid() != 0:
        return function()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            payload = {"result": function()}
        except BaseException as exc:  # everything must come back as an answer
            payload = {"error": str(exc) or type(exc).__name__}
        data = json.dumps(payload).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read(MAX_RESULT_BYTES + 1)
    os.waitpid(child, 0)
    payload: Optional[dict] = json.loads(data) if data else None
    if payload is None or "error" in payload:
        raise RuntimeError(payload["error"] if payload else "the child judging as that user died")
    return payload["result"]
