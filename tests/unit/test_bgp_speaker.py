"""natgwd.bgp: FRR's configuration text, the in-place announcement commands, vtysh's JSON
read back, what counts as announced, and who owns the EIPs."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from natgwd.bgp.ownership import Claims, SoleOwner
from natgwd.bgp.render import bfdd_conf, bgpd_conf, network_commands
from natgwd.bgp.speaker import Snapshot, _announcements
from natgwd.bgp.status import NeighborStatus, bfd_peers, decode_all, format_neighbors, neighbors, originated
from natgwd.ha.controller import HaController
from natgwd.ha.roles import Role
from natgwd.lab.topology import DUAL_STACK_STATE, SEED_STATE
from natgwd.state.validation import load_state
from tests.unit.fakes import quiet_ha_kernel

V4, V6 = ip_network("198.19.100.10/32"), ip_network("fd00:119::10/128")


def state_with_bgp(base: dict[str, Any] = DUAL_STACK_STATE, **bgp: Any) -> Any:
    document = json.loads(json.dumps(base))
    neighbors = [
        {"address": "10.115.55.254", "remoteAsn": 65000, "password": "s3cret", "holdTime": 9, "bfd": {"minRx": 100}},
        {"address": "fd00:115::fe", "remoteAsn": 65000, "gracefulRestart": True},
    ]
    document["bgp"] = {"asn": 65001, "neighbors": neighbors, **bgp}
    return load_state(json.dumps(document).encode())


def test_bgpd_conf_sessions_policy_and_announcements() -> None:
    state = state_with_bgp(standbyPrepend=2)
    assert state.bgp is not None
    text = bgpd_conf(state.bgp, IPv4Address("10.115.48.1"), {V4: False, V6: True})
    lines = text.splitlines()
    for line in (
        "bgp route-map delay-timer 0",
        "router bgp 65001",
        " bgp router-id 10.115.48.1",
        " no bgp network import-check",
        " neighbor 10.115.55.254 remote-as 65000",
        " neighbor 10.115.55.254 timers 3 9",
        " neighbor 10.115.55.254 timers connect 2",
        " neighbor 10.115.55.254 password s3cret",
        " neighbor 10.115.55.254 bfd profile natgwd-100-300-3",
        " neighbor fd00:115::fe timers 30 90",
        " neighbor fd00:115::fe graceful-restart",
        "  network 198.19.100.10/32 route-map NATGWD-OWNED",
        "  network fd00:119::10/128 route-map NATGWD-STANDBY",
        "  neighbor fd00:115::fe route-map NATGWD-OUT out",
        " set as-path prepend 65001 65001",
        " match tag 4242",
    ):
        assert line in lines, line
    # Each session in its own family only.
    v4 = lines[lines.index(" address-family ipv4 unicast") : lines.index(" address-family ipv6 unicast")]
    assert not any("fd00" in line for line in v4)
    assert " neighbor fd00:115::fe bfd" not in lines
    assert "profile natgwd-100-300-3" in bfdd_conf(state.bgp)


def test_network_commands_change_only_what_differs() -> None:
    assert network_commands(65001, {V4: False}, {V4: False}, {V4}) == []
    # Unknown route maps (bgpd restarted): every wanted prefix is said again.
    assert network_commands(65001, {V4: False}, None, {V4}) == [
        "configure terminal",
        "router bgp 65001",
        "address-family ipv4 unicast",
        "network 198.19.100.10/32 route-map NATGWD-OWNED",
        "exit-address-family",
    ]
    # Standby to owner, and a withdrawal only of what bgpd has.
    commands = network_commands(65001, {V4: False}, {V4: True, V6: True}, {V4, V6})
    assert commands[2:] == [
        "address-family ipv4 unicast",
        "network 198.19.100.10/32 route-map NATGWD-OWNED",
        "exit-address-family",
        "address-family ipv6 unicast",
        "no network fd00:119::10/128",
        "exit-address-family",
    ]
    assert network_commands(65001, {}, {V6: False}, set()) == []


NEIGHBORS_JSON = """{
"10.115.55.254":{"bgpState":"Established","bgpTimerUpEstablishedEpoch":1796666419,
 "addressFamilyInfo":{"ipv4Unicast":{"acceptedPrefixCounter":1,"sentPrefixCounter":2}},
 "lastNotificationReason":"Cease/Unspecific"},
"fd00:115::fe":{"bgpState":"Active","lastResetTimerMsecs":5000,"lastResetDueTo":"BFD down received",
 "addressFamilyInfo":{"ipv6Unicast":{"acceptedPrefixCounter":0,"sentPrefixCounter":0}}}
}
[{"peer":"10.115.55.254","status":"up"},{"peer":"fd00:115::fe","status":"down"}]"""


def test_vtysh_json_read_back() -> None:
    documents = decode_all(NEIGHBORS_JSON)
    found = neighbors(documents[0], now=1000.0)
    assert found["10.115.55.254"] == NeighborStatus(
        "10.115.55.254", "Established", 2, 1, 1796666419.0, "Cease/Unspecific"
    )
    assert found["fd00:115::fe"].last_change == 995.0
    assert found["fd00:115::fe"].last_error == "BFD down received"
    assert bfd_peers(documents[1]) == {"10.115.55.254": "up", "fd00:115::fe": "down"}
    routes = {
        "routes": {
            "198.19.100.10/32": [{"weight": 32768, "peerId": "(unspec)"}],
            "10.0.0.0/8": [{"weight": 0, "peerId": "10.115.55.254"}],
        }
    }
    assert originated(routes) == {V4}


def test_unannounced_needs_the_prefix_originated_and_a_session_of_its_family() -> None:
    def snapshot(v4_state: str, originated_now: frozenset[Any]) -> Snapshot:
        up = NeighborStatus("a", v4_state, 1, 0, None, None)
        six = NeighborStatus("b", "Established", 1, 0, None, None)
        return Snapshot(
            {}, ("a", "b"), {"a": up, "b": six}, frozenset({V4, V6}), frozenset(), originated_now, {"a": 4, "b": 6}
        )

    assert snapshot("Established", frozenset({V4, V6})).unannounced() == frozenset()
    assert snapshot("Active", frozenset({V4, V6})).unannounced() == {V4}
    assert snapshot("Established", frozenset({V6})).unannounced() == {V4}


def test_announcements_follow_claims_and_the_marks() -> None:
    state = state_with_bgp(base=SEED_STATE | {"external": DUAL_STACK_STATE["external"]}, announce="marked")
    assert state.bgp is not None
    assert _announcements(state, state.bgp, frozenset({"my-eip", "my-eip2"}), frozenset()) == {}
    everything = state_with_bgp(base=SEED_STATE | {"external": DUAL_STACK_STATE["external"]})
    assert everything.bgp is not None
    owned = _announcements(everything, everything.bgp, frozenset({"my-eip"}), frozenset({"my-eip2"}))
    assert owned == {ip_network("10.115.55.200/32"): False, ip_network("10.115.55.201/32"): True}


@pytest.mark.parametrize(
    ("role", "claims"),
    [
        (Role.MASTER, Claims(frozenset({"my-eip", "my-eip2"}))),
        (Role.BACKUP, Claims(frozenset(), frozenset({"my-eip", "my-eip2"}))),
        (Role.FAULT, Claims(frozenset())),
        (Role.INIT, Claims(frozenset())),
    ],
)
def test_the_ha_pair_owns_by_role(tmp_path: Path, role: Role, claims: Claims) -> None:
    document = json.loads(json.dumps(SEED_STATE))
    document["ha"] = {
        "interface": "sync0",
        "virtualRouterId": 51,
        "members": [{"address": "169.254.64.1", "priority": 150}, {"address": "169.254.64.2", "priority": 100}],
    }
    state = load_state(json.dumps(document).encode())
    kernel = quiet_ha_kernel()
    controller = HaController(tmp_path, lambda _i, _n: None, CollectorRegistry(), kernel)
    told: list[bool] = []
    controller.on_change(lambda: told.append(True))
    if role is not Role.INIT:
        controller._on_notice(role)  # keepalived's notify: the speaker is told at once
    assert told == ([True] if role is not Role.INIT else [])
    assert controller.claims(state) == claims
    # Without an ha section the gateway is alone: it owns everything, as SoleOwner says.
    alone = load_state(json.dumps(SEED_STATE).encode())
    assert controller.claims(alone) == SoleOwner().claims(alone) == Claims(frozenset({"my-eip", "my-eip2"}))


def test_status_table() -> None:
    now = 1796666519.0
    found = neighbors(decode_all(NEIGHBORS_JSON)[0], now=now)
    found["fd00:115::fe"] = NeighborStatus(**{**vars(found["fd00:115::fe"]), "bfd": "down"})
    assert format_neighbors(found, {V6, V4}, now=now).splitlines() == [
        "NEIGHBOR       STATE        BFD   ANNOUNCED  ACCEPTED  SINCE  LAST ERROR",
        "10.115.55.254  Established  -     2          1         100s",
        "fd00:115::fe   Active       down  0          0         5s     BFD down received",
        "originated: 198.19.100.10/32, fd00:119::10/128",
    ]


def test_the_last_flap_time_holds_still_until_a_flap() -> None:
    from natgwd.bgp.speaker import _steady

    before = NeighborStatus("a", "Established", 1, 0, 1000.0, None)
    assert _steady(NeighborStatus("a", "Established", 1, 0, 1001.0, None), before).last_change == 1000.0
    # Down and up again between two looks: FRR's time moved far.
    assert _steady(NeighborStatus("a", "Established", 1, 0, 1030.0, None), before).last_change == 1030.0
    assert _steady(NeighborStatus("a", "Active", 0, 0, 1001.0, None), before).last_change == 1001.0
