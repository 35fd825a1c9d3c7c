"""The QoS subcommands of the drop-in nat-gateway.sh (natgwd.kubeovn.shim), in Kube-OVN's argument
formats, as edits of the desired state's QoS policies:

    eip-ingress-qos-add / eip-egress-qos-add   IP,PRIORITY,RATE,BURST   (Mbit/s, MB)
    eip-ingress-qos-del / eip-egress-qos-del   IP
    qos-add / qos-del   DIRECTION,IFACE,PRIORITY,u32|matchall,ip,src|dst,CIDR,RATE,BURST

The controller names no policy in these calls, so an EIP's limits live in a policy of its
own ("qos-EIP"): a policy the EIP shares with others (from `natgwd import`) is copied
before it is changed, so that the others keep theirs. The gateway's rules live in its
policy (`qosPolicy`, created as "gateway-qos" when there is none). A rule that is there
already with other values is replaced (a changed QoSPolicy comes as a new add); deleting
what is not there is fine; a policy left without rules is unbound and removed.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from ipaddress import IPv4Address
from typing import Any

from natgwd.kubeovn.naming import dashed as _dashed
from natgwd.kubeovn.shim import grammar
from natgwd.kubeovn.shim.edits import Context, Doc, Op, eip_named, need_eip, own_eip, section_items, unique_name
from natgwd.kubeovn.shim.grammar import ShimError

GATEWAY_POLICY = "gateway-qos"
MAX_PRIORITY = 1023


def _decimal(text: str, what: str) -> str:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ShimError(f"natgwd: {what} {text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ShimError(f"natgwd: {what} {text!r} is not a number of at least 0")
    return format(value.normalize(), "f")


def _priority(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_PRIORITY:
        raise ShimError(f"natgwd: priority {text!r} is not a whole number 0-{MAX_PRIORITY}")
    return int(text)


def _policies(doc: Doc) -> list[dict[str, Any]]:
    return section_items(doc, "qosPolicies")


def _policy(doc: Doc, name: object) -> dict[str, Any] | None:
    return next((p for p in _policies(doc) if p.get("name") == name), None)


def _users(doc: Doc, name: object) -> int:
    return sum(e.get("qosPolicy") == name for e in section_items(doc, "eips")) + (doc.get("qosPolicy") == name)


def _drop_if_empty(doc: Doc, policy: dict[str, Any], unbind: Callable[[], None]) -> None:
    if policy.get("bandwidthLimitRules"):
        return
    unbind()
    if _users(doc, policy.get("name")) == 0:
        doc["qosPolicies"] = [p for p in _policies(doc) if p is not policy]
        if not doc["qosPolicies"]:
            del doc["qosPolicies"]


def _eip_policy(doc: Doc, eip: dict[str, Any], create: bool, ctx: Context) -> dict[str, Any] | None:
    """The policy of the EIP that only it uses (copied from a shared one, or new)."""
    current = _policy(doc, eip.get("qosPolicy"))
    if current is not None and _users(doc, current["name"]) == 1:
        return current
    if current is None and not create:
        return None
    rules = [dict(r) for r in current.get("bandwidthLimitRules", [])] if current else []
    name = f"qos-{_dashed(eip['v4ip'])}"
    own = _policy(doc, name)
    if own is None or _users(doc, name) > 0:  # one left by an earlier EIP of this address is reused
        own = {"name": unique_name(name, doc, "qosPolicies", ctx), "bindingType": "EIP"}
        _policies(doc).append(own)
    own["bandwidthLimitRules"] = rules
    eip["qosPolicy"] = own["name"]
    return own


def _eip_of(doc: Doc, address: IPv4Address, ctx: Context) -> dict[str, Any] | None:
    """The EIP of `address`, the working copy's own to change (edits.own_eip)."""
    name = eip_named(doc, address, ctx)
    return own_eip(doc, name) if name else None


def _put(rules: list[dict[str, Any]], same: Callable[[dict[str, Any]], bool], rule: dict[str, Any]) -> None:
    """Replace the rule `same` finds (keeping its name), or append `rule`."""
    for i, existing in enumerate(rules):
        if same(existing):
            rules[i] = {**rule, "name": existing["name"]}
            return
    taken = {r.get("name") for r in rules}
    base, suffix = rule["name"], 2
    while rule["name"] in taken:
        rule = {**rule, "name": f"{base}-{suffix}"}
        suffix += 1
    rules.append(rule)


def eip_qos_add(direction: str) -> Callable[[str], Op]:
    def parse(rule: str) -> Op:
        fields = [f.strip() for f in rule.split(",")]
        if len(fields) != 4 or not all(fields):
            raise ShimError(f"natgwd: bad rule {rule!r}: expected IP,PRIORITY,RATE,BURST")
        address = grammar.address(fields[0], "EIP")
        priority = _priority(fields[1])
        rate, burst = _decimal(fields[2], "rate"), _decimal(fields[3], "burst")
        wanted = {"name": direction, "direction": direction, "rateMax": rate, "burstMax": burst, "priority": priority}

        def op(doc: Doc, ctx: Context) -> None:
            name = need_eip(doc, address, ctx)
            eip = own_eip(doc, name)
            current = _policy(doc, eip.get("qosPolicy"))
            if current is not None and any(
                {**r, "name": direction} == wanted for r in current.get("bandwidthLimitRules", [])
            ):
                return  # the same limit again
            policy = _eip_policy(doc, eip, create=True, ctx=ctx)
            assert policy is not None
            _put(section_items(policy, "bandwidthLimitRules"), lambda r: r.get("direction") == direction, wanted)

        return op

    return parse


def eip_qos_del(direction: str) -> Callable[[str], Op]:
    def parse(rule: str) -> Op:
        fields = [f.strip() for f in rule.split(",") if f.strip()]
        if not fields:
            raise ShimError(f"natgwd: bad rule {rule!r}: expected IP")
        address = grammar.address(fields[0], "EIP")

        def op(doc: Doc, ctx: Context) -> None:
            eip = _eip_of(doc, address, ctx)
            current = _policy(doc, eip.get("qosPolicy")) if eip else None
            if eip is None or current is None:
                return
            if not any(r.get("direction") == direction for r in current.get("bandwidthLimitRules", [])):
                return
            policy = _eip_policy(doc, eip, create=False, ctx=ctx)
            assert policy is not None
            policy["bandwidthLimitRules"] = [
                r for r in policy["bandwidthLimitRules"] if r.get("direction") != direction
            ]
            _drop_if_empty(doc, policy, lambda: eip.pop("qosPolicy", None))

        return op

    return parse


def _gateway_rule(rule: str) -> tuple[dict[str, Any], list[str]]:
    """The rule of a qos-add/qos-del argument, and warnings about it."""
    fields = [f.strip() for f in rule.split(",")]
    if len(fields) != 9:
        raise ShimError(
            f"natgwd: bad rule {rule!r}: expected DIRECTION,IFACE,PRIORITY,u32|matchall,ip,src|dst,CIDR,RATE,BURST"
        )
    direction, interface, priority, classifier, match_type, match_direction, cidr, rate, burst = fields
    if direction not in ("ingress", "egress"):
        raise ShimError(f"natgwd: direction {direction!r} is not ingress or egress")
    if classifier not in ("u32", "matchall"):
        raise ShimError(f"natgwd: classifier {classifier!r} is not u32 or matchall")
    warnings: list[str] = []
    result: dict[str, Any] = {
        "name": f"{direction}-all",
        "direction": direction,
        "rateMax": _decimal(rate, "rate"),
        "burstMax": _decimal(burst, "burst"),
        "priority": _priority(priority),
    }
    if interface:
        result["interface"] = interface
    if classifier == "u32":
        if match_type != "ip":
            raise ShimError(f"natgwd: match type {match_type!r} is not ip")
        if match_direction not in ("src", "dst"):
            raise ShimError(f"natgwd: match direction {match_direction!r} is not src or dst")
        network = grammar.network(cidr, "CIDR", warnings)
        result["name"] = f"{direction}-{match_direction}-{_dashed(network)}"
        result["matchType"] = "ip"
        result["matchValue"] = f"{match_direction} {network}"
    return result, warnings


def _same_match(wanted: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("direction") == wanted["direction"] and r.get("matchValue") == wanted.get("matchValue")


def _check_interface(doc: Doc, rule: dict[str, Any], ctx: Context) -> None:
    external = (doc.get("external") or {}).get("interface")
    interface = rule.get("interface")
    if interface is None:
        ctx.warnings.append(f"qos rule {rule['name']} names no interface; using the external one ({external})")
    elif interface != external:
        raise ShimError(f"natgwd: QoS on {interface}: natgwd shapes the external interface ({external}) only")


def qos_add(rule: str) -> Op:
    wanted, warnings = _gateway_rule(rule)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        _check_interface(doc, wanted, ctx)
        policy = _policy(doc, doc.get("qosPolicy"))
        if policy is None:
            policy = {"name": unique_name(GATEWAY_POLICY, doc, "qosPolicies", ctx), "bindingType": "NATGW"}
            policy["bandwidthLimitRules"] = []
            _policies(doc).append(policy)
            doc["qosPolicy"] = policy["name"]
        _put(section_items(policy, "bandwidthLimitRules"), _same_match(wanted), wanted)

    return op


def qos_del(rule: str) -> Op:
    wanted, warnings = _gateway_rule(rule)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        policy = _policy(doc, doc.get("qosPolicy"))
        if policy is None:
            return
        same = _same_match(wanted)
        policy["bandwidthLimitRules"] = [r for r in section_items(policy, "bandwidthLimitRules") if not same(r)]
        _drop_if_empty(doc, policy, lambda: doc.pop("qosPolicy", None))

    return op


QOS_EDITS: dict[str, Callable[[str], Op]] = {
    "eip-ingress-qos-add": eip_qos_add("ingress"),
    "eip-egress-qos-add": eip_qos_add("egress"),
    "eip-ingress-qos-del": eip_qos_del("ingress"),
    "eip-egress-qos-del": eip_qos_del("egress"),
    "qos-add": qos_add,
    "qos-del": qos_del,
}
