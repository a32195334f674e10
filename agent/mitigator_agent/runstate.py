"""The agent's runtime state: who polled last, per instance (the ``wg show`` of this tool).

After every answered command the agent records, per key instance (the keys
file line's comment; ``-`` for a key without one): the source address,
the key's fingerprint, the time, the command's verb, the exit status and
the result word.  ``status`` and ``check`` read it back.

The file is ``RUNTIME_DIR/last-polls.json`` (default
``/run/mitigator-agent``, systemd's ``RuntimeDirectory=mitigator-agent``),
mode 0644, replaced atomically (a reader sees the old or the new file,
never half of one).  It holds no secrets: no answers, no command
arguments.  It lives in /run because it is only worth something while the
agent runs; a reboot empties it.  When the directory cannot be created or
written the agent logs that once and keeps serving.

Schema (``version`` 1)::

    {"version": 1,
     "instances": {"mitigator1": {"source": "192.0.2.1", "key": "SHA256:...",
                                  "time": 1795472673.5, "command": "get",
                                  "status": 0, "result": "ok"}}}
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

from . import logs
from .atomic import write_file_atomically, write_soon

DEFAULT_RUNTIME_DIR = "/run/mitigator-agent"
POLLS_FILE = "last-polls.json"
POLLS_MODE = 0o644   # nothing secret: status may run as any admin
RUNTIME_DIR_MODE = 0o755
SCHEMA_VERSION = 1
MAX_INSTANCES = 256  # the keys file names a handful; a bound keeps the file small whatever happens
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class PollRecord:
    """The last answered command of one instance."""

    source: str
    key: str
    time: float
    command: str
    status: int
    result: str


class RuntimeStateError(Exception):
    """The runtime state cannot be read; the message says why."""


def polls_path(runtime_dir: str) -> str:
    """Where the last polls are kept in ``runtime_dir``."""
    return os.path.join(runtime_dir, POLLS_FILE)


WRITE_DELAY = 1.0  # seconds: within a running event loop, polls in this window share one write


class PollRecorder:
    """Keeps the last poll per instance in memory and in the runtime file.

    Outside an event loop every record is written at once. Inside one (the
    server) the file is written WRITE_DELAY seconds after the first record
    not yet on disk, so a burst of polls costs one write, not one per poll.
    """

    def __init__(self, runtime_dir: str, logger: Optional[logging.Logger] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.runtime_dir = runtime_dir
        self._log = logger or logs.get_logger()
        self._clock = clock
        self._records: Dict[str, PollRecord] = {}
        self._broken = False  # logged once; later failures stay quiet until a write works again
        self._write_pending = False

    def record(self, instance: str, source: str, key: str, command: str, status: int, result: str) -> None:
        """Note one answered command and write the file (never raises)."""
        if instance not in self._records and len(self._records) >= MAX_INSTANCES:
            oldest = min(self._records, key=lambda name: self._records[name].time)
            del self._records[oldest]
        self._records[instance] = PollRecord(source, key, self._clock(), command, status, result)
        if self._write_pending:
            return
        self._write_pending = write_soon(WRITE_DELAY, self._write) is not None

    def _write(self) -> None:
        self._write_pending = False
        data = {"version": SCHEMA_VERSION,
                "instances": {name: asdict(record) for name, record in sorted(self._records.items())}}
        try:
            try:
                os.mkdir(self.runtime_dir, RUNTIME_DIR_MODE)
            except FileExistsError:
                pass
            write_file_atomically(polls_path(self.runtime_dir), (json.dumps(data) + "\n").encode(),
                                  POLLS_MODE, durable=False)
        except OSError as exc:
            if not self._broken:
                self._log.warning(logs.event(
                    "last-poll-not-recorded", whole=True, path=polls_path(self.runtime_dir), reason=exc.strerror or str(exc),
                    fix="give the agent a writable runtime directory (systemd: RuntimeDirectory=mitigator-agent)"
                        " or set runtime-dir"))
            self._broken = True
        else:
            self._broken = False


def read_polls(runtime_dir: str) -> Dict[str, PollRecord]:
    """The last poll per instance; {} when the agent has recorded none (no file)."""
    path = polls_path(runtime_dir)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RuntimeStateError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
        if data.get("version") != SCHEMA_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {SCHEMA_VERSION}")
        return {str(name): PollRecord(source=str(item["source"]), key=str(item["key"]), time=float(item["time"]),
                                      command=str(item["command"]), status=int(item["status"]),
                                      result=str(item["result"]))
                for name, item in data["instances"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RuntimeStateError(f"{path} is not the agent's poll record ({exc})") from None
