"""What a change of the desired state changed, by name, for the log: the rules and EIPs
added, changed and removed ("dnat/web", "eip/my-eip")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from natgwd.state.model import DesiredState
from natgwd.state.tracker import RuleDelta

NAMES_LOGGED = 20  # per list; a change of thousands of rules is logged by its counts beyond


def _named(state: DesiredState | None) -> dict[str, Any]:
    if state is None:
        return {}
    rules = {f"{r.kind}/{r.name}": r for rules in (state.snat, state.dnat, state.fip) for r in rules}
    return rules | {f"eip/{e.name}": e for e in state.eips}


def _listed(names: Iterable[str]) -> list[str]:
    ordered = sorted(names)
    if len(ordered) <= NAMES_LOGGED:
        return ordered
    return [*ordered[:NAMES_LOGGED], f"... {len(ordered) - NAMES_LOGGED} more"]


def changed_names(before: DesiredState | None, after: DesiredState, delta: RuleDelta | None) -> dict[str, list[str]]:
    """The names added, changed and removed from `before` to `after` (empty lists: none).
    With the tracker's `delta`, the rules are found from it alone (an edit of one rule among
    10,000 costs no walk of the others); EIPs are compared whole."""
    if delta is not None and before is not None:
        old: dict[str, Any] = {f"{r.kind}/{r.name}": r for r in delta.removed}
        new: dict[str, Any] = {f"{r.kind}/{r.name}": r for r in delta.added}
        if before.eips is not after.eips:
            old |= {f"eip/{e.name}": e for e in before.eips}
            new |= {f"eip/{e.name}": e for e in after.eips}
    else:
        old, new = _named(before), _named(after)
    return {
        "added": _listed(new.keys() - old.keys()),
        "changed": _listed(name for name in new.keys() & old.keys() if new[name] != old[name]),
        "removed": _listed(old.keys() - new.keys()),
    }
