"""The cost of natgwd's connection watching (open-connection gauges from conntrack
events) and of translation logs, at the highest new-connection rate the lab reaches.

    python -m benchmarks.observe_cost [--seconds 10] [--rounds 3]   (as root)

In the seed lab (natgwd.lab.topology), connrate's client in ext opens TCP connections through
DNAT (EIP:8888 -> vm1:80) for a fixed time, against natgwd run three ways, interleaved
round by round so that the machine's load hits all alike:

- off:     --no-connection-events (natgwd as before this feature)
- gauges:  the default: conntrack NEW/DESTROY events counted per rule and EIP
- logging: gauges plus --translation-log to a file, uncapped (every start and end line)
- baseline: with --baseline DIR, the gauges of another tree's natgwd (DIR holds its
  sources: `git archive main | tar -x -C DIR`), to tell a change's effect from the noise

Reported per way: connections per second (the client's), and natgwd's CPU seconds per
second during the run (from /proc/PID/stat). Writes benchmarks/results/observe-<UTC>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.compare import compile_connrate
from benchmarks.stats import summary
from natgwd.lab.topology import SEED_STATE, Lab

WAYS: dict[str, tuple[str, ...]] = {
    "off": ("--no-connection-events",),
    "gauges": (),
    "logging": ("--translation-log", "{log}", "--translation-log-rate", "1000000000"),
    "baseline": (),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


@contextlib.contextmanager
def python_path(tree: Path | None) -> Iterator[None]:
    """natgwd started meanwhile runs `tree`'s sources (the Lab passes its environment on)."""
    before = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def one_run(
    lab: Lab, connrate: Path, way: str, seconds: float, concurrency: int, baseline: Path | None = None
) -> dict[str, Any]:
    log_path = lab.workdir / f"translations-{way}.jsonl"
    args = [arg.format(log=log_path) for arg in WAYS[way]]
    with python_path(baseline if way == "baseline" else None):
        daemon = lab.start_natgwd(SEED_STATE, *args)
    try:
        daemon.wait_ready(timeout=60)
        daemon.wait_applied(timeout=60)
        time.sleep(3)  # natgwd's gratuitous ARP rounds, and the first dump, are over
        lab.exec("gw", "conntrack", "-F", check=False)
        load = os.getloadavg()[0]
        before = cpu_seconds(daemon.process.pid)
        started = time.monotonic()
        argv = [str(connrate), "client", "10.115.55.200", "8888", str(seconds), str(concurrency)]
        out = lab.exec("ext", *argv, timeout=seconds + 60).stdout
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(daemon.process.pid) - before) / elapsed
        result = json.loads(out)
        time.sleep(2)  # the events still queued are taken
        metrics = daemon.metrics()
        lines = sum(1 for _ in log_path.open()) if log_path.exists() else 0
        return {
            "loadavg": load,
            "rate": result["rate"],
            "natgwd_cpu": cpu,
            "connections": result["connections"],
            "log_lines": lines,
            "events_lost": metrics.get("natgwd_conntrack_events_lost_total"),
            "open": metrics.get('natgwd_eip_open_connections{eip="10.115.55.200"}'),
        }
    finally:
        daemon.stop()
        log_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--ways", default="off,gauges,logging", help=f"of {', '.join(WAYS)}, run in this order")
    parser.add_argument("--baseline", type=Path, help="another tree's sources, for the way 'baseline'")
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    if any(way not in WAYS for way in ways) or ("baseline" in ways) != (args.baseline is not None):
        parser.error("--ways: off, gauges, logging, and baseline with --baseline")
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        connrate = compile_connrate(Path(tmp))
        lab.spawn("vm1", str(connrate), "server", "80")
        lab.exec("ext", "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        for round_number in range(args.rounds):
            for way in ways if round_number % 2 == 0 else ways[::-1]:
                run = one_run(lab, connrate, way, args.seconds, args.concurrency, args.baseline)
                runs[way].append(run)
                print(f"round {round_number + 1} {way}: {run}", flush=True)
    results = {
        "when": datetime.now(UTC).isoformat(),
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "ways": {
            way: {
                "rate": summary([r["rate"] for r in done]),
                "natgwd_cpu": summary([r["natgwd_cpu"] for r in done]),
                # Each round's rate over the same round's rate without events: one ratio per round.
                "rate_over_off": summary([r["rate"] / off["rate"] for r, off in zip(done, runs["off"], strict=True)])
                if "off" in runs
                else None,
                "runs": done,
            }
            for way, done in runs.items()
        },
    }
    out = Path(__file__).parent / "results" / f"observe-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'way':<8} {'conn/s (median)':>16} {'natgwd CPU (median)':>20} {'rate / off (median, min-max)':>30}")
    for way, figures in results["ways"].items():
        ratio = figures["rate_over_off"]
        span = f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})" if ratio else "-"
        print(f"{way:<8} {figures['rate']['median']:>16.0f} {figures['natgwd_cpu']['median']:>20.3f} {span:>30}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
