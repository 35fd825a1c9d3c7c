"""Notice that the desired-state file changed: an in-place write, a rename over it, or a
Kubernetes ConfigMap volume swapping its `..data` symlink.

Polling one stat() of the path, following symlinks, catches all three (a swap or rename
changes the inode the path resolves to), costs microseconds, and needs no inotify watch
on directories that a ConfigMap update replaces wholesale.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# File timestamps come from a coarse clock (a few milliseconds): two same-size writes in
# one tick leave the same signature. For this long after a write the content is hashed
# again on every poll.
RECHECK_SECONDS = 2.0


class FileWatcher:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: tuple[int, ...] | str | None = None

    def _signature(self) -> tuple[int, ...] | str:
        try:
            st = os.stat(self.path)
        except OSError as err:
            return f"{type(err).__name__}:{err.errno}"
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def poll(self) -> str | None:
        """'changed' when the path's signature changed, 'recheck' when it did not but was
        written too recently to be sure, else None."""
        signature = self._signature()
        if signature != self._last:
            self._last = signature
            return "changed"
        if isinstance(signature, tuple) and time.time_ns() - signature[4] < RECHECK_SECONDS * 1e9:
            return "recheck"
        return None
