"""The optional `bgp` section: announce EIPs as /32 and /128 routes to upstream routers
(Kube-OVN's VpcNatGateway.spec.bgpSpeaker), each session watched by BFD if asked.

Sessions are single-hop: every neighbour lies in the subnet of an external address of its
own family, and carries the EIP addresses of that family (an IPv4 session the /32s, an
IPv6 session the /128s).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Literal

from natgwd.state.problems import Problems

if TYPE_CHECKING:
    from natgwd.state.model import DesiredState, Eip, ExternalSide, IPAddress

ASN_MAX = 2**32 - 1
HOLD_TIME_DEFAULT = 90  # seconds (Kube-OVN's bgpSpeaker default)
# FRR's ranges (bfdd): milliseconds between packets, packets missed before down.
BFD_INTERVAL_RANGE = (10, 60000)
BFD_MULTIPLIER_RANGE = (2, 255)
BFD_DEFAULT_INTERVAL = 300
BFD_DEFAULT_MULTIPLIER = 3
PASSWORD_MAX = 80  # TCP MD5 signature keys (RFC 2385, Linux TCP_MD5SIG_MAXKEYLEN)
STANDBY_PREPEND_MAX = 8

Announce = Literal["all", "marked"]


@dataclass(frozen=True)
class Bfd:
    min_rx_ms: int = BFD_DEFAULT_INTERVAL
    min_tx_ms: int = BFD_DEFAULT_INTERVAL
    multiplier: int = BFD_DEFAULT_MULTIPLIER


@dataclass(frozen=True)
class BgpNeighbor:
    address: IPAddress
    remote_asn: int
    password: str | None = None
    hold_time: int = HOLD_TIME_DEFAULT
    bfd: Bfd | None = None
    graceful_restart: bool = False

    @property
    def family(self) -> int:
        return self.address.version


@dataclass(frozen=True)
class BgpConfig:
    asn: int
    router_id: IPv4Address | None  # None: the member's own address (see natgwd.bgp.speaker)
    neighbors: tuple[BgpNeighbor, ...]
    announce: Announce = "all"
    # >0: a standby member announces the EIPs it would take over, with its AS prepended this
    # many times, so that upstream holds a second path before the active member fails.
    standby_prepend: int = 0

    def announced(self, eips: Iterable[Eip]) -> tuple[Eip, ...]:
        """The EIPs this section announces (while their member owns them)."""
        return tuple(e for e in eips if self.announce == "all" or e.bgp)


def parse_bgp(
    section: dict[str, Any],
    state_externals: tuple[ExternalSide, ...],
    own: Iterable[IPAddress],
    problems: Problems,
    paired: bool = False,
) -> BgpConfig | None:
    """The section (already shaped by the JSON Schema) as a BgpConfig, or None with the
    problems found added to `problems`. `own`: the gateway's addresses (no neighbour may be
    one); `paired`: the state has an ha section."""
    known = len(problems)
    asn = _asn(section["asn"], "$.bgp.asn", problems)
    router_id = None
    if "routerId" in section:
        try:
            router_id = IPv4Address(section["routerId"])
        except AddressValueError:
            problems.add("$.bgp.routerId", f"{section['routerId']!r} is not an IPv4 address (BGP router ids are)")
    own_addresses = set(own)
    neighbors: list[BgpNeighbor] = []
    seen: dict[IPAddress, int] = {}
    for index, item in enumerate(section["neighbors"]):
        neighbor = _neighbor(item, f"$.bgp.neighbors[{index}]", state_externals, own_addresses, problems)
        if neighbor is None:
            continue
        if neighbor.address in seen:
            problems.add(f"$.bgp.neighbors[{index}].address", f"duplicates neighbors[{seen[neighbor.address]}]")
            continue
        seen[neighbor.address] = index
        if paired and neighbor.graceful_restart:
            # The neighbour would keep a dead member's routes for the restart time instead
            # of turning to the member that took over.
            problems.add(f"$.bgp.neighbors[{index}].gracefulRestart", "must be off in an HA pair (ha section)")
        neighbors.append(neighbor)
    if len(problems) > known or asn is None:
        return None
    return BgpConfig(
        asn=asn,
        router_id=router_id,
        neighbors=tuple(neighbors),
        announce=section.get("announce", "all"),
        standby_prepend=section.get("standbyPrepend", 0),
    )


def _asn(value: int, path: str, problems: Problems) -> int | None:
    if not 1 <= value <= ASN_MAX:
        problems.add(path, f"must be between 1 and {ASN_MAX} (a 4-byte AS number), not {value}")
        return None
    return value


def _neighbor(
    item: dict[str, Any],
    path: str,
    externals: tuple[ExternalSide, ...],
    own: set[IPAddress],
    problems: Problems,
) -> BgpNeighbor | None:
    known = len(problems)
    text = item["address"]
    address: IPAddress | None = None
    try:
        address = IPv6Address(text) if ":" in text else IPv4Address(text)
    except AddressValueError as err:
        problems.add(f"{path}.address", f"not a valid IP address: {err}")
    if address is not None:
        _session_family(address, f"{path}.address", externals, own, problems)
    remote_asn = _asn(item["remoteAsn"], f"{path}.remoteAsn", problems)
    password = item.get("password")
    if password is not None and any(c.isspace() for c in password):
        # FRR takes the password as one word, and a TCP MD5 key is matched byte for byte.
        problems.add(f"{path}.password", "must not contain spaces")
    hold = item.get("holdTime", HOLD_TIME_DEFAULT)
    if hold != 0 and not 3 <= hold <= 65535:
        problems.add(f"{path}.holdTime", f"must be 0 (no keepalives) or 3 to 65535 seconds (RFC 4271), not {hold}")
    bfd = _bfd(item.get("bfd"), f"{path}.bfd", problems)
    if len(problems) > known or address is None or remote_asn is None:
        return None
    return BgpNeighbor(address, remote_asn, password, hold, bfd, item.get("gracefulRestart", False))


def _session_family(
    address: IPAddress,
    path: str,
    externals: tuple[ExternalSide, ...],
    own: set[IPAddress],
    problems: Problems,
) -> None:
    family = f"IPv{address.version}"
    if address.is_multicast or address.is_unspecified or address.is_loopback or address.is_link_local:
        problems.add(path, f"{address} is not a usable unicast neighbour address")
        return
    if address in own:
        problems.add(path, f"{address} is one of this gateway's own addresses")
        return
    same_family = [a for n in externals for a in n.addresses if a.version == address.version]
    if not same_family:
        problems.add(
            path, f"an {family} neighbour needs an {family} session, but no external network has an {family} address"
        )
        return
    if not any(address in a.network for a in same_family):
        subnets = ", ".join(str(a.network) for a in same_family)
        problems.add(path, f"{address} is in no external {family} subnet ({subnets}): sessions are single-hop")


def _bfd(value: dict[str, Any] | None, path: str, problems: Problems) -> Bfd | None:
    if value is None or not value.get("enabled", True):
        return None
    low, high = BFD_INTERVAL_RANGE
    fields = {}
    for name, default in (("minRx", BFD_DEFAULT_INTERVAL), ("minTx", BFD_DEFAULT_INTERVAL)):
        fields[name] = value.get(name, default)
        if not low <= fields[name] <= high:
            problems.add(f"{path}.{name}", f"must be {low} to {high} milliseconds, not {fields[name]}")
    multiplier = value.get("multiplier", BFD_DEFAULT_MULTIPLIER)
    if not BFD_MULTIPLIER_RANGE[0] <= multiplier <= BFD_MULTIPLIER_RANGE[1]:
        problems.add(f"{path}.multiplier", f"must be {BFD_MULTIPLIER_RANGE[0]} to {BFD_MULTIPLIER_RANGE[1]}")
    return Bfd(fields["minRx"], fields["minTx"], multiplier)


def announced_addresses(state: DesiredState, names: Iterable[str]) -> frozenset[IPAddress]:
    """The addresses of the named EIPs that the `bgp` section announces."""
    if state.bgp is None:
        return frozenset()
    wanted = set(names)
    return frozenset(a for e in state.bgp.announced(state.eips) if e.name in wanted for a in e.addresses)
