"""Translation logs: one JSON line when a translated connection starts and one when it
ends, saying which internal address used which public address and port (Kube-OVN #1358).

The `connection` object uses the field names of GCP Cloud NAT's logs (src_ip, src_port,
dest_ip, dest_port, protocol, nat_ip, nat_port); nat_ip:nat_port is what the translation
put in place of the original: the new source for SNAT and FIP, the new destination for
DNAT. `original` and `translated` are the whole tuples as each end sees them. An end line
carries the packets and bytes of both directions when conntrack accounting is on
(natgwd turns net.netfilter.nf_conntrack_acct on when logging), and `end_reason` when
natgwd itself deleted the connection (natgwd.observability.endings). An end line comes when
conntrack forgets the connection (after TCP's TIME_WAIT, or an idle timeout), not at its
last packet. docs/metrics.md ("Translation logs") describes every field.

Lines are capped by a token bucket (GCP caps too); lines over the cap are counted, not
written.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from natgwd.observability.ctevents import CtEvent
from natgwd.observability.endings import Endings
from natgwd.planning.plan import RuleLabels

ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"


@dataclass(frozen=True)
class Selection:
    """Which rules are logged: those named ("kind/name") or translating to a listed EIP;
    every rule when both are empty."""

    rules: frozenset[str] = frozenset()
    eips: frozenset[str] = frozenset()

    def wants(self, labels: RuleLabels) -> bool:
        if not self.rules and not self.eips:
            return True
        return f"{labels.kind}/{labels.name}" in self.rules or labels.eip in self.eips


class RateCap:
    """A token bucket: `rate` lines per second, bursts of up to `rate` lines."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@functools.lru_cache(maxsize=65536)
def _rule_fields(labels: RuleLabels) -> str:
    return json.dumps({"rule": {"kind": labels.kind, "name": labels.name}, "eip": labels.eip}, separators=(",", ":"))[
        1:-1
    ]


def _ends(src: str, sport: int, dst: str, dport: int, proto: int) -> str:
    # Addresses are inet_ntoa/inet_ntop text and the rest numbers: nothing to escape.
    return f'"src_ip":"{src}","src_port":{sport},"dest_ip":"{dst}","dest_port":{dport},"protocol":{proto}'


# Why natgwd deleted a connection (natgwd.planning.stale's reasons), as the end line says it.
END_REASONS = {
    "fip": "rule_changed",
    "dnat": "rule_changed",
    "snat": "rule_changed",
    "removed": "rule_removed",
}


def line(event: CtEvent, labels: RuleLabels, when: str, ended_by: str | None = None) -> str:
    """The JSON line of a NEW (start) or DESTROY (end) event of a translated connection.
    Written with f-strings: json.dumps of the same object costs four times more, and a busy
    gateway logs tens of thousands of these a second."""
    orig, reply = event.orig, event.reply
    original = _ends(orig.src, orig.sport, orig.dst, orig.dport, orig.proto)
    # The reply tuple reversed is the connection as the far end sees it.
    translated = _ends(reply.dst, reply.dport, reply.src, reply.sport, orig.proto)
    nat_ip, nat_port = (reply.dst, reply.dport) if event.source_translated else (reply.src, reply.sport)
    counts = f',"end_reason":"{END_REASONS.get(ended_by, ended_by)}"' if ended_by else ""
    if event.kind == "destroy" and event.counters_orig and event.counters_reply:
        (sent_packets, sent_bytes), (received_packets, received_bytes) = event.counters_orig, event.counters_reply
        counts += (
            f',"packets_sent":{sent_packets},"bytes_sent":{sent_bytes},'
            f'"packets_received":{received_packets},"bytes_received":{received_bytes}'
        )
    return (
        f'{{"time":"{when}","event":"{"start" if event.kind == "new" else "end"}",'
        f'"connection":{{{original},"nat_ip":"{nat_ip}","nat_port":{nat_port}}},'
        f'"original":{{{original}}},"translated":{{{translated}}},{_rule_fields(labels)},'
        f'"allocation_status":"OK","conntrack_id":{event.id}{counts}}}\n'
    )


class TransLog:
    def __init__(
        self,
        out: TextIO,
        selection: Selection,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        endings: Endings | None = None,
    ) -> None:
        self._out = out
        self.endings = endings or Endings()  # the conntrack cleaner records into it
        self._selection = selection
        self._cap = RateCap(rate, clock)
        self.written = 0
        self.dropped = 0

    def write(self, events: Iterable[CtEvent], labels_of: Mapping[int, RuleLabels]) -> None:
        now = datetime.now(UTC).isoformat()
        lines = []
        for event in events:
            # Taken whether or not the line is written: each record serves one event.
            ended_by = self.endings.take(event.id) if event.kind == "destroy" else None
            labels = labels_of.get(event.mark)
            if labels is None or not self._selection.wants(labels):
                continue
            if not self._cap.allow():
                self.dropped += 1
                continue
            lines.append(line(event, labels, now, ended_by))
        if lines:
            self._out.write("".join(lines))
            self._out.flush()
            self.written += len(lines)

    def exposition(self) -> list[str]:
        return [
            "# HELP natgwd_translation_log_lines_total Translation log lines written.",
            "# TYPE natgwd_translation_log_lines_total counter",
            f"natgwd_translation_log_lines_total {self.written}",
            "# HELP natgwd_translation_log_dropped_lines_total Translation log lines not written: over the rate cap.",
            "# TYPE natgwd_translation_log_dropped_lines_total counter",
            f"natgwd_translation_log_dropped_lines_total {self.dropped}",
        ]
