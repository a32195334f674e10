"""One-line, journald-native log events.

Every event is a single line: ``LEVEL event key=value ...`` on a
terminal, a pipe or a file.  When stdout is the journal (systemd sets
``JOURNAL_STREAM`` to the ``DEVICE:INODE`` of the stream it connected, and
that is what stdout is), each line starts with the sd-daemon priority
prefix instead of the level word (``<3>`` error, ``<4>`` warning, ``<6>``
info, ``<7>`` debug), so ``journalctl -p warning`` selects by it.  Errors
go to stderr, everything else to stdout.
Values that come from the network (user names, commands, key comments) are
quoted and escaped here, so a client can never split a log line or inject a
fake event.  Nothing in this module knows about secrets: callers never pass
them in.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional, TextIO, Tuple

LOGGER_NAME = "mitigator_agent"
MAX_VALUE_CHARS = 200

_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+\-\[\]]+")


def quote(value: object, limit: Optional[int] = MAX_VALUE_CHARS) -> str:
    """Render a value as a logfmt token: bare when safe, else a JSON string.

    JSON escaping (ASCII only) turns control characters, newlines and the
    lone surrogates of undecodable bytes into visible escapes.  Values
    longer than ``limit`` characters are cut (None: never).
    """
    text = str(value)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}...({len(text)} chars)"
    if _BARE_VALUE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def event(name: str, /, *, whole: bool = False, **fields: object) -> str:
    """Format one event line: the event name, then ``key=value`` pairs in order.

    Values are cut at MAX_VALUE_CHARS (a client's words must not flood the
    log) unless ``whole``: for the agent's own reasons and fixes, which
    must reach the admin entire.
    """
    limit = None if whole else MAX_VALUE_CHARS
    parts = [name]
    parts.extend(f"{key}={quote(value, limit)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def get_logger() -> logging.Logger:
    """The agent's logger; configured by :func:`setup`."""
    return logging.getLogger(LOGGER_NAME)


# syslog priorities, as sd-daemon(3) prefixes read by journald.
JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                      (logging.INFO, 6), (logging.DEBUG, 7))


def journal_priority(level: int) -> int:
    """The syslog priority of a logging level (the nearest one at or below it)."""
    for threshold, priority in JOURNAL_PRIORITIES:
        if level >= threshold:
            return priority
    return 7


def stream_is_journal(stream: TextIO, environ: Optional[Dict[str, str]] = None) -> bool:
    """Whether ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class EventFormatter(logging.Formatter):
    """``<N>event ...`` for the journal, ``LEVEL event ...`` elsewhere."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if self.journal:
            return f"<{journal_priority(record.levelno)}>{message}"
        return f"{record.levelname} {message}"


class _Below(logging.Filter):
    """Passes records below a level (stdout gets what stderr does not)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup(level: int = logging.INFO) -> None:
    """Send the agent's events to stdout (errors: stderr), one line each, flushed per event.

    No timestamps: journald (or whoever collects the output) adds them.
    asyncssh's own chatter is limited to warnings, asyncio's to errors.
    """
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(EventFormatter(stream_is_journal(sys.stdout)))
    out.addFilter(_Below(logging.ERROR))
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(EventFormatter(stream_is_journal(sys.stderr)))
    err.setLevel(logging.ERROR)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # asyncio warns when a client hangs up while an answer is still being
    # sent; that is the client's business, not an event worth a line.
    logging.getLogger("asyncio").setLevel(logging.ERROR)


AGGREGATE_WINDOW_SECONDS = 60.0
AGGREGATE_LINES_PER_WINDOW = 10
AGGREGATE_MAX_SOURCES = 4096  # sources tracked at once; beyond, refusals are only counted
OTHER_SOURCES = "other sources"


class RefusalAggregator:
    """Bounds refusal lines per source: a flood is summarised, not echoed.

    In each ``window`` seconds (starting at a source's first refusal) the
    first ``lines`` refusals of a source are logged in full; the rest are
    counted, and once the window has passed one summary per source that had
    more is returned (by ``note`` for that source's next refusal, or by
    ``flush``): ``... and N more from SRC in 60 s``.  So 3,000 refused
    connects from one address make 11 lines, not 3,000 (journald's default
    rate limit would otherwise drop real events).  At most ``max_sources``
    sources are tracked at once, so a flood from many addresses (an IPv6
    /48 holds 65,536 /64s) cannot grow the table or the log without bound:
    refusals from further sources get no line and are summarised together
    as ``... and N more from other sources in 60 s``.
    """

    def __init__(self, window: float = AGGREGATE_WINDOW_SECONDS, lines: int = AGGREGATE_LINES_PER_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 max_sources: int = AGGREGATE_MAX_SOURCES) -> None:
        self.window = window
        self.lines = lines
        self.max_sources = max_sources
        self._clock = clock
        self._windows: Dict[str, List[float]] = {}  # source -> [window start, logged, suppressed]
        self._overflow: Optional[List[float]] = None  # [window start, suppressed] of untracked sources

    def note(self, source: str) -> Tuple[bool, Optional[str]]:
        """Count one refusal of ``source``.

        Returns (whether it gets a line of its own, the summary of the
        source's previous window if that just ended with refusals unlogged).
        """
        now = self._clock()
        state = self._windows.get(source)
        summary = None
        if state is not None and now - state[0] >= self.window:
            summary = self._summary(source, state[2])
            del self._windows[source]
            state = None
        if state is None:
            if len(self._windows) >= self.max_sources:
                if self._overflow is None:
                    self._overflow = [now, 0]
                self._overflow[1] += 1
                return False, summary
            self._windows[source] = [now, 1, 0]
            return True, summary
        if state[1] < self.lines:
            state[1] += 1
            return True, None
        state[2] += 1
        return False, None

    def _summary(self, source: str, suppressed: float) -> Optional[str]:
        if not suppressed:
            return None
        return f"... and {int(suppressed)} more from {source} in {self.window:g} s"

    def flush(self, force: bool = False) -> List[str]:
        """Summaries of ended windows (all windows with ``force``); forgets those windows."""
        now = self._clock()
        summaries = []
        for source, state in list(self._windows.items()):
            if force or now - state[0] >= self.window:
                summary = self._summary(source, state[2])
                if summary:
                    summaries.append(summary)
                del self._windows[source]
        if self._overflow is not None and (force or now - self._overflow[0] >= self.window):
            summary = self._summary(OTHER_SOURCES, self._overflow[1])
            if summary:
                summaries.append(summary)
            self._overflow = None
        return summaries

    def __len__(self) -> int:
        return len(self._windows)
