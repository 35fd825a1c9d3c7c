"""natgwd.runtime.statefile: content read again unchanged is known by its bytes, and a
large file's sha256 is made on another thread while the daemon checks and applies it."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from natgwd.runtime import statefile
from natgwd.runtime.statefile import ASIDE_BYTES, Content, Reading, StateFile
from natgwd.state.validation import Problem


@pytest.mark.parametrize("size", [10, ASIDE_BYTES + 1])
def test_the_digest_is_the_sha256_of_the_content_whether_made_aside_or_not(size: int) -> None:
    raw = b"x" * size
    content = Content(raw)
    content.hash_aside()
    content.hash_aside()  # once is enough
    assert content.digest == hashlib.sha256(raw).hexdigest()
    assert Content(raw).digest == hashlib.sha256(raw).hexdigest()  # asked without hash_aside
    assert Content(raw, "given").digest == "given"


def test_large_content_is_hashed_on_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = statefile._sha256

    def noting(raw: bytes) -> str:
        threads.append(threading.current_thread().name)
        return real(raw)

    monkeypatch.setattr(statefile, "_sha256", noting)
    large = Content(b"y" * ASIDE_BYTES)
    large.hash_aside()
    small = Content(b"{}")
    small.hash_aside()
    assert large.digest and small.digest
    assert threads[0].startswith("natgwd-sha256") and threads[1] == threading.current_thread().name


def test_content_read_again_is_seen_by_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 1}')
    path.chmod(0o644)
    file = StateFile(path, allow_writable=False)
    first = file.read()
    assert isinstance(first, Content)
    assert not file.seen(first, Reading.CHANGED)
    file.last_read = first
    again = file.read()
    assert isinstance(again, Content) and again is not first
    assert file.seen(again, Reading.CHANGED) and file.seen(again, Reading.RECHECK)
    assert not file.seen(again, Reading.FORCED)
    path.write_bytes(b'{"version": 2}')  # the same size, other bytes
    assert not file.seen(file.read(), Reading.RECHECK)


def test_an_unreadable_file_is_seen_by_its_problems(tmp_path: Path) -> None:
    file = StateFile(tmp_path / "missing.json", allow_writable=False)
    missing = file.read()
    assert isinstance(missing, statefile.Unreadable)
    file.last_read = missing
    assert file.seen(file.read(), Reading.CHANGED)
    assert not file.seen(statefile.Unreadable((Problem("$", "other"),)), Reading.CHANGED)
    assert not file.seen(Content(b"{}"), Reading.CHANGED)
