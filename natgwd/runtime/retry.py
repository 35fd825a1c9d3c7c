"""When the daemon tries a failed or incomplete apply again: soon after the first failure
(an interface may just be late), then less and less often while it keeps failing."""

from __future__ import annotations

import time

RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0


class Backoff:
    """The next retry: RETRY_FIRST_SECONDS after a first failure, the wait doubling with
    every further one up to RETRY_MAX_SECONDS, back to the start after a success."""

    def __init__(self) -> None:
        self.due: float | None = None  # time.monotonic() of the next retry; None: none owed
        self.delay = RETRY_FIRST_SECONDS

    def schedule(self) -> None:
        self.due = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX_SECONDS)

    def cancel(self) -> None:
        """Nothing to retry (until the input changes); the wait is not reset."""
        self.due = None

    def reset(self) -> None:
        self.due, self.delay = None, RETRY_FIRST_SECONDS

    def is_due(self, now: float) -> bool:
        return self.due is not None and now >= self.due
