"""`natgwd import` of QoS: the QoSPolicy objects bound to the gateway's EIPs
(IptablesEIP.spec.qosPolicy) or to the gateway (VpcNatGateway.spec.qosPolicy), carried
into the state's `qosPolicies` with the same field names.

Each policy is tried on the state on its own: one natgwd's validation refuses (a zero rate,
a rule for an interface natgwd does not shape, conflicting rules, ...) is left out with the
reasons, and its EIPs stay without a limit; the rest of the state is not affected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from natgwd.kubeovn.importer.objects import Obj, name_of, section_of
from natgwd.state.validation import InvalidStateError, load_state

Report = Callable[[Any, Any, str], None]  # the importer's Inventory.report
RULE_FIELDS = ("interface", "rateMax", "burstMax", "priority", "direction", "matchType", "matchValue")


def policy_entry(obj: Obj, state_name: Callable[[str], str]) -> dict[str, Any]:
    """The state's form of a QoSPolicy object (values as they are; validation judges them)."""
    spec = section_of(obj, "spec")
    rules = []
    for index, rule in enumerate(spec.get("bandwidthLimitRules") or []):
        if not isinstance(rule, dict):
            continue
        entry: dict[str, Any] = {"name": state_name(str(rule.get("name") or f"rule-{index}"))}
        for key in RULE_FIELDS:
            value = rule.get(key)
            if value not in (None, ""):
                entry[key] = value
        rules.append(entry)
    policy: dict[str, Any] = {"name": state_name(name_of(obj)), "bandwidthLimitRules": rules}
    if spec.get("bindingType") in ("EIP", "NATGW"):
        policy["bindingType"] = spec["bindingType"]
    if isinstance(spec.get("shared"), bool):
        policy["shared"] = spec["shared"]
    return policy


def carry_qos(
    state: dict[str, Any],
    gateway: Obj,
    eip_sources: Mapping[str, Obj],
    policies: list[Obj],
    state_name: Callable[[str], str],
    report: Report,
) -> list[Obj]:
    """Add the bound policies to `state` (in place); the QoSPolicy objects used."""
    by_name = {name_of(p): p for p in policies}
    bindings: dict[str, list[dict[str, Any] | None]] = {}  # policy -> EIP entries (None: the gateway)
    for entry in state.get("eips", []):
        source = eip_sources.get(entry["name"])
        wanted = str(section_of(source, "spec").get("qosPolicy") or "") if source is not None else ""
        if wanted:
            bindings.setdefault(wanted, []).append(entry)
    gateway_policy = str(section_of(gateway, "spec").get("qosPolicy") or "")
    if gateway_policy:
        bindings.setdefault(gateway_policy, []).append(None)
    used: list[Obj] = []
    for name, users in sorted(bindings.items()):
        obj = by_name.get(name)
        if obj is None:
            for user in users:
                source = eip_sources[user["name"]] if user is not None else gateway
                report("warning", source, f"QoS policy {name} is not in the input; no bandwidth limit carried over")
            continue
        used.append(obj)
        trial = json.loads(json.dumps(state))
        entry = policy_entry(obj, state_name)
        _bind(trial, entry, users)
        try:
            load_state(json.dumps(trial).encode())
        except InvalidStateError as err:
            reasons = "; ".join(str(p) for p in err.problems)
            report("warning", obj, f"natgwd refuses it: {reasons}; no bandwidth limit carried over")
            continue
        _bind(state, entry, users)
    return used


def _bind(state: dict[str, Any], entry: dict[str, Any], users: list[dict[str, Any] | None]) -> None:
    state.setdefault("qosPolicies", []).append(entry)
    names = {e["name"] for e in users if e is not None}
    for eip in state.get("eips", []):
        if eip["name"] in names:
            eip["qosPolicy"] = entry["name"]
    if None in users:
        state["qosPolicy"] = entry["name"]
