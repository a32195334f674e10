"""One-line, journald-friendly log events.

Every event is a single line on stdout: ``LEVEL event key=value ...``.
Values that come from the network (user names, commands, key comments) are
quoted and escaped here, so a client can never split a log line or inject a
fake event.  Nothing in this module knows about secrets: callers never pass
them in.
"""

from __future__ import annotations

import json
import logging
import re
import sys

LOGGER_NAME = "mitigator_agent"
MAX_VALUE_CHARS = 200

_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+\-\[\]]+")


def quote(value: object) -> str:
    """Render a value as a logfmt token: bare when safe, else a JSON string.

    JSON escaping (ASCII only) turns control characters, newlines and the
    lone surrogates of undecodable bytes into visible escapes.
    """
    text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = f"{text[:MAX_VALUE_CHARS]}...({len(text)} chars)"
    if _BARE_VALUE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def event(name: str, /, **fields: object) -> str:
    """Format one event line: the event name, then ``key=value`` pairs in order."""
    parts = [name]
    parts.extend(f"{key}={quote(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def get_logger() -> logging.Logger:
    """The agent's logger; configured by :func:`setup`."""
    return logging.getLogger(LOGGER_NAME)


def setup(level: int = logging.INFO) -> None:
    """Send the agent's events to stdout, one line each, flushed per event.

    No timestamps: journald (or whoever collects stdout) adds them.
    asyncssh's own chatter is limited to warnings, asyncio's to errors.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # asyncio warns when a client hangs up while an answer is still being
    # sent; that is the client's business, not an event worth a line.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
