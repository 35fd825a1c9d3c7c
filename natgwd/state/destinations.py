"""SNAT rules by destination (`destinations`, docs/state-file.md): a rule limited to
destination networks takes precedence over the rules by source alone, so two of them that
could both match one connection (their sources and some destinations overlap) have equal
precedence, and are refused."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from natgwd.state.model import IPNetwork, SnatRule
from natgwd.state.problems import Problems

Held = tuple[SnatRule, int]  # a destination rule and its index in `snat`


def destinations(
    item: dict[str, Any], index: int, cidr: IPNetwork | None, parse: Any, problems: Problems
) -> tuple[IPNetwork, ...] | None:
    """The rule's destination networks (empty without the field); None after a problem."""
    found: dict[IPNetwork, int] = {}  # -> its position
    usable = True
    for position, text in enumerate(item.get("destinations", ())):
        where = ("snat", index, "destinations", position)
        network = problems.parsed(where, parse, text)
        if network is None:
            usable = False
        elif cidr is not None and network.version != cidr.version:
            problems.add(where, f"{network} is IPv{network.version} but internalCIDR {cidr} is IPv{cidr.version}")
            usable = False
        elif network in found:
            problems.add(where, f"duplicates destinations[{found[network]}] ({network})")
            usable = False
        else:
            found[network] = position
    return tuple(found) if usable else None


def overlapping(rule: SnatRule, others: Iterable[Held]) -> tuple[Held, IPNetwork] | None:
    """A destination rule that could match a connection `rule` matches, and the destination
    they share; None when there is none."""
    for other, index in others:
        if other.family != rule.family or not rule.internal_cidr.overlaps(other.internal_cidr):
            continue
        for mine in rule.destinations:
            if any(mine.overlaps(theirs) for theirs in other.destinations):
                return (other, index), mine
    return None


def refuse_overlap(rule: SnatRule, index: int, others: Iterable[Held], problems: Problems) -> bool:
    """True when `rule` overlaps no other destination rule; else the problem reported."""
    found = overlapping(rule, others)
    if found is None:
        return True
    (other, other_index), destination = found
    problems.item(
        "snat",
        index,
        "destinations",
        f"{rule.internal_cidr} to {destination} overlaps snat[{other_index}] ({other.internal_cidr} to "
        f"{', '.join(map(str, other.destinations))}): destination rules have equal precedence, so one "
        "connection could match both",
    )
    return False
