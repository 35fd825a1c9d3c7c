"""Conntrack pressure, read over ctnetlink at scrape time: the table's fill (entries and
limit) and the kernel's per-CPU statistics summed over the CPUs (what `conntrack -S`
prints), exported as they are: the kernel's counters are already cumulative.

No dedicated "NAT ports exhausted" counter exists in Linux: a source NAT that finds no
free tuple ends in `insert_failed` (and `drop`) when conntrack confirms the connection.
natgwd attributes those failures to rules and EIPs elsewhere (natgwd.observability.ctopen).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog
from pyroute2 import Conntrack

log = structlog.get_logger("natgwd.observability.ctstats")

# ctnetlink's name (as pyroute2 lowercases it) -> (metric, help). The kernel keeps these
# per CPU as 32-bit values; the sum is what one table-wide counter would be.
STAT_FAMILIES: dict[str, tuple[str, str]] = {
    "found": ("natgwd_conntrack_found_total", "Lookups that found an existing conntrack entry."),
    "invalid": ("natgwd_conntrack_invalid_total", "Packets conntrack could not track (invalid)."),
    "insert": ("natgwd_conntrack_insert_total", "Conntrack entries inserted (kernels that still count it)."),
    "insert_failed": (
        "natgwd_conntrack_insert_failed_total",
        "New connections whose entry could not be inserted: a clash, e.g. no free NAT tuple.",
    ),
    "drop": ("natgwd_conntrack_drop_total", "Packets dropped because their new connection could not be tracked."),
    "early_drop": (
        "natgwd_conntrack_early_drop_total",
        "Unassured entries evicted to make room for new ones in a full table.",
    ),
    "error": ("natgwd_conntrack_error_total", "Packets with an error conntrack reported (e.g. bad checksum)."),
    "search_restart": (
        "natgwd_conntrack_search_restart_total",
        "Lookups restarted because the hash table was resized meanwhile.",
    ),
    "clash_resolve": (
        "natgwd_conntrack_clash_resolve_total",
        "Insert clashes resolved by reusing the existing entry (racing UDP packets).",
    ),
    "chain_toolong": (
        "natgwd_conntrack_chaintoolong_total",
        "New connections refused because their hash chain was too long.",
    ),
}


@dataclass(frozen=True)
class Pressure:
    entries: int
    limit: int
    stats: Mapping[str, int]  # pyroute2's statistic name -> sum over CPUs


def summed(per_cpu: Iterable[Mapping[str, object]]) -> dict[str, int]:
    """The statistics of every CPU added up, by name; the CPU number is not a statistic."""
    totals: dict[str, int] = {}
    for cpu in per_cpu:
        for name, value in cpu.items():
            if name != "cpu" and isinstance(value, int):
                totals[name] = totals.get(name, 0) + value
    return totals


def read_pressure() -> Pressure:
    with Conntrack(nfgen_family=socket.AF_INET) as ct:
        return Pressure(int(ct.count() or 0), int(ct.conntrack_max_size() or 0), summed(ct.stat()))


def exposition(pressure: Pressure) -> bytes:
    lines = [
        "# HELP natgwd_conntrack_entries Connections in the conntrack table now (all families).",
        "# TYPE natgwd_conntrack_entries gauge",
        f"natgwd_conntrack_entries {pressure.entries}",
        "# HELP natgwd_conntrack_entries_limit The conntrack table's size limit (nf_conntrack_max).",
        "# TYPE natgwd_conntrack_entries_limit gauge",
        f"natgwd_conntrack_entries_limit {pressure.limit}",
    ]
    for name, (family, help_text) in STAT_FAMILIES.items():
        if name in pressure.stats:  # newer kernels no longer report some (insert, searched)
            lines += [f"# HELP {family} {help_text}", f"# TYPE {family} counter", f"{family} {pressure.stats[name]}"]
    return ("\n".join(lines) + "\n").encode()


def scrape() -> bytes:
    """The pressure lines for /metrics; none (and an error logged) when ctnetlink fails."""
    try:
        return exposition(read_pressure())
    except OSError as err:  # NetlinkError is an OSError too
        log.error("reading conntrack statistics failed", error=str(err))
        return b""
