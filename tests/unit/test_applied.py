"""natgwd.io.applied: the applied-state record, written once and read in one place by
the daemon, `natgwd status` and the shim; its head is read without parsing the state."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

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
