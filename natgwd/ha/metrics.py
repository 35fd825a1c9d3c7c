"""Prometheus metrics of an HA member: its VRRP role, transitions, children, the peer,
and conntrackd's sync statistics (read from `conntrackd -s` at scrape time)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from natgwd.ha.roles import CHILDREN, Role
from natgwd.process.supervisor import ChildStatus

ROLES = tuple(role for role in Role if role is not Role.INIT)  # init is exported as none of them


class HaMetrics:
    """The role and transition figures. They live in a registry of their own, which the
    scrape reads only while `active()` (the state has an ha section): a gateway without
    HA exports no natgwd_ha_* series, rather than zeros that read as 'not master'."""

    def __init__(self, registry: CollectorRegistry, active: Callable[[], bool]) -> None:
        own = CollectorRegistry()
        registry.register(WhileActive(own, active))
        registry = own
        self.role = Gauge(
            "natgwd_ha_role",
            "1 for the VRRP role this member is in (master: holds the addresses), 0 for the others.",
            ["role"],
            registry=registry,
        )
        self.transitions = Counter(
            "natgwd_ha_transitions", "VRRP role changes, by the role entered.", ["role"], registry=registry
        )
        self.last_transition = Gauge(
            "natgwd_ha_last_transition_timestamp_seconds",
            "Unix time of the last VRRP role change.",
            registry=registry,
        )
        self.takeover_seconds = Gauge(
            "natgwd_ha_takeover_conntrackd_seconds",
            "Time the conntrackd commands of the last takeover took (-f internal, -R).",
            registry=registry,
        )
        for role in ROLES:
            self.role.labels(role)
            self.transitions.labels(role)

    def set_role(self, role: Role) -> None:
        for name in ROLES:
            self.role.labels(name).set(1 if name == role else 0)

    def role_changed(self, role: Role) -> None:
        self.set_role(role)
        self.transitions.labels(role).inc()
        self.last_transition.set(time.time())


class WhileActive(Collector):
    def __init__(self, inner: CollectorRegistry, active: Callable[[], bool]) -> None:
        self._inner = inner
        self._active = active

    def collect(self) -> Iterator[Metric]:
        if self._active():
            yield from self._inner.collect()


# --- conntrackd -s -------------------------------------------------------------------

_CACHE = re.compile(r"^cache (internal|external):\s*\ncurrent active connections:\s*(\d+)", re.MULTILINE)
_UDP = re.compile(
    r"^\s*(\d+) Bytes sent\s+(\d+) Bytes recv\s*\n\s*(\d+) Pckts sent\s+(\d+) Pckts recv\s*\n"
    r"\s*(\d+) Error send\s+(\d+) Error recv",
    re.MULTILINE,
)
_LOST = re.compile(r"(\d+) Lost msgs")
_RSQUEUE = re.compile(r"^queue rsqueue:\s*\ncurrent elements:\s*(\d+)", re.MULTILINE)


def parse_stats(general: str, queues: str) -> dict[str, int]:
    """The figures of `conntrackd -s` and `conntrackd -s queue` that say how sync goes;
    a figure the text lacks is left out."""
    stats: dict[str, int] = {}
    for cache, count in _CACHE.findall(general):
        stats[f"entries_{cache}"] = int(count)
    if udp := _UDP.search(general):
        names = ("bytes_sent", "bytes_received", "messages_sent", "messages_received", "send_errors", "receive_errors")
        stats.update(zip(names, map(int, udp.groups()), strict=True))
    if lost := _LOST.search(general):
        stats["messages_lost"] = int(lost.group(1))
    if queued := _RSQUEUE.search(queues):
        stats["resend_queue"] = int(queued.group(1))
    return stats


_COUNTERS = {
    "messages_sent": "Sync messages sent to the peer.",
    "messages_received": "Sync messages received from the peer.",
    "messages_lost": "Sync messages from the peer found lost by sequence tracking (FTFW then asks again).",
    "send_errors": "Sync messages that could not be sent.",
    "receive_errors": "Sync messages that could not be received.",
}


@dataclass(frozen=True)
class HaSnapshot:
    children: dict[str, ChildStatus]
    peer_reachable: bool | None  # None: no peer link (a scaled-out member)
    peer_state_match: bool | None
    conntrackd: dict[str, int] | None  # None while conntrackd does not run
    supervisor_errors: int = 0


class HaCollector(Collector):
    """What is read when scraped: the children, the peer, conntrackd's statistics."""

    def __init__(self, snapshot: Callable[[], HaSnapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        up = GaugeMetricFamily("natgwd_ha_process_up", "1 while the child process runs.", labels=["process"])
        restarts = CounterMetricFamily(
            "natgwd_ha_process_restarts", "Restarts of a child process after it exited.", labels=["process"]
        )
        start_failures = CounterMetricFamily(
            "natgwd_ha_process_start_failures",
            "Starts of a child process that failed (its preparation or exec) and were tried again with backoff.",
            labels=["process"],
        )
        for name in CHILDREN:
            status = snapshot.children.get(name, ChildStatus())
            up.add_metric([name], 1 if status.up else 0)
            restarts.add_metric([name], status.restarts)
            start_failures.add_metric([name], status.start_failures)
        yield up
        yield restarts
        yield start_failures
        yield CounterMetricFamily(
            "natgwd_ha_supervisor_errors",
            "Errors the supervisor of keepalived and conntrackd met and went on after (see the log).",
            value=snapshot.supervisor_errors,
        )
        if snapshot.peer_reachable is not None:
            yield GaugeMetricFamily(
                "natgwd_ha_peer_reachable",
                "1 when the peer's hello arrived over the sync link within the last 3 seconds.",
                value=1 if snapshot.peer_reachable else 0,
            )
        if snapshot.peer_state_match is not None:
            yield GaugeMetricFamily(
                "natgwd_ha_peer_state_match",
                "1 when the peer applied the same desired state (sha256) as this member; 0 when not, or unknown.",
                value=1 if snapshot.peer_state_match else 0,
            )
        stats = snapshot.conntrackd
        if stats is None:
            return
        entries = GaugeMetricFamily(
            "natgwd_conntrackd_entries",
            "Connections in conntrackd's caches: internal (this member's own); the peer's go straight to the kernel"
            " (DisableExternalCache), so there is no external cache to report.",
            labels=["cache"],
        )
        for cache in ("internal", "external"):
            if (value := stats.get(f"entries_{cache}")) is not None:
                entries.add_metric([cache], value)
        yield entries
        for key, help_text in _COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(f"natgwd_conntrackd_{key}", help_text, value=stats[key])
        if "resend_queue" in stats:
            yield GaugeMetricFamily(
                "natgwd_conntrackd_resend_queue_messages",
                "Sync messages kept for retransmission until the peer acknowledges them (FTFW).",
                value=stats["resend_queue"],
            )
