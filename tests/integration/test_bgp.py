"""Routed EIPs: natgwd's FRR announces the EIPs to an upstream router running BIRD, over
BGP with BFD, and the upstream reaches them only through those /32 and /128 routes (they
lie in no subnet it is connected to). Real daemons, real traffic, both families."""

from __future__ import annotations

import copy
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from natgwd.lab.topology import EXTERNAL_HOST, EXTERNAL_HOST6, Lab, Natgwd
from tests.integration.bgp_lab import (
    ROUTED,
    Bird,
    Peer,
    frr_run_dir,
    kernel_route,
    routed_state,
    wait_route,
)
from tests.integration.helpers import events_named, host_of, sha256, tcp_get, wait_for

GW, GW6 = "10.115.48.1", "fd00:115::1"
PEERS = [Peer("gw4", EXTERNAL_HOST, GW), Peer("gw6", EXTERNAL_HOST6, GW6)]
# BFD on, but slow enough that a loaded machine's stall does not drop a session (at 100 ms x 3
# one did, in the step that asserts no session flapped); failover speed is test_bgp_ha's.
STEADY_BFD = {"minRx": 1000, "minTx": 1000, "multiplier": 5}
NEIGHBORS = [
    {"address": EXTERNAL_HOST, "remoteAsn": 65000, "bfd": STEADY_BFD},
    {"address": EXTERNAL_HOST6, "remoteAsn": 65000, "bfd": STEADY_BFD},
]
UPSTREAM_PORT = 8080
PEERS_ADDR = (EXTERNAL_HOST, EXTERNAL_HOST6)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(ipv6=True) as built:
        try:
            yield built
        finally:
            # FRR runs in sessions of its own: the lab's process groups do not hold it.
            for pid in built.exec("gw", "ip", "netns", "pids", built.ns("gw"), check=False).stdout.split():
                built.exec("gw", "kill", "-9", pid, check=False)


def start_gateway(lab: Lab, state: dict[str, Any]) -> Natgwd:
    """natgwd started on `state`, once it applied it (ready or not: a neighbour may be down)."""
    daemon = lab.start_natgwd(state, "--bgp-run-dir", str(frr_run_dir(lab, "gw")))
    wanted = sha256(daemon.state_path.read_bytes())
    wait_for(lambda: readiness(daemon)[1].get("applied_sha256") == wanted, "the state applied", timeout=30)
    return daemon


def readiness(daemon: Natgwd) -> tuple[int, dict[str, Any]]:
    status, body = daemon.get("/readyz")
    return status, json.loads(body) if body else {}


def sample(daemon: Natgwd, name: str, **labels: str) -> float | None:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return daemon.metrics().get(key)


def test_routed_eips_snat_dnat_fip_both_families(lab: Lab) -> None:
    bird = Bird(lab, "ext", EXTERNAL_HOST, PEERS)
    for role, port in (("vm1", 80), ("vm2", 80), ("ext", UPSTREAM_PORT)):
        lab.serve(role, tcp=[port])
    prefixes = [address for pair in ROUTED.values() for address in pair]
    assert all(kernel_route(lab, "ext", p) is None for p in prefixes)  # no way there without BGP
    state = routed_state(NEIGHBORS)
    daemon = start_gateway(lab, state)
    run_dir = frr_run_dir(lab, "gw")
    bird.wait_established("gw4", "gw6")
    daemon.wait_ready()
    for v4, v6 in ROUTED.values():
        wait_route(lab, "ext", v4, GW)
        wait_route(lab, "ext", v6, GW6)
    (eip, eip6), (fip, fip6) = ROUTED["my-eip"], ROUTED["my-eip2"]
    for address, client, upstream in ((eip, fip, EXTERNAL_HOST), (eip6, fip6, EXTERNAL_HOST6)):
        # DNAT and FIP inward: the VM sees the upstream's own address.
        assert host_of(tcp_get(lab, "ext", address, 8888)) == upstream
        assert host_of(tcp_get(lab, "ext", client, 80)) == upstream
        # SNAT and FIP outward: the upstream sees the EIPs, and its answers come back by the routes.
        assert host_of(tcp_get(lab, "vm1", upstream, UPSTREAM_PORT)) == address
        assert host_of(tcp_get(lab, "vm2", upstream, UPSTREAM_PORT)) == client
    for neighbor in (EXTERNAL_HOST, EXTERNAL_HOST6):
        wait_for(lambda n=neighbor: sample(daemon, "natgwd_bgp_prefixes_announced", neighbor=n) == 2, "2 sent")  # type: ignore[misc]
        assert sample(daemon, "natgwd_bgp_neighbor_up", neighbor=neighbor) == 1
        assert sample(daemon, "natgwd_bgp_session_state", neighbor=neighbor, state="Established") == 1
        wait_for(lambda n=neighbor: sample(daemon, "natgwd_bgp_bfd_state", neighbor=n, state="up") == 1, "BFD up")  # type: ignore[misc]
    assert sample(daemon, "natgwd_bgp_owned_prefixes", role="owner") == 4
    assert sample(daemon, "natgwd_bgp_unannounced_prefixes") == 0
    status, detail = readiness(daemon)
    assert status == 200
    assert detail["bgp"]["neighbors"][EXTERNAL_HOST] == {"state": "Established", "prefixes_sent": 2, "bfd": "up"}
    assert sorted(detail["bgp"]["announced"]) == sorted(f"{p}/{32 if '.' in p else 128}" for p in prefixes)
    # `natgwd status` shows the sessions, as bgpd has them.
    shown = lab.exec(
        "gw", sys.executable, "-m", "natgwd", "status", "--applied-state", "", "--bgp-run-dir", str(run_dir)
    ).stdout
    assert [line.split()[:5] for line in shown.splitlines() if line.startswith(PEERS_ADDR)] == [
        [EXTERNAL_HOST, "Established", "up", "2", "0"],
        [EXTERNAL_HOST6, "Established", "up", "2", "0"],
    ]
    assert "originated: 198.19.100.10/32, 198.19.100.11/32, fd00:119::10/128, fd00:119::11/128" in shown
    # bgpd listens nowhere (it connects out): natgwd's loopback metrics are the only TCP
    # listener. bfdd's UDP sockets are BFD itself.
    listening = [line.split()[3] for line in lab.exec("gw", "ss", "-Hltn").stdout.splitlines()]
    assert listening == ["127.0.0.1:9469"]

    # bgpd killed: the supervisor starts it again and it announces what it announced.
    bgpd = int((run_dir / "bgpd.pid").read_text())
    lab.exec("gw", "kill", "-9", str(bgpd))
    wait_for(lambda: sample(daemon, "natgwd_bgp_process_restarts_total", process="bgpd") == 1, "bgpd restarted")
    bird.wait_established("gw4", "gw6")
    wait_route(lab, "ext", fip, GW)
    wait_route(lab, "ext", fip6, GW6)
    assert [e["process"] for e in events_named(daemon, "child exited")] == ["bgpd"]

    # An EIP removed: its routes are withdrawn, in place: no session drops.
    for neighbor in PEERS_ADDR:
        wait_for(lambda n=neighbor: sample(daemon, "natgwd_bgp_neighbor_up", neighbor=n) == 1, f"{neighbor} up")  # type: ignore[misc]
    flaps = {n: sample(daemon, "natgwd_bgp_neighbor_last_flap_timestamp_seconds", neighbor=n) for n in PEERS_ADDR}
    smaller = copy.deepcopy(state)
    smaller["eips"] = [e for e in smaller["eips"] if e["name"] != "my-eip2"]
    smaller["fip"] = []
    daemon.write_state(smaller)
    wait_route(lab, "ext", fip, None)
    wait_route(lab, "ext", fip6, None)
    assert kernel_route(lab, "ext", eip) == GW and kernel_route(lab, "ext", eip6) == GW6
    assert host_of(tcp_get(lab, "ext", eip, 8888)) == EXTERNAL_HOST
    for neighbor, flap in flaps.items():
        assert sample(daemon, "natgwd_bgp_neighbor_last_flap_timestamp_seconds", neighbor=neighbor) == flap
    assert [e["added"] for e in events_named(daemon, "BGP announcements changed")][-1] == []

    # SIGTERM: the routes are withdrawn before natgwd is gone.
    assert daemon.stop(signal.SIGTERM) == 0
    assert kernel_route(lab, "ext", eip) is None and kernel_route(lab, "ext", eip6) is None
    events = [e["event"] for e in json_lines(daemon)]
    assert events.index("BGP announcements withdrawn") < events.index("natgwd stopped; the data plane stays in place")


def json_lines(daemon: Natgwd) -> list[dict[str, Any]]:
    found = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def test_a_wrong_asn_or_password_is_reported_and_recovers(lab: Lab) -> None:
    """The IPv4 neighbour expects another AS, then a password natgwd does not have: natgwd
    says so (metrics, /readyz, log) and keeps forwarding what it can (IPv6 through its own
    session); fixed, the session comes back and so do the IPv4 routes."""
    wrong_asn = [Peer("gw4", EXTERNAL_HOST, GW, asn=65099), PEERS[1]]
    bird = Bird(lab, "ext", EXTERNAL_HOST, wrong_asn)
    lab.serve("ext", tcp=[UPSTREAM_PORT])
    (eip, eip6) = ROUTED["my-eip"]
    daemon = start_gateway(lab, routed_state(NEIGHBORS))
    bird.wait_established("gw6")
    wait_route(lab, "ext", eip6, GW6)

    def down_reported() -> str | None:
        status, detail = readiness(daemon)
        neighbor = detail.get("bgp", {}).get("neighbors", {}).get(EXTERNAL_HOST, {})
        return status == 503 and neighbor.get("state") != "Established" and detail.get("reason")

    reason = wait_for(down_reported, "the IPv4 neighbour reported down", timeout=30)
    assert f"owned EIPs not announced: {eip}/32" in reason
    assert sample(daemon, "natgwd_bgp_neighbor_up", neighbor=EXTERNAL_HOST) == 0
    assert sample(daemon, "natgwd_bgp_neighbor_up", neighbor=EXTERNAL_HOST6) == 1
    assert (sample(daemon, "natgwd_bgp_unannounced_prefixes") or 0) >= 1
    wait_for(
        lambda: any(
            (e["neighbor"], e["level"], e["last_error"]) == (EXTERNAL_HOST, "warning", "OPEN Message Error/Bad Peer AS")
            for e in events_named(daemon, "BGP neighbour state")
        ),
        "the wrong AS in natgwd's log",
    )
    # Forwarding goes on: IPv6 SNAT through the session that works.
    assert host_of(tcp_get(lab, "vm1", EXTERNAL_HOST6, UPSTREAM_PORT)) == eip6

    bird.reconfigure(PEERS)
    bird.wait_established("gw4")
    wait_route(lab, "ext", eip, GW)
    daemon.wait_ready(timeout=30)
    assert host_of(tcp_get(lab, "vm1", EXTERNAL_HOST, UPSTREAM_PORT)) == eip

    # A password only the upstream has: TCP MD5 drops natgwd's segments, no session.
    bird.reconfigure([Peer("gw4", EXTERNAL_HOST, GW, password="s3cret"), PEERS[1]])
    wait_for(lambda: readiness(daemon)[0] == 503, "the password mismatch reported", timeout=30)
    wait_route(lab, "ext", eip, None)
    with_password = routed_state(copy.deepcopy(NEIGHBORS))
    with_password["bgp"]["neighbors"][0]["password"] = "s3cret"
    daemon.write_state(with_password)
    bird.wait_established("gw4")
    wait_route(lab, "ext", eip, GW)
    daemon.wait_ready(timeout=30)
    assert host_of(tcp_get(lab, "vm1", EXTERNAL_HOST, UPSTREAM_PORT)) == eip

    # The bgp section removed: the announcements are withdrawn first, then FRR stops, so the
    # upstream drops the routes at once (not when its hold timer or a graceful-restart wait
    # runs out, as when the sessions just end); natgwd forwards on.
    without = routed_state(NEIGHBORS)
    del without["bgp"]
    daemon.write_state(without)
    wait_for(lambda: "bgp" not in readiness(daemon)[1] and readiness(daemon)[0] == 200, "no BGP in /readyz")
    wait_for(lambda: not any(name.startswith("natgwd_bgp_") for name in daemon.metrics()), "no BGP metrics")
    wait_for(
        lambda: [e["process"] for e in events_named(daemon, "child stopped")][-3:] == ["bgpd", "bfdd", "zebra"],
        "FRR's daemons stopped",
    )
    events = [e["event"] for e in json_lines(daemon)]
    removed = events.index("BGP section removed: withdrawing before FRR stops")
    withdrawn = events.index("BGP announcements changed", removed)
    assert withdrawn < events.index("child stopped", removed)
    assert "BGP withdrawal not confirmed in time: stopping FRR anyway" not in events[removed:]
    wait_route(lab, "ext", eip, None)


def test_the_lab_server_outlives_an_answer_it_cannot_route() -> None:
    """Between a withdrawal and the next announcement the upstream router (where the lab's
    far-end server runs) has no route to an EIP: a UDP answer then fails with "network
    unreachable". The server must drop that answer and go on serving, or its TCP
    connections are reset too (which the failover series saw as lost flows)."""
    with Lab() as lab:
        lab.serve("ext", udp=[UPSTREAM_PORT])
        lab.exec("gw", "ip", "addr", "add", f"{GW}/21", "dev", "net2")
        lab.exec("gw", "ip", "addr", "add", f"{ROUTED['my-eip'][0]}/32", "dev", "lo")
        lab.exec("gw", "ip", "link", "set", "net2", "up")
        script = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.bind((sys.argv[1],0))\n"
            "s.settimeout(3)\n"
            f"s.sendto(b'x',({EXTERNAL_HOST!r},{UPSTREAM_PORT}))\n"
            "try:\n"
            "    print(s.recv(100).decode())\n"
            "except OSError:\n"
            "    print('no answer')\n"
        )
        answer = lab.exec("gw", sys.executable, "-c", script, ROUTED["my-eip"][0]).stdout.strip()
        assert answer == "no answer"  # ext has no route to the EIP
        assert host_of(lab.exec("gw", sys.executable, "-c", script, GW).stdout.strip()) == GW
