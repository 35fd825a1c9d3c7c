"""`natgwd status`: the rules in the kernel with their live counters, read from the table
alone (what operators used `iptables-legacy -t nat -L -n -v` for)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from natgwd.planning.layout import RULE_CONNECTIONS, RULE_TRAFFIC, split_traffic_key, whole_elements
from natgwd.planning.plan import RuleLabels, address_text, decode_rules, network_text, rule_labels
from natgwd.planning.table import Counter, TableContents
from natgwd.state.model import DesiredState, FipRule, SnatRule
from natgwd.state.rules import Rule


def _endpoint(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass
class RuleStatus:
    kind: str
    name: str
    eip: str
    id: int
    translations: list[str] = field(default_factory=list)
    connections: int = 0
    original_packets: int = 0
    original_bytes: int = 0
    reply_packets: int = 0
    reply_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _arrows(rule: Rule) -> list[str]:
    """What a rule translates, as `natgwd status` shows it: one arrow per port of a range."""
    if isinstance(rule, FipRule):
        internal = address_text(rule.internal_ip)
        return [f"{internal} -> {rule.eip} (out)", f"{rule.eip} -> {internal} (in)"]
    if isinstance(rule, SnatRule):
        to = f" (to {', '.join(map(network_text, rule.destinations))})" if rule.destinations else ""
        return [f"{address_text(rule.internal_cidr.network_address)}/{rule.internal_cidr.prefixlen} -> {rule.eip}{to}"]
    internal = address_text(rule.internal_ip)
    if rule.type == "share":
        return [f"(share backend) -> {_endpoint(internal, str(rule.internal_port.first))}"]
    shift = rule.internal_port.first - rule.external_port.first
    return [
        f"{_endpoint(rule.eip, str(port))}/{rule.protocol} -> {_endpoint(internal, str(port + shift))}"
        for port in range(rule.external_port.first, rule.external_port.last + 1)
    ]


def rule_statuses(table: TableContents) -> list[RuleStatus]:
    rules: dict[str, RuleStatus] = {}
    for mark, element in whole_elements(table.elements, RULE_CONNECTIONS):
        labels = RuleLabels.from_comment(element.comment or "")
        if labels is None:
            continue
        counter = element.counter or Counter(0, 0)
        rules[mark] = RuleStatus(labels.kind, labels.name, labels.eip, int(mark), connections=counter.packets)
    for key, element in whole_elements(table.elements, RULE_TRAFFIC):
        direction, mark = split_traffic_key(key)
        if mark in rules and element.counter is not None:
            setattr(rules[mark], f"{direction}_packets", element.counter.packets)
            setattr(rules[mark], f"{direction}_bytes", element.counter.bytes)
    translations: dict[str, list[str]] = defaultdict(list)
    for found in decode_rules(table):
        translations[str(found.mark)] += _arrows(found.rule)
    for mark, rule in rules.items():
        rule.translations = _summarise(sorted(translations.get(mark, []), key=_natural))
    return sorted(rules.values(), key=lambda r: (r.kind, r.name))


def record_mismatch(recorded: DesiredState | None, rules: list[RuleStatus]) -> str | None:
    """Why an applied-state record does not describe this table, or None when it does. The
    default record is host-wide: it may be another namespace's daemon's."""
    if recorded is None:
        return "it holds no readable state"
    expected: set[tuple[str, str, str]] = set(rule_labels(recorded))
    present = {(r.kind, r.name, r.eip) for r in rules}
    if expected == present:
        return None
    missing, extra = sorted(expected - present), sorted(present - expected)
    parts = [f"{len(missing)} of its rules are not in the table"] if missing else []
    parts += [f"{len(extra)} of the table's rules are not in it"] if extra else []
    return f"{' and '.join(parts)} (e.g. {'/'.join((missing or extra)[0])})"


def _natural(text: str) -> list[int | str]:
    """Sort key that orders the numbers inside text by value (port 9999 before 10000)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _summarise(translations: list[str]) -> list[str]:
    # A port range is one element per port: show its ends, not thousands of lines.
    if len(translations) <= 2:
        return translations
    return [translations[0], f"... {len(translations) - 2} more ...", translations[-1]]


def format_table(rules: list[RuleStatus]) -> str:
    header = ("KIND", "NAME", "EIP", "TRANSLATION", "CONNS", "ORIG PKTS", "ORIG BYTES", "REPLY PKTS", "REPLY BYTES")
    rows = [
        (
            r.kind,
            r.name,
            r.eip,
            "; ".join(r.translations),
            str(r.connections),
            str(r.original_packets),
            str(r.original_bytes),
            str(r.reply_packets),
            str(r.reply_bytes),
        )
        for r in rules
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"
