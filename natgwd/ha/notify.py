"""keepalived's notify FIFO: made where it is missing (or not a FIFO), read by one thread
for the daemon's life, each line handed on as its instance and a role or an event."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from natgwd.ha.roles import Event, Role

log = structlog.get_logger("natgwd.ha.notify")


def parse_notify(line: str) -> Role | Event | None:
    """The role or event in a notify FIFO line (`INSTANCE "natgwd" MASTER 150`); None for
    any other line."""
    parsed = parse_notify_instance(line)
    return parsed[1] if parsed else None


def parse_notify_instance(line: str) -> tuple[str, Role | Event] | None:
    """(instance, role or event) of a notify FIFO line (`INSTANCE "g1" BACKUP 190`): a
    scaled-out member runs one instance per EIP group."""
    parts = line.split()
    if len(parts) < 3 or parts[0] != "INSTANCE":
        return None
    instance, word = parts[1].strip('"'), parts[2].lower()
    if word in Role.__members__.values():
        return instance, Role(word)
    if word in Event.__members__.values():
        return instance, Event(word)
    log.warning("unknown keepalived notification", line=line.strip())
    return None


class NotifyFifo:
    def __init__(self, path: Path, on_notice: Callable[[str, Role | Event], None]) -> None:
        self.path = path
        self._on_notice = on_notice
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        """The FIFO in place, and the thread reading it running."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISFIFO(self.path.lstat().st_mode):
                self.path.unlink()
        with contextlib.suppress(FileExistsError):
            os.mkfifo(self.path, 0o600)
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="natgwd-ha-notify", daemon=True)
            self._thread.start()

    def _read(self) -> None:
        # Read-write: the FIFO never reports end of file when keepalived restarts.
        fd = os.open(self.path, os.O_RDWR)
        with os.fdopen(fd, "rb", buffering=0) as fifo:
            for raw in fifo:
                parsed = parse_notify_instance(raw.decode(errors="replace"))
                if parsed is not None:
                    self._on_notice(*parsed)
