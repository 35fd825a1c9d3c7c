"""kube-ovn-controller's replicas mode, unchanged: two replicas started as its Deployment
starts them (the image's `sleep infinity`, HOSTNAME vpc-nat-gw-<gateway>-<hash>-<5>,
GATEWAY_V4, no ConfigMap and no scaleOut section), each receiving the controller's calls,
find each other by a hello on the LAN and scale out: each EIP held by one member, flows
that the router's hash sends to the other member handed over, none failing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from natgwd.ha.autoscale import GROUPS, priorities
from natgwd.ha.hello import DISCOVERY_PORT, HELLO_GROUP, deployment_scope
from natgwd.lab.topology import EXTERNAL_HOST, EXTERNAL_PREFIX, Natgwd
from tests.integration.ha_lab import start_flow
from tests.integration.helpers import METRICS_PORT, wait_for
from tests.integration.scale_lab import EIPS, LAN_ROUTER, VMS, ScaleLab, member_address
from tests.integration.test_kubeovn_shim import Gateway

LAUNCHER = Path(__file__).resolve().parents[2] / "image" / "sleep-infinity.sh"
# The Deployment's pods: one ReplicaSet (pod-template-hash), a random suffix each. For gw27
# the rendezvous priorities give E0's group to m1, and the group E1's name alone hashes to
# to m0: groups that split E0 and E1 (tied by a DNAT backend) would break the share DNAT.
SCOPE = "vpc-nat-gw-gw27"
PODS = (f"{SCOPE}-7d4b9c8f6d-x2b5k", f"{SCOPE}-7d4b9c8f6d-q9wzt")
E0, E1, E2, E3 = (EIPS[name] for name in ("e0", "e1", "e2", "e3"))
VM1, VM2, VM3 = VMS
# What the controller execs on every replica (the strings of kubeovn/kube-ovn 1533681d, as
# tests/integration/test_kubeovn_shim.py replays them), with this lab's addresses. The
# share DNAT puts vm1:80, the DNAT's backend, behind a second EIP: the two EIPs must be in
# one group, or the call would be refused (docs/scaling-out.md).
CALLS: tuple[tuple[str, ...], ...] = (
    ("init", "net1,net2"),
    ("get-iptables-version",),
    ("subnet-route-add", f"10.55.0.0/16,{LAN_ROUTER}"),
    ("snat-add", f"{E0},10.55.0.0/24,--random-fully"),
    ("snat-add", f"{E2},{VM1},--random-fully"),
    ("dnat-add", f"{E0},8888,tcp,{VM1},80"),
    ("floating-ip-add", f"{E3},{VM2}"),
    ("nft-dnat-map-add", f"{E1},9999,tcp,{VM1}:80@{VM3}:80"),
    ("eip-add", f"{E0}/{EXTERNAL_PREFIX}"),
    ("eip-add", f"{E1}/{EXTERNAL_PREFIX}"),
    ("eip-add", f"{E2}/{EXTERNAL_PREFIX}"),
    ("eip-add", f"{E3}/{EXTERNAL_PREFIX}"),
)
# Sent from the router's LAN address to the hello group (lab namespaces only).
FOREIGN_HELLOS = f"""
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("{LAN_ROUTER}"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
other = {{"natgwd": 1, "scope": "vpc-nat-gw-other", "address": "{LAN_ROUTER}"}}
for data in (json.dumps(other).encode(), b"\\xff" * 10, b"x" * 400):
    s.sendto(data, ("{HELLO_GROUP}", {DISCOVERY_PORT}))
"""
KINDS = {
    "snat-tcp": ("vm3", "tcp", EXTERNAL_HOST, 9000),
    "snat-udp": ("vm3", "udp", EXTERNAL_HOST, 9001),
    "snat-host": ("vm1", "tcp", EXTERNAL_HOST, 9000),
    "dnat": ("ext", "tcp", E0, 8888),
    "share-dnat": ("ext", "tcp", E1, 9999),
    "fip-in": ("ext", "tcp", E3, 80),
    "fip-out": ("vm2", "tcp", EXTERNAL_HOST, 9000),
}


@pytest.fixture
def lab() -> Iterator[ScaleLab]:
    with ScaleLab(members=2) as built:
        yield built


def start_replica(lab: ScaleLab, index: int) -> Gateway:
    """The pod as the CNI and the kubelet leave it (addresses, routes; the container's
    command `sleep infinity`, env HOSTNAME and GATEWAY_V4/GATEWAY_V6), and natgwd started
    by the image's launcher. NATGWD_* only put its files in the test's directory."""
    role = f"m{index}"
    for command in (
        ("ip", "addr", "add", f"10.115.48.{1 + index}/{EXTERNAL_PREFIX}", "dev", "net2"),
        ("ip", "link", "set", "net2", "up"),
        ("ip", "route", "add", "10.55.0.0/16", "via", LAN_ROUTER, "dev", "net1"),
        ("ip", "route", "add", "default", "via", EXTERNAL_HOST, "dev", "net2"),
    ):
        lab.exec(role, *command)
    directory = lab.workdir / role
    directory.mkdir(exist_ok=True)
    files = {
        "NATGWD_STATE": directory / "state.json",
        "NATGWD_APPLIED_STATE": directory / "applied.json",
        "NATGWD_EDIT_TOKEN": directory / "edit.token",
        "NATGWD_HA_RUN_DIR": directory / "run",
        "NATGWD_PROGRAM": directory / "natgwd",
    }
    # The image's /opt/natgwd/bin/natgwd: this Python's natgwd.
    files["NATGWD_PROGRAM"].write_text(f'#!/bin/sh\nexec {sys.executable} -m natgwd "$@"\n')
    files["NATGWD_PROGRAM"].chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOSTNAME": PODS[index], "GATEWAY_V4": EXTERNAL_HOST, "GATEWAY_V6": ""}
    env |= {name: str(path) for name, path in files.items()} | {"PYTHONUNBUFFERED": "1"}
    log_path = directory / "natgwd.log"
    process = lab.spawn(role, "sh", str(LAUNCHER), "infinity", log_path=log_path, env=env)
    daemon = Natgwd(lab, files["NATGWD_STATE"], process, log_path, METRICS_PORT, role)
    lab.daemons[role] = daemon
    return Gateway(lab, daemon, files["NATGWD_STATE"], role=role, applied_state=files["NATGWD_APPLIED_STATE"])


def first_choices() -> dict[str, str]:
    """Each group's owner once the two members settled: the first by rendezvous hashing.
    (Members started a moment apart may own more for preemptDelay: the first one's
    keepalived hears no advert of the other one's yet.)"""
    members = [IPv4Address(member_address(i)) for i in range(2)]
    ranks = {group: priorities(SCOPE, group, members) for group in range(GROUPS)}
    return {f"g{group}": str(members[rank.index(max(rank))]) for group, rank in ranks.items()}


def settled(lab: ScaleLab) -> dict[str, list[str]] | None:
    """Each member's EIPs once both say the list came from discovery, list both, and every
    group is owned by its first choice as both see it."""
    details = {role: lab.scale_detail(role) for role in lab.daemons}
    members = sorted(member_address(i) for i in range(2))
    if any(d.get("members_from") != "discovery" or d.get("members") != members for d in details.values()):
        return None
    expected = first_choices()
    if any(d.get("owners") != expected for d in details.values()):
        return None
    owned = {role: d.get("owned_eips", []) for role, d in details.items()}
    every = sorted(name for names in owned.values() for name in names)
    names = sorted(f"eip-{address.replace('.', '-')}" for address in EIPS.values())
    return owned if every == names else None


def eips_held(lab: ScaleLab, role: str) -> set[str]:
    shown = json.loads(lab.exec(role, "ip", "-j", "-4", "addr", "show", "net2").stdout)
    return {a["local"] for link in shown for a in link["addr_info"]} & set(EIPS.values())


def group_eips(lab: ScaleLab) -> dict[str, list[str]]:
    """Each group's EIPs, as `natgwd status` in m0 lists them."""
    return {g["group"]: g["eips"] for g in status(lab)["groups"]}


def status(lab: ScaleLab) -> dict[str, Any]:
    result = lab.exec(
        "m0",
        sys.executable,
        *("-m", "natgwd", "status", "--json"),
        *("--applied-state", str(lab.workdir / "m0" / "applied.json")),
        *("--ha-run-dir", str(lab.workdir / "m0" / "run")),
    )
    return dict(json.loads(result.stdout))


def handed_over(daemon: Natgwd) -> dict[str, float]:
    prefix = "natgwd_scale_handed_over_packets_total{"
    return {k.removeprefix(prefix).rstrip("}"): v for k, v in daemon.metrics().items() if k.startswith(prefix)}


def test_replicas_started_as_the_controller_starts_them_scale_out_over_the_members_they_discover(
    lab: ScaleLab,
) -> None:
    """Prevents: the controller's replicas each holding every EIP and translating what the
    hash brings (short exchanges reset), a replica refusing a call because its automatic
    groups split EIPs that share a DNAT backend, and replicas that never find each other."""
    assert deployment_scope(PODS[0]) == deployment_scope(PODS[1]) == SCOPE
    gateways = [start_replica(lab, index) for index in range(2)]
    # Every call on every replica (createEipInPod loops over the pods), in order on each.
    with ThreadPoolExecutor(len(gateways)) as pool:
        list(pool.map(lambda gateway: [gateway.ok(*call) for call in CALLS], gateways))
    owned = wait_for(lambda: settled(lab), "both replicas to discover each other and own every EIP once", timeout=40)
    groups = {g: owners for g, owners in group_eips(lab).items() if owners}
    assert sorted(n for names in groups.values() for n in names) == sorted(n for v in owned.values() for n in v)
    # EIPs behind one backend (vm1 tcp/80: E0's DNAT and E1's share DNAT) share an owner.
    (holder,) = (role for role, names in owned.items() if "eip-10-115-55-200" in names)
    assert "eip-10-115-55-201" in owned[holder], owned
    # Each EIP is on exactly one member's external interface, the one that owns it.
    held = {role: eips_held(lab, role) for role in lab.daemons}
    assert held == {role: {n.removeprefix("eip-").replace("-", ".") for n in owned[role]} for role in owned}, held

    lab.serve("vm1", tcp=[80])  # the DNAT target and a share backend
    lab.serve("vm2", tcp=[80])  # the FIP's VM
    lab.serve("vm3", tcp=[80])  # the other share backend
    lab.serve("ext", tcp=[9000], udp=[9001])
    for kind, (role, proto, address, port) in KINDS.items():
        outcome = lab.exchanges(role, proto, address, port, 50)
        assert outcome == {"ok": 50, "failures": {}}, (kind, outcome)
    answers = {role: lab.http_get(role, EXTERNAL_HOST, 9000).split(":")[0] for role in ("vm1", "vm2", "vm3")}
    assert answers == {"vm1": E2, "vm2": E3, "vm3": E0}
    # Every group with EIPs: the router's hash sent its non-owner packets of it, handed over.
    for group, names in groups.items():
        (non_owner,) = (role for role in owned if not set(names) & set(owned[role]))
        assert handed_over(lab.daemons[non_owner]).get(f'group="{group}"', 0) > 0, (group, non_owner)
    # Another gateway's hello on the same LAN, a malformed and an oversized one: ignored,
    # counted, nobody joins.
    lab.exec("rtr", sys.executable, "-c", FOREIGN_HELLOS)
    refused = 'natgwd_scale_hellos_refused_total{{reason="{}"}}'
    for role, daemon in lab.daemons.items():
        wanted = {refused.format(reason): 1.0 for reason in ("foreign_scope", "malformed", "oversized")}
        wait_for(lambda d=daemon, w=wanted: all(d.metrics().get(k) == v for k, v in w.items()), f"{role} to refuse")
        samples = daemon.metrics()
        assert samples["natgwd_scale_members_discovered"] == 2
        assert samples["natgwd_scale_hellos_received_total"] > 0
    assert settled(lab) == owned
    # `natgwd status` names where its member list came from.
    shown = status(lab)
    assert shown["members"] == {
        "from": "discovery",
        "scope": SCOPE,
        "addresses": [member_address(0), member_address(1)],
    }
    owners = {group["owner"] for group in shown["groups"] if group["eips"]}
    assert owners <= {"this member", member_address(1)}, shown["groups"]


# Long-lived flows, one of each kind: E0 and E1's (SNAT of vm3, DNAT, share DNAT) move to
# the replica that joins (it ranks first for their group), E2 and E3's stay.
LONG_LIVED = {kind: KINDS[kind] for kind in ("snat-tcp", "snat-udp", "dnat", "share-dnat", "fip-in", "fip-out")}


@pytest.mark.slow
def test_a_lone_replica_owns_every_eip_and_a_replica_that_joins_takes_its_share_without_a_loss(
    lab: ScaleLab,
) -> None:
    """Prevents: a lone replica that owns nothing (waiting for members that never come),
    and a replica that joins taking its groups before it holds their connections (the
    flows through them reset) or reshuffling the groups of the others."""
    every = sorted(f"eip-{address.replace('.', '-')}" for address in EIPS.values())
    lab.set_next_hops([0])  # OVN routes only to the replicas whose BFD session is up
    first = start_replica(lab, 0)
    for call in CALLS:
        first.ok(*call)

    def alone() -> bool:
        detail = lab.scale_detail("m0")
        return detail.get("members") == [member_address(0)] and detail.get("owned_eips") == every

    wait_for(alone, "the lone replica to own every EIP", timeout=40)
    assert eips_held(lab, "m0") == set(EIPS.values())
    lab.serve("vm1", tcp=[80])
    lab.serve("vm2", tcp=[80])
    lab.serve("vm3", tcp=[80])
    lab.serve("ext", tcp=[9000], udp=[9001])
    flows = {
        kind: start_flow(lab, role, proto, address, port, kind, period=0.05)
        for kind, (role, proto, address, port) in LONG_LIVED.items()
    }
    for flow in flows.values():
        flow.wait_more(10)

    second = start_replica(lab, 1)
    for call in CALLS:  # the controller's replay to the new pod
        second.ok(*call)
    # OVN adds its next hop once BFD is up; here once it knows every group's owner.
    wait_for(
        lambda: ((d := lab.scale_detail("m1")).get("owners") and None not in d["owners"].values()) or None,
        "the new replica to know every group's owner",
        timeout=40,
    )
    lab.set_next_hops([0, 1])
    # After preemptDelay, once conntrackd brought it the connections.
    owned = wait_for(lambda: settled(lab), "the new replica to take its share", timeout=40)
    assert sorted(owned["m1"]) == ["eip-10-115-55-200", "eip-10-115-55-201"], owned
    for flow in flows.values():
        flow.wait_more(20, timeout=30)
    broken = {name: flow.errors() for name, flow in flows.items() if flow.errors()}
    assert not broken
    # The UDP flow's answers kept naming one translated source: E0, its port unchanged.
    assert len({answer for _, answer in flows["snat-udp"].echoes()}) == 1
