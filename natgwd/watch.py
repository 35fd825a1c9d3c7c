"""Notice that the desired-state file changed: an in-place write, a rename over it, or a
Kubernetes ConfigMap volume swapping its `..data` symlink.

Polling one stat() of the path, following symlinks, catches all three (a swap or rename
changes the inode the path resolves to), costs microseconds, and needs no inotify watch
on directories that a ConfigMap update replaces wholesale.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileWatcher:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: tuple[int, ...] | str | None = None
        self._recheck = False

    def _signature(self) -> tuple[int, ...] | str:
        try:
            st = os.stat(self.path)
        except OSError as err:
            return f"{type(err).__name__}:{err.errno}"
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def poll(self) -> str | None:
        """'changed' when the path's signature changed; 'recheck' once on the next poll
        after that, because file timestamps come from a coarse clock (a few milliseconds)
        and a second same-size write in the same tick as the one just read would leave the
        signature as it is; else None."""
        signature = self._signature()
        if signature != self._last:
            self._last, self._recheck = signature, True
            return "changed"
        if self._recheck:
            self._recheck = False
            return "recheck"
        return None
