"""SNAT rules with a pool of EIPs (docs/state-file.md, "SNAT pools").

A pool rule is planned as one member per EIP, each with a rule id of its own (labels
snat/NAME/EIP): a connection's ct mark names the EIP it left with, so its connections,
traffic and port-allocation failures are counted per EIP by the counters that exist per
rule and per EIP (natgwd.observability.connwatch).

The source network's element in the verdict map `snat_pN_pool` sends a connection's first
packet to the rule's chain, which picks the member from a hash of the source address:
BUCKETS buckets, each given to one member in turn. Every connection of one internal
address falls in the same bucket, hence leaves with the same EIP, and the EIPs need not be
contiguous (`snat to A-B persistent` needs a range). The hash has a fixed seed (the kernel
draws one at random otherwise): an address keeps its bucket across rewrites of the chain
and restarts, and only a change of the pool gives its bucket another EIP.

A draining EIP takes no new connections: its buckets go to the pool's other EIPs in turn
(the others' buckets stay theirs, so their addresses keep their EIPs), while conntrack
keeps translating the connections it has. A SNAT rule on a draining EIP alone is planned
as a pool of one; with no EIP left to take them its chain drops new connections (an
un-NATed packet must not leave, nor a shorter prefix's rule take it over).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from natgwd.planning.layout import SNAT_POOL_TARGET, Family
from natgwd.planning.table import ChainSpec
from natgwd.state.model import SnatRule

BUCKETS = 64  # a pool has at most 16 EIPs: each gets 4 buckets or more
SEED = 0x6E617467


def members(rule: SnatRule) -> tuple[SnatRule, ...]:
    """The members a SNAT rule is planned as: one per EIP of its pool, each naming its EIP."""
    return tuple(replace(rule, eip=eip) for eip in rule.pool) if rule.pool else (rule,)


Member = tuple[int, str, int]  # the EIP's position in the pool, the EIP, the member's rule id


@dataclass(frozen=True)
class Pool:
    """The members of one pool rule as planned: its chain picks among their ids."""

    family: Family
    members: frozenset[Member]

    def buckets(self, draining: frozenset[str]) -> tuple[int, ...]:
        """The rule id of each bucket, in the pool's order round and round; a draining
        member's buckets go to the others in turn. Empty when every member is draining."""
        ordered = sorted(self.members)
        taking = [mark for _, eip, mark in ordered if eip not in draining]
        if not taking:
            return ()
        chosen = [(eip, mark) for _, eip, mark in (ordered[b % len(ordered)] for b in range(BUCKETS))]
        return tuple(mark if eip not in draining else taking[b % len(taking)] for b, (eip, mark) in enumerate(chosen))


def counted(pools: dict[str, Pool], chain: str, family: Family, member: Member, sign: int) -> None:
    """Add a member to its pool (`sign` +1) or take it out (-1), in place."""
    pool = pools.get(chain)
    found = pool.members if pool is not None else frozenset()
    found = found | {member} if sign > 0 else found - {member}
    if found:
        pools[chain] = Pool(family, found)
    else:
        pools.pop(chain, None)


def pool_chains(pools: Mapping[str, Pool], draining: frozenset[str]) -> tuple[ChainSpec, ...]:
    return tuple(_chain(name, pool, draining) for name, pool in sorted(pools.items()))


def pool_shares(pools: Mapping[str, Pool], draining: frozenset[str]) -> dict[str, tuple[int, ...]]:
    """Each pool chain's rule ids by bucket, as the table lists its map (TableContents.shares)."""
    return {name: buckets for name, pool in pools.items() if (buckets := pool.buckets(draining))}


def _chain(name: str, pool: Pool, draining: frozenset[str]) -> ChainSpec:
    family = pool.family
    buckets = pool.buckets(draining)
    if not buckets:
        return ChainSpec(name, "", ("drop",))
    choices = ", ".join(f"{bucket} : {mark}" for bucket, mark in enumerate(buckets))
    return ChainSpec(
        name,
        "",
        (
            f"ct mark set jhash {family.ip} saddr mod {BUCKETS} seed {SEED:#x} map {{ {choices} }} "
            f"snat {family.ip} to ct mark map @{family.name(SNAT_POOL_TARGET)} fully-random",
        ),
    )
