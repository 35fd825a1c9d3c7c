"""QoS with real TCP through natgwd (iperf3 between the lab's namespaces): per-EIP limits
in both directions, an unlimited EIP beside them, priorities between EIP, gateway CIDR
and NIC-wide rules, a rate change that keeps established flows, drift repair, foreign
qdiscs left alone, and removal leaving nothing behind.

Rates are checked with generous bounds (this machine is shared); iperf3 leaves the first
second out, where the bucket's burst passes unshaped. iperf3 reports TCP payload, and HTB
counts whole frames: 1448 payload bytes per 1514-byte frame, so a limit of R carries
about 0.956 R of payload."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from natgwd.lab.topology import Lab
from tests.integration.helpers import (
    apply,
    events_named,
    readyz,
    samples,
    send_udp,
    start,
    udp_sink,
    wait_for,
)
from tests.integration.qos_helpers import (
    MBIT,
    PAYLOAD,
    assert_shaped,
    iperf,
    iperf_command,
    iperf_server,
    received,
)

EIP1, EIP2 = "10.115.55.200", "10.115.55.201"  # my-eip (SNAT, DNAT 8888 -> vm1:80), my-eip2 (FIP vm2)
UPSTREAM = "10.115.55.254"
OUTSIDE_CIDR = "10.115.60.1"  # an upstream address outside the external subnet (NIC-wide rule)


def policy(name: str, ingress: float | None = None, egress: float | None = None) -> dict[str, Any]:
    rules = []
    if ingress is not None:
        rules.append({"name": "in", "direction": "ingress", "rateMax": str(ingress), "priority": 1})
    if egress is not None:
        rules.append({"name": "out", "direction": "egress", "rateMax": str(egress), "priority": 1})
    return {"name": name, "bindingType": "EIP", "bandwidthLimitRules": rules}


def with_qos(state: dict[str, Any], policies: list[dict[str, Any]], **bindings: str) -> dict[str, Any]:
    """The state with these policies, EIPs bound as `eip_name=policy` (dashes as '_')."""
    result: dict[str, Any] = json.loads(json.dumps(state))
    result["qosPolicies"] = policies
    for eip in result["eips"]:
        bound = bindings.get(eip["name"].replace("-", "_"))
        if bound:
            eip["qosPolicy"] = bound
    if "gateway" in bindings:
        result["qosPolicy"] = bindings["gateway"]
    return result


def tc(lab: Lab, *args: str) -> str:
    return lab.exec("gw", "tc", *args).stdout


def leftovers(lab: Lab) -> dict[str, str]:
    """natgwd's traffic-control state in the gateway: qdiscs other than the defaults, any
    class or filter on net2, and the IFB device."""
    return {
        "qdiscs": "\n".join(q for q in tc(lab, "qdisc", "show").splitlines() if not q.startswith("qdisc noqueue")),
        "classes": tc(lab, "class", "show", "dev", "net2"),
        "filters": tc(lab, "filter", "show", "dev", "net2"),
        "ifb": " ".join(
            line.split()[0] for line in lab.exec("gw", "ip", "-br", "link", "show", "type", "ifb").stdout.splitlines()
        ),
    }


NOTHING = {"qdiscs": "", "classes": "", "filters": "", "ifb": ""}


@pytest.fixture
def servers(lab: Lab) -> None:
    """iperf3 servers: vm1:80 (behind DNAT 8888), vm2:5201 (behind the FIP), and two on
    the upstream host, which also answers on an address outside the external subnet."""
    lab.exec("ext", "ip", "addr", "add", f"{OUTSIDE_CIDR}/32", "dev", "eth0")
    iperf_server(lab, "vm1", 80)
    iperf_server(lab, "vm2", 5201)
    iperf_server(lab, "ext", 5201)
    iperf_server(lab, "ext", 5202)


@pytest.mark.usefixtures("servers")
def test_dnat_ingress_and_snat_egress_limits_beside_an_unlimited_eip(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a limit that shapes the wrong direction or the wrong EIP: ingress on
    the DNAT EIP (ext -> vm1 through DNAT) at 10 Mbit/s, egress of the SNAT EIP (vm1 ->
    ext) at 20 Mbit/s, while the FIP EIP without QoS runs at the same time at least 10
    times faster."""
    start(lab, with_qos(seed_state, [policy("limited", ingress=10, egress=20)], my_eip="limited"))
    assert_shaped(iperf(lab, "ext", EIP1, 8888), 10, "ingress of the DNAT EIP")

    free = subprocess.Popen(iperf_command(lab, "vm2", UPSTREAM, 5202, 3), stdout=subprocess.PIPE, text=True)
    try:
        shaped = iperf(lab, "vm1", UPSTREAM, 5201)
        free_out, _ = free.communicate(timeout=40)
    finally:
        free.kill()
        free.wait()
    assert_shaped(shaped, 20, "egress of the SNAT EIP")
    assert received(free_out) >= 10 * 20 * MBIT, f"the unlimited EIP ran at {received(free_out) / MBIT:.0f} Mbit/s"


@pytest.mark.usefixtures("servers")
def test_fip_limited_in_both_directions(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a FIP (one EIP, both NATs) shaped in one direction only."""
    start(lab, with_qos(seed_state, [policy("fip", ingress=8, egress=16)], my_eip2="fip"))
    assert_shaped(iperf(lab, "ext", EIP2, 5201), 8, "ingress of the FIP")
    assert_shaped(iperf(lab, "vm2", UPSTREAM, 5201), 16, "egress of the FIP")


@pytest.mark.usefixtures("servers")
def test_eip_rule_beats_gateway_cidr_rule_beats_nic_wide_rule(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against the priorities of upstream's e2e being lost: traffic of an EIP with
    its own limit gets that limit even towards a CIDR the gateway limits; other EIPs get
    the CIDR's limit there, and the NIC-wide limit elsewhere."""
    gateway = {
        "name": "gw",
        "bindingType": "NATGW",
        "bandwidthLimitRules": [
            {
                "name": "cidr",
                "direction": "egress",
                "rateMax": "20",
                "priority": 2,
                "matchType": "ip",
                "matchValue": "dst 10.115.48.0/21",
            },
            {"name": "nic", "direction": "egress", "rateMax": "40", "priority": 3, "interface": "net2"},
        ],
    }
    start(lab, with_qos(seed_state, [policy("eip", egress=10), gateway], my_eip="eip", gateway="gw"))
    assert_shaped(iperf(lab, "vm1", UPSTREAM, 5201), 10, "EIP rule inside the gateway's CIDR")
    assert_shaped(iperf(lab, "vm1", OUTSIDE_CIDR, 5201), 10, "EIP rule outside the gateway's CIDR")
    assert_shaped(iperf(lab, "vm2", UPSTREAM, 5201), 20, "gateway CIDR rule")
    assert_shaped(iperf(lab, "vm2", OUTSIDE_CIDR, 5201), 40, "NIC-wide rule")


def class_counters(lab: Lab, device: str) -> dict[str, int]:
    """Bytes sent per class id on a device."""
    found = {}
    current = None
    for line in tc(lab, "-s", "class", "show", "dev", device).splitlines():
        words = line.split()
        if words[:2] == ["class", "htb"]:
            current = words[2]
        elif words[:1] == ["Sent"] and current is not None:
            found[current] = int(words[1])
    return found


@pytest.mark.usefixtures("servers")
def test_rate_change_keeps_flows_and_other_classes_then_removal_restores_full_speed(
    lab: Lab, seed_state: dict[str, Any]
) -> None:
    """Guards against a rate change that recreates the tree (resetting every EIP's queue
    and counters) or breaks the flow in progress, and against QoS that outlives its
    removal: the change applies to a running transfer within one reconcile, the other
    EIP's class keeps its id and counters, and removing QoS leaves no qdisc, class,
    filter or IFB and full speed."""
    both = [policy("dnat", ingress=10), policy("fip", ingress=10)]
    daemon = start(lab, with_qos(seed_state, both, my_eip="dnat", my_eip2="fip"))
    assert_shaped(iperf(lab, "ext", EIP2, 5201), 10, "ingress of the FIP before the change")
    before = class_counters(lab, "ifb-net2")
    (fip_class,) = (c for c, sent in before.items() if sent > 0 and not c.endswith(":fffe"))
    changes_before = len(events_named(daemon, "qos change"))

    command = ["ip", "netns", "exec", lab.ns("ext"), "iperf3", "-c", EIP1, "-p", "8888", "-t", "8", "-i", "1", "-J"]
    running = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: class_counters(lab, "ifb-net2") != before, "the transfer to reach the DNAT EIP's class")
        faster = [policy("dnat", ingress=30), policy("fip", ingress=10)]
        apply(daemon, with_qos(seed_state, faster, my_eip="dnat", my_eip2="fip"))
        output, _ = running.communicate(timeout=60)
    finally:
        running.kill()
        running.wait()
    report = json.loads(output)
    assert "error" not in report, f"the flow broke during the change: {report['error']}"
    rates = [i["sum"]["bits_per_second"] / MBIT for i in report["intervals"]]
    assert max(rates[-3:]) >= 2 * 10 * PAYLOAD, f"the new rate never applied to the running flow: {rates}"
    after = class_counters(lab, "ifb-net2")
    assert after[fip_class] == before[fip_class], "the other EIP's class was recreated"
    assert before.keys() == after.keys(), "class ids changed"
    (dnat_class,) = before.keys() - {fip_class, "4e47:fffe"}
    changes = [e["change"] for e in events_named(daemon, "qos change")[changes_before:]]
    assert changes == [f"change class {dnat_class} rate 30000000 bit/s on ifb-net2"]

    apply(daemon, seed_state)
    assert leftovers(lab) == NOTHING
    assert iperf(lab, "ext", EIP1, 8888) >= 10 * 30 * MBIT


def test_drift_repaired_at_resync_and_cleanup_removes_all(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a tree that someone deleted staying deleted (and the limit gone),
    and against `natgwd cleanup` leaving shaping behind."""
    daemon = start(
        lab, with_qos(seed_state, [policy("p", ingress=10, egress=20)], my_eip="p"), "--resync-interval", "0.5"
    )
    shaped = leftovers(lab)
    assert "htb 4e47:" in shaped["qdiscs"] and "ifb-net2" in shaped["ifb"]
    lab.exec("gw", "ip", "link", "del", "ifb-net2")
    stray = ("parent", "4e47:", "protocol", "ip", "prio", "100", "u32", "match", "ip", "src", f"{EIP1}/32")
    lab.exec("gw", "tc", "filter", "add", "dev", "net2", *stray, "flowid", "4e47:fffe")
    lab.exec("gw", "tc", "class", "change", "dev", "net2", "classid", "4e47:fffe", "htb", "rate", "1mbit")
    wait_for(lambda: leftovers(lab) == shaped, f"the tree to be rebuilt as {shaped}", timeout=20)
    wait_for(
        lambda: samples(daemon).get(("natgwd_drift_repairs_total", frozenset({("resource", "qos")}))),
        "a qos drift repair in the metrics",
    )
    daemon.stop()
    result = lab.exec("gw", sys.executable, "-m", "natgwd", "cleanup", "--applied-state", "")
    assert "delete ifb ifb-net2" in result.stdout
    assert leftovers(lab) == NOTHING


def test_foreign_root_qdisc_left_alone(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against natgwd replacing a root qdisc it did not create: egress QoS is then
    refused (not ready, with the reason) and the other qdisc stays; ingress still works."""
    lab.exec("gw", "ip", "link", "set", "net2", "up")
    foreign = ("tbf", "rate", "1gbit", "burst", "100k", "latency", "50ms")
    lab.exec("gw", "tc", "qdisc", "add", "dev", "net2", "root", "handle", "1:", *foreign)
    daemon = lab.start_natgwd(with_qos(seed_state, [policy("p", ingress=10, egress=20)], my_eip="p"))
    status, detail = wait_for(
        lambda: "qdisc" in (found := readyz(daemon))[1].get("reason", "") and found, "the qdisc as not-ready reason"
    )
    assert status == 503
    assert "net2 has a root qdisc tbf 1: that natgwd did not create" in detail["reason"]
    assert "qdisc tbf 1: root" in tc(lab, "qdisc", "show", "dev", "net2")
    assert "ifb-net2" in leftovers(lab)["ifb"]


def test_metrics_and_status_count_every_shaped_frame(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against per-EIP QoS counters that miss packets, count another EIP's, or
    carry the wrong labels: 10 datagrams to the FIP's EIP are exactly 10 frames of
    100 + 28 + 14 bytes in its ingress class (the IFB sees the Ethernet header)."""
    daemon = start(lab, with_qos(seed_state, [policy("fip", ingress=8, egress=16)], my_eip2="fip"))
    udp_sink(lab, "vm2", 5000)
    send_udp(lab, "ext", EIP2, 5000, [b"x" * 100] * 10, source_port=40000)
    labels = frozenset({("direction", "ingress"), ("kind", "eip"), ("name", "my-eip2"), ("match", EIP2)})
    found = wait_for(
        lambda: (s := samples(daemon)).get(("natgwd_qos_sent_packets_total", labels)) == 10 and s,
        "10 packets in the FIP's ingress class",
    )
    assert found[("natgwd_qos_sent_bytes_total", labels)] == 10 * (100 + 28 + 14)
    assert found[("natgwd_qos_dropped_packets_total", labels)] == 0
    assert found[("natgwd_qos_backlog_bytes", labels)] == 0
    assert found[("natgwd_qos_rate_limit_bytes_per_second", labels)] == 1_000_000
    egress = labels - {("direction", "ingress")} | {("direction", "egress")}
    assert found[("natgwd_qos_rate_limit_bytes_per_second", egress)] == 2_000_000
    assert found[("natgwd_qos_leaf_qdisc_info", frozenset({("kind", "default")}))] == 1

    status = lab.exec(
        "gw", sys.executable, "-m", "natgwd", "status", "--json", "--applied-state", str(lab.applied_state_path)
    )
    rows = {(r["direction"], r["kind"], r["name"]): r for r in json.loads(status.stdout)["qos"]}
    assert rows[("ingress", "eip", "my-eip2")] | {"overlimits": 0} == {
        "direction": "ingress",
        "kind": "eip",
        "name": "my-eip2",
        "match": EIP2,
        "rate_bits": 8_000_000,
        "bytes": 1420,
        "packets": 10,
        "drops": 0,
        "overlimits": 0,
        "backlog_bytes": 0,
    }
    table = lab.exec("gw", sys.executable, "-m", "natgwd", "status", "--applied-state", str(lab.applied_state_path))
    assert any(line.split()[:5] == ["eip", "my-eip2", EIP2, "ingress", "8Mbit"] for line in table.stdout.splitlines())


def test_restart_adopts_the_trees_without_touching_them(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a restart that rebuilds the shaping (new class ids, counters reset,
    queues dropped): a new natgwd with the same state finds every class and filter in
    place and changes nothing."""
    state = with_qos(seed_state, [policy("dnat", ingress=10, egress=20), policy("fip", ingress=5)], my_eip="dnat")
    state["eips"][1]["qosPolicy"] = "fip"
    daemon = start(lab, state)
    udp_sink(lab, "vm2", 5000)
    send_udp(lab, "ext", EIP2, 5000, [b"x" * 100] * 5, source_port=40000)
    before = {device: class_counters(lab, device) for device in ("net2", "ifb-net2")}
    assert sum(before["ifb-net2"].values()) > 0
    daemon.stop()
    restarted = start(lab, state)
    assert events_named(restarted, "qos change") == []
    after = {device: class_counters(lab, device) for device in ("net2", "ifb-net2")}
    # the restarted natgwd's gratuitous ARP leaves through net2's default class
    assert after["net2"].pop("4e47:fffe") >= before["net2"].pop("4e47:fffe")
    assert after == before
