"""A scaled-out gateway (the `scaleOut` section) of N natgwd members behind a router that
spreads the VPC's flows over them by an L4 hash, as OVN does in Kube-OVN's replicas mode:
each EIP group has one owner, a member hands what belongs to another member's EIP to it,
conntrackd replicates every connection. Short exchanges of every kind all succeed,
long-lived flows live on, and after a member's silent death its groups move and its
flows go on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from natgwd.lab.topology import EXTERNAL_HOST
from tests.integration.scale_lab import EIPS, ScaleLab, scale_state


@pytest.fixture(params=[2, 3], ids=["n2", "n3"])
def lab(request: pytest.FixtureRequest) -> Iterator[ScaleLab]:
    with ScaleLab(members=request.param) as built:
        yield built


def serve(lab: ScaleLab) -> None:
    lab.serve("vm1", tcp=[80, 81])  # the DNAT target (80) and a share backend (81)
    lab.serve("vm2", tcp=[80])  # the FIP's VM
    lab.serve("vm3", tcp=[80])  # the other share backend
    lab.serve("ext", tcp=[9000], udp=[9001])


# (client namespace, protocol, address, port): every kind of translation.
KINDS = {
    "snat-tcp": ("vm3", "tcp", EXTERNAL_HOST, 9000),
    "snat-udp": ("vm3", "udp", EXTERNAL_HOST, 9001),
    "snat-host": ("vm1", "tcp", EXTERNAL_HOST, 9000),
    "dnat": ("ext", "tcp", EIPS["e0"], 8888),
    "share-dnat": ("ext", "tcp", EIPS["e1"], 9999),
    "fip-in": ("ext", "tcp", EIPS["e3"], 80),
    "fip-out": ("vm2", "tcp", EXTERNAL_HOST, 9000),
}


def test_steady_state_every_kind_of_exchange_succeeds_and_every_member_translates(lab: ScaleLab) -> None:
    """Prevents: a reply that the hash sends to another member than the one that translated
    its connection being reset or lost (22% of short SNAT exchanges in Kube-OVN's mode)."""
    lab.start_members(scale_state(lab.members))
    serve(lab)
    for kind, (role, proto, address, port) in KINDS.items():
        outcome = lab.exchanges(role, proto, address, port, 100)
        assert outcome == {"ok": 100, "failures": {}}, (kind, outcome)
    # What ext saw as the source: only EIPs, the one of each rule (SNAT vm3 -> e0, vm1 -> e2, FIP vm2 -> e3).
    answers = {role: lab.http_get(role, EXTERNAL_HOST, 9000).split(":")[0] for role in ("vm1", "vm2", "vm3")}
    assert answers == {"vm1": EIPS["e2"], "vm2": EIPS["e3"], "vm3": EIPS["e0"]}
    # The hash sent every member packets of another member's EIPs, and each member
    # translated connections of its own.
    for role, daemon in lab.daemons.items():
        samples = daemon.metrics()
        handed = sum(v for k, v in samples.items() if k.startswith("natgwd_scale_handed_over_packets_total{"))
        translated = sum(v for k, v in samples.items() if k.startswith("natgwd_rule_connections_total{"))
        assert handed > 0 and translated > 0, (role, handed, translated)
