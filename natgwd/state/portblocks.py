"""Port blocks per internal address (deterministic NAT): a SNAT rule with a `portBlock`
gives the addresses of its internal CIDR, in order, consecutive blocks of `size` ports on
its EIP, starting at `firstPort`. The layout follows from the rule alone, so the owner of
an EIP's port at a time follows from the rules applied then (natgwd.io.portblock_history)
without any record per connection.

Every address of the CIDR has a block, the network and broadcast addresses included: a
block never moves when a VM comes or goes, only when the rule changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # problems imports the model, which imports this
    from natgwd.state.problems import Problems

LAST_PORT = 65535
DEFAULT_FIRST_PORT = 1024


@dataclass(frozen=True)
class PortBlock:
    size: int  # ports per internal address
    first_port: int = DEFAULT_FIRST_PORT

    def block(self, index: int) -> tuple[int, int]:
        """The first and last port of the `index`-th address's block."""
        first = self.first_port + index * self.size
        return first, first + self.size - 1

    def capacity(self) -> int:
        """How many addresses fit between firstPort and 65535."""
        return (LAST_PORT - self.first_port + 1) // self.size


Network = IPv4Network | IPv6Network


def blocks(cidr: Network, block: PortBlock) -> Iterator[tuple[IPv4Address | IPv6Address, int, int]]:
    """Every address of `cidr` with the first and last port of its block, in order."""
    base = int(cidr.network_address)
    kind = type(cidr.network_address)
    for index in range(cidr.num_addresses):
        first, last = block.block(index)
        yield kind(base + index), first, last


def owner(cidr: Network, block: PortBlock, port: int) -> IPv4Address | IPv6Address | None:
    """The address whose block holds `port`; None when no block does."""
    if port < block.first_port:
        return None
    index = (port - block.first_port) // block.size
    if index >= cidr.num_addresses:
        return None
    return type(cidr.network_address)(int(cidr.network_address) + index)


def span(cidr: Network, block: PortBlock) -> tuple[int, int]:
    """The ports all the CIDR's blocks take together."""
    return block.first_port, block.first_port + cidr.num_addresses * block.size - 1


def check_alone(cidr: Network, block: PortBlock, index: int, problems: Problems) -> bool:
    """Whether the rule's blocks fit its EIP's ports; the reason to `problems` if not."""
    if cidr.version == 6:
        # The kernel here refuses `snat ip6 to ip6 saddr map` whose value is an address
        # with a port range (ENODATA), the form IPv4 uses.
        problems.item("snat", index, "portBlock", f"port blocks are IPv4 only; {cidr} is IPv6")
        return False
    if block.first_port + block.size - 1 > LAST_PORT:
        problems.item(
            "snat",
            index,
            "portBlock.size",
            f"a block of {block.size} ports from port {block.first_port} ends past {LAST_PORT}",
        )
        return False
    if cidr.num_addresses > block.capacity():
        _, last = span(cidr, block)
        problems.item(
            "snat",
            index,
            "portBlock.size",
            f"{cidr} has {cidr.num_addresses} addresses: {cidr.num_addresses} blocks of {block.size} ports "
            f"from port {block.first_port} end at {last}, past {LAST_PORT} (at most "
            f"{(LAST_PORT - block.first_port + 1) // cidr.num_addresses} ports each from port {block.first_port}, "
            f"or a smaller CIDR)",
        )
        return False
    return True


@dataclass(frozen=True)
class Blocked:
    """What the checks between rules need of one SNAT rule."""

    index: int  # its position in snat[] (for messages)
    name: str
    eip: str
    cidr: Network
    block: PortBlock | None
    pool: tuple[str, ...] = ()  # a pool's EIPs (then `eip` is one of them)
    destined: bool = False  # limited to destinations: looked up before the blocks


def check_together(rules: Iterable[Blocked], fips: Iterable[tuple[int, str]], problems: Problems) -> None:
    """Port blocks are only deterministic when nothing else takes the EIP's source ports
    and no other SNAT rule decides for an address inside a block's CIDR: another SNAT
    rule or a FIP on the EIP is refused (a FIP's VM leaves from ports of its own), two
    port-block rules on one EIP must not overlap, and a SNAT rule whose CIDR lies inside a
    port-block rule's is refused (its longer prefix would have to win, but the blocks are
    looked up first). `fips`: each FIP's position in fip[] and its EIP."""
    listed = list(rules)
    blocked = [r for r in listed if r.block is not None]
    if not blocked:
        return
    by_eip: dict[str, list[Blocked]] = {}
    for rule in blocked:
        by_eip.setdefault(rule.eip, []).append(rule)
    for index, eip in fips:
        if eip in by_eip:
            other = by_eip[eip][0]
            problems.item(
                "fip",
                index,
                "eip",
                f"EIP {eip!r} gives port blocks to snat[{other.index}] ({other.name!r}); "
                "a FIP on it would send its VM's connections from ports of the blocks",
            )
    for rule in listed:
        holders = [h for eip in (rule.pool or (rule.eip,)) for h in by_eip.get(eip, [])]
        if rule.block is None and holders:
            other = holders[0]
            problems.item(
                "snat",
                rule.index,
                "eips" if rule.pool else "eip",
                f"EIP {other.eip!r} gives port blocks to snat[{other.index}] ({other.name!r}); "
                "another SNAT rule on it would take ports from the blocks",
            )
        for other in blocked:
            if other is rule or other.cidr.version != rule.cidr.version or rule.destined:
                continue
            if rule.cidr.subnet_of(other.cidr) and rule.cidr != other.cidr:  # type: ignore[arg-type]
                problems.item(
                    "snat",
                    rule.index,
                    "internalCIDR",
                    f"{rule.cidr} lies inside {other.cidr} of snat[{other.index}] ({other.name!r}), "
                    "which gives port blocks; its addresses keep their blocks",
                )
    for holders in by_eip.values():
        ordered = sorted(holders, key=lambda r: span(r.cidr, r.block or PortBlock(1)))
        for before, after in itertools.pairwise(ordered):
            first, last = span(before.cidr, before.block or PortBlock(1))
            next_first, next_last = span(after.cidr, after.block or PortBlock(1))
            if next_first <= last:
                problems.item(
                    "snat",
                    after.index,
                    "portBlock",
                    f"ports {next_first}-{next_last} of EIP {after.eip!r} overlap ports {first}-{last} "
                    f"of snat[{before.index}] ({before.name!r})",
                )
