"""The keys file: which MITIGATOR instances may poll this agent.

Format: OpenSSH ``authorized_keys``, one key per line, ``[options] type
base64 [comment]``; the comment names the polling instance in logs.

Behaviour:

- Only ``ssh-ed25519`` keys are admitted.  A line with any other key type
  (``ssh-rsa``, certificates, security keys, ...) admits nobody and a
  warning names file, line and type.
- A malformed line is skipped with a warning naming file and line; the
  other lines still count.
- Options: ``from="pattern-list"`` is honoured (checked against the
  connecting address with asyncssh's host-pattern matcher: wildcards,
  CIDR, ``!`` negation).  ``restrict``, ``no-pty``, ``no-port-forwarding``,
  ``no-agent-forwarding``, ``no-X11-forwarding`` and ``no-user-rc`` are
  accepted because this agent already applies them to every key.  Any other
  option (``command=``, ``environment=``, ``permitopen=``, ``pty``, ...)
  cannot be honoured here, so the line admits nobody and a warning says so:
  never silently ignored.
- StrictModes, checked on every authentication attempt: the file must be a
  regular file; it and its directory must be owned by root or by the
  agent's own user and not writable by group or others.  Otherwise, and when
  the file is missing or holds no usable key, nobody is admitted and the log
  says why.
- Edits apply to the next connection: the file is stat'ed on every attempt
  and re-parsed when its (device, inode, size, mtime) changed.
- ``add_key``/``remove_keys`` rewrite the file atomically, keeping its owner
  and mode.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Sequence, Tuple

import asyncssh

from . import logs
from .atomic import write_file_atomically

DEFAULT_KEYS_PATH = "/opt/mitigator_agent/keys"
ADMITTED_KEY_TYPE = "ssh-ed25519"
NEW_FILE_MODE = 0o644  # public keys only; readable by an unprivileged agent

# Options this agent honours; all compared case-insensitively, as sshd does.
FROM_OPTION = "from"
RESTRICTIONS_ALWAYS_APPLIED = frozenset(
    {"restrict", "no-pty", "no-port-forwarding", "no-agent-forwarding",
     "no-x11-forwarding", "no-user-rc"}
)

# Key type names OpenSSH writes in authorized_keys.  A first field that is
# one of them means the line has no options.
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-", "x509v3-", "rsa-sha2-")


MALFORMED = "malformed line (expected: [options] ssh-ed25519 BASE64 [comment])"


class KeysFileError(Exception):
    """A keys-file edit was refused; the message says why."""


@dataclass(frozen=True)
class KeyEntry:
    """One admitted ssh-ed25519 key."""

    line_number: int
    key: asyncssh.SSHKey = field(compare=False)
    instance: str
    options: Tuple[str, ...]
    # Built from the key and its from= patterns only; asyncssh evaluates
    # the patterns against the connecting address.
    from_matcher: asyncssh.SSHAuthorizedKeys = field(compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ssh-keygen prints it."""
        return self.key.get_fingerprint("sha256")

    def same_key(self, key: asyncssh.SSHKey) -> bool:
        """Whether ``key`` is this entry's key (options not considered)."""
        return self.key.public_data == key.public_data

    def admits(self, key: asyncssh.SSHKey, address: str) -> bool:
        """Whether this entry lets ``key`` in from ``address`` (an IP string)."""
        return self.from_matcher.validate(key, address, address) is not None


@dataclass(frozen=True)
class ParsedKeys:
    """Result of parsing keys-file text: admitted entries and warnings."""

    entries: Tuple[KeyEntry, ...]
    warnings: Tuple[str, ...]


@dataclass(frozen=True)
class KeysState:
    """What the keys file admits right now; ``refusal`` says why nobody is admitted."""

    entries: Tuple[KeyEntry, ...]
    refusal: Optional[str]
    warnings: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Match:
    """Outcome of checking one offered key."""

    entry: Optional[KeyEntry]
    reason: str  # why the key was refused; empty when admitted


class _LineError(Exception):
    """A keys-file line that admits nobody; the message says why."""


def _looks_like_key_type(token: str) -> bool:
    return token.startswith(_KEY_TYPE_PREFIXES) and "=" not in token and '"' not in token


def _split_options(line: str) -> Tuple[str, str]:
    """Split ``[options] rest`` at the first whitespace outside quotes."""
    first = line.split(None, 1)[0]
    if _looks_like_key_type(first):
        return "", line
    quoted = False
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char in " \t" and not quoted:
            return line[:index], line[index:].strip()
    if quoted:
        raise _LineError("unbalanced quote in options")
    raise _LineError(MALFORMED)


def parse_options(text: str) -> List[Tuple[str, Optional[str]]]:
    """Parse ``name,name="value",...`` into (lower-case name, value or None) pairs.

    Inside double quotes a backslash escapes the next character.
    """
    options: List[Tuple[str, Optional[str]]] = []
    if not text:
        return options
    current = ""
    value: Optional[str] = None
    quoted = False
    escaped = False
    for char in text + ",":
        if escaped:
            value = (value or "") + char
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                value = (value or "") + char
        elif char == '"':
            if value != "":
                raise _LineError(f"misplaced quote in option {current!r}")
            quoted = True
        elif char == ",":
            if not current:
                raise _LineError("empty option name")
            options.append((current.lower(), value))
            current, value = "", None
        elif char == "=" and value is None:
            value = ""
        elif value is None:
            current += char
        else:
            raise _LineError(f"option {current!r} value must be in double quotes")
    if quoted or escaped:
        raise _LineError("unbalanced quote in options")
    return options


def _check_options(options: Sequence[Tuple[str, Optional[str]]]) -> List[str]:
    """Validate option names and values; return the from= pattern lists."""
    from_patterns = []
    for name, value in options:
        if name == FROM_OPTION:
            if not value:
                raise _LineError('from= needs a quoted pattern list, e.g. from="192.0.2.1"')
            if '"' in value:
                raise _LineError("from= pattern list contains a quote")
            from_patterns.append(value)
        elif name in RESTRICTIONS_ALWAYS_APPLIED:
            if value is not None:
                raise _LineError(f"option {name!r} takes no value")
        else:
            raise _LineError(f"option {name!r} is not supported by this agent")
    return from_patterns


def parse_line(line: str, line_number: int) -> Optional[KeyEntry]:
    """Parse one line; None for blank lines and comments.

    Raises _LineError (message without file/line) when the line admits nobody.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    options_text, rest = _split_options(line)
    fields = rest.split(None, 2)
    key_type = fields[0]
    if not _looks_like_key_type(key_type):
        raise _LineError(MALFORMED)
    if key_type != ADMITTED_KEY_TYPE:
        raise _LineError(f"key type {key_type} refused: only {ADMITTED_KEY_TYPE} keys are admitted")
    if len(fields) < 2:
        raise _LineError("key data missing")
    try:
        key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise _LineError(f"not a valid {ADMITTED_KEY_TYPE} key ({exc})") from None
    if key.algorithm.decode("ascii") != ADMITTED_KEY_TYPE:
        raise _LineError(f"key data is {key.algorithm.decode('ascii')}, not {ADMITTED_KEY_TYPE}")
    options = parse_options(options_text)
    from_patterns = _check_options(options)
    matcher_options = ",".join(f'from="{pattern}"' for pattern in from_patterns)
    try:
        matcher = asyncssh.import_authorized_keys(f"{matcher_options} {fields[0]} {fields[1]}".strip())
    except ValueError as exc:
        raise _LineError(f"bad from= pattern ({exc})") from None
    return KeyEntry(
        line_number=line_number,
        key=key,
        instance=fields[2].strip() if len(fields) > 2 else "",
        options=tuple(name if value is None else f'{name}="{value}"' for name, value in options),
        from_matcher=matcher,
    )


def parse_keys(text: str, source: str) -> ParsedKeys:
    """Parse keys-file text; each warning reads ``SOURCE:LINE: reason``."""
    entries: List[KeyEntry] = []
    warnings: List[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = parse_line(line, number)
        except _LineError as exc:
            warnings.append(f"{source}:{number}: {exc}; line skipped")
            continue
        if entry is not None:
            entries.append(entry)
    return ParsedKeys(tuple(entries), tuple(warnings))


def default_allowed_owners() -> FrozenSet[int]:
    """root and the user this agent runs as."""
    return frozenset({0, os.geteuid()})


def strict_modes_problem(
    path: str, file_stat: os.stat_result, allowed_owners: FrozenSet[int], label: str = "keys"
) -> Optional[str]:
    """Why the file may not be trusted (sshd StrictModes), or None.

    ``file_stat`` is the fstat of the opened file, so the checked file is
    the one that is read; ``label`` names it in the reason ("keys file ...").
    """
    if not stat.S_ISREG(file_stat.st_mode):
        return f"{path} is not a regular file"
    directory = os.path.dirname(os.path.abspath(path))
    dir_stat = os.stat(directory)
    for what, name, st in (("file", path, file_stat), ("directory", directory, dir_stat)):
        if st.st_uid not in allowed_owners:
            owners = ", ".join(str(uid) for uid in sorted(allowed_owners))
            return f"{label} {what} {name} is owned by uid {st.st_uid}, not by uid {owners}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"{label} {what} {name} is writable by group or others"
                    f" (mode {stat.S_IMODE(st.st_mode):04o})")
    return None


class KeysFile:
    """The live keys file, re-checked on every authentication attempt."""

    def __init__(
        self,
        path: str,
        allowed_owners: Optional[FrozenSet[int]] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        self.path = path
        self._allowed_owners = allowed_owners if allowed_owners is not None else default_allowed_owners()
        self._log = logger or logs.get_logger()
        self._cache_id: Optional[Tuple[int, int, int, int]] = None
        self._parsed = ParsedKeys((), ())
        self._last_refusal: Optional[str] = None

    def _read(self) -> KeysState:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return KeysState((), f"keys file {self.path} does not exist")
        except OSError as exc:
            return KeysState((), f"keys file {self.path} cannot be opened: {exc.strerror}")
        try:
            st = os.fstat(fd)
            problem = strict_modes_problem(self.path, st, self._allowed_owners)
            if problem is not None:
                return KeysState((), problem)
            cache_id = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if cache_id != self._cache_id:
                with os.fdopen(os.dup(fd), "rb") as handle:
                    text = handle.read().decode("utf-8", errors="replace")
                self._parsed = parse_keys(text, self.path)
                self._cache_id = cache_id
                for warning in self._parsed.warnings:
                    self._log.warning(logs.event("keys-file-warning", problem=warning))
                self._log.info(logs.event("keys-file-loaded", path=self.path,
                                          keys=len(self._parsed.entries),
                                          skipped=len(self._parsed.warnings)))
        finally:
            os.close(fd)
        if not self._parsed.entries:
            return KeysState((), f"keys file {self.path} holds no usable key", self._parsed.warnings)
        return KeysState(self._parsed.entries, None, self._parsed.warnings)

    def state(self) -> KeysState:
        """Check and (if changed) re-parse the file; log a refusal reason when it changes."""
        state = self._read()
        if state.refusal != self._last_refusal and state.refusal is not None:
            self._log.warning(logs.event("keys-file-admits-nobody", reason=state.refusal))
        self._last_refusal = state.refusal
        return state

    def match(self, key: asyncssh.SSHKey, address: str) -> Match:
        """Find the entry admitting ``key`` from ``address``; else say why not."""
        state = self.state()
        if state.refusal is not None:
            return Match(None, state.refusal)
        algorithm = key.algorithm.decode("ascii", "replace")
        if algorithm != ADMITTED_KEY_TYPE:
            return Match(None, f"key type {algorithm} refused: only {ADMITTED_KEY_TYPE} keys are admitted")
        listed = [entry for entry in state.entries if entry.same_key(key)]
        for entry in listed:
            if entry.admits(key, address):
                return Match(entry, "")
        if listed:
            return Match(None, f"from= of line {listed[0].line_number} does not admit {address}")
        return Match(None, "key not in keys file")


def _read_text(path: str) -> Tuple[str, Optional[os.stat_result]]:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8"), os.fstat(handle.fileno())
    except FileNotFoundError:
        return "", None
    except UnicodeDecodeError:
        raise KeysFileError(f"{path} is not UTF-8 text; fix it by hand") from None


def _rewrite(path: str, text: str, old_stat: Optional[os.stat_result]) -> None:
    if old_stat is None:
        write_file_atomically(path, text.encode("utf-8"), NEW_FILE_MODE)
    else:
        write_file_atomically(path, text.encode("utf-8"), stat.S_IMODE(old_stat.st_mode),
                              owner=(old_stat.st_uid, old_stat.st_gid))


def add_key(path: str, line: str) -> Tuple[KeyEntry, bool]:
    """Append one key line; return (entry, whether the file changed).

    The line must parse as one admitted ssh-ed25519 key (options allowed as
    above).  A key already in the file is left alone (returned with False),
    so re-running an installer is harmless.
    """
    line = line.strip()
    if "\n" in line or "\r" in line:
        raise KeysFileError("one key per line")
    text, old_stat = _read_text(path)
    if text and not text.endswith("\n"):
        text += "\n"
    line_number = len(text.splitlines()) + 1
    try:
        entry = parse_line(line, line_number)
    except _LineError as exc:
        raise KeysFileError(str(exc)) from None
    if entry is None:
        raise KeysFileError("no key given")
    for existing in parse_keys(text, path).entries:
        if existing.same_key(entry.key):
            return existing, False
    _rewrite(path, text + line + "\n", old_stat)
    return entry, True


def _selects(entry: KeyEntry, selector: str) -> bool:
    if selector.startswith("SHA256:"):
        return entry.fingerprint == selector
    if selector.startswith(ADMITTED_KEY_TYPE + " "):
        try:
            return entry.same_key(asyncssh.import_public_key(" ".join(selector.split()[:2])))
        except (asyncssh.KeyImportError, ValueError):
            return False
    return entry.instance == selector


def remove_keys(path: str, selector: str) -> List[KeyEntry]:
    """Remove every line whose key matches ``selector``; return the removed entries.

    ``selector`` is a fingerprint (``SHA256:...``), a public key
    (``ssh-ed25519 BASE64 ...``) or an instance name (the comment).  Other
    lines (comments, skipped lines) are kept byte for byte.  Raises
    KeysFileError when nothing matches.
    """
    text, old_stat = _read_text(path)
    lines = text.splitlines(keepends=True)
    removed = [entry for entry in parse_keys(text, path).entries if _selects(entry, selector)]
    if not removed:
        raise KeysFileError(f"no key in {path} matches {selector!r}")
    drop = {entry.line_number for entry in removed}
    kept = "".join(line for number, line in enumerate(lines, start=1) if number not in drop)
    _rewrite(path, kept, old_stat)
    return removed
