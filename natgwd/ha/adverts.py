"""Who owns each EIP group, as keepalived tells it: the source of the VRRP adverts heard on
the members' link. The master of a group advertises to every other member (unicast_peer),
so every member that does not own a group hears its owner at each advert interval and, at
a takeover, at once (a new master advertises as it becomes one).

natgwd only listens (a raw socket for IP protocol 112 receives a copy of each advert
addressed to this member); keepalived alone decides who owns what.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from ipaddress import IPv4Address

import structlog

log = structlog.get_logger("natgwd.ha.adverts")

IPPROTO_VRRP = 112
VRRP_V3_ADVERT = 0x31  # version 3, type 1


def parse_advert(packet: bytes) -> tuple[IPv4Address, int, int] | None:
    """(source, virtual router id, priority) of a VRRPv3 advert in an IPv4 packet (as a raw
    socket receives it: with its IP header), else None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    if packet[9] != IPPROTO_VRRP or len(packet) < header + 8 or packet[header] != VRRP_V3_ADVERT:
        return None
    return IPv4Address(packet[12:16]), packet[header + 1], packet[header + 2]


class AdvertListener:
    """Calls `on_advert(source, vrid, priority)` for every advert, on a thread of its own."""

    def __init__(self, interface: str, on_advert: Callable[[IPv4Address, int, int], None]) -> None:
        self._on_advert = on_advert
        self._stopping = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_VRRP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        self._sock.settimeout(0.25)
        self._thread = threading.Thread(target=self._run, name="natgwd-scale-adverts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._sock.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                packet = self._sock.recv(2048)
            except TimeoutError:
                continue
            except OSError as err:
                log.warning("cannot read VRRP adverts", error=str(err))
                self._stopping.wait(0.25)
                continue
            advert = parse_advert(packet)
            if advert is not None:
                self._on_advert(*advert)
