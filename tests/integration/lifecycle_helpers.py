"""Helpers for the live-operation tests (test_lifecycle.py): long-lived TCP echo streams,
a raw ARP capture, conntrack listings, a notify socket, and small readers of natgwd's
metrics, addresses and routes (what the other integration tests share is in helpers.py).
Everything runs only inside the lab's namespaces."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from natgwd.lab.topology import Lab, Natgwd, patience
from tests.integration.helpers import RuleCounters, client_command, wait_for

# --- natgwd's metrics ------------------------------------------------------------------

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(daemon: Natgwd, family: str, /, **labels: str) -> float:
    """One sample of /metrics by name and labels, whatever the label order (0 if absent)."""
    wanted = set(labels.items())
    for key, value in daemon.metrics().items():
        base, _, rest = key.partition("{")
        if base == family and set(_LABEL.findall(rest)) == wanted:
            return value
    return 0.0


def conntrack_deleted(daemon: Natgwd) -> dict[str, float]:
    """natgwd_conntrack_entries_deleted_total by reason."""
    return {
        reason: metric(daemon, "natgwd_conntrack_entries_deleted_total", reason=reason)
        for reason in ("fip", "dnat", "snat", "removed")
    }


def counters(daemon: Natgwd, kind: str, name: str, eip: str) -> RuleCounters:
    """The rule's counters from /metrics, 0 for any it does not export (unlike
    helpers.rule_counters, which tells a rule without counters apart)."""

    def get(metric_name: str, direction: str | None = None) -> float:
        extra = {"direction": direction} if direction else {}
        return metric(daemon, metric_name, kind=kind, name=name, eip=eip, **extra)

    return RuleCounters(
        get("natgwd_rule_connections_total"),
        get("natgwd_rule_packets_total", "original"),
        get("natgwd_rule_packets_total", "reply"),
        get("natgwd_rule_bytes_total", "original"),
        get("natgwd_rule_bytes_total", "reply"),
    )


# --- traffic --------------------------------------------------------------------------


def udp_once(lab: Lab, role: str, address: str, port: int, source_port: int, timeout: float = 2) -> str:
    """Send one datagram of the flow (source_port -> address:port); the answer or ''."""
    return lab.udp_exchange(role, address, port, [b"x"], timeout=timeout, source_port=source_port)[0]


@dataclass
class TcpStream:
    """One TCP connection from a namespace to an echo server that sends a line every
    50 ms and checks the echo; it never reconnects, so progress proves the connection
    itself survived."""

    log_path: Path
    process: subprocess.Popen[bytes]

    def _read(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def echoed(self) -> int:
        lines = self._read()
        errors = [line for line in lines if line.startswith("error")]
        assert not errors, f"stream {self.log_path.name} broke: {errors}"
        return sum(1 for line in lines if line.startswith("ok "))

    def local_address(self) -> str:
        lines = wait_for(lambda: [x for x in self._read() if x.startswith("connected ")], "the stream to connect")
        return lines[0].split()[1]

    def wait_echoes(self, more: int = 10, timeout: float = 15) -> int:
        """Wait until `more` further lines were echoed on the same connection."""
        wanted = self.echoed() + more

        def reached() -> int:
            count = self.echoed()
            return count if count >= wanted else 0

        return wait_for(reached, f"{more} more echoes on {self.log_path.name}", timeout)


def tcp_stream(lab: Lab, role: str, address: str, port: int, name: str) -> TcpStream:
    log_path = lab.workdir / f"stream-{name}.log"
    process = lab.spawn(role, *client_command("echo", "tcp", address, port, log_path, 0.05, 10))
    stream = TcpStream(log_path, process)
    stream.local_address()
    return stream


# --- conntrack ------------------------------------------------------------------------


@dataclass(frozen=True)
class CtEntry:
    proto: str
    orig: dict[str, str]
    reply: dict[str, str]


def conntrack_entries(lab: Lab, proto: str) -> list[CtEntry]:
    """The gateway's conntrack table for one protocol (`conntrack -L`)."""
    out = lab.exec("gw", "conntrack", "-L", "-p", proto, check=False).stdout
    entries = []
    for line in out.splitlines():
        fields = [f.split("=", 1) for f in line.split() if "=" in f]
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        for key, value in fields:
            if key in ("src", "dst", "sport", "dport"):
                (reply if key in orig else orig).setdefault(key, value)
        if orig:
            entries.append(CtEntry(proto, orig, reply))
    return entries


# --- ARP capture ----------------------------------------------------------------------

_ARP_CAPTURE = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((sys.argv[1], 0))
out = open(sys.argv[2], "a", buffering=1)
out.write("ready\n")
while True:
    data, addr = s.recvfrom(65535)
    if addr[2] != socket.PACKET_OUTGOING:
        out.write(data.hex() + "\n")
"""


@dataclass(frozen=True)
class ArpFrame:
    eth_dst: str
    eth_src: str
    op: int
    hwsrc: str
    psrc: str
    hwdst: str
    pdst: str

    @property
    def gratuitous(self) -> bool:
        return self.op == 1 and self.psrc == self.pdst


@dataclass
class ArpCapture:
    path: Path

    def frames(self) -> list[ArpFrame]:
        from scapy.layers.l2 import ARP, Ether

        found = []
        for line in self.path.read_text().splitlines()[1:]:
            packet = Ether(bytes.fromhex(line))
            arp = packet[ARP]
            found.append(
                ArpFrame(packet.dst, packet.src, int(arp.op), arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst)  # type: ignore[union-attr]
            )
        return found

    def gratuitous(self) -> list[ArpFrame]:
        return [f for f in self.frames() if f.gratuitous]


def capture_arp(lab: Lab, role: str, interface: str) -> ArpCapture:
    """Capture every ARP frame arriving on `interface` in `role`, from now on."""
    path = lab.workdir / f"arp-{role}-{interface}.hex"
    lab.spawn(role, sys.executable, "-c", _ARP_CAPTURE, interface, str(path))
    wait_for(lambda: path.exists() and path.read_text().startswith("ready"), "the ARP capture to start")
    return ArpCapture(path)


def mac_of(lab: Lab, role: str, interface: str) -> str:
    return str(json.loads(lab.exec(role, "ip", "-j", "link", "show", interface).stdout)[0]["address"])


# --- sd_notify ------------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.received.append(message)
        return message

    def wait_for(self, message: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + patience(timeout)
        while (left := deadline - time.monotonic()) > 0:
            if self.receive(left) == message:
                return
        raise TimeoutError(f"no {message!r} within {timeout}s; got {self.received}")

    def collect(self, seconds: float) -> list[str]:
        """Everything received in the next `seconds`."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.append(message)
        return got

    def close(self) -> None:
        self.sock.close()


# --- addresses and routes -------------------------------------------------------------


def addresses(lab: Lab, role: str, interface: str) -> set[str]:
    """IPv4 addresses of an interface as "address/prefix" (empty if it does not exist)."""
    result = lab.exec(role, "ip", "-j", "-4", "addr", "show", "dev", interface, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return set()
    return {
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(result.stdout)
        for a in link.get("addr_info", ())
        if a.get("family") == "inet"
    }


def routes(lab: Lab, role: str) -> set[tuple[str, str | None, str]]:
    """The main table's IPv4 routes as (dst, gateway, dev)."""
    return {
        (r["dst"], r.get("gateway"), r["dev"]) for r in json.loads(lab.exec(role, "ip", "-j", "-4", "route").stdout)
    }
