"""Idle timeouts with real connections through the gateway: a rule's own policy, the
gateway's for a rule without one, TCP, UDP and ICMP, as conntrack holds them (the timeout an
entry gets at establishment, and its leaving once idle for that long)."""

from __future__ import annotations

import sys
from typing import Any

from natgwd.lab.topology import EXTERNAL_HOST, Lab
from tests.integration.helpers import apply, start, udp_sink, wait_for, wait_listening

VM1, VM2 = "172.20.10.2", "172.20.10.3"  # vm1 by my-snat, vm2 by fip01
TCP_PORT, UDP_PORT = 7100, 7101
RULE_TCP, RULE_UDP = 4, 3  # my-snat's own
GATEWAY = 300  # everything else's: far above a rule's, far below the kernel's (5 days, 30 s)


def timeouts(lab: Lab, proto: str, source: str, port: int | None = None) -> list[int]:
    """The remaining timeouts of the gateway's entries of `source`'s connections to the
    external host's `port` (conntrack -L leaves expired entries out)."""
    to_port = ["--orig-port-dst", str(port)] if port is not None else []
    listing = lab.exec("gw", "conntrack", "-L", "-p", proto, "--orig-src", source, *to_port, check=False)
    return [int(line.split()[2]) for line in listing.stdout.splitlines() if line.startswith(proto)]


def hold_tcp(lab: Lab, role: str) -> None:
    """An established TCP connection from `role` to the external host, then idle."""
    script = (
        f"import socket,time\ns=socket.create_connection(({EXTERNAL_HOST!r},{TCP_PORT}),timeout=10)\ntime.sleep(3600)\n"
    )
    lab.spawn(role, sys.executable, "-c", script)


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
    start(lab, seed_state)
    server = (
        "import socket,time\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{TCP_PORT})); s.listen(8)\n"
        "held=[]\n"
        "while True: held.append(s.accept())\n"
    )
    lab.spawn("ext", sys.executable, "-c", server)
    wait_listening(lab, "ext", "tcp", TCP_PORT)
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
        lab.exec(role, "ping", "-c", "1", "-W", "5", EXTERNAL_HOST)
    snat_icmp = wait_for(lambda: timeouts(lab, "icmp", VM1), "vm1's ping in conntrack")
    fip_icmp = wait_for(lambda: timeouts(lab, "icmp", VM2), "vm2's ping in conntrack")
    assert 0 < snat_icmp[0] <= RULE_UDP and RULE_UDP < fip_icmp[0] <= GATEWAY, (snat_icmp, fip_icmp)

    # Idle for its rule's timeout, vm1's connection leaves; vm2's, on the gateway's, stays.
    wait_for(lambda: not timeouts(lab, "tcp", VM1, TCP_PORT), "vm1's idle TCP connection to leave", timeout=60)
    wait_for(lambda: not timeouts(lab, "udp", VM1, UDP_PORT), "vm1's idle UDP flow to leave", timeout=60)
    wait_for(lambda: not timeouts(lab, "icmp", VM1), "vm1's ping to leave", timeout=60)
    assert timeouts(lab, "tcp", VM2, TCP_PORT) and timeouts(lab, "udp", VM2, UDP_PORT) and timeouts(lab, "icmp", VM2)


def test_a_policy_change_reaches_new_connections(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Guards against a changed policy left unapplied (its object is named by its content,
    so a change is a new object), and against a rule whose policy was removed keeping it."""
    seed_state["snat"][0]["timeouts"] = {"udp": RULE_UDP}
    daemon = start(lab, seed_state)
    udp_sink(lab, "ext", UDP_PORT)
    send_udp(lab, "vm1")
    first = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    assert 0 < first[0] <= RULE_UDP, first
    lab.exec("gw", "conntrack", "-D", "-p", "udp", "--orig-src", VM1, check=False)

    seed_state["snat"][0]["timeouts"] = {"udp": GATEWAY}
    apply(daemon, seed_state)
    send_udp(lab, "vm1")
    changed = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    assert RULE_UDP < changed[0] <= GATEWAY, changed
    lab.exec("gw", "conntrack", "-D", "-p", "udp", "--orig-src", VM1, check=False)

    # No policy left: the kernel's (30 s for an unreplied flow), and nothing of ours in the table.
    del seed_state["snat"][0]["timeouts"]
    apply(daemon, seed_state)
    send_udp(lab, "vm1")
    kernel = int(lab.exec("gw", "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout").stdout)
    default = wait_for(lambda: timeouts(lab, "udp", VM1, UDP_PORT), "vm1's UDP flow in conntrack")
    assert RULE_UDP < default[0] <= kernel and kernel != GATEWAY, default
    assert "ct timeout" not in lab.exec("gw", "nft", "list", "table", "inet", "natgwd").stdout
