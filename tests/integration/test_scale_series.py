"""Figures for benchmarks/RESULTS.md ("Scaling out"), slow; run with

    pytest -m slow tests/integration/test_scale_series.py -p no:xdist -s

- steady state: 10,000 short exchanges across every kind (20 clients of each kind at
  once, each exchange on a new connection or socket) while 200 long-lived flows of every
  kind run, through N = 2 and 3 members, scaled out (one owner per EIP group, hand-over,
  conntrackd) and as Kube-OVN's replicas mode runs today (every member holds every EIP
  and translates what the hash brings it): failures counted by kind and error, flows
  lost (the default suite's test_scale.py runs 100 exchanges of each kind);
- failover: 20 silent member deaths in a row (every process stopped then killed, links
  down, the router drops its next hop after a BFD-like delay; the member then comes back
  as a new pod), with conntrackd and without it: how long until the survivors own every
  group, the largest gap of each long-lived flow, the flows lost.

The figures go to benchmarks/results/scale_out.json and a summary is printed. Only the
scaled-out mode's zero losses are asserted; the other figures are what they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.ha_lab import Flow, start_flow, start_flows
from tests.integration.helpers import client_command, wait_for
from tests.integration.scale_lab import ScaleLab, scale_state
from tests.integration.test_scale import KINDS, LONG_LIVED, owned_by, serve

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "scale_out.json"
ROUNDS = 20
SHORT = 10_000  # short exchanges per mode, across every kind
LONG_LIVED_FLOWS = 200  # per mode, across every kind
CLIENTS_PER_KIND = 20
EXCHANGE_TIMEOUT = 2.0
FLOW_PATIENCE = 30.0
BFD_DELAY_SECONDS = 0.3  # OVN's default BFD detection: 3 x 100 ms


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` counts differing by at most one."""
    share, extra = divmod(total, parts)
    return [share + (i < extra) for i in range(parts)]


def parallel_exchanges(lab: ScaleLab, kind: str, count: int) -> dict[str, Any]:
    """`count` short exchanges of `kind` by CLIENTS_PER_KIND clients at once (a lost
    answer costs its whole timeout); their summed outcome."""
    role, proto, address, port = KINDS[kind]
    runs = []
    for i, share in enumerate(split(count, CLIENTS_PER_KIND)):
        log = lab.workdir / f"exchanges-{kind}-{i}.json"
        command = client_command("exchanges", proto, address, port, share, EXCHANGE_TIMEOUT)
        runs.append((log, share, lab.spawn(role, *command, log_path=log)))
    ok, errors = 0, Counter[str]()
    for log, share, process in runs:
        process.wait(timeout=share * (EXCHANGE_TIMEOUT + 1) + 60)
        outcome = json.loads(log.read_text())
        ok += outcome["ok"]
        errors.update(outcome["failures"])
    return {"ok": ok, "failed": count - ok, "errors": dict(errors)}


def flows_lost(flows: dict[str, list[Flow]]) -> dict[str, Any]:
    """Which long-lived flows broke (an error logged, no progress, or a UDP flow whose
    answers named a second translated source): waits until each flow echoed 5 more times
    or broke, at most FLOW_PATIENCE seconds in all."""
    wanted = {flow.name: len(flow.echoes()) + 5 for group in flows.values() for flow in group}

    def settled(flow: Flow) -> bool:
        return bool(flow.errors()) or len(flow.echoes()) >= wanted[flow.name]

    every = [flow for group in flows.values() for flow in group]
    with contextlib.suppress(AssertionError, pytest.fail.Exception):
        wait_for(
            lambda: all(settled(flow) for flow in every), "every long-lived flow to echo or break", FLOW_PATIENCE, 0.5
        )
    lost: dict[str, list[str]] = {}
    for kind, group in flows.items():
        for flow in group:
            if flow.errors():
                reason = flow.errors()[0].split(":")[0].removeprefix("error ")
            elif len(flow.echoes()) < wanted[flow.name]:
                reason = "no progress"
            elif len({answer for _, answer in flow.echoes()}) > 1:
                reason = "new translated source"
            else:
                continue
            lost.setdefault(kind, []).append(reason)
    return {
        "flows": len(every),
        "lost": sum(len(reasons) for reasons in lost.values()),
        "lost_by_kind": {kind: len(reasons) for kind, reasons in lost.items()},
        "reasons": dict(Counter(reason for reasons in lost.values() for reason in reasons)),
    }


def steady_state(members: int, upstream: bool) -> dict[str, Any]:
    """SHORT exchanges across every kind while LONG_LIVED_FLOWS flows run, then whether
    those flows lived through it."""
    with ScaleLab(members=members, upstream=upstream) as lab:
        lab.start_members(scale_state(members, upstream=upstream))
        serve(lab)
        flows = {
            kind: start_flows(lab, *LONG_LIVED[kind], f"{kind}-{int(upstream)}", count)
            for kind, count in zip(LONG_LIVED, split(LONG_LIVED_FLOWS, len(LONG_LIVED)), strict=True)
        }
        every = [flow for group in flows.values() for flow in group]
        with contextlib.suppress(AssertionError, pytest.fail.Exception):
            wait_for(
                lambda: all(flow.errors() or len(flow.echoes()) >= 3 for flow in every),
                "every long-lived flow to start",
                FLOW_PATIENCE,
                0.5,
            )
        started = time.monotonic()
        short = {}
        with ThreadPoolExecutor(len(KINDS)) as pool:
            jobs = {
                kind: pool.submit(parallel_exchanges, lab, kind, count)
                for kind, count in zip(KINDS, split(SHORT, len(KINDS)), strict=True)
            }
            short = {kind: job.result() for kind, job in jobs.items()}
        seconds = time.monotonic() - started
        long_lived = flows_lost(flows)
        packets = {
            role: {
                name: sum(v for k, v in daemon.metrics().items() if k.startswith(f"natgwd_{metric}{{"))
                for name, metric in (
                    ("translated", "rule_packets_total"),
                    ("handed_over", "scale_handed_over_packets_total"),
                )
            }
            for role, daemon in lab.daemons.items()
        }
        return {
            "short": short,
            "short_total": {
                "exchanges": SHORT,
                "failed": sum(v["failed"] for v in short.values()),
                "errors": dict(sum((Counter(v["errors"]) for v in short.values()), Counter())),
                "seconds": round(seconds, 1),
            },
            "long_lived": long_lived,
            "packets_by_member": packets,
            "load": os.getloadavg(),
        }


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
    for mode, figures in outcome.items():
        print(mode, members, json.dumps({key: figures[key] for key in ("short_total", "long_lived", "load")}))
        print(" ", {kind: value["failed"] for kind, value in figures["short"].items()})
    scaled = outcome["scaled_out"]
    assert scaled["short_total"]["failed"] == 0, scaled["short"]
    assert scaled["long_lived"]["lost"] == 0, scaled["long_lived"]
    # The hash spread the traffic: every member translated and handed over.
    assert all(p["translated"] > 0 and p["handed_over"] > 0 for p in scaled["packets_by_member"].values()), scaled


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
