"""SNAT rules by destination with real traffic: a partner network sees the partner EIP,
every other destination the rule by source's EIP, a VM with a FIP its FIP; held
connections are counted for the rule that translated them; the rule added and removed on
the delta path."""

from __future__ import annotations

import sys
from typing import Any

from natgwd.lab.topology import Lab
from tests.integration.helpers import DNAT_EIP, FIP_EIP, apply, start
from tests.integration.test_observability import (
    ECHO_PORT,
    Held,
    hold,
    peer_echo,
    value,
)

PARTNER_EIP = "10.115.55.202"
PARTNER_HOST = "198.51.100.10"  # in the partner's network (198.51.100.0/24)
OTHER_HOST = "203.0.113.10"  # anywhere else

# One TCP exchange from the VM: prints what the far end saw ("ip:port").
SEEN = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"hello")
print(s.recv(100).decode())
"""


def seen_from(lab: Lab, role: str, host: str) -> str:
    """The source address `host` sees a new connection from `role` come from."""
    answer = lab.exec(role, sys.executable, "-c", SEEN, host, str(ECHO_PORT)).stdout.strip()
    return answer.rsplit(":", 1)[0]


def partner_state(seed_state: dict[str, Any]) -> dict[str, Any]:
    seed_state["eips"].append({"name": "partner", "v4ip": PARTNER_EIP})
    seed_state["snat"].append(
        {"name": "to-partner", "eip": "partner", "internalCIDR": "172.20.10.0/24", "destinations": ["198.51.100.0/24"]}
    )
    return seed_state


def test_a_partner_network_sees_its_eip_and_the_rest_the_general_one(
    lab: Lab, seed_state: dict[str, Any], held: list[Held]
) -> None:
    # Two hosts "on the internet" beside the upstream router: one in the partner's network.
    for host in (PARTNER_HOST, OTHER_HOST):
        lab.exec("ext", "ip", "addr", "add", f"{host}/32", "dev", "lo")
    peer_echo(lab, "ext")
    general = seed_state["snat"][0]
    daemon = start(lab, partner_state(seed_state))

    # The destination rule wins over the rule by source (same CIDR, shorter or not); the
    # FIP wins over both.
    assert seen_from(lab, "vm1", PARTNER_HOST) == PARTNER_EIP
    assert seen_from(lab, "vm1", OTHER_HOST) == DNAT_EIP
    assert seen_from(lab, "vm2", PARTNER_HOST) == FIP_EIP
    to_partner = hold(lab, "vm1", PARTNER_HOST, ECHO_PORT, 3, "tcp", 46000)
    held.append(to_partner)
    elsewhere = hold(lab, "vm1", OTHER_HOST, ECHO_PORT, 2, "tcp", 46100)
    held.append(elsewhere)
    assert {answer.rsplit(":", 1)[0] for answer in to_partner.seen} == {PARTNER_EIP}
    assert {answer.rsplit(":", 1)[0] for answer in elsewhere.seen} == {DNAT_EIP}
    partner_id = {("kind", "snat"), ("name", "to-partner"), ("eip", PARTNER_EIP)}
    general_id = {("kind", "snat"), ("name", "my-snat"), ("eip", DNAT_EIP)}
    # Every connection counted for the rule that translated it (one exchange each above).
    assert value(daemon, "natgwd_rule_connections_total", partner_id) == 1 + 3
    assert value(daemon, "natgwd_rule_connections_total", general_id) == 1 + 2

    # Without the destination rule (a change of rules alone, on the delta path) the partner
    # sees the general EIP; with a narrower source the rule applies to that source alone.
    deltas = value(daemon, "natgwd_state_changes_total", {("path", "delta")}) or 0
    apply(daemon, {**seed_state, "snat": [general]})
    assert seen_from(lab, "vm1", PARTNER_HOST) == DNAT_EIP
    narrower = dict(seed_state["snat"][1], internalCIDR="172.20.10.3/32")
    apply(daemon, {**seed_state, "snat": [general, narrower], "fip": []})
    assert seen_from(lab, "vm1", PARTNER_HOST) == DNAT_EIP
    assert seen_from(lab, "vm2", PARTNER_HOST) == PARTNER_EIP
    assert seen_from(lab, "vm2", OTHER_HOST) == DNAT_EIP
    assert value(daemon, "natgwd_state_changes_total", {("path", "delta")}) == deltas + 2
