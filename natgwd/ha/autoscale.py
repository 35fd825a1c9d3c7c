"""The scale-out settings of a gateway whose members found each other (natgwd.ha.hello),
derived from what every member shares: the members' LAN addresses it heard and the state
the controller's calls built (pure; docs/scaling-out.md).

- The EIP groups do not depend on the members: GROUPS of them, an EIP in the group its
  name hashes to, except that EIPs tied together (a DNAT backend behind several EIPs, a
  SNAT pool) go together, to the group of the first of their names. So whatever the
  controller sends that a single gateway accepts, the groups accept too.
- Each group's priorities come from rendezvous hashing of (scope, group, member): each
  member ranks the members by their hash for the group, the first gets TOP_PRIORITY, the
  next one PRIORITY_STEP less... A member joining takes only the groups it ranks first
  in, a member leaving leaves only its own groups to their second choice, and the
  priorities of a group are distinct.
- conntrackd uses multicast (its configuration names no member: members come and go
  without a restart), on a group derived from the scope; the virtual router ids too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from decimal import Decimal
from ipaddress import IPv4Address

from natgwd.state.model import DesiredState
from natgwd.state.scaleout import (
    DEFAULT_PREEMPT_DELAY,
    PRIORITY_STEP,
    TOP_PRIORITY,
    EipGroup,
    ScaleOutConfig,
    hashed_group,
)

GROUPS = 16
MAX_MEMBERS = 16  # as many as the scaleOut section takes; the last choice still has priority 50
ADVERT_INTERVAL = Decimal(1)


def unsupported(state: DesiredState) -> str | None:
    """Why this state cannot be scaled out automatically, else None."""
    ipv6 = [str(a) for a in state.external.addresses if a.version == 6]
    ipv6 += [str(e.v6ip) for e in state.eips if e.v6ip is not None]
    if ipv6:
        return f"scaling out moves IPv4 EIPs; this state has IPv6 addresses ({', '.join(ipv6[:3])})"
    if state.more_externals:
        return "scaling out moves the EIPs of one external network; this state has several"
    return None


def auto_scale_out(
    state: DesiredState, members: Iterable[IPv4Address], scope: str, settled: bool = True
) -> ScaleOutConfig:
    """The scale-out settings every member of `scope` derives alike from the same members
    and state. `settled`: the discovery window has passed (keepalived waits for it)."""
    ordered = tuple(sorted(set(members)))
    base = 1 + _digest(scope, "vrid") % (256 - GROUPS)
    listed = tied_groups(state)
    groups = tuple(
        EipGroup(index, base + index, priorities(scope, index, ordered), tuple(listed.get(index, ())))
        for index in range(GROUPS)
    )
    return ScaleOutConfig(
        interface=state.internal.interface,
        advert_interval=ADVERT_INTERVAL,
        preempt_delay=DEFAULT_PREEMPT_DELAY,
        conntrack_sync=True,
        multicast_group=multicast_group(scope),
        members=ordered,
        groups=groups,
        discovery_scope=scope,
        settled=settled,
    )


def priorities(scope: str, group: int, members: Sequence[IPv4Address]) -> tuple[int, ...]:
    """One priority per member (in `members`' order) for `group`, by rendezvous hashing."""
    ranked = sorted(members, key=lambda m: (_digest(scope, str(group), str(m)), m), reverse=True)
    rank = {member: position for position, member in enumerate(ranked)}
    return tuple(TOP_PRIORITY - PRIORITY_STEP * rank[m] for m in members)


def multicast_group(scope: str) -> IPv4Address:
    """conntrackd's multicast group: in 239.192.0.0/14 (organization-local scope, RFC 2365),
    one per scope, so that two gateways on one LAN do not take each other's connections."""
    return IPv4Address(int(IPv4Address("239.192.0.0")) + _digest(scope, "conntrackd") % (1 << 18))


def tied_groups(state: DesiredState) -> dict[int, list[str]]:
    """The EIPs that must share a group, by the group they go to: those behind one DNAT
    backend (its replies are handed over by the backend's address and port alone) and
    those of one SNAT pool (a source's packets are handed over by the source alone).
    An EIP tied to no other goes to the group its name hashes to (ScaleOutConfig.group_of)."""
    parent: dict[str, str] = {}
    tied: set[str] = set()

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        tied.update((a, b))
        first, second = sorted((root(a), root(b)))
        if first != second:
            parent[second] = first

    backends: dict[tuple[object, str, int], str] = {}
    for rule in state.dnat:
        for port in rule.backend_ports():
            join(rule.eip, backends.setdefault((rule.internal_ip, rule.protocol, port), rule.eip))
    for snat in state.snat:
        for name in snat.pool[1:]:
            join(snat.pool[0], name)
    components: dict[str, list[str]] = {}
    for name in tied:
        components.setdefault(root(name), []).append(name)
    listed: dict[int, list[str]] = {}
    for first, names in sorted(components.items()):
        if len(names) > 1:
            listed.setdefault(hashed_group(first, GROUPS), []).extend(sorted(names))
    return listed


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "big")
