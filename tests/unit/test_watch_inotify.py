"""natgwd.runtime.watch.DirectoryWaker: inotify wakes the poll when the state file, or a
ConfigMap's `..data`, changes; nothing else in the directory does."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.runtime.watch import DirectoryWaker

WOKEN_WITHIN = 5.0  # generous: a wake takes microseconds; this only bounds a failing test


def settle(event: threading.Event) -> None:
    """Let a burst of events (a create, then a close after writing) pass, then clear."""
    while event.wait(0.2):
        event.clear()


@pytest.fixture
def woken(tmp_path: Path) -> Iterator[threading.Event]:
    event = threading.Event()
    waker = DirectoryWaker(tmp_path / "state.json", event.set)
    waker.start()
    try:
        # The watch is in place once a write of the file itself is seen.
        (tmp_path / "state.json").write_text("{}")
        assert event.wait(WOKEN_WITHIN), "the watch never reported the state file"
        settle(event)
        yield event
    finally:
        waker.stop()


def test_a_rename_over_the_file_wakes(tmp_path: Path, woken: threading.Event) -> None:
    (tmp_path / ".state.json.tmp").write_text('{"version": 1}')
    assert not woken.wait(0.3), "a temporary file's write is not the state file's"
    os.replace(tmp_path / ".state.json.tmp", tmp_path / "state.json")
    assert woken.wait(WOKEN_WITHIN)


def test_an_in_place_write_wakes(tmp_path: Path, woken: threading.Event) -> None:
    with (tmp_path / "state.json").open("w") as file:
        file.write('{"version": 1}')
    assert woken.wait(WOKEN_WITHIN)


def test_a_configmap_data_swap_wakes(tmp_path: Path, woken: threading.Event) -> None:
    (tmp_path / "..2026_11_26").mkdir()
    settle(woken)
    os.symlink("..2026_11_26", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert woken.wait(WOKEN_WITHIN)


def test_other_files_do_not_wake(tmp_path: Path, woken: threading.Event) -> None:
    (tmp_path / "natgwd.log").write_text("line\n")
    (tmp_path / "applied.json").write_text("{}")
    assert not woken.wait(0.3)


def test_a_directory_that_comes_back_is_watched_again(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    directory.mkdir()
    event = threading.Event()
    waker = DirectoryWaker(directory / "state.json", event.set)
    waker.start()
    try:
        (directory / "state.json").write_text("{}")
        assert event.wait(WOKEN_WITHIN)
        (directory / "state.json").unlink()
        directory.rmdir()
        directory.mkdir()
        event.clear()
        for _ in range(int(WOKEN_WITHIN / 0.2)):  # the watch is set again within a second or so
            (directory / "state.json").write_text("{}")
            if event.wait(0.2):
                break
        assert event.is_set()
    finally:
        waker.stop()
