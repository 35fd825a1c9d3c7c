"""The checks of a SNAT rule with a pool of EIPs (`eips`, docs/state-file.md): every EIP
known, named once, of the rule's family, on one external network and, with scaleOut, in
one EIP group (each internal address's packets must reach the one member that owns the
EIP its connections leave with). And of draining EIPs: they serve SNAT rules alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from natgwd.state.model import IPNetwork, SnatRule
from natgwd.state.problems import Problems
from natgwd.state.timeouts import parse_timeouts

if TYPE_CHECKING:
    from natgwd.state.rules import RuleContext


def not_draining(ctx: RuleContext, problems: Problems, section: str, index: int, name: str) -> bool:
    """A DNAT or FIP rule publishes its EIP for connections from outside, which a draining
    EIP no longer takes: refused (docs/state-file.md, "Draining an EIP")."""
    if not ctx.eips[name].draining:
        return True
    problems.item(
        section,
        index,
        "eip",
        f"EIP {name!r} is draining: it takes no new connections, and a {section} rule takes them from "
        "outside (move the rule to another EIP first, or stop draining)",
    )
    return False


def snat_pool_rule(
    item: dict[str, Any], index: int, ctx: RuleContext, problems: Problems, cidr: IPNetwork | None
) -> SnatRule | None:
    names: list[str] = item["eips"]
    if "eip" in item:
        problems.item("snat", index, "eip", "a rule names eip or eips (a pool), not both")
        return None
    usable = cidr is not None
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        at: tuple[str | int, ...] = ("eips", position)
        if name in seen:
            problems.add(("snat", index, *at), f"duplicates eips[{seen[name]}] ({name!r})")
            usable = False
            continue
        seen[name] = position
        known = ctx.known_eip(problems, "snat", index, name, at)
        if not known or (cidr is not None and not ctx.same_family(problems, "snat", index, "internalCIDR", name, cidr)):
            usable = False
    if not usable or cidr is None:
        return None
    first = ctx.eips[names[0]]
    for position, name in enumerate(names[1:], 1):
        eip, where = ctx.eips[name], ("snat", index, "eips", position)
        if eip.network != first.network:
            problems.add(
                where,
                f"EIP {name!r} is on external network {eip.network!r} but {names[0]!r} on "
                f"{first.network!r}; a pool's EIPs share one external network",
            )
            usable = False
        elif ctx.scale_out is not None:
            group, first_group = ctx.scale_out.group_of(name).index, ctx.scale_out.group_of(names[0]).index
            if group != first_group:
                problems.add(
                    where,
                    f"EIP {name!r} is in scaleOut group {group} but {names[0]!r} in group {first_group}; "
                    "a pool's EIPs must be owned by one member (list them in one of scaleOut.groups)",
                )
                usable = False
    if not usable:
        return None
    return SnatRule(item["name"], names[0], cidr, parse_timeouts(item.get("timeouts")), pool=tuple(names))
