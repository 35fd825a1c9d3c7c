"""Gratuitous ARP for the addresses an HA member holds while it is active.

Unlike the single gateway's Announcer (garp.py), every round first asks whether this member
is still active: an announcement that outlives the role it was made for (three rounds take
two seconds) would pull upstream's and the VMs' traffic to a member that no longer holds
the addresses, which then blackholes it until their ARP entries expire (measured: up to
30 s after a healed split brain). All interfaces are announced in each round.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

import structlog

log = structlog.get_logger("natgwd.ha.announce")

ROUNDS = 3
INTERVAL_SECONDS = 1.0

Addresses = dict[str, list[IPv4Address]]
# One gratuitous ARP frame for each address out of the interface; the frames sent.
Send = Callable[[str, list[IPv4Address]], int]


class ActiveAnnouncer:
    def __init__(self, active: Callable[[], bool], send: Send, on_sent: Callable[[str, int], None]) -> None:
        self._active = active
        self._send_frames = send
        self._on_sent = on_sent
        self._requests: queue.SimpleQueue[Addresses] = queue.SimpleQueue()
        threading.Thread(target=self._work, name="natgwd-ha-garp", daemon=True).start()

    def request(self, addresses: Addresses) -> None:
        self._requests.put(addresses)

    def _work(self) -> None:
        while True:
            addresses = self._requests.get()
            for round_number in range(ROUNDS):
                if round_number:
                    time.sleep(INTERVAL_SECONDS)
                # A newer request restarts the rounds with its own addresses.
                while not self._requests.empty():
                    addresses = self._requests.get()
                if not self._active():
                    log.info("announcement dropped: no longer active")
                    break
                for interface, listed in addresses.items():
                    self._send(interface, listed)

    def _send(self, interface: str, addresses: list[IPv4Address]) -> None:
        if not addresses:
            return
        try:
            sent = self._send_frames(interface, list(addresses))
        except OSError as err:
            log.error("gratuitous ARP failed", interface=interface, error=str(err))
            return
        log.info("gratuitous ARP sent", interface=interface, addresses=[str(a) for a in addresses], frames=sent)
        self._on_sent(interface, sent)
