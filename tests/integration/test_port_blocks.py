"""Port blocks per VM with real traffic: four VMs, each in a namespace of its own, behind
one EIP whose SNAT rule gives each internal address a block of ports. What the far end
sees, `natgwd whois` before and after a change of the blocks and across a restart, and a
VM's full block counted for that VM alone."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE, Lab
from tests.conftest import _integration_unavailable
from tests.integration.helpers import DNAT_EIP, UPSTREAM, apply, start, wait_for
from tests.integration.test_observability import (
    ECHO_PORT,
    SNAT_ID,
    Held,
    hold,
    peer_echo,
    value,
    wait_value,
)

VMS = ("172.20.10.2", "172.20.10.3", "172.20.10.4", "172.20.10.5")
CIDR = "172.20.10.0/29"  # .0 to .7: VM .2 is the third address


def state(size: int, first: int) -> dict[str, Any]:
    document = copy.deepcopy(SEED_STATE)
    document["fip"] = []  # a FIP would take its VM out of the blocks
    document["snat"][0]["internalCIDR"] = CIDR
    document["snat"][0]["portBlock"] = {"size": size, "firstPort": first}
    return document


def block(vm: str, size: int, first: int) -> range:
    index = int(vm.rsplit(".", 1)[1])  # in 172.20.10.0/29
    return range(first + index * size, first + (index + 1) * size)


@pytest.fixture
def four_vms() -> Iterator[Lab]:
    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(vms=VMS) as built:
        yield built


def whois(lab: Lab, port: int, at: float) -> tuple[int, str]:
    history = str(lab.workdir / "port-blocks.json")
    found = subprocess.run(
        [sys.executable, "-m", "natgwd", "whois", f"{DNAT_EIP}:{port}", "--at", str(at), "--history", history],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return found.returncode, found.stdout


def ports_seen(client: Held) -> list[int]:
    assert all(seen.startswith(f"{DNAT_EIP}:") for seen in client.seen), client.seen
    return [int(seen.rsplit(":", 1)[1]) for seen in client.seen]


def test_each_vm_leaves_from_its_block_and_whois_follows_the_changes(four_vms: Lab, held: list[Held]) -> None:
    lab = four_vms
    peer_echo(lab, "ext")
    daemon = start(lab, state(100, 20000))
    roles = dict(zip(VMS, lab.vm_roles(), strict=True))
    seen: dict[str, list[int]] = {}
    for vm, role in roles.items():
        tcp = hold(lab, role, UPSTREAM, ECHO_PORT, 3, "tcp", 41000)
        held.append(tcp)
        udp = hold(lab, role, UPSTREAM, ECHO_PORT, 2, "udp", 42000)
        held.append(udp)
        seen[vm] = ports_seen(tcp) + ports_seen(udp)
        assert all(port in block(vm, 100, 20000) for port in seen[vm]), (vm, seen[vm])
    # ICMP has no port: it leaves through the SNAT maps with the EIP (the far end has no
    # route to the VPC, so an answer proves the translation).
    lab.exec("vm1", "ping", "-c", "1", "-W", "5", UPSTREAM)
    before = time.time()
    for vm, ports in seen.items():
        code, answer = whois(lab, ports[-1], before)
        assert code == 0 and f": {vm} (snat rule my-snat" in answer, answer
    for client in held:
        client.close()
    # A flow that lives across the change: its entry leaves the new block, so it is
    # deleted and the flow's next datagram takes a port of the new block.
    live = hold(lab, "vm1", UPSTREAM, ECHO_PORT, 1, "udp", 44000, keep_alive=True)
    held.append(live)
    assert ports_seen(live)[0] in block(VMS[0], 100, 20000)

    apply(daemon, state(50, 30000))
    after = time.time()
    wait_for(lambda: _translated_port(lab, 44000) in block(VMS[0], 50, 30000), "the live flow in the new block")
    for vm, role in roles.items():
        tcp = hold(lab, role, UPSTREAM, ECHO_PORT, 2, "tcp", 43000)
        held.append(tcp)
        assert all(port in block(vm, 50, 30000) for port in ports_seen(tcp)), (vm, tcp.seen)
    # Port 30250 was nobody's before the change and is 172.20.10.5's since; 20250 the reverse.
    assert whois(lab, 30250, before)[0] == 1
    assert whois(lab, 30250, after) == (
        0,
        f"{DNAT_EIP}:30250 at {_iso(after)}: 172.20.10.5 (snat rule my-snat, "
        f"block 30250-30299, layout applied at {_applied_at(lab, 1)})\n",
    )
    assert ": 172.20.10.2 " in whois(lab, 20250, before)[1]
    assert whois(lab, 20250, after)[0] == 1
    # Before the history: unknown.
    code, answer = whois(lab, 20250, before - 3600)
    assert code == 2 and "unknown" in answer

    # A restart keeps the history and adds nothing for the same layout.
    daemon.stop()
    daemon = start(lab, state(50, 30000))
    assert ": 172.20.10.2 " in whois(lab, 20250, before)[1]
    assert _applied_at(lab, 2) is None
    daemon.stop()


def _translated_port(lab: Lab, source_port: int) -> int | None:
    """The EIP's port of the gateway's conntrack entry of a UDP flow from vm1's port."""
    listed = lab.exec("gw", "conntrack", "-L", "-p", "udp", "--orig-src", VMS[0], "--orig-port-src", str(source_port))
    for line in listed.stdout.splitlines():
        ports = re.findall(r"dport=(\d+)", line)  # the original tuple's, then the reply's
        if len(ports) == 2:
            return int(ports[1])
    return None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def _applied_at(lab: Lab, index: int) -> str | None:
    """The time of the index-th recorded layout (None: there is none)."""
    from natgwd.io.portblock_history import read

    entries = read(lab.workdir / "port-blocks.json")
    return entries[index].applied_at.isoformat() if index < len(entries) else None


def test_a_full_block_is_counted_for_its_vm(four_vms: Lab, held: list[Held]) -> None:
    lab = four_vms
    peer_echo(lab, "ext")
    daemon = start(lab, state(10, 20000))
    vm1, vm2 = VMS[0], VMS[1]
    failures = "natgwd_port_block_allocation_failures_total"
    labels = {("name", "my-snat"), ("eip", DNAT_EIP)}
    # vm1 holds every port of its block towards the echo server (UDP, kept alive).
    full = hold(lab, "vm1", UPSTREAM, ECHO_PORT, 10, "udp", 45000, keep_alive=True)
    held.append(full)
    assert sorted(ports_seen(full)) == list(block(vm1, 10, 20000))
    # Counted from conntrack events: the watcher follows them once its dump is in.
    wait_value(daemon, "natgwd_rule_open_connections", SNAT_ID, 10)

    # Three more flows from vm1 there: no port left for any of them.
    for source_port in range(45100, 45103):
        lab.exec(
            "vm1",
            sys.executable,
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"s.bind(('0.0.0.0',{source_port})); s.sendto(b'x',(sys.argv[1],{ECHO_PORT}))",
            UPSTREAM,
        )
    wait_value(daemon, failures, labels | {("address", vm1)}, 3)
    assert value(daemon, "natgwd_eip_port_allocation_failures_total", {("eip", DNAT_EIP)}) == 3
    # vm2's block is its own: its connection there goes through, and nothing is counted for it.
    other = hold(lab, "vm2", UPSTREAM, ECHO_PORT, 1, "udp", 45100)
    held.append(other)
    assert ports_seen(other)[0] in block(vm2, 10, 20000)
    assert value(daemon, failures, labels | {("address", vm2)}) == 0
    assert value(daemon, failures, labels | {("address", vm1)}) == 3
    daemon.stop()
