"""The desired-state file as the daemon reads it: watched for changes, and each content
known by its sha256, so that content already seen is not judged again (unless forced)."""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
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


# From this size on, a file's sha256 is made on another thread (hashlib lets go of the GIL
# while it hashes) as the content is checked and applied: a millisecond at 12,000 rules.
ASIDE_BYTES = 256 * 1024


class Content:
    """The state file's bytes, and their sha256 once asked for (`digest`)."""

    def __init__(self, raw: bytes, digest: str | None = None) -> None:
        self.raw = raw
        self._digest = digest
        self._hashing: Future[str] | None = None

    def hash_aside(self) -> None:
        """Start making the sha256 of large content on another thread."""
        if self._digest is None and self._hashing is None and len(self.raw) >= ASIDE_BYTES:
            self._hashing = _hasher().submit(_sha256, self.raw)

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = self._hashing.result() if self._hashing is not None else _sha256(self.raw)
        return self._digest


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="natgwd-sha256")


@dataclass(frozen=True)
class Unreadable:
    """A state file that cannot be read, by its problems: it stands for the content, so
    that the same unreadable file is rejected once, not at every poll."""

    problems: tuple[Problem, ...]


# What the last read of the state file saw: its content, or why it could not be read.
LastRead = Content | Unreadable


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
        return Content(raw)

    def seen(self, content: Content | Unreadable, reading: Reading) -> bool:
        """Whether the last read saw this content already, and `reading` does not force
        judging it again. Content is compared byte for byte (at memory speed: no sha256
        for a file read again unchanged)."""
        if reading is Reading.FORCED:
            return False
        last = self.last_read
        if isinstance(content, Unreadable):
            return content == last
        return isinstance(last, Content) and last.raw == content.raw
