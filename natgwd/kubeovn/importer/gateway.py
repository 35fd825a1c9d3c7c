"""One gateway's import: its sides, then its EIPs and rules, then their QoS, validated as
natgwd would load them; every input object used or reported."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from natgwd.kubeovn.importer.bgp import carry_bgp
from natgwd.kubeovn.importer.objects import (
    Finding,
    ImportFailedError,
    ImportOptions,
    Inventory,
    Obj,
    name_of,
    section_of,
    state_name,
)
from natgwd.kubeovn.importer.qos import carry_qos
from natgwd.kubeovn.importer.rules import Rule, Rules
from natgwd.kubeovn.importer.sides import Sides
from natgwd.state.validation import InvalidStateError, load_state


@dataclass
class ImportResult:
    gateway: str
    state: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


def import_objects(objects: Sequence[Obj], options: ImportOptions | None = None) -> ImportResult:
    """The desired state of one gateway from its Kube-OVN objects (validated)."""
    options = options or ImportOptions()
    inventory = Inventory(objects)
    gw = chosen_gateway(inventory, options.gateway)
    inventory.use(gw)
    gateway_notes(inventory, gw)
    around, state = Sides(inventory, options).state(gw)
    rules = Rules(inventory)
    eips, eip_names = rules.eips(around.name, around.external_subnet_name)
    state = validated(inventory, state, eips, rules.rules(eip_names))
    eip_sources = {rule.entry["name"]: rule.source for rule in eips}
    inventory.use(*carry_qos(state, gw, eip_sources, inventory.of_kind("QoSPolicy"), state_name, inventory.report))
    carry_bgp(state, gw, eip_sources, inventory.report)
    inventory.report_unused()
    return ImportResult(around.name, state, inventory.findings)


def chosen_gateway(inventory: Inventory, wanted: str | None) -> Obj:
    """The VpcNatGateway to import: the one named, else the only one."""
    gateways = sorted(inventory.of_kind("VpcNatGateway"), key=name_of)
    if not gateways:
        raise ImportFailedError(
            "the input holds no VpcNatGateway: give the gateway's object too "
            "(kubectl get vpc-nat-gateway NAME -o yaml), with its EIPs and rules"
        )
    if wanted is None:
        if len(gateways) != 1:
            names = ", ".join(name_of(g) for g in gateways) or "none"
            raise ImportFailedError(f"choose the gateway with --gateway (VpcNatGateways in the input: {names})")
        wanted = name_of(gateways[0])
    chosen = [g for g in gateways if name_of(g) == wanted]
    if not chosen:
        raise ImportFailedError(f"VpcNatGateway {wanted!r} is not in the input")
    for other in gateways:
        if other is not chosen[0]:
            inventory.report("note", other, f"another gateway (importing {wanted})")
    return chosen[0]


def gateway_notes(inventory: Inventory, gw: Obj) -> None:
    """What the gateway itself asks for beyond the state."""
    spec = section_of(gw, "spec")
    if int(spec.get("replicas") or 1) > 1:
        inventory.report("note", gw, "HA gateway: give every replica the same desired state")


def validated(inventory: Inventory, base: dict[str, Any], eips: list[Rule], rules: list[Rule]) -> dict[str, Any]:
    """The state, after leaving out (and reporting) every entry natgwd's validation
    refuses; a refused interface section is fatal."""
    entries = eips + rules
    while True:
        state: dict[str, Any] = json.loads(json.dumps(base))
        placed: dict[tuple[str, int], Rule] = {}
        for section in ("eips", "snat", "dnat", "fip"):
            members = sorted((r for r in entries if r.section == section), key=lambda r: r.entry["name"])
            if members:
                state[section] = [r.entry for r in members]
            for index, rule in enumerate(members):
                placed[(section, index)] = rule
        try:
            load_state(json.dumps(state).encode())
        except InvalidStateError as err:
            dropped: list[Rule] = []
            fatal: list[str] = []
            for problem in err.problems:
                culprit = placed.get((problem.section or "", problem.index or 0))
                if culprit is None:
                    fatal.append(str(problem))
                elif culprit not in dropped:
                    dropped.append(culprit)
                    inventory.report("warning", culprit.source, f"natgwd refuses it: {problem.reason}; skipped")
            if fatal:
                raise ImportFailedError("the gateway itself is invalid: " + "; ".join(fatal)) from None
            entries = [r for r in entries if r not in dropped]
            continue
        return state
