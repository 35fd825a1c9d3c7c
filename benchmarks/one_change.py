"""One change among N rules, natgwd against its floor (and another natgwd tree), change by
change in turn.

    python -m benchmarks.one_change [--size 10000] [--rounds 10] [--baseline DIR]   (as root)

The changes are those of `make bench`'s one-change section (rounds of one DNAT rule added,
one changed, one deleted: benchmarks.rulesets.change_steps), timed the same way:

- natgwd: the daemon as deployed, started on the gateway's EIPs without rules and given
  the full rule set (untimed); the clock runs from the rename of the new state file until
  natgwd's applied-state record names it (the kernel then holds the change).
- floor: `nft -f` of the same change as one transaction (rendered beforehand).
- baseline (with --baseline DIR): the natgwd of another source tree, such as main's
  (`git archive main | tar -x -C DIR`), timed as natgwd is: an A/B of a change.

Each method has a Lab of its own, and each change is made by all of them one after the
other (natgwd, baseline, floor, natgwd, ...), so that the machine's load, which moves
within seconds on a shared machine, falls on all of them alike: the per-change ratios are
the measure. Results: benchmarks/results/one_change-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import intree, rulesets
from benchmarks.compare import (
    NATGWD_SETTLE_SECONDS,
    Context,
    FloorGateway,
    Gateway,
    NatgwdGateway,
    daemon_log,
    log,
    statistics_line,
)
from benchmarks.stats import summary, write_results
from natgwd.lab.topology import VM_ADDRESSES, Lab


def run(ctx: Context, n: int, rounds: int, baseline: Path | None) -> dict[str, Any]:
    work = rulesets.workload(n)
    steps = rulesets.change_steps(work, rounds)
    result: dict[str, Any] = {"n": n, "mix": work.counts, "changes": len(steps), "loadavg_start": os.getloadavg()}
    names = ("natgwd", "baseline", "floor") if baseline is not None else ("natgwd", "floor")
    times: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        labs = {name: stack.enter_context(Lab(vms=(VM_ADDRESSES[0],))) for name in names}
        gateways: list[Gateway] = [NatgwdGateway(labs["natgwd"], ctx, work)]
        if baseline is not None:
            gateways.append(intree.BaselineGateway(labs["baseline"], ctx, work, baseline))
        gateways.append(FloorGateway(labs["floor"], ctx, work))
        try:
            for gateway in gateways:
                gateway.setup()
                gateway.full_apply()
                if isinstance(gateway, NatgwdGateway):
                    time.sleep(NATGWD_SETTLE_SECONDS)  # its gratuitous ARPs are not the changes' to share the CPU with
            for step in steps:
                for gateway in gateways:
                    times[gateway.name].append(gateway.change(step))
            for gateway in gateways:
                gateway.verify(steps[-1].state)
                if isinstance(gateway, NatgwdGateway):
                    # The daemon's own time per change, from its "desired state applied" lines.
                    lines = daemon_log(gateway.daemon.log())
                    own = [lines[e["sha256"][:12]].get("seconds") for e in gateway.events if e["kind"] != "full"]
                    result[f"{gateway.name}_own"] = summary([s for s in own if s is not None])
        finally:
            ctx.stop_all()
            for gateway in gateways:
                gateway.close()
    result["loadavg_end"] = os.getloadavg()
    for name in names:
        result[name] = summary(times[name])
    result["natgwd_per_floor"] = summary([a / b for a, b in zip(times["natgwd"], times["floor"], strict=True)])
    line = f"natgwd {statistics_line(times['natgwd'])}"
    if baseline is not None:
        result["natgwd_per_baseline"] = summary(
            [a / b for a, b in zip(times["natgwd"], times["baseline"], strict=True)]
        )
        line += f", baseline {statistics_line(times['baseline'])}"
    log(f"one change N={n:,}: {line}, floor {statistics_line(times['floor'])}")
    return result


def table(result: dict[str, Any]) -> list[str]:
    def ms(stats: dict[str, Any]) -> str:
        return f"{stats['median'] * 1000:.1f} ms ({stats['min'] * 1000:.1f} - {stats['max'] * 1000:.1f})"

    rows = [
        "| method | one change: median (min - max) | its own log: median | per change / floor: median |",
        "|---|---:|---:|---:|",
    ]
    for name in ("natgwd", "baseline", "floor"):
        if name not in result:
            continue
        own = result.get(f"{name}_own", {})
        own_text = f"{own['median'] * 1000:.1f} ms" if own.get("n") else "-"
        per_floor = f"{result['natgwd_per_floor']['median']:.2f}" if name == "natgwd" else "-"
        rows.append(f"| {name} | {ms(result[name])} | {own_text} | {per_floor} |")
    if "natgwd_per_baseline" in result:
        ratios = result["natgwd_per_baseline"]
        rows.append(
            f"\nnatgwd / baseline per change: median {ratios['median']:.2f} ({ratios['min']:.2f} - {ratios['max']:.2f})"
        )
    start, end = result["loadavg_start"][0], result["loadavg_end"][0]
    rows.append(f"load average {start:.1f} - {end:.1f}; {result['changes']} changes at N={result['n']:,}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10000, help="N (make bench's mix of DNAT, SNAT and FIP)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of one add, one change, one delete")
    intree.add_arguments(parser)
    args = parser.parse_args(argv)
    if not intree.runnable(parser, args):
        return 1
    results: dict[str, Any] = {
        "benchmark": "one_change",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"baseline": str(args.baseline)} if args.baseline else {}),
        **({"note": args.note} if args.note else {}),
    }
    results["one_change"] = intree.measured(
        args, "natgwd-one-change-", lambda ctx: run(ctx, args.size, args.rounds, args.baseline)
    )
    path = write_results("one_change", results, args.results_dir)
    print("\n".join(table(results["one_change"])))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
