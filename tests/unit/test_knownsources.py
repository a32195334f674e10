"""The sources MITIGATOR polled from (knownsources.py): remembered, bounded, persisted, read back safely."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List

import pytest

from mitigator_agent import knownsources
from mitigator_agent.knownsources import KnownSources, KnownSourcesError, read_known_sources

FP1, FP2 = "SHA256:" + "A" * 43, "SHA256:" + "B" * 43


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def log() -> Records:
    return Records()


def known(state: Path, log: Records, clock: Clock) -> KnownSources:
    logger = logging.getLogger(f"test-known-{id(log)}")
    logger.propagate = False
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    return KnownSources(str(state), logger, clock)


def test_a_remembered_source_is_known_for_its_key_written_0600_and_read_back(tmp_path, log):
    clock = Clock()
    sources = known(tmp_path / "state", log, clock)
    sources.remember("::ffff:192.0.2.1", FP1, "mitigator1")  # outside an event loop: written at once
    assert sources.keys_of("192.0.2.1") == {FP1} and sources.keys_of("::ffff:192.0.2.1") == {FP1}
    assert sources.keys_of("192.0.2.2") == frozenset()
    assert log.lines == [f"INFO source-remembered src=192.0.2.1 key={FP1} instance=mitigator1"
                         ' effect="admitted ahead of strangers from now on"']
    path = tmp_path / "state" / "known-sources.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
    assert read_known_sources(str(tmp_path / "state")) == [
        knownsources.KnownSource("192.0.2.1", FP1, "mitigator1", clock.now)]
    again = known(tmp_path / "state", log, clock)
    again.load()
    assert again.keys_of("192.0.2.1") == {FP1}


def test_a_known_source_is_written_again_only_when_its_time_is_old_or_its_name_changed(tmp_path, log):
    clock = Clock()
    sources = known(tmp_path, log, clock)
    sources.remember("2001:db8::1", FP1, "m1")
    path = tmp_path / "known-sources.json"
    first = path.stat().st_mtime_ns
    clock.now += 60
    sources.remember("2001:db8::1", FP1, "m1")
    assert path.stat().st_mtime_ns == first and json.loads(path.read_text())["sources"][0]["last"] == clock.now - 60
    clock.now += knownsources.REFRESH_SECONDS
    sources.remember("2001:db8::1", FP1, "m1")
    assert json.loads(path.read_text())["sources"][0]["last"] == clock.now
    sources.remember("2001:db8::1", FP1, "renamed")
    assert json.loads(path.read_text())["sources"][0]["instance"] == "renamed"
    assert sum("source-remembered" in line for line in log.lines) == 1


def test_old_sources_are_forgotten_and_the_table_is_bounded(tmp_path, log, monkeypatch):
    monkeypatch.setattr(knownsources, "MAX_SOURCES", 3)
    clock = Clock()
    sources = known(tmp_path, log, clock)
    for n in range(5):
        clock.now += 1
        sources.remember(f"198.51.100.{n}", FP1, "m1")
    assert [s.address for s in sources.sources()] == ["198.51.100.4", "198.51.100.3", "198.51.100.2"]
    clock.now += knownsources.MAX_AGE_SECONDS
    assert sources.keys_of("198.51.100.4") == frozenset()
    reloaded = known(tmp_path, log, clock)
    reloaded.load()
    assert reloaded.sources() == []


def test_one_address_with_two_keys_keeps_both(tmp_path, log):
    sources = known(tmp_path, log, Clock())
    sources.remember("192.0.2.1", FP1, "m1")
    sources.remember("192.0.2.1", FP2, "m2")
    assert sources.keys_of("192.0.2.1") == {FP1, FP2}


def test_not_an_address_is_never_remembered(tmp_path, log):
    sources = known(tmp_path, log, Clock())
    sources.remember("/run/some.sock", FP1, "m1")
    assert sources.sources() == [] and not (tmp_path / "known-sources.json").exists()


@pytest.mark.parametrize("content, reason", [
    ("not json", "is not the agent's list of known sources"),
    ('{"version": 2, "sources": []}', "version 2, expected 1"),
    ('{"version": 1, "sources": [{"address": "mitigator", "key": "k", "instance": "", "last": 1}]}',
     "'mitigator' is not an IP address"),
])
def test_a_file_that_is_not_ours_is_ignored_with_one_line(tmp_path, log, content, reason):
    (tmp_path / "known-sources.json").write_text(content)
    (tmp_path / "known-sources.json").chmod(0o600)
    sources = known(tmp_path, log, Clock())
    sources.load()
    assert sources.sources() == []
    [line] = log.lines
    assert line.startswith("WARNING known-sources-ignored reason=") and reason in line
    assert 'effect="no source is known until MITIGATOR polls again"' in line


def test_a_file_others_may_write_or_a_link_is_not_trusted(tmp_path, log):
    path = tmp_path / "known-sources.json"
    path.write_text('{"version": 1, "sources": []}')
    path.chmod(0o666)
    with pytest.raises(KnownSourcesError, match="writable by group or others"):
        read_known_sources(str(tmp_path))
    path.chmod(0o600)
    os.rename(path, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(KnownSourcesError, match="symbolic link"):
        read_known_sources(str(tmp_path))


def test_an_unwritable_state_directory_is_said_once(tmp_path, log):
    blocker = tmp_path / "file"
    blocker.write_text("")
    sources = known(blocker / "state", log, Clock())  # below a regular file: never creatable
    sources.remember("192.0.2.1", FP1, "m1")
    sources.remember("192.0.2.2", FP1, "m1")
    assert sources.keys_of("192.0.2.2") == {FP1}  # still known while the agent runs
    assert sum("known-sources-not-saved" in line for line in log.lines) == 1
