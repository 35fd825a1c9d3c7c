"""lb-svc.sh on natgwd (natgwd.kubeovn.shim.lbsvc) through the file protocol: the calls
kube-ovn-controller makes in a LoadBalancer Service's pod (pkg/controller/service_lb.go),
as the edits they make, the replays that change nothing, and the refusals that change
nothing. The traffic test is tests/integration/test_kubeovn_lbsvc.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.kubeovn.shim.lbsvc import USAGE
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeLinks
from tests.unit.test_shim import Applier, Gateway

ROOT = Path(__file__).resolve().parents[2]
LB_IP, ATTACH_GATEWAY = "10.115.55.200", "10.115.55.254"
CLUSTER_IP, POD_GATEWAY = "10.96.0.10", "172.20.10.1"
# The controller's strings (updatePodAttachNets, delDnatRules) for a Service with port 80/tcp
# (targetPort 8080) and 53/udp (targetPort 5353).
EIP_ADD = f"{LB_IP}/21,{ATTACH_GATEWAY}"
DNAT_TCP = f"{LB_IP},80,tcp,{CLUSTER_IP},8080,{POD_GATEWAY}"
DNAT_UDP = f"{LB_IP},53,udp,{CLUSTER_IP},5353,{POD_GATEWAY}"
DNAT_TCP_DEL = f"{LB_IP},80,tcp,{CLUSTER_IP},8080"


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Gateway]:
    """A lb-svc pod as the CNI leaves it: eth0 on the pod network (default route via its
    gateway), net1 on the attachment network with the load-balancer IP. No GATEWAY_V4: the
    controller sets no environment in this pod."""
    env = {
        "NATGWD_STATE": str(tmp_path / "etc" / "state.json"),
        "NATGWD_APPLIED_STATE": str(tmp_path / "lib" / "applied.json"),
        "NATGWD_SHIM_TIMEOUT": "10",
        "NATGWD_EDIT_TOKEN": str(tmp_path / "lib" / "edit.token"),  # none: the file protocol
    }
    (tmp_path / "lib").mkdir()
    links = FakeLinks(
        links={"eth0": (["172.20.10.20/24"], [("0.0.0.0/0", POD_GATEWAY)]), "net1": ([f"{LB_IP}/21"], [])}
    )
    applier = Applier(Path(env["NATGWD_STATE"]), Path(env["NATGWD_APPLIED_STATE"]))
    applier.start()
    yield Gateway(tmp_path, env, applier, links)
    applier.stop()


def lb(pod: Gateway, *argv: str) -> list[str]:
    """An accepted lb-svc.sh call; its stdout lines."""
    return pod.ok("lb-svc", *argv).out.splitlines()


def test_the_controllers_calls_make_the_lb_state(pod: Gateway) -> None:
    assert lb(pod, "init")[0] == "init "
    assert lb(pod, "eip-add", EIP_ADD)[0] == f"eip-add {EIP_ADD}"
    lb(pod, "dnat-add", DNAT_TCP)
    lb(pod, "dnat-add", DNAT_UDP)
    eip = "eip-10-115-55-200"
    assert pod.state() == {
        "version": 1,
        "internal": {
            "interface": "eth0",
            "addresses": ["172.20.10.20/24"],
            "masquerade": True,
            "routes": [{"dst": f"{CLUSTER_IP}/32", "via": POD_GATEWAY}],
        },
        "external": {
            "interface": "net1",
            "addresses": [f"{LB_IP}/21"],
            "gateway": ATTACH_GATEWAY,
            "defaultRoute": "forwarded",
        },
        "eips": [{"name": eip, "v4ip": LB_IP}],
        "dnat": [
            {
                "name": "dnat-10-115-55-200-tcp-80",
                "eip": eip,
                "protocol": "tcp",
                "externalPort": "80",
                "internalIp": CLUSTER_IP,
                "internalPort": "8080",
            },
            {
                "name": "dnat-10-115-55-200-udp-53",
                "eip": eip,
                "protocol": "udp",
                "externalPort": "53",
                "internalIp": CLUSTER_IP,
                "internalPort": "5353",
            },
        ],
    }
    load_state(pod.raw())
    # The pod's restart or a Service update replays every call: nothing changes.
    before = pod.raw()
    for argv in (("init",), ("eip-add", EIP_ADD), ("dnat-add", DNAT_TCP), ("dnat-add", DNAT_UDP)):
        assert "nothing to change" in pod.ok("lb-svc", *argv).out
    assert pod.raw() == before


def test_dnat_del_removes_the_rule_with_that_target_only(pod: Gateway) -> None:
    for argv in (("init",), ("eip-add", EIP_ADD), ("dnat-add", DNAT_TCP), ("dnat-add", DNAT_UDP)):
        lb(pod, *argv)
    other = pod.ok("lb-svc", "dnat-del", f"{LB_IP},80,tcp,{CLUSTER_IP},9999")
    assert "goes to 10.96.0.10:8080, not 10.96.0.10:9999: kept" in other.err
    assert len(pod.state()["dnat"]) == 2
    lb(pod, "dnat-del", DNAT_TCP_DEL)
    assert [d["protocol"] for d in pod.state()["dnat"]] == ["udp"]
    # The cluster IP's route stays, as the script's: the other port still uses it.
    assert pod.state()["internal"]["routes"] == [{"dst": f"{CLUSTER_IP}/32", "via": POD_GATEWAY}]
    assert "nothing to change" in pod.ok("lb-svc", "dnat-del", DNAT_TCP_DEL).out
    # A new port after the deletion (a Service update: dnat-del of the old, then every port).
    lb(pod, "dnat-add", f"{LB_IP},8081,tcp,{CLUSTER_IP},8080,{POD_GATEWAY}")
    load_state(pod.raw())


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (("init", "eth0,net1"), "lb-svc.sh init takes no arguments"),
        (("eip-add", f"{LB_IP}/21"), "expected LB_IP/PREFIX,GATEWAY"),
        (("eip-add", f"{LB_IP}/21,gw"), "gateway 'gw' is not an IPv4 address"),
        (("dnat-add", f"{LB_IP},80,tcp,{CLUSTER_IP},8080"), "expected LB_IP,PORT,PROTOCOL,CLUSTER_IP,TARGET_PORT"),
        (("dnat-add", f"{LB_IP},80,sctp,{CLUSTER_IP},8080,{POD_GATEWAY}"), "tcp and udp, not sctp"),
        (("dnat-add", f"{LB_IP},80,tcp,{CLUSTER_IP},http,{POD_GATEWAY}"), "target port 'http' is not a port"),
        (("dnat-add", f"{LB_IP},80,tcp,{CLUSTER_IP},8080,gw"), "nexthop 'gw' is not an IPv4 address"),
        (("dnat-add", f"{LB_IP},80,tcp,fd00::a,8080,{POD_GATEWAY}"), "IPv6 is not supported"),
        (("dnat-del", f"{LB_IP},80,tcp"), "expected LB_IP,PORT,PROTOCOL,CLUSTER_IP,TARGET_PORT"),
        (("dnat-add", f"{LB_IP},80,tcp,{CLUSTER_IP},8080,10.99.0.1"), "is not in the subnet of any internal address"),
        (("snat-add", f"{LB_IP},172.20.10.0/24"), "unknown command 'snat-add'"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(pod: Gateway, argv: tuple[str, ...], match: str) -> None:
    lb(pod, "init")
    lb(pod, "eip-add", EIP_ADD)
    pod.fails("lb-svc", *argv, match=match)


def test_a_rule_before_init_help_and_usage(pod: Gateway) -> None:
    pod.fails("lb-svc", "dnat-add", DNAT_TCP, match="not initialized")
    assert not pod.state_path.exists()
    assert pod.ok("lb-svc", "help").out == USAGE + "\n"
    assert pod.call("lb-svc").code == 1
    assert pod.call("lb-svc", "get-iptables-version").code == 1  # nat-gateway.sh's only
    unknown = pod.call("lb-svc", "eip-del", LB_IP)
    assert (unknown.code, unknown.err) == (1, f"natgwd: unknown command 'eip-del'\n{USAGE}\n")


def test_the_image_script_is_nat_gateway_sh_with_lb_svc_first(pod: Gateway) -> None:
    """image/lb-svc.sh runs the nat-gateway.sh beside it, wherever both are installed."""
    script = ROOT / "image" / "lb-svc.sh"
    assert os.access(script, os.X_OK)
    env = {**os.environ, **pod.env, "NATGWD_PYTHON": sys.executable}
    lb(pod, "init")
    result = subprocess.run(["bash", str(script), "eip-add", EIP_ADD], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"eip-add {EIP_ADD}"
    result = subprocess.run(["bash", str(script), "dnat-add", "x"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "expected LB_IP,PORT" in result.stderr
