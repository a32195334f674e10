"""read_snapshot_across_swap: a poll during a module swap waits for the device; otherwise it does not."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mitigator_agent.snapshot import DeviceMissing, SWAP_MARKER_MAX_AGE, encode, read_snapshot_across_swap
from tests.unit.test_answers import SNAP


def appear_later(path: Path, data: bytes, after: float) -> threading.Thread:
    def write() -> None:
        time.sleep(after)
        staged = path.with_name(path.name + ".new")  # appears whole, as a device node does
        staged.write_bytes(data)
        staged.rename(path)
    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_during_a_swap_the_read_waits_for_the_device(tmp_path: Path) -> None:
    device, marker = tmp_path / "tcpsecrets", tmp_path / "swap"
    marker.touch()
    snap = SNAP
    writer = appear_later(device, encode(snap), after=0.3)
    try:
        assert read_snapshot_across_swap(str(device), str(marker), wait=30) == snap
    finally:
        writer.join()


def test_without_a_swap_a_missing_device_is_said_at_once(tmp_path: Path) -> None:
    device = tmp_path / "tcpsecrets"
    writer = appear_later(device, encode(SNAP), after=0.5)
    try:
        with pytest.raises(DeviceMissing):
            read_snapshot_across_swap(str(device), str(tmp_path / "no-swap"), wait=30)
        assert not device.exists()  # it did not wait for the device
    finally:
        writer.join()


def test_a_marker_left_by_a_killed_swap_is_ignored(tmp_path: Path) -> None:
    device, marker = tmp_path / "tcpsecrets", tmp_path / "swap"
    marker.touch()
    old = time.time() - SWAP_MARKER_MAX_AGE - 1
    os.utime(marker, (old, old))
    writer = appear_later(device, encode(SNAP), after=0.5)
    try:
        with pytest.raises(DeviceMissing):
            read_snapshot_across_swap(str(device), str(marker), wait=30)
        assert not device.exists()
    finally:
        writer.join()


def test_a_swap_that_does_not_end_in_time_is_said(tmp_path: Path) -> None:
    marker = tmp_path / "swap"
    marker.touch()
    with pytest.raises(DeviceMissing):
        read_snapshot_across_swap(str(tmp_path / "tcpsecrets"), str(marker), wait=0.2)
