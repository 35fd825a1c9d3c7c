"""The state file read safely; files written so that a reader sees the old content or the
new, never a part."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from natgwd.state.decode import MAX_FILE_BYTES
from natgwd.state.validation import InvalidStateError, Problem


def write_atomically(path: Path, data: bytes) -> None:
    """Write a sibling temp file, fsync it, rename it over `path`, fsync the directory."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UnreadableStateError(InvalidStateError):
    """The state file cannot be read (or must not be trusted); `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__([Problem("$", f"cannot read {path}: {reason}")])
        self.reason = reason


def read_state_file(path: Path, allow_writable: bool) -> bytes:
    """The desired-state file's bytes (at most one over the size limit). Both `run` and
    `check` read it here, so that they agree on which files they accept: one that users other
    than root (or natgwd's own) could rewrite is refused unless `allow_writable`."""
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        reason = "file does not exist"
    except PermissionError:
        reason = "permission denied"
    except OSError as err:
        reason = err.strerror or str(err)
    else:
        try:
            status = os.fstat(fd)
            if stat.S_ISDIR(status.st_mode):
                reason = "is a directory, not a file"
            elif not stat.S_ISREG(status.st_mode):
                reason = "is not a regular file"
            elif not allow_writable and (unsafe := _writable_by_others(status)):
                reason = f"{unsafe}, who could rewrite the gateway's NAT (--allow-writable-state to accept)"
            else:
                return _read_at_most(fd, MAX_FILE_BYTES + 1)
        except OSError as err:
            reason = err.strerror or str(err)
        finally:
            os.close(fd)
    raise UnreadableStateError(path, reason)


def _read_at_most(fd: int, limit: int) -> bytes:
    """One byte over the limit is enough to reject a file without holding all of it."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _writable_by_others(status: os.stat_result) -> str | None:
    if status.st_mode & stat.S_IWOTH:
        return "is writable by every user"
    if status.st_mode & stat.S_IWGRP and status.st_gid not in (0, os.getegid()):
        return f"is writable by group {status.st_gid}"
    if status.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {status.st_uid}"
    return None
