"""Prometheus metrics: the daemon's own, and per-rule counters read from the kernel at
scrape time (the kernel's counters are already cumulative, so they are exported as they
are rather than mirrored into client-side counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from natgwd.plan import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC, RuleLabels
from natgwd.table import Element

RULE_LABELS = ("kind", "name", "eip")
COUNTING_SETS = (RULE_CONNECTIONS, RULE_TRAFFIC, INVALID_DROPS)


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
        for reason in ("fip", "dnat", "snat", "removed"):
            self.conntrack_deleted.labels(reason)
        for kind in ("snat", "dnat", "fip"):
            self.rules.labels(kind)
        for result in ("applied", "unchanged", "invalid", "error"):
            self.reconciles.labels(result)
        for resource in ("nftables", "addresses_routes", "forwarding"):
            self.drift_repairs.labels(resource)


class RuleCountersCollector(Collector):
    """Reads the counting sets at scrape time; `read` returns their elements."""

    def __init__(self, read: Callable[[], dict[str, dict[str, Element]]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())  # counters appear and vanish with rules; nothing fixed to declare

    def collect(self) -> Iterator[Metric]:
        sets = self._read()
        connections = CounterMetricFamily(
            "natgwd_rule_connections",
            "Connections the rule translated (first packets seen by NAT).",
            labels=RULE_LABELS,
        )
        packets = CounterMetricFamily(
            "natgwd_rule_packets",
            "Packets of the connections the rule translated, by direction.",
            labels=(*RULE_LABELS, "direction"),
        )
        octets = CounterMetricFamily(
            "natgwd_rule_bytes",
            "Bytes (IP length) of the connections the rule translated, by direction.",
            labels=(*RULE_LABELS, "direction"),
        )
        invalid = CounterMetricFamily(
            "natgwd_invalid_dropped_packets",
            "Packets dropped because conntrack found them invalid (they would leave un-NATed).",
            labels=("interface",),
        )
        labels_of: dict[str, list[str]] = {}
        for mark, element in sets.get(RULE_CONNECTIONS, {}).items():
            labels = RuleLabels.from_comment(element.comment or "")
            if labels is None or element.counter is None:
                continue
            labels_of[mark] = [labels.kind, labels.name, labels.eip]
            connections.add_metric(labels_of[mark], element.counter.packets)
        for key, element in sets.get(RULE_TRAFFIC, {}).items():
            direction, _, mark = key.partition(" . ")
            if mark in labels_of and element.counter is not None:
                packets.add_metric([*labels_of[mark], direction], element.counter.packets)
                octets.add_metric([*labels_of[mark], direction], element.counter.bytes)
        for interface, element in sets.get(INVALID_DROPS, {}).items():
            if element.counter is not None:
                invalid.add_metric([interface.strip('"')], element.counter.packets)
        yield from (connections, packets, octets, invalid)
