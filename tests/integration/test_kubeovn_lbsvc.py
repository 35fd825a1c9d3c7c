"""lb-svc.sh on natgwd, driven as kube-ovn-controller drives a LoadBalancer Service's pod
(pkg/controller/service_lb.go: updatePodAttachNets, delDnatRules), with real traffic.

The lab's gateway namespace plays the lb-svc pod: its links are renamed to what the pod
has, eth0 on the pod network (the lab's LAN: 172.20.10.20/24, default route via the
network's router "lan", 172.20.10.1) and net1 on the Service's attachment network (the
external segment: the load-balancer IP 10.115.55.200/21, from the attachment's IPAM). The
Service's cluster IP 10.96.0.10 lives on vm1, behind "lan", which routes to it. vm1's
default route leads nowhere (172.20.10.254 is nobody): a backend answers a client outside
only when natgwd gives the connection the pod's eth0 address, as the script's MASQUERADE
does. The client in "ext" connects from 198.18.0.1, beyond the attachment's gateway: the
answer needs a default route via net1 for forwarded packets, while the pod's own keep the
CNI's via eth0.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.lab.topology import EXTERNAL_HOST, REMOTE_HOST, Lab
from tests.integration.helpers import tcp_get, wait_listening
from tests.integration.test_kubeovn_shim import Gateway, restart_natgwd, start_natgwd

SCRIPT = Path(__file__).resolve().parents[2] / "image" / "lb-svc.sh"
POD_IP, POD_GATEWAY = "172.20.10.20", "172.20.10.1"
LB_IP, ATTACH_GATEWAY = "10.115.55.200", EXTERNAL_HOST
CLUSTER_IP, BACKEND = "10.96.0.10", "172.20.10.2"

# The controller's strings for a Service with ports 80/tcp (targetPort 8080) and 53/udp
# (targetPort 5353): `init`, `eip-add`, then one `dnat-add` per port, each exec'd alone.
CREATE = (
    ("init",),
    ("eip-add", f"{LB_IP}/21,{ATTACH_GATEWAY}"),
    ("dnat-add", f"{LB_IP},80,tcp,{CLUSTER_IP},8080,{POD_GATEWAY}"),
    ("dnat-add", f"{LB_IP},53,udp,{CLUSTER_IP},5353,{POD_GATEWAY}"),
)
# The Service's port 80 becomes 8081: delDnatRules for the old port, then every port again.
UPDATE = (
    ("dnat-del", f"{LB_IP},80,tcp,{CLUSTER_IP},8080"),
    ("init",),
    ("eip-add", f"{LB_IP}/21,{ATTACH_GATEWAY}"),
    ("dnat-add", f"{LB_IP},8081,tcp,{CLUSTER_IP},8080,{POD_GATEWAY}"),
    ("dnat-add", f"{LB_IP},53,udp,{CLUSTER_IP},5353,{POD_GATEWAY}"),
)

UDP_ECHO = (
    "import socket\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    f"s.bind(({CLUSTER_IP!r},5353))\n"
    "while True:\n"
    "    d,a=s.recvfrom(2048)\n"
    "    s.sendto(f'{a[0]}:{a[1]}'.encode(),a)\n"
)


def as_the_cni_leaves_the_lb_svc_pod(lab: Lab) -> None:
    for role, command in (
        ("gw", "ip link set net1 name eth0"),
        ("gw", "ip link set net2 name net1"),
        ("gw", "ip link set eth0 up"),
        ("gw", f"ip addr add {POD_IP}/24 dev eth0"),
        ("gw", f"ip route add default via {POD_GATEWAY} dev eth0"),
        ("gw", "ip link set net1 up"),
        ("gw", f"ip addr add {LB_IP}/21 dev net1"),
        # The pod network's router reaches the cluster IP (OVN's load balancer, here vm1).
        ("lan", "sysctl -qw net.ipv4.ip_forward=1"),
        ("lan", f"ip route add {CLUSTER_IP}/32 via {BACKEND}"),
        ("vm1", f"ip addr add {CLUSTER_IP}/32 dev lo"),
        # The client is beyond the attachment network's gateway.
        ("ext", f"ip addr add {REMOTE_HOST}/32 dev lo"),
        ("ext", f"ip route replace 10.115.48.0/21 dev eth0 proto kernel scope link src {REMOTE_HOST}"),
    ):
        lab.exec(role, *command.split())


@pytest.fixture
def pod(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    as_the_cni_leaves_the_lb_svc_pod(lab)
    lab.serve("vm1", tcp=[8080], tag="vm1")
    lab.spawn("vm1", sys.executable, "-c", UDP_ECHO)
    wait_listening(lab, "vm1", "udp", 5353)
    state_path = tmp_path / "state.json"
    # No GATEWAY_V4: the controller sets no environment in the lb-svc pod.
    gw = Gateway(lab, start_natgwd(lab, state_path, "endpoint"), state_path, gateway_v4="", script=SCRIPT)
    try:
        yield gw
    finally:
        gw.natgwd.stop()
        print(gw.natgwd.log()[-4000:])
        shutil.rmtree(lab.workdir, ignore_errors=True)


def route_via(pod: Gateway, *selector: str) -> tuple[str, str]:
    """(gateway, device) of the gw namespace's route to the client, for a packet described
    by `selector` (`ip route get` arguments); none for the pod's own packets."""
    found = json.loads(pod.lab.exec("gw", "ip", "-j", "route", "get", REMOTE_HOST, *selector).stdout)[0]
    return found.get("gateway", ""), found["dev"]


def answer(pod: Gateway, port: int) -> str:
    return tcp_get(pod.lab, "ext", LB_IP, port)


def udp_answer(pod: Gateway) -> str:
    return pod.lab.udp_exchange("ext", LB_IP, 53, [b"q"])[0]


def test_the_controllers_calls_serve_the_service_on_its_lb_ip(pod: Gateway) -> None:
    """Guards against lb-svc.sh calls that do not make a working load balancer (the
    backend must answer a client beyond the attachment's gateway, seeing the pod's
    address), against a dnat-del that leaves the port open, and against a replay after a
    kill -9 of natgwd or a container restart that changes anything."""
    for call in CREATE[:2]:
        pod.ok(*call)
    assert answer(pod, 80) == "", "no DNAT yet"
    for call in CREATE[2:]:
        pod.ok(*call)
    # The backend sees the pod's eth0 address (masquerade) and answers it.
    assert answer(pod, 80).startswith(f"{POD_IP}:") and answer(pod, 80).endswith("@vm1")
    assert udp_answer(pod).startswith(f"{POD_IP}:")
    assert pod.state()["internal"]["masquerade"] is True
    # As the script's table 100: forwarded packets (a backend's answer, arriving on eth0)
    # leave via the attachment's gateway; the pod's own keep eth0's default route.
    assert route_via(pod, "from", BACKEND, "iif", "eth0") == (ATTACH_GATEWAY, "net1")
    assert route_via(pod) == (POD_GATEWAY, "eth0")

    # A bad call (an SCTP port): refused, nothing changed.
    before = pod.state()
    refused = pod.refused("dnat-add", f"{LB_IP},9000,sctp,{CLUSTER_IP},9000,{POD_GATEWAY}", match="not sctp")
    assert refused.out == f"dnat-add {LB_IP},9000,sctp,{CLUSTER_IP},9000,{POD_GATEWAY}\n"
    assert pod.state() == before

    # kill -9 of natgwd, then a container restart (its files gone, natgwd's table and
    # routes not): each time the controller replays, and nothing changes.
    for files_kept in (True, False):
        restart_natgwd(pod, files_kept=files_kept)
        assert answer(pod, 80).endswith("@vm1"), "natgwd's table keeps translating"
        init = pod.ok(*CREATE[0])
        if not files_kept:
            assert "took over natgwd's rules from the kernel (1 eips, 2 dnat)" in init.err
        # Before the replay's eip-add: the new state keeps the gateway natgwd had set.
        assert pod.state()["external"]["gateway"] == ATTACH_GATEWAY
        assert answer(pod, 80).endswith("@vm1")
        for call in CREATE[1:]:
            assert "nothing to change" in pod.ok(*call).out, call
        assert answer(pod, 80).endswith("@vm1")
        assert pod.state() == before

    for call in UPDATE:
        pod.ok(*call)
    assert answer(pod, 80) == "", "port 80 after its dnat-del"
    assert answer(pod, 8081).startswith(f"{POD_IP}:")
    assert udp_answer(pod).startswith(f"{POD_IP}:")
    pod.assert_applied_is_the_file()
