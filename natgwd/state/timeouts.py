"""Idle timeouts per protocol (docs/state-file.md, "Idle timeouts"): the `timeouts` object of
the gateway and of a rule, resolved to the kernel's conntrack states.

A `timeouts` object names the timeouts a cloud NAT offers (TCP established, TCP
transitory, TCP TIME_WAIT, UDP, ICMP) and, in `tcpStates`, any TCP state by the kernel's name.
Within one object the most specific field wins (tcpStates over tcpEstablished and
tcpTimeWait over tcpTransitory); a rule's resolved states win over the gateway's, state by
state; a state neither sets keeps the kernel's value (its sysctl when the policy was made).
The schema bounds every value (1 s to the kernel's limit) and names the states."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A timeout is kept in jiffies in a signed 32-bit distance: above 2^31-1 jiffies the entry
# counts as expired at once. At HZ=1000, the highest HZ Linux builds with: 2,147,483 s.
MAX_SECONDS = 2_147_483

# The TCP states a transitory timeout covers: every one but ESTABLISHED (GCP's "TCP
# transitory"); TIME_WAIT has a field of its own too, as GCP's has.
TRANSITORY = ("syn_sent", "syn_recv", "fin_wait", "close_wait", "last_ack", "time_wait", "close")
# The kernel's TCP states as nftables names them in a `ct timeout` policy (1.0.6).
TCP_STATES = ("syn_sent", "syn_recv", "established", "fin_wait", "close_wait", "last_ack", "time_wait", "close")
UDP_STATES = ("unreplied", "replied")
ICMP_STATES = ("timeout",)  # ICMP and ICMPv6 alike
PROTOCOLS = ("tcp", "udp", "icmp")
STATES = {"tcp": TCP_STATES, "udp": UDP_STATES, "icmp": ICMP_STATES}

States = tuple[tuple[str, int], ...]  # (state, seconds), in the kernel's order of states


@dataclass(frozen=True)
class TimeoutPolicy:
    """The timeouts a policy sets, per protocol and state; a state absent keeps the kernel's."""

    tcp: States = ()
    udp: States = ()
    icmp: States = ()

    def __bool__(self) -> bool:
        return bool(self.tcp or self.udp or self.icmp)

    def over(self, base: TimeoutPolicy | None) -> TimeoutPolicy:
        """This policy's states, and `base`'s where this one sets none."""
        if base is None:
            return self
        return TimeoutPolicy(*(_merged(base.states(p), self.states(p), STATES[p]) for p in PROTOCOLS))

    def states(self, protocol: str) -> States:
        found: States = getattr(self, protocol)
        return found

    @property
    def name(self) -> str:
        """The name of its nftables objects and chain: a digest of what it sets, so that a
        changed policy is a new object (the kernel cannot change a ct timeout in place)."""
        text = ";".join(
            f"{protocol}:{state}={seconds}" for protocol in PROTOCOLS for state, seconds in self.states(protocol)
        )
        return "timeout_" + hashlib.sha256(text.encode()).hexdigest()[:12]

    def as_document(self) -> dict[str, dict[str, int]]:
        return {protocol: dict(self.states(protocol)) for protocol in PROTOCOLS if self.states(protocol)}


def _merged(base: States, top: States, order: tuple[str, ...]) -> States:
    values = dict(base) | dict(top)
    return tuple((state, values[state]) for state in order if state in values)


def parse_timeouts(item: Mapping[str, Any] | None) -> TimeoutPolicy | None:
    """The policy of a `timeouts` object the schema accepted; None when it sets nothing."""
    if not item:
        return None
    tcp: dict[str, int] = {}
    if "tcpTransitory" in item:
        tcp.update(dict.fromkeys(TRANSITORY, item["tcpTransitory"]))
    if "tcpTimeWait" in item:
        tcp["time_wait"] = item["tcpTimeWait"]
    if "tcpEstablished" in item:
        tcp["established"] = item["tcpEstablished"]
    tcp.update(item.get("tcpStates", {}))
    udp = dict.fromkeys(UDP_STATES, item["udp"]) if "udp" in item else {}
    icmp = {"timeout": item["icmp"]} if "icmp" in item else {}
    policy = TimeoutPolicy(
        tuple((s, int(tcp[s])) for s in TCP_STATES if s in tcp),
        tuple((s, int(udp[s])) for s in UDP_STATES if s in udp),
        tuple((s, int(icmp[s])) for s in ICMP_STATES if s in icmp),
    )
    return policy or None
