"""CPU time of a full apply's Python stages, in process: natgwd's tree and another one
(such as main's) in turn, so that both share the machine's load.

    python -m benchmarks.python_stages [--sizes 10000,50000] [--rounds 2] [--baseline DIR]

Each round runs a fresh process per tree (PYTHONPATH=tree) that times, on
`benchmarks.rulesets.workload(N)`, what the daemon does before its nftables transaction:
`StateTracker.check` of the file's bytes (decode and validate), the full plan with its
ids (`TablePlan.assigning`), and the diff from an empty kernel with its script
(`plan_transaction`, `Transaction.script`), each the best CPU time of `--repeats`, with
Python's collector paused as the daemon pauses it. Results:
benchmarks/results/python_stages-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.stats import RESULTS_DIR, write_results

REPO = Path(__file__).resolve().parent.parent
STAGES = ("validate", "plan", "diff_and_script")


def worker(n: int, repeats: int) -> dict[str, float]:
    """The best CPU seconds of each stage, in this process's natgwd."""
    import gc
    import time

    from benchmarks.rulesets import encode, workload
    from natgwd.planning.plan import TablePlan
    from natgwd.planning.table import plan_transaction
    from natgwd.state.tracker import StateTracker

    raw = encode(workload(n).state)
    best = dict.fromkeys(STAGES, float("inf"))
    gc.disable()
    for _ in range(repeats):
        started = time.process_time()
        change = StateTracker().check(raw)
        validated = time.process_time()
        plan = TablePlan.assigning(change.state, {}, 0, ())
        planned = time.process_time()
        plan_transaction(None, plan.table).script()
        done = time.process_time()
        for stage, seconds in zip(STAGES, (validated - started, planned - validated, done - planned), strict=True):
            best[stage] = min(best[stage], seconds)
        del change, plan
        gc.collect()
    return best


def run_tree(tree: Path, n: int, repeats: int) -> dict[str, float]:
    out = subprocess.run(
        # This file run by its path: the other tree need not have it.
        [sys.executable, __file__, "--worker", str(n), "--repeats", str(repeats)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    stages: dict[str, float] = json.loads(out.stdout)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[10000, 50000],
        help="N, comma-separated",
    )
    parser.add_argument("--rounds", type=int, default=2, help="turns of natgwd then the baseline")
    parser.add_argument("--repeats", type=int, default=5, help="per process; the best is kept")
    parser.add_argument("--baseline", type=Path, help="another source tree, such as main's")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.repeats)))
        return 0
    trees = {"natgwd": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[str, Any] = {"loadavg_start": os.getloadavg(), "baseline": str(args.baseline), "sizes": {}}
    for n in args.sizes:
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                rounds[name].append(run_tree(tree, n, args.repeats))
        results["sizes"][str(n)] = rounds
        for name, runs in rounds.items():
            cells = " / ".join(
                f"{min(r[s] for r in runs) * 1000:,.0f}-{max(r[s] for r in runs) * 1000:,.0f}" for s in STAGES
            )
            totals = [sum(r.values()) * 1000 for r in runs]
            print(f"N={n:,} {name}: {' / '.join(STAGES)} = {cells} ms, in all {min(totals):,.0f}-{max(totals):,.0f} ms")
    results["loadavg_end"] = os.getloadavg()
    print(f"load average {results['loadavg_start'][0]:.1f} - {results['loadavg_end'][0]:.1f}")
    print(f"results: {write_results('python_stages', results, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
