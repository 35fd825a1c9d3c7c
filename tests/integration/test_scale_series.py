"""Figures for benchmarks/RESULTS.md ("Scaling out"), slow; run with

    pytest -m slow tests/integration/test_scale_series.py -p no:xdist -s

- steady state: short exchanges of every kind through N = 2 and 3 members, scaled out
  (one owner per EIP group, hand-over, conntrackd) and as Kube-OVN's replicas mode runs
  today (every member holds every EIP and translates what the hash brings it): failures
  counted, by kind;
- failover: 20 silent member deaths in a row (every process stopped then killed, links
  down, the router drops its next hop after a BFD-like delay; the member then comes back
  as a new pod), with conntrackd and without it: how long until the survivors own every
  group, the largest gap of each long-lived flow, the flows lost.

The figures go to benchmarks/results/scale_out.json and a summary is printed. Only the
scaled-out mode's zero losses are asserted; the other figures are what they are.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.ha_lab import Flow, start_flow
from tests.integration.helpers import wait_for
from tests.integration.scale_lab import ScaleLab, scale_state
from tests.integration.test_scale import KINDS, LONG_LIVED, owned_by, serve

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "scale_out.json"
ROUNDS = 20
EXCHANGES = 300  # per kind and mode
BFD_DELAY_SECONDS = 0.3  # OVN's default BFD detection: 3 x 100 ms


def steady_state(members: int, upstream: bool) -> dict[str, Any]:
    with ScaleLab(members=members, upstream=upstream) as lab:
        lab.start_members(scale_state(members, upstream=upstream))
        serve(lab)
        outcome = {}
        for kind, (role, proto, address, port) in KINDS.items():
            result = lab.exchanges(role, proto, address, port, EXCHANGES, timeout=0.5)
            outcome[kind] = {"ok": result["ok"], "failed": EXCHANGES - result["ok"], "errors": result["failures"]}
        return outcome


def failover_series(members: int, sync: bool) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    with ScaleLab(members=members) as lab:
        state = scale_state(members, sync=sync)
        lab.start_members(state)
        serve(lab)
        started = 0

        def new_flow(kind: str) -> Flow:
            """A new flow of `kind`; one that cannot connect stays in the table and counts
            as lost in the next round (its log holds no echo)."""
            nonlocal started
            started += 1
            role, proto, address, port = LONG_LIVED[kind]
            name = f"{kind}-{int(sync)}-{started}"
            try:
                flow = start_flow(lab, role, proto, address, port, name, period=0.05)
                flow.wait_more(5)
            except (AssertionError, pytest.fail.Exception):
                flow = Flow(name, lab.workdir / f"flow-{name}.log")
            return flow

        flows = {f"{kind}-{copy}": new_flow(kind) for kind in LONG_LIVED for copy in range(2)}
        every_group = sorted(f"g{i}" for i in range(members))
        for number in range(ROUNDS):
            victim = lab.member_roles()[number % members]
            survivors = [r for r in lab.member_roles() if r != victim]
            failed_at = time.monotonic()
            lab.kill_member(victim)
            time.sleep(BFD_DELAY_SECONDS)  # the modelled BFD detection, not a wait for a condition
            lab.drop_next_hop(victim)
            wait_for(
                lambda s=survivors: sorted(g for gs in owned_by(lab, s).values() for g in gs) == every_group,
                "the survivors to own every group",
                timeout=20,
                interval=0.02,
            )
            moved = time.monotonic() - failed_at
            lost, gaps = [], {}
            for name, flow in flows.items():
                try:
                    flow.wait_more(10, timeout=8)
                    gaps[name] = round(flow.largest_gap(failed_at), 3)
                except (AssertionError, pytest.fail.Exception):
                    lost.append(name)
            for name in lost:
                flows[name] = new_flow(name.rsplit("-", 1)[0])
            lab.revive_member(victim, state)
            lab.wait_settled()
            back_lost = []
            for name, flow in flows.items():
                try:
                    flow.wait_more(10, timeout=8)
                except (AssertionError, pytest.fail.Exception):
                    back_lost.append(name)
            for name in back_lost:
                flows[name] = new_flow(name.rsplit("-", 1)[0])
            rounds.append(
                {
                    "round": number + 1,
                    "victim": victim,
                    "moved_seconds": round(moved, 3),
                    "gaps": gaps,
                    "lost_at_death": lost,
                    "lost_at_return": back_lost,
                }
            )
    return rounds


def failover_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = [gap for r in rounds for gap in r["gaps"].values()]
    moves = [r["moved_seconds"] for r in rounds]
    return {
        "rounds": len(rounds),
        "moved_median_seconds": statistics.median(moves),
        "moved_max_seconds": max(moves),
        "gap_median_seconds": statistics.median(gaps) if gaps else None,
        "gap_max_seconds": max(gaps) if gaps else None,
        "lost_at_death": sum(len(r["lost_at_death"]) for r in rounds),
        "lost_at_return": sum(len(r["lost_at_return"]) for r in rounds),
        "lost_by_kind": {
            kind: sum(name.startswith(kind + "-") for r in rounds for name in r["lost_at_death"] + r["lost_at_return"])
            for kind in LONG_LIVED
        },
    }


def record(part: str, outcome: dict[str, Any]) -> None:
    """Merge one part's figures into the results file (each part runs on its own)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[part] = outcome
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("members", [2, 3])
def test_steady_state_against_the_replicas_mode(members: int) -> None:
    outcome = {mode: steady_state(members, mode == "upstream") for mode in ("upstream", "scaled_out")}
    record(f"steady_state_n{members}", outcome)
    for mode, kinds in outcome.items():
        print(mode, members, {kind: value["failed"] for kind, value in kinds.items()})
    assert all(value["failed"] == 0 for value in outcome["scaled_out"].values()), outcome["scaled_out"]


@pytest.mark.slow
@pytest.mark.parametrize("members", [2, 3])
def test_twenty_member_deaths_with_and_without_conntrackd(members: int) -> None:
    outcome = {}
    for sync in (True, False):
        rounds = failover_series(members, sync)
        outcome["conntrackd" if sync else "no_conntrackd"] = {"summary": failover_summary(rounds), "rounds": rounds}
        print(members, "conntrackd" if sync else "no_conntrackd", json.dumps(failover_summary(rounds)))
    record(f"failover_n{members}", outcome)
    synced = outcome["conntrackd"]["summary"]
    assert synced["lost_at_death"] == 0 and synced["lost_at_return"] == 0, synced
