"""The shell's part of a nat-gateway.sh call: this tree's script against another tree's
(a baseline: main, say), call by call in turn, against one edit endpoint that answers at
once.

    python -m benchmarks.shim_round_trip --baseline DIR [--calls 500]

DIR is a copy of another revision's sources (`git archive main | tar -x -C DIR`). natgwd's
EditEndpoint listens on its loopback address (this process's network namespace) with a
submit that answers `get-iptables-version` without a document: each call is timed from
the fork of `bash nat-gateway.sh get-iptables-version` to the end of its output (the
caller waits for every holder of its stdout and stderr, as the controller's exec does).
With --bare, a `bash` running an empty script is timed too: the floor of any script. The
scripts alternate call by call, so that the machine's load falls on all; the load average
is recorded.

Results go to benchmarks/results/shim_round_trip-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.stats import summary, write_results
from natgwd.kubeovn.shim.call import Reply
from natgwd.kubeovn.shim.endpoint import EditEndpoint
from natgwd.kubeovn.shim.grammar import IPTABLES_VERSION

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path("image") / "nat-gateway.sh"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another tree's sources, its script timed in turn with this one")
    parser.add_argument("--calls", type=int, default=500, help="calls of each script")
    parser.add_argument("--bare", action="store_true", help="also time bash running an empty script")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="natgwd-round-trip-") as tmp:
        scripts = {"this": REPO / SCRIPT} | ({"baseline": args.baseline.resolve() / SCRIPT} if args.baseline else {})
        if args.bare:
            scripts["bare bash"] = Path(tmp) / "empty.sh"
            scripts["bare bash"].write_text("exit 0\n")
        token = Path(tmp) / "edit.token"
        answer = Reply(0, f"get-iptables-version \n{IPTABLES_VERSION}\n", "")
        endpoint = EditEndpoint(0, token, lambda _request: answer)
        endpoint.start()
        env = {"PATH": os.environ["PATH"], "NATGWD_EDIT_TOKEN": str(token), "NATGWD_PYTHON": "/nonexistent"}
        seconds: dict[str, list[float]] = {name: [] for name in scripts}
        load_before = os.getloadavg()
        try:
            for _ in range(args.calls):
                for name, script in scripts.items():
                    started = time.perf_counter()
                    done = subprocess.run(["bash", str(script), "get-iptables-version"], env=env, capture_output=True)
                    seconds[name].append(time.perf_counter() - started)
                    if done.returncode != 0:
                        raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr.decode()[-300:]}")
        finally:
            endpoint.stop()
    results = {
        "calls": args.calls,
        "scripts": {name: str(script) for name, script in scripts.items()},
        "per_call": {name: summary(values) for name, values in seconds.items()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    out = write_results("shim_round_trip", results)
    print(
        f"{args.calls} calls of each, load average {results['load_average_before']} -> {results['load_average_after']}"
    )
    print("| script | median | p95 | max |")
    print("|---|---:|---:|---:|")
    for name, stats in results["per_call"].items():
        cells = " | ".join(f"{stats[key] * 1000:.2f} ms" for key in ("median", "p95", "max"))
        print(f"| {name} | {cells} |")
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
