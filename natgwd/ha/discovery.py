"""Member discovery for a gateway kube-ovn-controller runs as a Deployment: each member says
hello once a second to a multicast group on the LAN interface (TTL 1, from its own LAN
address) and lists the members of its scope it hears (docs/scaling-out.md).

The list only says who the members are. Who owns what, and whether a member is alive, is
keepalived's to decide: a member that stops saying hello is forgotten after
FORGET_SECONDS, long after keepalived moved its groups away, and forgetting it changes
no group's owner (rendezvous priorities keep the order of the others).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import structlog

from natgwd.ha.autoscale import MAX_MEMBERS
from natgwd.ha.hello import DISCOVERY_PORT, HELLO_GROUP, MAX_HELLO_BYTES, Hello, Refusal, decode_hello, encode_hello
from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.io.files import write_atomically

log = structlog.get_logger("natgwd.ha.discovery")

HELLO_SECONDS = 1.0
WINDOW_SECONDS = 3.0  # three hellos of every member already there
FORGET_SECONDS = 15.0
MEMBERS_FILE = "members.json"  # in the run directory, for `natgwd status`


@dataclass(frozen=True)
class Discovered:
    members: tuple[IPv4Address, ...]  # this member's address included
    settled: bool  # the window has passed since discovery started


class MemberDiscovery:
    def __init__(
        self,
        scope: str,
        metrics: ScaleMetrics,
        run_dir: Path,
        interval: float = HELLO_SECONDS,
    ) -> None:
        self.scope = scope
        self._metrics = metrics
        self._file = run_dir / MEMBERS_FILE
        self._interval = interval
        self._lock = threading.Lock()
        self._on_change: Callable[[], None] = lambda: None
        self._where: tuple[str, IPv4Address] | None = None
        self._heard: dict[IPv4Address, float] = {}  # monotonic time of each member's last hello
        self._started = 0.0
        self._settled = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.members_discovered.set_function(lambda: len(self.view().members))

    def start(self, on_change: Callable[[], None]) -> None:
        """`on_change` is called (on the discovery thread) when the member list changes or
        the window passes."""
        self._on_change = on_change

    def follow(self, interface: str, address: IPv4Address) -> None:
        """Say hello from `address` on `interface` and listen there (again, if either changed)."""
        with self._lock:
            if self._where == (interface, address):
                return
        self.stop()
        with self._lock:
            self._where = (interface, address)
            self._heard.clear()
            self._started, self._settled = time.monotonic(), False
            self._stopping = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(interface, address, self._stopping), name="natgwd-discovery", daemon=True
            )
            self._thread.start()
        log.info("discovering members", scope=self.scope, interface=interface, address=str(address))

    def view(self) -> Discovered:
        with self._lock:
            if self._where is None:
                return Discovered((), False)
            return Discovered(tuple(sorted({self._where[1], *self._heard})), self._settled)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- the thread ---------------------------------------------------------------------

    def _run(self, interface: str, address: IPv4Address, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                sender, receiver = _sockets(interface, address)
            except OSError as err:
                log.error("cannot say hello on the LAN", interface=interface, error=str(err))
                stopping.wait(self._interval)
                continue
            try:
                self._exchange(sender, receiver, address, stopping)
            except OSError as err:
                log.warning("hello exchange failed; opening the sockets again", error=str(err))
                stopping.wait(self._interval)
            except Exception:  # no hello may end discovery
                log.exception("hello exchange failed unexpectedly; opening the sockets again")
                stopping.wait(self._interval)
            finally:
                sender.close()
                receiver.close()

    def _exchange(
        self, sender: socket.socket, receiver: socket.socket, address: IPv4Address, stopping: threading.Event
    ) -> None:
        hello = encode_hello(Hello(self.scope, address))
        next_hello = 0.0
        while not stopping.is_set():
            now = time.monotonic()
            if now >= next_hello:
                sender.sendto(hello, (str(HELLO_GROUP), DISCOVERY_PORT))
                next_hello = now + self._interval
            receiver.settimeout(max(0.01, next_hello - now))
            try:
                data, (source, _port) = receiver.recvfrom(MAX_HELLO_BYTES + 1)
            except TimeoutError:
                data = None
            changed = self._heard_from(IPv4Address(source), data, address) if data is not None else False
            changed |= self._expire(time.monotonic())
            if changed:
                self._changed()

    def _heard_from(self, source: IPv4Address, data: bytes, address: IPv4Address) -> bool:
        if source == address:
            return False
        result = decode_hello(data, self.scope, source)
        if isinstance(result, Hello) and source not in self._heard and len(self._heard) + 1 >= MAX_MEMBERS:
            result = Refusal.TOO_MANY_MEMBERS
        if isinstance(result, Refusal):
            self._metrics.hellos_refused.labels(result).inc()
            log.debug("hello ignored", source=str(source), reason=str(result))
            return False
        self._metrics.hellos_received.inc()
        with self._lock:
            new = source not in self._heard
            self._heard[source] = time.monotonic()
        if new:
            log.info("member discovered", member=str(source), scope=self.scope)
        return new

    def _expire(self, now: float) -> bool:
        with self._lock:
            gone = [member for member, at in self._heard.items() if now - at > FORGET_SECONDS]
            for member in gone:
                del self._heard[member]
            settles = not self._settled and now - self._started >= WINDOW_SECONDS
            self._settled |= settles
        for member in gone:
            log.info("member forgotten: no hello heard", member=str(member), seconds=FORGET_SECONDS)
        if settles:
            log.info("discovery window passed", members=[str(m) for m in self.view().members])
        return bool(gone) or settles

    def _changed(self) -> None:
        view = self.view()
        record = {"scope": self.scope, "members": [str(m) for m in view.members], "settled": view.settled}
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._file, json.dumps(record).encode())
        except OSError as err:
            log.warning("cannot record the members for natgwd status", path=str(self._file), error=str(err))
        self._on_change()


def _sockets(interface: str, address: IPv4Address) -> tuple[socket.socket, socket.socket]:
    """A sender bound to this member's LAN address and interface, and a receiver of the
    hello group on that interface alone (never an EIP, nothing on the external side)."""
    device = interface.encode()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        sender.bind((str(address), 0))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, address.packed)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        receiver.bind((str(HELLO_GROUP), DISCOVERY_PORT))
        membership = struct.pack("4s4s", HELLO_GROUP.packed, address.packed)
        receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except OSError:
        sender.close()
        receiver.close()
        raise
    return sender, receiver
