"""Idle timeouts with real connections through the gateway: a rule's own policy, the
gateway's for a rule without one, TCP, UDP and ICMP, as conntrack holds them (the timeout an
entry gets at establishment, and its leaving once idle for that long)."""

from __future__ import annotations

import copy
import sys
from typing import Any

from natgwd.lab.topology import DUAL_STACK_STATE, EXTERNAL_HOST, EXTERNAL_HOST6, Lab
from tests.integration.helpers import apply, samples, start, udp_sink, wait_for, wait_listening

VM1, VM2 = "172.20.10.2", "172.20.10.3"  # vm1 by my-snat, vm2 by fip01
TCP_PORT, UDP_PORT = 7100, 7101
RULE_TCP, RULE_UDP = 8, 6  # my-snat's own: time to list an entry before it leaves, on a loaded machine
GATEWAY = 300  # everything else's: far above a rule's, far below the kernel's (5 days, 30 s)


def timeouts(lab: Lab, proto: str, source: str, port: int | None = None) -> list[int]:
    """The remaining timeouts of the gateway's entries of `source`'s connections to the
    external host's `port` (conntrack -L leaves expired entries out)."""
    to_port = ["--orig-port-dst", str(port)] if port is not None else []
    family = ["-f", "ipv6"] if ":" in source else []
    listing = lab.exec("gw", "conntrack", "-L", *family, "-p", proto, "--orig-src", source, *to_port, check=False)
    return [int(line.split()[2]) for line in listing.stdout.splitlines() if line.startswith(proto)]


def hold_tcp(lab: Lab, role: str, address: str = EXTERNAL_HOST, port: int = TCP_PORT) -> None:
    """An established TCP connection from `role` to `address`, then idle."""
    script = f"import socket,time\ns=socket.create_connection(({address!r},{port}),timeout=10)\ntime.sleep(3600)\n"
    lab.spawn(role, sys.executable, "-c", script)


def hold_server(lab: Lab, role: str, port: int) -> None:
    """A TCP server on every address of both families that keeps what it accepts, silent."""
    script = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
        f"s.bind(('::',{port})); s.listen(8)\n"
        "held=[]\n"
        "while True: held.append(s.accept())\n"
    )
    lab.spawn(role, sys.executable, "-c", script)
    wait_listening(lab, role, "tcp", port)


def send_udp(lab: Lab, role: str) -> None:
    script = (
        f"import socket\nsocket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',({EXTERNAL_HOST!r},{UDP_PORT}))\n"
    )
    lab.exec(role, sys.executable, "-c", script)


def test_a_rules_timeouts_and_the_gateways(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against timeouts that do not reach conntrack (a `ct timeout set` where the
    kernel ignores it), a rule's policy applied to another rule's connections, and a rule
    without a policy of its own not getting the gateway's."""
    seed_state["timeouts"] = {"tcpEstablished": GATEWAY, "udp": GATEWAY, "icmp": GATEWAY}
    seed_state["snat"][0]["timeouts"] = {"tcpEstablished": RULE_TCP, "udp": RULE_UDP, "icmp": RULE_UDP}
    daemon = start(lab, seed_state)
    hold_server(lab, "ext", TCP_PORT)
    udp_sink(lab, "ext", UDP_PORT)

    hold_tcp(lab, "vm1")
    hold_tcp(lab, "vm2")
    snat_tcp = wait_for(lambda: timeouts(lab, "tcp", VM1, TCP_PORT), "vm1's TCP connection in conntrack")
    fip_tcp = wait_for(lambda: timeouts(lab, "tcp", VM2, TCP_PORT), "vm2's TCP connection in conntrack")
    # The rule's established timeout, not the kernel's 432,000 s nor the gateway's.
    assert len(snat_tcp) == 1 and 0 < snat_tcp[0] <= RULE_TCP, snat_tcp
    assert len(fip_tcp) == 1 and RULE_TCP < fip_tcp[0] <= GATEWAY, fip_tcp

    send_udp(lab, "vm1")
    send_udp(lab, "vm2")
    snat_udp = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    fip_udp = wait_for(lambda: timeouts(lab, "udp", VM2, UDP_PORT), "vm2's UDP flow in conntrack")
    assert 0 < snat_udp[0] <= RULE_UDP and RULE_UDP < fip_udp[0] <= GATEWAY, (snat_udp, fip_udp)

    for role in ("vm1", "vm2"):
        lab.exec(role, "ping", "-c", "1", "-W", "5", EXTERNAL_HOST, check=False)
    snat_icmp = wait_for(lambda: timeouts(lab, "icmp", VM1), "vm1's ping in conntrack")
    fip_icmp = wait_for(lambda: timeouts(lab, "icmp", VM2), "vm2's ping in conntrack")
    assert 0 < snat_icmp[0] <= RULE_UDP and RULE_UDP < fip_icmp[0] <= GATEWAY, (snat_icmp, fip_icmp)

    # Idle for its rule's timeout, vm1's connection leaves; vm2's, on the gateway's, stays.
    wait_for(lambda: not timeouts(lab, "tcp", VM1, TCP_PORT), "vm1's idle TCP connection to leave", timeout=60)
    wait_for(lambda: not timeouts(lab, "udp", VM1, UDP_PORT), "vm1's idle UDP flow to leave", timeout=60)
    wait_for(lambda: not timeouts(lab, "icmp", VM1), "vm1's ping to leave", timeout=60)
    assert timeouts(lab, "tcp", VM2, TCP_PORT) and timeouts(lab, "udp", VM2, UDP_PORT) and timeouts(lab, "icmp", VM2)

    # On /metrics: the two policies, the rules applying each and what they set.
    found = samples(daemon)
    rules = sorted(value for (name, _), value in found.items() if name == "natgwd_timeout_policy_rules")
    assert rules == [1, 2], rules  # my-snat; dnat01 and fip01 (the gateway's)
    established = {
        value
        for (name, labels), value in found.items()
        if name == "natgwd_timeout_policy_seconds" and ("state", "established") in labels
    }
    assert established == {RULE_TCP, GATEWAY}


def test_a_policy_change_reaches_new_connections(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a changed policy left unapplied (its object is named by its content,
    so a change is a new object), against a rule whose policy was removed keeping it, and
    against a change that cuts the connections made under the old policy: the kernel stops
    refreshing the connections of a deleted ct timeout object, so they would expire on
    their timer, traffic or not."""
    seed_state["snat"][0]["timeouts"] = {"udp": RULE_UDP, "tcpEstablished": RULE_TCP}
    daemon = start(lab, seed_state)
    udp_sink(lab, "ext", UDP_PORT)
    hold_server(lab, "ext", TCP_PORT)
    # A connection that sends a byte every 3 s: its timer runs down from RULE_TCP, then is refreshed.
    script = (
        "import socket,time\n"
        f"s=socket.create_connection(({EXTERNAL_HOST!r},{TCP_PORT}),timeout=10)\n"
        "while True: s.send(b'x'); time.sleep(3)\n"
    )
    lab.spawn("vm1", sys.executable, "-c", script)
    wait_for(lambda: timeouts(lab, "tcp", VM1, TCP_PORT), "vm1's TCP connection in conntrack")
    send_udp(lab, "vm1")
    first = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    assert 0 < first[0] <= RULE_UDP, first
    lab.exec("gw", "conntrack", "-D", "-p", "udp", "--orig-src", VM1, check=False)

    seed_state["snat"][0]["timeouts"] = {"udp": GATEWAY, "tcpEstablished": GATEWAY}
    apply(daemon, seed_state)
    # The live connection keeps its policy, and is refreshed by its traffic: seen run down, then back up.
    wait_for(
        lambda: (found := timeouts(lab, "tcp", VM1, TCP_PORT)) and found[0] <= RULE_TCP - 2, "a timer running down"
    )
    wait_for(lambda: (found := timeouts(lab, "tcp", VM1, TCP_PORT)) and found[0] >= RULE_TCP - 1, "a timer refreshed")
    assert timeouts(lab, "tcp", VM1, TCP_PORT)[0] <= RULE_TCP
    send_udp(lab, "vm1")
    changed = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    assert RULE_UDP < changed[0] <= GATEWAY, changed
    lab.exec("gw", "conntrack", "-D", "-p", "udp", "--orig-src", VM1, check=False)

    # No policy left: the kernel's (30 s for an unreplied flow); no chain of ours sets one.
    del seed_state["snat"][0]["timeouts"]
    apply(daemon, seed_state)
    send_udp(lab, "vm1")
    kernel = int(lab.exec("gw", "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout").stdout)
    default = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    assert RULE_UDP < default[0] <= kernel and kernel != GATEWAY, default
    table = lab.exec("gw", "nft", "list", "table", "inet", "natgwd").stdout
    assert "ct timeout set" not in table and "rule_timeout" not in table


def test_both_families_and_both_directions(dual_lab: Lab) -> None:
    """Guards against a policy that reaches one family only (one object serves IPv4 and
    IPv6; ICMPv6 has objects of its own) and against a DNAT connection, whose first packet
    comes from outside, getting another rule's policy."""
    lab = dual_lab
    state = copy.deepcopy(DUAL_STACK_STATE)
    state["timeouts"] = {"tcpEstablished": GATEWAY, "icmp": GATEWAY}
    rules = {rule["name"]: rule for kind in ("snat", "dnat") for rule in state[kind]}
    rules["my-snat6"]["timeouts"] = {"icmp": RULE_UDP}
    rules["dnat01-6"]["timeouts"] = {"tcpEstablished": RULE_TCP}
    start(lab, state)
    hold_server(lab, "vm1", 80)
    for role in ("vm1", "vm2"):  # my-snat6, fip01-6
        lab.exec(role, "ping", "-6", "-c", "1", "-W", "5", EXTERNAL_HOST6, check=False)
    snat6 = wait_for(lambda: timeouts(lab, "icmpv6", "fd00:10::2"), "vm1's ping in conntrack")
    fip6 = wait_for(lambda: timeouts(lab, "icmpv6", "fd00:10::3"), "vm2's ping in conntrack")
    assert 0 < snat6[0] <= RULE_UDP and RULE_UDP < fip6[0] <= GATEWAY, (snat6, fip6)

    # DNAT in: dnat01-6 has its own, dnat01 (IPv4, same port) the gateway's.
    hold_tcp(lab, "ext", "fd00:115::200", 8888)
    hold_tcp(lab, "ext", "10.115.55.200", 8888)
    dnat6 = wait_for(lambda: timeouts(lab, "tcp", EXTERNAL_HOST6, 8888), "the IPv6 DNAT connection in conntrack")
    dnat4 = wait_for(lambda: timeouts(lab, "tcp", EXTERNAL_HOST, 8888), "the IPv4 DNAT connection in conntrack")
    assert 0 < dnat6[0] <= RULE_TCP and RULE_TCP < dnat4[0] <= GATEWAY, (dnat6, dnat4)
    wait_for(
        lambda: not timeouts(lab, "tcp", EXTERNAL_HOST6, 8888), "the idle IPv6 DNAT connection to leave", timeout=60
    )
    assert timeouts(lab, "tcp", EXTERNAL_HOST, 8888)
