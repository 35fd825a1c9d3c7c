"""Live operation with real traffic: stale conntrack entries after rule changes, connections
of unchanged rules surviving reconciles and restarts, gratuitous ARP, late interfaces,
sd_notify, `natgwd cleanup`, SIGHUP and the applied-state record.

Every test builds its own lab (namespaces with unique names, removed afterwards, also on
failure) and runs natgwd in the lab's gateway namespace; traffic never leaves the lab.
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime
from typing import Any

import pytest

from natgwd.lab.topology import Lab
from tests.integration.helpers import (
    apply,
    events_named,
    host_of,
    log_events,
    natgwd_table_exists,
    readyz,
    sha256,
    start,
    start_natgwd_with,
    wait_for,
)
from tests.integration.lifecycle_helpers import (
    NotifySocket,
    addresses,
    capture_arp,
    conntrack_deleted,
    conntrack_entries,
    counters,
    mac_of,
    metric,
    routes,
    tcp_stream,
    udp_once,
)

EIP1 = "10.115.55.200"
EIP2 = "10.115.55.201"
EIP3 = "10.115.55.202"
UPSTREAM = "10.115.55.254"
VM1, VM2, VM3 = "172.20.10.2", "172.20.10.3", "172.20.10.4"
NO_ANSWER_WAIT = 1.0  # how long a datagram that must not be answered is given
HAND_FIREWALL = """
table inet handmade {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related counter accept
    }
}
"""


def udp_dnat(name: str, internal_ip: str, port: int = 5000) -> dict[str, Any]:
    return {
        "name": name,
        "eip": "my-eip",
        "protocol": "udp",
        "externalPort": str(port),
        "internalIp": internal_ip,
        "internalPort": str(port),
    }


def without_snat(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "snat": []}


# --- stale conntrack entries ----------------------------------------------------------


def test_dnat_changes_move_a_live_udp_flow(lab: Lab, seed_state: dict[str, Any]) -> None:
    """An ongoing UDP flow to an EIP port must follow its DNAT on the very next datagram:
    reach the backend once the DNAT is added (not stay stuck on the gateway), move when
    the DNAT's internalIp changes, and stop when the DNAT is removed, instead of an old
    conntrack entry pinning the flow for as long as datagrams keep coming (the UDP flavour
    of Kube-OVN #1922)."""
    lab.serve("vm1", udp=[5000], tag="vm1")
    lab.serve("vm3", udp=[5000], tag="vm3")
    daemon = start(lab, seed_state)
    assert udp_once(lab, "ext", EIP1, 5000, source_port=40001, timeout=NO_ANSWER_WAIT) == ""
    before = conntrack_deleted(daemon)

    seed_state["dnat"].append(udp_dnat("dnat-udp", VM1))
    apply(daemon, seed_state)
    assert conntrack_deleted(daemon) == {**before, "dnat": before["dnat"] + 1}
    for _ in range(3):
        assert udp_once(lab, "ext", EIP1, 5000, source_port=40001) == f"{UPSTREAM}:40001 @vm1"

    seed_state["dnat"][-1]["internalIp"] = VM3
    apply(daemon, seed_state)
    assert conntrack_deleted(daemon) == {**before, "dnat": before["dnat"] + 2}
    for _ in range(2):
        assert udp_once(lab, "ext", EIP1, 5000, source_port=40001) == f"{UPSTREAM}:40001 @vm3"

    seed_state["dnat"].pop()
    apply(daemon, seed_state)
    assert conntrack_deleted(daemon) == {**before, "dnat": before["dnat"] + 2, "removed": before["removed"] + 1}
    assert udp_once(lab, "ext", EIP1, 5000, source_port=40001, timeout=NO_ANSWER_WAIT) == ""
    flows = [e for e in conntrack_entries(lab, "udp") if e.orig["dport"] == "5000"]
    assert [(e.orig["sport"], e.reply["src"]) for e in flows] == [("40001", EIP1)]


def test_fip_removal_stops_live_flows_at_once(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Unbinding a FIP must cut an ongoing inbound flow on its next packet: the conntrack
    entry that DNATs it to the VM has to go, or the VM stays reachable through the EIP for
    as long as the peer keeps sending (Kube-OVN #1922). The VM's own outbound flow must
    move to the SNAT's EIP at the same time."""
    lab.serve("vm2", udp=[5001], tag="vm2")
    lab.serve("ext", udp=[6000])
    daemon = start(lab, seed_state)
    for _ in range(3):
        assert udp_once(lab, "ext", EIP2, 5001, source_port=40002) == f"{UPSTREAM}:40002 @vm2"
        assert host_of(udp_once(lab, "vm2", UPSTREAM, 6000, source_port=40007)) == EIP2
    flows = [e for e in conntrack_entries(lab, "udp") if e.orig["dst"] == EIP2]
    assert [(e.orig["sport"], e.reply["src"]) for e in flows] == [("40002", VM2)]
    before = sum(conntrack_deleted(daemon).values())

    seed_state["fip"] = []
    apply(daemon, seed_state)
    assert sum(conntrack_deleted(daemon).values()) == before + 2
    assert [e for e in conntrack_entries(lab, "udp") if e.orig["dst"] == EIP2] == []
    assert udp_once(lab, "ext", EIP2, 5001, source_port=40002, timeout=NO_ANSWER_WAIT) == ""
    assert [e.reply["src"] for e in conntrack_entries(lab, "udp") if e.orig["dst"] == EIP2] == [EIP2]
    assert host_of(udp_once(lab, "vm2", UPSTREAM, 6000, source_port=40007)) == EIP1


def test_snat_eip_change_moves_a_live_udp_flow(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Changing a SNAT's EIP must apply to flows that are already running: the next
    datagram of an ongoing outbound flow leaves from the new EIP instead of the old one
    (which may already belong to someone else)."""
    lab.serve("ext", udp=[6000])
    daemon = start(lab, seed_state)
    for _ in range(3):
        assert host_of(udp_once(lab, "vm3", UPSTREAM, 6000, source_port=40003)) == EIP1
    before = conntrack_deleted(daemon)

    seed_state["snat"][0]["eip"] = "my-eip2"
    apply(daemon, seed_state)
    # A SNAT change's scan of every entry comes within a second (at most one a second).
    moved = {**before, "snat": before["snat"] + 1}
    wait_for(lambda: conntrack_deleted(daemon) == moved, "the flow's entry deleted", timeout=10)
    assert host_of(udp_once(lab, "vm3", UPSTREAM, 6000, source_port=40003)) == EIP2
    assert host_of(udp_once(lab, "vm3", UPSTREAM, 6000, source_port=40003)) == EIP2


def test_connections_of_unchanged_rules_survive_reconciles(lab: Lab, seed_state: dict[str, Any]) -> None:
    """A reconcile that adds or removes OTHER rules must not touch established connections
    of unchanged rules: no flush, no conntrack deletion, no reset (Kube-OVN #4987/#5029
    style churn)."""
    lab.serve("vm1", tcp=[80])
    daemon = start(lab, seed_state)
    stream = tcp_stream(lab, "ext", EIP1, 8888, "dnat")
    stream.wait_echoes(10)
    stream_port = stream.local_address().rsplit(":", 1)[1]

    extra = json.loads(json.dumps(seed_state))
    extra["eips"].append({"name": "my-eip3", "v4ip": EIP3})
    extra["dnat"].append(udp_dnat("dnat-udp", VM2))
    extra["fip"].append({"name": "fip02", "eip": "my-eip3", "internalIp": VM3})
    for state in (extra, seed_state, extra, seed_state):
        apply(daemon, state)
        stream.wait_echoes(10)

    assert conntrack_deleted(daemon) == {"fip": 0, "dnat": 0, "snat": 0, "removed": 0}
    assert counters(daemon, "dnat", "dnat01", EIP1).connections == 1
    tcp = [e for e in conntrack_entries(lab, "tcp") if e.orig["dst"] == EIP1]
    assert [(e.orig["sport"], e.reply["src"]) for e in tcp] == [(stream_port, VM1)]


@pytest.mark.parametrize("before_natgwd", ["by_hand", "natgwd_without_snat"])
def test_first_programming_translates_flows_started_before(
    lab: Lab, seed_state: dict[str, Any], before_natgwd: str
) -> None:
    """A flow that started while no SNAT existed (gateway configured by hand, or natgwd
    running an older state without SNAT and then restarted) must be SNATed from its next
    datagram once natgwd programs the rules: the first programming after start checks
    every conntrack entry, or the flow leaves with the VM's private address for as long
    as it lives (Kube-OVN #4193)."""
    lab.serve("ext", udp=[6000])
    # The upstream routes the VPC back to the gateway, so un-NATed flows get answers.
    lab.exec("ext", "ip", "route", "add", "172.20.10.0/24", "via", "10.115.48.1")
    if before_natgwd == "by_hand":
        for command in (
            "ip link set net1 up",
            "ip addr add 172.20.10.254/24 dev net1",
            "ip link set net2 up",
            "ip addr add 10.115.48.1/21 dev net2",
            "sysctl -qw net.ipv4.ip_forward=1",
        ):
            lab.exec("gw", *command.split())
        # Conntrack only runs in a namespace once some rule needs it: a firewall does.
        lab.exec("gw", "nft", "-f", "-", stdin=HAND_FIREWALL)
    else:
        first = start(lab, without_snat(seed_state))
        assert first.stop(signal.SIGTERM) == 0
    for _ in range(3):
        assert udp_once(lab, "vm3", UPSTREAM, 6000, source_port=40005) == f"{VM3}:40005"
    flows = [e for e in conntrack_entries(lab, "udp") if e.orig["src"] == VM3]
    assert [(e.orig["sport"], e.reply["dst"]) for e in flows] == [("40005", VM3)]

    daemon = start(lab, seed_state)
    assert conntrack_deleted(daemon) == {"fip": 0, "dnat": 0, "snat": 1, "removed": 0}
    assert host_of(udp_once(lab, "vm3", UPSTREAM, 6000, source_port=40005)) == EIP1
    flows = [e for e in conntrack_entries(lab, "udp") if e.orig["src"] == VM3]
    assert [(e.orig["sport"], e.reply["dst"]) for e in flows] == [("40005", EIP1)]


# --- restarts -------------------------------------------------------------------------


def test_restart_keeps_connections_and_counters(lab: Lab, seed_state: dict[str, Any]) -> None:
    """kill -9 and a restart of natgwd must not disturb NAT: established connections
    through DNAT and SNAT keep flowing while natgwd is down and after it is back, new
    connections are translated meanwhile, the restart adopts the table without changing
    it (no flush: Kube-OVN #4987/#5029) and counters of unchanged rules keep their
    values. SIGTERM exits 0 and leaves the data plane in place."""
    lab.serve("vm1", tcp=[80])
    lab.serve("ext", tcp=[7000], udp=[6000])
    daemon = start(lab, seed_state)
    inbound = tcp_stream(lab, "ext", EIP1, 8888, "dnat")
    outbound = tcp_stream(lab, "vm3", UPSTREAM, 7000, "snat")
    inbound.wait_echoes(10)
    outbound.wait_echoes(10)
    dnat_before = counters(daemon, "dnat", "dnat01", EIP1)
    snat_before = counters(daemon, "snat", "my-snat", EIP1)
    assert (dnat_before.connections, snat_before.connections) == (1, 1)

    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    inbound.wait_echoes(10)
    outbound.wait_echoes(10)
    assert host_of(lab.http_get("ext", EIP1, 8888)) == UPSTREAM
    assert host_of(udp_once(lab, "vm3", UPSTREAM, 6000, source_port=40006)) == EIP1

    restarted = start(lab, seed_state)
    applied = events_named(restarted, "desired state applied")
    assert [(e["nft_operations"], e["changed_elements"]) for e in applied] == [(0, 0)], applied
    inbound.wait_echoes(10)
    outbound.wait_echoes(10)
    dnat_after = counters(restarted, "dnat", "dnat01", EIP1)
    snat_after = counters(restarted, "snat", "my-snat", EIP1)
    assert dnat_after.not_below(dnat_before), (dnat_before, dnat_after)
    assert snat_after.not_below(snat_before), (snat_before, snat_after)
    assert (dnat_after.connections, snat_after.connections) == (2, 2)  # the streams + one each while down
    assert conntrack_deleted(restarted) == {"fip": 0, "dnat": 0, "snat": 0, "removed": 0}

    assert restarted.stop(signal.SIGTERM) == 0
    assert "natgwd stopped; the data plane stays in place" in [e.get("event") for e in log_events(restarted)]
    assert natgwd_table_exists(lab)
    inbound.wait_echoes(10)
    outbound.wait_echoes(10)


def test_changes_made_while_down_apply_to_live_flows(lab: Lab, seed_state: dict[str, Any]) -> None:
    """A state changed while natgwd was down (crashed, being upgraded) must reach flows
    that are already running once it is back: the first programming after start checks
    every conntrack entry, not only those a diff against the (lost) previous state would
    select (Kube-OVN #4193, #1922)."""
    lab.serve("vm1", udp=[5000], tag="vm1")
    lab.serve("vm3", udp=[5000], tag="vm3")
    seed_state["dnat"].append(udp_dnat("dnat-udp", VM1))
    daemon = start(lab, seed_state)
    assert udp_once(lab, "ext", EIP1, 5000, source_port=40008) == f"{UPSTREAM}:40008 @vm1"
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

    seed_state["dnat"][-1]["internalIp"] = VM3
    assert udp_once(lab, "ext", EIP1, 5000, source_port=40008) == f"{UPSTREAM}:40008 @vm1"  # nobody applied it yet
    restarted = start(lab, seed_state)
    assert conntrack_deleted(restarted) == {"fip": 0, "dnat": 1, "snat": 0, "removed": 0}
    assert udp_once(lab, "ext", EIP1, 5000, source_port=40008) == f"{UPSTREAM}:40008 @vm3"


# --- gratuitous ARP -------------------------------------------------------------------


def test_gratuitous_arp_after_start_and_for_added_eips(lab: Lab, seed_state: dict[str, Any]) -> None:
    """After start natgwd must announce every EIP with gratuitous ARP (3 rounds), and each
    EIP added later, so the upstream router does not keep sending EIP traffic to the MAC
    of the gateway's previous home (Kube-OVN #4690)."""
    capture = capture_arp(lab, "ext", "eth0")
    daemon = start(lab, seed_state)
    garp = 'natgwd_gratuitous_arp_packets_total{interface="net2"}'
    wait_for(lambda: daemon.metrics().get(garp) == 6, "6 gratuitous ARP frames counted")
    mac = mac_of(lab, "gw", "net2")
    frames = wait_for(lambda: len(capture.gratuitous()) >= 6 and capture.gratuitous(), "6 frames captured")
    assert sorted(f.psrc for f in frames) == [EIP1] * 3 + [EIP2] * 3
    for frame in frames:
        assert (frame.eth_dst, frame.eth_src, frame.op, frame.hwsrc, frame.hwdst) == (
            "ff:ff:ff:ff:ff:ff",
            mac,
            1,
            mac,
            "00:00:00:00:00:00",
        )

    seed_state["eips"].append({"name": "my-eip3", "v4ip": EIP3})
    apply(daemon, seed_state)
    wait_for(lambda: daemon.metrics().get(garp) == 9, "9 gratuitous ARP frames counted")
    frames = wait_for(lambda: len(capture.gratuitous()) >= 9 and capture.gratuitous(), "9 frames captured")
    assert sorted(f.psrc for f in frames) == [EIP1] * 3 + [EIP2] * 3 + [EIP3] * 3
    assert all(f.eth_src == mac and f.eth_dst == "ff:ff:ff:ff:ff:ff" for f in frames)
    assert daemon.metrics()[garp] == len(capture.gratuitous()) == 9


# --- late interfaces ------------------------------------------------------------------


def test_late_external_interface_is_picked_up(lab: Lab, seed_state: dict[str, Any]) -> None:
    """A declared interface that appears after start (a CNI attaching it late) must be
    configured as soon as it exists, without a restart: until then natgwd is not ready
    and says why, with nftables and the internal side already in place."""
    lab.exec("gw", "ip", "link", "set", "net2", "name", "late2")
    daemon = lab.start_natgwd(seed_state)

    def not_ready_for_net2() -> dict[str, Any] | None:
        status, detail = readyz(daemon)
        return detail if status == 503 and "net2" in detail.get("reason", "") else None

    detail = wait_for(not_ready_for_net2, "/readyz 503 naming net2")
    assert detail["reason"] == "interface net2 does not exist"
    assert natgwd_table_exists(lab)
    assert addresses(lab, "gw", "net1") == {"172.20.10.254/24"}
    assert ("10.55.0.0/16", "172.20.10.1", "net1") in routes(lab, "gw")
    assert addresses(lab, "gw", "late2") == set()
    assert metric(daemon, "natgwd_interfaces_missing") == 1
    assert metric(daemon, "natgwd_gratuitous_arp_packets_total", interface="net2") == 0

    lab.exec("gw", "ip", "link", "set", "late2", "name", "net2")
    daemon.wait_ready(timeout=20)
    assert daemon.process.poll() is None
    assert addresses(lab, "gw", "net2") == {"10.115.48.1/21", f"{EIP1}/21", f"{EIP2}/21"}
    assert ("default", UPSTREAM, "net2") in routes(lab, "gw")
    assert metric(daemon, "natgwd_interfaces_missing") == 0
    wait_for(
        lambda: metric(daemon, "natgwd_gratuitous_arp_packets_total", interface="net2") == 6,
        "gratuitous ARP for both EIPs",
    )
    lab.serve("vm1", tcp=[80])
    assert host_of(lab.http_get("ext", EIP1, 8888)) == UPSTREAM
    assert [e.get("event") for e in log_events(daemon)].count("natgwd started") == 1


# --- sd_notify ------------------------------------------------------------------------


def test_sd_notify_ready_watchdog_stopping(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Under systemd (Type=notify, WatchdogSec) natgwd must say READY=1 only once the
    state is completely applied (not while a declared interface is missing), ping the
    watchdog at half its interval, and say STOPPING=1 on SIGTERM; otherwise systemd
    orders dependants too early or kills a healthy daemon."""
    lab.exec("gw", "ip", "link", "set", "net2", "name", "late2")
    notify = NotifySocket(lab.workdir / "notify.sock")
    try:
        daemon = start_natgwd_with(
            lab, seed_state, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}, name="env"
        )
        wait_for(lambda: daemon.get("/readyz")[0] == 503 and "net2" in daemon.get("/readyz")[1], "not ready: net2")
        waiting = notify.collect(1.5)
        assert "READY=1" not in waiting, waiting
        assert set(waiting) == {"WATCHDOG=1"}, waiting

        lab.exec("gw", "ip", "link", "set", "late2", "name", "net2")
        notify.wait_for("READY=1", timeout=20)
        assert daemon.get("/readyz")[0] == 200
        assert notify.received.count("READY=1") == 1
        pings = notify.collect(2.0)
        assert pings.count("WATCHDOG=1") >= 2, pings
        assert set(pings) == {"WATCHDOG=1"}, pings

        assert daemon.stop(signal.SIGTERM) == 0
        notify.wait_for("STOPPING=1", timeout=5)
        assert notify.received.count("READY=1") == 1
        assert notify.received[-1] == "STOPPING=1"
    finally:
        notify.close()


# --- cleanup --------------------------------------------------------------------------


def test_cleanup_removes_only_what_natgwd_added(lab: Lab, seed_state: dict[str, Any]) -> None:
    """`natgwd cleanup` (decommissioning) must remove the table and every address and route
    natgwd added, and nothing an operator or the CNI configured, even an address natgwd
    also declares."""
    for command in (
        "ip link set net1 up",
        "ip addr add 172.20.10.254/24 dev net1",  # declared too, but there before natgwd
        "ip addr add 192.168.77.1/24 dev net1",
        "ip route add 198.51.100.0/24 via 192.168.77.2 dev net1",
    ):
        lab.exec("gw", *command.split())
    daemon = start(lab, seed_state)
    assert addresses(lab, "gw", "net2") == {"10.115.48.1/21", f"{EIP1}/21", f"{EIP2}/21"}
    assert daemon.stop(signal.SIGTERM) == 0
    assert lab.applied_state_path.exists()

    result = lab.exec("gw", sys.executable, "-m", "natgwd", "cleanup", "--applied-state", str(lab.applied_state_path))
    assert result.stdout.splitlines()[0] == "deleted nftables table inet natgwd"
    assert not natgwd_table_exists(lab)
    assert addresses(lab, "gw", "net2") == set()
    assert addresses(lab, "gw", "net1") == {"172.20.10.254/24", "192.168.77.1/24"}
    assert routes(lab, "gw") == {
        ("172.20.10.0/24", None, "net1"),
        ("192.168.77.0/24", None, "net1"),
        ("198.51.100.0/24", "192.168.77.2", "net1"),
    }
    assert not lab.applied_state_path.exists()

    again = lab.exec("gw", sys.executable, "-m", "natgwd", "cleanup", "--applied-state", str(lab.applied_state_path))
    assert again.stdout == "no nftables table inet natgwd: nothing to delete\n"


# --- SIGHUP and the applied-state record ----------------------------------------------


def test_sighup_resyncs_and_applied_state_is_recorded(lab: Lab, seed_state: dict[str, Any]) -> None:
    """SIGHUP must re-read the file and repair drift at once (not at the next periodic
    resync), and the applied state must be reported the same way in /readyz, in the
    applied-state file and by `natgwd status`, so operators can tell what is in force."""
    lab.serve("vm1", tcp=[80])
    daemon = start(lab, seed_state, "--resync-interval", "3600")
    digest = sha256(daemon.state_path.read_bytes())
    _, body = daemon.get("/readyz")
    ready = json.loads(body)
    assert ready["applied_sha256"] == digest
    first_applied_at = datetime.fromisoformat(ready["applied_at"])

    # Drift: a route and a DNAT mapping disappear behind natgwd's back.
    lab.exec("gw", "ip", "route", "del", "10.55.0.0/16")
    lab.exec("gw", "nft", "delete", "element", "inet", "natgwd", "dnat_target", f"{{ {EIP1} . tcp . 8888 }}")
    assert lab.exec("ext", "curl", "-s", "-m", "1", f"http://{EIP1}:8888/", check=False).stdout == ""
    applied_before = metric(daemon, "natgwd_reconciles_total", result="applied")

    daemon.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: metric(daemon, "natgwd_drift_repairs_total", resource="nftables") > 0,
        "the nftables drift repaired",
    )
    assert metric(daemon, "natgwd_reconciles_total", result="applied") == applied_before + 1
    assert ("10.55.0.0/16", "172.20.10.1", "net1") in routes(lab, "gw")
    assert host_of(lab.http_get("ext", EIP1, 8888)) == UPSTREAM
    assert "SIGHUP: re-reading the desired state and resyncing" in [e.get("event") for e in log_events(daemon)]

    ready = daemon.wait_applied(digest)
    assert datetime.fromisoformat(ready["applied_at"]) > first_applied_at
    record = json.loads(lab.applied_state_path.read_text())
    assert (record["sha256"], record["applied_at"]) == (digest, ready["applied_at"])
    assert record["state"] == seed_state
    status = lab.exec(
        "gw", sys.executable, "-m", "natgwd", "status", "--applied-state", str(lab.applied_state_path)
    ).stdout
    assert status.splitlines()[0] == f"applied state sha256 {digest} at {ready['applied_at']}"

    # Another gateway's record (the host-wide default may be one): status says it does not
    # match this namespace's table, instead of printing its sha256 as this table's.
    other = {**seed_state, "snat": [], "dnat": [{**seed_state["dnat"][0], "name": "another-gateways-dnat"}]}
    foreign = lab.applied_state_path.with_name("another-daemons-applied.json")
    foreign.write_text(json.dumps({"sha256": "0" * 64, "applied_at": ready["applied_at"], "state": other}))
    result = lab.exec("gw", sys.executable, "-m", "natgwd", "status", "--applied-state", str(foreign))
    assert result.stdout.startswith("KIND  NAME")
    assert result.stderr == (
        f"the applied-state record {foreign} does not match this network namespace's table: 1 of its rules are "
        "not in the table and 2 of the table's rules are not in it (e.g. dnat/another-gateways-dnat/"
        f"{EIP1}); it may be another daemon's (--applied-state names the record to read)\n"
    )
