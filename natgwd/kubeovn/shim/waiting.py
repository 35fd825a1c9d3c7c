"""Waiting, in the file protocol, until natgwd has applied a write: its applied-state record
names the write's sha256, or that of a later write."""

from __future__ import annotations

import time
from pathlib import Path

from natgwd.io import applied
from natgwd.kubeovn.shim.filestate import Config, Written, read_journal, sha256


def boot_time() -> float | None:
    """When this machine booted (seconds since the epoch), from /proc/stat."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def applied_digest(path: Path, not_before: float | None = None) -> str | None:
    """The sha256 natgwd's record names; None when there is no readable record, or when it
    was written before `not_before` (the boot: a record kept on disk across a node reboot
    speaks of a network namespace that no longer exists)."""
    head = applied.read_head(path)
    if head is None or (not_before is not None and head.applied_at.timestamp() < not_before):
        return None
    return head.sha256


def _file_digest(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except OSError:
        return None


def wait_applied(config: Config, written: Written, deadline: float) -> bool:
    """Until `deadline`: True once natgwd's record names this content or a later one
    (journaled with a higher generation, or the file's current content)."""
    known_older: set[str] = set()
    booted = boot_time()
    delay = 0.005
    while True:
        applied = applied_digest(config.applied, booted)
        if applied is not None:
            if applied == written.digest:
                return True
            if applied not in known_older:
                # A content natgwd read was journaled before it was written: the lookup
                # cannot miss it, and "not later" stays true for this digest.
                if any(g > written.generation and d == applied for g, d in read_journal(config.journal)):
                    return True
                known_older.add(applied)
            if applied == _file_digest(config.state):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)
