"""A scaled-out member without root: keepalived.conf and conntrackd.conf (exact text),
the notify and advert parsers, and the controller's bookkeeping (hand-over routes and
ownership from its own roles and the adverts it hears), with fake routes and children."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from natgwd.ha import scale
from natgwd.ha.adverts import parse_advert
from natgwd.ha.notify import parse_notify, parse_notify_instance
from natgwd.ha.render import HaPaths
from natgwd.ha.roles import Event, Role
from natgwd.ha.scale import ScaleController, group_addresses
from natgwd.ha.scale_render import conntrackd_conf, group_of_instance, keepalived_conf
from natgwd.process.supervisor import Supervisor
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeAdvertListener, scale_controller
from tests.unit.test_scaleout_state import doc

M0, M1, M2 = (IPv4Address(f"172.20.10.1{i}") for i in (1, 2, 3))


def state_of(members: int = 3, **changes: Any) -> DesiredState:
    changes.setdefault("groups", [{"eips": ["my-eip"]}, {"eips": ["my-eip2"]}, {}][:members])
    document = doc(**changes)
    document["scaleOut"]["members"] = document["scaleOut"]["members"][:members]
    return load_state(json.dumps(document).encode())


def test_keepalived_conf_has_one_instance_per_group_with_this_members_priority(tmp_path: Path) -> None:
    state = state_of()
    config = state.scale_out
    assert config is not None
    text = keepalived_conf(config, 1, group_addresses(state, config), "net2", HaPaths(tmp_path))
    g1 = text[text.index("vrrp_instance g1") :]
    g1 = g1[: g1.index("}\n\n") + 1]
    assert g1 == "\n".join(
        [
            "vrrp_instance g1 {",
            "    state BACKUP",
            "    interface net1",
            "    dont_track_primary",
            "    virtual_router_id 61",
            "    priority 200",
            "    advert_int 0.2",
            "    preempt_delay 5",
            "    garp_lower_prio_repeat 3",
            "    unicast_src_ip 172.20.10.12",
            "    unicast_peer {",
            "        172.20.10.11",
            "        172.20.10.13",
            "    }",
            "    virtual_ipaddress {",
            "        169.254.0.61/32 dev net1",
            "    }",
            "    virtual_ipaddress_excluded {",
            "        10.115.55.201/21 dev net2",
            "    }",
            "}",
        ]
    )
    # Group 0 also moves the gateway's own external address; group 2 holds no EIP.
    assert "10.115.48.1/21 dev net2" in text[text.index("vrrp_instance g0") : text.index("vrrp_instance g1")]
    assert "virtual_ipaddress_excluded" not in text[text.index("vrrp_instance g2") :]


def test_a_member_with_priority_0_runs_no_instance_for_that_group(tmp_path: Path) -> None:
    state = state_of(groups=[{"priorities": [200, 0, 100]}, {"priorities": [100, 200, 0]}])
    config = state.scale_out
    assert config is not None
    text = keepalived_conf(config, 1, group_addresses(state, config), "net2", HaPaths(tmp_path))
    assert "vrrp_instance g0" not in text and "vrrp_instance g1" in text


def test_conntrackd_two_members_ftfw_unicast_more_notrack_multicast(tmp_path: Path) -> None:
    paths = HaPaths(tmp_path)
    two = state_of(2).scale_out
    three = state_of(3).scale_out
    assert two is not None and three is not None
    text = conntrackd_conf(two, 0, paths)
    assert "    Mode FTFW {" in text
    assert "        IPv4_Destination_Address 172.20.10.12" in text and "Multicast" not in text
    text = conntrackd_conf(three, 2, paths)
    assert "    Mode NOTRACK {" in text
    assert "        IPv4_address 225.0.0.50\n        Group 3780\n        IPv4_interface 172.20.10.13" in text
    # Neither the members' own traffic nor loopback is replicated.
    for address in ("127.0.0.1", "172.20.10.11", "172.20.10.12", "172.20.10.13"):
        assert f"            IPv4_address {address}\n" in text


def test_notify_lines_and_instance_names() -> None:
    assert parse_notify_instance('INSTANCE "g3" MASTER 200\n') == ("g3", Role.MASTER)
    assert parse_notify('INSTANCE "natgwd" BACKUP 100') == "backup"
    assert parse_notify_instance("GROUP x") is None
    assert [group_of_instance(n) for n in ("g0", "g12", "natgwd", "g", "gx")] == [0, 12, None, None, None]


def advert(source: str, vrid: int, priority: int, header_words: int = 5) -> bytes:
    ip = bytes([0x40 | header_words]) + bytes(8) + bytes([112]) + bytes(2)
    ip += IPv4Address(source).packed + IPv4Address("172.20.10.11").packed + bytes(4 * (header_words - 5))
    return ip + bytes([0x31, vrid, priority, 1, 0, 20, 0, 0]) + IPv4Address("169.254.0.60").packed


def test_parse_advert() -> None:
    assert parse_advert(advert("172.20.10.12", 61, 200)) == (M1, 61, 200)
    assert parse_advert(advert("172.20.10.12", 61, 0, header_words=6)) == (M1, 61, 0)
    assert parse_advert(advert("172.20.10.12", 61, 200)[:27]) is None
    version2 = bytearray(advert("172.20.10.12", 61, 200))
    version2[20] = 0x21
    assert parse_advert(bytes(version2)) is None


@pytest.fixture
def member(tmp_path: Path) -> Iterator[tuple[ScaleController, dict[int, IPv4Address | None], list[FakeAdvertListener]]]:
    routes: dict[int, IPv4Address | None] = {}
    listeners: list[FakeAdvertListener] = []
    controller = scale_controller(
        tmp_path, M1, set_route=lambda table, via, _interface: routes.__setitem__(table, via), listeners=listeners
    )
    supervisor = Supervisor()
    controller.start(supervisor, lambda _path, _text: True, lambda: None)
    yield controller, routes, listeners
    controller.leave()
    supervisor.stop()


def test_routes_follow_this_members_roles_and_the_adverts_it_hears(
    member: tuple[ScaleController, dict[int, IPv4Address | None], list[FakeAdvertListener]],
) -> None:
    controller, routes, listeners = member
    state = state_of()
    controller.applied(state, complete=True)
    # Nobody known to own anything yet: nothing is handed over.
    assert routes == {4300: None, 4301: None, 4302: None}
    hear = listeners[0].on_advert
    hear(M0, 60, 200)
    hear(M2, 62, 200)
    controller.on_role("g1", Role.MASTER)
    assert routes == {4300: M0, 4301: None, 4302: M2}
    assert controller.ownership.owned() == frozenset({"my-eip2"})
    assert controller.owners() == {"g0": str(M0), "g1": str(M1), "g2": str(M2)}
    # M2 dies; M0 takes g2 over and advertises it.
    hear(M0, 62, 180)
    assert routes[4302] == M0
    # A preempted owner's last adverts do not make this member give its group up.
    controller.on_role("g1", Event.HEALED)
    assert controller.ownership.owned() == frozenset({"my-eip2"})
    # This member loses g1: no route until the new owner advertises.
    controller.on_role("g1", Role.BACKUP)
    assert routes[4301] is None and controller.ownership.owned() == frozenset()
    hear(M2, 61, 200)
    assert routes[4301] == M2
    # An owner that stops advertises priority 0: its group is translated here until the next owner speaks.
    hear(M2, 61, 0)
    assert routes[4301] is None


def test_ownership_listeners_hear_every_change(
    member: tuple[ScaleController, dict[int, IPv4Address | None], list[FakeAdvertListener]],
) -> None:
    controller, _, _ = member
    heard: list[frozenset[str]] = []
    controller.ownership.subscribe(heard.append)
    controller.applied(state_of(), complete=True)
    controller.on_role("g0", Role.MASTER)
    controller.on_role("g0", Role.BACKUP)
    assert heard == [frozenset({"my-eip"}), frozenset()]


def test_a_state_that_lists_no_address_of_this_member_is_refused(
    member: tuple[ScaleController, dict[int, IPv4Address | None], list[FakeAdvertListener]],
) -> None:
    controller, _, _ = member
    document = doc()
    document["scaleOut"]["members"] = [{"address": "172.20.10.11"}, {"address": "172.20.10.13"}]
    problems = controller.check(load_state(json.dumps(document).encode()))
    assert [p.path for p in problems] == ["$.scaleOut.members"]
    assert "172.20.10.12" in problems[0].reason
    assert controller.check(state_of()) == []


def test_members_seen_counts_those_heard_lately(
    member: tuple[ScaleController, dict[int, IPv4Address | None], list[FakeAdvertListener]],
) -> None:
    controller, _, listeners = member
    controller.applied(state_of(), complete=True)
    assert controller.members_seen() == 1
    listeners[0].on_advert(M0, 60, 200)
    assert controller.members_seen() == 2
    controller._seen[M0] = time.monotonic() - 10  # heard long ago
    assert controller.members_seen() == 1


def test_status_names_each_groups_owner_from_the_kernels_view() -> None:
    from natgwd.ha.scale_status import format_groups, group_statuses

    state = state_of()
    local = [M1, IPv4Address("169.254.0.61")]  # this member holds g1's marker
    routes = {4300: M0, 4301: None, 4302: None}
    statuses = group_statuses(state, local, routes, {4300: 12})
    assert [(s.group, s.owner, s.eips, s.handed_over_packets) for s in statuses] == [
        ("g0", str(M0), ("my-eip",), 12),
        ("g1", "this member", ("my-eip2",), 0),
        ("g2", "unknown", (), 0),
    ]
    assert format_groups(statuses).splitlines() == [
        "GROUP  VRID  OWNER         HANDED OVER  EIPS",
        "g0     60    172.20.10.11  12           my-eip",
        "g1     61    this member   0            my-eip2",
        "g2     62    unknown       0            -",
    ]


def test_the_bfd_gate_opens_once_every_groups_owner_is_known_and_closes_when_natgwd_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children that run (a script standing in for keepalived and conntrackd), a gate that
    records what it is told and answers reads from a kernel the test can wipe."""
    monkeypatch.setattr(scale, "GATE_ENGINE_SETTLE_SECONDS", 3600.0)
    engine = tmp_path / "engine"
    engine.write_text("#!/bin/sh\nexec sleep 60\n")
    engine.chmod(0o755)
    written: list[bool] = []
    kernel = {"open": False}

    def gate(_interface: str, open_: bool | None) -> bool:
        if open_ is not None:
            written.append(open_)
            kernel["open"] = open_
        return kernel["open"]

    listeners: list[FakeAdvertListener] = []
    controller = scale_controller(tmp_path, M1, engine=str(engine), bfd_gate=gate, listeners=listeners)
    supervisor = Supervisor()
    try:
        controller.start(supervisor, lambda _path, _text: True, lambda: None)
        controller.applied(state_of(), complete=True)
        deadline = time.monotonic() + 10
        while controller.readiness()[0] is not None:  # the children running
            assert time.monotonic() < deadline, controller.readiness()
            time.sleep(0.05)
        controller.update_gate()
        # Ready by /readyz, but no group's owner known: closed.
        assert not controller.serving() and written == [False]
        listeners[0].on_advert(M0, 60, 200)
        controller.on_role("g1", Role.MASTER)
        controller.update_gate()
        assert written == [False]  # g2's owner still unknown
        listeners[0].on_advert(M2, 62, 200)
        controller.update_gate()
        # Every owner known, but the engines have not run for the settle time: an engine
        # that exits at once on every start must not open the gate between its restarts.
        assert not controller.serving() and written == [False]
        monkeypatch.setattr(scale, "GATE_ENGINE_SETTLE_SECONDS", 0.0)
        controller.update_gate()
        assert controller.serving() and written == [False, True]
        controller.update_gate()
        assert written == [False, True]  # written on changes only
        kernel["open"] = False  # the table made anew: its gate closed
        controller.update_gate(verify=True)
        assert written[-1] is True and kernel["open"]
        controller.stop()
        assert written[-1] is False
    finally:
        controller.leave()
        supervisor.stop()
