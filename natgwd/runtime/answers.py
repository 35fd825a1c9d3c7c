"""What natgwd's HTTP endpoint (runtime/endpoints.py) answers: /metrics from the daemon's
registry and the kernel's counters, /healthz from the loop's last turn, /readyz from how
far the desired state is applied (and from the HA pair and the BGP speaker, with them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from natgwd.bgp.speaker import BgpSpeaker
from natgwd.ha.controller import HaController
from natgwd.observability import ctstats
from natgwd.observability.connwatch import ConnectionWatch
from natgwd.planning.counters import Listings
from natgwd.planning.layout import RULE_TRAFFIC
from natgwd.planning.plan import address_text
from natgwd.qos.status import shaping_exposition
from natgwd.runtime import collector
from natgwd.runtime.metrics import RuleCounters
from natgwd.runtime.reconciler import Reconciler

STALL_SECONDS = 120.0


@dataclass
class Progress:
    """The daemon's progress as the probes tell it; the daemon's loop writes it."""

    not_ready: str | None  # why /readyz says no (None: the desired state is applied in full)
    applied_at: float | None = None  # time.time() of the last apply
    last_step: float = field(default_factory=time.monotonic)  # the loop's last turn


class Answers:
    def __init__(
        self,
        progress: Progress,
        resync_interval: float,
        applied_sha256: Callable[[], str | None],
        registry: CollectorRegistry,
        reconciler: Reconciler,
        counting_sets: Callable[[], Listings],
        watch: ConnectionWatch | None,
        ha: HaController | None,
        bgp: BgpSpeaker | None,
        published: threading.Lock,
    ) -> None:
        self.progress = progress
        # Held by the daemon while it records an applied state and updates what these
        # answers say of it: /readyz, /metrics and the record change at the same moment.
        self.published = published
        self.resync_interval = resync_interval
        self.applied_sha256 = applied_sha256
        self.registry = registry
        self.reconciler = reconciler
        self.counting_sets = counting_sets
        self.rule_counters = RuleCounters(counting_sets)
        self.watch = watch
        self.ha = ha
        self.bgp = bgp

    def exposition(self) -> Iterator[bytes]:
        """/metrics in parts, each made when taken (a part is compressed while the next is
        made), with the cycle collector paused while it is made (natgwd.runtime.collector)."""
        return collector.each_paused(self._exposition())

    def _exposition(self) -> Iterator[bytes]:
        listings = dict(self.counting_sets())
        counters, labelled = self.rule_counters.labelled_exposition(listings)
        # The traffic elements (the largest listing) are in the counters' lists now, and
        # the watcher does not read them: let them go before the texts are made.
        listings.pop(RULE_TRAFFIC, None)
        with self.published:
            own = generate_latest(self.registry)
        yield own
        yield from counters
        yield ctstats.scrape()
        yield shaping_exposition(self.reconciler.qos, self.reconciler.state)
        if self.watch is not None:
            state = self.reconciler.state
            draining = [address_text(a) for e in state.eips if e.draining for a in e.addresses] if state else []
            yield self.watch.exposition(listings, labelled, draining)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Alive while the loop keeps turning. A reconcile of a very large state takes
        seconds, so only a loop stuck far longer than that counts as dead."""
        stalled = time.monotonic() - self.progress.last_step
        limit = max(STALL_SECONDS, 3 * self.resync_interval)
        return stalled < limit, {"seconds_since_loop": round(stalled, 1)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self.published:
            applied_at, not_ready, applied_sha256 = (
                self.progress.applied_at,
                self.progress.not_ready,
                self.applied_sha256(),
            )
        detail: dict[str, Any] = {
            "applied_sha256": applied_sha256,
            "applied_at": datetime.fromtimestamp(applied_at, UTC).isoformat() if applied_at else None,
        }
        reasons = [not_ready] if not_ready else []
        if self.ha is not None:
            ha_reason, ha_detail = self.ha.readiness()
            detail.update(ha_detail)
            reasons += [ha_reason] if ha_reason else []
        if self.bgp is not None:
            bgp_reason, bgp_detail = self.bgp.readiness()
            detail.update(bgp_detail)
            reasons += [bgp_reason] if bgp_reason else []
        if reasons:
            detail["reason"] = "; ".join(reasons)
        return not reasons, detail
