"""Cloud-NAT-style observability with real connections: conntrack pressure, open
connections per rule and EIP, SNAT port usage and allocation failures, translation logs.

Every test keeps the gateway's own loopback traffic (the /metrics scrapes) out of conntrack
with a table of its own in the gateway namespace, so that the table holds exactly the
connections the test made, and shortens conntrack's timeouts there so closed connections
leave the table within seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab import Lab, Natgwd
from tests.integration.helpers import (
    DNAT_EIP,
    FIP_EIP,
    UPSTREAM,
    samples,
    start,
    wait_for,
    wait_listening,
)

ECHO_PORT = 7777
DNAT_ID = {("kind", "dnat"), ("name", "dnat01"), ("eip", DNAT_EIP)}
SNAT_ID = {("kind", "snat"), ("name", "my-snat"), ("eip", DNAT_EIP)}
FIP_ID = {("kind", "fip"), ("name", "fip01"), ("eip", FIP_EIP)}

SHORT_TIMEOUTS = {
    "nf_conntrack_tcp_timeout_time_wait": 1,
    "nf_conntrack_tcp_timeout_close": 1,
    "nf_conntrack_tcp_timeout_fin_wait": 1,
    "nf_conntrack_tcp_timeout_close_wait": 1,
    "nf_conntrack_tcp_timeout_last_ack": 1,
    "nf_conntrack_udp_timeout": 2,
    "nf_conntrack_udp_timeout_stream": 2,
}

# Opens `count` TCP connections (or UDP flows) to address:port from fixed source ports,
# exchanges one message on each, prints what the far end saw for each, and holds them
# until stdin closes.
HOLD = """
import json, socket, sys
address, port, count, proto, first_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
held, seen = [], []
for i in range(count):
    if proto == "tcp":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", first_port + i))
        s.settimeout(10)
        s.connect((address, port))
        s.sendall(b"hello")
        seen.append(s.recv(100).decode())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", first_port + i))
        s.settimeout(10)
        s.sendto(b"hello", (address, port))
        seen.append(s.recv(100).decode())
    held.append(s)
print(json.dumps(seen), flush=True)
sys.stdin.read()
"""

# An echo server that answers each TCP stream's or datagram's data with the peer address
# it saw ("ip:port"), keeping the streams open.
PEER_ECHO = """
import selectors, socket, sys
port = int(sys.argv[1])
sel = selectors.DefaultSelector()
listener = socket.create_server(("0.0.0.0", port), backlog=4096)
sel.register(listener, selectors.EVENT_READ, "accept")
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
sel.register(udp, selectors.EVENT_READ, "udp")
while True:
    for key, _ in sel.select():
        if key.data == "accept":
            conn, peer = listener.accept()
            sel.register(conn, selectors.EVENT_READ, peer)
        elif key.data == "udp":
            data, peer = udp.recvfrom(100)
            udp.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
        else:
            data = key.fileobj.recv(100)
            if data:
                key.fileobj.sendall(f"{key.data[0]}:{key.data[1]}".encode())
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"""


class Held:
    """Connections held open by a client process in a namespace."""

    def __init__(self, process: subprocess.Popen[str], seen: list[str]) -> None:
        self.process = process
        self.seen = seen

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(10)


def hold(lab: Lab, role: str, address: str, port: int, count: int, proto: str, first_port: int) -> Held:
    arguments = [address, str(port), str(count), proto, str(first_port)]
    process = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns(role), sys.executable, "-c", HOLD, *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"holding {count} {proto} connections to {address}:{port} from {role} failed"
    return Held(process, json.loads(line))


@pytest.fixture
def held() -> Iterator[list[Held]]:
    """Clients to close after the test, also when it fails."""
    clients: list[Held] = []
    try:
        yield clients
    finally:
        for client in clients:
            client.close()
            if client.process.poll() is None:
                client.process.kill()


def quiet_gateway(lab: Lab) -> None:
    """Keep the gateway's loopback out of conntrack; short timeouts (the test's namespace)."""
    rules = (
        "table ip obs_test {\n"
        " chain pre { type filter hook prerouting priority raw; iifname lo notrack; }\n"
        " chain out { type filter hook output priority raw; oifname lo notrack; }\n"
        "}\n"
    )
    lab.exec("gw", "nft", "-f", "-", stdin=rules)
    for name, value in SHORT_TIMEOUTS.items():
        lab.exec("gw", "sysctl", "-q", "-w", f"net.netfilter.{name}={value}")


def peer_echo(lab: Lab, role: str, port: int = ECHO_PORT) -> None:
    lab.spawn(role, sys.executable, "-c", PEER_ECHO, str(port))
    wait_listening(lab, role, "tcp", port)
    wait_listening(lab, role, "udp", port)


def value(daemon: Natgwd, name: str, labels: set[tuple[str, str]] | None = None) -> float | None:
    return samples(daemon).get((name, frozenset(labels or set())))


def wait_value(daemon: Natgwd, name: str, labels: set[tuple[str, str]] | None, expected: float) -> None:
    wait_for(lambda: value(daemon, name, labels) == expected, f"{name}{sorted(labels or ())} == {expected}", 30)


def conntrack_s(lab: Lab) -> dict[str, int]:
    """`conntrack -S` in the gateway, summed over the CPUs."""
    totals: dict[str, int] = {}
    for line in lab.exec("gw", "conntrack", "-S").stdout.splitlines():
        for field in line.split()[1:]:
            name, _, number = field.partition("=")
            if number.isdigit():
                totals[name] = totals.get(name, 0) + int(number)
    return totals


def test_conntrack_pressure_counts_held_connections(lab: Lab, seed_state: dict[str, Any], held: list[Held]) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "vm1", 80)
    daemon = start(lab, seed_state)
    wait_value(daemon, "natgwd_conntrack_entries", None, 0)
    held.append(hold(lab, "ext", DNAT_EIP, 8888, 7, "tcp", 41000))

    wait_value(daemon, "natgwd_conntrack_entries", None, 7)
    assert value(daemon, "natgwd_conntrack_entries_limit") == float(
        lab.exec("gw", "sysctl", "-n", "net.netfilter.nf_conntrack_max").stdout
    )
    kernel = conntrack_s(lab)
    found = samples(daemon)
    for stat, family in (
        ("insert_failed", "natgwd_conntrack_insert_failed_total"),
        ("drop", "natgwd_conntrack_drop_total"),
        ("early_drop", "natgwd_conntrack_early_drop_total"),
        ("clash_resolve", "natgwd_conntrack_clash_resolve_total"),
        ("chaintoolong", "natgwd_conntrack_chaintoolong_total"),
        ("error", "natgwd_conntrack_error_total"),
    ):
        assert found[(family, frozenset())] == kernel[stat], family
    held[0].close()
    wait_value(daemon, "natgwd_conntrack_entries", None, 0)


def test_open_connections_per_rule_and_eip(lab: Lab, seed_state: dict[str, Any], held: list[Held]) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "vm1", 80)
    peer_echo(lab, "ext")
    daemon = start(lab, seed_state)
    dnat = hold(lab, "ext", DNAT_EIP, 8888, 5, "tcp", 42000)
    held.append(dnat)
    snat = hold(lab, "vm1", UPSTREAM, ECHO_PORT, 3, "tcp", 43000)
    held.append(snat)
    fip = hold(lab, "vm2", UPSTREAM, ECHO_PORT, 2, "udp", 44000)
    held.append(fip)
    # What the far ends saw: the client's own address through DNAT, the EIPs otherwise.
    assert dnat.seen == [f"{UPSTREAM}:{42000 + i}" for i in range(5)]
    assert all(seen.startswith(f"{DNAT_EIP}:") for seen in snat.seen)
    assert all(seen.startswith(f"{FIP_EIP}:") for seen in fip.seen)

    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 5)
    found = samples(daemon)
    assert found[("natgwd_rule_open_connections", frozenset(SNAT_ID))] == 3
    assert found[("natgwd_rule_open_connections", frozenset(FIP_ID))] == 2
    assert found[("natgwd_eip_open_connections", frozenset({("eip", DNAT_EIP)}))] == 8
    assert found[("natgwd_eip_open_connections", frozenset({("eip", FIP_EIP)}))] == 2
    # Source ports in use towards one destination: the SNAT streams, the FIP flows.
    assert found[("natgwd_eip_max_ports_per_destination", frozenset({("eip", DNAT_EIP)}))] == 3
    assert found[("natgwd_eip_max_ports_per_destination", frozenset({("eip", FIP_EIP)}))] == 2
    assert found[("natgwd_rule_connections_closed_total", frozenset(DNAT_ID))] == 0

    # A restart counts what is open from one dump, then follows the events again.
    daemon.stop()
    daemon = start(lab, seed_state)
    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 5)
    assert value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}) == 8

    dnat.close()
    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 0)
    wait_value(daemon, "natgwd_rule_connections_closed_total", DNAT_ID, 5)
    assert value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}) == 3
    snat.close()
    fip.close()
    wait_value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}, 0)
    wait_value(daemon, "natgwd_eip_open_connections", {("eip", FIP_EIP)}, 0)
    assert value(daemon, "natgwd_eip_max_ports_per_destination", {("eip", DNAT_EIP)}) == 0
    assert value(daemon, "natgwd_conntrack_events_lost_total") == 0


def translog_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
