"""`natgwd status` for a scaled-out member: who owns each EIP group, as this member's
kernel says it (pure; the CLI reads the kernel).

This member owns a group while it holds the group's marker address (keepalived adds it
with the group's EIPs); any other owner is where the group's hand-over table routes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute

from natgwd.ha.scale_render import instance_name, marker_address
from natgwd.state.model import DesiredState


@dataclass(frozen=True)
class GroupStatus:
    group: str
    virtual_router_id: int
    owner: str  # "this member", another member's address, or "unknown"
    eips: tuple[str, ...]
    handed_over_packets: int

    def as_dict(self) -> dict[str, object]:
        return {
            "group": self.group,
            "virtual_router_id": self.virtual_router_id,
            "owner": self.owner,
            "eips": list(self.eips),
            "handed_over_packets": self.handed_over_packets,
        }


def group_statuses(
    state: DesiredState,
    local: Iterable[IPv4Address],
    routes: Mapping[int, IPv4Address | None],
    handed_over: Mapping[int, int],
) -> list[GroupStatus]:
    """`local`: the addresses on the members' link; `routes`: each hand-over table's
    gateway by table (None: empty); `handed_over`: packets by group mark."""
    config = state.scale_out
    if config is None:
        return []
    held = set(local)
    names = [e.name for e in state.eips]
    statuses = []
    for group in config.groups:
        via = routes.get(group.mark)
        owner = "this member" if marker_address(group) in held else str(via) if via else "unknown"
        statuses.append(
            GroupStatus(
                instance_name(group),
                group.virtual_router_id,
                owner,
                config.eips_of(group, names),
                handed_over.get(group.mark, 0),
            )
        )
    return statuses


def format_groups(statuses: list[GroupStatus]) -> str:
    rows = [("GROUP", "VRID", "OWNER", "HANDED OVER", "EIPS")]
    rows += [
        (s.group, str(s.virtual_router_id), s.owner, str(s.handed_over_packets), ", ".join(s.eips) or "-")
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4] + "\n"
        for row in rows
    )


def kernel_view(state: DesiredState) -> tuple[list[IPv4Address], dict[int, IPv4Address | None]]:
    """The addresses on the members' link and each hand-over table's default gateway."""
    config = state.scale_out
    assert config is not None
    routes: dict[int, IPv4Address | None] = {}
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=config.interface)
        local = (
            [IPv4Address(m.get("IFA_ADDRESS")) for m in ipr.get_addr(family=socket.AF_INET, index=found[0])]
            if found
            else []
        )
        for group in config.groups:
            gateways = [r.get("RTA_GATEWAY") for r in ipr.get_routes(family=socket.AF_INET, table=group.mark)]
            gateway = next((g for g in gateways if g), None)
            routes[group.mark] = IPv4Address(gateway) if gateway else None
    return local, routes
