"""The semantic checks of QoS policies (validation.py checks the rest of the state; the
JSON Schema has checked the shape already): rates and bursts the kernel can shape,
references, bindings and rules that contradict each other."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from ipaddress import AddressValueError, IPv4Network, NetmaskValueError
from typing import Any, cast

from natgwd.state.model import Eip, ExternalSide
from natgwd.state.problems import Problems
from natgwd.state.qos import (
    BITS_PER_MBIT,
    BYTES_PER_MB,
    BandwidthLimitRule,
    Direction,
    Match,
    MatchDirection,
    QosPolicy,
)

MIN_RATE_MBIT = Decimal("0.01")  # 10 kbit/s: below it a packet waits for over a second
MAX_RATE_MBIT = Decimal(10_000)  # the class that carries unlimited traffic runs at 10 Gbit/s
MAX_BURST_MB = Decimal(1024)
# HTB keeps a burst as the time it takes at the rate, in 32-bit ticks of 64 ns.
MAX_BURST_SECONDS = Decimal(250)


def _decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _rate(path: str, value: Any, problems: Problems) -> int | None:
    mbit = _decimal(value)
    if mbit is None:
        problems.add(path, "must be a number of Mbit/s")
        return None
    if mbit == 0:
        problems.add(path, "is 0: a limit of nothing stops all traffic (unbind the policy to remove a limit)")
        return None
    if mbit < MIN_RATE_MBIT:
        problems.add(path, f"{mbit} Mbit/s is below the smallest rate, {MIN_RATE_MBIT} Mbit/s")
        return None
    if mbit > MAX_RATE_MBIT:
        problems.add(path, f"{mbit} Mbit/s is above the largest rate, {MAX_RATE_MBIT} Mbit/s (10 Gbit/s)")
        return None
    return int(mbit * BITS_PER_MBIT)


def _burst(path: str, value: Any, rate_bits: int | None, problems: Problems) -> int | None:
    if value is None:
        return 0
    mb = _decimal(value)
    if mb is None:
        problems.add(path, "must be a number of MB")
        return None
    if mb > MAX_BURST_MB:
        problems.add(path, f"{mb} MB is above the largest burst, {MAX_BURST_MB} MB")
        return None
    burst = int(mb * BYTES_PER_MB)
    if rate_bits and Decimal(burst * 8) / rate_bits > MAX_BURST_SECONDS:
        seconds = Decimal(burst * 8) / rate_bits
        problems.add(
            path,
            f"{mb} MB takes {seconds:.0f} s to send at rateMax; at most {MAX_BURST_SECONDS} s (HTB's buffer "
            "holds no more)",
        )
        return None
    return burst


def _match(path: str, text: str, problems: Problems) -> Match | None:
    keyword, _, cidr = text.partition(" ")
    try:
        network = IPv4Network(cidr if "/" in cidr else f"{cidr}/32")
    except (AddressValueError, NetmaskValueError) as err:
        problems.add(path, f"not a valid IPv4 network: {err}")
        return None
    except ValueError:
        problems.add(path, f"has host bits set (did you mean {keyword} {IPv4Network(cidr, strict=False)}?)")
        return None
    return Match(cast(MatchDirection, keyword), network)


def _rule(path: str, item: dict[str, Any], external: str, problems: Problems) -> BandwidthLimitRule | None:
    rate = _rate(f"{path}.rateMax", item["rateMax"], problems)
    burst = _burst(f"{path}.burstMax", item.get("burstMax"), rate, problems)
    interface = item.get("interface")
    if interface is not None and interface != external:
        problems.add(f"{path}.interface", f"natgwd shapes the external interface only ({external}), not {interface}")
        return None
    match = _match(f"{path}.matchValue", item["matchValue"], problems) if "matchValue" in item else None
    if rate is None or burst is None or ("matchValue" in item and match is None):
        return None
    direction = cast(Direction, item["direction"])
    return BandwidthLimitRule(item["name"], direction, rate, burst, item.get("priority", 0), interface, match)


def qos_policies(
    doc: dict[str, Any], eips: Sequence[Eip], external: ExternalSide, problems: Problems
) -> tuple[tuple[QosPolicy, ...], str | None]:
    """The policies of the document and the gateway's own one; every problem to `problems`."""
    policies: dict[str, tuple[int, QosPolicy]] = {}
    paths: dict[str, list[str]] = {}  # of each policy's rules in the document
    for i, item in enumerate(doc.get("qosPolicies", [])):
        path = f"$.qosPolicies[{i}]"
        if item["name"] in policies:
            problems.add(f"{path}.name", f"duplicates qosPolicies[{policies[item['name']][0]}] ({item['name']!r})")
            continue
        rules = []
        names: dict[str, int] = {}
        for j, rule_item in enumerate(item["bandwidthLimitRules"]):
            rule_path = f"{path}.bandwidthLimitRules[{j}]"
            if rule_item["name"] in names:
                problems.add(f"{rule_path}.name", f"duplicates bandwidthLimitRules[{names[rule_item['name']]}]")
                continue
            names[rule_item["name"]] = j
            rule = _rule(rule_path, rule_item, external.interface, problems)
            if rule is not None:
                rules.append((j, rule))
        policy = QosPolicy(item["name"], tuple(r for _, r in rules), item.get("bindingType"), item.get("shared", True))
        policies[policy.name] = (i, policy)
        paths[policy.name] = [f"{path}.bandwidthLimitRules[{j}]" for j, _ in rules]
    users: dict[str, list[str]] = {}
    for i, eip in enumerate(eips):
        if eip.qos_policy is None:
            continue
        path = f"$.eips[{i}].qosPolicy"
        if eip.v4ip is None or eip.network != external.name:
            # The trees shape the external interface, matching IPv4 addresses.
            problems.add(path, f"EIP {eip.name!r}: QoS limits an IPv4 EIP on the external network {external.name!r}")
            continue
        if _bound(path, eip.qos_policy, "EIP", policies, problems):
            users.setdefault(eip.qos_policy, []).append(eip.name)
    for name, eip_names in users.items():
        index, policy = policies[name]
        if not policy.shared and len(eip_names) > 1:
            problems.add(
                f"$.qosPolicies[{index}].shared",
                f"is false but EIPs {', '.join(eip_names)} use the policy; one EIP at most",
            )
        _eip_rules(policy, paths[name], problems)
    gateway = doc.get("qosPolicy")
    if gateway is not None and _bound("$.qosPolicy", gateway, "NATGW", policies, problems):
        _gateway_rules(policies[gateway][1], paths[gateway], problems)
    # A policy not bound yet is checked as what its bindingType says it is for.
    for name, (_, policy) in policies.items():
        if name not in users and name != gateway:
            if policy.binding_type == "EIP":
                _eip_rules(policy, paths[name], problems)
            elif policy.binding_type == "NATGW":
                _gateway_rules(policy, paths[name], problems)
    return tuple(policy for _, policy in policies.values()), gateway


def _bound(path: str, name: str, binding: str, policies: dict[str, tuple[int, QosPolicy]], problems: Problems) -> bool:
    if name not in policies:
        problems.add(path, f"names QoS policy {name!r}, which is not in qosPolicies")
        return False
    policy = policies[name][1]
    if policy.binding_type is not None and policy.binding_type != binding:
        what = "an EIP" if binding == "EIP" else "the gateway"
        problems.add(path, f"binds {what} to QoS policy {name!r}, whose bindingType is {policy.binding_type}")
        return False
    return True


def _eip_rules(policy: QosPolicy, paths: list[str], problems: Problems) -> None:
    seen: dict[Direction, str] = {}
    for rule, path in zip(policy.rules, paths, strict=True):
        if rule.match is not None:
            problems.add(
                f"{path}.matchValue", "an EIP's rules match the EIP's address; matchValue is for the gateway's policy"
            )
        elif rule.direction in seen:
            problems.add(
                f"{path}.direction",
                f"conflicts with rule {seen[rule.direction]!r}: an EIP has one {rule.direction} limit",
            )
        else:
            seen[rule.direction] = rule.name


def _gateway_rules(policy: QosPolicy, paths: list[str], problems: Problems) -> None:
    for j, (rule, path) in enumerate(zip(policy.rules, paths, strict=True)):
        for other in policy.rules[:j]:
            if other.direction != rule.direction:
                continue
            if rule.match is None and other.match is None:
                problems.add(
                    f"{path}.direction", f"conflicts with rule {other.name!r}: one {rule.direction} limit per NIC"
                )
                break
            if rule.match is None or other.match is None:
                continue
            if rule.match == other.match:
                problems.add(f"{path}.matchValue", f"conflicts with rule {other.name!r}: the same match")
                break
            # A packet can match both (a source and a destination, or overlapping CIDRs):
            # at the same priority, which limit it gets would be left to chance.
            same_field = rule.match.direction == other.match.direction
            overlapping = not same_field or rule.match.network.overlaps(other.match.network)
            if rule.priority == other.priority and overlapping:
                problems.add(
                    f"{path}.priority",
                    f"{rule.match} can match the packets of rule {other.name!r} ({other.match}) at the same "
                    f"priority {rule.priority}: give one a lower number to say which limit applies",
                )
                break
