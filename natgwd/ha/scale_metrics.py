"""Prometheus metrics of a scaled-out member: the groups and EIPs it owns, ownership
moves, the members it hears. (Packets handed over are counted in natgwd's table, and
conntrackd's sync statistics are HaCollector's.)"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from natgwd.ha.metrics import WhileActive
from natgwd.ha.scale_render import instance_name
from natgwd.state.scaleout import ScaleOutConfig


class ScaleMetrics:
    """Exported only while `active()` (the state has a scaleOut section), as the pair's."""

    def __init__(self, registry: CollectorRegistry, active: Callable[[], bool]) -> None:
        own = CollectorRegistry()
        registry.register(WhileActive(own, active))
        registry = own
        self.group_owned = Gauge(
            "natgwd_scale_group_owned",
            "1 while this member owns the EIP group (keepalived made it the group's master), else 0.",
            ["group"],
            registry=registry,
        )
        self.eips_owned = Gauge(
            "natgwd_scale_eips_owned", "EIPs this member holds now (those of the groups it owns).", registry=registry
        )
        self.ownership_changes = Counter(
            "natgwd_scale_ownership_changes",
            "This member's VRRP role changes per EIP group, by the role entered.",
            ["group", "role"],
            registry=registry,
        )
        self.members_seen = Gauge(
            "natgwd_scale_members_seen",
            "Members heard within the last 3 seconds (by their VRRP adverts; a member that owns no group sends"
            " none), this member included.",
            registry=registry,
        )
        self.members = Gauge(
            "natgwd_scale_members",
            "Members the scale-out settings list (the state's, or those discovered).",
            registry=registry,
        )
        self.bfd_gate_open = Gauge(
            "natgwd_scale_bfd_gate_open",
            "1 while BFD control packets pass on the internal interface (this member is ready to forward as a"
            " member, so OVN may route to it), 0 while natgwd's table drops them.",
            registry=registry,
        )
        # Discovery (natgwd.ha.discovery): a gateway run by kube-ovn-controller as a Deployment.
        self.hellos_received = Counter(
            "natgwd_scale_hellos_received", "Hellos of this gateway's members heard on the LAN.", registry=registry
        )
        self.hellos_refused = Counter(
            "natgwd_scale_hellos_refused",
            "Hellos ignored, by reason: oversized, malformed, foreign_scope (another gateway's), address_mismatch"
            " (naming another address than its source), too_many_members.",
            ["reason"],
            registry=registry,
        )
        self.members_discovered = Gauge(
            "natgwd_scale_members_discovered",
            "Members on the discovered list (heard within the last 15 seconds), this member included.",
            registry=registry,
        )

    def publish(self, config: ScaleOutConfig, owned: set[int], eips: int) -> None:
        for group in config.groups:
            self.group_owned.labels(instance_name(group)).set(1 if group.index in owned else 0)
        self.eips_owned.set(eips)
        self.members.set(len(config.members))
