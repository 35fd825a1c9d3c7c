"""systemd's notify protocol (sd_notify): READY=1, WATCHDOG=1, STOPPING=1 datagrams to
$NOTIFY_SOCKET. Without the variable every call is a no-op."""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        # systemd's advice: ping at half the timeout.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else None
        self._next_ping = 0.0

    def send(self, message: str) -> None:
        if not self._address:
            return
        # If the manager went away there is nobody left to tell.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message.encode(), self._address)

    def watchdog(self) -> None:
        """Ping the watchdog if half its interval has passed since the last ping."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self.send("WATCHDOG=1")
            self._next_ping = now + self.watchdog_interval
