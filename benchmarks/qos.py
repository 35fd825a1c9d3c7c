"""QoS: how exactly a limit holds, what shaping costs the data plane with 1,000 limited
EIPs, and what reconciling that many limits costs natgwd.

    .venv/bin/python -m benchmarks.qos [--only control] [--baseline DIR] [--runs 3]   (as root)

Three parts, each in namespaces it creates and deletes:

- control plane: natgwd.kernel.tc.KernelTc in a bare gateway namespace with N EIPs limited in
  both directions: the first apply, applies with nothing to change (what every resync
  does), resyncs repairing drift, rate changes, one scrape's statistics, and removing it
  all; with --baseline DIR (`git archive main | tar -x -C DIR`), the same with that tree's
  natgwd, run by run in turn;
- accuracy: natgwd in the seed lab, one limit at a time on the DNAT EIP (ingress, ext ->
  vm1 through DNAT) and on the SNAT EIP (egress, vm1 -> ext), measured by iperf3 (TCP
  payload; HTB counts frames, so the ideal ratio is 1448/1514 = 0.956);
- data-plane cost: an unlimited EIP's TCP throughput and the CPU time the whole machine
  spends per GB moved, without QoS and with N other EIPs limited in both directions (each
  packet of the unlimited EIP then walks the u32 filters of all of them before it falls to
  the default class), and the same for a limited EIP whose limit is above what it can reach.

Results go to benchmarks/results/qos-<UTC timestamp>.json; a table is printed. The machine
is shared: numbers are for orientation, run it again before relying on one.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.netns import bare_gateway
from benchmarks.stats import summary, write_results
from natgwd.lab.topology import SEED_STATE, Lab
from natgwd.qos.plan import ifb_name, wants
from natgwd.state.validation import load_state

REPO = Path(__file__).resolve().parents[1]
FIRST_LIMITED_EIP = "10.115.49.0"  # inside the seed's external /21, clear of its EIPs
DNAT_EIP, FIP_EIP, UPSTREAM = "10.115.55.200", "10.115.55.201", "10.115.55.254"
PAYLOAD = 1448 / 1514


def limited_state(count: int, ingress: float = 10, egress: float = 20) -> dict[str, Any]:
    """The seed with `count` more EIPs, each limited in both directions."""
    state: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    rules = [
        {"name": "in", "direction": "ingress", "rateMax": str(ingress)},
        {"name": "out", "direction": "egress", "rateMax": str(egress)},
    ]
    state["qosPolicies"] = [{"name": "limited", "bindingType": "EIP", "bandwidthLimitRules": rules}]
    first = int(ipaddress.IPv4Address(FIRST_LIMITED_EIP))
    state["eips"] += [
        {"name": f"limited-{i:04d}", "v4ip": str(ipaddress.IPv4Address(first + i)), "qosPolicy": "limited"}
        for i in range(count)
    ]
    return state


def with_policy(state: dict[str, Any], name: str, direction: str, rate: float) -> dict[str, Any]:
    """The state with the seed's first EIP (DNAT and SNAT) limited by a policy of its own."""
    result: dict[str, Any] = json.loads(json.dumps(state))
    rule = {"name": "r", "direction": direction, "rateMax": str(rate)}
    result.setdefault("qosPolicies", []).append({"name": name, "bandwidthLimitRules": [rule]})
    result["eips"][0]["qosPolicy"] = name
    return result


# --- control plane ---------------------------------------------------------------------------


def _control(namespace: str, count: int, repeats: int) -> dict[str, Any]:
    """In a process of its own (the tree under test comes first on its path)."""
    import structlog
    from pyroute2 import netns

    from natgwd.kernel.tc import KernelTc

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for the results
    netns.setns(namespace)
    shaper = KernelTc()
    state = load_state(json.dumps(with_policy(limited_state(count), "one", "ingress", 10)).encode())
    changed = load_state(json.dumps(with_policy(limited_state(count), "one", "ingress", 12)).encode())
    timings: dict[str, Any] = {}

    def timed(label: str, target: Any) -> None:
        load = os.getloadavg()[0]
        started, cpu = time.monotonic(), time.process_time()
        report = shaper.apply(wants(target))
        seconds, cpu = time.monotonic() - started, time.process_time() - cpu
        timings.setdefault(label, []).append(
            {"seconds": seconds, "cpu_seconds": cpu, "changes": len(report.changes), "loadavg": load}
        )

    timed("first_apply", state)
    for _ in range(repeats):
        timed("no_change", state)  # what every resync does
    for _ in range(max(repeats // 4, 1)):
        # Drift: someone changed one class's rate on each tree; the resync repairs both.
        for device in ("net2", ifb_name("net2")):
            listed = subprocess.run(["tc", "class", "show", "dev", device], capture_output=True, text=True).stdout
            limited = next(line.split()[2] for line in listed.splitlines() if "4e47:fffe" not in line)
            tc = ["tc", "class", "change", "dev", device, "parent", "4e47:", "classid", limited, "htb"]
            subprocess.run([*tc, "rate", "1mbit"], check=True)
        timed("resync_repairing_drift", state)
    for _ in range(max(repeats // 4, 1)):
        timed("one_rate_change", changed)  # and back: each one class changed
        timed("one_rate_change", state)
    scrapes = []
    for _ in range(5):
        started = time.monotonic()
        classes = len(shaper.stats("net2"))
        scrapes.append(time.monotonic() - started)
    timings["scrape_statistics"] = {**summary(scrapes), "classes": classes}
    started = time.monotonic()
    removed = shaper.remove_all()
    timings["remove_all"] = {"seconds": time.monotonic() - started, "changes": len(removed.changes)}
    return timings


def control_run(tree: Path, count: int, repeats: int) -> dict[str, Any]:
    """One run of the control-plane part with natgwd from `tree`, in a namespace of its own."""
    with bare_gateway("ngwqos") as namespace:
        env = {**os.environ, "PYTHONPATH": f"{tree}:{REPO}"}
        # This file as a script: a baseline's tree may have no such worker.
        command = [sys.executable, str(Path(__file__).resolve()), "--control-worker", namespace]
        command += ["--eips", str(count), "--repeats", str(repeats)]
        done = subprocess.run(command, cwd=tree, env=env, check=True, timeout=900, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


CONTROL_LABELS = ("no_change", "resync_repairing_drift", "one_rate_change")


def control_plane(count: int, repeats: int, runs: int, baseline: Path | None) -> dict[str, Any]:
    """`runs` runs of this tree and, run by run in turn, of `baseline`'s."""
    trees = {"this": REPO} | ({"baseline": baseline.resolve()} if baseline else {})
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for index in range(runs):
        for name, tree in trees.items() if index % 2 == 0 else reversed(trees.items()):
            found[name].append(control_run(tree, count, repeats))
    section: dict[str, Any] = {"runs": found, "summary": {}}
    for label in CONTROL_LABELS:
        row: dict[str, Any] = {}
        for name, results in found.items():
            samples = [sample for result in results for sample in result[label]]
            row[name] = {
                "seconds": summary([s["seconds"] for s in samples]),
                "cpu_seconds": summary([s["cpu_seconds"] for s in samples]),
                "loadavg": [min(s["loadavg"] for s in samples), max(s["loadavg"] for s in samples)],
                "changes": samples[0]["changes"],
            }
        if baseline is not None:
            # Run by run, each run's median against the baseline's run beside it.
            medians = {
                name: [summary([s["seconds"] for s in result[label]])["median"] for result in results]
                for name, results in found.items()
            }
            row["this_per_baseline"] = summary(
                [a / b for a, b in zip(medians["this"], medians["baseline"], strict=True)]
            )
        section["summary"][label] = row
    return section


def control_lines(section: dict[str, Any]) -> list[str]:
    lines = []
    for label, row in section["summary"].items():
        for name in ("this", "baseline"):
            if name not in row:
                continue
            seconds, cpu, load = row[name]["seconds"], row[name]["cpu_seconds"], row[name]["loadavg"]
            lines.append(
                f"  {label:22} {name:8} median {seconds['median'] * 1000:7.1f} ms ({seconds['min'] * 1000:.1f}-"
                f"{seconds['max'] * 1000:.1f}, n={seconds['n']}), CPU {cpu['median'] * 1000:.1f} ms, "
                f"load {load[0]:.1f}-{load[1]:.1f}, changes {row[name]['changes']}"
            )
        if "this_per_baseline" in row:
            ratio = row["this_per_baseline"]
            lines.append(
                f"  {label:22} this / baseline per run {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"
            )
    return lines


# --- the lab: accuracy and cost -------------------------------------------------------------


def _iperf(lab: Lab, role: str, address: str, port: int, seconds: int) -> float:
    client = ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-O", "1", "-J"]
    result = lab.exec(role, *client, timeout=seconds + 60)
    return float(json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"])


def _wait_listening(lab: Lab, role: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while not lab.exec(role, "ss", "-Hlnt", f"sport = :{port}").stdout.strip():
        if time.monotonic() > deadline:
            raise TimeoutError(f"iperf3 in {role} does not listen on {port}")
        time.sleep(0.05)


def _busy_seconds() -> float:
    """CPU time the whole machine spent not idle, in seconds (all CPUs)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _measured(lab: Lab, role: str, address: str, port: int, seconds: int) -> dict[str, float]:
    busy = _busy_seconds()
    rate = _iperf(lab, role, address, port, seconds)
    cpu = _busy_seconds() - busy
    moved = rate / 8 * seconds
    return {"mbit_per_s": rate / 1e6, "cpu_seconds_per_gb": cpu / (moved / 1e9)}


def _apply(daemon: Any, state: dict[str, Any]) -> None:
    daemon.write_state(state)
    daemon.wait_applied(timeout=120)


def lab_parts(count: int, seconds: int, rates: list[float]) -> dict[str, Any]:
    with Lab() as lab:
        servers = (("vm1", 80), ("ext", 5201))
        for role, port in servers:
            lab.spawn(role, "iperf3", "-s", "-p", str(port))
        daemon = lab.start_natgwd(json.loads(json.dumps(SEED_STATE)))
        daemon.wait_ready(timeout=60)
        for role, port in servers:
            _wait_listening(lab, role, port)
        accuracy = []
        for rate in rates:
            _apply(daemon, with_policy(SEED_STATE, "dnat-in", "ingress", rate))
            ingress = _iperf(lab, "ext", DNAT_EIP, 8888, seconds)
            _apply(daemon, with_policy(SEED_STATE, "snat-out", "egress", rate))
            egress = _iperf(lab, "vm1", UPSTREAM, 5201, seconds)
            accuracy.append(
                {
                    "limit_mbit": rate,
                    "ingress_mbit": ingress / 1e6,
                    "egress_mbit": egress / 1e6,
                    "ingress_ratio": ingress / (rate * 1e6),
                    "egress_ratio": egress / (rate * 1e6),
                }
            )
        cost: dict[str, Any] = {}
        _apply(daemon, json.loads(json.dumps(SEED_STATE)))
        cost["no_qos"] = _measured(lab, "vm2", UPSTREAM, 5201, seconds)
        _apply(daemon, limited_state(count))
        cost[f"unlimited_eip_beside_{count}_limited"] = _measured(lab, "vm2", UPSTREAM, 5201, seconds)
        _apply(daemon, with_policy(limited_state(count), "high", "egress", 10_000))
        cost[f"eip_limited_at_10gbit_beside_{count}_limited"] = _measured(lab, "vm1", UPSTREAM, 5201, seconds)
        daemon.stop()
    return {"accuracy": accuracy, "cost": cost}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eips", type=int, default=1000, help="limited EIPs (at most 1,500)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    parser.add_argument("--rates", default="5,10,50,200", help="limits to measure, Mbit/s")
    parser.add_argument("--only", choices=("control",), help="the control plane only (no lab, no traffic)")
    parser.add_argument("--baseline", type=Path, help="another tree's sources (main's), its control plane in turn")
    parser.add_argument("--runs", type=int, default=3, help="control-plane runs of each tree")
    parser.add_argument("--repeats", type=int, default=20, help="resyncs with nothing to change per run")
    parser.add_argument("--control-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.control_worker:
        print(json.dumps(_control(args.control_worker, args.eips, args.repeats)))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    results: dict[str, Any] = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "eips": args.eips,
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "baseline": str(args.baseline) if args.baseline else None,
        "control_plane": control_plane(args.eips, args.repeats, args.runs, args.baseline),
    }
    if args.only is None:
        results.update(lab_parts(args.eips, args.seconds, [float(r) for r in args.rates.split(",")]))
    out = write_results("qos", results)
    print(f"control plane, {args.eips} EIPs limited both ways ({2 * args.eips} classes and filters):")
    print("\n".join(control_lines(results["control_plane"])))
    for run in results["control_plane"]["runs"]["this"]:
        first, scrape = run["first_apply"][0], run["scrape_statistics"]
        print(
            f"  this tree: first apply {first['seconds']:.3f} s ({first['changes']} changes), "
            f"a scrape's statistics {scrape['median']:.3f} s ({scrape['classes']} classes)"
        )
    if args.only is not None:
        print(f"written to {out.relative_to(REPO)}")
        return 0
    print(f"accuracy (iperf3 payload / limit; ideal {PAYLOAD:.3f}):")
    for row in results["accuracy"]:
        print(
            f"  {row['limit_mbit']:7g} Mbit/s  ingress {row['ingress_mbit']:8.2f} ({row['ingress_ratio']:.3f})"
            f"  egress {row['egress_mbit']:8.2f} ({row['egress_ratio']:.3f})"
        )
    print("data-plane cost:")
    for label, value in results["cost"].items():
        print(f"  {label:42} {value['mbit_per_s']:9.0f} Mbit/s  {value['cpu_seconds_per_gb']:6.2f} CPU-s/GB")
    print(f"written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
