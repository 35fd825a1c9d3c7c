"""Gratuitous ARP for EIPs, the same frames as `arping -U -c 3`: an ARP request whose
sender and target address are both the EIP, broadcast, so that upstream switches and
routers learn the EIP's new MAC after the gateway moved (Kube-OVN #4690).

IPv6 EIPs get the IPv6 counterpart (RFC 4861 7.2.6): an unsolicited neighbour
advertisement to all nodes (ff02::1), override flag set, carrying the target link-layer
address option, as `ndisc6`'s and keepalived's unsolicited NAs do.

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
from ipaddress import IPv4Address, IPv6Address

import structlog

from natgwd.state.model import IPAddress

log = structlog.get_logger("natgwd.kernel.garp")

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
ICMPV6 = 58
NEIGHBOUR_ADVERTISEMENT = 136
NA_FLAG_OVERRIDE = 0x20000000
OPTION_TARGET_LINK_LAYER = 2


def arp_frame(mac: bytes, address: IPv4Address) -> bytes:
    ethernet = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op 1 (request); target MAC unknown (zero).
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + address.packed + b"\x00" * 6 + address.packed
    return ethernet + arp


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def na_frame(mac: bytes, address: IPv6Address) -> bytes:
    """An unsolicited neighbour advertisement for `address`, from it to all nodes."""
    option = struct.pack("!BB", OPTION_TARGET_LINK_LAYER, 1) + mac
    body = struct.pack("!I", NA_FLAG_OVERRIDE) + address.packed + option
    pseudo = address.packed + ALL_NODES.packed + struct.pack("!I3xB", 4 + len(body), ICMPV6)
    checksum = _checksum(pseudo + struct.pack("!BBH", NEIGHBOUR_ADVERTISEMENT, 0, 0) + body)
    icmp = struct.pack("!BBH", NEIGHBOUR_ADVERTISEMENT, 0, checksum) + body
    # Version 6, hop limit 255: receivers drop neighbour discovery that crossed a router.
    ipv6 = struct.pack("!IHBB", 6 << 28, len(icmp), ICMPV6, 255) + address.packed + ALL_NODES.packed
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + icmp


def announce(interface: str, addresses: list[IPAddress], count: int = 3, interval: float = 1.0) -> int:
    """Send `count` rounds of gratuitous ARP (IPv4) or unsolicited neighbour
    advertisements (IPv6) for each address; return frames sent."""
    sent = 0
    # One raw socket sends both: the frames carry their own Ethernet header and type.
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((interface, 0))
        mac = sock.getsockname()[4]
        frames = [
            arp_frame(mac, address) if isinstance(address, IPv4Address) else na_frame(mac, address)
            for address in addresses
        ]
        for round_number in range(count):
            if round_number:
                time.sleep(interval)
            for frame in frames:
                sock.send(frame)
                sent += 1
    return sent


class Announcer:
    """Sends announcements in the background, one request after another."""

    def __init__(self, on_sent: Callable[[str, int], None]) -> None:
        self._requests: queue.SimpleQueue[tuple[str, list[IPAddress]]] = queue.SimpleQueue()
        self._on_sent = on_sent
        threading.Thread(target=self._work, name="natgwd-garp", daemon=True).start()

    def request(self, interface: str, addresses: list[IPAddress]) -> None:
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
