"""QoS policies of the desired state: Kube-OVN's QoSPolicy (`bandwidthLimitRules`), bound
to an EIP (IptablesEIP.spec.qosPolicy) or to the whole gateway (VpcNatGateway.spec.qosPolicy).

Rates are kept as bits per second and bursts as bytes, the units the kernel takes; the
Mbit/s and MB of the file are 10^6 bits and 2^20 bytes, as in Kube-OVN."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Literal

Direction = Literal["ingress", "egress"]
MatchDirection = Literal["src", "dst"]
BindingType = Literal["EIP", "NATGW"]

DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")
BITS_PER_MBIT = 1_000_000
BYTES_PER_MB = 1_048_576


@dataclass(frozen=True)
class Match:
    """`matchValue` of a gateway-level rule, e.g. "dst 10.0.0.0/24"."""

    direction: MatchDirection
    network: IPv4Network

    def __str__(self) -> str:
        return f"{self.direction} {self.network}"


@dataclass(frozen=True)
class BandwidthLimitRule:
    name: str
    direction: Direction
    rate_bits: int  # per second
    burst_bytes: int  # 0: the smallest burst that reaches the rate
    priority: int = 0
    interface: str | None = None
    # None: the bound EIP's address (EIP binding), or every packet of the NIC (NATGW binding)
    match: Match | None = None


@dataclass(frozen=True)
class QosPolicy:
    name: str
    rules: tuple[BandwidthLimitRule, ...]
    binding_type: BindingType | None = None
    shared: bool = True

    def rule(self, direction: Direction) -> BandwidthLimitRule | None:
        """The rule of an EIP-bound policy for one direction (validation allows one)."""
        return next((r for r in self.rules if r.direction == direction), None)
