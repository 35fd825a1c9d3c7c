"""natgwd's edit service alone through a controller's replay, this tree against another
(a baseline: main, say), run by run in turn on the same machine.

    python -m benchmarks.edit_service --baseline DIR [--dnat 10000 --snat 1000 --fip 1000] [--runs 2]

DIR is a copy of another revision's sources (`git archive main | tar -x -C DIR`). Each run
is a worker process with the tree first on its path, which carries the calls of
benchmarks.shim_replay (every EIP, SNAT, DNAT and FIP rule, one call each, in the
controller's order) through the tree's EditService on the reconciling thread's path
(parse, edit, diff, the edit log's append), with an apply that does nothing: the part of
a call that is natgwd's but neither the shell's round trip nor the kernel's apply, which
`shim_replay` times together. The medians by kind of call and at the start and end of the
DNAT rules say whether a call costs more with the rules held. The trees alternate run by
run, so that the machine's load falls on both; the load average is recorded with every run.

Results go to benchmarks/results/edit_service-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import summary

REPO = Path(__file__).resolve().parents[1]
PHASE = 1000  # calls at the start and at the end of the DNAT rules


def worker(dnat: int, snat: int, fip: int, directory: Path) -> dict[str, Any]:
    from benchmarks.apply_scale import build_state
    from benchmarks.shim_replay import GATEWAY_V4, controller_calls
    from natgwd.kubeovn.shim.protocol import Request
    from natgwd.kubeovn.shim.service import EditService
    from natgwd.runtime.logs import configure

    configure("json", "warning")
    state = build_state(dnat, snat, fip)
    calls = controller_calls(state)
    service = EditService(directory / "state.json", lambda: None, lambda _data: None, compact_idle=3600)
    start = {key: state[key] for key in ("version", "internal", "external")}
    service.accepted(json.dumps(start).encode(), "0" * 64)  # as natgwd's first reconcile of the file
    seconds: dict[str, list[float]] = {}
    for argv in calls:
        request = Request(GATEWAY_V4, tuple(argv))
        started = time.perf_counter()
        reply = service._serve(request, lambda _doc: None)  # the reconciling thread's part alone
        seconds.setdefault(argv[0], []).append(time.perf_counter() - started)
        if reply.code != 0:
            raise RuntimeError(f"{argv}: {reply}")
    every = [s for kind in ("eip-add", "snat-add", "dnat-add", "floating-ip-add") for s in seconds.get(kind, [])]
    dnats = seconds.get("dnat-add", [])
    return {
        "total_seconds": sum(every),
        "per_call": summary(every),
        "by_kind_median": {kind: summary(values)["median"] for kind, values in seconds.items()},
        "dnat_first_median": summary(dnats[:PHASE]).get("median"),
        "dnat_last_median": summary(dnats[-PHASE:]).get("median"),
    }


def run_one(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="natgwd-edits-") as tmp:
        env = {**os.environ, "PYTHONPATH": f"{tree}:{REPO}"}
        # This file as a script: the baseline's tree has no copy of it.
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", tmp]
        command += ["--dnat", str(args.dnat), "--snat", str(args.snat), "--fip", str(args.fip)]
        subprocess.run(command, cwd=tree, env=env, check=True, timeout=3600)
        result: dict[str, Any] = json.loads(Path(tmp, "out.json").read_text())
        return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another tree's sources, measured in turn with this one")
    parser.add_argument("--dnat", type=int, default=10000)
    parser.add_argument("--snat", type=int, default=1000)
    parser.add_argument("--fip", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2, help="runs of each tree")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        directory = Path(args.worker)
        directory.joinpath("out.json").write_text(json.dumps(worker(args.dnat, args.snat, args.fip, directory)))
        return 0
    from benchmarks.stats import write_results

    trees = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for index in range(args.runs):
        for name, tree in trees.items() if index % 2 == 0 else reversed(trees.items()):
            load = os.getloadavg()
            result = run_one(tree, args)
            result["load_average_before"] = [round(x, 2) for x in load]
            runs[name].append(result)
            print(f"{name} run {index + 1}: {result['total_seconds']:.2f} s (load {load[0]:.1f})", file=sys.stderr)
    results = {
        "sizes": {"dnat": args.dnat, "snat": args.snat, "fip": args.fip},
        "trees": {name: str(tree) for name, tree in trees.items()},
        "runs": runs,
    }
    out = write_results("edit_service", results)
    print(
        "| tree | run | total | per call median | eip-add | snat-add | dnat-add, first 1,000 | last 1,000 "
        "| floating-ip-add | load |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, done in runs.items():
        for number, run in enumerate(done, 1):
            kinds = run["by_kind_median"]
            print(
                f"| {name} | {number} | {run['total_seconds']:.2f} s | {_ms(run['per_call']['median'])} ms | "
                f"{_ms(kinds.get('eip-add'))} | {_ms(kinds.get('snat-add'))} | {_ms(run['dnat_first_median'])} | "
                f"{_ms(run['dnat_last_median'])} | {_ms(kinds.get('floating-ip-add'))} | "
                f"{run['load_average_before'][0]} |"
            )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
