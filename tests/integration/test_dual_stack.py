"""Real IPv4 and IPv6 packets through natgwd at once, in the dual-stack seed topology
(Lab(ipv6=True), natgwd.lab.topology.DUAL_STACK_STATE): SNAT out, DNAT in, FIP both ways and
hairpin for both families, the source seen on the far side checked, exact per-rule
counters for IPv6 rules, IPv6 addresses usable at once (no duplicate address detection),
and unsolicited neighbour advertisements at start and for an added EIP."""

from __future__ import annotations

import copy
import json
import signal
import sys
from typing import Any

import pytest

from natgwd.lab.topology import DUAL_STACK_STATE, EXTERNAL_HOST, EXTERNAL_HOST6, Lab
from tests.integration.helpers import (
    apply,
    events_named,
    host_of,
    rule_counters,
    start,
    tcp_get,
    udp_bytes,
    wait_counters,
    wait_for,
)

EIP1, EIP2 = "10.115.55.200", "10.115.55.201"
EIP1_6, EIP2_6 = "fd00:115::200", "fd00:115::201"
UDP6_OVERHEAD = 40 + 8  # IPv6 header + UDP header
ECHO_PAYLOADS = [b"q" * 30, b"r" * 300, b"s" * 3]


@pytest.fixture
def dual_state() -> dict[str, Any]:
    return copy.deepcopy(DUAL_STACK_STATE)


def udp6_bytes(payloads: list[bytes] | list[str]) -> int:
    return udp_bytes(payloads) + len(payloads) * (UDP6_OVERHEAD - 28)


def addresses6(lab: Lab, role: str, interface: str) -> dict[str, list[str]]:
    """Global IPv6 addresses of an interface -> their flags (e.g. "tentative")."""
    [link] = json.loads(lab.exec(role, "ip", "-j", "-6", "addr", "show", "dev", interface).stdout)
    return {
        f"{a['local']}/{a['prefixlen']}": [flag for flag in ("tentative", "dadfailed") if a.get(flag)]
        for a in link["addr_info"]
        if a.get("scope") == "global"
    }


def test_ipv6_addresses_routes_and_forwarding(dual_lab: Lab, dual_state: dict[str, Any]) -> None:
    """Guards against IPv6 addresses the gateway cannot use yet (tentative during duplicate
    address detection), a missing IPv6 default route, and IPv6 forwarding left off."""
    dual_lab.exec("gw", "sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/all/forwarding")
    # net2 is up before natgwd starts (as a CNI leaves it), with duplicate address
    # detection on: only natgwd's NODAD keeps the EIPs from being tentative. natgwd brings
    # net1 up itself, without DAD for its link-local address either.
    dual_lab.exec("gw", "ip", "link", "set", "net2", "up")
    start(dual_lab, dual_state)
    assert dual_lab.exec("gw", "cat", "/proc/sys/net/ipv6/conf/all/forwarding").stdout.strip() == "1"
    assert dual_lab.exec("gw", "cat", "/proc/sys/net/ipv6/conf/net2/accept_dad").stdout.strip() == "1"
    assert addresses6(dual_lab, "gw", "net2") == {
        "fd00:115::1/64": [],
        f"{EIP1_6}/64": [],
        f"{EIP2_6}/64": [],
    }
    assert dual_lab.exec("gw", "cat", "/proc/sys/net/ipv6/conf/net1/accept_dad").stdout.strip() == "0"
    assert addresses6(dual_lab, "gw", "net1") == {"fd00:10::fe/64": []}
    [net1] = json.loads(dual_lab.exec("gw", "ip", "-j", "-6", "addr", "show", "dev", "net1", "scope", "link").stdout)
    assert net1["addr_info"] and not any(a.get("tentative") for a in net1["addr_info"]), net1
    routes = {
        r["dst"]: (r.get("gateway"), r["dev"], "onlink" in r.get("flags", ()))
        for r in json.loads(dual_lab.exec("gw", "ip", "-j", "-6", "route").stdout)
    }
    assert routes["default"] == (EXTERNAL_HOST6, "net2", True)
    assert routes["fd00:55::/64"] == ("fd00:10::1", "net1", False)


def test_both_families_at_once(dual_lab: Lab, dual_state: dict[str, Any]) -> None:
    """Guards against IPv6 rules that do not translate (or translate to the wrong EIP),
    and against IPv6 rules disturbing their IPv4 twins: every path runs for both families
    on one table, with the address seen on the far side checked."""
    start(dual_lab, dual_state)
    dual_lab.serve("ext", tcp=[80], udp=[53])
    dual_lab.serve("vm1", tcp=[80])
    dual_lab.serve("vm2", tcp=[80], udp=[5353])
    for upstream, eip1, eip2 in ((EXTERNAL_HOST, EIP1, EIP2), (EXTERNAL_HOST6, EIP1_6, EIP2_6)):
        # SNAT out (vm1, vm3) and FIP out (vm2, which the SNAT CIDR covers too).
        assert host_of(dual_lab.http_get("vm1", upstream, 80)) == eip1
        assert host_of(dual_lab.http_get("vm3", upstream, 80)) == eip1
        assert [host_of(a) for a in dual_lab.udp_exchange("vm3", upstream, 53, [b"x"])] == [eip1]
        assert host_of(dual_lab.http_get("vm2", upstream, 80)) == eip2
        # DNAT in (tcp 8888 -> vm1:80) and FIP in, keeping the client's address.
        assert host_of(dual_lab.http_get("ext", eip1, 8888)) == upstream
        assert tcp_get(dual_lab, "ext", eip1, 80) == ""  # only 8888 is forwarded
        assert host_of(dual_lab.http_get("ext", eip2, 80)) == upstream
        assert [host_of(a) for a in dual_lab.udp_exchange("ext", eip2, 5353, [b"x"])] == [upstream]
        # Hairpin: a VM reaches the DNAT and the FIP through their EIPs, seen as the EIP.
        assert host_of(dual_lab.http_get("vm3", eip1, 8888)) == eip1
        assert host_of(dual_lab.http_get("vm3", eip2, 80)) == eip2


def test_ipv6_rule_counters_are_exact(dual_lab: Lab, dual_state: dict[str, Any]) -> None:
    """Guards against IPv6 traffic counted on the wrong rule (the IPv4 twin), not counted,
    or counted with the wrong length: SNAT66 and FIP counters by direction, in bytes of
    IPv6 packets."""
    daemon = start(dual_lab, dual_state)
    dual_lab.serve("ext", udp=[53])
    answers = dual_lab.udp_exchange("vm1", EXTERNAL_HOST6, 53, ECHO_PAYLOADS)
    assert [host_of(a) for a in answers] == [EIP1_6] * len(ECHO_PAYLOADS)
    snat = wait_counters(daemon, "snat", "my-snat6", EIP1_6, lambda c: c.packets_reply >= len(answers))
    assert snat.connections == 1
    assert (snat.packets_original, snat.bytes_original) == (len(ECHO_PAYLOADS), udp6_bytes(ECHO_PAYLOADS))
    assert (snat.packets_reply, snat.bytes_reply) == (len(answers), udp6_bytes(answers))
    twin = rule_counters(daemon, "snat", "my-snat", EIP1)
    assert twin is not None and twin.connections == 0 and twin.packets_original == 0

    dual_lab.serve("vm2", udp=[5353])
    inbound = dual_lab.udp_exchange("ext", EIP2_6, 5353, ECHO_PAYLOADS[:2])
    outbound = dual_lab.udp_exchange("vm2", EXTERNAL_HOST6, 53, ECHO_PAYLOADS[2:])
    assert [host_of(a) for a in inbound + outbound] == [EXTERNAL_HOST6] * 2 + [EIP2_6]
    fip = wait_counters(daemon, "fip", "fip01-6", EIP2_6, lambda c: c.packets_reply >= 3)
    assert fip.connections == 2
    assert (fip.packets_original, fip.bytes_original) == (3, udp6_bytes(ECHO_PAYLOADS))
    assert (fip.packets_reply, fip.bytes_reply) == (3, udp6_bytes(inbound + outbound))
    fip4 = rule_counters(daemon, "fip", "fip01", EIP2)
    assert fip4 is not None and fip4.connections == 0


def _mac(lab: Lab, role: str, interface: str) -> str:
    [link] = json.loads(lab.exec(role, "ip", "-j", "link", "show", "dev", interface).stdout)
    return str(link["address"])


def _neighbour(lab: Lab, address: str) -> str | None:
    """The MAC the upstream host has for `address`, if any."""
    for entry in json.loads(lab.exec("ext", "ip", "-j", "-6", "neigh", "show", "dev", "eth0").stdout):
        if entry["dst"] == address:
            return entry.get("lladdr")
    return None


def test_neighbour_advertisements_at_start_and_for_an_added_eip(dual_lab: Lab, dual_state: dict[str, Any]) -> None:
    """Guards against IPv6 EIPs that upstream keeps sending to a gateway's old MAC after a
    move: natgwd advertises every IPv6 EIP at start and each one it adds, and the
    advertisements are valid (checksum, hop limit 255, override flag), since the upstream
    host replaces a neighbour entry it already has with the advertised MAC."""
    old_mac = "02:00:00:00:00:01"
    added = "fd00:115::202"
    for address in (EIP1_6, EIP2_6, added):
        dual_lab.exec("ext", "ip", "-6", "neigh", "replace", address, "lladdr", old_mac, "dev", "eth0", "nud", "stale")
    gateway_mac = _mac(dual_lab, "gw", "net2")
    daemon = start(dual_lab, dual_state)
    for address in (EIP1_6, EIP2_6):
        wait_for(lambda a=address: _neighbour(dual_lab, a) == gateway_mac, f"upstream learning {address}")
    assert _neighbour(dual_lab, added) == old_mac  # not an EIP yet: not advertised

    dual_state["eips"].append({"name": "eip-new", "v6ip": added})
    apply(daemon, dual_state)
    wait_for(lambda: _neighbour(dual_lab, added) == gateway_mac, f"upstream learning {added}")


def _v6_works(lab: Lab) -> None:
    """DNAT in, SNAT out and FIP in over IPv6."""
    assert host_of(lab.http_get("ext", EIP1_6, 8888)) == EXTERNAL_HOST6
    assert host_of(lab.http_get("vm3", EXTERNAL_HOST6, 80)) == EIP1_6
    assert host_of(lab.http_get("ext", EIP2_6, 80)) == EXTERNAL_HOST6


def _table(lab: Lab) -> str:
    return lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd").stdout


def _routes6(lab: Lab) -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in json.loads(lab.exec("gw", "ip", "-j", "-6", "route").stdout)}


def test_ipv6_survives_kill_9_restart_adoption_drift_and_cleanup(dual_lab: Lab, dual_state: dict[str, Any]) -> None:
    """Guards against IPv6 state a restarted natgwd does not recognise as its own (it
    would re-create the table or re-add addresses and routes: a blip, counters reset),
    IPv6 drift left unrepaired, and `cleanup` leaving IPv6 addresses or routes behind."""
    lab = dual_lab
    dual_lab.serve("ext", tcp=[80])
    dual_lab.serve("vm1", tcp=[80])
    dual_lab.serve("vm2", tcp=[80])
    first = start(lab, dual_state)
    _v6_works(lab)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    _v6_works(lab)  # down: the table, addresses and routes stay and keep translating
    down = _table(lab)

    second = start(lab, dual_state, "--resync-interval", "1")
    (applied,) = events_named(second, "desired state applied")
    assert (applied["nft_operations"], applied["changed_elements"], applied["link_changes"]) == (0, 0, 0), applied
    assert _table(lab) == down  # same handles, counters included
    snat6 = rule_counters(second, "snat", "my-snat6", EIP1_6)
    assert snat6 is not None and snat6.connections == 2  # one before the kill, one while down

    # Drift: an IPv6 EIP address, the IPv6 default route, an IPv6 map element, forwarding.
    lab.exec("gw", "ip", "addr", "del", f"{EIP1_6}/64", "dev", "net2")
    lab.exec("gw", "ip", "-6", "route", "del", "default")
    key = f"{EIP1_6} . tcp . 8888"
    lab.exec("gw", "nft", "delete", "element", "inet", "natgwd", "dnat_target6", f"{{ {key} }}")
    lab.exec("gw", "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    wait_for(lambda: addresses6(lab, "gw", "net2").get(f"{EIP1_6}/64") == [], "the IPv6 EIP restored", timeout=10)
    wait_for(lambda: _routes6(lab).get("default", {}).get("gateway") == EXTERNAL_HOST6, "the IPv6 default route")
    wait_for(
        lambda: (
            lab.exec(
                "gw", "nft", "get", "element", "inet", "natgwd", "dnat_target6", f"{{ {key} }}", check=False
            ).returncode
            == 0
        ),
        "the IPv6 DNAT element restored",
    )
    wait_for(
        lambda: lab.exec("gw", "cat", "/proc/sys/net/ipv6/conf/all/forwarding").stdout.strip() == "1",
        "IPv6 forwarding on",
    )
    _v6_works(lab)
    assert second.stop() == 0

    result = lab.exec("gw", sys.executable, "-m", "natgwd", "cleanup", "--applied-state", str(lab.applied_state_path))
    assert result.returncode == 0, result.stderr
    assert addresses6(lab, "gw", "net2") == {} and addresses6(lab, "gw", "net1") == {}
    assert "default" not in _routes6(lab) and "fd00:55::/64" not in _routes6(lab)


def test_an_ipv6_dnat_change_moves_a_live_udp_flow(dual_lab: Lab, dual_state: dict[str, Any]) -> None:
    """Guards against IPv6 conntrack entries left pinning a flow to an old DNAT target:
    natgwd dumps and deletes IPv6 entries (AF_INET6) as it does IPv4 ones, so the very next
    datagram follows the changed rule, and a removed rule stops the flow."""
    dual_lab.serve("vm1", udp=[5000], tag="vm1")
    dual_lab.serve("vm3", udp=[5000], tag="vm3")
    rule = {
        "name": "udp6",
        "eip": "my-eip",
        "protocol": "udp",
        "externalPort": 5000,
        "internalIp": "fd00:10::2",
        "internalPort": 5000,
    }
    dual_state["dnat"].append(rule)
    daemon = start(dual_lab, dual_state)

    def once() -> str:
        return dual_lab.udp_exchange("ext", EIP1_6, 5000, [b"x"], timeout=2, source_port=40001)[0]

    for _ in range(2):
        assert once() == f"{EXTERNAL_HOST6}:40001 @vm1"
    rule["internalIp"] = "fd00:10::4"
    apply(daemon, dual_state)
    assert once() == f"{EXTERNAL_HOST6}:40001 @vm3"
    deleted = daemon.metrics()['natgwd_conntrack_entries_deleted_total{reason="dnat"}']
    assert deleted == 1
