"""The EIPs this member owns now, with change notifications: what announcements (BGP,
gratuitous ARP) follow when the gateway is scaled out."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("natgwd.ha.ownership")

Listener = Callable[[frozenset[str]], None]


class Ownership:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owned: frozenset[str] = frozenset()
        self._listeners: list[Listener] = []

    def owned(self) -> frozenset[str]:
        """The names of the EIPs this member holds now."""
        return self._owned

    def subscribe(self, listener: Listener) -> None:
        """`listener(owned)` after every change, from the thread that made it; a listener
        must not block (it delays the hand-over routes)."""
        with self._lock:
            self._listeners.append(listener)

    def set(self, owned: frozenset[str]) -> None:
        with self._lock:
            if owned == self._owned:
                return
            self._owned = owned
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(owned)
            except Exception:  # one listener's failure must not stop ownership from moving
                log.exception("ownership listener failed")
