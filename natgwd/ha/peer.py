"""The peer check: each member sends the sha256 of the state it applied and its role to
the other over the sync link once a second (UDP, HELLO_PORT). It tells whether the peer
is reachable, which VRRP cannot tell the active member (a standby sends nothing), and
whether both members hold the same rules.

It decides nothing about roles: that is keepalived's job alone.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

import structlog

log = structlog.get_logger("natgwd.ha.peer")

INTERVAL_SECONDS = 1.0
REACHABLE_SECONDS = 3.0
MAX_HELLO_BYTES = 512


@dataclass(frozen=True)
class PeerView:
    reachable: bool
    sha256: str | None  # what the peer last said it applied
    role: str | None


def encode_hello(sha256: str | None, role: str) -> bytes:
    return json.dumps({"sha256": sha256, "role": role}).encode()


def decode_hello(data: bytes) -> tuple[str | None, str] | None:
    """(sha256, role) from a hello, or None for anything else."""
    if len(data) > MAX_HELLO_BYTES:
        return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    sha256, role = message.get("sha256"), message.get("role")
    if not (sha256 is None or isinstance(sha256, str)) or not isinstance(role, str):
        return None
    return sha256, role


class PeerLink:
    """Sends hellos from `me` to `peer` and listens for the peer's, on a thread."""

    def __init__(
        self,
        interface: str,
        me: IPv4Address,
        peer: IPv4Address,
        port: int,
        mine: Callable[[], tuple[str | None, str]],
        on_return: Callable[[float], None],
    ) -> None:
        self.me, self.peer, self.port = me, peer, port
        self._mine = mine
        # Called with the monotonic time of the last hello before a silence, when the peer
        # is heard again (not when it is first heard).
        self._on_return = on_return
        self._heard_at: float | None = None
        self._heard: tuple[str | None, str] | None = None
        self._stopping = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Only over the sync link: with it down, a hello must not leave by the default route.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        self._sock.bind((str(me), port))
        self._sock.settimeout(INTERVAL_SECONDS / 4)
        self._thread = threading.Thread(target=self._run, name="natgwd-ha-peer", daemon=True)
        self._thread.start()

    def view(self) -> PeerView:
        heard_at, heard = self._heard_at, self._heard
        reachable = heard_at is not None and time.monotonic() - heard_at < REACHABLE_SECONDS
        return PeerView(reachable, heard[0] if heard else None, heard[1] if heard else None)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._sock.close()

    def _run(self) -> None:
        next_send = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_send:
                next_send = now + INTERVAL_SECONDS
                try:
                    self._sock.sendto(encode_hello(*self._mine()), (str(self.peer), self.port))
                except OSError as err:  # no route while the sync link is down
                    log.debug("hello not sent", error=str(err))
            try:
                data, (source, _) = self._sock.recvfrom(MAX_HELLO_BYTES + 1)
            except TimeoutError:
                continue
            except OSError as err:
                log.debug("hello not received", error=str(err))
                self._stopping.wait(INTERVAL_SECONDS / 4)
                continue
            hello = decode_hello(data) if source == str(self.peer) else None
            if hello is not None:
                silent_since = self._heard_at if self._heard_at is not None and not self.view().reachable else None
                self._heard, self._heard_at = hello, time.monotonic()
                if silent_since is not None:
                    self._on_return(silent_since)


class PeerCheck:
    """The link to the current peer, and whether it applied the same state as this member:
    said in the log once per change."""

    def __init__(self) -> None:
        self._link: PeerLink | None = None
        self._told: bool | None = None

    def start(
        self,
        interface: str,
        me: IPv4Address,
        peer: IPv4Address,
        port: int,
        mine: Callable[[], tuple[str | None, str]],
        on_return: Callable[[float], None],
    ) -> None:
        """Hellos to `peer` (nothing more when they are sent already)."""
        if self._link is None:
            self._link = PeerLink(interface, me, peer, port, mine, on_return)

    def stop(self) -> None:
        if self._link is not None:
            self._link.stop()
            self._link = None

    def view(self) -> PeerView | None:
        """What the peer says (None: no peer to ask)."""
        return self._link.view() if self._link is not None else None

    def same_state(self, digest: str | None) -> bool | None:
        """Whether the peer applied `digest` (None: the peer is not heard, or said none)."""
        view = self.view()
        if view is None or not view.reachable or view.sha256 is None:
            return None
        return view.sha256 == digest

    def tell(self, digest: str | None) -> None:
        """Log whether the peer applied the same state, when that changed."""
        match = self.same_state(digest)
        if match is None or match == self._told:
            return
        self._told = match
        if match:
            log.info("the peer applied the same desired state", sha256=(digest or "")[:12])
        else:
            view = self.view()
            log.warning(
                "the peer applied a different desired state",
                sha256=(digest or "")[:12],
                peer_sha256=(view.sha256 or "")[:12] if view else None,
            )
