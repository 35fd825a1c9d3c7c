"""natgwd's CPU per conntrack event, apart from the lab's noise: the connection watcher
takes N NEW events (IPv4, source-translated, as ctnetlink lays them out) from a netlink
socket standing in for the kernel's, this tree against another tree run by run.

    python -m benchmarks.connwatch_drain --baseline DIR [--events 50000] [--runs 3]

DIR is a copy of another revision's sources (`git archive main | tar -x -C DIR`). Each run
is a process with the tree's natgwd first on its path: the watcher's thread runs as in
the daemon while the main thread sends the events; the process's CPU time less the
sender's is the watcher's. The lab's figure (benchmarks.observe_cost: the new-connection
rate with and without the watcher) is what counts in the end; on a shared 2-core machine
its runs vary by 2x, this one by a few percent. Writes benchmarks/results/connwatch_drain-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import summary

REPO = Path(__file__).resolve().parents[1]
NETLINK_USERSOCK = 2
SO_RCVBUFFORCE = 33


def worker(events: int) -> dict[str, Any]:
    from natgwd.observability import connwatch
    from natgwd.observability.connwatch import ConnectionWatch
    from natgwd.observability.ctevents import EventSocket
    from tests.unit.test_ctevents import message, snat_attrs

    # Netlink sockets (NETLINK_USERSOCK: one process's messages to another socket), queued
    # and received as the kernel's events are; an AF_UNIX pair would hold 10 datagrams.
    ours = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    ours.bind((0, 0))
    ours.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    theirs = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    theirs.bind((0, 0))
    theirs.connect((ours.getsockname()[0], 0))
    messages = [message(0x100, 0, snat_attrs(i, 2 + i % 50)) for i in range(events)]

    def event_socket() -> EventSocket:
        made = EventSocket.__new__(EventSocket)
        made.sock = ours
        return made

    connwatch.EventSocket = event_socket  # type: ignore[misc]
    connwatch.dump = lambda: iter(())  # type: ignore[assignment]
    watch = ConnectionWatch(dict, dict)
    watch.start()
    while watch._base is None:  # counting has begun (after its first, empty, dump)
        time.sleep(0.01)
    cpu, sender = time.process_time(), time.thread_time()
    for data in messages:
        theirs.send(data)
    sender = time.thread_time() - sender
    deadline = time.monotonic() + 120
    while sum(watch.tracker.snapshot().opened.values()) < events:
        if time.monotonic() > deadline:
            raise TimeoutError("the events were not all counted")
        time.sleep(0.001)
    watcher = time.process_time() - cpu - sender
    watch.stop()
    return {"events": events, "cpu_seconds_per_event": watcher / events, "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another tree's sources (required but for workers)")
    parser.add_argument("--events", type=int, default=50000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.events)))
        return 0
    if args.baseline is None:
        parser.error("--baseline DIR is required")
    trees = {"this": REPO, "baseline": args.baseline.resolve()}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for index in range(args.runs):
        for name, tree in trees.items() if index % 2 == 0 else reversed(trees.items()):
            # This file as a script, natgwd from the tree, the test helpers from this repository.
            env = {**os.environ, "PYTHONPATH": f"{tree}:{REPO}"}
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--events", str(args.events)]
            done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True, timeout=600)
            result = json.loads(done.stdout.splitlines()[-1])
            runs[name].append(result)
            print(f"{name}: {result['cpu_seconds_per_event'] * 1e6:.2f} us per event, load {result['loadavg']:.1f}")
    per_event = {name: summary([r["cpu_seconds_per_event"] for r in done]) for name, done in runs.items()}
    pairs = zip(runs["this"], runs["baseline"], strict=True)
    ratios = [a["cpu_seconds_per_event"] / b["cpu_seconds_per_event"] for a, b in pairs]
    results = {"events": args.events, "runs": runs, "per_event": per_event, "this_over_baseline": summary(ratios)}
    # Here, not at the top: the worker runs this file over a baseline tree's benchmarks.
    from benchmarks.stats import write_results

    out = write_results("connwatch_drain", results)
    ratio = results["this_over_baseline"]
    print(f"this / baseline, run by run: median {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})")
    print(f"written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
