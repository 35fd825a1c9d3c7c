"""N natgwd members of a scaled-out gateway in namespaces, with a router standing in for
OVN in Kube-OVN's replicas mode:

    vm1..vm3 10.55.0.2-4 ── vpc (bridge in rtr, 10.55.0.1)
                             rtr: default route, multipath over the members' LAN addresses,
                                  hashed on L4 (fib_multipath_hash_policy=1)
                             lan (bridge in rtr, 172.20.10.1/24)
                               ├── net1 [m0 172.20.10.11] net2 ──┐
                               ├── net1 [m1 172.20.10.12] net2 ──┼── ext (bridge br0, 10.115.55.254/21,
                               └── net1 [m2 172.20.10.13] net2 ──┘   "the internet")

The router drops a dead member's next hop when told (`drop_next_hop`), as OVN does after
its BFD session to the member goes down. `upstream=True` runs the same lab as Kube-OVN's
replicas mode does today: every member holds every EIP and translates what reaches it,
nothing is handed over, nothing synced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from natgwd.lab.topology import EXTERNAL_HOST, EXTERNAL_PREFIX, Lab, Natgwd, run
from tests.integration.bfd_lab import Bfdd
from tests.integration.ha_lab import MINIMAL_CAPABILITIES, kill_all, pids_in
from tests.integration.helpers import METRICS_PORT, client_command, natgwd_command, wait_for

VMS = ("10.55.0.2", "10.55.0.3", "10.55.0.4")
VPC_ROUTER = "10.55.0.1"
LAN_ROUTER = "172.20.10.1"
EIPS = {"e0": "10.115.55.200", "e1": "10.115.55.201", "e2": "10.115.55.202", "e3": "10.115.55.203"}
# Which EIPs each group holds, for N members: SNAT (e0), DNAT (e0), share DNAT (e1), FIP (e3)
# and a second SNAT (e2) spread so that every member owns a translation.
GROUPS = {
    2: [["e0", "e2"], ["e1", "e3"]],
    3: [["e0"], ["e1", "e3"], ["e2"]],
}


def member_address(index: int) -> str:
    return f"172.20.10.{11 + index}"


def scale_state(
    members: int, upstream: bool = False, advert_interval: float = 0.1, sync: bool = True
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "version": 1,
        # The LAN's subnet: with scaleOut natgwd adds no internal address (each member has its own).
        "internal": {
            "interface": "net1",
            "addresses": [f"{LAN_ROUTER[:-1]}254/24"],
            "routes": [{"dst": "10.55.0.0/16", "via": LAN_ROUTER}],
        },
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": EXTERNAL_HOST},
        "eips": [{"name": name, "v4ip": address} for name, address in EIPS.items()],
        "snat": [
            {"name": "vpc", "eip": "e0", "internalCIDR": "10.55.0.0/24"},
            {"name": "vm1", "eip": "e2", "internalCIDR": f"{VMS[0]}/32"},
        ],
        "dnat": [
            {"name": "web", "eip": "e0", "protocol": "tcp", "externalPort": "8888"}
            | {"internalIp": VMS[0], "internalPort": "80"},
            # Not vm1:80 again: a backend behind EIPs of two groups is ambiguous for its
            # replies (docs/scaling-out.md).
            *(
                {"name": f"share-{i}", "eip": "e1", "protocol": "tcp", "externalPort": "9999"}
                | {"internalIp": ip, "internalPort": port, "type": "share"}
                for i, (ip, port) in enumerate(((VMS[0], "81"), (VMS[2], "80")))
            ),
        ],
        "fip": [{"name": "fip", "eip": "e3", "internalIp": VMS[1]}],
    }
    if not upstream:
        state["scaleOut"] = {
            "interface": "net1",
            "virtualRouterIdBase": 60,
            "advertInterval": advert_interval,
            "preemptDelay": 3,
            "conntrackSync": sync,
            "members": [{"address": member_address(i)} for i in range(members)],
            "groups": [{"eips": eips} for eips in GROUPS[members]],
        }
    return state


@dataclass
class ScaleLab(Lab):
    members: int = 2
    upstream: bool = False
    daemons: dict[str, Natgwd] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)  # the members among the router's next hops
    # OVN's check of a returning member (revive_member): FRR's bfdd on the router with a
    # session to every member, and one in the revived member standing in for Kube-OVN's
    # sidecar; the member is a next hop again once its session is up.
    bfd: bool = False
    router_bfd: Bfdd | None = None

    def member_roles(self) -> list[str]:
        return [f"m{i}" for i in range(self.members)]

    def build(self) -> None:
        for role in ("rtr", "ext", *self.member_roles(), *self.vm_roles()):
            self._add_ns(role)
        self.exec("rtr", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.exec("rtr", "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
        for bridge, address in (("vpc", f"{VPC_ROUTER}/24"), ("lan", f"{LAN_ROUTER}/24")):
            self.exec("rtr", "ip", "link", "add", bridge, "type", "bridge")
            self.exec("rtr", "ip", "addr", "add", address, "dev", bridge)
            self.exec("rtr", "ip", "link", "set", bridge, "up")
        self.exec("ext", "ip", "link", "add", "br0", "type", "bridge")
        self.exec("ext", "ip", "addr", "add", f"{EXTERNAL_HOST}/{EXTERNAL_PREFIX}", "dev", "br0")
        self.exec("ext", "ip", "link", "set", "br0", "up")
        for role, address in zip(self.vm_roles(), VMS, strict=True):
            self._veth(role, "eth0", "rtr", f"p-{role}")
            self.exec("rtr", "ip", "link", "set", f"p-{role}", "master", "vpc", "up")
            self.exec(role, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            self.exec(role, "ip", "link", "set", "eth0", "up")
            self.exec(role, "ip", "route", "add", "default", "via", VPC_ROUTER)
        for index, role in enumerate(self.member_roles()):
            self._member_links(index, role)
        self.alive = set(range(self.members))
        self.set_next_hops(sorted(self.alive))
        if self.bfd:
            self.router_bfd = Bfdd(self, "rtr", LAN_ROUTER, *[member_address(i) for i in range(self.members)])

    def _member_links(self, index: int, role: str) -> None:
        for interface, segment, bridge in (("net1", "rtr", "lan"), ("net2", "ext", "br0")):
            self._veth(role, interface, segment, f"p-{role}")
            self.exec(segment, "ip", "link", "set", f"p-{role}", "master", bridge, "up")
        # The member's own LAN address, as its pod network gives it.
        self.exec(role, "ip", "addr", "add", f"{member_address(index)}/24", "dev", "net1")
        self.exec(role, "ip", "link", "set", "net1", "up")

    def set_next_hops(self, members: Any) -> None:
        """The router's default route: multipath over these members' LAN addresses."""
        hops = [word for i in members for word in ("nexthop", "via", member_address(i), "dev", "lan")]
        self.exec("rtr", "ip", "route", "replace", "default", *hops)

    def start_members(self, state: dict[str, Any]) -> None:
        """Every member, each with its own files; waits until every group has an owner."""
        for role in self.member_roles():
            self.daemons[role] = self.start_member(role, state)
        for daemon in self.daemons.values():
            daemon.wait_ready(timeout=40)
        if not self.upstream:
            self.wait_settled()

    def wait_settled(self, timeout: float = 40) -> None:
        try:
            wait_for(lambda: self.owners_settled() or None, "every group to have its first choice", timeout=timeout)
        except BaseException:
            views = {role: self.scale_detail(role) for role in self.daemons if role in self.live_roles()}
            raise AssertionError(f"groups not settled: {views}") from None

    def live_roles(self) -> list[str]:
        return [self.member_roles()[i] for i in sorted(self.alive)]

    def start_member(self, role: str, state: dict[str, Any], env: dict[str, str] | None = None) -> Natgwd:
        """`env`: added to natgwd's environment (e.g. a PATH with wrapped engines)."""
        directory = self.workdir / role
        directory.mkdir(exist_ok=True)
        daemon = Natgwd(self, directory / "state.json", None, directory / "natgwd.log", METRICS_PORT, role)  # type: ignore[arg-type]
        daemon.write_state(state)
        command = natgwd_command(
            daemon.state_path,
            str(directory / "applied.json"),
            *("--ha-run-dir", str(directory / "run"), "--resync-interval", "5"),
        )
        daemon.process = self.spawn(
            role,
            *MINIMAL_CAPABILITIES,
            *command,
            log_path=daemon.log_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        return daemon

    def scale_detail(self, role: str) -> dict[str, Any]:
        _, body = self.daemons[role].get("/readyz")
        detail: dict[str, Any] = json.loads(body).get("scale_out", {}) if body else {}
        return detail

    def owned_groups(self) -> dict[str, list[str]]:
        return {role: self.scale_detail(role).get("owned_groups", []) for role in self.daemons}

    def owners_settled(self) -> bool:
        """Every group owned by exactly one member, its first choice (preemption done), and
        every member pointing at the same owners."""
        owned = self.owned_groups()
        expected = {role: [f"g{i}"] for i, role in enumerate(self.member_roles())}
        if owned != expected:
            return False
        views = [self.scale_detail(role).get("owners") for role in self.daemons]
        return all(view == views[0] for view in views)

    def kill_member(self, role: str) -> None:
        """A silent death: every process of the member stopped then killed, its links down.
        The router keeps hashing flows to it until `drop_next_hop`."""
        kill_all(self, role)
        for interface in ("net1", "net2"):
            self.exec(role, "ip", "link", "set", interface, "down")

    def drop_next_hop(self, role: str) -> None:
        """What OVN does when the member's BFD session goes down."""
        self.alive.discard(self.member_roles().index(role))
        self.set_next_hops(sorted(self.alive))

    def revive_member(self, role: str, state: dict[str, Any]) -> Natgwd:
        """The member as a new pod: a fresh namespace (no addresses, no connections, no
        table), natgwd started in it; back among the router's next hops as OVN adds it
        when its BFD session comes up: with `bfd`, by that session (natgwd's gate opens it
        once natgwd is ready to forward), else once natgwd is ready."""
        index = self.member_roles().index(role)
        name = self.ns(role)
        self.exec(role, "ip", "link", "del", "net1", check=False)
        self.exec(role, "ip", "link", "del", "net2", check=False)
        run(["ip", "netns", "del", name])
        self._namespaces.remove(name)
        self._add_ns(role)
        self._member_links(index, role)
        self.daemons[role] = self.start_member(role, state)
        if self.router_bfd is not None:
            # The sidecar once natgwd's first table (and its closed gate) is there: before it,
            # nothing gates BFD (docs/scaling-out.md, a known gap this lab does not model).
            wait_for(lambda: self.has_table(role) or None, f"natgwd's table in {role}", timeout=40)
            Bfdd(self, role, member_address(index), LAN_ROUTER)
            self.router_bfd.wait("up", timeout=40, peer=member_address(index))
        else:
            self.daemons[role].wait_ready(timeout=40)
        self.alive.add(index)
        self.set_next_hops(sorted(self.alive))
        return self.daemons[role]

    def has_table(self, role: str) -> bool:
        return self.exec(role, "nft", "list", "table", "inet", "natgwd", check=False).returncode == 0

    def close(self) -> None:
        for role in self.member_roles():
            if self.ns(role) in self._namespaces and pids_in(self, role):
                kill_all(self, role)
        super().close()

    def exchanges(
        self, role: str, proto: str, address: str, port: int, count: int, timeout: float = 2
    ) -> dict[str, Any]:
        command = client_command("exchanges", proto, address, port, count, timeout)
        result = self.exec(role, *command, timeout=count * (timeout + 1) + 30)
        outcome: dict[str, Any] = json.loads(result.stdout)
        return outcome
