"""The cost of natgwd's connection watching (open-connection gauges from conntrack
events) and of translation logs, at the highest new-connection rate the lab reaches.

    python -m benchmarks.observe_cost [--seconds 4] [--rounds 15] [--ways off,gauges]   (as root)

In the seed lab (natgwd.lab.topology), connrate's client in ext, pinned to one CPU
(--client-cpu), opens TCP connections through DNAT (EIP:8888 -> vm1:80) for a fixed time,
against natgwd run these ways, one run of each per round, in turn, the order reversed
every other round (A B B A ...), so that the machine's load, which varies from minute to
minute on a shared machine, hits all alike:

- off:     --no-connection-events (natgwd as before this feature)
- gauges:  the default: conntrack NEW/DESTROY events counted per rule and EIP
- logging: gauges plus --translation-log to a file, uncapped (every start and end line)
- baseline: with --baseline DIR, the gauges of another tree's natgwd (DIR holds its
  sources: `git archive main | tar -x -C DIR`), to tell a change's effect from the noise

Two views of the cost, each way against `off` in the same round:
- the rate: the client's connections per second, over the same round's without events;
- CPU accounting: natgwd's CPU seconds per 1,000 connections above the same round's
  without events, over the lab's CPU per 1,000 connections without events (the client's
  and the server's CPU, natgwd's, and the machine's softirq time, which also holds other
  work's), i.e. the share of a connection's CPU that the events add; and natgwd's CPU
  per event above `off` (two events per connection: NEW and DESTROY).
Each run's load average is kept with it. Writes benchmarks/results/observe-<UTC>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.compare import compile_connrate
from benchmarks.stats import percentile, summary, write_results
from natgwd.lab.topology import SEED_STATE, Lab

WAYS: dict[str, tuple[str, ...]] = {
    "off": ("--no-connection-events",),
    "gauges": (),
    "logging": ("--translation-log", "{log}", "--translation-log-rate", "1000000000"),
    "baseline": (),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The process's time on a CPU, its threads summed, to the nanosecond (schedstat: the
    utime and stime of /proc/PID/stat count in ticks of 10 ms, a tenth of a run's figure)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9


def softirq_seconds() -> float:
    """The machine's time in softirqs (all CPUs): where much of forwarding is accounted."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[7]) / CLK_TCK  # cpu user nice system idle iowait irq softirq


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def python_path(tree: Path | None) -> Iterator[None]:
    """natgwd started meanwhile runs `tree`'s sources (the Lab passes its environment on).
    PYTHONSAFEPATH: `python -m natgwd` would otherwise put the working directory first on
    its path, ahead of PYTHONPATH, and run this tree's natgwd when started from it."""
    before = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if tree is not None:
        os.environ.update(PYTHONPATH=str(tree), PYTHONSAFEPATH="1")
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def natgwd_tree(tree: Path | None) -> str:
    """Where `python -m natgwd` finds natgwd, started as the lab starts it."""
    with python_path(tree):
        found = subprocess.run(
            [sys.executable, "-c", "import natgwd; print(natgwd.__file__)"],
            capture_output=True,
            text=True,
            check=True,
        )
    return str(Path(found.stdout.strip()).parent.parent)


def one_run(
    lab: Lab,
    connrate: Path,
    server_pid: int,
    way: str,
    options: argparse.Namespace,
) -> dict[str, Any]:
    log_path = lab.workdir / f"translations-{way}.jsonl"
    args = [arg.format(log=log_path) for arg in WAYS[way]]
    with python_path(options.baseline if way == "baseline" else None):
        daemon = lab.start_natgwd(SEED_STATE, *args)
    try:
        daemon.wait_ready(timeout=60)
        daemon.wait_applied(timeout=60)
        time.sleep(3)  # natgwd's gratuitous ARP rounds, and the first dump, are over
        lab.exec("gw", "conntrack", "-F", check=False)
        load = os.getloadavg()[0]
        pid = daemon.process.pid
        before = (cpu_seconds(pid), cpu_seconds(server_pid), children_cpu_seconds(), softirq_seconds())
        started = time.monotonic()
        pinned = ["taskset", "-c", str(options.client_cpu)] if options.client_cpu >= 0 else []
        argv = [*pinned, str(connrate), "client", "10.115.55.200", "8888", str(options.seconds)]
        out = lab.exec("ext", *argv, str(options.concurrency), timeout=options.seconds + 60).stdout
        elapsed = time.monotonic() - started
        natgwd, server, client, softirq = (
            after - was
            for after, was in zip(
                (cpu_seconds(pid), cpu_seconds(server_pid), children_cpu_seconds(), softirq_seconds()),
                before,
                strict=True,
            )
        )
        result = json.loads(out)
        time.sleep(2)  # the events still queued are taken
        metrics = daemon.metrics()
        lines = sum(1 for _ in log_path.open()) if log_path.exists() else 0
        thousands = result["connections"] / 1000
        return {
            "loadavg": load,
            "loadavg_end": os.getloadavg()[0],
            "rate": result["rate"],
            "connections": result["connections"],
            "seconds": elapsed,
            "natgwd_cpu": natgwd / elapsed,
            "natgwd_cpu_per_1000": natgwd / thousands,
            # What a connection costs the lab: its two ends, natgwd, and forwarding in softirqs.
            "lab_cpu_per_1000": (natgwd + server + client + softirq) / thousands,
            "cpu_seconds": {"natgwd": natgwd, "server": server, "client": client, "softirq": softirq},
            "log_lines": lines,
            "events_lost": metrics.get("natgwd_conntrack_events_lost_total"),
            "open": metrics.get('natgwd_eip_open_connections{eip="10.115.55.200"}'),
        }
    finally:
        daemon.stop()
        log_path.unlink(missing_ok=True)


def spread(values: list[float]) -> dict[str, Any]:
    """summary() with the quartiles: the middle half of the pairs."""
    return {**summary(values), "p25": percentile(values, 25), "p75": percentile(values, 75)} if values else {"n": 0}


def against_off(runs: dict[str, list[dict[str, Any]]], way: str) -> dict[str, Any] | None:
    """Each round's figures for `way` over the same round's without events."""
    if way == "off" or "off" not in runs:
        return None
    pairs = list(zip(runs[way], runs["off"], strict=True))
    return {
        "rate_ratio": spread([run["rate"] / off["rate"] for run, off in pairs]),
        "cpu_share": spread(
            [(run["natgwd_cpu_per_1000"] - off["natgwd_cpu_per_1000"]) / off["lab_cpu_per_1000"] for run, off in pairs]
        ),
        # NEW and DESTROY: two events per connection.
        "cpu_us_per_event": spread(
            [(run["natgwd_cpu_per_1000"] - off["natgwd_cpu_per_1000"]) / 2000 * 1e6 for run, off in pairs]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4, help="length of one run")
    parser.add_argument("--rounds", type=int, default=15, help="runs of each way, in turn")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--client-cpu", type=int, default=(os.cpu_count() or 1) - 1, help="-1: not pinned")
    parser.add_argument("--ways", default="off,gauges", help=f"of {', '.join(WAYS)}, run in this order")
    parser.add_argument("--baseline", type=Path, help="another tree's sources, for the way 'baseline'")
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    if any(way not in WAYS for way in ways) or ("baseline" in ways) != (args.baseline is not None):
        parser.error("--ways: off, gauges, logging, and baseline with --baseline")
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    trees = {way: natgwd_tree(args.baseline if way == "baseline" else None) for way in ways}
    if "baseline" in ways and trees["baseline"] != str(args.baseline.resolve()):
        parser.error(f"natgwd of the baseline would come from {trees['baseline']}, not {args.baseline}")
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        connrate = compile_connrate(Path(tmp))
        server = lab.spawn("vm1", str(connrate), "server", "80")
        lab.exec("ext", "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        for round_number in range(args.rounds):
            for way in ways if round_number % 2 == 0 else ways[::-1]:
                run = one_run(lab, connrate, server.pid, way, args)
                runs[way].append(run)
                print(
                    f"round {round_number + 1} {way}: {run['rate']:,.0f}/s, natgwd "
                    f"{run['natgwd_cpu_per_1000']:.3f} s per 1,000, load {run['loadavg']:.1f}",
                    flush=True,
                )
    results = {
        "when": started.isoformat(),
        "command": " ".join(["python -m benchmarks.observe_cost", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "client_cpu": args.client_cpu,
        "natgwd_trees": trees,
        "loadavg": summary([run["loadavg"] for done in runs.values() for run in done]),
        "ways": {
            way: {
                "rate": summary([r["rate"] for r in done]),
                "natgwd_cpu": summary([r["natgwd_cpu"] for r in done]),
                "natgwd_cpu_per_1000": summary([r["natgwd_cpu_per_1000"] for r in done]),
                "lab_cpu_per_1000": summary([r["lab_cpu_per_1000"] for r in done]),
                "against_off": against_off(runs, way),
                "runs": done,
            }
            for way, done in runs.items()
        },
    }
    out = write_results("observe", results)
    print(
        f"{len(ways)} ways x {args.rounds} runs of {args.seconds:g} s at a load average of "
        f"{results['loadavg']['min']:.1f}-{results['loadavg']['max']:.1f}; against off in the same round, "
        "median (middle half; min-max):"
    )
    for way, figures in results["ways"].items():
        if (paired := figures["against_off"]) is None:
            continue
        print(
            f"{way:<8} rate {quartiles(paired['rate_ratio'], '.3f')}; natgwd's added CPU "
            f"{quartiles(paired['cpu_share'], '.1%')} of a connection's, "
            f"{quartiles(paired['cpu_us_per_event'], '.2f')} us per event"
        )
    print(f"written to {out}")
    return 0


def quartiles(stats: dict[str, Any], fmt: str) -> str:
    return (
        f"{stats['median']:{fmt}} ({stats['p25']:{fmt}} - {stats['p75']:{fmt}}; "
        f"{stats['min']:{fmt}} - {stats['max']:{fmt}})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
