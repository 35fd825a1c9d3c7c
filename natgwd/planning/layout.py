"""The names of natgwd's table (family inet, table natgwd), given here once: its chains,
its sets and maps (IPv6 ones are the IPv4 names ending in "6"), and the keys of its
counting sets. Planning writes the table with them; whatever reads the table back
(natgwd.planning.plan.decode_rules, the counters, `natgwd status`) finds it by them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import TypeVar

from natgwd.planning.table import SetSpec

T = TypeVar("T")

# Chains. A share chain per share DNAT group: SHARE_CHAIN_PREFIX and a digest of its identity.
PREROUTING = "prerouting"
POSTROUTING = "postrouting"
ACCOUNT = "account"
FORWARD = "forward"
STEER = "steer"
UNTRACKED_IN = "untracked_in"  # natgwd's own endpoints, kept out of conntrack
UNTRACKED_OUT = "untracked_out"
SHARE_CHAIN_PREFIX = "share_"
POOL_CHAIN_PREFIX = "pool_"  # a chain per SNAT rule with a pool of EIPs (natgwd.planning.pools)

# Sets and maps of both families (Family.name gives the family's own).
EIPS = "eips"
FIP_IN_TARGET = "fip_in_target"
FIP_IN_RULE = "fip_in_rule"
FIP_OUT_TARGET = "fip_out_target"
FIP_OUT_RULE = "fip_out_rule"
DNAT_TARGET = "dnat_target"
DNAT_RULE = "dnat_rule"
DNAT_SHARE = "dnat_share"
SHARE_TARGET = "share_target"
SNAT_POOL_TARGET = "snat_pool_target"  # the EIP of each member (rule id) of a SNAT pool
# SNAT rules by destination: interval maps keyed by (source network . destination network).
SNAT_DST_TARGET = "snat_dst_target"
SNAT_DST_RULE = "snat_dst_rule"
SNAT_DST_POOL = "snat_dst_pool"  # to a pool's chain (natgwd.planning.pools)
SNAT_DST_NETWORK = "snat_dst_network"  # with several external networks
# With several external networks only: the id of the network a translation uses.
FIP_OUT_NETWORK = "fip_out_network"
EIP_NETWORK = "eip_network"

# Sets shared by the families: counting by rule id, the invalid drop, the id high-water mark.
ID_HIGH_WATER = "id_high_water"
INVALID_DROPS = "invalid_dropped"
DIRECTIONS = ("original", "reply")

# The per-rule counting sets, each split into COUNTING_SHARDS sets by rule id ("rule_traffic_3"
# holds the rules whose id is 3 modulo COUNTING_SHARDS), each with a chain of its own
# ("account_3") that the account chain jumps to by one verdict-map lookup on the id. The
# kernel dumps a set 32 KB at a time and walks it from its first element for every message,
# so a dump costs the square of its set's size: 104,000 elements in one set took 0.77 s,
# in 16 sets 0.18 s. The names without a shard are the whole (logical) sets, and the sets
# of tables written before the split, whose counters a restarted daemon carries over.
RULE_CONNECTIONS = "rule_connections"
RULE_TRAFFIC = "rule_traffic"
COUNTING_SHARDS = 16  # a power of two: the shard is the id's low bits
ACCOUNT_SHARD_PREFIX = "account_"


@dataclass(frozen=True)
class Family:
    version: int
    ip: str  # the nft payload keyword: "ip" or "ip6"
    suffix: str  # appended to the name of every map of this family
    addr: str  # the nft address type

    def name(self, base: str) -> str:
        return base + self.suffix

    def sets(self) -> tuple[SetSpec, ...]:
        a, name = self.addr, self.name
        return (
            SetSpec(name(EIPS), f"type {a};"),
            SetSpec(name(FIP_IN_TARGET), f"type {a} : {a};"),
            SetSpec(name(FIP_IN_RULE), f"type {a} : mark;"),
            SetSpec(name(FIP_OUT_TARGET), f"type {a} : {a};"),
            SetSpec(name(FIP_OUT_RULE), f"type {a} : mark;"),
            SetSpec(name(DNAT_TARGET), f"type {a} . inet_proto . inet_service : {a} . inet_service;"),
            SetSpec(name(DNAT_RULE), f"type {a} . inet_proto . inet_service : mark;"),
            SetSpec(name(DNAT_SHARE), f"type {a} . inet_proto . inet_service : verdict;"),
            SetSpec(name(SHARE_TARGET), f"type mark : {a} . inet_service;"),
        )

    # SNAT has one map of each purpose per prefix length in use: "snat_p24_target", ...

    def snat_target(self, prefixlen: int) -> str:
        return f"{self._snat_map(prefixlen)}_target"

    def snat_rule(self, prefixlen: int) -> str:
        return f"{self._snat_map(prefixlen)}_rule"

    def snat_network(self, prefixlen: int) -> str:
        return f"{self._snat_map(prefixlen)}_network"

    def dst_sets(self) -> tuple[SetSpec, ...]:
        """The maps of the SNAT rules by destination."""
        key, name = f"type {self.addr} . {self.addr}", self.name
        return (
            SetSpec(name(SNAT_DST_TARGET), f"{key} : {self.addr}; flags interval;"),
            SetSpec(name(SNAT_DST_RULE), f"{key} : mark; flags interval;"),
            SetSpec(name(SNAT_DST_POOL), f"{key} : verdict; flags interval;"),
        )

    def snat_pool(self, prefixlen: int) -> str:
        """The verdict map that sends a source network with a pool to its rule's chain."""
        return f"{self._snat_map(prefixlen)}_pool"

    def snat_pool_prefix(self, name: str) -> int | None:
        found = re.fullmatch(rf"snat{self.suffix}_p([0-9]+)_pool", name)
        return int(found[1]) if found is not None else None

    def snat_rule_prefix(self, name: str) -> int | None:
        """The prefix length of this family's SNAT rule map of this name; None for another set."""
        found = re.fullmatch(rf"snat{self.suffix}_p([0-9]+)_rule", name)
        return int(found[1]) if found is not None else None

    def _snat_map(self, prefixlen: int) -> str:
        return f"snat{self.suffix}_p{prefixlen}"

    def snat_key(self, prefixlen: int) -> str:
        network = IPv4Network(f"0.0.0.0/{prefixlen}") if self.version == 4 else IPv6Network(f"::/{prefixlen}")
        if prefixlen == network.max_prefixlen:
            return f"{self.ip} saddr"
        return f"{self.ip} saddr & {network.netmask}"


V4 = Family(4, "ip", "", "ipv4_addr")
V6 = Family(6, "ip6", "6", "ipv6_addr")
FAMILIES = (V4, V6)


def shard(whole: str, mark: int) -> str:
    """The set of `whole` (RULE_CONNECTIONS or RULE_TRAFFIC) that holds rule `mark`'s element."""
    return f"{whole}_{mark & (COUNTING_SHARDS - 1)}"


def key_shard(whole: str, key: str) -> str:
    """The set of `whole` that holds the element of this key ("7", "reply . 7")."""
    return shard(whole, int(key.rpartition(" . ")[2]))


def shards(whole: str) -> tuple[str, ...]:
    return tuple(f"{whole}_{index}" for index in range(COUNTING_SHARDS))


def account_shard(index: int) -> str:
    """The chain that counts the rules of shard `index`."""
    return f"{ACCOUNT_SHARD_PREFIX}{index}"


_SHARDED = {name: whole for whole in (RULE_CONNECTIONS, RULE_TRAFFIC) for name in shards(whole)}


def parts(whole: str) -> tuple[str, ...]:
    """The sets a logical set is kept in: its shards, or itself for an unsplit set."""
    return shards(whole) if whole in (RULE_CONNECTIONS, RULE_TRAFFIC) else (whole,)


def whole_set(name: str) -> str:
    """The logical set a set belongs to: RULE_TRAFFIC for "rule_traffic_3"; any other set is its own."""
    return _SHARDED.get(name, name)


def whole_elements(elements: Mapping[str, Mapping[str, T]], whole: str) -> Iterator[tuple[str, T]]:
    """(key, element) of every element of a logical set, across its shards and the unsplit
    set of an older table."""
    for name in {whole, *parts(whole)}:
        yield from elements.get(name, {}).items()


def traffic_key(direction: str, mark: str) -> str:
    """A `rule_traffic` element's key: the connection's direction, then the rule's id."""
    return f"{direction} . {mark}"


def split_traffic_key(key: str) -> tuple[str, str]:
    """(direction, mark) of a `rule_traffic` key."""
    direction, _, mark = key.partition(" . ")
    return direction, mark


def pool_chain_name(version: int, rule: str) -> str:
    # Named by the rule: its EIPs (the chain's rules) change, its name never.
    return POOL_CHAIN_PREFIX + hashlib.sha256(f"{version}/{rule}".encode()).hexdigest()[:16]


def share_chain_name(eip: str, protocol: str, port: int) -> str:
    # Named by the identity alone: the chain's rules change with its backends, its name never.
    return SHARE_CHAIN_PREFIX + hashlib.sha256(f"{eip}/{protocol}/{port}".encode()).hexdigest()[:16]
