"""A cold start with the EIPs inside the clock: from a one-rule state (one EIP) to the whole
rule set with every EIP, natgwd against its floor, run by run in turn.

    python -m benchmarks.cold_start [--sizes 10000,50000] [--repeats 3] [--baseline DIR]   (as root)

`make bench` runs it as a section of its own (python -m benchmarks, results["cold_start"]);
its other full-apply section starts from a state that already holds every EIP, so it
times the rules alone.

- natgwd: the daemon as deployed; the clock runs from the rename of the new state file
  until natgwd's applied-state record names it (the kernel then holds the table, the
  addresses and the routes).
- floor: the same table by one `nft -f` of natgwd's own script (rendered beforehand) plus
  the same addresses by one `ip -batch`, back to back.
- baseline (with --baseline DIR): the natgwd of another source tree, such as main's
  (`git archive main | tar -x -C DIR`), timed as natgwd is: an A/B of a change.

Each method has a Lab of its own; they are measured in turn (natgwd, baseline, floor,
natgwd, ...), so that a change in the machine's load falls on all of them. Between runs each goes
back to the one-rule state, untimed (deleting 1,000 secondary addresses takes the kernel
seconds). Results: benchmarks/results/cold_start-<UTC timestamp>.json when run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import intree, rulesets
from benchmarks.compare import (
    NATGWD_SETTLE_SECONDS,
    Context,
    FloorGateway,
    Gateway,
    NatgwdGateway,
    applied_records,
    log,
    parse_sizes,
    statistics_line,
)
from benchmarks.stats import summary, write_results
from natgwd.lab.topology import VM_ADDRESSES, Lab

DEFAULT_SIZES = (10000, 50000)
DESCRIPTION = (
    "From a one-rule state (one DNAT rule, its EIP) to the whole rule set with every EIP. natgwd: from the "
    "rename of the new state file until natgwd's applied-state record names it. Floor: one `nft -f` of natgwd's "
    "own script for the table plus one `ip -batch` adding the same EIP addresses, back to back. Each method in a "
    "Lab of its own, measured alternately run by run; between runs both go back to the one-rule state (untimed)."
)


def verify_addresses(gateway: Gateway, state: dict[str, Any]) -> int:
    """How many of the state's EIPs the external interface holds; all of them, or an error."""
    listing = json.loads(gateway.gw.run(["ip", "-j", "-4", "addr", "show", "dev", rulesets.EXTERNAL_IF]).stdout)
    held = {a["local"] for link in listing for a in link.get("addr_info", [])}
    missing = [e["v4ip"] for e in state["eips"] if e["v4ip"] not in held]
    if missing:
        raise RuntimeError(f"{gateway.name}: {len(missing)} EIPs missing, e.g. {missing[:3]}")
    return len(state["eips"])


def applied_lines(log_text: str, sha256: str) -> list[dict[str, Any]]:
    """natgwd's "desired state applied" lines for the state `sha256` names (its first 12
    digits), in order (every full apply applies the same file: compare.daemon_log keeps
    the last line per sha256)."""
    return [r for r in applied_records(log_text) if r["sha256"] == sha256]


class ColdNatgwdGateway(NatgwdGateway):
    name = "natgwd"

    def base_state(self) -> dict[str, Any]:
        return rulesets.one_rule_state(self.work.state)


class ColdBaselineGateway(intree.BaselineGateway, ColdNatgwdGateway):
    """The cold start, run by the baseline tree's natgwd."""


class ColdFloorGateway(FloorGateway):
    name = "floor"

    def setup(self) -> None:
        base = rulesets.one_rule_state(self.work.state)
        self._configure_links(base)
        self._render_full()
        added = [e for e in self.work.state["eips"] if e not in base["eips"]]
        self.add_path = self.tmp / "eips-add"
        self.add_path.write_text(rulesets.eip_ip_batch(added))
        self.delete_path = self.tmp / "eips-delete"
        self.delete_path.write_text(rulesets.eip_ip_batch(added, "del"))

    def full_apply(self) -> float:
        started = time.perf_counter()
        self.gw.run(["nft", "-f", str(self.full_path)], timeout=600)
        self.gw.run(["ip", "-batch", str(self.add_path)], timeout=600)
        return time.perf_counter() - started

    def reset(self) -> None:
        super().reset()
        self.gw.run(["ip", "-batch", str(self.delete_path)], timeout=600)


def run_size(ctx: Context, n: int, repeats: int, baseline: Path | None = None) -> dict[str, Any]:
    work = rulesets.workload(n)
    result: dict[str, Any] = {
        "mix": work.counts,
        "eips_added": len(work.state["eips"]) - 1,
        "loadavg_start": os.getloadavg(),
    }
    daemons = ("natgwd", "baseline") if baseline is not None else ("natgwd",)
    times: dict[str, list[float]] = {name: [] for name in (*daemons, "floor")}
    own: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        labs = {name: stack.enter_context(Lab(vms=(VM_ADDRESSES[0],))) for name in times}
        gateways: list[Gateway] = [ColdNatgwdGateway(labs["natgwd"], ctx, work)]
        if baseline is not None:
            gateways.append(ColdBaselineGateway(labs["baseline"], ctx, work, baseline))
        gateways.append(ColdFloorGateway(labs["floor"], ctx, work))
        try:
            for gateway in gateways:
                gateway.setup()
            for attempt in range(repeats):
                for gateway in gateways:
                    daemon = isinstance(gateway, ColdNatgwdGateway)
                    if attempt:
                        gateway.reset()
                        if daemon:
                            time.sleep(NATGWD_SETTLE_SECONDS)
                    times[gateway.name].append(gateway.full_apply())
                    verify_addresses(gateway, work.state)
                    gateway.verify(work.state)
                    if daemon:
                        # Its gratuitous ARPs for the new EIPs (3 rounds, 1 s apart) are
                        # not the next method's to share the CPU with.
                        time.sleep(NATGWD_SETTLE_SECONDS)
            for gateway in gateways:
                if isinstance(gateway, ColdNatgwdGateway):
                    digest = hashlib.sha256(gateway.full).hexdigest()[:12]
                    own[gateway.name] = applied_lines(gateway.daemon.log(), digest)
        finally:
            ctx.stop_all()
            for gateway in gateways:
                gateway.close()
    result["floor"] = summary(times["floor"])
    for name in daemons:
        prefix = "natgwd" if name == "natgwd" else name
        result[prefix] = summary(times[name])
        result[f"{prefix}_own"] = summary([o["seconds"] for o in own[name] if o.get("seconds") is not None])
        result[f"{prefix}_nft"] = summary([o["nft_seconds"] for o in own[name] if o.get("nft_seconds") is not None])
    result["ratios"] = [a / b for a, b in zip(times["natgwd"], times["floor"], strict=True)]
    result["ratio_of_medians"] = result["natgwd"]["median"] / result["floor"]["median"]
    line = f"natgwd {statistics_line(times['natgwd'])}"
    if baseline is not None:
        result["baseline_ratios"] = [a / b for a, b in zip(times["baseline"], times["floor"], strict=True)]
        result["baseline_ratio_of_medians"] = result["baseline"]["median"] / result["floor"]["median"]
        # natgwd / baseline run by run: the A/B of the change, each pair measured back to back.
        result["natgwd_per_baseline"] = [a / b for a, b in zip(times["natgwd"], times["baseline"], strict=True)]
        line += f", baseline {statistics_line(times['baseline'])}"
    result["loadavg_end"] = os.getloadavg()
    log(
        f"  cold start N={n:,}: {line}, floor {statistics_line(times['floor'])}, "
        f"ratio {result['ratio_of_medians']:.2f} (per run {min(result['ratios']):.2f}-{max(result['ratios']):.2f})"
    )
    return result


def run(ctx: Context, sizes: list[int], repeats: int, baseline: Path | None = None) -> dict[str, Any]:
    section: dict[str, Any] = {"description": DESCRIPTION, "repeats": repeats, "sizes": {}}
    if baseline is not None:
        section["baseline"] = str(baseline)
    for n in sizes:
        log(f"cold start with the EIPs, N={n:,} ...")
        section["sizes"][str(n)] = run_size(ctx, n, repeats, baseline)
    return section


def table(section: dict[str, Any]) -> list[str]:
    """The section's Markdown table (benchmarks.report renders it into RESULTS.md)."""
    lines = [
        "| N | EIPs added | natgwd: median (min - max) | natgwd's own log: whole / nftables | floor: median "
        "(min - max) | natgwd / floor: of medians (per run) | load average (start - end) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, size in section["sizes"].items():

        def ms(stats: dict[str, Any], key: str = "median") -> str:
            return f"{stats[key] * 1000:,.0f} ms" if stats.get("n") else "-"

        lines.append(
            f"| {int(n):,} | {size['eips_added']:,} "
            f"| {ms(size['natgwd'])} ({ms(size['natgwd'], 'min')} - {ms(size['natgwd'], 'max')}) "
            f"| {ms(size['natgwd_own'])} / {ms(size['natgwd_nft'])} "
            f"| {ms(size['floor'])} ({ms(size['floor'], 'min')} - {ms(size['floor'], 'max')}) "
            f"| {size['ratio_of_medians']:.2f}x ({min(size['ratios']):.2f}-{max(size['ratios']):.2f}) "
            f"| {size['loadavg_start'][0]:.1f} - {size['loadavg_end'][0]:.1f} |"
        )
    return lines


def baseline_table(section: dict[str, Any]) -> list[str]:
    """With --baseline: the other natgwd beside this one, run by run in the same turns."""
    lines = [
        "| N | natgwd / floor: of medians | baseline: median (min - max) | baseline / floor: of medians "
        "| natgwd / baseline: per run, median (min - max) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, size in section["sizes"].items():
        base, per_run = size["baseline"], size["natgwd_per_baseline"]
        lines.append(
            f"| {int(n):,} | {size['ratio_of_medians']:.2f}x "
            f"| {base['median'] * 1000:,.0f} ms ({base['min'] * 1000:,.0f} - {base['max'] * 1000:,.0f}) "
            f"| {size['baseline_ratio_of_medians']:.2f}x "
            f"| {statistics.median(per_run):.2f} ({min(per_run):.2f} - {max(per_run):.2f}) |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES), help="N, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    intree.add_arguments(parser)
    args = parser.parse_args(argv)
    if not intree.runnable(parser, args):
        return 1
    results: dict[str, Any] = {
        "benchmark": "cold_start",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": os.getloadavg(),
        **({"note": args.note} if args.note else {}),
    }
    results["cold_start"] = intree.measured(
        args, "natgwd-cold-", lambda ctx: run(ctx, args.sizes, args.repeats, args.baseline)
    )
    results["loadavg_end"] = os.getloadavg()
    path = write_results("cold_start", results, args.results_dir)
    print("\n".join(table(results["cold_start"])))
    if args.baseline is not None:
        print("\n".join(baseline_table(results["cold_start"])))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
