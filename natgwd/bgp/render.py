"""FRR's configuration for the speaker (pure text), and the vtysh commands that change its
announcements in place.

bgpd originates each announced EIP with a `network` statement (no import check: natgwd,
not the routing table, decides what is announced) through one of two route maps: OWNED, or
STANDBY with the AS prepended. Both tag the route; the outbound policy lets only tagged
routes out, so whatever a neighbour sends is never passed on to another one. Routes learned
from neighbours are accepted (counted) but never installed (bgpd runs with --no_kernel):
natgwd's routes come from the desired state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_network
from pathlib import Path

from natgwd.state.bgp import Bfd, BgpConfig, BgpNeighbor
from natgwd.state.model import IPAddress, IPNetwork

OWNED = "NATGWD-OWNED"
STANDBY = "NATGWD-STANDBY"
OUT = "NATGWD-OUT"
IN = "NATGWD-IN"
TAG = 4242  # marks natgwd's own routes (a route map tag never leaves the speaker)
HEADER = "! Written by natgwd from the desired state; changes here are overwritten."
AFI = {4: "ipv4", 6: "ipv6"}
CONNECT_RETRY_SECONDS = 2

# prefix -> announced as standby (True) or as owner (False)
Announcements = Mapping[IPNetwork, bool]


@dataclass(frozen=True)
class FrrPaths:
    """One directory per gateway (owned by user frr: FRR drops its privileges to it)."""

    directory: Path

    def conf(self, daemon: str) -> Path:
        return self.directory / f"{daemon}.conf"

    def pid(self, daemon: str) -> Path:
        return self.directory / f"{daemon}.pid"

    def vty(self, daemon: str) -> Path:
        return self.directory / f"{daemon}.vty"

    @property
    def zserv(self) -> Path:
        return self.directory / "zserv.api"

    @property
    def bfdctl(self) -> Path:
        return self.directory / "bfdd.sock"


def host_prefix(address: IPAddress) -> IPNetwork:
    return ip_network((address, address.max_prefixlen))


def bfd_profile(bfd: Bfd) -> str:
    return f"natgwd-{bfd.min_rx_ms}-{bfd.min_tx_ms}-{bfd.multiplier}"


def zebra_conf() -> str:
    return "\n".join([HEADER, "log stdout informational", ""])


def bfdd_conf(bgp: BgpConfig) -> str:
    profiles = sorted({n.bfd for n in bgp.neighbors if n.bfd is not None}, key=bfd_profile)
    lines = [HEADER, "log stdout informational", "bfd"]
    for bfd in profiles:
        lines += [
            f" profile {bfd_profile(bfd)}",
            f"  receive-interval {bfd.min_rx_ms}",
            f"  transmit-interval {bfd.min_tx_ms}",
            f"  detect-multiplier {bfd.multiplier}",
            " exit",
        ]
    return "\n".join([*lines, "exit", ""])


def bgpd_conf(bgp: BgpConfig, router_id: IPv4Address, announcements: Announcements) -> str:
    """The whole of bgpd's configuration: the sessions and policy (a change restarts bgpd)
    and the announcements of the moment (a restarted bgpd starts with them)."""
    lines = [
        HEADER,
        "frr defaults traditional",
        "log stdout informational",
        # A network statement's route map is applied by the route-map update timer (5 s by
        # default): a member that became active announced up to 3 s late (measured).
        "bgp route-map delay-timer 0",
        f"router bgp {bgp.asn}",
        f" bgp router-id {router_id}",
        " no bgp default ipv4-unicast",
        " no bgp network import-check",
    ]
    for neighbor in bgp.neighbors:
        lines += [f" {line}" for line in _neighbor_lines(neighbor)]
    for family in (4, 6):
        sessions = [n for n in bgp.neighbors if n.family == family]
        prefixes = sorted(p for p in announcements if p.version == family)
        if not sessions and not prefixes:
            continue
        lines.append(f" address-family {AFI[family]} unicast")
        lines += [f"  {network_line(p, announcements[p])}" for p in prefixes]
        for neighbor in sessions:
            lines += [
                f"  neighbor {neighbor.address} activate",
                f"  neighbor {neighbor.address} route-map {IN} in",
                f"  neighbor {neighbor.address} route-map {OUT} out",
            ]
        lines.append(" exit-address-family")
    lines.append("exit")
    prepend = " ".join([str(bgp.asn)] * max(bgp.standby_prepend, 1))
    lines += [
        f"route-map {OWNED} permit 10",
        f" set tag {TAG}",
        "exit",
        f"route-map {STANDBY} permit 10",
        f" set as-path prepend {prepend}",
        f" set tag {TAG}",
        "exit",
        f"route-map {OUT} permit 10",
        f" match tag {TAG}",
        "exit",
        f"route-map {IN} permit 10",
        "exit",
        "",
    ]
    return "\n".join(lines)


def _neighbor_lines(neighbor: BgpNeighbor) -> list[str]:
    name = f"neighbor {neighbor.address}"
    keepalive = max(neighbor.hold_time // 3, 1) if neighbor.hold_time else 0
    lines = [
        f"{name} remote-as {neighbor.remote_asn}",
        f"{name} timers {keepalive} {neighbor.hold_time}",
        # bgpd listens nowhere: only its own attempts make a session, and FRR's default
        # retry (120 s) kept a member away that long when the neighbour refused once
        # (BIRD does while it waits after a BFD failure).
        f"{name} timers connect {CONNECT_RETRY_SECONDS}",
    ]
    if neighbor.password is not None:
        lines.append(f"{name} password {neighbor.password}")
    if neighbor.bfd is not None:
        lines += [f"{name} bfd", f"{name} bfd profile {bfd_profile(neighbor.bfd)}"]
    if neighbor.graceful_restart:
        lines.append(f"{name} graceful-restart")
    return lines


def network_line(prefix: IPNetwork, standby: bool) -> str:
    return f"network {prefix} route-map {STANDBY if standby else OWNED}"


def network_commands(asn: int, wanted: Announcements, held: Announcements | None, present: set[IPNetwork]) -> list[str]:
    """vtysh commands that take bgpd from the prefixes it originates (`present`, as last
    told with `held`, None when unknown) to `wanted`; [] when nothing changes. A `no
    network` for a prefix bgpd lacks would fail the whole batch, hence `present`."""
    body: list[str] = []
    for family in (4, 6):
        lines = [f"no network {p}" for p in sorted(p for p in present if p.version == family and p not in wanted)]
        lines += [
            network_line(p, wanted[p])
            for p in sorted(p for p in wanted if p.version == family)
            if p not in present or held is None or held.get(p) != wanted[p]
        ]
        if lines:
            body += [f"address-family {AFI[family]} unicast", *lines, "exit-address-family"]
    return ["configure terminal", f"router bgp {asn}", *body] if body else []
