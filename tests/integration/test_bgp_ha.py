"""Routed EIPs with issue 14's HA pair: only the active member announces the EIPs (the
standby too, with a longer AS path, when standbyPrepend asks), so a failover moves the
routes and the traffic, and a planned stop withdraws before the addresses move.

    vm1..vm3 ── lan ──┬── net1 [gwa] net2 10.115.50.1 ──┬── ext: BIRD (AS 65000), BFD 100 ms x 3
                      └── net1 [gwb] net2 10.115.50.2 ──┘   10.115.55.254/21, the flows' far end

The EIPs (198.19.100.10, .11) lie outside 10.115.48.0/21: ext reaches them only by the
routes the members announce. Each member has an address of its own on net2 (the BGP
session's source and the routes' nexthop) beside the ones keepalived moves.

A short series runs by default; the long one (10 failovers per mode, with and without the
standby's announcement) is `slow` and writes benchmarks/results/bgp_failover.json:

    pytest -m slow tests/integration/test_bgp_ha.py -p no:xdist -s
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab.topology import EXTERNAL_HOST, EXTERNAL_PREFIX, Natgwd
from tests.integration.bgp_lab import FAST_BFD, ROUTED, Bird, Peer, frr_run_dir, kernel_route, routed_state
from tests.integration.ha_lab import GATEWAYS, Flow, HaLab, ha_state, kill_all, start_flow, wait_role
from tests.integration.helpers import events_named, wait_for

OWN = {"gwa": "10.115.50.1", "gwb": "10.115.50.2"}
EIP, FIP = ROUTED["my-eip"][0], ROUTED["my-eip2"][0]
FLOWS = {
    "dnat": ("ext", "tcp", EIP, 8888),
    "snat": ("vm3", "tcp", EXTERNAL_HOST, 9000),
    "fip": ("vm2", "udp", EXTERNAL_HOST, 9001),
}
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bgp_failover.json"


class BgpHaLab(HaLab):
    def build(self) -> None:
        super().build()
        for gateway in GATEWAYS:
            self.exec(gateway, "ip", "addr", "add", f"{OWN[gateway]}/{EXTERNAL_PREFIX}", "dev", "net2")


def pair_state(standby_prepend: int) -> dict[str, Any]:
    state = ha_state()
    routed = routed_state(
        [{"address": EXTERNAL_HOST, "remoteAsn": 65000, "bfd": FAST_BFD}], ipv6=False, standbyPrepend=standby_prepend
    )
    state["eips"], state["bgp"] = routed["eips"], routed["bgp"]
    return state


class Pair:
    """The lab, BIRD, and the members as they come and go."""

    def __init__(self, lab: BgpHaLab, standby_prepend: int) -> None:
        self.lab = lab
        self.state = pair_state(standby_prepend)
        self.bird = Bird(lab, "ext", EXTERNAL_HOST, [Peer(g, EXTERNAL_HOST, OWN[g]) for g in GATEWAYS])
        self.members: dict[str, Natgwd] = {}
        for gateway, role in zip(GATEWAYS, ("master", "backup"), strict=True):
            self.start(gateway, role)
        wait_for(lambda: self.routed_via() == OWN["gwa"], "the route via gwa")
        self.wait_standby_path()

    def start(self, gateway: str, role: str) -> None:
        args = ("--bgp-run-dir", str(frr_run_dir(self.lab, gateway)))
        self.members[gateway] = self.lab.start_member(gateway, self.state, args=args)
        wait_role(self.members[gateway], role, timeout=30)
        self.bird.wait_established(gateway)
        # BFD, not the hold time (90 s), is what notices a silent death.
        wait_for(lambda: self.bird.bfd_up(OWN[gateway]), f"BFD with {gateway} up", timeout=30)

    def routed_via(self) -> str | None:
        return kernel_route(self.lab, "ext", EIP)

    def paths(self) -> list[str]:
        """The AS paths the upstream holds for the EIP, the best first."""
        shown = self.bird.birdc("show", "route", "all", f"{EIP}/32").stdout
        return [line.split(":", 1)[1].strip() for line in shown.splitlines() if "BGP.as_path" in line]

    def wait_paths(self, count: int) -> list[str]:
        return wait_for(lambda: len(found := self.paths()) == count and found, f"{count} paths at the upstream")

    def wait_standby_path(self) -> None:
        """With standbyPrepend: until the standby's path is at the upstream too (a member
        that just came back needs a few seconds: the session, then bgpd's first update)."""
        if self.state["bgp"]["standbyPrepend"]:
            self.wait_paths(2)


@pytest.fixture
def lab() -> Iterator[BgpHaLab]:
    with BgpHaLab() as built:
        yield built


def start_flows(pair: Pair) -> dict[str, Flow]:
    pair.lab.serve("vm1", tcp=[80])
    pair.lab.serve("ext", tcp=[9000], udp=[9001])
    return {name: new_flow(pair, name, name) for name in FLOWS}


def new_flow(pair: Pair, kind: str, name: str) -> Flow:
    role, proto, address, port = FLOWS[kind]
    flow = start_flow(pair.lab, role, proto, address, port, name)
    flow.wait_more(10)
    return flow


def holds(lab: HaLab, role: str, flows: dict[str, Flow]) -> bool:
    listing = lab.exec(role, "conntrack", "-L", check=False).stdout
    return all(f"sport={flow.local().rsplit(':', 1)[1]} " in listing for flow in flows.values())


def failovers(pair: Pair, flows: dict[str, Flow], rounds: int) -> list[dict[str, Any]]:
    """Silent deaths of the active member (every process SIGKILLed, links down), each
    followed by its return as the standby. Per round: when the route moved, the flows'
    largest gap, the flows lost."""
    lab, results = pair.lab, []
    active, standby = "gwa", "gwb"
    for number in range(rounds):
        wait_for(lambda s=standby: holds(lab, s, flows), f"{standby} to hold every flow")  # type: ignore[misc]
        pair.wait_standby_path()
        failed_at = time.monotonic()
        kill_all(lab, active)
        for interface in ("net1", "net2", "sync0"):
            lab.exec(active, "ip", "link", "set", interface, "down")
        wait_for(lambda s=standby: pair.routed_via() == OWN[s], f"the route via {standby}", timeout=20, interval=0.01)  # type: ignore[misc]
        route_moved = time.monotonic() - failed_at
        wait_role(pair.members[standby], "master", timeout=10)
        lost, gaps = [], {}
        for name, flow in flows.items():
            try:
                flow.wait_more(25, timeout=8)
                gaps[name] = round(flow.largest_gap(failed_at), 3)
            except (AssertionError, pytest.fail.Exception):
                lost.append(name)
        results.append({"round": number + 1, "route_moved_seconds": round(route_moved, 3), "gaps": gaps, "lost": lost})
        for name in lost:  # a new connection for the next round
            flows[name] = new_flow(pair, name, f"{name}-{number + 1}")
        for interface in ("net1", "net2", "sync0"):
            lab.exec(active, "ip", "link", "set", interface, "up")
        pair.start(active, "backup")
        active, standby = standby, active
    return results


def test_failovers_move_routes_and_keep_every_connection(lab: BgpHaLab) -> None:
    """Two silent deaths of the active member: each time the route follows the new
    active member and no connection is lost. The standby announces too (standbyPrepend),
    with a longer AS path, so upstream held its route already."""
    pair = Pair(lab, standby_prepend=2)
    # The standby's path is there, second best: BIRD holds both routes.
    assert pair.wait_paths(2) == ["65001", "65001 65001 65001"]
    assert pair.routed_via() == OWN["gwa"]
    standby = pair.members["gwb"]
    wait_for(lambda: standby.metrics().get('natgwd_bgp_owned_prefixes{role="standby"}') == 2, "standby prefixes")
    assert standby.metrics().get('natgwd_bgp_owned_prefixes{role="owner"}') == 0
    flows = start_flows(pair)
    rounds = failovers(pair, flows, rounds=2)
    assert [r["lost"] for r in rounds] == [[], []], rounds
    for flow in flows.values():
        assert not flow.errors()


def test_planned_switchover_withdraws_first_and_loses_nothing(lab: BgpHaLab) -> None:
    """SIGTERM to the active member: it withdraws its routes (upstream turns to the
    standby's path) before keepalived hands the addresses over, then the new active member
    announces as the owner. Every flow goes on."""
    pair = Pair(lab, standby_prepend=2)
    flows = start_flows(pair)
    wait_for(lambda: holds(lab, "gwb", flows), "gwb to hold every flow")
    stopped_at = time.monotonic()
    assert pair.members["gwa"].stop(signal.SIGTERM) == 0
    wait_role(pair.members["gwb"], "master", timeout=10)
    wait_for(lambda: pair.routed_via() == OWN["gwb"], "the route via gwb")
    for flow in flows.values():
        flow.wait_more(25, timeout=8)
        assert not flow.errors()
    withdrawn = events_named(pair.members["gwa"], "BGP announcements withdrawn")
    assert len(withdrawn) == 1
    became_master = [e for e in events_named(pair.members["gwb"], "HA role changed") if e["role"] == "master"]
    assert withdrawn[0]["timestamp"] < became_master[-1]["timestamp"]
    print(f"switchover: largest gaps { {name: flow.largest_gap(stopped_at) for name, flow in flows.items()} }")
    # gwb now announces as the owner: the short path.
    wait_for(lambda: pair.paths() == ["65001"], "gwb's path as the owner's")


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    moved = [r["route_moved_seconds"] for r in rounds]
    gaps = [gap for r in rounds for gap in r["gaps"].values()]
    return {
        "rounds": len(rounds),
        "route_moved_median": statistics.median(moved),
        "route_moved_max": max(moved),
        "gap_median": statistics.median(gaps) if gaps else None,
        "gap_max": max(gaps) if gaps else None,
        "lost_by_flow": {name: sum(name in r["lost"] for r in rounds) for name in FLOWS},
    }


@pytest.mark.slow
def test_ten_failovers_with_and_without_the_standby_announcing() -> None:
    results = {}
    for prepend in (2, 0):
        with BgpHaLab() as lab:
            pair = Pair(lab, standby_prepend=prepend)
            rounds = failovers(pair, start_flows(pair), rounds=10)
        results[f"standby_prepend_{prepend}"] = {"summary": summary(rounds), "rounds": rounds}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    for mode, result in results.items():
        print(mode, json.dumps(result["summary"]))
    # With the standby's path in place, no connection is lost; without it (the comparison)
    # upstream has no route from the BFD drop until the new active member's announcement.
    assert results["standby_prepend_2"]["summary"]["lost_by_flow"] == {name: 0 for name in FLOWS}
