"""Notice that the desired-state file changed: an in-place write, a rename over it, or a
Kubernetes ConfigMap volume swapping its `..data` symlink.

Polling one stat() of the path, following symlinks, catches all three (a swap or rename
changes the inode the path resolves to), costs microseconds, and needs no inotify watch
on directories that a ConfigMap update replaces wholesale. It is the truth. An inotify
watch on the file's directory only cuts the wait: it wakes the poll as soon as the file
or a ConfigMap's `..` entry is written, renamed or removed, instead of at the next tick.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import structlog

log = structlog.get_logger("natgwd.runtime.watch")


class Seen(Enum):
    """What a poll of the state file saw."""

    CHANGED = "changed"
    RECHECK = "recheck"  # maybe changed again within the clock's tick: read it again, quietly


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

    def poll(self) -> Seen | None:
        """CHANGED when the path's signature changed; RECHECK once on the next poll
        after that, because file timestamps come from a coarse clock (a few milliseconds)
        and a second same-size write in the same tick as the one just read would leave the
        signature as it is; else None."""
        signature = self._signature()
        if signature != self._last:
            self._last, self._recheck = signature, True
            return Seen.CHANGED
        if self._recheck:
            self._recheck = False
            return Seen.RECHECK
        return None


_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x004, 0x008, 0x040, 0x080
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_IGNORED = 0x8000
_WATCHED = (
    _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
)  # not IN_MODIFY: a write is whole at IN_CLOSE_WRITE, and half-written files only fail validation
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class DirectoryWaker:
    """Calls `wake` when the file `path` names, or a `..` entry beside it (a ConfigMap's
    `..data` swap), changes in its directory. A thread reads the inotify events; if inotify
    is unavailable, or the directory goes away, it says so once and polling carries on."""

    def __init__(self, path: Path, wake: Callable[[], None]) -> None:
        self._directory = path.parent
        self._name = path.name.encode()
        self._wake = wake
        self._stop = threading.Event()
        self._tried = threading.Event()  # the first watch is in place, or could not be
        self._thread = threading.Thread(target=self._run, name="natgwd-inotify", daemon=True)

    def start(self) -> None:
        """Start watching; returns once the watch is in place (or known not to be)."""
        self._thread.start()
        self._tried.wait(timeout=5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        while not self._stop.is_set():
            fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
            if fd < 0:
                log.info("no inotify: the state file is polled only", error=os.strerror(ctypes.get_errno()))
                self._tried.set()
                return
            try:
                watch = libc.inotify_add_watch(fd, bytes(self._directory), _WATCHED | _IN_DELETE_SELF | _IN_MOVE_SELF)
                self._tried.set()
                if watch < 0:
                    log.debug("cannot watch the state file's directory yet", error=os.strerror(ctypes.get_errno()))
                else:
                    self._read_events(fd)
            finally:
                os.close(fd)
            self._stop.wait(1.0)  # the directory is gone or was replaced: watch it again

    def _read_events(self, fd: int) -> None:
        """Until the watch ends (the directory went away) or stop()."""
        while not self._stop.is_set():
            readable, _, _ = select.select([fd], [], [], 0.5)
            if not readable:
                continue
            with contextlib.suppress(BlockingIOError):
                data = os.read(fd, 64 * 1024)
                offset, ended = 0, False
                while offset < len(data):
                    _, mask, _, length = _EVENT.unpack_from(data, offset)
                    name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                    offset += _EVENT.size + length
                    if name == self._name or name.startswith(b".."):
                        self._wake()
                    ended |= bool(mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF))
                if ended:
                    self._wake()
                    return
