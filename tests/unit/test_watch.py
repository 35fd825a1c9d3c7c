"""natgwd.runtime.watch.DirectoryWaker: inotify wakes the poll when the state file, or a
ConfigMap's `..data`, changes; nothing else in the directory does."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natgwd.runtime import watch
from natgwd.runtime.watch import DirectoryWaker

WOKEN_WITHIN = 5.0  # generous: a wake takes microseconds; this only bounds a failing test


class Wakes:
    """Counts the waker's calls, and sees the inotify batches it reads (its `os.read`).
    inotify delivers a directory's events in order, and the waker wakes for a batch's
    events before it reads the next batch: so when it starts reading the batch after the
    one holding a sentinel's event, every wake the operations before the sentinel caused
    has been counted. No wait for an event that should not come."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self._changed = threading.Condition()
        self._counts_at_read: list[int] = []  # the count as each read began
        self._batches: list[bytes] = []  # what each read returned
        self._sentinels = 0

    def __call__(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def read(self, fd: int, size: int) -> bytes:
        with self._changed:
            self._counts_at_read.append(self.count)
        data = os.read(fd, size)
        with self._changed:
            self._batches.append(data)
            self._changed.notify_all()
        return data

    def beyond(self, count: int) -> bool:
        """Whether a wake after the first `count` comes (within a generous bound)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count > count, WOKEN_WITHIN)

    def _sentinel(self) -> int:
        """Make a sentinel; the index of the batch that holds its event."""
        self._sentinels += 1
        name = f"..sentinel-{self._sentinels}".encode()
        (self.directory / name.decode()).mkdir()
        with self._changed:
            assert self._changed.wait_for(lambda: any(name in b for b in self._batches), WOKEN_WITHIN)
            return next(i for i, batch in enumerate(self._batches) if name in batch)

    def caused_since(self, count: int) -> int:
        """The wakes since `count` caused by what was done before this call."""
        first = self._sentinel()
        self._sentinel()  # its read begins once the first sentinel's batch is woken for
        with self._changed:
            assert self._changed.wait_for(lambda: len(self._counts_at_read) > first + 1, WOKEN_WITHIN)
            caused = self._counts_at_read[first + 1] - count - 1  # less the first sentinel's wake
            # The second sentinel's wake too, so that the next operation starts from a still count.
            assert self._changed.wait_for(lambda: self.count > self._counts_at_read[first + 1], WOKEN_WITHIN)
            return caused


class _Os:
    """The os module as natgwd.runtime.watch sees it, with `read` seen by Wakes."""

    def __init__(self, wakes: Wakes) -> None:
        self.read = wakes.read

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def wakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Wakes]:
    found = Wakes(tmp_path)
    monkeypatch.setattr(watch, "os", _Os(found))
    waker = DirectoryWaker(tmp_path / "state.json", found)
    waker.start()
    try:
        assert found.caused_since(0) == 0  # the watch is in place
        yield found
    finally:
        waker.stop()


def test_a_rename_over_the_file_wakes(tmp_path: Path, wakes: Wakes) -> None:
    before = wakes.count
    (tmp_path / ".state.json.tmp").write_text('{"version": 1}')
    assert wakes.caused_since(before) == 0, "a temporary file's write is not the state file's"
    before = wakes.count
    os.replace(tmp_path / ".state.json.tmp", tmp_path / "state.json")
    assert wakes.beyond(before)


def test_an_in_place_write_wakes(tmp_path: Path, wakes: Wakes) -> None:
    before = wakes.count
    with (tmp_path / "state.json").open("w") as file:
        file.write('{"version": 1}')
    assert wakes.beyond(before)


def test_a_configmap_data_swap_wakes(tmp_path: Path, wakes: Wakes) -> None:
    before = wakes.count
    (tmp_path / "..2026_11_26").mkdir()
    os.symlink("..2026_11_26", tmp_path / "..data_tmp")
    assert wakes.caused_since(before) >= 2  # names beginning with "..": let them pass
    before = wakes.count
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert wakes.beyond(before)


def test_other_files_do_not_wake(tmp_path: Path, wakes: Wakes) -> None:
    before = wakes.count
    (tmp_path / "natgwd.log").write_text("line\n")
    (tmp_path / "applied.json").write_text("{}")
    assert wakes.caused_since(before) == 0


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
