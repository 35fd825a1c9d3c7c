"""An active/standby pair of natgwd gateways (keepalived VRRP + conntrackd FTFW, run by
natgwd) with real, long-lived flows through DNAT, share DNAT, SNAT and a FIP: a hard failure of the
active (every process SIGKILLed, its links down) and a planned switchover (SIGTERM) move
the addresses to the other member, and every flow goes on with no reset, the SNAT flow
with the same translated source port as seen outside. Also: the heartbeat link cut
(split brain), with what happens to traffic checked as documented in docs/ha.md.
How long a flow stalls is a figure, printed here and measured over many rounds by
test_ha_series.py (benchmarks/results/ha_failover.json): a timed assertion on a loaded
machine fails for the machine, not for natgwd.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.lab.topology import EXTERNAL_HOST, Natgwd
from tests.integration.ha_lab import (
    GATEWAYS,
    MINIMAL_CAPABILITIES,
    Flow,
    HaLab,
    connection_marks,
    established_peers,
    ha_state,
    kill_all,
    metric,
    pids_in,
    role_of,
    start_flow,
    wait_role,
    watch_destroys,
)
from tests.integration.helpers import log_events, wait_for
from tests.integration.lifecycle_helpers import addresses

EIP, EIP2 = "10.115.55.200", "10.115.55.201"


@pytest.fixture
def ha_lab() -> Iterator[HaLab]:
    with HaLab() as built:
        yield built


def start_pair(lab: HaLab, **state_options: float | bool) -> dict[str, Natgwd]:
    """gwa active, gwb standby. Started one after the other: without preemption the first
    member to finish its election keeps the addresses, whatever the priorities."""
    state = ha_state(**state_options)  # type: ignore[arg-type]
    members = {}
    for gateway, role in zip(GATEWAYS, ("master", "backup"), strict=True):
        members[gateway] = lab.start_member(gateway, state, MINIMAL_CAPABILITIES)
        members[gateway].wait_ready(timeout=30)
        wait_role(members[gateway], role)
    return members


def start_flows(lab: HaLab) -> dict[str, Flow]:
    lab.serve("vm1", tcp=[80])  # DNAT target (and a share DNAT backend): echoes raw TCP
    lab.serve("vm3", tcp=[80])  # the other share DNAT backend
    lab.serve("ext", tcp=[9000], udp=[9001])
    flows = {
        "dnat": start_flow(lab, "ext", "tcp", EIP, 8888, "dnat"),
        "share": start_flow(lab, "ext", "tcp", EIP, 9999, "share"),
        "snat": start_flow(lab, "vm3", "tcp", EXTERNAL_HOST, 9000, "snat"),
        "fip": start_flow(lab, "vm2", "udp", EXTERNAL_HOST, 9001, "fip"),
    }
    for flow in flows.values():
        flow.wait_more(25)
    return flows


def snat_peer(lab: HaLab) -> str:
    peers = established_peers(lab, "ext", 9000)
    assert len(peers) == 1 and peers[0].startswith(f"{EIP}:"), peers
    return peers[0]


def fip_views(flow: Flow) -> set[str]:
    return {answer for _, answer in flow.echoes()}


def test_failover_keeps_dnat_snat_and_fip_flows(ha_lab: HaLab) -> None:
    members = start_pair(ha_lab)
    gwa, gwb = members["gwa"], members["gwb"]
    # Only the active member holds the moving addresses; the standby has its routes.
    assert "172.20.10.254/24" in addresses(ha_lab, "gwa", "net1")
    assert addresses(ha_lab, "gwb", "net1") == set() and addresses(ha_lab, "gwb", "net2") == set()
    flows = start_flows(ha_lab)
    seen_outside = snat_peer(ha_lab)
    assert fip_views(flows["fip"]) == {fip_views(flows["fip"]).pop()}
    fip_view = fip_views(flows["fip"]).pop()
    assert fip_view.startswith(f"{EIP2}:")
    # conntrackd put the active's connections (marked with their rules' ids) into the
    # standby's kernel.
    marks = connection_marks(ha_lab, "gwa")
    assert len(marks) == 4  # dnat01, one of the two share backends, my-snat, fip01
    wait_for(lambda: connection_marks(ha_lab, "gwb") == marks, "the standby to hold the four flows")
    assert (metric(gwa, 'natgwd_conntrackd_entries{cache="internal"}') or 0) >= 4

    # Each member counts what it forwards: nothing so far on the standby. The replicated
    # connections carry their rule's mark, so the new active counts them from its takeover.
    dnat_packets = f'natgwd_rule_packets_total{{kind="dnat",name="dnat01",eip="{EIP}",direction="original"}}'
    assert metric(gwb, dnat_packets) == 0
    assert (metric(gwa, dnat_packets) or 0) >= 25

    # Hard failure: every process of the active killed, its links down.
    failed_at = time.monotonic()
    killed = kill_all(ha_lab, "gwa")
    assert len(killed) >= 3  # natgwd, keepalived (two processes), conntrackd
    for interface in ("net1", "net2", "sync0"):
        ha_lab.exec("gwa", "ip", "link", "set", interface, "down")
    wait_role(gwb, "master", timeout=10)
    took_over = time.monotonic() - failed_at
    for flow in flows.values():
        flow.wait_more(50)
        assert not flow.errors()
    gaps = {name: flow.largest_gap(failed_at) for name, flow in flows.items()}
    print(f"takeover {took_over:.2f} s; largest gaps {gaps}")
    assert snat_peer(ha_lab) == seen_outside  # same connection, same translated port
    assert fip_views(flows["fip"]) == {fip_view}
    assert "172.20.10.254/24" in addresses(ha_lab, "gwb", "net1")
    assert metric(gwb, 'natgwd_ha_transitions_total{role="master"}') == 1
    assert (metric(gwb, "natgwd_ha_takeover_conntrackd_seconds") or 0) > 0
    assert metric(gwb, "natgwd_ha_peer_reachable") == 0
    assert (metric(gwb, dnat_packets) or 0) >= 50

    # The failed member comes back as standby (no preemption) and resyncs...
    for interface in ("net1", "net2", "sync0"):
        ha_lab.exec("gwa", "ip", "link", "set", interface, "up")
    gwa = ha_lab.start_member("gwa", ha_state(), MINIMAL_CAPABILITIES)
    gwa.wait_ready(timeout=30)
    wait_role(gwa, "backup")
    assert addresses(ha_lab, "gwa", "net1") == set()  # keepalived removed what the killed one left
    wait_for(lambda: metric(gwb, "natgwd_ha_peer_reachable") == 1, "gwb to hear gwa again")
    wait_for(lambda: connection_marks(ha_lab, "gwa") == marks, "the returned standby to hold the flows")
    # ...then a planned switchover: SIGTERM on the active hands everything back.
    switched_at = time.monotonic()
    assert gwb.stop(signal.SIGTERM) == 0
    wait_role(gwa, "master", timeout=10)
    for flow in flows.values():
        flow.wait_more(50)
    gaps = {name: flow.largest_gap(switched_at) for name, flow in flows.items()}
    print(f"switchover: largest gaps {gaps}")
    assert snat_peer(ha_lab) == seen_outside
    assert fip_views(flows["fip"]) == {fip_view}
    # keepalived stopped with natgwd and gave its addresses up.
    assert addresses(ha_lab, "gwb", "net1") == set()
    # New connections work at once on the new active.
    assert ha_lab.http_get("ext", EIP, 8888).startswith(f"{EXTERNAL_HOST}:")
    assert role_of(gwa) == "master"


def test_split_brain_keeps_flows_and_heals_to_one_active(ha_lab: HaLab) -> None:
    """The sync link cut with both members alive: the standby hears no adverts and takes
    the addresses too. Both are active; the last gratuitous ARP (the new one's) draws the
    traffic, and since both hold the same connections with the same translations and TCP
    tracking is liberal, the flows go on through whichever member a packet reaches. When
    the link returns the lower priority yields, the other announces the addresses again
    and pulls the connections made meanwhile."""
    members = start_pair(ha_lab)
    gwa, gwb = members["gwa"], members["gwb"]
    flows = start_flows(ha_lab)
    seen_outside = snat_peer(ha_lab)
    fip_view = fip_views(flows["fip"]).pop()
    marks = connection_marks(ha_lab, "gwa")
    wait_for(lambda: connection_marks(ha_lab, "gwb") == marks, "the standby to hold the flows")

    cut_at = time.monotonic()
    ha_lab.exec("gwb", "ip", "link", "set", "sync0", "down")
    wait_role(gwb, "master", timeout=10)
    assert role_of(gwa) == "master"
    for gateway in GATEWAYS:
        assert "172.20.10.254/24" in addresses(ha_lab, gateway, "net1")
        assert f"{EIP}/21" in addresses(ha_lab, gateway, "net2")
    for flow in flows.values():
        flow.wait_more(50)
    gaps = {name: flow.largest_gap(cut_at) for name, flow in flows.items()}
    print(f"split brain: largest gaps {gaps}")
    wait_for(lambda: metric(gwa, "natgwd_ha_peer_reachable") == 0, "gwa to miss its peer")
    # New connections work during the split.
    assert ha_lab.http_get("ext", EIP, 8888).startswith(f"{EXTERNAL_HOST}:")

    destroys = watch_destroys(ha_lab, "gwa")
    healed_at = time.monotonic()
    ha_lab.exec("gwb", "ip", "link", "set", "sync0", "up")
    wait_role(gwb, "backup", timeout=10)
    wait_for(lambda: addresses(ha_lab, "gwb", "net1") == set(), "gwb to give the addresses up")
    assert role_of(gwa) == "master"
    assert "172.20.10.254/24" in addresses(ha_lab, "gwa", "net1")
    for flow in flows.values():
        flow.wait_more(50)
    gaps = {name: flow.largest_gap(healed_at) for name, flow in flows.items()}
    print(f"healed: largest gaps {gaps}")
    # Nothing gwb sends on its return replaces the connections gwa forwards: conntrackd
    # injects an update of a NATed connection as a delete and a create, and a packet between
    # the two would find none (gwa's own stack then resets the flow).
    assert destroys.destroyed_marks() & marks == set()
    assert snat_peer(ha_lab) == seen_outside
    assert fip_views(flows["fip"]) == {fip_view}
    # gwa hears its peer again and announces the addresses (keepalived's own notice of the
    # healed split brain comes only if gwa hears gwb's lower priority before gwb yields: a race).
    wait_for(lambda: "the peer is reachable again" in gwa.log(), "gwa to hear its peer return and announce")
    wait_for(lambda: metric(gwa, "natgwd_ha_peer_reachable") == 1, "gwa to hear gwb again")
    assert ha_lab.http_get("ext", EIP, 8888).startswith(f"{EXTERNAL_HOST}:")


def test_children_are_restarted_and_a_differing_peer_is_reported(ha_lab: HaLab) -> None:
    """conntrackd and keepalived killed hard on the standby are restarted (conntrackd's
    stale lock file removed first), counted, and the member is ready again; a peer that
    applied another state is reported on both sides until the states agree again."""
    members = start_pair(ha_lab)
    gwa, gwb = members["gwa"], members["gwb"]
    for daemon in (gwa, gwb):
        wait_for(lambda d=daemon: metric(d, "natgwd_ha_peer_state_match") == 1, f"{daemon.role} to match its peer")
    lock = ha_lab.workdir / "gwb" / "run" / "conntrackd.lock"
    assert lock.exists()
    for process in ("conntrackd", "keepalived"):
        (pid,) = [p for p in pids_in(ha_lab, "gwb") if Path(f"/proc/{p}/comm").read_text().strip() == process][:1]
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda p=process: metric(gwb, f'natgwd_ha_process_restarts_total{{process="{p}"}}') == 1,
            f"{process} to be restarted",
        )
        wait_for(lambda p=process: metric(gwb, f'natgwd_ha_process_up{{process="{p}"}}') == 1, f"{process} up")
    gwb.wait_ready()
    wait_role(gwb, "backup")
    assert role_of(gwa) == "master"  # the standby's trouble never moved the addresses
    exits = [e for e in log_events(gwb) if e.get("event") == "child exited"]
    assert [(e["process"], e["code"]) for e in exits] == [("conntrackd", -9), ("keepalived", -9)]

    different = ha_state()
    different["eips"].append({"name": "my-eip3", "v4ip": "10.115.55.202"})
    gwb.write_state(different)
    gwb.wait_applied()
    for daemon in (gwa, gwb):
        wait_for(lambda d=daemon: metric(d, "natgwd_ha_peer_state_match") == 0, f"{daemon.role} to see the mismatch")
    assert "the peer applied a different desired state" in gwa.log()
    gwb.write_state(ha_state())
    gwb.wait_applied()
    for daemon in (gwa, gwb):
        wait_for(lambda d=daemon: metric(d, "natgwd_ha_peer_state_match") == 1, f"{daemon.role} to match again")


def test_member_waits_for_its_sync_address(ha_lab: HaLab) -> None:
    """Without its address on the sync interface a member does not know which one it is:
    it applies the rules but runs no keepalived (never takes the addresses) and says why on
    /readyz; once the address appears it starts on the next resync."""
    ha_lab.exec("gwa", "ip", "addr", "del", "169.254.64.1/30", "dev", "sync0")
    gwa = ha_lab.start_member("gwa", ha_state(), MINIMAL_CAPABILITIES)

    def waiting() -> str | None:
        status, body = gwa.get("/readyz")
        reason = json.loads(body).get("reason", "") if body else ""
        return reason if status == 503 and "holds neither ha.members address" in reason else None

    reason = wait_for(waiting, "the reason on /readyz")
    assert "sync0 holds neither ha.members address (169.254.64.1 or 169.254.64.2)" in reason
    assert not [p for p in pids_in(ha_lab, "gwa") if Path(f"/proc/{p}/comm").read_text().strip() == "keepalived"]
    assert addresses(ha_lab, "gwa", "net1") == set()
    ha_lab.exec("gwa", "ip", "addr", "add", "169.254.64.1/30", "dev", "sync0")
    gwa.wait_ready(timeout=30)
    wait_role(gwa, "master")


def test_a_new_eip_is_added_by_keepalived_on_the_active_only(ha_lab: HaLab) -> None:
    """A changed state reloads keepalived (SIGHUP, no restart: the addresses stay put) and
    the new EIP appears on the active member only."""
    members = start_pair(ha_lab)
    state = ha_state()
    state["eips"].append({"name": "my-eip3", "v4ip": "10.115.55.202"})
    for daemon in members.values():
        daemon.write_state(state)
        daemon.wait_applied()
    wait_for(lambda: "10.115.55.202/21" in addresses(ha_lab, "gwa", "net2"), "the new EIP on the active")
    assert "10.115.55.202/21" not in addresses(ha_lab, "gwb", "net2")
    assert addresses(ha_lab, "gwb", "net2") == set()
    for daemon in members.values():
        assert metric(daemon, 'natgwd_ha_process_restarts_total{process="keepalived"}') == 0
    assert metric(members["gwa"], 'natgwd_ha_transitions_total{role="master"}') == 1
    assert role_of(members["gwa"]) == "master"


def test_leaving_ha_mode_gives_the_addresses_back_to_natgwd(ha_lab: HaLab) -> None:
    """A state without `ha` stops keepalived and conntrackd; natgwd then configures the
    addresses itself, as a single gateway, within a resync."""
    members = start_pair(ha_lab)
    assert members["gwb"].stop(signal.SIGTERM) == 0
    single = ha_state()
    del single["ha"]
    members["gwa"].write_state(single)
    members["gwa"].wait_applied()

    def children() -> list[str]:
        return [
            name
            for p in pids_in(ha_lab, "gwa")
            if (name := Path(f"/proc/{p}/comm").read_text().strip()) in ("keepalived", "conntrackd")
        ]

    wait_for(lambda: not children(), "keepalived and conntrackd to stop")
    wait_for(
        lambda: (
            {"10.115.48.1/21", f"{EIP}/21", f"{EIP2}/21"} <= addresses(ha_lab, "gwa", "net2")
            and "172.20.10.254/24" in addresses(ha_lab, "gwa", "net1")
        ),
        "natgwd to configure the addresses",
    )
    assert "ha" not in members["gwa"].wait_ready()
    ha_lab.serve("vm1", tcp=[80])
    assert ha_lab.http_get("ext", EIP, 8888).startswith(f"{EXTERNAL_HOST}:")
