"""The connections natgwd itself ended (deleted from conntrack because their rule changed
or was removed), so that the translation log's end line can say why: the cleaner records
an entry's conntrack id before it deletes it, and the DESTROY event that follows takes it."""

from __future__ import annotations

import threading

# A rule change on a busy gateway deletes up to a million entries at once: the oldest
# records go first (their end lines then carry no reason), memory stays bounded.
LIMIT = 65536


class Endings:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._reasons: dict[int, str] = {}
        self._lock = threading.Lock()  # the reconciling thread records, the watch thread takes

    def ending(self, conntrack_id: int, reason: str) -> None:
        """natgwd is about to delete the entry: before the delete, since its DESTROY event
        may be read on another thread as soon as the kernel sends it."""
        with self._lock:
            self._reasons[conntrack_id] = reason
            if len(self._reasons) > self._limit:
                del self._reasons[next(iter(self._reasons))]

    def take(self, conntrack_id: int) -> str | None:
        """Why natgwd ended this connection (once), or None when natgwd did not."""
        with self._lock:
            return self._reasons.pop(conntrack_id, None)
