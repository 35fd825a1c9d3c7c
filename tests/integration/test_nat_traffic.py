"""Real packets through natgwd in the seed topology (natgwd.lab.topology): forwarding, addresses
and routes, SNAT, DNAT, port ranges, floating IPs, longest-prefix SNAT, hairpin, changes
and removals, and exact per-rule counters. Every test builds its own lab; traffic stays
between the lab's namespaces."""

from __future__ import annotations

from typing import Any

import pytest

from natgwd.lab.topology import EXTERNAL_HOST, Lab
from tests.integration.helpers import (
    RouteEntry,
    RuleCounters,
    addresses,
    apply,
    host_of,
    nft_table,
    routes,
    rule_counters,
    send_udp,
    serve_tag,
    start,
    tcp_get,
    udp_bytes,
    udp_sink,
    wait_counters,
)

EIP1 = "10.115.55.200"  # my-eip: SNAT of the VPC, dnat01 (tcp 8888 -> vm1:80)
EIP2 = "10.115.55.201"  # my-eip2: fip01 <-> vm2
VM1, VM2, VM3 = "172.20.10.2", "172.20.10.3", "172.20.10.4"


def _udp_dnat(state: dict[str, Any], name: str, port: int) -> None:
    """Add a UDP DNAT on my-eip, `port` -> vm1:`port`."""
    state["dnat"].append(
        {
            "name": name,
            "eip": "my-eip",
            "protocol": "udp",
            "externalPort": str(port),
            "internalIp": VM1,
            "internalPort": str(port),
        }
    )


# --- the gateway itself ---------------------------------------------------------------


def test_forwarding_is_turned_on(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against natgwd leaving IPv4 forwarding off: every rule would be in place and
    no packet would cross the gateway."""
    # A new namespace inherits the host's IPv4 setting (net.core.devconf_inherit_init_net
    # 0), which may be on: switch it off in gw to start from a known value.
    lab.exec("gw", "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
    assert lab.exec("gw", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0"
    start(lab, seed_state)
    assert lab.exec("gw", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def test_addresses_and_routes_as_declared(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a wrong address, prefix or route on the gateway's interfaces: EIPs
    must carry the external subnet's prefix (/21) so the gateway answers ARP for them, the
    VPC's routes must go through the VPC router, the default route must be onlink."""
    start(lab, seed_state)
    found = addresses(lab, "gw")
    assert found["net1"] == {"172.20.10.254/24"}
    assert found["net2"] == {"10.115.48.1/21", f"{EIP1}/21", f"{EIP2}/21"}
    assert routes(lab, "gw") == {
        RouteEntry("10.55.0.0/16", "172.20.10.1", "net1", onlink=False),
        RouteEntry("default", EXTERNAL_HOST, "net2", onlink=True),
        RouteEntry("172.20.10.0/24", None, "net1", onlink=False),  # connected
        RouteEntry("10.115.48.0/21", None, "net2", onlink=False),  # connected
    }


def test_foreign_address_and_route_left_alone(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against natgwd deleting addresses and routes it did not add (the CNI's, an
    operator's) when it removes its own undeclared ones."""
    lab.exec("gw", "ip", "link", "set", "net1", "up")
    lab.exec("gw", "ip", "addr", "add", "10.115.50.50/21", "dev", "net2")
    lab.exec("gw", "ip", "route", "add", "10.66.0.0/16", "via", "172.20.10.1", "dev", "net1", "onlink")
    foreign_route = RouteEntry("10.66.0.0/16", "172.20.10.1", "net1", onlink=True)
    daemon = start(lab, seed_state)
    assert "10.115.50.50/21" in addresses(lab, "gw")["net2"]
    assert foreign_route in routes(lab, "gw")

    # Drop my-eip2 (and its FIP) and the internal route: natgwd removes what it added...
    seed_state["fip"] = []
    seed_state["eips"] = [e for e in seed_state["eips"] if e["name"] != "my-eip2"]
    seed_state["internal"]["routes"] = []
    apply(daemon, seed_state)
    assert addresses(lab, "gw")["net2"] == {"10.115.50.50/21", "10.115.48.1/21", f"{EIP1}/21"}
    gw_routes = routes(lab, "gw")
    assert not any(r.dst == "10.55.0.0/16" for r in gw_routes)
    # ...and nothing else.
    assert foreign_route in gw_routes


def test_changed_external_address_keeps_eips(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against losing the EIPs (and with them all NAT) when the external interface's
    own address changes: the kernel deletes the secondaries of a deleted primary address."""
    # No resync during the test: what counts is what the applied state left behind.
    daemon = start(lab, seed_state, "--resync-interval", "3600")
    seed_state["external"]["addresses"] = ["10.115.48.2/21"]
    apply(daemon, seed_state)
    assert addresses(lab, "gw")["net2"] == {"10.115.48.2/21", f"{EIP1}/21", f"{EIP2}/21"}
    lab.serve("ext", tcp=[80])
    assert host_of(tcp_get(lab, "vm1", EXTERNAL_HOST, 80)) == EIP1


# --- translation ----------------------------------------------------------------------


def test_snat_vm_without_fip_leaves_as_eip(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against VPC traffic leaving with its internal source address (no SNAT) or
    with the wrong EIP, for TCP and UDP."""
    start(lab, seed_state)
    lab.serve("ext", tcp=[80], udp=[53])
    for vm in ("vm1", "vm3"):
        assert host_of(lab.http_get(vm, EXTERNAL_HOST, 80)) == EIP1
        answers = lab.udp_exchange(vm, EXTERNAL_HOST, 53, [b"ping"])
        assert [host_of(a) for a in answers] == [EIP1]


def test_dnat_reaches_backend_with_client_address(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a DNAT that does not reach its backend, or that also source-NATs the
    inbound connection (the backend must see the real client)."""
    start(lab, seed_state)
    lab.serve("vm1", tcp=[80])
    assert host_of(lab.http_get("ext", EIP1, 8888)) == EXTERNAL_HOST


def test_dnat_port_range_maps_port_to_port(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a port range collapsed onto its first port, shifted wrongly, or
    leaking to ports outside the range."""
    seed_state["dnat"].append(
        {
            "name": "range",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": "9000-9002",
            "internalIp": VM1,
            "internalPort": "7000-7002",
        }
    )
    start(lab, seed_state)
    # vm1 listens on 7001 in the range, and on every port a wrong mapping could pick
    # for 8999/9003 (unchanged port, or shifted by the range's offset).
    lab.serve("vm1", tcp=[7001, 6999, 7003, 8999, 9003])
    assert host_of(tcp_get(lab, "ext", EIP1, 9001)) == EXTERNAL_HOST
    assert tcp_get(lab, "ext", EIP1, 9000) == ""  # -> 7000: nothing listens
    assert tcp_get(lab, "ext", EIP1, 9002) == ""  # -> 7002: nothing listens
    assert tcp_get(lab, "ext", EIP1, 8999) == ""  # outside the range
    assert tcp_get(lab, "ext", EIP1, 9003) == ""  # outside the range
    lab.serve("vm1", tcp=[7002])
    assert host_of(tcp_get(lab, "ext", EIP1, 9002)) == EXTERNAL_HOST
    assert tcp_get(lab, "ext", EIP1, 9000) == ""
    lab.serve("vm1", tcp=[7000])
    assert host_of(tcp_get(lab, "ext", EIP1, 9000)) == EXTERNAL_HOST


def test_fip_inbound_any_port_and_protocol(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a FIP that forwards only some ports or protocols, or that source-NATs
    the inbound traffic."""
    start(lab, seed_state)
    lab.serve("vm2", tcp=[80, 31337], udp=[5353, 9999])
    for port in (80, 31337):
        assert host_of(lab.http_get("ext", EIP2, port)) == EXTERNAL_HOST
    for port in (5353, 9999):
        assert [host_of(a) for a in lab.udp_exchange("ext", EIP2, port, [b"hello"])] == [EXTERNAL_HOST]


def test_fip_outbound_takes_precedence_over_snat(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a FIP'd VM leaving through the VPC's SNAT EIP: vm2 is inside the SNAT
    CIDR but must leave as its own EIP (TCP and UDP), while vm1 still leaves as the SNAT EIP."""
    start(lab, seed_state)
    lab.serve("ext", tcp=[80], udp=[53])
    assert host_of(lab.http_get("vm2", EXTERNAL_HOST, 80)) == EIP2
    assert [host_of(a) for a in lab.udp_exchange("vm2", EXTERNAL_HOST, 53, [b"x"])] == [EIP2]
    assert host_of(lab.http_get("vm1", EXTERNAL_HOST, 80)) == EIP1


@pytest.mark.parametrize("order", ["as-written", "reversed"])
def test_snat_longest_prefix_wins(lab: Lab, seed_state: dict[str, Any], order: str) -> None:
    """Guards against SNAT picking the first or the widest matching rule instead of the
    most specific one, and against the result depending on the order of the rules."""
    seed_state["eips"] += [
        {"name": "eip-a", "v4ip": "10.115.55.202"},
        {"name": "eip-b", "v4ip": "10.115.55.203"},
        {"name": "eip-c", "v4ip": "10.115.55.204"},
    ]
    seed_state["snat"] = [
        {"name": "wide", "eip": "eip-a", "internalCIDR": "172.20.0.0/16"},
        {"name": "subnet", "eip": "eip-b", "internalCIDR": "172.20.10.0/24"},
        {"name": "host", "eip": "eip-c", "internalCIDR": "172.20.10.4/32"},
    ]
    if order == "reversed":
        seed_state["snat"].reverse()
    # A second VPC subnet behind the VPC router (ns "lan"), only matched by the /16.
    seed_state["internal"]["routes"].append({"dst": "172.20.11.0/24", "via": "172.20.10.1"})
    lab.exec("lan", "ip", "addr", "add", "172.20.11.1/24", "dev", "br0")
    lab.exec("lan", "ip", "route", "add", "10.115.48.0/21", "via", "172.20.10.254")
    start(lab, seed_state)
    lab.serve("ext", tcp=[80], udp=[53])

    assert host_of(lab.http_get("vm3", EXTERNAL_HOST, 80)) == "10.115.55.204"
    assert [host_of(a) for a in lab.udp_exchange("vm3", EXTERNAL_HOST, 53, [b"x"])] == ["10.115.55.204"]
    assert host_of(lab.http_get("vm1", EXTERNAL_HOST, 80)) == "10.115.55.203"
    assert host_of(tcp_get(lab, "lan", EXTERNAL_HOST, 80, source="172.20.11.1")) == "10.115.55.202"
    assert host_of(lab.http_get("vm2", EXTERNAL_HOST, 80)) == EIP2  # FIP still first


def test_no_snat_towards_the_vpc(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against SNAT applied to traffic that does not leave through the external
    interface (VPC to VPC through net1 must keep the VM's own address)."""
    daemon = start(lab, seed_state)
    lab.exec("lan", "ip", "addr", "add", "10.55.0.1/16", "dev", "br0")
    lab.serve("lan", tcp=[80], udp=[53])
    assert host_of(lab.http_get("vm1", "10.55.0.1", 80)) == VM1
    assert [host_of(a) for a in lab.udp_exchange("vm3", "10.55.0.1", 53, [b"x"])] == [VM3]
    counters = rule_counters(daemon, "snat", "my-snat", EIP1)
    assert counters is not None
    assert counters.connections == 0


def test_hairpin_dnat(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a VPC client that cannot reach a DNAT'd service through its EIP: the
    backend must see the EIP as source, or it would answer the client directly and the
    client would drop the answer. A client with a FIP shows up as its FIP, as in Kube-OVN."""
    start(lab, seed_state)
    lab.serve("vm1", tcp=[80])
    assert host_of(lab.http_get("vm3", EIP1, 8888)) == EIP1
    assert host_of(lab.http_get("vm2", EIP1, 8888)) == EIP2


def test_hairpin_fip(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a VPC client that cannot reach another VM through that VM's FIP."""
    start(lab, seed_state)
    lab.serve("vm2", tcp=[80], udp=[53])
    assert host_of(lab.http_get("vm3", EIP2, 80)) == EIP2
    assert [host_of(a) for a in lab.udp_exchange("vm3", EIP2, 53, [b"x"])] == [EIP2]


# --- changes --------------------------------------------------------------------------


def test_changed_dnat_backend_takes_effect(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a changed rule that keeps sending new connections to the old
    backend (a map element not replaced, or replaced only after a resync)."""
    daemon = start(lab, seed_state)
    serve_tag(lab, "vm1", 80, "vm1")
    serve_tag(lab, "vm3", 80, "vm3")
    assert tcp_get(lab, "ext", EIP1, 8888) == "vm1"
    seed_state["dnat"][0]["internalIp"] = VM3
    apply(daemon, seed_state)
    assert tcp_get(lab, "ext", EIP1, 8888) == "vm3"


def test_removed_rules_and_eip_are_gone(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against removed rules or EIPs lingering in the kernel: a DNAT still
    forwarding, a FIP's EIP still on net2, elements still in the table."""
    daemon = start(lab, seed_state)
    lab.serve("vm1", tcp=[80])
    lab.serve("vm2", tcp=[80])
    assert host_of(tcp_get(lab, "ext", EIP1, 8888)) == EXTERNAL_HOST
    assert host_of(tcp_get(lab, "ext", EIP2, 80)) == EXTERNAL_HOST

    seed_state["dnat"] = []
    seed_state["fip"] = []
    seed_state["eips"] = [e for e in seed_state["eips"] if e["name"] != "my-eip2"]
    apply(daemon, seed_state)

    assert tcp_get(lab, "ext", EIP1, 8888) == ""
    assert tcp_get(lab, "ext", EIP2, 80, timeout=1) == ""
    assert addresses(lab, "gw")["net2"] == {"10.115.48.1/21", f"{EIP1}/21"}
    table = nft_table(lab)
    for gone in (EIP2, VM2, "8888", "dnat01", "fip01"):
        assert gone not in table
    assert EIP1 in table  # the SNAT rule stays
    assert rule_counters(daemon, "dnat", "dnat01", EIP1) is None
    assert rule_counters(daemon, "fip", "fip01", EIP2) is None
    # Without its FIP, vm2 is just another VM of the SNAT CIDR.
    lab.serve("ext", tcp=[80])
    assert host_of(tcp_get(lab, "vm2", EXTERNAL_HOST, 80)) == EIP1


# --- counters -------------------------------------------------------------------------

SINK_PAYLOADS = [b"a" * 10, b"b" * 200, b"c" * 1000, b"d", b"e" * 50]
ECHO_PAYLOADS = [b"q" * 30, b"r" * 300, b"s" * 3]


def test_dnat_counters_exact(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against per-rule counters that miss, double-count or mis-attribute packets
    of a DNAT flow, or count the wrong length (must be the IP total length)."""
    _udp_dnat(seed_state, "dnat-echo", 5000)
    _udp_dnat(seed_state, "dnat-sink", 5001)
    daemon = start(lab, seed_state)
    lab.serve("vm1", udp=[5000])
    udp_sink(lab, "vm1", 5001)

    answers = lab.udp_exchange("ext", EIP1, 5000, ECHO_PAYLOADS, source_port=40000)
    assert [host_of(a) for a in answers] == [EXTERNAL_HOST] * len(ECHO_PAYLOADS)
    echo = rule_counters(daemon, "dnat", "dnat-echo", EIP1)
    assert echo is not None
    assert echo.connections == 1
    assert (echo.packets_original, echo.bytes_original) == (len(ECHO_PAYLOADS), udp_bytes(ECHO_PAYLOADS))
    assert (echo.packets_reply, echo.bytes_reply) == (len(answers), udp_bytes(answers))

    send_udp(lab, "ext", EIP1, 5001, SINK_PAYLOADS, source_port=40001)
    sink = wait_counters(daemon, "dnat", "dnat-sink", EIP1, lambda c: c.packets_original >= len(SINK_PAYLOADS))
    assert (sink.packets_original, sink.bytes_original) == (len(SINK_PAYLOADS), udp_bytes(SINK_PAYLOADS))
    assert (sink.packets_reply, sink.bytes_reply) == (0, 0)
    assert rule_counters(daemon, "dnat", "dnat-echo", EIP1) == echo  # nothing leaked over
    other = rule_counters(daemon, "dnat", "dnat01", EIP1)
    assert other is not None
    assert other.packets_original == 0


def test_snat_counters_exact(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against SNAT counters that miss the first packet (marked in srcnat, counted
    after it), double-count, or count the wrong length."""
    daemon = start(lab, seed_state)
    lab.serve("ext", udp=[53])
    udp_sink(lab, "ext", 54)

    answers = lab.udp_exchange("vm1", EXTERNAL_HOST, 53, ECHO_PAYLOADS, source_port=40000)
    assert [host_of(a) for a in answers] == [EIP1] * len(ECHO_PAYLOADS)
    counters = rule_counters(daemon, "snat", "my-snat", EIP1)
    assert counters is not None
    assert counters.connections == 1
    assert (counters.packets_original, counters.bytes_original) == (len(ECHO_PAYLOADS), udp_bytes(ECHO_PAYLOADS))
    assert (counters.packets_reply, counters.bytes_reply) == (len(answers), udp_bytes(answers))

    send_udp(lab, "vm3", EXTERNAL_HOST, 54, SINK_PAYLOADS, source_port=40001)
    expected_packets = len(ECHO_PAYLOADS) + len(SINK_PAYLOADS)
    after = wait_counters(daemon, "snat", "my-snat", EIP1, lambda c: c.packets_original >= expected_packets)
    assert (after.packets_original, after.bytes_original) == (
        expected_packets,
        udp_bytes(ECHO_PAYLOADS) + udp_bytes(SINK_PAYLOADS),
    )
    assert (after.packets_reply, after.bytes_reply) == (counters.packets_reply, counters.bytes_reply)


def test_fip_counters_exact(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against FIP counters that miss one of the two directions a FIP translates
    (inbound flows and outbound flows both count on the FIP rule)."""
    daemon = start(lab, seed_state)
    lab.serve("vm2", udp=[5353])
    lab.serve("ext", udp=[53])
    udp_sink(lab, "vm2", 5354)

    inbound = lab.udp_exchange("ext", EIP2, 5353, ECHO_PAYLOADS, source_port=40000)
    assert [host_of(a) for a in inbound] == [EXTERNAL_HOST] * len(ECHO_PAYLOADS)
    outbound = lab.udp_exchange("vm2", EXTERNAL_HOST, 53, ECHO_PAYLOADS, source_port=40001)
    assert [host_of(a) for a in outbound] == [EIP2] * len(ECHO_PAYLOADS)
    counters = rule_counters(daemon, "fip", "fip01", EIP2)
    assert counters is not None
    assert counters.connections == 2
    assert (counters.packets_original, counters.bytes_original) == (
        2 * len(ECHO_PAYLOADS),
        2 * udp_bytes(ECHO_PAYLOADS),
    )
    assert (counters.packets_reply, counters.bytes_reply) == (
        len(inbound) + len(outbound),
        udp_bytes(inbound) + udp_bytes(outbound),
    )

    send_udp(lab, "ext", EIP2, 5354, SINK_PAYLOADS, source_port=40002)
    expected_packets = 2 * len(ECHO_PAYLOADS) + len(SINK_PAYLOADS)
    after = wait_counters(daemon, "fip", "fip01", EIP2, lambda c: c.packets_original >= expected_packets)
    assert (after.packets_original, after.bytes_original) == (
        expected_packets,
        2 * udp_bytes(ECHO_PAYLOADS) + udp_bytes(SINK_PAYLOADS),
    )
    assert (after.packets_reply, after.bytes_reply) == (counters.packets_reply, counters.bytes_reply)
    snat = rule_counters(daemon, "snat", "my-snat", EIP1)
    assert snat is not None
    assert snat.packets_original == 0  # vm2's traffic is the FIP's, not the SNAT's


def test_unanswered_flow_counts_one_connection(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a connection counter that counts packets: one UDP flow of N
    unanswered datagrams is one connection (conntrack keeps it in state new until a reply)."""
    _udp_dnat(seed_state, "dnat-sink", 5001)
    daemon = start(lab, seed_state)
    udp_sink(lab, "vm1", 5001)
    send_udp(lab, "ext", EIP1, 5001, SINK_PAYLOADS, source_port=40001)
    counters = wait_counters(daemon, "dnat", "dnat-sink", EIP1, lambda c: c.packets_original >= len(SINK_PAYLOADS))
    assert counters.packets_original == len(SINK_PAYLOADS)
    assert counters.connections == 1


def test_counters_survive_change_to_other_rules(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a reconcile that resets (or loses part of) the counters of rules it
    did not change, e.g. by re-creating counting elements or the table."""
    _udp_dnat(seed_state, "dnat-echo", 5000)
    daemon = start(lab, seed_state)
    lab.serve("vm1", udp=[5000])
    first = lab.udp_exchange("ext", EIP1, 5000, ECHO_PAYLOADS, source_port=40000)
    assert [host_of(a) for a in first] == [EXTERNAL_HOST] * len(ECHO_PAYLOADS)

    # No scrape before the change, so natgwd cannot re-seed a reset counter from one.
    # Change another rule, remove one, and add a SNAT prefix length (re-creates a chain).
    seed_state["dnat"][0]["internalIp"] = VM3
    seed_state["fip"] = []
    seed_state["snat"].append({"name": "vm3", "eip": "my-eip2", "internalCIDR": "172.20.10.4/32"})
    apply(daemon, seed_state)
    assert rule_counters(daemon, "dnat", "dnat-echo", EIP1) == RuleCounters(
        connections=1,
        packets_original=len(ECHO_PAYLOADS),
        packets_reply=len(first),
        bytes_original=udp_bytes(ECHO_PAYLOADS),
        bytes_reply=udp_bytes(first),
    )

    second = lab.udp_exchange("ext", EIP1, 5000, ECHO_PAYLOADS, source_port=40001)
    assert [host_of(a) for a in second] == [EXTERNAL_HOST] * len(ECHO_PAYLOADS)
    after = rule_counters(daemon, "dnat", "dnat-echo", EIP1)
    assert after is not None
    assert after.connections == 2
    assert (after.packets_original, after.bytes_original) == (
        2 * len(ECHO_PAYLOADS),
        2 * udp_bytes(ECHO_PAYLOADS),
    )
    assert (after.packets_reply, after.bytes_reply) == (
        len(first) + len(second),
        udp_bytes(first) + udp_bytes(second),
    )
