"""Prometheus metrics of the BGP speaker, made from its last snapshot when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from natgwd.bgp.speaker import DAEMONS, Snapshot
from natgwd.bgp.status import BFD_STATES, BGP_STATES
from natgwd.process.supervisor import ChildStatus


class BgpCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        up = GaugeMetricFamily("natgwd_bgp_process_up", "1 while the FRR daemon runs.", labels=["process"])
        restarts = CounterMetricFamily(
            "natgwd_bgp_process_restarts", "Restarts of an FRR daemon after it exited.", labels=["process"]
        )
        for name in DAEMONS:
            status = snapshot.children.get(name, ChildStatus())
            up.add_metric([name], 1 if status.up else 0)
            restarts.add_metric([name], status.restarts)
        yield up
        yield restarts
        neighbor_up = GaugeMetricFamily(
            "natgwd_bgp_neighbor_up", "1 while the BGP session with the neighbour is established.", labels=["neighbor"]
        )
        state = GaugeMetricFamily(
            "natgwd_bgp_session_state",
            "1 for the BGP session's state (RFC 4271), 0 for the others.",
            labels=["neighbor", "state"],
        )
        sent = GaugeMetricFamily(
            "natgwd_bgp_prefixes_announced", "Prefixes announced to the neighbour.", labels=["neighbor"]
        )
        accepted = GaugeMetricFamily(
            "natgwd_bgp_prefixes_accepted",
            "Prefixes received from the neighbour and accepted (counted, never installed: natgwd routes by its state).",
            labels=["neighbor"],
        )
        bfd = GaugeMetricFamily(
            "natgwd_bgp_bfd_state",
            "1 for the state of the neighbour's BFD session, 0 for the others.",
            labels=["neighbor", "state"],
        )
        flap = GaugeMetricFamily(
            "natgwd_bgp_neighbor_last_flap_timestamp_seconds",
            "Unix time the BGP session last came up or went down.",
            labels=["neighbor"],
        )
        for address in snapshot.configured:
            found = snapshot.neighbors.get(address)
            neighbor_up.add_metric([address], 1 if found is not None and found.established else 0)
            current = found.state if found is not None else "Idle"
            for name in BGP_STATES:
                state.add_metric([address, name], 1 if name == current else 0)
            if found is None:
                continue
            sent.add_metric([address], found.prefixes_sent)
            accepted.add_metric([address], found.prefixes_accepted)
            if found.bfd is not None:
                for name in BFD_STATES:
                    bfd.add_metric([address, name], 1 if name == found.bfd else 0)
            if found.last_change is not None:
                flap.add_metric([address], found.last_change)
        yield from (neighbor_up, state, sent, accepted, bfd, flap)
        owned = GaugeMetricFamily(
            "natgwd_bgp_owned_prefixes",
            "EIP prefixes (/32, /128) this member owns and must announce; standby: announced with a longer AS path.",
            labels=["role"],
        )
        owned.add_metric(["owner"], len(snapshot.owned))
        owned.add_metric(["standby"], len(snapshot.standby))
        yield owned
        yield GaugeMetricFamily(
            "natgwd_bgp_unannounced_prefixes",
            "Owned EIP prefixes that bgpd does not originate or that no established session of their family carries.",
            value=len(snapshot.unannounced()),
        )
