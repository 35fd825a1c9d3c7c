"""Translation logs: one JSON line when a translated connection starts and one when it
ends, saying which internal address used which public address and port (Kube-OVN #1358).

The `connection` object uses the field names of GCP Cloud NAT's logs (src_ip, src_port,
dest_ip, dest_port, protocol, nat_ip, nat_port); nat_ip:nat_port is what the translation
put in place of the original: the new source for SNAT and FIP, the new destination for
DNAT. `original` and `translated` are the whole tuples as each end sees them. An end line
carries the packets and bytes of both directions when conntrack accounting is on
(natgwd turns net.netfilter.nf_conntrack_acct on when logging).

Lines are capped by a token bucket (GCP caps too); lines over the cap are counted, not
written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from natgwd.ctevents import CtEvent, CtTuple
from natgwd.plan import RuleLabels

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


def _ends(t: CtTuple) -> dict[str, Any]:
    return {"src_ip": t.src, "src_port": t.sport, "dest_ip": t.dst, "dest_port": t.dport, "protocol": t.proto}


def record(event: CtEvent, labels: RuleLabels, when: datetime) -> dict[str, Any]:
    """The log line of a NEW (start) or DESTROY (end) event of a translated connection."""
    orig, reply = event.orig, event.reply
    # The reply tuple reversed is the connection as the far end sees it.
    translated = CtTuple(orig.proto, reply.dst, reply.dport, reply.src, reply.sport)
    if event.source_translated:
        nat_ip, nat_port = translated.src, translated.sport
    else:
        nat_ip, nat_port = translated.dst, translated.dport
    line: dict[str, Any] = {
        "time": when.isoformat(),
        "event": "start" if event.kind == "new" else "end",
        "connection": {**_ends(orig), "nat_ip": nat_ip, "nat_port": nat_port},
        "original": _ends(orig),
        "translated": _ends(translated),
        "rule": {"kind": labels.kind, "name": labels.name},
        "eip": labels.eip,
        "allocation_status": "OK",
        "conntrack_id": event.id,
    }
    if event.kind == "destroy" and event.counters_orig and event.counters_reply:
        line["packets_sent"], line["bytes_sent"] = event.counters_orig
        line["packets_received"], line["bytes_received"] = event.counters_reply
    return line


class TransLog:
    def __init__(
        self, out: TextIO, selection: Selection, rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._selection = selection
        self._cap = RateCap(rate, clock)
        self.written = 0
        self.dropped = 0

    def write(self, events: Iterable[CtEvent], labels_of: Mapping[int, RuleLabels]) -> None:
        now = datetime.now(UTC)
        lines = []
        for event in events:
            labels = labels_of.get(event.mark)
            if labels is None or not self._selection.wants(labels):
                continue
            if not self._cap.allow():
                self.dropped += 1
                continue
            lines.append(json.dumps(record(event, labels, now), separators=(",", ":")) + "\n")
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
