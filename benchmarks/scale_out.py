"""Capacity of a scaled-out gateway with N = 1, 2 and 3 members, in one run:

    .venv/bin/python -m benchmarks.scale_out            (as root, from the repository)

The lab is tests/integration/scale_lab.py (a router spreading the VMs' flows over the
members by an L4 hash; N = 1 is one plain natgwd gateway behind the same router). The
three labs stand side by side and are measured in interleaved rounds (N = 1, 2, 3, 1, 2,
3...), so that the machine's other work weighs on each alike. In each round, with the
three VMs as clients of a server in ext, through SNAT:

- the machine's busy CPU for a while with no traffic (what runs besides: the labs' idle
  members and every other tenant of the machine), to subtract;
- new TCP connections per second (benchmarks/connrate.c, one client per VM);
- throughput (iperf3, one client per VM, 4 parallel streams each).

CPU per connection, from the connection-rate phase:

- each member's own processes (natgwd, keepalived, conntrackd: everything in its
  namespace), from /proc/PID/stat (user + system time), exact per member;
- the kernel's forwarding work, which all namespaces do in one kernel, in softirq (a veth
  hands each packet to the next namespace's receive softirq): the machine's softirq time
  from /proc/stat, minus the idle window's softirq rate. It also holds the VMs' and the
  server's TCP receive work, the same per connection for every N, and it is attributed to
  the members by the packets each one handled (translated plus handed over, from its
  counters): an upper bound of a member's kernel share;
- the machine's whole busy time (minus the idle window's rate), which means something only
  on a quiet machine: on a saturated one every window is busy throughout.

What N members would carry on N machines of C cores each: C / (the busiest member's CPU
per connection of the whole gateway, user space plus kernel share), as each machine runs
one member and the busiest one saturates first; and, from packet counts alone, N x (one
member's measured rate) / (1 + the handed-over fraction).

Results go to benchmarks/results/scale_out_capacity-<UTC timestamp>.json with the load
average before and after; a table is printed. The machine is shared: numbers are for
orientation, ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.compare import compile_connrate
from benchmarks.stats import write_results
from natgwd.lab.topology import EXTERNAL_HOST
from tests.integration.ha_lab import pids_in
from tests.integration.helpers import wait_listening
from tests.integration.scale_lab import ScaleLab, scale_state

CONN_PORT, IPERF_PORT = 9100, 5201
CLIENTS = ("vm1", "vm2", "vm3")
MEMBERS = (1, 2, 3)
TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> dict[str, float]:
    """The machine's CPU seconds so far: busy (user, nice, system, irq, softirq, steal)
    and softirq alone."""
    fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return {"busy": sum(fields[i] for i in (0, 1, 2, 5, 6, 7)) / TICK, "softirq": fields[6] / TICK}


def process_cpu(pid: int) -> tuple[str, float]:
    """A process's name and its user + system CPU seconds so far (0 once it is gone)."""
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        return name, (int(rest[11]) + int(rest[12])) / TICK  # fields 14 and 15: utime, stime
    return "", 0.0


def namespace_cpu(lab: ScaleLab, role: str) -> dict[str, float]:
    """CPU seconds so far of every process in a namespace, summed by process name."""
    found: dict[str, float] = {}
    for pid in pids_in(lab, role):
        name, seconds = process_cpu(pid)
        if name:
            name = "natgwd" if name.startswith("python") else name  # the namespace's only interpreter
            found[name] = found.get(name, 0.0) + seconds
    return found


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


def parallel(lab: ScaleLab, commands: dict[str, list[str]], timeout: float) -> tuple[dict[str, str], float]:
    """Run one command per namespace at once; their outputs and their CPU seconds (this
    process reaps no other child meanwhile, so its children's usage grows by theirs)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    processes = {
        role: subprocess.Popen(["ip", "netns", "exec", lab.ns(role), *argv], stdout=subprocess.PIPE, text=True)
        for role, argv in commands.items()
    }
    outputs = {role: process.communicate(timeout=timeout)[0] for role, process in processes.items()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return outputs, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def open_lab(members: int, connrate: Path) -> ScaleLab:
    lab = ScaleLab(members=members, upstream=members == 1)
    lab.__enter__()
    lab.start_members(scale_state(members, upstream=members == 1))
    for role in CLIENTS:
        lab.exec(role, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
    lab.spawn("ext", str(connrate), "server", str(CONN_PORT))
    wait_listening(lab, "ext", "tcp", CONN_PORT)
    for port in range(len(CLIENTS)):
        lab.spawn("ext", "iperf3", "-s", "-p", str(IPERF_PORT + port))
    for port in range(len(CLIENTS)):
        wait_listening(lab, "ext", "tcp", IPERF_PORT + port)
    return lab


def connection_round(lab: ScaleLab, connrate: Path, seconds: float) -> dict[str, Any]:
    """An idle window, then `seconds` of new connections; the counts and CPU of each."""
    idle = machine_cpu()
    time.sleep(seconds)  # the window with no traffic whose CPU is subtracted
    idle_rate = {key: (value - idle[key]) / seconds for key, value in machine_cpu().items()}
    members_before = {role: namespace_cpu(lab, role) for role in lab.daemons}
    server_before = sum(namespace_cpu(lab, "ext").values())
    packets_before, machine_before = member_packets(lab), machine_cpu()
    started = time.monotonic()
    argv = [str(connrate), "client", EXTERNAL_HOST, str(CONN_PORT), str(seconds), "64"]
    outputs, clients = parallel(lab, dict.fromkeys(CLIENTS, argv), seconds + 30)
    wall = time.monotonic() - started
    machine_after, packets_after = machine_cpu(), member_packets(lab)
    members_after = {role: namespace_cpu(lab, role) for role in lab.daemons}
    server = sum(namespace_cpu(lab, "ext").values()) - server_before
    runs = {role: json.loads(out) for role, out in outputs.items()}
    connections = sum(r["connections"] for r in runs.values())
    member_cpu = {
        role: {name: seconds - members_before[role].get(name, 0.0) for name, seconds in after.items()}
        for role, after in members_after.items()
    }
    packets = {
        role: {key: packets_after[role][key] - packets_before[role][key] for key in ("translated", "handed_over")}
        for role in packets_after
    }
    spent = {key: machine_after[key] - machine_before[key] - idle_rate[key] * wall for key in machine_after}
    return {
        "connections": connections,
        "seconds": wall,
        "errors": sum(r["errors"] + r["timeouts"] for r in runs.values()),
        "idle_cpu_per_second": idle_rate,
        "busy_cpu_seconds": spent["busy"],
        "softirq_cpu_seconds": spent["softirq"],
        "load_generator_cpu_seconds": server + clients,
        "member_process_cpu_seconds": member_cpu,
        "packets_by_member": packets,
        "connrate_runs": runs,
    }


def throughput_round(lab: ScaleLab, seconds: float) -> float:
    iperf = {
        role: ["iperf3", "-c", EXTERNAL_HOST, "-p", str(IPERF_PORT + i), "-t", str(seconds), "-P", "4", "-J"]
        for i, role in enumerate(CLIENTS)
    }
    reports = {role: json.loads(out) for role, out in parallel(lab, iperf, seconds + 30)[0].items()}
    return float(sum(r["end"]["sum_received"]["bits_per_second"] for r in reports.values()) / 1e9)


def summary(members: int, rounds: list[dict[str, Any]], gbits: list[float], cores: int) -> dict[str, Any]:
    connections = sum(r["connections"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    roles = list(rounds[0]["packets_by_member"])
    packets = {
        role: {key: sum(r["packets_by_member"][role][key] for r in rounds) for key in ("translated", "handed_over")}
        for role in roles
    }
    handled = {role: p["translated"] + p["handed_over"] for role, p in packets.items()}
    kernel = sum(r["softirq_cpu_seconds"] for r in rounds)
    per_member = {}
    for role in roles:
        processes: dict[str, float] = {}
        for r in rounds:
            for name, cpu in r["member_process_cpu_seconds"][role].items():
                processes[name] = processes.get(name, 0.0) + cpu
        share = handled[role] / sum(handled.values()) if sum(handled.values()) else 0.0
        per_member[role] = {
            "process_ms_per_connection": {name: 1000 * cpu / connections for name, cpu in processes.items()},
            "user_space_ms_per_connection": 1000 * sum(processes.values()) / connections,
            "kernel_share": share,
            "kernel_ms_per_connection": 1000 * kernel * share / connections,
            "packets": packets[role],
        }
    for member in per_member.values():
        member["ms_per_connection"] = member["user_space_ms_per_connection"] + member["kernel_ms_per_connection"]
    translated = sum(p["translated"] for p in packets.values())
    return {
        "members": members,
        "connections_per_second": connections / seconds,
        "connections_per_second_by_round": [r["connections"] / r["seconds"] for r in rounds],
        "errors": sum(r["errors"] for r in rounds),
        "throughput_gbit": statistics.median(gbits),
        "throughput_gbit_by_round": gbits,
        "machine_busy_ms_per_connection": 1000 * sum(r["busy_cpu_seconds"] for r in rounds) / connections,
        "softirq_ms_per_connection": 1000 * sum(r["softirq_cpu_seconds"] for r in rounds) / connections,
        "load_generator_ms_per_connection": 1000 * sum(r["load_generator_cpu_seconds"] for r in rounds) / connections,
        "members_ms_per_connection": sum(m["ms_per_connection"] for m in per_member.values()),
        "busiest_member_ms_per_connection": max(m["ms_per_connection"] for m in per_member.values()),
        "per_member": per_member,
        "handed_over_fraction": sum(p["handed_over"] for p in packets.values()) / translated if translated else 0.0,
        "rounds": rounds,
        "cores": cores,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4, help="each phase of a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_before": os.getloadavg(),
        "cores": cores,
    }
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        connrate = compile_connrate(Path(tmp))
        labs = {}
        for n in MEMBERS:
            labs[n] = open_lab(n, connrate)
            stack.callback(labs[n].__exit__, None, None, None)
        rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in MEMBERS}
        gbits: dict[int, list[float]] = {n: [] for n in MEMBERS}
        for _ in range(args.rounds):
            for n in MEMBERS:
                rounds[n].append(connection_round(labs[n], connrate, args.seconds))
            for n in MEMBERS:
                gbits[n].append(throughput_round(labs[n], args.seconds))
        results["load_after"] = os.getloadavg()
        results["runs"] = [summary(n, rounds[n], gbits[n], cores) for n in MEMBERS]
    one = results["runs"][0]
    print(f"load average {results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after")
    print(
        f"{'N':>2} {'conn/s':>7} {'Gbit/s':>6} {'softirq ms/conn':>15} {'members ms/conn':>15}"
        f" {'handed over':>11} {'N machines, CPU':>15} {'N machines, packets':>19}"
    )
    for run in results["runs"]:
        n = run["members"]
        run["estimated_connections_per_second_on_n_machines"] = {
            "by_cpu": cores * 1000 / run["busiest_member_ms_per_connection"],
            "by_packets": n * one["connections_per_second"] / (1 + run["handed_over_fraction"]),
        }
        estimate = run["estimated_connections_per_second_on_n_machines"]
        print(
            f"{n:>2} {run['connections_per_second']:>7.0f} {run['throughput_gbit']:>6.2f}"
            f" {run['softirq_ms_per_connection']:>15.3f} {run['members_ms_per_connection']:>15.3f}"
            f" {run['handed_over_fraction']:>11.2f} {estimate['by_cpu']:>15.0f} {estimate['by_packets']:>19.0f}"
        )
        for role, member in run["per_member"].items():
            processes = ", ".join(f"{k} {v:.4f}" for k, v in sorted(member["process_ms_per_connection"].items()))
            print(f"     {role}: kernel share {member['kernel_share']:.2f}, ms/conn: {processes}")
    path = write_results("scale_out_capacity", results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
