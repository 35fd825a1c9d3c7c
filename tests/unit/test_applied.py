"""natgwd.io.applied: the applied-state record, written once and read in one place by
the daemon, `natgwd status` and the shim; its head is read without parsing the state."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from natgwd.io import applied
from natgwd.lab.topology import SEED_STATE
from natgwd.state.validation import load_state

DIGEST = "ab" * 32


def test_a_written_record_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "applied.json"
    raw = json.dumps(SEED_STATE, indent=2).encode() + b"\n"
    applied.write(path, DIGEST, 1_700_000_000.5, raw)
    head = applied.read_head(path)
    assert head == applied.AppliedHead(DIGEST, datetime.fromtimestamp(1_700_000_000.5, UTC))
    assert applied.read_state(path) == load_state(raw)
    assert json.loads(path.read_bytes())["state"] == SEED_STATE
    assert not list(path.parent.glob(".*tmp"))


def test_the_head_is_read_without_the_state(tmp_path: Path) -> None:
    path = tmp_path / "applied.json"
    applied.write(path, DIGEST, 0, b"{}")
    with path.open("ab") as file:  # megabytes of state after the head, cut short
        file.write(b"x" * 3_000_000)
    head = applied.read_head(path)
    assert head is not None and head.sha256 == DIGEST
    assert applied.read_state(path) is None


def test_no_record_or_another_file_reads_as_none(tmp_path: Path) -> None:
    assert applied.read_head(tmp_path / "missing.json") is None
    other = tmp_path / "other.json"
    other.write_text('{"applied_at": "2026-01-01T00:00:00+00:00", "sha256": "' + DIGEST + '"}')
    assert applied.read_head(other) is None
    other.write_text('{"sha256": "' + DIGEST + '", "applied_at": "yesterday"}')
    assert applied.read_head(other) is None


def test_each_write_swaps_a_link_and_leaves_one_file_behind_it(tmp_path: Path) -> None:
    """The record's path is a link renamed over the last one (a file renamed over another
    is written out to disk first on ext4): a reader sees a whole record, old or new; the
    file the link named before goes; an older natgwd's plain file is replaced too."""
    path = tmp_path / "applied.json"
    path.write_text("an older natgwd's record")
    raw = json.dumps(SEED_STATE).encode()
    with_old_open = None
    for second in range(5):
        applied.write(path, DIGEST, float(second), raw)
        if with_old_open is None:
            with_old_open = path.open("rb")  # a reader of the first record, slow to finish
    assert path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["applied.json", os.readlink(path)])
    head = applied.read_head(path)
    assert head is not None and head.applied_at == datetime.fromtimestamp(4, UTC)
    assert json.loads(with_old_open.read())["applied_at"] == datetime.fromtimestamp(0, UTC).isoformat()
    with_old_open.close()
    applied.remove(path)
    assert list(tmp_path.iterdir()) == []


def test_the_state_is_embedded_without_the_white_space_around_it(tmp_path: Path) -> None:
    path = tmp_path / "applied.json"
    applied.write(path, DIGEST, 0, b' \n\t{"a": [1, 2]}\r\n \n')
    assert path.read_bytes().endswith(b', "state": {"a": [1, 2]}}\n')
    assert bytes(applied.stripped(b" \n ")) == b""
    assert bytes(applied.stripped(b"{}")) == b"{}"


def test_a_record_is_whole_when_the_kernel_takes_it_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.writev may write less than asked: the rest follows, from where it stopped."""
    real_writev = os.writev
    sizes: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        first = bytes(buffers[0][:7])  # at most 7 bytes of the first buffer a call
        sizes.append(len(first))
        return real_writev(fd, [first])

    monkeypatch.setattr(os, "writev", short_writev)
    path = tmp_path / "applied.json"
    raw = json.dumps(SEED_STATE).encode()
    applied.write(path, DIGEST, 0, raw)
    assert json.loads(path.read_bytes())["state"] == SEED_STATE
    assert len(sizes) > len(raw) // 7 and max(sizes) == 7
