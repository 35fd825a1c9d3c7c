"""The rule sets of the comparative benchmark, and each method's form of them.

One generated desired state per N (benchmarks.apply_scale.build_state, over the seed
topology) is the source of every method's rules:

- natgwd: the state file itself;
- the floor: natgwd's own nftables script for it (plan_transaction(...).script());
- iptables-legacy in Kube-OVN's chain layout (per-rule exec and iptables-restore);
- naive nftables: the same rules, one nftables rule per NAT entry, in a table of its own.

The rule mix per N: N DNAT (half tcp, half udp; 100 ports per EIP), min(N/10, 1000) SNAT
(a /24, /26, /28 and /32 per 10.60.j.0/24, longest prefix first) and min(N/10, 1000) FIP
(one EIP each; the cap is the external /21's address plan), plus changes made for the
measurements: the last DNAT rule is tcp to vm1:8080 (the connection-rate and iperf3
target) and the last SNAT rule covers the VMs' 172.20.10.0/24 (the iperf3 SNAT path).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks.apply_scale import CHANGED_TARGETS, DNAT_TARGETS, _ip, build_state
from natgwd.lab.topology import EXTERNAL_PREFIX, VM_ADDRESSES

INTERNAL_IF = "net1"
EXTERNAL_IF = "net2"
SERVER_PORT = 8080  # on vm1: the target of the last DNAT rule
LAN_CIDR = "172.20.10.0/24"
MAX_SNAT_FIP = 1000
NAIVE_TABLE = "naive_nat"
KUBEOVN_CHAINS = (
    "DNAT_FILTER",
    "SNAT_FILTER",
    "EXCLUSIVE_DNAT",
    "EXCLUSIVE_SNAT",
    "SHARED_DNAT",
    "SHARED_SNAT",
    "HAIRPIN_SNAT",
)


def mix(n: int) -> tuple[int, int, int]:
    """(DNAT, SNAT, FIP) rules at size N."""
    side = max(1, min(n // 10, MAX_SNAT_FIP))
    return n, side, side


@dataclass(frozen=True)
class Target:
    """The DNAT rule the connection-rate and iperf3 clients go through."""

    eip: str
    port: int
    internal_ip: str
    internal_port: int


@dataclass
class Workload:
    n: int
    state: dict[str, Any]
    conn: Target
    snat_eip: str  # the EIP the VMs' SNAT rule uses
    eip_of: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(self.state[kind]) for kind in ("dnat", "snat", "fip")} | {"eips": len(self.state["eips"])}

    def base(self) -> dict[str, Any]:
        """The same gateway without NAT rules: interfaces, addresses, EIPs, routes."""
        return {**self.state, "snat": [], "dnat": [], "fip": []}


def workload(n: int) -> Workload:
    dnat, snat, fip = mix(n)
    state = build_state(dnat, snat, fip)
    eip_of = {e["name"]: e["v4ip"] for e in state["eips"]}
    last = state["dnat"][-1]
    # Within its EIP every rule has its own port, so making it tcp collides with nothing.
    last.update(protocol="tcp", internalIp=VM_ADDRESSES[0], internalPort=str(SERVER_PORT))
    state["snat"][-1] = {"name": "snat-lan", "eip": state["snat"][-1]["eip"], "internalCIDR": LAN_CIDR}
    return Workload(
        n=n,
        state=state,
        conn=Target(eip_of[last["eip"]], int(last["externalPort"]), VM_ADDRESSES[0], SERVER_PORT),
        snat_eip=eip_of[state["snat"][-1]["eip"]],
        eip_of=eip_of,
    )


def encode(state: dict[str, Any]) -> bytes:
    return json.dumps(state, indent=1).encode()


# --- the one-rule changes --------------------------------------------------------------


@dataclass
class Step:
    """One change: the state after it, and the same change as nat-gateway.sh calls."""

    kind: str  # add, change, delete
    rule: str
    state: dict[str, Any]
    calls: list[tuple[str, str]]


def change_steps(work: Workload, rounds: int) -> list[Step]:
    """Rounds of (add one DNAT, change one's target, delete one), applied in this order
    from the full state by every method. The connection-rate rule is never touched."""
    state = work.state
    n = len(state["dnat"])
    touched: set[int] = {n - 1}
    steps: list[Step] = []

    def pick(seed: int) -> int:
        if len(touched) >= n:
            raise ValueError(f"{rounds} rounds of changes need more than {n} DNAT rules")
        index = seed % n
        while index in touched:
            index = (index + 1) % n
        touched.add(index)
        return index

    for r in range(rounds):
        rules = list(state["dnat"])
        added = {
            "name": f"bench-add-{r:04d}",
            "eip": "dnat-eip-0000",
            "protocol": "tcp",
            "externalPort": str(20000 + r),
            "internalIp": _ip(DNAT_TARGETS, r),
            "internalPort": "8081",
        }
        rules.append(added)
        state = {**state, "dnat": rules}
        eip = work.eip_of[added["eip"]]
        steps.append(
            Step(
                "add",
                added["name"],
                state,
                [("dnat-add", f"{eip},{added['externalPort']},tcp,{added['internalIp']},8081")],
            )
        )

        rules = list(state["dnat"])
        index = pick(r * 1009 + 13)
        old = rules[index]
        new = {**old, "internalIp": _ip(CHANGED_TARGETS, r)}
        rules[index] = new
        state = {**state, "dnat": rules}
        eip, port, proto = work.eip_of[old["eip"]], old["externalPort"], old["protocol"]
        steps.append(
            Step(
                "change",
                old["name"],
                state,
                [
                    ("dnat-del", f"{eip},{port},{proto}"),
                    ("dnat-add", f"{eip},{port},{proto},{new['internalIp']},{new['internalPort']}"),
                ],
            )
        )

        index = pick(r * 997 + 500)
        victim = state["dnat"][index]
        rules = [rule for rule in state["dnat"] if rule is not victim]
        state = {**state, "dnat": rules}
        eip, port, proto = work.eip_of[victim["eip"]], victim["externalPort"], victim["protocol"]
        steps.append(Step("delete", victim["name"], state, [("dnat-del", f"{eip},{port},{proto}")]))
    return steps


# --- natgwd's own script: the floor ----------------------------------------------------


def desired_state(state: dict[str, Any]) -> Any:
    """natgwd's DesiredState of a (valid) state."""
    from natgwd.state import validation

    return validation.load_state(encode(state))


class FloorPlanner:
    """natgwd's nftables scripts for a sequence of states, rendered ahead of time with
    natgwd's own planning code: the full script from scratch, then for each next state the
    incremental transaction natgwd would send."""

    def __init__(self, state: dict[str, Any]) -> None:
        from natgwd.planning.plan import assign_ids, desired_table
        from natgwd.planning.table import plan_transaction

        desired = desired_state(state)
        self._ids = assign_ids(desired, {})
        self._highest = max(self._ids.values(), default=0)
        table = desired_table(desired, self._ids, self._highest)
        self.full_script = plan_transaction(None, table).script()
        self._contents = table.contents()

    def next_script(self, state: dict[str, Any]) -> str:
        from natgwd.planning.plan import assign_ids, desired_table
        from natgwd.planning.table import plan_transaction

        desired = desired_state(state)
        ids = assign_ids(desired, self._ids, self._highest)
        table = desired_table(desired, ids, self._highest)
        script = plan_transaction(self._contents, table).script()
        self._ids, self._contents = ids, table.contents()
        self._highest = max(self._highest, *ids.values(), 0)
        return script


def floor_delete_script() -> str:
    return "delete table inet natgwd\n"


# --- iptables-legacy, Kube-OVN's layout ------------------------------------------------


def _snat_sorted(state: dict[str, Any]) -> list[dict[str, Any]]:
    # Longest prefix first (Kube-OVN since #6680); equal prefixes in arrival order.
    return sorted(state["snat"], key=lambda s: -int(s["internalCIDR"].partition("/")[2] or 32))


def _cidr(value: str) -> str:
    return value if "/" in value else f"{value}/32"


def iptables_nat_table(state: dict[str, Any]) -> str:
    """The complete nat table in iptables-restore's format: what Kube-OVN's chains hold
    after every EIP, FIP, SNAT and DNAT of the state was added (FIP: EXCLUSIVE_DNAT and
    EXCLUSIVE_SNAT; SNAT: SHARED_SNAT, longest prefix first; DNAT: SHARED_DNAT in order;
    one HAIRPIN_SNAT rule per EIP)."""
    eip_of = {e["name"]: e["v4ip"] for e in state["eips"]}
    lines = ["*nat"]
    lines += [f":{chain} ACCEPT [0:0]" for chain in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")]
    lines += [f":{chain} - [0:0]" for chain in KUBEOVN_CHAINS]
    lines += [
        "-A PREROUTING -j DNAT_FILTER",
        "-A POSTROUTING -j SNAT_FILTER",
        "-A DNAT_FILTER -j EXCLUSIVE_DNAT",
        "-A DNAT_FILTER -j SHARED_DNAT",
        "-A SNAT_FILTER -j EXCLUSIVE_SNAT",
        "-A SNAT_FILTER -j SHARED_SNAT",
        "-A SNAT_FILTER -j HAIRPIN_SNAT",
    ]
    for fip in state["fip"]:
        eip = eip_of[fip["eip"]]
        lines.append(f"-A EXCLUSIVE_DNAT -d {eip}/32 -j DNAT --to-destination {fip['internalIp']}")
        lines.append(f"-A EXCLUSIVE_SNAT -s {fip['internalIp']}/32 -j SNAT --to-source {eip}")
    for snat in _snat_sorted(state):
        lines.append(
            f"-A SHARED_SNAT -s {_cidr(snat['internalCIDR'])} -o {EXTERNAL_IF} -j SNAT "
            f"--to-source {eip_of[snat['eip']]} --random-fully"
        )
    for dnat in state["dnat"]:
        proto = dnat["protocol"]
        lines.append(
            f"-A SHARED_DNAT -d {eip_of[dnat['eip']]}/32 -p {proto} -m {proto} --dport {dnat['externalPort']} "
            f"-j DNAT --to-destination {dnat['internalIp']}:{dnat['internalPort']}"
        )
    for eip in eip_of.values():
        lines.append(
            f"-A HAIRPIN_SNAT -o {INTERNAL_IF} -m mark --mark 0x1/0x1 -m conntrack --ctstate DNAT "
            f"--ctorigdst {eip}/32 -j SNAT --to-source {eip} --random-fully"
        )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_empty_nat_table() -> str:
    return iptables_nat_table({"eips": [], "snat": [], "dnat": [], "fip": []})


def kubeovn_calls(state: dict[str, Any]) -> list[tuple[str, str]]:
    """nat-gateway.sh calls that build the state's rules, in the controller's order:
    EIPs, then FIPs, SNATs and DNATs (one rule per call, as the controller sends them)."""
    eip_of = {e["name"]: e["v4ip"] for e in state["eips"]}
    calls = [("eip-add", f"{e['v4ip']}/{EXTERNAL_PREFIX}") for e in state["eips"]]
    calls += [("floating-ip-add", f"{eip_of[f['eip']]},{f['internalIp']}") for f in state["fip"]]
    calls += [("snat-add", f"{eip_of[s['eip']]},{_cidr(s['internalCIDR'])},--random-fully") for s in state["snat"]]
    calls += [
        (
            "dnat-add",
            f"{eip_of[d['eip']]},{d['externalPort']},{d['protocol']},{d['internalIp']},{d['internalPort']}",
        )
        for d in state["dnat"]
    ]
    return calls


def iptables_rule_count(state: dict[str, Any]) -> int:
    return len(state["dnat"]) + len(state["snat"]) + 2 * len(state["fip"]) + len(state["eips"])


# --- naive nftables --------------------------------------------------------------------


def naive_nft_script(state: dict[str, Any]) -> str:
    """The same rules as nftables rules, one per NAT entry (as Kube-OVN's iptables rules,
    with natgwd's semantics: FIP-out and SNAT only leaving the external interface), each
    with a counter, in a table of its own; the whole table replaced in one transaction."""
    eip_of = {e["name"]: e["v4ip"] for e in state["eips"]}
    ext, internal = f'"{EXTERNAL_IF}"', f'"{INTERNAL_IF}"'
    pre = [f"ip daddr {eip_of[f['eip']]} counter dnat ip to {f['internalIp']}" for f in state["fip"]]
    pre += [
        f"ip daddr {eip_of[d['eip']]} {d['protocol']} dport {d['externalPort']} counter "
        f"dnat ip to {d['internalIp']}:{d['internalPort']}"
        for d in state["dnat"]
    ]
    post = [f"oifname {ext} ip saddr {f['internalIp']} counter snat ip to {eip_of[f['eip']]}" for f in state["fip"]]
    post += [
        f"oifname {ext} ip saddr {s['internalCIDR']} counter snat ip to {eip_of[s['eip']]} fully-random"
        for s in _snat_sorted(state)
    ]
    post += [
        f"iifname {internal} oifname {internal} ct status dnat ct original ip daddr {eip} counter snat ip to {eip}"
        for eip in eip_of.values()
    ]
    out = [f"table ip {NAIVE_TABLE}", f"delete table ip {NAIVE_TABLE}", f"table ip {NAIVE_TABLE} {{"]
    out.append("chain prerouting {\ntype nat hook prerouting priority dstnat; policy accept;")
    out += pre
    out.append("}\nchain postrouting {\ntype nat hook postrouting priority srcnat; policy accept;")
    out += post
    out.append("}\n}")
    return "\n".join(out) + "\n"


def naive_rule_count(state: dict[str, Any]) -> int:
    return iptables_rule_count(state)


# --- addresses and routes of a gateway that natgwd does not run ------------------------


def gateway_ip_batch(state: dict[str, Any]) -> str:
    """`ip -batch` lines that give the gateway what natgwd's links reconcile would: the
    interfaces up, their addresses, every EIP (with the external prefix), the routes."""
    lines = [f"link set {INTERNAL_IF} up", f"link set {EXTERNAL_IF} up"]
    lines += [f"addr add {a} dev {INTERNAL_IF}" for a in state["internal"]["addresses"]]
    lines += [f"addr add {a} dev {EXTERNAL_IF}" for a in state["external"]["addresses"]]
    lines += eip_ip_batch(state["eips"]).splitlines()
    lines += [f"route add {r['dst']} via {r['via']} dev {INTERNAL_IF}" for r in state["internal"].get("routes", [])]
    lines.append(f"route add default via {state['external']['gateway']} dev {EXTERNAL_IF} onlink")
    return "\n".join(lines) + "\n"


def one_rule_state(state: dict[str, Any]) -> dict[str, Any]:
    """The gateway of `state` with its first DNAT rule alone and that rule's EIP: where a
    cold start's clock starts (the issue's "one-rule state")."""
    first = state["dnat"][0]
    eips = [e for e in state["eips"] if e["name"] == first["eip"]]
    return {**state, "eips": eips, "snat": [], "dnat": [first], "fip": []}


def eip_ip_batch(eips: list[dict[str, Any]], verb: str = "add") -> str:
    """`ip -batch` lines adding (or deleting) these EIPs' addresses as natgwd holds them."""
    return "".join(f"addr {verb} {e['v4ip']}/{EXTERNAL_PREFIX} dev {EXTERNAL_IF}\n" for e in eips)


def plain_routing_state() -> dict[str, Any]:
    """The gateway without NAT, for the physical limit: the seed's addresses only."""
    state = copy.deepcopy(build_state(0, 0, 0))
    state["eips"] = []
    return state


def describe_mix(sizes: list[int]) -> Iterator[str]:
    for n in sizes:
        d, s, f = mix(n)
        yield f"N={n:,}: {d:,} DNAT + {s:,} SNAT + {f:,} FIP"
