"""Policy routing for several external networks: each network gets a routing table of its
own (its default routes), and traffic that belongs to an EIP is steered into the table of
the EIP's network, so that it never leaves through another network's gateway.

Two kinds of rules do the steering:

- By firewall mark: the routing decision for a forwarded packet is taken before source NAT,
  on the VM's own address, so natgwd's table marks the packet in prerouting with the id of
  the network its translation will use (the same maps that pick the EIP; see
  natgwd.planning.plan), and `fwmark ID lookup ID` sends it to that network's table. Replies of
  inbound DNAT and FIP connections are marked by the EIP they were addressed to.
- By source address: traffic the gateway itself sends from an EIP (`from EIP lookup ID`).

A rule `lookup main suppress_prefixlength 0` before them keeps every route of the main
table but its default route: marked traffic to the VPC or to a connected subnet is routed
as before. With one external network none of this exists.

`external.defaultRoute: "forwarded"` (a Kube-OVN LoadBalancer-Service pod) uses the same
pair of rules by incoming interface instead: packets arriving on the internal or external
interface take the main table without its default route, then natgwd's FORWARDED_TABLE,
which holds the default routes via the external gateway. The gateway's own traffic
(`/metrics` answers, anything else the pod sends) keeps the main table's default route,
as Kube-OVN's lb-svc.sh does with `ip rule iif ... lookup 100`.
"""

from __future__ import annotations

from dataclasses import dataclass

from natgwd.state.model import DesiredState, IPAddress
from natgwd.state.scaleout import HANDOVER_BASE

NETWORK_BASE = 4240  # network i (0 = `external`) has table and firewall mark NETWORK_BASE + i
SUPPRESS_PRIORITY = NETWORK_BASE
STEER_PRIORITY = NETWORK_BASE + 1
FORWARDED_TABLE = NETWORK_BASE - 1  # external.defaultRoute "forwarded": the default routes


@dataclass(frozen=True, order=True)
class PolicyRule:
    """One `ip rule` (of one family) natgwd owns."""

    family: int
    priority: int
    table: int
    fwmark: int = 0
    src: str = ""  # an EIP address, for a rule by source
    suppress_prefixlength: int = -1
    iif: str = ""  # an interface, for a rule by incoming interface

    def __str__(self) -> str:
        what = " ".join(
            part
            for part in (
                f"iif {self.iif}" if self.iif else "",
                f"fwmark {self.fwmark}" if self.fwmark else "",
                f"from {self.src}" if self.src else "",
                f"suppress_prefixlength {self.suppress_prefixlength}" if self.suppress_prefixlength >= 0 else "",
            )
            if part
        )
        return f"ipv{self.family} rule {self.priority}: {what} lookup {self.table}"


def network_ids(state: DesiredState) -> dict[str, int]:
    """Network name -> its table id and firewall mark; empty with one external network."""
    if not state.more_externals:
        return {}
    return {network.name: NETWORK_BASE + index for index, network in enumerate(state.externals)}


def policy_rules(state: DesiredState) -> tuple[PolicyRule, ...]:
    if state.scale_out is not None:
        # Each EIP group's packets by the table of the same number (natgwd.planning.handover).
        return tuple(PolicyRule(4, HANDOVER_BASE, g.mark, fwmark=g.mark) for g in state.scale_out.groups)
    if state.external.default_route == "forwarded":
        return _forwarded_rules(state)
    ids = network_ids(state)
    if not ids:
        return ()
    families = sorted({a.version for e in state.eips for a in e.addresses} | {4})
    rules = [PolicyRule(f, SUPPRESS_PRIORITY, 254, suppress_prefixlength=0) for f in families]
    for network in state.externals:
        rules += [PolicyRule(f, STEER_PRIORITY, ids[network.name], fwmark=ids[network.name]) for f in families]
    for eip in state.eips:
        address: IPAddress
        for address in eip.addresses:
            rules.append(PolicyRule(address.version, STEER_PRIORITY, ids[eip.network], src=str(address)))
    return tuple(sorted(rules))


def _forwarded_rules(state: DesiredState) -> tuple[PolicyRule, ...]:
    external = state.external
    families = [f for f, gateway in ((4, external.gateway), (6, external.gateway6)) if gateway is not None]
    rules = []
    for family in families:
        for interface in (state.internal.interface, external.interface):
            rules.append(PolicyRule(family, SUPPRESS_PRIORITY, 254, suppress_prefixlength=0, iif=interface))
            rules.append(PolicyRule(family, STEER_PRIORITY, FORWARDED_TABLE, iif=interface))
    return tuple(sorted(rules))
