"""The shaping as it runs: per class of natgwd's HTB trees (an EIP and a direction, a
gateway rule, the default class), the kernel's counters and the configured rate, labelled
from the desired state; for /metrics (read at scrape time, like the rule counters) and for
`natgwd status`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import structlog

from natgwd.qos.plan import ClassStats, wants
from natgwd.state.model import DesiredState

log = structlog.get_logger("natgwd.qos.status")


class Shaping(Protocol):
    def stats(self, external: str) -> list[ClassStats]: ...

    @property
    def leaf(self) -> str | None: ...


class ShapedKernel(Shaping, Protocol):
    def shaped_interfaces(self) -> list[str]: ...


@dataclass(frozen=True)
class QosStatus:
    direction: str
    kind: str  # eip, cidr, nic or default
    name: str  # the EIP, or policy/rule of a gateway rule; "" where the state does not say
    match: str  # the EIP's address, the rule's "src|dst CIDR"; "" for nic and default
    rate_bits: int  # configured, per second
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog_bytes: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def qos_statuses(stats: list[ClassStats], state: DesiredState | None) -> list[QosStatus]:
    planned = wants(state).by_direction if state is not None else {}
    rows = []
    for entry in stats:
        want = planned.get(entry.direction, {}).get(entry.key)
        rows.append(
            QosStatus(
                entry.direction,
                entry.key.kind,
                want.label if want is not None else "",
                entry.key.match,
                entry.rate_bytes * 8,
                entry.bytes,
                entry.packets,
                entry.drops,
                entry.overlimits,
                entry.backlog_bytes,
            )
        )
    order = {"eip": 0, "cidr": 1, "nic": 2, "default": 3}
    return sorted(rows, key=lambda r: (order.get(r.kind, 4), r.name, r.match, r.direction))


_FAMILIES = (
    (
        "natgwd_qos_sent_bytes_total",
        "counter",
        "Bytes a QoS class sent (whole frames).",
        "bytes",
    ),
    ("natgwd_qos_sent_packets_total", "counter", "Packets a QoS class sent.", "packets"),
    ("natgwd_qos_dropped_packets_total", "counter", "Packets a QoS class dropped (its queue was full).", "drops"),
    (
        "natgwd_qos_overlimits_total",
        "counter",
        "Times a QoS class delayed a packet to keep its rate.",
        "overlimits",
    ),
    ("natgwd_qos_backlog_bytes", "gauge", "Bytes queued in a QoS class now.", "backlog_bytes"),
)


def exposition(rows: list[QosStatus], leaf: str | None) -> bytes:
    """The Prometheus text of the rows; `leaf` is the leaf qdisc kind in use (None: not
    known yet, no class added since start)."""
    lines: list[str] = []
    for family, kind, help_text, field in _FAMILIES:
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}"]
        lines += [f"{family}{{{_labels(row)}}} {getattr(row, field)}" for row in rows]
    lines += [
        "# HELP natgwd_qos_rate_limit_bytes_per_second The rate a QoS class is configured to (bytes per second).",
        "# TYPE natgwd_qos_rate_limit_bytes_per_second gauge",
    ]
    lines += [f"natgwd_qos_rate_limit_bytes_per_second{{{_labels(row)}}} {row.rate_bits // 8}" for row in rows]
    if leaf is not None:
        lines += [
            "# HELP natgwd_qos_leaf_qdisc_info The qdisc under each QoS class: fq_codel, or the kernel's default "
            "where it has no fq_codel.",
            "# TYPE natgwd_qos_leaf_qdisc_info gauge",
            f'natgwd_qos_leaf_qdisc_info{{kind="{leaf}"}} 1',
        ]
    return "\n".join((*lines, "")).encode()


def kernel_statuses(kernel: ShapedKernel, state: DesiredState | None) -> list[QosStatus]:
    """The rows of the kernel's shaping (`natgwd status`): of the state's external
    interface, or without a state of every interface natgwd shapes (unlabelled)."""
    externals = [state.external.interface] if state is not None else kernel.shaped_interfaces()
    return qos_statuses([entry for name in externals for entry in kernel.stats(name)], state)


def shaping_exposition(shaping: Shaping | None, state: DesiredState | None) -> bytes:
    """The QoS samples for a scrape: nothing without QoS or when the kernel cannot be read
    (the scrape's other samples still go out)."""
    # No policy bound: natgwd keeps no tree, and a scrape asks the kernel nothing.
    if shaping is None or state is None or not (state.qos_policy or any(e.qos_policy for e in state.eips)):
        return b""
    try:
        rows = qos_statuses(shaping.stats(state.external.interface), state)
    except OSError as err:
        log.error("reading QoS statistics failed", error=str(err))
        return b""
    return exposition(rows, shaping.leaf) if rows else b""


def _labels(row: QosStatus) -> str:
    # No escaping needed: names are DNS-1123 labels (validated), matches addresses and CIDRs.
    return f'direction="{row.direction}",kind="{row.kind}",name="{row.name}",match="{row.match}"'


def format_table(rows: list[QosStatus]) -> str:
    header = ("QOS", "NAME", "MATCH", "DIRECTION", "RATE", "SENT BYTES", "SENT PKTS", "DROPS", "OVERLIMITS", "BACKLOG")
    cells = [
        (
            r.kind,
            r.name,
            r.match,
            r.direction,
            f"{r.rate_bits / 1_000_000:g}Mbit",
            str(r.bytes),
            str(r.packets),
            str(r.drops),
            str(r.overlimits),
            str(r.backlog_bytes),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *cells]]
    return "\n".join(lines) + "\n"
