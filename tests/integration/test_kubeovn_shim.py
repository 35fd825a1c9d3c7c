"""The drop-in nat-gateway.sh (natgwd.shim) driving a real natgwd in the seed topology,
the way kube-ovn-controller drives Kube-OVN's script: one exec per rule, inside the gateway
namespace, each call returning once natgwd has applied it. Ports the scenarios of
Kube-OVN's test/e2e/iptables-vpc-nat-gw that apply to the data plane (reference section
3.1), with real traffic instead of iptables-save greps.

The gateway namespace first gets what Kube-OVN's CNI gives the pod (addresses on net1 and
net2, the VPC routes and the default route from the routes annotations); natgwd starts
with no state file, and `init net1,net2` builds it from the interfaces, as the controller's
first exec does. Traffic stays between the lab's namespaces.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab import EXTERNAL_HOST, Lab, Natgwd
from natgwd.validation import InvalidStateError, load_state
from tests.integration.helpers import addresses, tcp_get
from tests.integration.qos_helpers import assert_shaped, iperf, iperf_server

EIP1, EIP2, EIP3 = "10.115.55.200", "10.115.55.201", "10.115.55.202"
VM1, VM2, VM3 = "172.20.10.2", "172.20.10.3", "172.20.10.4"
UPSTREAM_PORT = 8080  # a server in "ext", the internet: it answers with the source it saw
SHIM_TIMEOUT = "30"


@dataclass(frozen=True)
class Call:
    code: int
    out: str
    err: str


@dataclass
class Gateway:
    lab: Lab
    natgwd: Natgwd
    state_path: Path

    def shim(self, *args: str, timeout: str = SHIM_TIMEOUT) -> Call:
        """`nat-gateway.sh ARGS...` in the gateway namespace, as the controller execs it."""
        env = [
            f"NATGWD_STATE={self.state_path}",
            f"NATGWD_APPLIED_STATE={self.lab.applied_state_path}",
            f"NATGWD_SHIM_TIMEOUT={timeout}",
            f"GATEWAY_V4={EXTERNAL_HOST}",
        ]
        result = self.lab.exec(
            "gw", "env", *env, sys.executable, "-m", "natgwd.shim", *args, check=False, timeout=float(timeout) + 30
        )
        return Call(result.returncode, result.stdout, result.stderr)

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
        loaded: dict[str, Any] = json.loads(self.state_path.read_bytes())
        return loaded

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
        script = (
            "import socket,json\n"
            "out=[]\n"
            f"for _ in range({count}):\n"
            "    try:\n"
            f"        s=socket.create_connection(({address!r},{port}),timeout=2)\n"
            "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
            "        data=b''\n"
            "        while chunk:=s.recv(4096): data+=chunk\n"
            "        s.close()\n"
            "        out.append(data.split(b'\\r\\n\\r\\n',1)[-1].decode())\n"
            "    except OSError:\n"
            "        out.append('')\n"
            "print(json.dumps(out))\n"
        )
        result = self.lab.exec(role, sys.executable, "-c", script, timeout=count * 3 + 10)
        return list(json.loads(result.stdout))


def configure_like_the_cni(lab: Lab) -> None:
    """What Kube-OVN's CNI sets up in the gateway pod before any exec (seed document): the
    interfaces' addresses, the internal provider's routes annotation and the external
    provider's default route."""
    for command in (
        ("ip", "link", "set", "net1", "up"),
        ("ip", "link", "set", "net2", "up"),
        ("ip", "addr", "add", "172.20.10.254/24", "dev", "net1"),
        ("ip", "addr", "add", "10.115.48.1/21", "dev", "net2"),
        ("ip", "route", "add", "10.55.0.0/16", "via", "172.20.10.1", "dev", "net1"),
        ("ip", "route", "add", "default", "via", EXTERNAL_HOST, "dev", "net2"),
    ):
        lab.exec("gw", *command)


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    configure_like_the_cni(lab)
    state_path = tmp_path / "state.json"
    daemon = lab.start_natgwd(None, state_path=state_path)
    gw = Gateway(lab, daemon, state_path)
    lab.serve("ext", tcp=[UPSTREAM_PORT])
    try:
        init = gw.ok("init", "net1,net2")
        assert init.out.splitlines()[0] == "init net1,net2"
        yield gw
    finally:
        daemon.stop()
        print(daemon.log()[-4000:])
        shutil.rmtree(lab.workdir, ignore_errors=True)


def share_supported() -> bool:
    """Whether this natgwd takes share DNAT rules (the format extension)."""
    state = {
        "version": 1,
        "internal": {"interface": "net1", "addresses": ["172.20.10.254/24"]},
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"]},
        "eips": [{"name": "e", "v4ip": EIP1}],
        "dnat": [
            {"name": f"d{i}", "eip": "e", "protocol": "tcp", "externalPort": "80", "internalIp": ip}
            | {"internalPort": "80", "type": "share"}
            for i, ip in enumerate((VM1, VM2))
        ],
    }
    try:
        load_state(json.dumps(state).encode())
    except InvalidStateError:
        return False
    return True


needs_share = pytest.mark.xfail(
    not share_supported(), reason='natgwd does not take share DNAT rules ("type": "share") yet', strict=True
)


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
    assert gateway.applied() == hashlib.sha256(gateway.state_path.read_bytes()).hexdigest()
    assert "nothing to change" in gateway.ok("init", "net1,net2").out
    gateway.refused("init", "net1,net9", match="External interface 'net9' not found")


# --- [2] EIP, FIP, SNAT, DNAT; shared EIP; hairpin; cleanup -------------------------------


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
    before = gateway.state_path.read_bytes()
    for args in (
        ("floating-ip-add", f"{EIP2},{VM2}"),
        ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),
        ("dnat-add", f"{EIP1},8888,tcp,{VM1},80"),
        ("eip-add", f"{EIP1}/21"),
    ):
        assert "nothing to change" in gateway.ok(*args).out
    assert gateway.state_path.read_bytes() == before

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
    assert gateway.applied() == hashlib.sha256(gateway.state_path.read_bytes()).hexdigest()


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


@needs_share
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


def test_50_concurrent_calls_are_all_applied(gateway: Gateway) -> None:
    lab = gateway.lab
    lab.serve("vm1", tcp=[80], tag="vm1")
    gateway.ok("eip-add", f"{EIP1}/21")
    ports = list(range(20000, 20050))
    with ThreadPoolExecutor(50) as pool:
        calls = list(pool.map(lambda port: gateway.shim("dnat-add", f"{EIP1},{port},tcp,{VM1},80"), ports))
    assert [c.code for c in calls] == [0] * 50, [c.err for c in calls if c.code]
    assert sorted(int(d["externalPort"]) for d in gateway.state()["dnat"]) == ports
    assert gateway.applied() == hashlib.sha256(gateway.state_path.read_bytes()).hexdigest()
    for port in (ports[0], ports[24], ports[-1]):
        assert tcp_get(lab, "ext", EIP1, port).endswith("@vm1"), port


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
    before = gateway.state_path.read_bytes()
    for call in replay:
        assert "nothing to change" in gateway.ok(*call).out, call
    assert gateway.state_path.read_bytes() == before
