"""SNAT with a pool of EIPs, with real connections: each internal address keeps one EIP for
all its connections, the pool's EIPs all carry traffic, connections are counted per EIP,
and (slow) a pool of two carries more connections to one destination than one EIP's
64,512 ports, while the exhausted EIP's failures are counted for it alone. Draining an
EIP: its open connections keep exchanging data, new ones take the pool's other EIP, or
are refused when none is left, and a gauge counts down what remains."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from natgwd.lab.topology import Lab
from tests.integration.helpers import DNAT_EIP, UPSTREAM, apply, start
from tests.integration.test_observability import (
    ECHO_PORT,
    NAT_PORTS,
    OCCUPY,
    peer_echo,
    quiet_gateway,
    rule_mark,
    value,
    wait_value,
)

POOL_EIP = "10.115.55.202"
OTHER_EIP = "10.115.55.203"
SOURCES = [f"172.20.10.{host}" for host in range(20, 32)]  # vm1's extra addresses

# Opens `count` connections (TCP, or UDP flows) from each source address to address:port,
# exchanges one message on each, prints {source: [what the far end saw, ...]} and holds
# them until stdin closes.
HOLD_FROM = """
import json, socket, sys
address, port, count, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
held, seen = [], {}
for source in sys.argv[5:]:
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.bind((source, 0))
        s.settimeout(10)
        if proto == "tcp":
            s.connect((address, port))
            s.sendall(b"hello")
        else:
            s.sendto(b"hello", (address, port))
        seen.setdefault(source, []).append(s.recv(100).decode())
        held.append(s)
print(json.dumps(seen), flush=True)
sys.stdin.read()
"""


# One TCP stream from a source address: sends each line of stdin, prints the answer (what
# the far end saw: "ip:port").
STREAM = """
import socket, sys
source, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((address, port), timeout=10, source_address=(source, 0))
for line in sys.stdin:
    s.sendall(line.strip().encode())
    print(s.recv(100).decode(), flush=True)
"""

# Exits 0 when a TCP connection from the source completes within 3 seconds, else 1.
CONNECTS = """
import socket, sys
try:
    socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=3, source_address=(sys.argv[1], 0)).close()
except OSError:
    sys.exit(1)
"""


class Clients:
    """Connections held open from vm1; closed after the test, also when it fails."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.processes: list[subprocess.Popen[str]] = []

    def hold(self, sources: list[str], count: int, proto: str = "tcp") -> dict[str, list[str]]:
        arguments = [UPSTREAM, str(ECHO_PORT), str(count), proto, *sources]
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns("vm1"), sys.executable, "-c", HOLD_FROM, *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, f"holding {proto} connections from {sources} failed"
        seen: dict[str, list[str]] = json.loads(line)
        return seen

    def stream(self, source: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns("vm1"), sys.executable, "-c", STREAM, source, UPSTREAM, str(ECHO_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                assert process.stdin is not None
                process.stdin.close()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def clients(lab: Lab) -> Iterator[Clients]:
    held = Clients(lab)
    try:
        yield held
    finally:
        held.close()


def pool_state(seed_state: dict[str, Any]) -> dict[str, Any]:
    """The seed with its SNAT rule on a pool: my-eip (DNAT_EIP) and pool-b (POOL_EIP)."""
    seed_state["eips"].append({"name": "pool-b", "v4ip": POOL_EIP})
    seed_state["snat"][0] = {"name": "my-snat", "eips": ["my-eip", "pool-b"], "internalCIDR": "172.20.10.0/24"}
    return seed_state


def add_sources(lab: Lab) -> None:
    for source in SOURCES:
        lab.exec("vm1", "ip", "addr", "add", f"{source}/24", "dev", "eth0")


def eip_of(seen: list[str]) -> str:
    """The one EIP a source's connections all left with."""
    eips = {answer.rsplit(":", 1)[0] for answer in seen}
    assert len(eips) == 1, f"one source's connections left with several EIPs: {seen}"
    return eips.pop()


def member(eip: str) -> set[tuple[str, str]]:
    return {("kind", "snat"), ("name", "my-snat"), ("eip", eip)}


def test_each_address_keeps_one_eip_of_the_pool_and_both_carry_connections(
    lab: Lab, seed_state: dict[str, Any], clients: Clients
) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "ext")
    add_sources(lab)
    daemon = start(lab, pool_state(seed_state))
    seen = clients.hold(SOURCES, 4)
    chosen = {source: eip_of(answers) for source, answers in seen.items()}
    # The hash's seed is fixed: these twelve addresses spread over both EIPs, every run.
    by_eip = {eip: [s for s, e in chosen.items() if e == eip] for eip in (DNAT_EIP, POOL_EIP)}
    assert set(chosen.values()) == {DNAT_EIP, POOL_EIP}, chosen
    for eip, sources in by_eip.items():
        wait_value(daemon, "natgwd_rule_open_connections", member(eip), 4 * len(sources))
        assert value(daemon, "natgwd_eip_open_connections", {("eip", eip)}) == 4 * len(sources)
        assert value(daemon, "natgwd_eip_max_ports_per_destination", {("eip", eip)}) == 4 * len(sources)

    # More connections later keep each address's EIP.
    again = clients.hold(SOURCES, 2)
    assert {source: eip_of(answers) for source, answers in again.items()} == chosen


@pytest.mark.slow
def test_a_pool_of_two_carries_more_connections_to_one_destination_than_one_eips_ports(
    lab: Lab, seed_state: dict[str, Any], clients: Clients
) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "ext")
    add_sources(lab)
    state = pool_state(seed_state)
    daemon = start(lab, state)
    chosen = {source: eip_of(answers) for source, answers in clients.hold(SOURCES, 1, "udp").items()}
    on_a = next(s for s, e in chosen.items() if e == DNAT_EIP)
    on_b = next(s for s, e in chosen.items() if e == POOL_EIP)
    mark = rule_mark(lab, f"snat/my-snat/{DNAT_EIP}")
    clients.close()
    wait_value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}, 0, closing=True)
    daemon.stop()
    # While natgwd is down, every port of my-eip towards ext:7777/udp gets taken, by entries
    # carrying its pool member's mark: the restarted daemon finds them in its dump.
    lab.exec("gw", sys.executable, "-c", OCCUPY, DNAT_EIP, UPSTREAM, str(ECHO_PORT), str(mark), *map(str, NAT_PORTS))
    ports = NAT_PORTS[1] - NAT_PORTS[0] + 1
    daemon = lab.start_natgwd(state)
    daemon.wait_ready(timeout=180)
    daemon.wait_applied(timeout=180)
    wait_value(daemon, "natgwd_eip_max_ports_per_destination", {("eip", DNAT_EIP)}, ports)

    # The address on the pool's other EIP still connects: 64,512 + 20 flows to one
    # destination address and port.
    flows = clients.hold([on_b], 20, "udp")
    assert eip_of(flows[on_b]) == POOL_EIP
    wait_value(daemon, "natgwd_eip_max_ports_per_destination", {("eip", POOL_EIP)}, 20)
    assert value(daemon, "natgwd_rule_open_connections", member(DNAT_EIP)) == ports
    assert value(daemon, "natgwd_rule_open_connections", member(POOL_EIP)) == 20

    # The address on the exhausted EIP keeps it, and fails: counted for that EIP alone.
    for source_port in range(45000, 45005):
        lab.exec(
            "vm1",
            sys.executable,
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"s.bind((sys.argv[2],{source_port})); s.sendto(b'x',(sys.argv[1],{ECHO_PORT}))",
            UPSTREAM,
            on_a,
        )
    wait_value(daemon, "natgwd_eip_port_allocation_failures_total", {("eip", DNAT_EIP)}, 5)
    assert value(daemon, "natgwd_eip_port_allocation_failures_total", {("eip", POOL_EIP)}) == 0


def exchange(stream: subprocess.Popen[str], text: str) -> str:
    """Send a line on a held stream; what the far end saw of it."""
    assert stream.stdin is not None and stream.stdout is not None
    stream.stdin.write(text + "\n")
    stream.stdin.flush()
    answer = stream.stdout.readline().strip()
    assert answer, "the held stream got no answer"
    return answer


def connects(lab: Lab, source: str) -> bool:
    result = lab.exec("vm1", sys.executable, "-c", CONNECTS, source, UPSTREAM, str(ECHO_PORT), check=False)
    return result.returncode == 0


def draining_state(seed_state: dict[str, Any], *drained: str) -> dict[str, Any]:
    """The seed with its SNAT rule on a pool of two EIPs of its own, `drained` draining."""
    state = copy.deepcopy(seed_state)
    state["eips"] += [{"name": "pool-a", "v4ip": POOL_EIP}, {"name": "pool-b", "v4ip": OTHER_EIP}]
    for eip in state["eips"]:
        if eip["name"] in drained:
            eip["draining"] = True
    state["snat"][0] = {"name": "my-snat", "eips": ["pool-a", "pool-b"], "internalCIDR": "172.20.10.0/24"}
    return state


def test_a_draining_eip_keeps_its_open_flows_and_gives_new_ones_to_the_pool(
    lab: Lab, seed_state: dict[str, Any], clients: Clients
) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "ext")
    add_sources(lab)
    daemon = start(lab, draining_state(seed_state))
    chosen = {source: eip_of(answers) for source, answers in clients.hold(SOURCES, 1).items()}
    on_a = next(source for source, eip in chosen.items() if eip == POOL_EIP)
    clients.close()
    stream = clients.stream(on_a)
    before = exchange(stream, "one")
    assert before.startswith(f"{POOL_EIP}:")
    wait_value(daemon, "natgwd_eip_open_connections", {("eip", POOL_EIP)}, 1, closing=True)
    assert value(daemon, "natgwd_eip_draining_open_connections", {("eip", POOL_EIP)}) is None

    apply(daemon, draining_state(seed_state, "pool-a"))
    # The open flow goes on with its EIP and port; the address's new connections take the
    # other EIP; the gauge counts the one flow left on the draining EIP.
    assert exchange(stream, "two") == before
    assert eip_of(clients.hold([on_a], 3)[on_a]) == OTHER_EIP
    assert exchange(stream, "three") == before
    wait_value(daemon, "natgwd_eip_draining_open_connections", {("eip", POOL_EIP)}, 1)
    assert value(daemon, "natgwd_eip_draining_open_connections", {("eip", OTHER_EIP)}) is None

    # With both draining nothing is left to take new connections: refused; the open
    # flows still go on.
    apply(daemon, draining_state(seed_state, "pool-a", "pool-b"))
    assert not connects(lab, on_a)
    assert exchange(stream, "four") == before
    wait_value(daemon, "natgwd_eip_draining_open_connections", {("eip", OTHER_EIP)}, 3)

    # The last flow on the draining EIP closes: the gauge says it can be retired.
    assert stream.stdin is not None
    stream.stdin.close()
    stream.wait(10)
    wait_value(daemon, "natgwd_eip_draining_open_connections", {("eip", POOL_EIP)}, 0, closing=True)
    # Back in service, the address gets its own EIP again.
    apply(daemon, draining_state(seed_state))
    assert eip_of(clients.hold([on_a], 1)[on_a]) == POOL_EIP
