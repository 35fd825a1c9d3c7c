"""A Kube-OVN controller's replay through the drop-in nat-gateway.sh, one call per rule.

    python -m benchmarks.shim_replay [--dnat 10000 --snat 1000 --fip 1000] [--old-calls 300]
    (as root, from the repository)

After a gateway pod is (re)created, kube-ovn-controller execs `bash /kube-ovn/nat-gateway.sh`
once per rule, one after the other: every EIP (eip-add), then the SNAT, DNAT and FIP rules,
with the argument strings of /work/shared/reference/kubeovn-controller-calls.md. Here a
natgwd runs in a lab's gateway namespace (natgwd.lab) on a state with the interfaces only,
and the rules of benchmarks.apply_scale's state come back one `bash nat-gateway.sh` call
each, each call timed from fork to exit (setns, no `ip netns exec`):

- endpoint: natgwd with `--edit-port` (as the image runs it): the script sends the call
  over loopback and natgwd applies it to the document it holds;
- file: natgwd without an endpoint: the script execs `python -m natgwd.kubeovn.shim`, which
  edits the state file under its lock and waits for natgwd's applied record. On the first
  --old-calls calls only: it is far slower.

At the end every rule must be in natgwd's state (the endpoint's edit log folded into the
state file) and every call must have exited 0. Results go to
benchmarks/results/shim_replay-<UTC timestamp>.json; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.apply_scale import build_state
from benchmarks.netns import Netns
from benchmarks.stats import summary, write_results
from natgwd.lab.topology import Lab

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "image" / "nat-gateway.sh"
GATEWAY_V4 = "10.115.55.254"


def controller_calls(state: dict[str, Any]) -> list[list[str]]:
    """The calls that bring back `state`'s rules, as the controller builds them, in its order."""
    address = {eip["name"]: eip["v4ip"] for eip in state["eips"]}
    calls = [["eip-add", f"{eip['v4ip']}/21"] for eip in state["eips"]]
    calls += [["snat-add", f"{address[s['eip']]},{s['internalCIDR']},--random-fully"] for s in state["snat"]]
    calls += [
        ["dnat-add", f"{address[d['eip']]},{d['externalPort']},{d['protocol']},{d['internalIp']},{d['internalPort']}"]
        for d in state["dnat"]
    ]
    calls += [["floating-ip-add", f"{address[f['eip']]},{f['internalIp']}"] for f in state["fip"]]
    return calls


def preloaded(state: dict[str, Any], replayed: int) -> dict[str, Any]:
    """The state natgwd starts with: what `init` leaves (the interfaces and routes) and the
    rules of all but the last `replayed` calls of the replay."""
    start = {key: state[key] for key in ("version", "internal", "external")}
    kept = sum(len(state[kind]) for kind in ("eips", "snat", "dnat", "fip")) - replayed
    for kind in ("eips", "snat", "dnat", "fip"):  # the replay's order
        start[kind] = state[kind][: max(kept, 0)]
        kept -= len(start[kind])
    return start


def replay(gw: Netns, calls: list[list[str]], env: dict[str, str]) -> dict[str, Any]:
    os.environ.update(env)  # Netns.run's children inherit it
    seconds: list[float] = []
    failed: list[str] = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    for index, argv in enumerate(calls):
        begun = time.perf_counter()
        result = gw.run(["bash", str(SCRIPT), *argv], check=False, timeout=300)
        seconds.append(time.perf_counter() - begun)
        if result.returncode != 0:
            failed.append(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
        if index % 1000 == 999:
            print(f"  {index + 1} calls, {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    return {
        "calls": len(calls),
        "total_seconds": total,
        "per_call": summary(seconds),
        "by_quarter_median": [
            summary(seconds[i * len(seconds) // 4 : (i + 1) * len(seconds) // 4]).get("median") for i in range(4)
        ],
        "failed": failed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def run_transport(
    transport: str, state: dict[str, Any], calls: list[list[str]], replayed: int, resync: float
) -> dict[str, Any]:
    """natgwd on the state but for the last `replayed` of `calls`, then those calls."""
    with Lab() as lab:
        print(f"{transport}: {len(calls)} calls in lab {lab.prefix} ...", file=sys.stderr, flush=True)
        state_path = lab.workdir / "state.json"
        token = lab.workdir / "edit.token"
        args = ["--resync-interval", str(resync)]
        if transport == "endpoint":
            args += ["--edit-port", "0", "--edit-token", str(token)]
        daemon = lab.start_natgwd(preloaded(state, replayed), *args, state_path=state_path)
        gw = Netns(lab.ns("gw"))
        try:
            deadline = time.monotonic() + 60
            while daemon.get("/readyz")[0] != 200 or (transport == "endpoint" and not token.exists()):
                if time.monotonic() > deadline or daemon.process.poll() is not None:
                    raise RuntimeError(f"natgwd did not become ready:\n{daemon.log()[-4000:]}")
                time.sleep(0.1)
            env = {
                "NATGWD_STATE": str(state_path),
                "NATGWD_APPLIED_STATE": str(lab.applied_state_path),
                "NATGWD_EDIT_TOKEN": str(token),
                "NATGWD_PYTHON": sys.executable,
                "NATGWD_SHIM_TIMEOUT": "120",
                "GATEWAY_V4": GATEWAY_V4,
            }
            result = replay(gw, calls[len(calls) - replayed :], env)
            # The transport alone: a call natgwd answers without touching the state.
            result["round_trip"] = replay(gw, [["get-iptables-version"]] * 50, env)["per_call"]
            edits = state_path.with_name(state_path.name + ".edits")
            deadline = time.monotonic() + 60
            while edits.exists() and time.monotonic() < deadline:  # the endpoint folds its log when calls pause
                time.sleep(0.1)
            final = json.loads(state_path.read_bytes())
            result["rules_in_state"] = {kind: len(final.get(kind, [])) for kind in ("eips", "snat", "dnat", "fip")}
            result["natgwd_rss_kb"] = _rss(daemon.process.pid)
            applies = [json.loads(line) for line in daemon.log().splitlines() if '"desired state applied"' in line]
            result["natgwd_apply_seconds"] = summary([float(a["seconds"]) for a in applies[1:]])  # not the start
        finally:
            gw.close()
            daemon.stop()
    shutil.rmtree(lab.workdir, ignore_errors=True)
    return result


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def report(results: dict[str, Any]) -> str:
    lines = [
        f"replay of {results['sizes']} ({results['calls']} calls, the last {results['replayed']} replayed), "
        f"load average at the start "
        f"{results['load_average_start']}",
        "| transport | calls | total | per call median | p95 | max | median by quarter | natgwd's apply, median "
        "| round trip alone, median | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        per_call = run["per_call"]
        quarters = ", ".join(_ms(q) for q in run["by_quarter_median"])
        lines.append(
            f"| {name} | {run['calls']} | {run['total_seconds']:.1f} s | {_ms(per_call.get('median'))} | "
            f"{_ms(per_call.get('p95'))} | {_ms(per_call.get('max'))} | {quarters} | "
            f"{_ms(run['natgwd_apply_seconds'].get('median'))} | {_ms(run['round_trip'].get('median'))} | "
            f"{len(run['failed'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shim_replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dnat", type=int, default=10000)
    parser.add_argument("--snat", type=int, default=1000)
    parser.add_argument("--fip", type=int, default=1000)
    parser.add_argument("--old-calls", type=int, default=300, help="calls replayed through the file protocol")
    parser.add_argument(
        "--replay-last",
        type=int,
        default=0,
        help="start natgwd with all rules but the last N calls' and replay those only (the cost per call at "
        "full size without the whole replay); default: the whole replay",
    )
    parser.add_argument("--resync-interval", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    state = build_state(args.dnat, args.snat, args.fip)
    calls = controller_calls(state)
    results: dict[str, Any] = {
        "sizes": {"dnat": args.dnat, "snat": args.snat, "fip": args.fip, "eips": len(state["eips"])},
        "calls": len(calls),
        "started": datetime.now(UTC).isoformat(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "runs": {},
    }
    replayed = args.replay_last or len(calls)
    results["replayed"] = replayed
    results["runs"]["endpoint"] = run_transport("endpoint", state, calls, replayed, args.resync_interval)
    if args.old_calls:
        old = min(args.old_calls, replayed)
        if args.replay_last:  # the same calls at the same size
            results["runs"]["file"] = run_transport("file", state, calls, old, args.resync_interval)
        else:  # the start of the replay
            results["runs"]["file"] = run_transport("file", state, calls[:old], old, args.resync_interval)
    results["ended"] = datetime.now(UTC).isoformat()
    out = write_results("shim_replay", results)
    print(report(results))
    print(f"results: {out}")
    endpoint = results["runs"]["endpoint"]
    wanted = {"eips": len(state["eips"]), "snat": args.snat, "dnat": args.dnat, "fip": args.fip}
    if endpoint["failed"] or endpoint["rules_in_state"] != wanted:
        print(f"FAILED: {endpoint['failed'][:5]} rules {endpoint['rules_in_state']} != {wanted}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
