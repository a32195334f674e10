"""Crash-safe file writes: a temporary file in the same directory, fsync, rename.

A reader (the running agent, or sshd-style tools) sees either the old file or
the new one, never a half-written one; after a crash the directory holds
one of the two, plus at most a stray temporary file.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Callable, Optional, Tuple


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(
    path: str,
    data: bytes,
    mode: int,
    owner: Optional[Tuple[int, int]] = None,
    replace: bool = True,
    durable: bool = True,
) -> None:
    """Write ``data`` to ``path`` with permission bits ``mode``.

    ``owner`` is a ``(uid, gid)`` pair given to the new file (changing it
    needs the privilege to do so; it is skipped when it already matches).
    With ``replace=False`` an existing ``path`` is never overwritten, even
    if another process creates it meanwhile: FileExistsError is raised.
    ``durable=False`` skips the fsyncs (still atomic for readers; for files
    that need not survive a crash, such as runtime state in /run).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != owner:
                    os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temp_path, path)
        else:
            # link() fails when the name exists: no window in which a
            # concurrently created file could be clobbered.
            os.link(temp_path, path)
            os.unlink(temp_path)
        if durable:
            _fsync_directory(directory)
    except BaseException:
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
        raise


def write_soon(delay: float, write: Callable[[], None]) -> Optional[asyncio.TimerHandle]:
    """Call ``write`` ``delay`` seconds from now inside a running event loop (a burst of changes
    then costs one write), or at once outside one; the timer handle, or None when it ran already."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        write()
        return None
    return loop.call_later(delay, write)
