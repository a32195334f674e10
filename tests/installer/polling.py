"""MITIGATOR polling through an update: an OpenSSH `get` from the host every 0.5 s, all recorded.

An update restarts the agent and swaps the module. With systemd holding the port
(mitigator-agent.socket) and the agent waiting for the device during the swap, no poll may be
refused or fail; `PollingThrough` counts them so the tests can say so and the README can quote it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import List, Optional, Sequence, Type

POLL_INTERVAL = 0.5  # seconds between the end of one poll and the start of the next


@dataclass(frozen=True)
class Poll:
    """One `get`: when it started (monotonic), how long it took, and how it ended."""

    started: float
    seconds: float
    answered: bool
    returncode: int
    error: str


class PollingThrough(threading.Thread):
    """Runs `command` (one OpenSSH `get`, host key pinned) until the `with` block ends."""

    def __init__(self, command: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.command = list(command)
        self.polls: List[Poll] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                done = subprocess.run(self.command, capture_output=True, text=True, timeout=300,
                                      stdin=subprocess.DEVNULL)
                answered = done.returncode == 0 and "\nnet_secret: " in "\n" + done.stdout
                poll = Poll(started, time.monotonic() - started, answered, done.returncode, done.stderr[-500:])
            except subprocess.TimeoutExpired:
                poll = Poll(started, time.monotonic() - started, False, -1, "no answer in 300 s")
            self.polls.append(poll)
            self._halt.wait(POLL_INTERVAL)

    def __enter__(self) -> "PollingThrough":
        self.start()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._halt.set()
        self.join(330)

    @property
    def failed(self) -> List[Poll]:
        return [poll for poll in self.polls if not poll.answered]

    def summary(self) -> str:
        """One line: how many polls, how many failed, the longest."""
        longest = max((poll.seconds for poll in self.polls), default=0.0)
        return (f"{len(self.polls)} polls (one every {POLL_INTERVAL} s after the previous answer) through the"
                f" update: {len(self.failed)} refused or failed; the longest took {longest:.1f} s")
