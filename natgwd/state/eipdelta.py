"""EIPs added to and removed from the last accepted document, checked one by one (the
change tracker's delta path for a Kube-OVN controller's eip-add and eip-del).

Only the plain form an EIP of one IPv4 address takes on a gateway with one external
network is checked here: an item of `name` and `v4ip` alone, appended, or removed with
every rule that names it. Anything else (an EIP with QoS, BGP or draining, an IPv6 address,
several external networks, HA or scaleOut, an EIP changed in place or reordered) is left
to the full validation, which lists every problem.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from natgwd.state.model import RULE_KINDS, DesiredState, Eip
from natgwd.state.problems import InvalidValueError
from natgwd.state.rules import Rule, usable_address
from natgwd.state.shape import has_control_character, item_shape_ok

PLAIN_KEYS = frozenset(("name", "v4ip"))
# Sections whose checks read every EIP: a state with one is validated in full.
WHOLE_EIP_SECTIONS = ("externals", "ha", "bgp", "scaleOut")


@dataclass(frozen=True)
class EipChange:
    """The EIPs a document removes and adds, and the state's EIPs after it."""

    removed: tuple[Eip, ...]
    added: tuple[Eip, ...]
    eips: tuple[Eip, ...]


def eip_change(base: DesiredState, old: Any, new: Any, document: dict[str, Any]) -> EipChange | None:
    """How the `eips` list `new` differs from `old` (the base's, valid), when it only removes
    plain EIPs and appends valid plain ones; None when the full path must decide."""
    if not isinstance(old, list) or not isinstance(new, list) or any(key in document for key in WHOLE_EIP_SECTIONS):
        return None
    if base.ha is not None or base.scale_out is not None:
        return None  # scaled out by discovered members: the document has no section to tell
    kept = _kept(old, new)
    if kept is None:
        return None
    appended = new[len(kept) :]
    removed_names = {item["name"] for item in old} - {item["name"] for item in kept}
    if not all(_plain(item) for item in (*appended, *(i for i in old if i["name"] in removed_names))):
        return None
    by_name = {eip.name: eip for eip in base.eips}
    holders = {eip.v4ip for eip in base.eips if eip.name not in removed_names}
    taken = set(by_name)  # a name removed and added back is a change in place
    added: list[Eip] = []
    for item in appended:
        address = _address(item["v4ip"])
        if address is None or address in holders or item["name"] in taken:
            return None
        holders.add(address)
        taken.add(item["name"])
        added.append(Eip(item["name"], address, network=base.external.name))
    removed = tuple(by_name[name] for name in sorted(removed_names))
    eips = (*(eip for eip in base.eips if eip.name not in removed_names), *added)
    return EipChange(removed, tuple(added), eips)


def names_removed_eip(rules: Iterable[Rule], removed: Sequence[Eip]) -> bool:
    """Whether a rule still names an EIP the change removes (the full path says which)."""
    gone = {eip.name for eip in removed}
    return any(rule.eip in gone or not gone.isdisjoint(getattr(rule, "pool", ())) for rule in rules)


def rules_of(state: DesiredState) -> Iterator[Rule]:
    return itertools.chain.from_iterable(getattr(state, kind) for kind in RULE_KINDS)


def _kept(old: list[Any], new: list[Any]) -> list[Any] | None:
    """The head of `new` that is `old` without the removed items, in the same order; None
    when `new` is not of that form. An edit keeps the very objects it does not change; a
    document read from a file has equal ones (compared as JSON: `true` equals 1 in Python)."""
    names = [item.get("name") if type(item) is dict else None for item in new]
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        return None
    position = 0
    for item in old:
        if position < len(new) and _same(item, new[position]):
            position += 1
    return new[:position]


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return old is new or (old == new and json.dumps(old) == json.dumps(new))


def _plain(item: Any) -> bool:
    return (
        type(item) is dict
        and item.keys() == PLAIN_KEYS
        and item_shape_ok("eips", item)
        and not any(has_control_character(value) for value in item.values())
    )


def _address(text: str) -> IPv4Address | None:
    try:
        address = usable_address(text)
    except InvalidValueError:
        return None
    return address if isinstance(address, IPv4Address) else None
