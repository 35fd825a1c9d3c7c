"""The desired-state file as the daemon reads it: watched for changes, and each content
known by its sha256, so that content already seen is not judged again (unless forced)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from natgwd.io.files import read_state_file
from natgwd.runtime.watch import FileWatcher, Seen
from natgwd.state.validation import InvalidStateError, Problem


class Reading(Enum):
    """Why the state file is read, which says what becomes of content already seen."""

    CHANGED = "changed"  # the watcher saw it change: unchanged content is counted as such
    RECHECK = "recheck"  # a precautionary re-read: unchanged content is neither counted nor logged
    FORCED = "forced"  # SIGHUP, a retry, a failed check of the deltas: applied even unchanged


@dataclass(frozen=True)
class Content:
    raw: bytes
    digest: str  # sha256


@dataclass(frozen=True)
class Unreadable:
    """A state file that cannot be read, by its problems: it stands for the content, so
    that the same unreadable file is rejected once, not at every poll."""

    problems: tuple[Problem, ...]


# What the last read of the state file saw: its content's sha256, or why it could not be read.
LastRead = str | Unreadable


class StateFile:
    def __init__(self, path: Path, allow_writable: bool) -> None:
        self.path = path
        self.allow_writable = allow_writable
        self.watcher = FileWatcher(path)
        self.last_read: LastRead | None = None

    def poll(self) -> Reading | None:
        """How the file is to be read now, as the watcher says; None: not at all."""
        seen = self.watcher.poll()
        if seen is None:
            return None
        return Reading.RECHECK if seen is Seen.RECHECK else Reading.CHANGED

    def read(self) -> Content | Unreadable:
        try:
            raw = read_state_file(self.path, self.allow_writable)
        except InvalidStateError as err:
            return Unreadable(tuple(err.problems))
        return Content(raw, hashlib.sha256(raw).hexdigest())

    def seen(self, content: Content | Unreadable, reading: Reading) -> bool:
        """Whether the last read saw this content already, and `reading` does not force
        judging it again."""
        last = content if isinstance(content, Unreadable) else content.digest
        return last == self.last_read and reading is not Reading.FORCED
