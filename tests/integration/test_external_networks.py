"""Several external networks, with real traffic: the dual-stack seed plus a second
external network (net3, upstream "ext2"), EIPs on each, and one remote address that both
upstream routers reach directly, so the router that answers tells the network a
connection took. Each EIP's traffic must leave and come back through its own network's
interface, in both directions and both families, and never through the other's."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from natgwd.lab.topology import DUAL_STACK_STATE, REMOTE_HOST, REMOTE_HOST6, Lab
from tests.integration.helpers import events_named, start, tcp_get, wait_for

EIP2 = {4: "10.115.55.201", 6: "fd00:115::201"}  # my-eip2 (network "external"): fip01 <-> vm2
EIP3 = {4: "10.116.0.200", 6: "fd00:116::200"}  # eip3 (ext2): SNAT of vm3, DNAT 8888 -> vm1:80
EIP4 = {4: "10.116.0.201", 6: "fd00:116::201"}  # eip4 (ext2): FIP <-> vm1
EIP1 = {4: "10.115.55.200", 6: "fd00:115::200"}  # my-eip (external): DNAT 8888 -> vm1:80
REMOTE = {4: REMOTE_HOST, 6: REMOTE_HOST6}
VM1 = {4: "172.20.10.2", 6: "fd00:10::2"}
VM3 = {4: "172.20.10.4", 6: "fd00:10::4"}


def two_networks_state() -> dict[str, Any]:
    state = copy.deepcopy(DUAL_STACK_STATE)
    state["externals"] = [
        {
            "name": "ext2",
            "interface": "net3",
            "addresses": ["10.116.0.1/24", "fd00:116::1/64"],
            "gateway": "10.116.0.254",
            "gateway6": "fd00:116::fe",
        }
    ]
    # eip3 is bound to ext2 by its subnet, eip4 by name.
    state["eips"] += [
        {"name": "eip3", "v4ip": EIP3[4], "v6ip": EIP3[6]},
        {"name": "eip4", "v4ip": EIP4[4], "v6ip": EIP4[6], "externalSubnet": "ext2"},
    ]
    for family, bits in ((4, 32), (6, 128)):
        state["snat"].append({"name": f"vm3-out{family}", "eip": "eip3", "internalCIDR": f"{VM3[family]}/{bits}"})
        state["dnat"].append(
            {
                "name": f"dnat3-{family}",
                "eip": "eip3",
                "protocol": "tcp",
                "externalPort": 8888,
                "internalIp": VM1[family],
                "internalPort": 80,
            }
        )
        state["fip"].append({"name": f"fip4-{family}", "eip": "eip4", "internalIp": VM1[family]})
    return state


def answered(answer: str) -> tuple[str, str]:
    """(client address the server saw, the server's tag) of a tagged lab server answer."""
    client, _, tag = answer.partition(" @")
    host, _, port = client.rpartition(":")
    assert port.isdigit() and tag, f"not a tagged ip:port answer: {answer!r}"
    return host, tag


@contextmanager
def capture(lab: Lab, interface: str, expression: str) -> Iterator[list[str]]:
    """Packets on a gateway interface matching a tcpdump expression, as tcpdump prints
    them, once the block is done."""
    log = lab.workdir / f"tcpdump-{interface}-{time.monotonic_ns()}.log"
    process = lab.spawn("gw", "tcpdump", "-i", interface, "-n", "-l", "--immediate-mode", expression, log_path=log)
    wait_for(lambda: log.exists() and "listening on" in log.read_text(), f"tcpdump listening on {interface}")
    packets: list[str] = []
    try:
        yield packets
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        lines = log.read_text().splitlines()
        packets.extend(line for line in lines if " IP " in line or " IP6 " in line)


def test_each_eip_uses_its_own_external_network(two_externals_lab: Lab) -> None:
    """Guards against an EIP's traffic leaving through another network's gateway (the
    routing decision is taken on the VM's address, before SNAT), against replies of
    inbound DNAT and FIP connections going back through the main default route, and
    against SNAT or FIP-out not applying on a second external interface."""
    lab = two_externals_lab
    daemon = start(lab, two_networks_state())
    lab.serve("ext", tcp=[80], tag="ext")
    lab.serve("ext2", tcp=[80], tag="ext2")
    lab.serve("vm1", tcp=[80])
    ext2_traffic = "net 10.116.0.0/24 or net fd00:116::/64"
    ext_traffic = "net 10.115.48.0/21 or net fd00:115::/64"
    with (
        capture(lab, "net2", ext2_traffic) as leaked_to_net2,
        capture(lab, "net3", ext_traffic) as leaked_to_net3,
        capture(lab, "net3", ext2_traffic) as on_net3,
    ):
        for family in (4, 6):
            remote = REMOTE[family]
            # Out: SNAT (vm3, eip3) and FIP (vm1, eip4) through ext2; vm2's FIP through ext.
            assert answered(lab.http_get("vm3", remote, 80)) == (EIP3[family], "ext2")
            assert answered(lab.http_get("vm1", remote, 80)) == (EIP4[family], "ext2")
            assert answered(lab.http_get("vm2", remote, 80)) == (EIP2[family], "ext")
            # In: the client is the remote address each upstream router also has, so an
            # answer that took the wrong network ends at the other router (a reset).
            assert answered_by_vm(tcp_get(lab, "ext2", EIP3[family], 8888, source=remote)) == remote
            assert answered_by_vm(tcp_get(lab, "ext2", EIP4[family], 80, source=remote)) == remote
            assert answered_by_vm(tcp_get(lab, "ext", EIP1[family], 8888, source=remote)) == remote
    assert leaked_to_net2 == [] and leaked_to_net3 == []
    seen = " ".join(on_net3)
    for address in (*EIP3.values(), *EIP4.values()):
        assert f"{address}." in seen, f"no packet of {address} on net3"

    # A restarted natgwd finds its rules, tables and steer chain as they should be.
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    daemon = start(lab, two_networks_state())
    (applied,) = events_named(daemon, "desired state applied")
    assert (applied["nft_operations"], applied["link_changes"]) == (0, 0), applied
    assert answered(lab.http_get("vm3", REMOTE[4], 80)) == (EIP3[4], "ext2")

    # Decommissioning removes the per-network tables and the rules with everything else.
    assert "lookup 4241" in lab.exec("gw", "ip", "rule").stdout
    assert daemon.stop() == 0
    lab.exec("gw", sys.executable, "-m", "natgwd", "cleanup", "--applied-state", str(lab.applied_state_path))
    for family in ("-4", "-6"):
        assert "proto 249" not in lab.exec("gw", "ip", family, "rule").stdout
        for table in ("4240", "4241"):
            assert lab.exec("gw", "ip", family, "route", "show", "table", table).stdout == ""


def answered_by_vm(answer: str) -> str:
    """The client address an untagged lab server (a VM) saw; '' for no answer."""
    assert answer, "no answer"
    host, _, port = answer.rpartition(":")
    assert port.isdigit(), answer
    return host
