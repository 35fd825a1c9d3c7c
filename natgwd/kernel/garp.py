"""Gratuitous ARP for EIPs, the same frames as `arping -U -c 3`: an ARP request whose
sender and target address are both the EIP, broadcast, so that upstream switches and
routers learn the EIP's new MAC after the gateway moved (Kube-OVN #4690).

Sending takes about two seconds (three frames one second apart), so it runs on a thread
of its own and never holds up a reconcile.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

import structlog

log = structlog.get_logger("natgwd.kernel.garp")

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def arp_frame(mac: bytes, address: IPv4Address) -> bytes:
    ethernet = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op 1 (request); target MAC unknown (zero).
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + address.packed + b"\x00" * 6 + address.packed
    return ethernet + arp


def announce(interface: str, addresses: list[IPv4Address], count: int = 3, interval: float = 1.0) -> int:
    """Send `count` rounds of gratuitous ARP for each address; return frames sent."""
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((interface, 0))
        mac = sock.getsockname()[4]
        for round_number in range(count):
            if round_number:
                time.sleep(interval)
            for address in addresses:
                sock.send(arp_frame(mac, address))
                sent += 1
    return sent


class Announcer:
    """Sends announcements in the background, one request after another."""

    def __init__(self, on_sent: Callable[[str, int], None]) -> None:
        self._requests: queue.SimpleQueue[tuple[str, list[IPv4Address]]] = queue.SimpleQueue()
        self._on_sent = on_sent
        threading.Thread(target=self._work, name="natgwd-garp", daemon=True).start()

    def request(self, interface: str, addresses: list[IPv4Address]) -> None:
        if addresses:
            self._requests.put((interface, addresses))

    def _work(self) -> None:
        while True:
            interface, addresses = self._requests.get()
            try:
                sent = announce(interface, addresses)
            except OSError as err:
                log.error("gratuitous ARP failed", interface=interface, error=str(err))
                continue
            log.info("gratuitous ARP sent", interface=interface, addresses=[str(a) for a in addresses], frames=sent)
            self._on_sent(interface, sent)
