"""The drop-in nat-gateway.sh (natgwd.kubeovn.shim) driving a real natgwd in the seed topology,
the way kube-ovn-controller drives Kube-OVN's script: `bash nat-gateway.sh` once per rule,
inside the gateway namespace, each call returning once natgwd has applied it. natgwd takes
the calls on its edit endpoint (`--edit-port`, as the image runs it); tests marked with the
`file` transport run them as the file protocol instead (natgwd without an endpoint). Ports the scenarios of
Kube-OVN's test/e2e/iptables-vpc-nat-gw that apply to the data plane (reference section
3.1), with real traffic instead of iptables-save greps.

The gateway namespace first gets what Kube-OVN's CNI gives the pod (addresses on net1 and
net2, the VPC routes and the default route from the routes annotations); natgwd starts
with no state file, and `init net1,net2` builds it from the interfaces, as the controller's
first exec does. Traffic stays between the lab's namespaces.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from natgwd.kubeovn.naming import eip_name
from natgwd.kubeovn.shim.editlog import EditLog, fold
from natgwd.kubeovn.shim.edits import compact
from natgwd.kubeovn.shim.filestate import document_bytes
from natgwd.lab.topology import EXTERNAL_HOST, Lab, Natgwd
from tests.integration.helpers import (
    addresses,
    client_command,
    events_named,
    kill_process,
    prober,
    routes,
    tcp_get,
    wait_for,
)
from tests.integration.qos_helpers import assert_shaped, iperf, iperf_server

EIP1, EIP2, EIP3 = "10.115.55.200", "10.115.55.201", "10.115.55.202"
VM1, VM2, VM3 = "172.20.10.2", "172.20.10.3", "172.20.10.4"
UPSTREAM_PORT = 8080  # a server in "ext", the internet: it answers with the source it saw
SHIM_TIMEOUT = "30"
SCRIPT = Path(__file__).resolve().parents[2] / "image" / "nat-gateway.sh"


@dataclass(frozen=True)
class Call:
    code: int
    out: str
    err: str


def start_natgwd(lab: Lab, state_path: Path, transport: str, *args: str) -> Natgwd:
    """natgwd on `state_path`; with the edit endpoint unless the transport is the file."""
    token = state_path.with_name("edit.token")
    if transport == "endpoint":
        args = ("--edit-port", "0", "--edit-token", str(token), *args)
    return lab.start_natgwd(None, *args, state_path=state_path)


@dataclass
class Gateway:
    lab: Lab
    natgwd: Natgwd
    state_path: Path
    gateway_v4: str = EXTERNAL_HOST  # the pod's GATEWAY_V4 (none before Kube-OVN v1.15)
    transport: str = "endpoint"
    script: Path = SCRIPT  # or image/lb-svc.sh
    role: str = "gw"  # the namespace the calls run in (a scaled-out gateway has several)
    applied_state: Path | None = None  # natgwd's record, else the lab's

    def shim(self, *args: str, timeout: str = SHIM_TIMEOUT) -> Call:
        """`bash nat-gateway.sh ARGS...` in the gateway namespace, as the controller execs it."""
        env = [
            f"NATGWD_STATE={self.state_path}",
            f"NATGWD_APPLIED_STATE={self.applied_state or self.lab.applied_state_path}",
            f"NATGWD_EDIT_TOKEN={self.state_path.with_name('edit.token')}",
            f"NATGWD_SHIM_TIMEOUT={timeout}",
            f"GATEWAY_V4={self.gateway_v4}",
            f"NATGWD_PYTHON={sys.executable}",
            f"PATH={os.environ['PATH']}",
        ]
        result = self.lab.exec(
            self.role, "env", *env, "bash", str(self.script), *args, check=False, timeout=float(timeout) + 30
        )
        return Call(result.returncode, result.stdout, result.stderr)

    def restart(self, *args: str) -> None:
        """kill -9 of natgwd, and a new one with `args`."""
        self.natgwd.stop(signal.SIGKILL)
        self.natgwd = start_natgwd(self.lab, self.state_path, self.transport, *args)

    def ok(self, *args: str) -> Call:
        call = self.shim(*args)
        assert call.code == 0, call
        assert all(line.startswith("Warning:") for line in call.err.splitlines()), call
        return call

    def refused(self, *args: str, match: str) -> Call:
        call = self.shim(*args)
        assert call.code == 1 and match in call.err, call
        return call

    def state(self) -> dict[str, Any]:
        """The desired state natgwd holds: the state file with its edit log folded in (what
        natgwd applies when it starts)."""
        log = EditLog(self.state_path.with_name(self.state_path.name + ".edits"))
        while True:  # natgwd may fold the log into the file meanwhile: read both again
            raw = self.state_path.read_bytes()
            deltas = log.load()
            if raw == self.state_path.read_bytes():
                break
        loaded: dict[str, Any] = json.loads(raw)
        if deltas and log.base == hashlib.sha256(raw).hexdigest():
            return compact(fold(loaded, deltas))
        return loaded

    def assert_applied_is_the_file(self) -> None:
        """natgwd reports the state file's sha256 as applied; with the endpoint, once the
        calls paused and natgwd folded its edit log into the file."""
        if self.transport == "endpoint":
            log = self.state_path.with_name(self.state_path.name + ".edits")
            wait_for(lambda: not log.exists(), "natgwd to fold its edit log into the state file")
        assert self.applied() == hashlib.sha256(self.state_path.read_bytes()).hexdigest()

    def applied(self) -> str:
        """The sha256 natgwd reports on /readyz (it must equal the file's: the call waited)."""
        status, body = self.natgwd.get("/readyz")
        assert status == 200, body
        return str(json.loads(body)["applied_sha256"])

    def source_seen(self, role: str) -> str:
        """The source address the internet sees for a connection from `role`, '' if none."""
        return tcp_get(self.lab, role, EXTERNAL_HOST, UPSTREAM_PORT).split(":")[0]

    def answers(self, role: str, address: str, port: int, count: int) -> list[str]:
        """`count` fresh HTTP connections from `role`; each answer ('' when none)."""
        result = self.lab.exec(role, *client_command("http-answers", address, port, count), timeout=count * 3 + 10)
        return list(json.loads(result.stdout))


def configure_like_the_cni(lab: Lab, vpc: str = "net1", ext: str = "net2", routes: bool = True) -> None:
    """What Kube-OVN's CNI sets up in the gateway pod before any exec (seed document): the
    interfaces' addresses and (since v1.13) the internal provider's routes annotation and
    the external provider's default route."""
    commands = [
        ("ip", "link", "set", vpc, "up"),
        ("ip", "link", "set", ext, "up"),
        ("ip", "addr", "add", "172.20.10.254/24", "dev", vpc),
        ("ip", "addr", "add", "10.115.48.1/21", "dev", ext),
    ]
    if routes:
        commands.append(("ip", "route", "add", "10.55.0.0/16", "via", "172.20.10.1", "dev", vpc))
        commands.append(("ip", "route", "add", "default", "via", EXTERNAL_HOST, "dev", ext))
    for command in commands:
        lab.exec("gw", *command)


@contextlib.contextmanager
def initialized(lab: Lab, state_path: Path, transport: str, *args: str) -> Iterator[Gateway]:
    """A gateway pod as the controller leaves it after its first exec (`init`)."""
    configure_like_the_cni(lab)
    gw = Gateway(lab, start_natgwd(lab, state_path, transport, *args), state_path, transport=transport)
    lab.serve("ext", tcp=[UPSTREAM_PORT])
    try:
        init = gw.ok("init", "net1,net2")
        assert init.out.splitlines()[0] == "init net1,net2"
        yield gw
    finally:
        gw.natgwd.stop()
        print(gw.natgwd.log()[-4000:])
        shutil.rmtree(lab.workdir, ignore_errors=True)


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    with initialized(lab, tmp_path / "state.json", getattr(request, "param", "endpoint")) as gw:
        yield gw


# --- init -------------------------------------------------------------------------------


def test_init_builds_the_state_from_what_the_cni_configured(gateway: Gateway) -> None:
    assert gateway.state() == {
        "version": 1,
        "internal": {
            "interface": "net1",
            "addresses": ["172.20.10.254/24"],
            "routes": [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}],
        },
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": EXTERNAL_HOST},
    }
    gateway.assert_applied_is_the_file()
    assert "nothing to change" in gateway.ok("init", "net1,net2").out
    gateway.refused("init", "net1,net9", match="External interface 'net9' not found")


# --- [2] EIP, FIP, SNAT, DNAT; shared EIP; hairpin; cleanup -------------------------------


@pytest.mark.parametrize("gateway", ["endpoint", "file"], indirect=True)
def test_fip_snat_dnat_add_and_delete_with_traffic(gateway: Gateway) -> None:
    lab = gateway.lab
    for role in ("vm1", "vm2", "vm3"):
        lab.serve(role, tcp=[80], tag=role)
    gateway.ok("eip-add", f"{EIP1}/21")
    gateway.ok("eip-add", f"{EIP2}/21")
    assert {f"{EIP1}/21", f"{EIP2}/21"} <= addresses(lab, "gw")["net2"]

    # FIP: in to the VM, out as the EIP; a second FIP on the EIP is refused.
    gateway.ok("floating-ip-add", f"{EIP2},{VM2}")
    answer = tcp_get(lab, "ext", EIP2, 80)
    assert answer.startswith(f"{EXTERNAL_HOST}:") and answer.endswith("@vm2"), answer
    assert gateway.source_seen("vm2") == EIP2
    gateway.refused("floating-ip-add", f"{EIP2},{VM3}", match=f"already maps to {VM2}")

    # SNAT and DNAT on one EIP (Kube-OVN #2729).
    gateway.ok("snat-add", f"{EIP1},172.20.10.0/24,--random-fully")
    gateway.ok("dnat-add", f"{EIP1},8888,tcp,{VM1},80")
    assert gateway.source_seen("vm1") == EIP1
    assert gateway.source_seen("vm3") == EIP1
    assert gateway.source_seen("vm2") == EIP2, "a FIP comes before the SNAT"
    answer = tcp_get(lab, "ext", EIP1, 8888)
    assert answer.startswith(f"{EXTERNAL_HOST}:") and answer.endswith("@vm1")
    gateway.refused("floating-ip-add", f"{EIP1},{VM3}", match="also used by a dnat rule")

    # Hairpin: a VPC client reaching another VM through its EIP; the backend sees the EIP.
    assert tcp_get(lab, "vm3", EIP2, 80).split(":")[0] == EIP2
    assert tcp_get(lab, "vm3", EIP1, 8888).split(":")[0] == EIP1

    # The same calls again (the controller's redo): nothing changes, all exit 0.
    before = gateway.state()
    for args in (
        ("floating-ip-add", f"{EIP2},{VM2}"),
        ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),
        ("dnat-add", f"{EIP1},8888,tcp,{VM1},80"),
        ("eip-add", f"{EIP1}/21"),
    ):
        assert "nothing to change" in gateway.ok(*args).out
    assert gateway.state() == before

    # Deletes, each effective when the call returns; deleting again is fine.
    gateway.ok("floating-ip-del", EIP2)
    assert tcp_get(lab, "ext", EIP2, 80) == ""
    assert gateway.source_seen("vm2") == EIP1, "without its FIP, vm2 falls under the SNAT"
    gateway.ok("dnat-del", f"{EIP1},8888,tcp")
    assert tcp_get(lab, "ext", EIP1, 8888) == ""
    gateway.ok("snat-del", f"{EIP1},172.20.10.0/24")
    assert gateway.source_seen("vm1") == ""
    gateway.ok("eip-del", f"{EIP2}/21")
    assert f"{EIP2}/21" not in addresses(lab, "gw")["net2"]
    for args in (("floating-ip-del", EIP2), ("dnat-del", f"{EIP1},8888,tcp"), ("snat-del", f"{EIP1},172.20.10.0/24")):
        gateway.ok(*args)
    gateway.assert_applied_is_the_file()


def state_changes(gateway: Gateway) -> tuple[float, float]:
    """natgwd_state_changes_total by path: (delta, full)."""
    samples = gateway.natgwd.metrics()
    return tuple(samples[f'natgwd_state_changes_total{{path="{path}"}}'] for path in ("delta", "full"))  # type: ignore[return-value]


def test_eips_added_and_removed_by_calls_take_the_delta_path_with_traffic(gateway: Gateway) -> None:
    """eip-add and eip-del of a controller's replay: the EIP checked and planned alone,
    its address added (or deleted) with the nftables change, and traffic to it translated
    (or not) when the call returns."""
    lab = gateway.lab
    lab.serve("vm1", tcp=[80], tag="vm1")
    delta, full = state_changes(gateway)
    gateway.ok("eip-add", f"{EIP1}/21")
    gateway.ok("eip-add", f"{EIP2}/21")
    gateway.ok("dnat-add", f"{EIP2},8888,tcp,{VM1},80")
    assert state_changes(gateway) == (delta + 3, full), "the EIPs went the delta path too"
    assert {f"{EIP1}/21", f"{EIP2}/21"} <= addresses(lab, "gw")["net2"]
    answer = tcp_get(lab, "ext", EIP2, 8888)
    assert answer.startswith(f"{EXTERNAL_HOST}:") and answer.endswith("@vm1"), answer

    # eip-del takes the EIP's DNAT rule with it; the other EIP stays.
    gateway.ok("eip-del", f"{EIP2}/21")
    assert state_changes(gateway) == (delta + 4, full)
    assert f"{EIP2}/21" not in addresses(lab, "gw")["net2"]
    assert f"{EIP1}/21" in addresses(lab, "gw")["net2"]
    assert tcp_get(lab, "ext", EIP2, 8888) == ""
    assert [eip["name"] for eip in gateway.state()["eips"]] == [eip_name(IPv4Address(EIP1))]
    assert gateway.state().get("dnat", []) == []
    gateway.assert_applied_is_the_file()


# --- [7] spec updates: delete the old rule, add the new one ------------------------------


def test_changes_as_the_controller_makes_them(gateway: Gateway) -> None:
    lab = gateway.lab
    lab.serve("vm1", tcp=[80], tag="vm1")
    lab.serve("vm2", tcp=[8080, 9090], udp=[443], tag="vm2")
    lab.serve("vm3", tcp=[80], tag="vm3")
    for eip in (EIP1, EIP2, EIP3):
        gateway.ok("eip-add", f"{eip}/21")

    # DNAT: internal IP and port, then the EIP, then externalPort 443 and protocol udp.
    gateway.ok("dnat-add", f"{EIP1},80,tcp,{VM1},80")
    assert tcp_get(lab, "ext", EIP1, 80).endswith("@vm1")
    steps = [
        (f"{EIP1},80,tcp", f"{EIP1},80,tcp,{VM2},8080", (EIP1, 80)),
        (f"{EIP1},80,tcp", f"{EIP1},80,tcp,{VM2},9090", (EIP1, 80)),
        (f"{EIP1},80,tcp", f"{EIP2},80,tcp,{VM2},9090", (EIP2, 80)),
        (f"{EIP2},80,tcp", f"{EIP2},443,tcp,{VM2},9090", (EIP2, 443)),
    ]
    old_target = (EIP1, 80)
    for delete, add, target in steps:
        gateway.ok("dnat-del", delete)
        gateway.ok("dnat-add", add)
        answer = tcp_get(lab, "ext", *target)
        assert answer.endswith("@vm2"), (add, answer)
        if target != old_target:
            assert tcp_get(lab, "ext", *old_target) == "", f"{old_target} still forwarded after {add}"
        old_target = target
    gateway.ok("dnat-del", f"{EIP2},443,tcp")
    gateway.ok("dnat-add", f"{EIP2},443,udp,{VM2},443")
    assert tcp_get(lab, "ext", EIP2, 443) == ""
    answers = lab.udp_exchange("ext", EIP2, 443, [b"x"])
    assert answers[0].startswith(f"{EXTERNAL_HOST}:") and answers[0].endswith("@vm2")

    # FIP: EIP and internal IP together.
    gateway.ok("floating-ip-add", f"{EIP3},{VM1}")
    assert tcp_get(lab, "ext", EIP3, 80).endswith("@vm1")
    gateway.ok("floating-ip-del", f"{EIP3},{VM1}")
    gateway.ok("eip-del", f"{EIP3}/21")
    gateway.ok("eip-add", "10.115.55.203/21")
    gateway.ok("floating-ip-add", f"10.115.55.203,{VM3}")
    assert tcp_get(lab, "ext", "10.115.55.203", 80).endswith("@vm3")
    assert tcp_get(lab, "ext", EIP3, 80) == ""
    assert gateway.source_seen("vm3") == "10.115.55.203"

    # SNAT: EIP and CIDR (/24 -> its lower /25, where vm1 and vm2 are), then only the EIP.
    gateway.ok("snat-add", f"{EIP1},172.20.10.0/24")
    assert gateway.source_seen("vm1") == EIP1
    gateway.ok("snat-del", f"{EIP1},172.20.10.0/24")
    gateway.ok("snat-add", f"{EIP2},172.20.10.0/25")
    assert gateway.source_seen("vm1") == EIP2
    gateway.ok("snat-del", f"{EIP2},172.20.10.0/25")
    gateway.ok("snat-add", f"{EIP1},172.20.10.0/25")
    assert gateway.source_seen("vm1") == EIP1
    assert gateway.source_seen("vm2") == EIP1


# --- [7] SNAT ordering ----------------------------------------------------------------------


@pytest.mark.parametrize("order", [(2, 1, 0), (0, 1, 2), (1, 2, 0)], ids=["broadest-first", "narrowest-first", "mixed"])
def test_snat_longest_prefix_wins_whatever_the_call_order(gateway: Gateway, order: tuple[int, int, int]) -> None:
    """/32 (a bare address, normalised) before /30 before /24, as Kube-OVN sorts SHARED_SNAT
    since #6680: vm1 (.2) matches all three, vm2 (.3) the /30 and /24, vm3 (.4) the /24."""
    for eip in (EIP1, EIP2, EIP3):
        gateway.ok("eip-add", f"{eip}/21")
    rules = [f"{EIP1},{VM1}", f"{EIP2},172.20.10.0/30,--random-fully", f"{EIP3},172.20.10.0/24"]
    for index in order:
        gateway.ok("snat-add", rules[index])
    assert [gateway.source_seen(vm) for vm in ("vm1", "vm2", "vm3")] == [EIP1, EIP2, EIP3]
    gateway.ok("snat-del", f"{EIP2},172.20.10.0/30")  # the middle one goes
    assert [gateway.source_seen(vm) for vm in ("vm1", "vm2", "vm3")] == [EIP1, EIP3, EIP3]


# --- [share-dnat-dataplane], [share-dnat-conflict] ----------------------------------------


def test_share_dnat_spreads_then_follows_the_backend_list(gateway: Gateway) -> None:
    lab = gateway.lab
    lab.serve("vm1", tcp=[80], tag="vm1")
    lab.serve("vm2", tcp=[80], tag="vm2")
    gateway.ok("eip-add", f"{EIP3}/21")
    gateway.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM1}:80@{VM2}:80")
    names = sorted(d["name"] for d in gateway.state()["dnat"])
    assert names == ["dnat-10-115-55-202-tcp-80-172-20-10-2-80", "dnat-10-115-55-202-tcp-80-172-20-10-3-80"]
    answers = gateway.answers("ext", EIP3, 80, 20)
    assert all(a.startswith(f"{EXTERNAL_HOST}:") for a in answers), answers
    assert {a.rsplit("@", 1)[-1] for a in answers} == {"vm1", "vm2"}, answers

    # The conflict both ways: an exclusive DNAT cannot take a share identity.
    gateway.refused("dnat-add", f"{EIP3},80,tcp,{VM3},80", match="is a share DNAT group")

    # The controller rebuilds the group from the remaining backends: only vm2 now.
    gateway.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM2}:80")
    assert [d["name"] for d in gateway.state()["dnat"]] == ["dnat-10-115-55-202-tcp-80-172-20-10-3-80"]
    answers = gateway.answers("ext", EIP3, 80, 20)
    assert {a.rsplit("@", 1)[-1] for a in answers} == {"vm2"}, answers

    gateway.ok("nft-dnat-map-del", f"{EIP3},80,tcp")
    assert tcp_get(lab, "ext", EIP3, 80) == ""
    gateway.ok("dnat-add", f"{EIP3},80,tcp,{VM1},80")  # accepted once the group is gone
    gateway.refused("nft-dnat-map-add", f"{EIP3},80,tcp,{VM2}:80", match="taken by exclusive DNAT")
    assert tcp_get(lab, "ext", EIP3, 80).endswith("@vm1")


# --- many execs at once -----------------------------------------------------------------------


@pytest.mark.parametrize("gateway", ["endpoint", "file"], indirect=True)
def test_50_concurrent_calls_are_all_applied(gateway: Gateway) -> None:
    lab = gateway.lab
    lab.serve("vm1", tcp=[80], tag="vm1")
    gateway.ok("eip-add", f"{EIP1}/21")
    ports = list(range(20000, 20050))
    with ThreadPoolExecutor(50) as pool:
        calls = list(pool.map(lambda port: gateway.shim("dnat-add", f"{EIP1},{port},tcp,{VM1},80"), ports))
    assert [c.code for c in calls] == [0] * 50, [c.err for c in calls if c.code]
    assert sorted(int(d["externalPort"]) for d in gateway.state()["dnat"]) == ports
    gateway.assert_applied_is_the_file()
    for port in (ports[0], ports[24], ports[-1]):
        assert tcp_get(lab, "ext", EIP1, port).endswith("@vm1"), port


# --- the controller's call sequences across restarts ---------------------------------------

# What kube-ovn-controller execs (kubeovn/kube-ovn 1533681d; v1.16.2 builds the same strings),
# non-primary-CNI mode: `init` with the interfaces, then, after a gateway pod (re)appears,
# every rule again. Rules may come before their EIPs.
CONTROLLER_INIT = ("init", "net1,net2")
CONTROLLER_REPLAY: tuple[tuple[str, ...], ...] = (
    ("get-iptables-version",),
    ("subnet-route-add", "10.55.0.0/16,172.20.10.1", "10.56.0.0/16,172.20.10.1"),
    ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),
    ("dnat-add", f"{EIP1},8888,tcp,{VM1},80"),
    ("floating-ip-add", f"{EIP2},{VM2}"),
    ("nft-dnat-map-add", f"{EIP3},9090,tcp,{VM1}:80@{VM3}:80"),
    ("eip-add", f"{EIP1}/21"),
    ("eip-add", f"{EIP2}/21"),
    ("eip-add", f"{EIP3}/21"),
)


def assert_nothing_changed(daemon: Natgwd, after: str) -> None:
    """natgwd's log: every apply was empty (no nftables operation, element or link change)
    and no conntrack entry was deleted."""
    applied = events_named(daemon, "desired state applied")
    assert applied, f"nothing applied {after}"
    changes = [e for e in applied if e["nft_operations"] or e["changed_elements"] or e["link_changes"]]
    assert changes == [], f"{after}: {changes}"
    assert events_named(daemon, "stale conntrack entries deleted") == [], after


def replay(gateway: Gateway) -> list[Call]:
    return [gateway.ok(*CONTROLLER_INIT)] + [gateway.ok(*call) for call in CONTROLLER_REPLAY]


def assert_gateway_works(gateway: Gateway) -> None:
    """SNAT, FIP both ways, DNAT, share DNAT, hairpin (also from a VM with a FIP) and the
    VPC routes, with the addresses each side sees."""
    lab = gateway.lab
    assert gateway.source_seen("vm3") == EIP1, "SNAT"
    assert gateway.source_seen("vm2") == EIP2, "FIP out"
    assert tcp_get(lab, "ext", EIP2, 80).startswith(f"{EXTERNAL_HOST}:"), "FIP in"
    assert tcp_get(lab, "ext", EIP2, 80).endswith("@vm2"), "FIP in"
    answer = tcp_get(lab, "ext", EIP1, 8888)
    assert answer.startswith(f"{EXTERNAL_HOST}:") and answer.endswith("@vm1"), f"DNAT: {answer!r}"
    answers = gateway.answers("ext", EIP3, 9090, 16)
    assert all(a.startswith(f"{EXTERNAL_HOST}:") for a in answers), answers
    assert {a.rsplit("@", 1)[-1] for a in answers} == {"vm1", "vm3"}, f"share DNAT: {answers}"
    assert tcp_get(lab, "vm3", EIP1, 8888).split(":")[0] == EIP1, "hairpin"
    assert tcp_get(lab, "vm2", EIP1, 8888).split(":")[0] == EIP2, "hairpin from a VM with a FIP: its FIP"
    on_net1 = {(r.dst, r.gateway) for r in routes(lab, "gw") if r.dev == "net1"}
    assert {("10.55.0.0/16", "172.20.10.1"), ("10.56.0.0/16", "172.20.10.1")} <= on_net1


def restart_natgwd(gateway: Gateway, *, files_kept: bool) -> None:
    """kill -9 of natgwd and a new one in the same network namespace; without the files
    (state, journal, lock, applied record) when the container restarts."""
    gateway.natgwd.stop(signal.SIGKILL)
    if not files_kept:
        for path in gateway.state_path.parent.glob(f"{gateway.state_path.name}*"):
            path.unlink()
        gateway.lab.applied_state_path.unlink(missing_ok=True)
    gateway.restart()


def test_controller_replays_across_restarts_and_pod_recreation(gateway: Gateway) -> None:
    """Guards against the drop-in failing kube-ovn-controller's call sequences (exact
    strings, rules before their EIPs) on a fresh gateway, after a kill -9 of natgwd, after
    a container restart in the same network namespace (the files gone, natgwd's table not:
    `init` must not apply an empty rule set, and a probe every 50 ms must see no failure),
    and after the pod is recreated in a new namespace; and against `subnet-route-del`
    leaving the route the CNI installed."""
    lab = gateway.lab
    for role in ("vm1", "vm2", "vm3"):
        lab.serve(role, tcp=[80], tag=role)

    # 1. A fresh gateway (the fixture's natgwd and `init` already ran).
    replay(gateway)
    assert_gateway_works(gateway)

    # 2. kill -9 of natgwd, its files kept: the state is re-applied, nothing changes.
    restart_natgwd(gateway, files_kept=True)
    calls = replay(gateway)
    assert all("natgwd: nothing to change" in c.out for c in calls if not c.out.startswith("get-")), calls
    assert_gateway_works(gateway)
    assert_nothing_changed(gateway.natgwd, "after kill -9 and the replay")

    # 3. The container restarts in the same network namespace: no files, the table stays.
    probes = [
        prober(lab, "vm3", EXTERNAL_HOST, UPSTREAM_PORT, "snat"),
        prober(lab, "ext", EIP1, 8888, "dnat"),
        prober(lab, "ext", EIP2, 80, "fip"),
    ]
    started = time.time()
    try:
        restart_natgwd(gateway, files_kept=False)
        init, *rest = replay(gateway)
        assert "took over natgwd's rules from the kernel (3 eips, 1 snat, 3 dnat, 1 fip)" in init.err, init
        assert all("natgwd: nothing to change" in c.out for c in rest if not c.out.startswith("get-")), rest
        assert_gateway_works(gateway)
        ended = time.time()
    finally:
        for probe in probes:
            kill_process(probe.process)
    assert_nothing_changed(gateway.natgwd, "after a container restart and the replay")
    expected = {"snat": f"{EIP1}:", "dnat": "@vm1", "fip": "@vm2"}
    for probe in probes:
        during = [(ok, answer) for when, ok, answer in probe.results() if started <= when <= ended]
        assert len(during) >= 5, f"{probe.name}: too few probes ({len(during)})"
        wrong = [r for r in during if not r[0] or expected[probe.name] not in r[1]]
        assert wrong == [], f"{probe.name}: {len(wrong)} of {len(during)} probes failed: {wrong[:5]}"
        print(f"container restart: {probe.name} probe {len(during)} requests in {ended - started:.1f}s, no failure")

    # 4. The pod is recreated: a new network namespace, configured by the CNI, no files.
    gateway.natgwd.stop(signal.SIGKILL)
    lab.recreate_gateway()
    configure_like_the_cni(lab)
    restart_natgwd(gateway, files_kept=False)
    init, *_ = replay(gateway)
    assert "took over" not in init.err
    assert_gateway_works(gateway)

    # Routes: the controller's delete removes natgwd's route and the CNI's (proto boot).
    gateway.ok("subnet-route-del", "10.56.0.0/16")
    gateway.ok("subnet-route-del", "10.55.0.0/16")
    assert not {r.dst for r in routes(lab, "gw")} & {"10.55.0.0/16", "10.56.0.0/16"}
    missing = gateway.shim("subnet-route-del", "10.55.0.0/16")
    assert missing.code == 2 and "no route to 10.55.0.0/16 on net1" in missing.err, missing
    assert gateway.source_seen("vm3") == EIP1


# Older controllers, primary-CNI mode (interfaces eth0 and net1, no GATEWAY_V4), as their
# sources build the calls: v1.12 routes through `init` and `ext-subnet-route-add` and gives
# `eip-add` the gateway; v1.13 and v1.14 leave the routes to the CNI and send a bare `init`.
OLDER_CONTROLLERS = {
    "v1.12": (
        False,
        (
            ("init", "10.96.0.0/12,172.20.10.1"),
            ("ext-subnet-route-add", f"10.115.48.0/21,{EXTERNAL_HOST}"),
            ("subnet-route-add", "10.55.0.0/16,172.20.10.1"),
            ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),
            ("dnat-add", f"{EIP1},8888,tcp,{VM1},80"),
            ("floating-ip-add", f"{EIP2},{VM2}"),
            ("eip-add", f"{EIP1}/21,{EXTERNAL_HOST}"),
            ("eip-add", f"{EIP2}/21,{EXTERNAL_HOST}"),
        ),
    ),
    "v1.13-v1.14": (
        True,
        (
            ("init",),
            ("subnet-route-add", "10.55.0.0/16,172.20.10.1"),
            ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),
            ("dnat-add", f"{EIP1},8888,tcp,{VM1},80"),
            ("floating-ip-add", f"{EIP2},{VM2}"),
            ("eip-add", f"{EIP1}/21"),
            ("eip-add", f"{EIP2}/21"),
        ),
    ),
}


@pytest.mark.parametrize("version", sorted(OLDER_CONTROLLERS))
def test_older_controllers_drive_the_gateway(lab: Lab, tmp_path: Path, version: str) -> None:
    """Guards against the drop-in refusing what released controllers since v1.12 send (the
    shim exited 1 on v1.12's `init CIDR,NEXTHOP`, `ext-subnet-route-add` and `eip-add
    IP/PREFIX,GATEWAY`, so no route was ever installed)."""
    cni_routes, calls = OLDER_CONTROLLERS[version]
    for old, new in (("net1", "eth0"), ("net2", "net1")):
        lab.exec("gw", "ip", "link", "set", old, "name", new)
    configure_like_the_cni(lab, vpc="eth0", ext="net1", routes=cni_routes)
    for role in ("vm1", "vm2"):
        lab.serve(role, tcp=[80], tag=role)
    lab.serve("ext", tcp=[UPSTREAM_PORT])
    gateway = Gateway(lab, start_natgwd(lab, tmp_path / "state.json", "endpoint"), tmp_path / "state.json", "")
    for call in calls:
        gateway.ok(*call)
    on_gateway = {(r.dst, r.gateway, r.dev) for r in routes(lab, "gw")}
    assert ("10.55.0.0/16", "172.20.10.1", "eth0") in on_gateway
    assert ("default", EXTERNAL_HOST, "net1") in on_gateway
    if version == "v1.12":
        assert ("10.96.0.0/12", "172.20.10.1", "eth0") in on_gateway
    assert gateway.source_seen("vm3") == EIP1
    assert gateway.source_seen("vm2") == EIP2
    assert tcp_get(lab, "ext", EIP1, 8888).endswith("@vm1")
    assert tcp_get(lab, "ext", EIP2, 80).endswith("@vm2")
    # Their deletes carry the whole rule.
    gateway.ok("dnat-del", f"{EIP1},8888,tcp,{VM1},80")
    gateway.ok("floating-ip-del", f"{EIP2},{VM2}")
    assert tcp_get(lab, "ext", EIP1, 8888) == ""
    assert tcp_get(lab, "ext", EIP2, 80) == ""


# --- QoS in the controller's replay (handleInitVpcNatGw) -------------------------------------


def htb_rates(lab: Lab, device: str) -> list[str]:
    """The rates of natgwd's HTB classes on a device, without the default class."""
    out = lab.exec("gw", "tc", "class", "show", "dev", device).stdout
    return sorted(line.split(" rate ")[1].split()[0] for line in out.splitlines() if "4e47:fffe" not in line)


def test_replay_with_qos_calls_brings_back_every_rule_and_limit(gateway: Gateway) -> None:
    """Guards against the controller's replay stopping at its first QoS call (it returns
    before queueing the rule replays when one fails): after `init`, the QoS calls come
    first, even before the EIPs' eip-add, then the EIPs and the rules; every call must
    succeed, and every rule and limit must work."""
    lab = gateway.lab
    lab.serve("vm1", tcp=[80], tag="vm1")
    lab.serve("vm2", tcp=[80], tag="vm2")
    iperf_server(lab, "vm1", 5201)
    replay = [
        ("eip-ingress-qos-add", f"{EIP1},1,10,1"),
        ("eip-egress-qos-add", f"{EIP1},1,20,1"),
        ("eip-ingress-qos-add", f"{EIP2},1,8,1"),
        ("qos-add", "egress,net2,2,u32,ip,dst,10.115.60.0/24,40,1"),
        ("eip-add", f"{EIP1}/21"),
        ("eip-add", f"{EIP2}/21"),
        ("floating-ip-add", f"{EIP2},{VM2}"),
        ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),
        ("dnat-add", f"{EIP1},8888,tcp,{VM1},80"),
        ("dnat-add", f"{EIP1},5201,tcp,{VM1},5201"),
    ]
    for call in replay:
        gateway.ok(*call)
    assert tcp_get(lab, "ext", EIP1, 8888).endswith("@vm1")
    assert tcp_get(lab, "ext", EIP2, 80).endswith("@vm2")
    assert gateway.source_seen("vm1") == EIP1
    assert gateway.source_seen("vm2") == EIP2
    assert htb_rates(lab, "ifb-net2") == ["10Mbit", "8Mbit"]
    assert htb_rates(lab, "net2") == ["20Mbit", "40Mbit"]
    assert_shaped(iperf(lab, "ext", EIP1, 5201), 10, "ingress of the DNAT EIP after the replay")

    # The controller replays again (another restart of its own): nothing changes.
    before = gateway.state()
    for call in replay:
        assert "nothing to change" in gateway.ok(*call).out, call
    assert gateway.state() == before


# --- the edit endpoint: what a call that returned 0 survives, and who may call ---------------


def test_accepted_calls_survive_kill_9_and_a_wrong_token_changes_nothing(gateway: Gateway) -> None:
    """Guards against the edit endpoint losing an answered call: calls land in natgwd's edit
    log, not in the state file; after a kill -9 (the log not yet folded into the file) the
    next natgwd applies every accepted rule with no call replayed, and traffic says so. A
    caller with the wrong token is refused and changes nothing."""
    lab = gateway.lab
    for role in ("vm1", "vm2"):
        lab.serve(role, tcp=[80], tag=role)
    gateway.restart("--edit-fold-after", "600")  # a slow machine's pause between calls must not fold the log
    file_before = gateway.state_path.read_bytes()
    gateway.ok("eip-add", f"{EIP1}/21")
    gateway.ok("eip-add", f"{EIP2}/21")
    gateway.ok("snat-add", f"{EIP1},172.20.10.0/24,--random-fully")
    gateway.ok("floating-ip-add", f"{EIP2},{VM2}")
    for port in range(8000, 8010):
        gateway.ok("dnat-add", f"{EIP1},{port},tcp,{VM1},80")
    gateway.ok("dnat-del", f"{EIP1},8005,tcp")
    wanted = gateway.state()
    assert sorted(d["externalPort"] for d in wanted["dnat"]) == [str(p) for p in range(8000, 8010) if p != 8005]
    assert tcp_get(lab, "ext", EIP1, 8003).endswith("@vm1")

    gateway.natgwd.stop(signal.SIGKILL)
    assert gateway.state_path.read_bytes() == file_before, "the calls were folded into the file: the test proves less"
    gateway.restart()
    wait_for(lambda: gateway.natgwd.get("/readyz")[0] == 200, "natgwd ready after kill -9")
    assert gateway.state() == wanted
    assert gateway.source_seen("vm1") == EIP1, "SNAT after the restart"
    assert gateway.source_seen("vm2") == EIP2, "FIP after the restart"
    assert tcp_get(lab, "ext", EIP1, 8009).endswith("@vm1"), "DNAT after the restart"
    assert tcp_get(lab, "ext", EIP1, 8005) == "", "the deleted DNAT stays deleted"
    assert "natgwd: nothing to change" in gateway.ok("dnat-add", f"{EIP1},8009,tcp,{VM1},80").out

    token_file = gateway.state_path.with_name("edit.token")
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    port = token_file.read_text().split()[0]
    forged = gateway.state_path.with_name("forged.token")
    forged.write_text(f"{port} {'0' * 64}\n")
    result = lab.exec(
        "gw",
        "env",
        f"NATGWD_EDIT_TOKEN={forged}",
        f"PATH={os.environ['PATH']}",
        "bash",
        str(SCRIPT),
        "dnat-add",
        f"{EIP1},7000,tcp,{VM1},80",
        check=False,
    )
    assert (result.returncode, result.stderr) == (1, "natgwd: refused: wrong token\n")
    assert gateway.state() == wanted
    assert tcp_get(lab, "ext", EIP1, 7000) == ""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own, unmounted afterwards (also when the test fails)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "natgwd-test", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def fill(disk: Path) -> Path:
    """Take every free block of the disk; the file to delete to free them again."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler


def test_a_call_exits_0_only_once_recorded_even_on_a_full_disk(lab: Lab, small_disk: Path) -> None:
    """Guards against answered calls lost to a full disk: a call whose edit-log line does not
    fit exits 1 and is undone (its line not left cut short), so the controller's retry
    applies it; after kill -9 and a restart, every call that exited 0 is applied."""
    with initialized(lab, small_disk / "state.json", "endpoint", "--edit-fold-after", "600") as gateway:
        for role in ("vm1", "vm2"):
            lab.serve(role, tcp=[80], tag=role)
        gateway.ok("eip-add", f"{EIP1}/21")
        filler = fill(small_disk)
        answered, failed = [], []
        for port in range(8000, 8100):  # a few lines fill what is left of the log's last block
            call = gateway.shim("dnat-add", f"{EIP1},{port},tcp,{VM1},80")
            (answered if call.code == 0 else failed).append(port)
            if call.code:
                assert "No space left on device" in call.err, call
            if len(failed) == 3:
                break
        assert answered and failed == [answered[-1] + 1, answered[-1] + 2, answered[-1] + 3]
        assert tcp_get(lab, "ext", EIP1, failed[0]) == "", "a call that exited 1 is not applied"
        assert tcp_get(lab, "ext", EIP1, answered[-1]).endswith("@vm1")

        filler.unlink()
        for port in failed:  # the controller retries: applied now, not "nothing to change"
            assert gateway.ok("dnat-add", f"{EIP1},{port},tcp,{VM2},80").out.splitlines()[-1] == "natgwd: applied"
        gateway.ok("dnat-add", f"{EIP1},9000,tcp,{VM1},80")

        gateway.restart()
        wait_for(lambda: gateway.natgwd.get("/readyz")[0] == 200, "natgwd ready after kill -9")
        ports = sorted(int(rule["externalPort"]) for rule in gateway.state()["dnat"])
        assert ports == sorted([*answered, *failed, 9000])
        assert tcp_get(lab, "ext", EIP1, answered[-1]).endswith("@vm1"), "answered before the disk was full"
        assert tcp_get(lab, "ext", EIP1, failed[-1]).endswith("@vm2"), "answered on the retry"
        assert tcp_get(lab, "ext", EIP1, 9000).endswith("@vm1"), "answered after"


def test_the_applied_sha256_follows_the_calls(gateway: Gateway) -> None:
    """Guards against a stale applied sha256: /readyz (and the HA peer check) must tell two
    gateways apart whose calls differ, before the calls are folded into the file and after;
    and no log line names an empty sha256 (the first apply, from `init`)."""
    assert '"sha256": ""' not in gateway.natgwd.log()
    gateway.restart("--edit-fold-after", "600")
    wait_for(lambda: gateway.natgwd.get("/readyz")[0] == 200, "natgwd ready after kill -9")
    before = gateway.applied()
    assert before == hashlib.sha256(gateway.state_path.read_bytes()).hexdigest()
    gateway.ok("eip-add", f"{EIP1}/21")
    gateway.ok("dnat-add", f"{EIP1},8000,tcp,{VM1},80")
    effective = gateway.applied()
    assert effective != before
    assert effective == hashlib.sha256(document_bytes(gateway.state())).hexdigest(), "the bytes the fold writes"
    gateway.restart()  # folds the log into the file: the same state, the same sha256
    wait_for(lambda: gateway.natgwd.get("/readyz")[0] == 200, "natgwd ready after kill -9")
    gateway.assert_applied_is_the_file()
    assert gateway.applied() == effective
    assert '"sha256": ""' not in gateway.natgwd.log()
