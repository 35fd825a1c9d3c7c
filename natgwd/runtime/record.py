"""The daemon's side of the applied-state record (natgwd.runtime.applied): written after
every apply, for `natgwd status` and the drop-in, and read at start, to say what was
applied before it."""

from __future__ import annotations

from pathlib import Path

import structlog

from natgwd.io import applied

log = structlog.get_logger("natgwd.runtime.record")


class AppliedRecord:
    """The record at `path`; None: the daemon keeps none (no --applied-state)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def recall(self) -> None:
        """Log what the record says was applied before this start."""
        if self.path is None or not self.path.exists():
            return
        head = applied.read_head(self.path)
        if head is None:
            log.warning("ignoring unreadable record of the last applied state", path=str(self.path))
            return
        log.info("last applied before this start", sha256=head.sha256, applied_at=head.applied_at.isoformat())

    def write(self, raw: bytes, digest: str, applied_at: float) -> None:
        """Keep the applied state on disk (atomically); a failure is logged, not raised:
        the state is applied all the same."""
        if self.path is None:
            return
        try:
            applied.write(self.path, digest, applied_at, raw)
        except OSError as err:
            log.warning("cannot record the applied state", path=str(self.path), error=str(err))
