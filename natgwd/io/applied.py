"""The daemon's record of the state it last applied: its sha256 and time, then the state.

The daemon writes it after every apply; `natgwd status`, the daemon at its next start and
the drop-in shim (waiting for its edit to be applied) read it. The sha256 and the time
come first and are read from the record's head alone, so a shim polling for its edit does
not parse megabytes of state on every poll.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from natgwd.state.model import DesiredState
from natgwd.state.validation import InvalidStateError, load_state

_HEAD = re.compile(rb'\{"sha256": "([0-9a-f]{64})", "applied_at": "([^"]{1,64})"')
_HEAD_BYTES = 160


@dataclass(frozen=True)
class AppliedHead:
    sha256: str
    applied_at: datetime


def write(path: Path, sha256: str, applied_at: float, raw_state: bytes) -> None:
    """Replace the record (a reader sees the old one or the new one).

    `path` is a symbolic link, swapped by a rename to a file written under a new name: ext4
    writes a file renamed over another out to disk first (auto_da_alloc), 3-4 ms for a
    2 MB record at every change, and a link has nothing to write out. The file the link
    named before is removed after the swap (a reader that opened it keeps reading it)."""
    when = datetime.fromtimestamp(applied_at, UTC).isoformat()
    # The state is valid JSON already: embed its bytes rather than re-encode megabytes.
    head = json.dumps({"sha256": sha256, "applied_at": when})[:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    content = path.with_name(f".{path.name}.{time.time_ns()}")
    content.write_bytes(head.encode() + b', "state": ' + raw_state.strip() + b"}\n")
    link = path.with_name(f".{path.name}.link")
    link.unlink(missing_ok=True)
    os.symlink(content.name, link)
    os.replace(link, path)
    for old in _contents(path):
        if old != content:
            old.unlink(missing_ok=True)


def remove(path: Path) -> None:
    """Remove the record and the file it names."""
    path.unlink(missing_ok=True)
    for old in _contents(path):
        old.unlink(missing_ok=True)


def _contents(path: Path) -> list[Path]:
    """The files the record's link named (one, unless a write was interrupted)."""
    prefix = f".{path.name}."
    return [p for p in path.parent.glob(glob.escape(prefix) + "*") if p.name[len(prefix) :].isdigit()]


def read_head(path: Path) -> AppliedHead | None:
    """The record's sha256 and time; None when there is no record or it is not one."""
    try:
        with path.open("rb") as file:
            match = _HEAD.match(file.read(_HEAD_BYTES))
        if match is None:
            return None
        applied_at = datetime.fromisoformat(match.group(2).decode())
    except (OSError, ValueError):
        return None
    return AppliedHead(match.group(1).decode(), applied_at if applied_at.tzinfo else applied_at.replace(tzinfo=UTC))


def read_state(path: Path) -> DesiredState | None:
    """The state the record holds; None when there is none or it no longer validates."""
    try:
        record = json.loads(path.read_bytes())
        return load_state(json.dumps(record["state"]).encode())
    except (OSError, ValueError, KeyError, TypeError, InvalidStateError):
        return None
