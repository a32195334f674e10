"""The keys file: which MITIGATOR instances may poll this agent.

Format: OpenSSH ``authorized_keys``, one key per line, ``[options] type
base64 [comment]``; the comment names the polling instance in logs.

Behaviour:

- Only ``ssh-ed25519`` keys are admitted.  A line with any other key type
  (``ssh-rsa``, certificates, security keys, ...) admits nobody and a
  warning names file, line and type.
- A malformed line is skipped with a warning naming file and line; the
  other lines still count.  So is a line whose comment holds another key
  (``... m1ssh-ed25519 AAAA... m2``: a key appended to a file without a
  final newline): the warning says the two keys merged and how to split them.
- Options: ``from="pattern-list"`` is honoured: addresses, CIDRs and
  address wildcards, ``!`` negation, matched as sshd does (frompatterns.py);
  a list that does not parse strictly (a host name, white space, a CIDR
  with bits set beyond its prefix, a second ``from=``) makes the line admit
  nobody, with a warning naming the pattern: an exclusion is never dropped.
  ``restrict``, ``no-pty``, ``no-port-forwarding``,
  ``no-agent-forwarding``, ``no-X11-forwarding`` and ``no-user-rc`` are
  accepted because this agent already applies them to every key.  Any other
  option (``command=``, ``environment=``, ``permitopen=``, ``pty``, ...)
  cannot be honoured here, so the line admits nobody and a warning says so:
  never silently ignored.
- Lines end at ``\n`` only (a ``\r`` before it is tolerated), exactly as
  sshd reads the file.  A line holding any other control character
  (``\x0b``, ``\x1c``, a lone ``\r``, NUL, ...), non-ASCII white space
  (U+0085, U+00A0, U+2028, ...), an invisible format character or bytes
  that are not UTF-8 admits nobody and is reported with its line number:
  a line that some other reader would split differently never counts.
- StrictModes, checked on every authentication attempt: the final
  component is opened without following a symbolic link; the file must be
  a regular file owned by root or the agent's own user and not writable by
  group or others, and so must every directory of its resolved path up to
  ``/`` (sshd's ``safe_path``; unlike sshd we never stop early at a home
  directory).  Otherwise, and when the file is missing, larger than
  ``MAX_FILE_BYTES`` or holds no usable key, nobody is admitted and the
  log says why.
- Edits apply to the next connection: the file is read on every attempt
  and re-parsed whenever its content changed (SHA-256 of the bytes), so a
  same-size replacement with an unchanged mtime (``cp -p``) is seen too.
- ``add_key``/``remove_keys`` rewrite the file atomically, keeping its owner
  and mode, under an exclusive ``flock`` on ``PATH.lock`` (beside the file)
  so concurrent edits never lose one another.  ``add_key`` checks that the
  line it writes parses back to exactly one entry, and replaces the line of
  a key that is already present when its options or instance name differ.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import FrozenSet, Iterator, List, Optional, Sequence, Tuple

import asyncssh

from . import frompatterns, logs
from .atomic import write_file_atomically
from .frompatterns import Pattern, names_particular_sources  # noqa: F401  (names_particular_sources: re-exported)
from .runas import current_user_name, group_name

DEFAULT_KEYS_PATH = "/opt/mitigator_agent/keys"
ADMITTED_KEY_TYPE = "ssh-ed25519"
NEW_FILE_MODE = 0o644  # public keys only; readable by an unprivileged agent
LOCK_FILE_MODE = 0o600
MAX_FILE_BYTES = 1 << 20  # far beyond any real keys file; bigger admits nobody

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
    # The from="..." pattern list as written (admission uses it to tell
    # MITIGATOR's addresses from strangers), and as parsed.
    from_patterns: Tuple[str, ...] = ()
    from_parsed: Tuple[Pattern, ...] = field(default=(), compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ssh-keygen prints it."""
        return self.key.get_fingerprint("sha256")

    @property
    def names_sources(self) -> bool:
        """Whether this entry's from= names particular sources (see :func:`names_particular_sources`)."""
        return names_particular_sources(self.from_patterns)

    def same_key(self, key: asyncssh.SSHKey) -> bool:
        """Whether ``key`` is this entry's key (options not considered)."""
        return self.key.public_data == key.public_data

    def admits(self, key: asyncssh.SSHKey, address: str) -> bool:
        """Whether this entry lets ``key`` in from ``address`` (an IP string)."""
        if not self.same_key(key):
            return False
        return not self.from_patterns or frompatterns.admits(self.from_parsed, address)


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
    file_refused: bool = False  # refused because the keys file admits nobody, not because of the key


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
    """Validate option names and values; return the from= pattern list (one at most)."""
    from_patterns: List[str] = []
    for name, value in options:
        if name == FROM_OPTION:
            if from_patterns:
                raise _LineError("from= is given twice: write one from= with every pattern")
            if value and '"' in value:
                raise _LineError("from= pattern list contains a quote")
            try:
                frompatterns.parse_pattern_list(value or "")
            except frompatterns.PatternError as exc:
                raise _LineError(f"from= refused: {exc}; the line admits nobody until it is fixed") from None
            from_patterns.append(value or "")
        elif name in RESTRICTIONS_ALWAYS_APPLIED:
            if value is not None:
                raise _LineError(f"option {name!r} takes no value")
        else:
            raise _LineError(f"option {name!r} is not supported by this agent")
    return from_patterns


def line_problem(line: str) -> Optional[str]:
    """Why ``line`` (without its ``\n``) may not be trusted as one line, or None.

    Refused: control characters other than TAB (C0, DEL, C1; a ``\r`` is
    only tolerated right before the ``\n`` and removed by split_lines),
    non-ASCII white space and line/paragraph separators (Python, and so
    some other reader, would split or trim there; sshd would not), Unicode
    format characters (invisible text such as U+202E) and undecodable bytes
    (surrogate escapes).  Columns count from 1.
    """
    for column, char in enumerate(line, start=1):
        code = ord(char)
        if char == "\t":
            continue
        if code < 0x20 or code == 0x7F or 0x80 <= code <= 0x9F:
            return f"control character U+{code:04X} at column {column}"
        if code < 0x80:
            continue
        category = unicodedata.category(char)
        if char.isspace() or category in ("Zs", "Zl", "Zp"):
            return f"non-ASCII white space U+{code:04X} at column {column}"
        if category == "Cs":
            return f"bytes that are not UTF-8 at column {column}"
        if category == "Cf":
            return f"invisible format character U+{code:04X} at column {column}"
    return None


def split_lines(text: str) -> List[str]:
    """Split keys-file text into lines as sshd does: at ``\n`` only.

    One ``\r`` right before a ``\n`` (or at the very end) is dropped, so
    files edited on Windows still work; every other character, including
    the ones ``str.splitlines`` would split at, stays in its line.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_line(line: str, line_number: int) -> Optional[KeyEntry]:
    """Parse one line (without its line end); None for blank lines and comments.

    Raises _LineError (message without file/line) when the line admits nobody.
    """
    problem = line_problem(line)
    if problem is not None:
        raise _LineError(problem)
    line = line.strip(" \t")
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
    comment = fields[2].strip() if len(fields) > 2 else ""
    merged = _MERGED_KEY.search(comment)
    if merged:
        raise _LineError(f"two keys merged on one line: its comment holds another key at"
                         f" '{merged.group(1)} {merged.group(2)[:8]}...' (a key appended to a file without"
                         " a final newline?): put that key on a line of its own")
    return KeyEntry(
        line_number=line_number,
        key=key,
        instance=comment,
        options=tuple(name if value is None else f'{name}="{value}"' for name, value in options),
        from_patterns=tuple(from_patterns),
        from_parsed=frompatterns.parse_pattern_list(from_patterns[0]) if from_patterns else (),
    )


# Another key in a line's comment: a key type OpenSSH writes, then what its base64 starts with
# ("AAAA": a 4-byte length of a key type name), anywhere (also glued to the comment before it).
_MERGED_KEY = re.compile(r"((?:ssh-|ecdsa-|sk-)[a-z0-9@.-]+)\s+(AAAA[A-Za-z0-9+/=]*)")


def parse_keys(text: str, source: str) -> ParsedKeys:
    """Parse keys-file text; each warning reads ``SOURCE:LINE: reason``.

    Undecodable bytes should arrive as surrogate escapes
    (``bytes.decode("utf-8", "surrogateescape")``): their line is refused.
    """
    entries: List[KeyEntry] = []
    warnings: List[str] = []
    for number, line in enumerate(split_lines(text), start=1):
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


class PathProblem(str):
    """Why a file (or a directory above it) may not be trusted: the sentence, and the facts behind it.

    It is the sentence (a str, so it reads and logs as before) and also carries what it is about,
    so the fix is chosen from the facts, never parsed back out of the words: ``kind`` is
    ``owner`` (owned by someone else), ``writable`` (group/others may write) or ``not-regular``;
    ``what`` is ``file`` or ``directory``; ``path`` the one at fault.
    """

    kind: str
    what: str
    path: str

    def __new__(cls, sentence: str, kind: str, what: str, path: str) -> "PathProblem":
        problem = super().__new__(cls, sentence)
        problem.kind, problem.what, problem.path = kind, what, path
        return problem

    def remedy(self) -> str:
        """The command that makes this path acceptable (a directory keeps its search bit)."""
        if self.kind == "owner":
            return f"run chown root {self.path}"
        if self.kind == "writable":
            return f"run chmod go-w {self.path}"
        return f"make {self.path} a regular file"


def _owner_or_mode_problem(label: str, what: str, name: str, st: os.stat_result,
                           allowed_owners: FrozenSet[int]) -> Optional[PathProblem]:
    if st.st_uid not in allowed_owners:
        owners = ", ".join(str(uid) for uid in sorted(allowed_owners))
        return PathProblem(f"{label} {what} {name} is owned by uid {st.st_uid}, not by uid {owners}",
                           "owner", what, name)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return PathProblem(f"{label} {what} {name} is writable by group or others"
                           f" (mode {stat.S_IMODE(st.st_mode):04o})", "writable", what, name)
    return None


def strict_modes_problem(
    path: str, file_stat: os.stat_result, allowed_owners: FrozenSet[int], label: str = "keys"
) -> Optional[PathProblem]:
    """Why the file may not be trusted (file and its own directory only), or None.

    ``file_stat`` is the fstat of the opened file, so the checked file is
    the one that is read; ``label`` names it in the reason ("keys file ...").
    The keys file and the config use :func:`secure_path_problem`, which also
    checks every directory up to ``/``.
    """
    if not stat.S_ISREG(file_stat.st_mode):
        return PathProblem(f"{path} is not a regular file", "not-regular", "file", path)
    directory = os.path.dirname(os.path.abspath(path))
    for what, name, st in (("file", path, file_stat), ("directory", directory, os.stat(directory))):
        problem = _owner_or_mode_problem(label, what, name, st, allowed_owners)
        if problem is not None:
            return problem
    return None


def secure_path_problem(
    path: str, file_stat: os.stat_result, allowed_owners: FrozenSet[int], label: str = "keys"
) -> Optional[PathProblem]:
    """sshd's StrictModes (``safe_path``) for an opened file, or None when it is safe.

    ``file_stat`` is the fstat of the descriptor that is read (opened with
    O_NOFOLLOW).  The file must be regular, owned by an allowed owner and
    not group/other-writable; the directory holding it is resolved
    (``realpath``: symbolic links in directory components are followed, as
    sshd does) and it and every parent up to ``/`` must pass the same
    owner and mode test, otherwise whoever may write there could swap the
    file.  The resolved directory must still hold the opened file (same
    device and inode), so a rename between open and check is noticed.
    """
    if not stat.S_ISREG(file_stat.st_mode):
        return PathProblem(f"{path} is not a regular file", "not-regular", "file", path)
    problem = _owner_or_mode_problem(label, "file", path, file_stat, allowed_owners)
    if problem is not None:
        return problem
    try:
        directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        resolved = os.path.join(directory, os.path.basename(path))
        seen = os.lstat(resolved)
        if (seen.st_dev, seen.st_ino) != (file_stat.st_dev, file_stat.st_ino):
            return f"{label} file {path} changed while it was being checked"
        while True:
            problem = _owner_or_mode_problem(label, "directory", directory, os.stat(directory),
                                             allowed_owners)
            if problem is not None:
                return problem
            parent = os.path.dirname(directory)
            if parent == directory:
                return None
            directory = parent
    except OSError as exc:
        return f"{label} file {path}: cannot check its directories ({exc.strerror or exc})"


def open_no_follow(path: str) -> int:
    """Open ``path`` read-only without following a symbolic link at its last component.

    O_NONBLOCK so a FIFO planted there cannot hang the caller (StrictModes
    then refuses it as not a regular file).  Raises OSError; ELOOP means the
    last component is a symbolic link.
    """
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)


def _read_fd(fd: int, limit: int) -> bytes:
    """Read at most ``limit + 1`` bytes (so a caller can tell ``too large``)."""
    chunks: List[bytes] = []
    remaining = limit + 1
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class KeysFile:
    """The live keys file, re-checked and re-read on every authentication attempt."""

    def __init__(
        self,
        path: str,
        allowed_owners: Optional[FrozenSet[int]] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        self.path = path
        self._allowed_owners = allowed_owners if allowed_owners is not None else default_allowed_owners()
        self._log = logger or logs.get_logger()
        self._digest: Optional[bytes] = None
        self._parsed = ParsedKeys((), ())
        self._last_refusal: Optional[str] = None

    def _read(self) -> KeysState:
        try:
            fd = open_no_follow(self.path)
        except FileNotFoundError:
            return KeysState((), f"keys file {self.path} does not exist")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return KeysState((), f"keys file {self.path} is a symbolic link (never followed)")
            return KeysState((), f"keys file {self.path} cannot be opened: {exc.strerror}")
        try:
            st = os.fstat(fd)
            problem = secure_path_problem(self.path, st, self._allowed_owners)
            if problem is not None:
                return KeysState((), problem)
            data = _read_fd(fd, MAX_FILE_BYTES)
        except OSError as exc:
            return KeysState((), f"keys file {self.path} cannot be read: {exc.strerror}")
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            return KeysState((), f"keys file {self.path} is larger than {MAX_FILE_BYTES} bytes")
        digest = hashlib.sha256(data).digest()
        if digest != self._digest:
            self._parsed = parse_keys(data.decode("utf-8", "surrogateescape"), self.path)
            self._digest = digest
            for warning in self._parsed.warnings:
                self._log.warning(logs.event("keys-file-warning", problem=warning))
            self._log.info(logs.event("keys-file-loaded", path=self.path,
                                      keys=len(self._parsed.entries),
                                      skipped=len(self._parsed.warnings)))
        if not self._parsed.entries:
            return KeysState((), f"keys file {self.path} holds no usable key", self._parsed.warnings)
        return KeysState(self._parsed.entries, None, self._parsed.warnings)

    def state(self) -> KeysState:
        """Check and (if changed) re-parse the file; log a refusal reason when it changes."""
        state = self._read()
        if state.refusal != self._last_refusal and state.refusal is not None:
            # the agent runs as the service's account: the fix names this process's user and group
            self._log.warning(logs.event("keys-file-admits-nobody", whole=True, reason=state.refusal,
                                         fix=refusal_remedy(state.refusal, self.path, current_user_name(),
                                                            group_name(os.getegid()))))
        self._last_refusal = state.refusal
        return state

    def forget(self) -> None:
        """Drop the cache: the next check re-parses and logs ``keys-file-loaded`` (SIGHUP)."""
        self._digest = None
        self._last_refusal = None

    def match(self, key: asyncssh.SSHKey, address: str) -> Match:
        """Find the entry admitting ``key`` from ``address``; else say why not."""
        state = self.state()
        if state.refusal is not None:
            return Match(None, state.refusal, file_refused=True)
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


def refusal_remedy(refusal: str, path: str, user: str, group: str) -> str:
    """The command that fixes a KeysState refusal for the agent running as ``user`` (primary ``group``).

    A StrictModes refusal is a PathProblem and carries its own fix; ``keys add`` names the file
    it would edit unless that is the default one.
    """
    if isinstance(refusal, PathProblem):
        return refusal.remedy()
    if "does not exist" in refusal or "holds no usable key" in refusal:
        where = "" if path == DEFAULT_KEYS_PATH else f" --keys {path}"
        return (f"run mitigator-agent keys add{where} 'ssh-ed25519 AAAA... mitigator1' with the key from"
                " MITIGATOR's admin")
    if "cannot be opened" in refusal or "cannot be read" in refusal:
        return f"run chgrp {group} {path} && chmod 640 {path} (and let {user} into its directories)"
    if "symbolic link" in refusal:
        return f"replace the link {path} by the file itself"
    if "is not a regular file" in refusal:
        return f"make {path} a regular file"
    return f"fix {path}"


@contextmanager
def edit_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on ``PATH.lock`` (created 0600 if missing).

    Every ``keys add``/``keys remove`` takes it around its read-modify-
    rename, so concurrent edits apply one after the other.  The lock file
    stays (removing it would race with a waiting editor); the agent never
    reads it.
    """
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, LOCK_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_text(path: str) -> Tuple[str, Optional[os.stat_result]]:
    try:
        fd = open_no_follow(path)
    except FileNotFoundError:
        return "", None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeysFileError(f"{path} is a symbolic link; edit its target instead") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeysFileError(f"{path} is not a regular file")
        data = _read_fd(fd, MAX_FILE_BYTES)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise KeysFileError(f"{path} is larger than {MAX_FILE_BYTES} bytes; fix it by hand")
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError:
        raise KeysFileError(f"{path} is not UTF-8 text; fix it by hand") from None


def _rewrite(path: str, text: str, old_stat: Optional[os.stat_result]) -> None:
    if old_stat is None:
        write_file_atomically(path, text.encode("utf-8"), NEW_FILE_MODE)
    else:
        write_file_atomically(path, text.encode("utf-8"), stat.S_IMODE(old_stat.st_mode),
                              owner=(old_stat.st_uid, old_stat.st_gid))


ADDED = "added"
UNCHANGED = "already present"
REPLACED = "replaced"


def _join_lines(lines: Sequence[str]) -> str:
    return "".join(line + "\n" for line in lines)


def add_key(path: str, line: str) -> Tuple[KeyEntry, str]:
    """Add one key line; return (its entry in the new file, ADDED, REPLACED or UNCHANGED).

    The line must parse as exactly one admitted ssh-ed25519 key (options
    allowed as above) with no refused character anywhere.  A key that is
    already in the file with the same options and instance name is left
    alone (UNCHANGED, so re-running an installer is harmless); with other
    options or another name its line is replaced in place and any further
    line holding the same key is dropped (REPLACED: the file then says what
    was asked last, never the old, possibly wider, options).  The new text
    is parsed again before it is written: it must hold the key exactly
    once, as given, and lose no other entry.  A key given without an
    instance name keeps the name its line has: dropping it would drop the
    key's anycast permission without a word.  Runs under :func:`edit_lock`.
    """
    line = line[:-1] if line.endswith("\n") else line
    line = line[:-1] if line.endswith("\r") else line
    if "\n" in line:
        raise KeysFileError("one key per line")
    try:
        entry = parse_line(line, 1)
    except _LineError as exc:
        raise KeysFileError(str(exc)) from None
    if entry is None:
        raise KeysFileError("no key given")
    line = line.strip(" \t")
    with edit_lock(path):
        text, old_stat = _read_text(path)
        lines = split_lines(text)
        before = parse_keys(text, path)
        present = [e for e in before.entries if e.same_key(entry.key)]
        if present and not entry.instance and present[0].instance:
            # Re-added without a name: it keeps the one it has (its anycast permission hangs on it).
            line = f"{line} {present[0].instance}"
            entry = parse_line(line, 1) or entry
        if (len(present) == 1 and present[0].options == entry.options
                and present[0].instance == entry.instance):
            return present[0], UNCHANGED
        if present:
            first = present[0].line_number
            drop = {e.line_number for e in present[1:]}
            lines = [line if number == first else old
                     for number, old in enumerate(lines, start=1) if number not in drop]
            outcome = REPLACED
        else:
            lines.append(line)
            outcome = ADDED
        new_text = _join_lines(lines)
        after = parse_keys(new_text, path)
        written = [e for e in after.entries if e.same_key(entry.key)]
        if (len(written) != 1 or written[0].options != entry.options
                or written[0].instance != entry.instance
                or len(after.entries) != len(before.entries) - len(present) + 1
                or len(after.warnings) != len(before.warnings)):
            raise KeysFileError("the line would not read back as exactly this one key; nothing written")
        _rewrite(path, new_text, old_stat)
        return written[0], outcome


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
    KeysFileError when nothing matches, or when an instance name is on
    several lines (which one was meant is not known: nothing is removed).  Runs under :func:`edit_lock`.
    """
    with edit_lock(path):
        text, old_stat = _read_text(path)
        lines = text.split("\n")  # keeps every byte, CRs included
        removed = [entry for entry in parse_keys(text, path).entries if _selects(entry, selector)]
        if not removed:
            raise KeysFileError(f"no key in {path} matches {selector!r}"
                                " (give a fingerprint, a public key or an instance name: keys list shows them)")
        if len(removed) > 1 and not selector.startswith(("SHA256:", ADMITTED_KEY_TYPE + " ")):
            where = ", ".join(str(entry.line_number) for entry in removed)
            raise KeysFileError(f"instance name {selector!r} is on lines {where}; nothing removed:"
                                f" name one key by its fingerprint (mitigator-agent keys remove"
                                f" {removed[0].fingerprint})")
        drop = {entry.line_number for entry in removed}
        kept = "\n".join(line for number, line in enumerate(lines, start=1) if number not in drop)
        _rewrite(path, kept, old_stat)
        return removed
