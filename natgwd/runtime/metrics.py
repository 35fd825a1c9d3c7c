"""Prometheus metrics: the daemon's own, and per-rule counters read from the kernel at
scrape time (the kernel's counters are already cumulative, so they are exported as they
are rather than mirrored into client-side counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain, islice, repeat
from operator import itemgetter
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from natgwd.observability.exposition import RuleLabel, RuleLabelTexts, escaped, family_text
from natgwd.planning.counters import CountedElement, Listings, canonical_key
from natgwd.planning.handover import HANDED_OVER
from natgwd.planning.layout import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC, split_traffic_key
from natgwd.runtime.reconciler import Repair
from natgwd.state.model import RULE_KINDS
from natgwd.state.scaleout import HANDOVER_BASE
from natgwd.state.timeouts import PROTOCOLS, TimeoutPolicy


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
        self.edit_log_lines_refused = Counter(
            "natgwd_edit_log_lines_refused",
            "Lines of the edit log (<state>.edits) left out when it was folded into the state file: "
            "not an edit natgwd writes (damage or tampering).",
            registry=registry,
        )
        self.timeout_policy_rules = Gauge(
            "natgwd_timeout_policy_rules",
            "NAT rules whose connections get an idle-timeout policy, by policy (its nftables objects' name).",
            ["policy"],
            registry=registry,
        )
        self.timeout_policy_seconds = Gauge(
            "natgwd_timeout_policy_seconds",
            "The idle timeouts a policy in use sets, by protocol and conntrack state; a state absent keeps "
            "the kernel's.",
            ["policy", "protocol", "state"],
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
        for resource in Repair:
            self.drift_repairs.labels(resource)

    def show_timeout_policies(self, policies: Mapping[TimeoutPolicy, int]) -> None:
        """The policies in use now (those of an earlier state are dropped)."""
        self.timeout_policy_rules.clear()
        self.timeout_policy_seconds.clear()
        for policy, rules in policies.items():
            self.timeout_policy_rules.labels(policy.name).set(rules)
            for protocol in PROTOCOLS:
                for state, seconds in policy.states(protocol):
                    self.timeout_policy_seconds.labels(policy.name, protocol, state).set(seconds)


class RuleCounters:
    """The per-rule counters in the Prometheus text format, read from the kernel's
    counting sets at scrape time (`read` lists them).

    At 10,000 rules this is 60,000 samples. They are written as text directly, from the
    kernel's listing: building them through prometheus_client's metric families costs ten
    times more, and a scrape shares the interpreter with a daemon that may be planning a
    change at that moment. Each family is joined from its pieces in one C loop, and the
    label text of a rule is kept from one scrape to the next."""

    def __init__(self, read: Callable[[], Listings]) -> None:
        self._read = read
        self._rules = RuleLabelTexts()
        # rule_traffic key -> its labels' text, closed, for the rules' labels it was made from.
        self._traffic_texts: tuple[Mapping[str, RuleLabel], dict[str, str]] = ({}, {})

    def exposition(self, listings: Listings | None = None) -> bytes:
        """`listings`: the counting sets when the caller has just listed them (one listing
        per scrape serves every exporter); read here otherwise."""
        return b"".join(self.labelled_exposition(self._read() if listings is None else listings)[0])

    def labelled_exposition(self, listings: Listings) -> tuple[Iterator[bytes], Mapping[str, RuleLabel]]:
        """The exposition in parts of about a megabyte, made as they are taken (at 50,000
        rules a whole one is 24 MB: one part's text and bytes are held at a time, and the
        listings are not needed for them), and the rules' labels it was made with
        (mark -> label), for the other exporters of the same scrape."""
        connections = listings.get(RULE_CONNECTIONS, ())
        labelled = self._rules.of(connections)
        found = list(map(labelled.get, map(_KEY, connections)))
        if None in found:  # elements that name no rule are left out
            texts = [label.text for label in found if label is not None]
            counts = [element[1] for element, label in zip(connections, found, strict=True) if label is not None]
        else:
            texts, counts = list(map(_TEXT, found)), list(map(_PACKETS, connections))
        traffic_texts, packets, octets = self._traffic(labelled, listings.get(RULE_TRAFFIC, ()))
        interfaces, dropped = [], []
        for interface, count, _, _ in listings.get(INVALID_DROPS, ()):
            interfaces.append(escaped(interface.strip('"')))
            dropped.append(count)
        # Only scaled out (the set exists then): packets this member handed to a group's owner.
        handed = listings.get(HANDED_OVER)
        groups = [f"g{int(canonical_key(key)) - HANDOVER_BASE}" for key, _, _, _ in handed or ()]
        families = (
            family_text(_FAMILIES[0], texts, repeat("} "), counts),
            family_text(_FAMILIES[1], traffic_texts, None, packets),
            family_text(_FAMILIES[2], traffic_texts, None, octets),
            family_text(_FAMILIES[3], interfaces, repeat('"} '), dropped, opening='{interface="'),
            family_text(_FAMILIES[4], groups, repeat('"} '), [c for _, c, _, _ in handed or ()], opening='{group="')
            if handed is not None
            else iter(()),
        )
        return _parts(chain.from_iterable(families)), labelled

    def _traffic(
        self, labelled: Mapping[str, RuleLabel], traffic: Sequence[CountedElement]
    ) -> tuple[list[str], list[str], list[str]]:
        """The closed label text (rule and direction), packets and bytes of the traffic
        elements of the labelled rules. While the rules stay the same (the same mapping
        from RuleLabelTexts), each key's text is looked up in C loops."""
        made_for, texts_of = self._traffic_texts
        if made_for is labelled:
            found = list(map(texts_of.get, map(_KEY, traffic)))
            if None not in found:
                return cast("list[str]", found), list(map(_PACKETS, traffic)), list(map(_BYTES, traffic))
        texts_of = {}
        direction_texts: dict[str, str] = {}
        texts, packets, octets = [], [], []
        for key, count, size, _ in traffic:
            direction, mark = split_traffic_key(key)
            if (rule := labelled.get(mark)) is not None:
                closing = direction_texts.get(direction)
                if closing is None:
                    closing = direction_texts[direction] = f',direction="{escaped(direction)}"}} '
                text = texts_of[key] = rule.text + closing
                texts.append(text)
                packets.append(count)
                octets.append(size)
        self._traffic_texts = (labelled, texts_of)
        return texts, packets, octets


def _parts(pieces: Iterator[str]) -> Iterator[bytes]:
    """The pieces joined and encoded PART_PIECES at a time."""
    while text := "".join(islice(pieces, PART_PIECES)):
        yield text.encode()


PART_PIECES = 30_000  # 7,500 to 10,000 samples: about a megabyte

# Fields of listed elements, of RuleLabel and of (text, text) pairs, for C loops.
_KEY: Callable[[Any], str] = itemgetter(0)
_TEXT: Callable[[Any], str] = itemgetter(1)
_PACKETS: Callable[[Any], str] = itemgetter(1)
_BYTES: Callable[[Any], str] = itemgetter(2)


_FAMILIES = (
    ("natgwd_rule_connections_total", "counter", "Connections the rule translated (first packets seen by NAT)."),
    ("natgwd_rule_packets_total", "counter", "Packets of the connections the rule translated, by direction."),
    (
        "natgwd_rule_bytes_total",
        "counter",
        "Bytes (IP length) of the connections the rule translated, by direction.",
    ),
    (
        "natgwd_invalid_dropped_packets_total",
        "counter",
        "Packets dropped because conntrack found them invalid (they would leave un-NATed).",
    ),
    (
        "natgwd_scale_handed_over_packets_total",
        "counter",
        "Packets this member handed unchanged to the owner of their EIP group (scaled out), by group.",
    ),
)
