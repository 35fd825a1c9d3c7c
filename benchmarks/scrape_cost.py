"""What a /metrics scrape costs at scale, this tree's natgwd against another tree's
(a baseline: main, say), run by run in turn on the same machine.

    python -m benchmarks.scrape_cost --baseline DIR [--dnat 50000] [--runs 3]   (as root)

DIR is a copy of another revision's sources (`git archive main | tar -x -C DIR`). Each
run is a worker process in a fresh network namespace (net1/net2 veth), with the tree's
natgwd first on its path: natgwd's Daemon built as `natgwd run` builds it, with the
connection watcher (the default); the state of benchmarks.apply_scale applied; then
scrapes of the whole /metrics body (Answers.exposition: the counting sets read over
netlink, the rule counters, the watcher's lines), each timed (wall and this process's
CPU), with the sets' dumps timed apart. Memory: RSS after the apply (after the collector
and malloc_trim, as the daemon leaves it) and the peak RSS during the scrapes (VmHWM,
reset after the apply). The trees alternate run by run, so that the machine's load
falls on both; the load average is recorded with every run.

Results go to benchmarks/results/scrape_cost-<UTC timestamp>.json.
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

from benchmarks.netns import bare_gateway
from benchmarks.stats import summary

REPO = Path(__file__).resolve().parents[1]


def worker(dnat: int, scrapes: int, directory: Path) -> dict[str, Any]:
    import gc

    from benchmarks.apply_scale import build_state, encode
    from benchmarks.stats import rss_of
    from natgwd.cli import GC_THRESHOLDS
    from natgwd.kernel.conntrack import ConntrackCleaner
    from natgwd.kernel.netlink import Netlink, ensure_forwarding
    from natgwd.kernel.nft import KernelNft
    from natgwd.kernel.tc import KernelTc
    from natgwd.observability.connwatch import ConnectionWatch
    from natgwd.planning.counters import COUNTING_SETS
    from natgwd.runtime.daemon import Daemon, DaemonConfig
    from natgwd.runtime.logs import configure
    from natgwd.runtime.memory import release_freed_memory
    from natgwd.runtime.reconciler import Announce, Reconciler
    from natgwd.runtime.statefile import Reading

    configure("json", "warning")
    gc.set_threshold(*GC_THRESHOLDS)
    state_path = directory / "state.json"
    config = DaemonConfig(
        state_path=state_path,
        metrics_address=("127.0.0.1", 0),
        resync_interval=3600.0,
        applied_state_path=directory / "applied.json",
    )

    def reconciler(announce: Announce) -> Reconciler:
        return Reconciler(KernelNft(), Netlink(), ensure_forwarding, ConntrackCleaner(), announce, KernelTc())

    daemon = Daemon(config, reconciler, make_watch=ConnectionWatch)
    assert daemon.watch is not None
    daemon.watch.start()
    state_path.write_bytes(encode(build_state(dnat, 1000, 1000)))
    started = time.perf_counter()
    daemon.reconcile_file(Reading.CHANGED)
    apply_seconds = time.perf_counter() - started
    if not daemon.answers.readiness()[0]:
        raise RuntimeError(f"not applied: {daemon.answers.readiness()[1]}")
    gc.collect()
    release_freed_memory()
    after_apply = rss_of("self")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the scrapes' peak
    samples = []
    for _ in range(scrapes):
        load = os.getloadavg()[0]
        cpu, wall = time.process_time(), time.perf_counter()
        size = sum(map(len, daemon.answers.exposition()))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        release_freed_memory()  # as the endpoint does after sending
        samples.append({"seconds": wall, "cpu_seconds": cpu, "bytes": size, "loadavg": load})
    peak = rss_of("self")
    dumps = []
    nft = daemon.reconciler.nft
    for _ in range(scrapes):
        started = time.perf_counter()
        nft.read_counters(COUNTING_SETS)  # the kernel's dumps, decoded, no exposition
        dumps.append(time.perf_counter() - started)
    daemon.watch.stop()
    return {
        "apply_seconds": apply_seconds,
        "scrapes": samples,
        "read_counters_seconds": dumps,
        "rss_kb_after_apply": after_apply["VmRSS"],
        "rss_kb_after_scrapes": peak["VmRSS"],
        "peak_rss_kb_during_scrapes": peak["VmHWM"],
    }


def run_one(tree: Path, dnat: int, scrapes: int) -> dict[str, Any]:
    with bare_gateway("ngwscrape") as namespace, tempfile.TemporaryDirectory(prefix="natgwd-scrape-") as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": f"{tree}:{REPO}"}
        # This file as a script: the baseline's tree has no copy of it.
        command = ["ip", "netns", "exec", namespace, sys.executable, str(Path(__file__).resolve())]
        command += ["--worker", tmp, "--dnat", str(dnat), "--scrapes", str(scrapes)]
        subprocess.run(command, cwd=tree, env=env, check=True, timeout=1800)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another tree's sources, measured in turn with this one")
    parser.add_argument("--dnat", type=int, default=50000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each tree")
    parser.add_argument("--scrapes", type=int, default=5, help="scrapes per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        directory = Path(args.worker)
        directory.joinpath("out.json").write_text(json.dumps(worker(args.dnat, args.scrapes, directory)))
        return 0
    if os.geteuid() != 0:
        print("needs root: it creates network namespaces", file=sys.stderr)
        return 1
    trees = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for index in range(args.runs):
        for name, tree in trees.items() if index % 2 == 0 else reversed(trees.items()):
            load = os.getloadavg()
            result = run_one(tree, args.dnat, args.scrapes)
            result["loadavg_start"] = load
            runs[name].append(result)
            scrape = summary([s["seconds"] for s in result["scrapes"]])["median"]
            print(
                f"{name} run {index + 1}: scrape median {scrape:.3f} s, load {load[0]:.1f}, RSS after the apply "
                f"{result['rss_kb_after_apply'] // 1024} MB, peak {result['peak_rss_kb_during_scrapes'] // 1024} MB",
                file=sys.stderr,
                flush=True,
            )
    results = {
        "benchmark": "scrape_cost",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "size": {"dnat": args.dnat, "snat": 1000, "fip": 1000},
        "runs": runs,
        "summary": {name: summarize(results) for name, results in runs.items()},
    }
    # Here, not at the top: the worker runs this file over a baseline tree's benchmarks.
    from benchmarks.stats import write_results

    path = write_results("scrape_cost", results)
    print(json.dumps(results["summary"], indent=1))
    print(f"results: {path.relative_to(REPO)}")
    return 0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(values: list[float]) -> float:
        return float(summary(values)["median"])

    return {
        "scrape_seconds": summary([median([s["seconds"] for s in r["scrapes"]]) for r in runs]),
        "scrape_cpu_seconds": summary([median([s["cpu_seconds"] for s in r["scrapes"]]) for r in runs]),
        "read_counters_seconds": summary([median(r["read_counters_seconds"]) for r in runs]),
        "rss_mb_after_apply": summary([r["rss_kb_after_apply"] / 1024 for r in runs]),
        "peak_rss_mb_during_scrapes": summary([r["peak_rss_kb_during_scrapes"] / 1024 for r in runs]),
        "loadavg": summary([r["loadavg_start"][0] for r in runs]),
    }


if __name__ == "__main__":
    sys.exit(main())
