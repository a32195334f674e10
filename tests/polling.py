"""MITIGATOR polling through a restart or an update: an OpenSSH `get` every 0.5 s, all recorded.

An update restarts the agent and swaps the module. With systemd holding the port
(mitigator-agent.socket) and the agent waiting for the device during the swap, no poll may be
refused or fail; `PollingThrough` counts them so the tests can say so and the README can quote it.
Used by the integration tests (an agent on this host) and the system tests (the booted image).
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import List, Optional, Sequence, Type

POLL_INTERVAL = 0.5  # seconds between the end of one poll and the start of the next
POLL_TIMEOUT = 300   # seconds, by default: a poll with no answer by then counts as failed


@dataclass(frozen=True)
class Poll:
    """One `get`: when it started (monotonic), how long it took, and how it ended."""

    started: float
    seconds: float
    answered: bool
    returncode: int
    error: str


class PollingThrough(threading.Thread):
    """Runs `command` (one OpenSSH `get`, host key pinned) every `interval` s until stopped (or the `with` block ends)."""

    def __init__(self, command: Sequence[str], interval: float = POLL_INTERVAL,
                 timeout: float = POLL_TIMEOUT) -> None:
        super().__init__(daemon=True)
        self.command = list(command)
        self.interval = interval
        self.timeout = timeout  # a poll with no answer by then counts as failed
        self.polls: List[Poll] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                done = subprocess.run(self.command, capture_output=True, text=True, timeout=self.timeout,
                                      stdin=subprocess.DEVNULL)
                answered = done.returncode == 0 and "\nnet_secret: " in "\n" + done.stdout
                poll = Poll(started, time.monotonic() - started, answered, done.returncode, done.stderr[-500:])
            except subprocess.TimeoutExpired:
                poll = Poll(started, time.monotonic() - started, False, -1, f"no answer in {self.timeout:g} s")
            self.polls.append(poll)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Let the poll under way end, start no other."""
        self._halt.set()
        self.join(self.timeout + 30)

    def wait_answered(self, count: int, since: float, timeout: float) -> None:
        """Block until `count` polls started at or after `since` (monotonic) were answered."""
        deadline = time.monotonic() + timeout
        while sum(poll.answered for poll in self.polls if poll.started >= since) < count:
            assert self.is_alive() and time.monotonic() < deadline, self.polls[-3:]
            time.sleep(0.05)

    def __enter__(self) -> "PollingThrough":
        self.start()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    @property
    def failed(self) -> List[Poll]:
        return [poll for poll in self.polls if not poll.answered]

    def summary(self) -> str:
        """One line: how many polls, how many failed, the longest."""
        longest = max((poll.seconds for poll in self.polls), default=0.0)
        return (f"{len(self.polls)} polls (one every {POLL_INTERVAL} s after the previous answer) through the"
                f" update: {len(self.failed)} refused or failed; the longest took {longest:.1f} s")
