"""A scaled-out gateway (the `scaleOut` section) of N natgwd members behind a router that
spreads the VPC's flows over them by an L4 hash, as OVN does in Kube-OVN's replicas mode:
each EIP group has one owner, a member hands what belongs to another member's EIP to it,
conntrackd replicates every connection. Short exchanges of every kind all succeed,
long-lived flows live on, and after a member's silent death its groups move and its
flows go on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.lab.topology import EXTERNAL_HOST
from tests.integration.ha_lab import Flow, pids_in, start_flow
from tests.integration.helpers import wait_for
from tests.integration.scale_lab import EIPS, ScaleLab, member_address, scale_state


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
    # `natgwd status` in m0 names the owner of every group from its kernel.
    status = json.loads(
        lab.exec(
            "m0",
            sys.executable,
            "-m",
            "natgwd",
            "status",
            "--json",
            "--applied-state",
            str(lab.workdir / "m0" / "applied.json"),
        ).stdout
    )
    owners = {group["group"]: group["owner"] for group in status["groups"]}
    assert owners == {"g0": "this member", **{f"g{i}": member_address(i) for i in range(1, lab.members)}}
    assert status["groups"][1]["handed_over_packets"] > 0


# (client namespace, protocol, address, port) of the long-lived flows, two of each kind
# (two source ports: the hash spreads them).
LONG_LIVED = {
    "snat-tcp": ("vm3", "tcp", EXTERNAL_HOST, 9000),
    "snat-udp": ("vm3", "udp", EXTERNAL_HOST, 9001),
    "snat-host": ("vm1", "tcp", EXTERNAL_HOST, 9000),
    "dnat": ("ext", "tcp", EIPS["e0"], 8888),
    "share-dnat": ("ext", "tcp", EIPS["e1"], 9999),
    "fip-in": ("ext", "tcp", EIPS["e3"], 80),
    "fip-out": ("vm2", "tcp", EXTERNAL_HOST, 9000),
}


def start_long_lived(lab: ScaleLab, copies: int = 2) -> dict[str, Flow]:
    flows = {}
    for kind, (role, proto, address, port) in LONG_LIVED.items():
        for copy in range(copies):
            name = f"{kind}-{copy}"
            flows[name] = start_flow(lab, role, proto, address, port, name, period=0.05)
    for flow in flows.values():
        flow.wait_more(10)
    return flows


def all_progress(flows: dict[str, Flow], count: int = 10) -> None:
    for flow in flows.values():
        flow.wait_more(count, timeout=30)


def owned_by(lab: ScaleLab, roles: list[str]) -> dict[str, list[str]]:
    return {role: lab.scale_detail(role).get("owned_groups", []) for role in roles}


@pytest.mark.parametrize("members", [2, 3])
def test_a_member_dies_silently_its_groups_move_and_no_connection_is_lost(members: int) -> None:
    """Prevents: a member's death resetting the connections it translated (its EIPs move
    to a survivor that holds their connections), and its return losing any (it takes its
    groups back only after the preempt delay, with the connections synced to it)."""
    with ScaleLab(members=members, bfd=True) as lab:
        state = scale_state(members)
        lab.start_members(state)
        serve(lab)
        flows = start_long_lived(lab)
        victim, survivors = "m1", [r for r in lab.member_roles() if r != "m1"]
        lab.kill_member(victim)
        lab.drop_next_hop(victim)
        every_group = sorted(f"g{i}" for i in range(members))
        wait_for(
            lambda: sorted(g for groups in owned_by(lab, survivors).values() for g in groups) == every_group,
            "the survivors to own every group",
            timeout=20,
        )
        all_progress(flows)
        # Back as a new pod: it takes g1 back once the preempt delay has passed.
        lab.revive_member(victim, state)
        lab.wait_settled()
        all_progress(flows)
        broken = {name: flow.errors() for name, flow in flows.items() if flow.errors()}
        assert not broken
        # Each flow is still the one it was: TCP flows never reconnect (echo_flow), and the
        # UDP flows' answers kept naming the same translated source.
        for name, flow in flows.items():
            if name.startswith("snat-udp"):
                assert len({answer for _, answer in flow.echoes()}) == 1, (name, set(flow.echoes()))


def test_a_member_list_without_this_member_is_refused_and_nothing_applied() -> None:
    """Prevents: a member whose address the state does not list applying the table and
    starting keepalived with a member index it does not have."""
    with ScaleLab(members=2) as lab:
        state = scale_state(2)
        state["scaleOut"]["members"] = [{"address": member_address(1)}, {"address": "172.20.10.99"}]
        daemon = lab.start_member("m0", state)

        def refused() -> str | None:
            status, body = daemon.get("/readyz")
            return body if status == 503 and "$.scaleOut.members" in body else None

        body = wait_for(refused, "m0 to refuse the state", timeout=20)
        assert "lists no address of this member" in body and member_address(0) in body
        assert lab.exec("m0", "nft", "list", "table", "inet", "natgwd", check=False).returncode != 0
        assert daemon.metrics()["natgwd_desired_state_valid"] == 0
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids_in(lab, "m0")}
        assert not names & {"keepalived", "conntrackd"}, names
