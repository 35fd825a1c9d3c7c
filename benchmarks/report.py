"""RESULTS.md and the plots, from one run's JSON: every figure and ratio in them from
that one file (tests/unit/test_performance_table.py checks that RESULTS.md and
docs/performance.md's table are what this renders from the file they name).

    python -m benchmarks.report benchmarks/results/bench-<timestamp>.json [--markdown PATH]
        [--docs docs/performance.md]

The plots (PNG) are written next to the JSON file: apply_time.png and conn_rate.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.stats import percentile
from natgwd.runtime.daemon import POLL_SECONDS

REPO = Path(__file__).resolve().parents[1]

METHODS = ("natgwd", "floor", "iptables-restore", "per-rule-exec", "naive-nft")
COMPETITORS = ("natgwd", "iptables-restore", "per-rule-exec", "naive-nft")
KINDS = ("add", "change", "delete")
# Colour, marker, line style, marker size: the baselines nearly coincide on some plots, so
# each differs from the others in every one of these, and the larger markers are hollow.
STYLE = {
    "natgwd": ("tab:blue", "o", "-", 6),
    "floor": ("tab:gray", "s", ":", 6),
    "iptables-restore": ("tab:orange", "^", "--", 11),
    "per-rule-exec": ("tab:red", "v", "-.", 8),
    "naive-nft": ("tab:green", "D", (0, (6, 2, 1, 2, 1, 2)), 5),
}


# --- formatting -------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 0.01:
        return f"{value * 1000:.0f} ms"
    return f"{value * 1000:.1f} ms"


def span(stats: dict[str, Any] | None, fmt: Any = seconds) -> str:
    if not stats or not stats.get("n"):
        return "-"
    return f"{fmt(stats['min'])} - {fmt(stats['max'])}"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    r = value / reference
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.0f}x"
    return f"{r:.2f}x"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def gbit(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def megabytes(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f} MB"


def title(results: dict[str, Any], method: str) -> str:
    return str(results.get("methods", {}).get(method, {}).get("title", method))


def cell(results: dict[str, Any], method: str, n: int | str) -> dict[str, Any]:
    return dict(results.get("cells", {}).get(method, {}).get(str(n), {}))


def ok(c: dict[str, Any]) -> bool:
    return c.get("status") == "ok"


def not_run(c: dict[str, Any]) -> str:
    if not c:
        return "not run"
    if c.get("status") == "over budget":
        return f"not run (over budget): {c.get('reason', '')}"
    return f"failed: {str(c.get('reason', ''))[:300]}"


def median(stats: dict[str, Any] | None) -> float | None:
    return stats.get("median") if stats and stats.get("n") else None


def methods_of(results: dict[str, Any]) -> list[str]:
    return [m for m in METHODS if m in results.get("cells", {})]


# --- tables -----------------------------------------------------------------------------


def full_apply_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| N | method | median | min - max | runs | x natgwd |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for n in results["sizes"]:
        reference = median(cell(results, "natgwd", n).get("full"))
        floor = median(cell(results, "floor", n).get("full"))
        for method in methods_of(results):
            c = cell(results, method, n)
            if not ok(c):
                lines.append(f"| {n:,} | {title(results, method)} | {not_run(c)} | | | |")
                continue
            full = c["full"]
            if not full.get("n"):
                lines.append(
                    f"| {n:,} | {title(results, method)} | not run (over budget): {full.get('not_run', '')} | | | |"
                )
                continue
            factor = ratio(full["median"], reference)
            if method == "natgwd" and floor:
                factor += f" (= {ratio(full['median'], floor)} the floor)"
            lines.append(
                f"| {n:,} | {title(results, method)} | {seconds(full['median'])} | {span(full)} | {full['n']} "
                f"| {factor} |"
            )
    return lines


def cold_start_lines(results: dict[str, Any]) -> list[str]:
    """Section 1b: the full apply with the EIPs inside the clock (benchmarks.cold_start)."""
    section = results.get("cold_start")
    if not section or not section.get("sizes"):
        return []
    from benchmarks.cold_start import table

    return ["### 1b. A cold start: the EIPs inside the clock", "", section["description"], "", *table(section), ""]


def change_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| N | method | add: median / p95 | change: median / p95 | delete: median / p95 | all: median | "
        "all: min - max | x natgwd |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in results["sizes"]:
        natgwd = cell(results, "natgwd", n)
        reference = median(natgwd.get("changes", {}).get("all")) if ok(natgwd) else None
        floor = cell(results, "floor", n)
        floor_all = median(floor.get("changes", {}).get("all")) if ok(floor) else None
        for method in methods_of(results):
            c = cell(results, method, n)
            if not ok(c):
                lines.append(f"| {n:,} | {title(results, method)} | {not_run(c)} | | | | | |")
                continue
            changes = c["changes"]
            kinds = " | ".join(
                f"{seconds(median(changes[k]))} / {seconds(changes[k].get('p95'))}" if changes[k].get("n") else "-"
                for k in KINDS
            )
            everything = changes["all"]
            factor = ratio(median(everything), reference)
            if method == "natgwd" and floor_all:
                factor += f" (= {ratio(median(everything), floor_all)} the floor)"
            name = title(results, method) + (f" ({c['preloaded']})" if c.get("preloaded") else "")
            lines.append(
                f"| {n:,} | {name} | {kinds} | {seconds(median(everything))} | {span(everything)} | {factor} |"
            )
    return lines


def conn_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| N | method | connections/s, median | min - max | runs | x natgwd |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    plain = results.get("plain_routing", {}).get("conn")
    if plain:
        lines.append(
            f"| all | no NAT (plain routing, to vm1's address) | {rate(median(plain))} | {span(plain, rate)} | "
            f"{plain['n']} | |"
        )
    for n in results["sizes"]:
        natgwd = cell(results, "natgwd", n)
        reference = median(natgwd.get("conn")) if ok(natgwd) else None
        for method in methods_of(results):
            c = cell(results, method, n)
            if not ok(c):
                lines.append(f"| {n:,} | {title(results, method)} | {not_run(c)} | | | |")
                continue
            conn = c["conn"]
            lines.append(
                f"| {n:,} | {title(results, method)} | {rate(median(conn))} | {span(conn, rate)} | {conn['n']} | "
                f"{ratio(median(conn), reference)} |"
            )
    return lines


THROUGHPUT_PATHS = (("dnat", "DNAT: ext → EIP:port → vm1"), ("snat", "SNAT: vm1 → ext"))
NATGWD_STOPPED = "natgwd-stopped"


def throughput_table(throughput: dict[str, Any]) -> list[str]:
    """Every row's runs (taken in turn, run by run): median, min - max, and the median
    over natgwd's."""
    lines = [
        "| path | method | Gbit/s, median | min - max | runs | x natgwd | the server saw |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    rows, titles = throughput["rows"], throughput["titles"]
    for path, label in THROUGHPUT_PATHS:
        reference = median(rows.get("natgwd", {}).get(path))
        for row in throughput["order"]:
            p = rows[row][path]
            factor = "" if row == "plain" else ratio(median(p), reference)
            lines.append(
                f"| {label} | {titles[row]} | {gbit(median(p))} | {span(p, gbit)} | {p['n']} | {factor} | "
                f"{p.get('server_saw') or '-'} |"
            )
    return lines


def running_stopped(throughput: dict[str, Any]) -> list[str]:
    """natgwd running over natgwd stopped, pair by pair: each pair ran back to back on
    the same table."""
    rows = throughput["rows"]
    if "natgwd" not in rows or NATGWD_STOPPED not in rows:
        return []
    parts = []
    for path, label in THROUGHPUT_PATHS:
        pairs = [
            a / b
            for a, b in zip(rows["natgwd"][path]["values"], rows[NATGWD_STOPPED][path]["values"], strict=True)
            if b
        ]
        if pairs:
            ordered = sorted(pairs)
            parts.append(f"{label.split(':')[0]} {percentile(ordered, 50):.2f} ({ordered[0]:.2f} - {ordered[-1]:.2f})")
    return [
        "natgwd running over natgwd stopped, pair by pair (the two runs of a pair back to back on the same table), "
        f"median (min - max) of {len(pairs)} pairs: " + "; ".join(parts) + ". Below 1, the running daemon costs "
        "throughput; a range that holds 1 says the difference is within the noise.",
    ]


def throughput_section(throughput: dict[str, Any] | None) -> list[str]:
    if not throughput:
        return [
            "## 4. Forwarding throughput (iperf3)",
            "",
            "Not in this run (a results file of an older format measured the methods one after the other, which the "
            "machine's drifting load made misleading). `python -m benchmarks --throughput-only` measures it alone, "
            "into a file of its own: RESULTS.md is rendered from one whole run.",
        ]
    load_start, load_end = throughput["loadavg_start"], throughput["loadavg_end"]
    titles = throughput["titles"]
    return [
        f"## 4. Forwarding throughput (iperf3), N={throughput['n']:,}",
        "",
        f"One TCP stream, {throughput['seconds']:g} s per run, {throughput['runs']} runs per row. Every row's "
        "gateway is built first, side by side; then the rows run in turn, run by run ("
        + ", ".join(titles[row] for row in throughput["order"])
        + ", then again), so that a change of the machine's load falls on every row alike. DNAT: client in ext to "
        "the last DNAT rule's EIP:port, server in vm1. SNAT: client in vm1, server in ext (it sees the EIP when the "
        "flow is source-NATed). No NAT: the same paths to vm1's own address and from it. "
        f"**{titles.get(NATGWD_STOPPED, NATGWD_STOPPED)}** is natgwd's gateway right after natgwd's run, the daemon "
        "stopped by SIGTERM (its table stays in the kernel, checked before each run); natgwd starts again before its "
        "next run. The two rows hold the same table, so their gap is what the running daemon costs the data plane, "
        "the fair measure of it; the gaps between other rows hold the noise of this shared 2-core machine as well. "
        "NAT rules only see a connection's first packet, so an established flow costs the same at any N. "
        f"Load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load_start)} at the start of this section, "
        f"{', '.join(f'{x:.2f}' for x in load_end)} at its end.",
        "",
        *throughput_table(throughput),
        "",
        *running_stopped(throughput),
    ]


def natgwd_resources_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| N | RSS, no rules | RSS after the full apply | RSS after the scrapes (peak) | /metrics scrape, median | "
        "min - max | /metrics size |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in results["sizes"]:
        c = cell(results, "natgwd", n)
        if not ok(c) or "natgwd" not in c:
            lines.append(f"| {n:,} | {not_run(c)} | | | | | |")
            continue
        extra = c["natgwd"]
        rss = extra["rss_kb"]
        scrape = extra["scrape"]
        lines.append(
            f"| {n:,} | {megabytes(rss['idle_no_rules'].get('VmRSS'))} "
            f"| {megabytes(rss['after_full_apply'].get('VmRSS'))} "
            f"| {megabytes(rss['after_scrapes'].get('VmRSS'))} ({megabytes(rss['after_scrapes'].get('VmHWM'))}) | "
            f"{seconds(median(scrape))} | {span(scrape)} | {extra['metrics_bytes'] / 1e6:.2f} MB |"
        )
    return lines


def natgwd_split_table(results: dict[str, Any]) -> list[str]:
    """End to end against natgwd's own log (file read -> applied) and its nftables
    transaction, with the floor beside them."""
    lines = [
        "| N | what | natgwd end to end | natgwd's own (log: read → applied) | its nftables transaction (log) | "
        "floor (nft -f) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for n in results["sizes"]:
        c = cell(results, "natgwd", n)
        if not ok(c) or "natgwd" not in c:
            continue
        floor = cell(results, "floor", n)
        events = c["natgwd"].get("events", [])
        for kind, label in (("full", "full apply"), ("change-all", "one change")):
            chosen = [e for e in events if (e["kind"] == kind) or (kind == "change-all" and e["kind"] in KINDS)]
            if not chosen:
                continue

            def med(key: str, chosen: list[dict[str, Any]] = chosen) -> float | None:
                values = sorted(e[key] for e in chosen if e.get(key) is not None)
                return values[len(values) // 2] if values else None

            if kind == "full":
                floor_median = median(floor.get("full")) if ok(floor) else None
            else:
                floor_median = median(floor.get("changes", {}).get("all")) if ok(floor) else None
            lines.append(
                f"| {n:,} | {label} | {seconds(med('seconds'))} | {seconds(med('daemon_seconds'))} | "
                f"{seconds(med('daemon_nft_seconds'))} | {seconds(floor_median)} |"
            )
    return lines


def profile_section(results: dict[str, Any]) -> list[str]:
    profile = results.get("profile")
    if not profile:
        return []
    if "error" in profile:
        return [f"The profile failed: {profile['error']}"]
    n = profile.get("n")
    lines = [
        f"cProfile of natgwd's own path (`Daemon.reconcile_file`: read the file, sha256, validate, plan, the "
        f"nftables transaction, links, conntrack, the applied-state record) at N={n:,}, in a fresh namespace "
        "(benchmarks/profile_natgwd.py). Cumulative seconds per stage; the libnftables call includes the kernel's "
        "work. The profiler slows Python code down and not the kernel, so Python stages weigh more here than "
        "without it (the table of natgwd's own log lines above has its unprofiled nftables time):",
        "",
        "| stage | full apply | one change (add a DNAT) |",
        "|---|---:|---:|",
    ]
    full, change = profile.get("full_apply", {}), profile.get("one_change", {})
    lines.append(
        f"| wall time without the profiler | {seconds(full.get('wall_seconds'))} | "
        f"{seconds(change.get('wall_seconds'))} |"
    )
    lines.append(
        f"| wall time under the profiler | {seconds(full.get('profiled_seconds'))} | "
        f"{seconds(change.get('profiled_seconds'))} |"
    )
    change_stages = {s["stage"]: s for s in change.get("stages", [])}
    for stage in full.get("stages", []):
        other = change_stages.get(stage["stage"], {})
        lines.append(f"| {stage['stage']} | {seconds(stage['seconds'])} | {seconds(other.get('seconds'))} |")
    lines.append("")
    for kind, label in (("full_apply", "full apply"), ("one_change", "one change")):
        shares = stage_shares(profile.get(kind, {}))
        if shares:
            lines.append(f"- {label} at N={n:,}, shares of the profiled time: {shares}.")
    if any(profile.get(kind, {}).get("cumulative") for kind in ("full_apply", "one_change")):
        lines += ["", "The profiler's top functions are in the appendix."]
    return lines


def profile_appendix(results: dict[str, Any]) -> list[str]:
    """cProfile's listings: for whoever digs into the profile, after the results."""
    profile = results.get("profile") or {}
    lines: list[str] = []
    for kind, label in (("full_apply", "full apply"), ("one_change", "one change")):
        data = profile.get(kind, {})
        if data.get("cumulative"):
            lines += ["", f"Top functions, {label}, by cumulative time:", "", "```", data["cumulative"].rstrip(), "```"]
        if data.get("tottime"):
            lines += ["", f"Top functions, {label}, by own time:", "", "```", data["tottime"].rstrip(), "```"]
    if not lines:
        return []
    return [
        "## Appendix: cProfile listings",
        "",
        f"natgwd at N={profile.get('n', 0):,}, as in the profile above.",
        *lines,
        "",
    ]


def takeaway(results: dict[str, Any]) -> list[str]:
    """The short answer, at the largest N natgwd ran: where it wins and where it does not."""
    ran = [n for n in results["sizes"] if ok(cell(results, "natgwd", n))]
    if not ran:
        return []
    n, first = ran[-1], ran[0]
    others = [m for m in COMPETITORS if m != "natgwd" and ok(cell(results, m, n))]
    parts = []
    for label, metric, get, lower in (
        ("new connections through DNAT", "connections/s", lambda c: median(c.get("conn")), False),
        ("full apply", "full apply", lambda c: median(c.get("full")), True),
        ("one change", "one change", lambda c: median(c.get("changes", {}).get("all")), True),
    ):
        mine = get(cell(results, "natgwd", n))
        theirs = {m: v for m in others if (v := get(cell(results, m, n))) is not None}
        if mine is None or not theirs:
            continue
        best = (min if lower else max)(theirs, key=theirs.__getitem__)
        wins = mine <= theirs[best] if lower else mine >= theirs[best]
        verdict = "natgwd is the fastest" if wins else "natgwd is slower"
        parts.append(
            f"{label}, {verdict}: {fmt_metric(metric, mine)} against {fmt_metric(metric, theirs[best])} "
            f"for the best other, {title(results, best)}"
        )
    if not parts:
        return []
    text = f"**Takeaway.** At N={n:,} rules: " + "; ".join(parts) + "."
    flat = [median(cell(results, "natgwd", size).get("conn")) for size in (first, n)]
    floor = [median(cell(results, "floor", size).get("conn")) for size in (first, n)]
    if all(flat) and flat[1] >= 0.8 * flat[0]:
        text += (
            f" natgwd's connection rate does not fall with the rule count ({flat[0]:,.0f}/s at N={first:,}, "
            f"{flat[1]:,.0f}/s at N={n:,}): every lookup is one hash-map hit, where the others walk their rules."
        )
    elif all(flat) and all(floor):
        # Said only with the floor's figures beside it: a loaded machine's fall is not the rules'.
        text += (
            f" natgwd's connection rate went from {flat[0]:,.0f}/s at N={first:,} to {flat[1]:,.0f}/s at N={n:,}, "
            f"the floor's (the same kernel table, no daemon) from {floor[0]:,.0f}/s to {floor[1]:,.0f}/s: the sizes "
            "ran one after the other while the machine's load changed, so the fall is not the daemon's."
        )
    events = [e for e in cell(results, "natgwd", n).get("natgwd", {}).get("events", []) if e["kind"] in KINDS]
    own = sorted(e["daemon_seconds"] for e in events if e.get("daemon_seconds") is not None)
    nft = sorted(e["daemon_nft_seconds"] for e in events if e.get("daemon_nft_seconds") is not None)
    if own and nft:
        mid_own, mid_nft = own[len(own) // 2], nft[len(nft) // 2]
        text += (
            f" Of a change's {seconds(mid_own)} inside natgwd, the nftables transaction takes {seconds(mid_nft)}: "
            "the rest is validating and planning the whole state again in Python (section 2, and the profile)."
        )
    return [text, ""]


def stage_shares(data: dict[str, Any], top: int = 5) -> str:
    stages = data.get("stages", [])
    total = next((s["seconds"] for s in stages if s["stage"].startswith("total")), 0)
    if not total:
        return ""
    own = [s for s in stages if not s["stage"].startswith(("total", "of which"))]
    parts = sorted(own, key=lambda s: -s["seconds"])[:top]
    named = sum(s["seconds"] for s in parts)
    text = ", ".join(f"{s['stage']} {s['seconds'] / total:.0%}" for s in parts)
    return f"{text}, the rest {max(0.0, 1 - named / total):.0%}"


# --- plots ------------------------------------------------------------------------------


def plots(results: dict[str, Any], directory: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    sizes = results["sizes"]

    def series(method: str, get: Any) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for n in sizes:
            c = cell(results, method, n)
            if ok(c):
                value = get(c)
                if value:
                    xs.append(n)
                    ys.append(value)
        return xs, ys

    def draw(axis: Any, method: str, xs: list[int], ys: list[float]) -> None:
        color, marker, line, size = STYLE[method]
        axis.plot(
            xs,
            ys,
            marker=marker,
            markersize=size,
            markerfacecolor="none" if size > 6 else color,
            linestyle=line,
            color=color,
            label=title(results, method),
        )

    def note_end(axis: Any, method: str, key: str, xs: list[int], ys: list[float]) -> None:
        """Say on the plot why a series stops before the largest N."""
        later = [n for n in sizes if n > xs[-1]]
        if not later:
            return
        reason = cell(results, method, later[0]).get(key, {}).get("not_run") or not_run(cell(results, method, later[0]))
        axis.annotate(
            f"{title(results, method).split(' (')[0]}: not run at N ≥ {later[0]:,}:\n" + textwrap.fill(reason, 42),
            xy=(xs[-1], ys[-1]),
            xytext=(12, -12),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=7,
            color=STYLE[method][0],
            arrowprops={"arrowstyle": "->", "color": STYLE[method][0]},
        )

    figure, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    for axis, label, key, get in (
        (axes[0], "full apply", "full", lambda c: median(c.get("full"))),
        (
            axes[1],
            "one change (median of add, change, delete)",
            "changes",
            lambda c: median(c.get("changes", {}).get("all")),
        ),
    ):
        for method in methods_of(results):
            xs, ys = series(method, get)
            if xs:
                draw(axis, method, xs, ys)
                note_end(axis, method, key, xs, ys)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("N (DNAT rules; + N/10 SNAT + N/10 FIP)")
        axis.set_ylabel("seconds")
        axis.set_title(label)
        axis.grid(True, which="both", alpha=0.3)
    # One legend for both, below them: inside, it covered a line.
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    figure.suptitle("Time until the change is in the kernel (lower is better)")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path = directory / "apply_time.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    figure, axis = plt.subplots(figsize=(10, 4.8))
    for method in methods_of(results):
        xs, ys = series(method, lambda c: median(c.get("conn")))
        if xs:
            draw(axis, method, xs, ys)
    plain = median(results.get("plain_routing", {}).get("conn"))
    if plain:
        axis.axhline(plain, color="black", linestyle=":", label="no NAT (plain routing)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("N (DNAT rules; + N/10 SNAT + N/10 FIP)")
    axis.set_ylabel("new TCP connections per second")
    axis.set_title("New connections through DNAT to the last rule (higher is better)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside: no line hidden
    figure.tight_layout()
    path = directory / "conn_rate.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    return written


# --- the document -----------------------------------------------------------------------


def findings(results: dict[str, Any]) -> list[str]:
    out = []
    for n in results["sizes"]:
        natgwd = cell(results, "natgwd", n)
        if not ok(natgwd):
            continue
        for metric, get, better_is_lower in (
            ("full apply", lambda c: median(c.get("full")), True),
            ("one change", lambda c: median(c.get("changes", {}).get("all")), True),
            ("connections/s", lambda c: median(c.get("conn")), False),
        ):
            values = {m: get(cell(results, m, n)) for m in COMPETITORS if ok(cell(results, m, n))}
            values = {m: v for m, v in values.items() if v is not None}
            if not values:
                continue
            ranked = sorted(values, key=values.__getitem__, reverse=not better_is_lower)
            best = ranked[0]
            if best == "natgwd":
                runner = ranked[1] if len(ranked) > 1 else None
                margin = ""
                if runner:
                    margin = (
                        f"; next: {title(results, runner)}, {fmt_metric(metric, values[runner])} "
                        f"({ratio(values[runner], values['natgwd'])} natgwd's)"
                    )
                out.append(
                    f"- N={n:,}, {metric}: natgwd is the fastest ({fmt_metric(metric, values['natgwd'])}){margin}."
                )
            else:
                preloaded = cell(results, best, n).get("preloaded") if metric == "one change" else None
                out.append(
                    f"- N={n:,}, {metric}: **natgwd is not the fastest**: {title(results, best)} "
                    f"({fmt_metric(metric, values[best])} against natgwd's {fmt_metric(metric, values['natgwd'])}"
                    f"{'; its rules were loaded with iptables-restore' if preloaded else ''})."
                )
                same = get(cell(results, "floor", n)) if ok(cell(results, "floor", n)) else None
                if metric == "connections/s" and same:
                    noise, gap = abs(same / values["natgwd"] - 1), values[best] / values["natgwd"] - 1
                    out.append(
                        f"  The gap is {gap:.0%}; natgwd and the floor, which hold the same kernel table, measured "
                        f"{noise:.0%} apart at this N (the run-to-run noise of this shared machine)."
                    )
            floor = get(cell(results, "floor", n)) if ok(cell(results, "floor", n)) else None
            if floor and better_is_lower and values["natgwd"] / floor > 1.5:
                out.append(f"  natgwd is **{ratio(values['natgwd'], floor)} the floor** (over 1.5x).")
    return out


def fmt_metric(metric: str, value: float) -> str:
    return f"{value:,.0f}/s" if metric == "connections/s" else seconds(value)


PLOTS = ("apply_time.png", "conn_rate.png")  # what plots() writes
RERENDER = "Re-render with `python -m benchmarks.report {}`."


def render(results: dict[str, Any], json_path: Path, markdown: Path) -> str:
    """Write RESULTS.md (`markdown`) and the plots from one run's results."""
    images = plots(results, json_path.parent)
    text = document(results, json_path, markdown, images)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text)
    return text


def source_of(text: str) -> Path:
    """The results file a RESULTS.md was rendered from."""
    prefix, suffix = RERENDER.split("{}")
    begin = text.index(prefix) + len(prefix)
    return REPO / text[begin : text.index(suffix, begin)]


def document(results: dict[str, Any], json_path: Path, markdown: Path, images: list[Path]) -> str:
    """RESULTS.md's text from one run's results; `images`: the plots written."""
    rel_json = os.path.relpath(json_path, markdown.parent)
    rerender = os.path.relpath(json_path.resolve(), REPO)
    m, v = results["machine"], results["versions"]
    load_start, load_end = results.get("loadavg_start", [0, 0, 0]), results.get("loadavg_end", [0, 0, 0])
    mix = results.get("mix", {})
    lines = [
        "# natgwd against other NAT data planes",
        "",
        "Generated by `benchmarks/report.py` from "
        f"[`{os.path.basename(json_path)}`]({rel_json}), every figure and ratio below; do not edit by hand. "
        + RERENDER.format(rerender),
        "",
        f"- **Command**: `{results['command']}` (as root; `make bench` installs what it needs and runs it), "
        f"{results['started']} - {results.get('finished', '?')}, {results.get('wall_seconds', 0) / 60:.1f} min.",
        f"- **Machine**: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB, {m['os']}, kernel {m['kernel']}. "
        f"Load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{', '.join(f'{x:.2f}' for x in load_end)} at the end (other work on the machine shares its 2 cores).",
        f"- **Versions**: natgwd {v['natgwd']}; Python {v['python']}; {v['nft']}; {v['iptables']}; {v['iperf3']}; "
        f"{v['gcc']}; {v['conntrack']}; matplotlib {v['matplotlib']}.",
        "- Everything runs in network namespaces created for the run (natgwd.lab.topology.Lab: gw, lan, ext, vm1), one "
        "fresh gateway per method and size, removed afterwards.",
        "",
        *takeaway(results),
        "## Summary",
        "",
        "Where natgwd is the fastest of the data planes (natgwd, iptables-restore, per-rule exec, naive nftables; "
        "the floor is a reference, not a competitor) and where it is more than 1.5x the floor:",
        "",
        *findings(results),
        "",
        "Why, in section 2's table of natgwd's own log lines and in the profile at the end.",
        "",
        "## What is compared",
        "",
    ]
    for method in methods_of(results):
        lines.append(f"- **{title(results, method)}**: {results['methods'][method]['description']}")
    lines += [
        "",
        "Per-rule exec and iptables-restore build the same iptables-legacy rule set; the floor builds natgwd's own "
        "table. A rule set is the same generated desired state for every method (benchmarks/rulesets.py, with "
        "benchmarks.apply_scale's generator):",
        "",
        "| N | DNAT | SNAT | FIP | EIPs | iptables rules (Kube-OVN layout) | natgwd state file |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in results["sizes"]:
        x = mix.get(str(n), {})
        if x:
            lines.append(
                f"| {n:,} | {x['dnat']:,} | {x['snat']:,} | {x['fip']:,} | {x['eips']:,} | {x['iptables_rules']:,} | "
                f"{x['state_file_bytes'] / 1e6:.2f} MB |"
            )
    lines += [
        "",
        "N DNAT rules (half tcp, half udp, 100 ports per EIP), min(N/10, 1,000) SNAT rules (a /24, /26, /28 and /32 "
        "per 10.60.j.0/24, applied longest prefix first) and min(N/10, 1,000) FIPs (one EIP each; the cap is the "
        "external /21's address plan). The last DNAT rule is tcp to vm1:8080 (the target of the connection and "
        "iperf3 tests) and the last SNAT rule covers the VMs' 172.20.10.0/24 (the SNAT iperf3 path). Addresses, "
        "EIPs and routes are configured before any clock starts (natgwd: by a first state with every EIP and no "
        "rule), so the times are those of the NAT rules.",
        "",
        "Ratios: `x natgwd` is the method's median divided by natgwd's at the same N (for times, above 1 is slower "
        "than natgwd; for rates and throughput, above 1 is faster). natgwd's row gives its median divided by the "
        "floor's.",
        "",
        "## 1. Full apply: from the new rule set to all rules active",
        "",
        "natgwd: from the rename of the new file until natgwd records it applied (from a state with the same EIPs "
        "and no rules). The others: from the start of their command(s) until they exit. Between repeats the gateway "
        "goes back to no rules (untimed).",
        "",
        *full_apply_table(results),
        "",
        *cold_start_lines(results),
        "## 2. One change among N rules",
        "",
        f"Rounds of: add one DNAT, change one DNAT's target, delete one DNAT (up to {results['options']['rounds']} "
        f"rounds, at least {results['options']['min_rounds']}, fewer when a cell's rounds pass "
        f"{results['options']['cell_budget']:.0f} s of wall time), the same sequence for every method.",
        "",
        *change_table(results),
        "",
        "Where natgwd's time goes, from its own log lines (median of the same events):",
        "",
        *natgwd_split_table(results),
        "",
        "The gap between end to end and natgwd's own time is the time to notice the new file (inotify wakes the "
        f"watcher at once; without it, the next stat() poll, every {POLL_SECONDS} s) and to record the applied state.",
        "",
        "## 3. New TCP connections per second through DNAT to the last rule",
        "",
        "benchmarks/connrate.c (compiled with gcc at run time): client in ext, "
        f"{results['options']['conn_concurrency']} "
        "non-blocking connects in flight, each closed with SO_LINGER 0 (RST) once the handshake completes; server in "
        f"vm1, an accept-and-close loop. {results['options']['conn_repeats']} runs of "
        f"{results['options']['conn_seconds']:g} s per cell, conntrack flushed before each. Client, server and the "
        "gateway's forwarding share the machine's 2 cores, so the no-NAT row is the ceiling of this setup. natgwd "
        "and the floor hold the same kernel table, so the gap between their rows shows the run-to-run noise.",
        "",
        *conn_table(results),
        "",
    ]
    lines += [
        *throughput_section(results.get("throughput")),
        "",
        "## 5. natgwd's memory and /metrics",
        "",
        f"RSS of the daemon (VmRSS, /proc/PID/status) and {results['options']['scrapes']} GETs of /metrics "
        "(every rule's counters, read from the kernel) per size.",
        "",
        *natgwd_resources_table(results),
        "",
        "## Where natgwd's time goes (profile)",
        "",
        *(profile_section(results) or ["(no profile in this run: natgwd was the fastest everywhere)"]),
        "",
        "## Plots",
        "",
    ]
    for image in images:
        lines.append(f"![{image.stem}]({os.path.relpath(image, markdown.parent)})")
        lines.append("")
    if not images:
        lines.append("(matplotlib is not installed: no plots)")
        lines.append("")
    lines += [
        "## Reproducing and comparing",
        "",
        "`make bench` (or, with the dependencies installed, `python -m benchmarks` as root) runs the default sizes; "
        "`python -m benchmarks --help` lists the options (sizes, repeats, budgets, durations). Each run writes "
        "`benchmarks/results/bench-<UTC time>.json` (every measured value, the options, the machine and the "
        "versions) and renders this file and the plots from it; `python -m benchmarks.report FILE` renders an "
        "older run again (`--docs docs/performance.md` regenerates that page's table from FILE too). Timing is "
        "never a test: tests/integration/test_bench_smoke.py only checks that the suite runs at "
        "N=10 and reports every method and metric.",
        "",
        *profile_appendix(results),
    ]
    return "\n".join(lines)


DOCS_N = 10000  # the size of docs/performance.md's table
DOCS_COLUMNS = ("natgwd", "per-rule-exec", "iptables-restore", "naive-nft")
DOCS_BEGIN = "<!-- performance table: python -m benchmarks.report {} --docs docs/performance.md -->"
DOCS_END = "<!-- end of the performance table -->"


def performance_table(results: dict[str, Any], json_path: Path) -> list[str]:
    """docs/performance.md's table: every figure from the one results file it names."""
    sizes = [n for n in results["sizes"] if ok(cell(results, "natgwd", n))]
    n = DOCS_N if DOCS_N in sizes else max(sizes)
    mix = results["mix"][str(n)]
    named = os.path.relpath(json_path.resolve(), REPO)
    columns = [m for m in DOCS_COLUMNS if m in results["cells"]]
    lines = [
        DOCS_BEGIN.format(named),
        f"From [`{json_path.name}`](../{named}) ({results['started'][:10]}, load average "
        f"{results['loadavg_start'][0]:.1f} at the start), at {mix['dnat']:,} DNAT + {mix['snat']:,} SNAT + "
        f"{mix['fip']:,} FIP rules, medians, the best in bold:",
        "",
        "| | " + " | ".join(title(results, m) for m in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, get, fmt, lower in (
        ("new connections/s through DNAT", lambda c: median(c.get("conn")), rate, False),
        ("full apply", lambda c: median(c.get("full")), seconds, True),
        (
            "one rule changed: file written → kernel updated",
            lambda c: median(c.get("changes", {}).get("all")),
            seconds,
            True,
        ),
    ):
        values = {m: get(cell(results, m, n)) if ok(cell(results, m, n)) else None for m in columns}
        measured = {m: v for m, v in values.items() if v is not None}
        best = (min if lower else max)(measured, key=measured.__getitem__) if measured else None
        texts = []
        for m in columns:
            if values[m] is None:
                c = cell(results, m, n)
                reason = c.get("full", {}).get("not_run")
                texts.append(f"not run: {reason}" if reason and label == "full apply" else not_run(c))
            else:
                texts.append(f"**{fmt(values[m])}**" if m == best else fmt(values[m]))
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    scrape = median(cell(results, "natgwd", n).get("natgwd", {}).get("scrape"))
    lines.append(
        "| `/metrics` with every rule's counters | "
        + " | ".join(seconds(scrape) if m == "natgwd" else "none" for m in columns)
        + " |"
    )
    lines.append(DOCS_END)
    return lines


def replace_docs_table(text: str, table: list[str]) -> str:
    """`text` with its performance table (between the markers) replaced by `table`."""
    begin = text.index(DOCS_BEGIN.split("{}")[0])
    end = text.index(DOCS_END, begin) + len(DOCS_END)
    return text[:begin] + "\n".join(table) + text[end:]


def docs_source(text: str) -> Path:
    """The results file that the performance table of `text` names."""
    prefix, suffix = DOCS_BEGIN.split("{}")
    begin = text.index(prefix) + len(prefix)
    return REPO / text[begin : text.index(suffix, begin)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--markdown", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--docs", type=Path, help="regenerate this file's performance table (docs/performance.md)")
    args = parser.parse_args(argv)
    results = json.loads(args.json.read_text())
    render(results, args.json, args.markdown)
    print(f"wrote {args.markdown}", file=sys.stderr)
    if args.docs:
        args.docs.write_text(replace_docs_table(args.docs.read_text(), performance_table(results, args.json)))
        print(f"wrote {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
