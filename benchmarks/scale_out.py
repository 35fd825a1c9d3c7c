"""Capacity of a scaled-out gateway with N = 1, 2 and 3 members, in one run:

    .venv/bin/python -m benchmarks.scale_out            (as root, from the repository)

The lab is tests/integration/scale_lab.py (a router spreading the VMs' flows over the
members by an L4 hash; N = 1 is one plain natgwd gateway behind the same router). For each
N, with the three VMs as clients of a server in ext, through SNAT:

- new TCP connections per second (benchmarks/connrate.c, one client per VM);
- throughput (iperf3, one client per VM, 4 parallel streams each);
- the machine's CPU time per connection (all members share one kernel on a 2-core machine,
  so a member's own share cannot be told apart: the packets each member forwarded and
  handed over, from its counters, say how the work was split);
- the fraction of the VMs' packets a member handed to another (the cost of scaling out:
  such a packet crosses two members), from which what N members would carry on N machines
  is estimated: N x (one member's rate) / (1 + handed-over fraction).

Results go to benchmarks/results/scale_out_capacity-<UTC timestamp>.json; a table is
printed. The machine is shared: numbers are for orientation, ratios within one run.
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

from benchmarks.compare import compile_connrate
from natgwd.lab.topology import EXTERNAL_HOST
from tests.integration.helpers import wait_listening
from tests.integration.scale_lab import ScaleLab, scale_state

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
CONN_PORT, IPERF_PORT = 9100, 5201
CLIENTS = ("vm1", "vm2", "vm3")


def cpu_seconds() -> float:
    """The machine's busy CPU time so far (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))
    return busy / os.sysconf("SC_CLK_TCK")


def member_packets(lab: ScaleLab) -> dict[str, dict[str, float]]:
    """Per member: packets of connections it translated and packets it handed over."""
    counts = {}
    for role, daemon in lab.daemons.items():
        samples = daemon.metrics()
        counts[role] = {
            "translated": sum(v for k, v in samples.items() if k.startswith("natgwd_rule_packets_total{")),
            "handed_over": sum(
                v for k, v in samples.items() if k.startswith("natgwd_scale_handed_over_packets_total{")
            ),
        }
    return counts


def parallel(lab: ScaleLab, commands: dict[str, list[str]], timeout: float) -> dict[str, str]:
    """Run one command per namespace at once; their outputs."""
    processes = {
        role: subprocess.Popen(["ip", "netns", "exec", lab.ns(role), *argv], stdout=subprocess.PIPE, text=True)
        for role, argv in commands.items()
    }
    return {role: process.communicate(timeout=timeout)[0] for role, process in processes.items()}


def measure(members: int, connrate: Path, seconds: float) -> dict[str, Any]:
    with ScaleLab(members=members, upstream=members == 1) as lab:
        lab.start_members(scale_state(members, upstream=members == 1))
        for role in CLIENTS:
            lab.exec(role, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        lab.spawn("ext", str(connrate), "server", str(CONN_PORT))
        wait_listening(lab, "ext", "tcp", CONN_PORT)
        before, cpu = member_packets(lab), cpu_seconds()
        argv = [str(connrate), "client", EXTERNAL_HOST, str(CONN_PORT), str(seconds), "64"]
        outputs = parallel(lab, dict.fromkeys(CLIENTS, argv), seconds + 30)
        cpu = cpu_seconds() - cpu
        after = member_packets(lab)
        runs = {role: json.loads(out) for role, out in outputs.items()}
        connections = sum(r["connections"] for r in runs.values())
        per_member = {
            role: {key: after[role][key] - before[role][key] for key in ("translated", "handed_over")} for role in after
        }
        translated = sum(m["translated"] for m in per_member.values())
        handed = sum(m["handed_over"] for m in per_member.values())
        for port in range(len(CLIENTS)):
            lab.spawn("ext", "iperf3", "-s", "-p", str(IPERF_PORT + port))
        for port in range(len(CLIENTS)):
            wait_listening(lab, "ext", "tcp", IPERF_PORT + port)
        iperf = {
            role: ["iperf3", "-c", EXTERNAL_HOST, "-p", str(IPERF_PORT + i), "-t", str(seconds), "-P", "4", "-J"]
            for i, role in enumerate(CLIENTS)
        }
        reports = {role: json.loads(out) for role, out in parallel(lab, iperf, seconds + 30).items()}
        gbits = sum(r["end"]["sum_received"]["bits_per_second"] for r in reports.values()) / 1e9
        return {
            "members": members,
            "connections_per_second": connections / seconds,
            "errors": sum(r["errors"] + r["timeouts"] for r in runs.values()),
            "cpu_ms_per_connection": 1000 * cpu / connections if connections else None,
            "handed_over_fraction": handed / translated if translated else 0.0,
            "packets_by_member": per_member,
            "throughput_gbit": gbits,
            "connrate_runs": runs,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        connrate = compile_connrate(Path(tmp))
        results["runs"] = [measure(n, connrate, args.seconds) for n in (1, 2, 3)]
    one = results["runs"][0]["connections_per_second"]
    print(f"{'N':>2} {'conn/s':>8} {'Gbit/s':>7} {'CPU ms/conn':>11} {'handed over':>11} {'N machines (est.)':>18}")
    for run in results["runs"]:
        estimate = run["members"] * one / (1 + run["handed_over_fraction"])
        run["estimated_connections_per_second_on_n_machines"] = estimate
        print(
            f"{run['members']:>2} {run['connections_per_second']:>8.0f} {run['throughput_gbit']:>7.2f}"
            f" {run['cpu_ms_per_connection'] or 0:>11.3f} {run['handed_over_fraction']:>11.2f} {estimate:>18.0f}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"scale_out_capacity-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
