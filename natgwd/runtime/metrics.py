"""Prometheus metrics: the daemon's own, and per-rule counters read from the kernel at
scrape time (the kernel's counters are already cumulative, so they are exported as they
are rather than mirrored into client-side counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from natgwd.planning.counters import Listings
from natgwd.planning.plan import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC, RuleLabels, split_traffic_key
from natgwd.state.model import RULE_KINDS


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconciles = Counter(
            "natgwd_reconciles",
            "Reconciles by result: applied, unchanged, invalid or error.",
            ["result"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "natgwd_reconcile_duration_seconds",
            "Time from reading the desired state to the kernel matching it.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.rules = Gauge("natgwd_rules", "NAT rules in the applied state.", ["kind"], registry=registry)
        self.desired_state_valid = Gauge(
            "natgwd_desired_state_valid",
            "1 when the desired-state file is valid, 0 when it was rejected.",
            registry=registry,
        )
        self.last_success = Gauge(
            "natgwd_last_successful_reconcile_timestamp_seconds",
            "Unix time of the last reconcile that left the kernel equal to the desired state.",
            registry=registry,
        )
        self.drift_repairs = Counter(
            "natgwd_drift_repairs",
            "Changes made to undo drift: state altered by someone else.",
            ["resource"],
            registry=registry,
        )
        self.nft_elements = Gauge(
            "natgwd_nftables_elements",
            "Elements in natgwd's nftables sets and maps.",
            registry=registry,
        )
        self.interfaces_missing = Gauge(
            "natgwd_interfaces_missing",
            "Declared interfaces that do not exist (yet).",
            registry=registry,
        )
        self.conntrack_deleted = Counter(
            "natgwd_conntrack_entries_deleted",
            "Conntrack entries deleted because their translation no longer matched the rules, by reason.",
            ["reason"],
            registry=registry,
        )
        self.garp_sent = Counter(
            "natgwd_gratuitous_arp_packets",
            "Gratuitous ARP frames sent for EIPs.",
            ["interface"],
            registry=registry,
        )
        self.state_changes = Counter(
            "natgwd_state_changes",
            "Applied desired states by path: delta (only the changed rules checked and planned) or full.",
            ["path"],
            registry=registry,
        )
        self.delta_mismatches = Counter(
            "natgwd_delta_mismatches",
            "Resyncs where the state or table built change by change differed from the full path's "
            "(a bug; the state file was applied again in full).",
            registry=registry,
        )
        for path in ("delta", "full"):
            self.state_changes.labels(path)
        for reason in ("fip", "dnat", "snat", "removed"):
            self.conntrack_deleted.labels(reason)
        for kind in RULE_KINDS:
            self.rules.labels(kind)
        for result in ("applied", "unchanged", "invalid", "error"):
            self.reconciles.labels(result)
        for resource in ("nftables", "addresses_routes", "forwarding"):
            self.drift_repairs.labels(resource)


class RuleCounters:
    """The per-rule counters in the Prometheus text format, read from the kernel's
    counting sets at scrape time (`read` lists them).

    At 10,000 rules this is 60,000 samples. They are written as text directly, from the
    kernel's listing: building them through prometheus_client's metric families costs ten
    times more, and a scrape shares the interpreter with a daemon that may be planning a
    change at that moment."""

    def __init__(self, read: Callable[[], Listings]) -> None:
        self._read = read

    def exposition(self, listings: Listings | None = None) -> bytes:
        """`listings`: the counting sets when the caller has just listed them (one listing
        per scrape serves every exporter); read here otherwise."""
        if listings is None:
            listings = self._read()
        connections, packets, octets, invalid = (
            [f"# HELP {family} {help_text}", f"# TYPE {family} counter"] for family, help_text in _FAMILIES
        )
        labels_of: dict[str, str] = {}
        for mark, count, _, comment in listings.get(RULE_CONNECTIONS, ()):
            rule = RuleLabels.from_comment(comment)
            if rule is not None:
                labels_of[mark] = labels = f'kind="{rule.kind}",name="{escaped(rule.name)}",eip="{escaped(rule.eip)}"'
                connections.append(f"natgwd_rule_connections_total{{{labels}}} {count}")
        for key, count, size, _ in listings.get(RULE_TRAFFIC, ()):
            direction, mark = split_traffic_key(key)
            if (rule_labels := labels_of.get(mark)) is not None:
                labels = f'{rule_labels},direction="{escaped(direction)}"'
                packets.append(f"natgwd_rule_packets_total{{{labels}}} {count}")
                octets.append(f"natgwd_rule_bytes_total{{{labels}}} {size}")
        for interface, count, _, _ in listings.get(INVALID_DROPS, ()):
            name = escaped(interface.strip('"'))
            invalid.append(f'natgwd_invalid_dropped_packets_total{{interface="{name}"}} {count}')
        return "\n".join((*connections, *packets, *octets, *invalid, "")).encode()


_FAMILIES = (
    ("natgwd_rule_connections_total", "Connections the rule translated (first packets seen by NAT)."),
    ("natgwd_rule_packets_total", "Packets of the connections the rule translated, by direction."),
    ("natgwd_rule_bytes_total", "Bytes (IP length) of the connections the rule translated, by direction."),
    (
        "natgwd_invalid_dropped_packets_total",
        "Packets dropped because conntrack found them invalid (they would leave un-NATed).",
    ),
)


def escaped(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value
