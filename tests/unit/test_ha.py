"""The HA pieces without root: the `ha` section's validation, the keepalived and
conntrackd configurations (exact text), the link plan of an HA member, the notify and
statistics parsers, the peer hello, and the supervisor with real (harmless) children."""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from natgwd.ha import announce as ha_announce
from natgwd.ha.controller import HaController
from natgwd.ha.metrics import HaMetrics, parse_stats
from natgwd.ha.notify import parse_notify
from natgwd.ha.peer import decode_hello, encode_hello
from natgwd.ha.render import HaPaths, conntrackd_conf, keepalived_conf
from natgwd.ha.roles import Role
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.links import RouteSpec, link_plan
from natgwd.process.supervisor import Child, ChildSpec, Supervisor
from natgwd.state.ha import HaConfig, HaMember, virtual_addresses
from natgwd.state.validation import InvalidStateError, Problem, load_state
from tests.unit.fakes import quiet_ha_kernel

HA_SECTION: dict[str, Any] = {
    "interface": "sync0",
    "virtualRouterId": 51,
    "advertInterval": 0.2,
    "members": [{"address": "169.254.64.1", "priority": 150}, {"address": "169.254.64.2", "priority": 100}],
}


def ha_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["ha"] = {**json.loads(json.dumps(HA_SECTION)), **changes}
    return doc


def problems(doc: dict[str, Any]) -> list[Problem]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(doc).encode())
    return caught.value.problems


# --- validation -----------------------------------------------------------------------


def test_ha_section_parses_with_defaults() -> None:
    state = load_state(json.dumps(ha_doc()).encode())
    assert state.ha == HaConfig(
        interface="sync0",
        virtual_router_id=51,
        advert_interval=Decimal("0.2"),
        preempt=False,
        conntrack_sync=True,
        members=(HaMember(IPv4Address("169.254.64.1"), 150), HaMember(IPv4Address("169.254.64.2"), 100)),
    )


def test_state_without_ha_has_none() -> None:
    assert load_state(json.dumps(SEED_STATE).encode()).ha is None


@pytest.mark.parametrize(
    ("value", "written"), [(1, "1"), (10, "10"), (0.01, "0.01"), (2.5, "2.5"), (40.95, "40.95"), (0.50, "0.5")]
)
def test_advert_interval_accepts_centiseconds(value: float, written: str) -> None:
    state = load_state(json.dumps(ha_doc(advertInterval=value)).encode())
    assert state.ha is not None and str(state.ha.advert_interval) == written


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "must be between 0.01 and 40.95 seconds (VRRPv3)"),
        (41, "must be between 0.01 and 40.95 seconds (VRRPv3)"),
        (0.005, "must be between 0.01 and 40.95 seconds (VRRPv3)"),
        (0.125, "must be a multiple of 0.01 seconds (VRRPv3 counts centiseconds)"),
    ],
)
def test_advert_interval_out_of_range(value: float, reason: str) -> None:
    assert problems(ha_doc(advertInterval=value)) == [Problem("$.ha.advertInterval", reason)]


def test_advert_interval_must_be_a_number() -> None:
    assert problems(ha_doc(advertInterval="0.2")) == [Problem("$.ha.advertInterval", "must be a number")]


def test_members_must_differ() -> None:
    doc = ha_doc(members=[{"address": "169.254.64.1", "priority": 100}, {"address": "169.254.64.1", "priority": 100}])
    assert problems(doc) == [
        Problem("$.ha.members[1].address", "must differ from members[0].address"),
        Problem("$.ha.members[1].priority", "must differ from members[0].priority"),
    ]


def test_exactly_two_members() -> None:
    found = problems(ha_doc(members=[{"address": "169.254.64.1", "priority": 100}]))
    assert [p.path for p in found] == ["$.ha.members"]
    assert "is too short" in found[0].reason


def test_member_address_must_be_unicast() -> None:
    doc = ha_doc(members=[{"address": "224.0.0.18", "priority": 100}, {"address": "169.254.64.2", "priority": 90}])
    assert problems(doc) == [Problem("$.ha.members[0].address", "224.0.0.18 is not a usable unicast address")]


def test_sync_interface_must_not_be_a_nat_interface() -> None:
    assert problems(ha_doc(interface="net2")) == [
        Problem("$.ha.interface", "must differ from internal.interface and external.interface")
    ]


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("virtualRouterId", 0, "$.ha.virtualRouterId"),
        ("virtualRouterId", 256, "$.ha.virtualRouterId"),
        ("preempt", "yes", "$.ha.preempt"),
        ("unicastPeers", [], "$.ha.unicastPeers"),
    ],
)
def test_ha_shape_problems(field: str, value: Any, path: str) -> None:
    assert [p.path for p in problems(ha_doc(**{field: value}))] == [path]


def test_priority_range() -> None:
    doc = ha_doc(members=[{"address": "169.254.64.1", "priority": 255}, {"address": "169.254.64.2", "priority": 0}])
    assert [p.path for p in problems(doc)] == ["$.ha.members[0].priority", "$.ha.members[1].priority"]


def test_member_on_finds_self_and_peer() -> None:
    state = load_state(json.dumps(ha_doc()).encode())
    assert state.ha is not None
    first, second = state.ha.members
    assert state.ha.member_on([IPv4Address("169.254.64.2"), IPv4Address("10.0.0.1")]) == (second, first)
    assert state.ha.member_on([IPv4Address("169.254.64.1")]) == (first, second)
    assert state.ha.member_on([IPv4Address("169.254.64.3")]) is None


# --- link plan ------------------------------------------------------------------------


def test_ha_member_configures_no_moving_address_and_keeps_routes_onlink() -> None:
    state = load_state(json.dumps(ha_doc()).encode())
    plan = link_plan(state)
    assert [(i.name, i.addresses) for i in plan.interfaces] == [("net1", frozenset()), ("net2", frozenset())]
    assert plan.routes == (
        RouteSpec(IPv4Network("0.0.0.0/0"), IPv4Address("10.115.55.254"), "net2", onlink=True),
        RouteSpec(IPv4Network("10.55.0.0/16"), IPv4Address("172.20.10.1"), "net1", onlink=True),
    )
    assert virtual_addresses(state) == {
        "net1": (IPv4Interface("172.20.10.254/24"),),
        "net2": (
            IPv4Interface("10.115.48.1/21"),
            IPv4Interface("10.115.55.200/21"),
            IPv4Interface("10.115.55.201/21"),
        ),
    }


def test_single_gateway_plan_is_unchanged() -> None:
    plan = link_plan(load_state(json.dumps(SEED_STATE).encode()))
    assert plan.interfaces[0].addresses == frozenset({IPv4Interface("172.20.10.254/24")})
    assert RouteSpec(IPv4Network("10.55.0.0/16"), IPv4Address("172.20.10.1"), "net1", onlink=False) in plan.routes


# --- rendering ------------------------------------------------------------------------

KEEPALIVED_CONF = """\
# Written by natgwd from the desired state; changes here are overwritten.
global_defs {
    router_id natgwd-51
    vrrp_version 3
    notify_fifo /run/ngw/keepalived.fifo
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 3
}

vrrp_instance natgwd {
    state BACKUP
    interface sync0
    dont_track_primary
    virtual_router_id 51
    priority 100
    advert_int 0.2
    garp_lower_prio_repeat 3
    nopreempt
    unicast_src_ip 169.254.64.2
    unicast_peer {
        169.254.64.1
    }
    virtual_ipaddress {
        172.20.10.254/24 dev net1
    }
    virtual_ipaddress_excluded {
        10.115.48.1/21 dev net2
        10.115.55.200/21 dev net2
        10.115.55.201/21 dev net2
    }
}
"""

CONNTRACKD_CONF = """\
# Written by natgwd from the desired state; changes here are overwritten.
Sync {
    Mode FTFW {
        DisableExternalCache on
        StartupResync on
    }
    UDP {
        IPv4_address 169.254.64.2
        IPv4_Destination_Address 169.254.64.1
        Port 3780
        Interface sync0
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }
}

General {
    HashSize 32768
    HashLimit 131072
    LogFile off
    Syslog off
    LockFile /run/ngw/conntrackd.lock
    UNIX {
        Path /run/ngw/conntrackd.ctl
    }
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    NetlinkEventsReliable On
    Filter From Userspace {
        Protocol Accept {
            TCP
            UDP
            ICMP
        }
        Address Ignore {
            IPv4_address 127.0.0.1
            IPv4_address 169.254.64.2
            IPv4_address 169.254.64.1
        }
    }
}
"""


def second_member(doc: dict[str, Any]) -> tuple[Any, HaConfig, HaMember, HaMember]:
    state = load_state(json.dumps(doc).encode())
    assert state.ha is not None
    found = state.ha.member_on([IPv4Address("169.254.64.2")])
    assert found is not None
    return state, state.ha, *found


def test_keepalived_conf_exact() -> None:
    state, ha, me, peer = second_member(ha_doc())
    text = keepalived_conf(ha, me, peer, virtual_addresses(state), HaPaths(Path("/run/ngw")), "net1")
    assert text == KEEPALIVED_CONF


def test_keepalived_conf_with_preemption_has_no_nopreempt() -> None:
    state, ha, me, peer = second_member(ha_doc(preempt=True, advertInterval=1))
    text = keepalived_conf(ha, me, peer, virtual_addresses(state), HaPaths(Path("/run/ngw")), "net1")
    assert "nopreempt" not in text
    assert "    advert_int 1\n" in text


def test_keepalived_conf_without_eips_has_no_empty_block() -> None:
    doc = ha_doc()
    for section in ("eips", "snat", "dnat", "fip"):
        doc[section] = []
    doc["external"]["addresses"] = []
    state, ha, me, peer = second_member(doc)
    text = keepalived_conf(ha, me, peer, virtual_addresses(state), HaPaths(Path("/run/ngw")), "net1")
    assert "virtual_ipaddress_excluded" not in text
    assert "    virtual_ipaddress {\n        172.20.10.254/24 dev net1\n    }\n" in text


def test_conntrackd_conf_exact() -> None:
    _, ha, me, peer = second_member(ha_doc())
    assert conntrackd_conf(ha, me, peer, HaPaths(Path("/run/ngw"))) == CONNTRACKD_CONF


# --- parsers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "role"),
    [
        ('INSTANCE "natgwd" MASTER 150\n', "master"),
        ('INSTANCE "natgwd" BACKUP 150', "backup"),
        ('INSTANCE "natgwd" FAULT 0', "fault"),
        ('GROUP "g" MASTER', None),
        ("", None),
    ],
)
def test_parse_notify(line: str, role: str | None) -> None:
    assert parse_notify(line) == role


STATS = """\
cache internal:
current active connections:\t           3
connections created:\t\t           7\tfailed:\t           0

cache external:
current active connections:\t           2
connections created:\t\t           2\tfailed:\t           0

traffic processed:
                   0 Bytes                         0 Pckts

UDP traffic (active device=sync0):
                 916 Bytes sent                  480 Bytes recv
                  21 Pckts sent                   12 Pckts recv
                   1 Error send                    0 Error recv

message tracking:
                   0 Malformed msgs                    4 Lost msgs
"""

QUEUES = """\
queue txqueue:
current elements:\t\t           0

queue rsqueue:
current elements:\t\t           5
maximum elements:\t\t      131072
"""


def test_ha_metrics_only_where_ha_is_configured(tmp_path: Path) -> None:
    """Zeros on a gateway without HA would read as 'this member is not master'."""
    registry = CollectorRegistry()
    kernel = quiet_ha_kernel()
    HaController(tmp_path, lambda _interface, _count: None, registry, kernel)  # no state applied yet
    assert b"natgwd_ha_" not in generate_latest(registry)

    registry, active = CollectorRegistry(), [False]
    metrics = HaMetrics(registry, lambda: active[0])
    metrics.set_role(Role.MASTER)
    assert b"natgwd_ha_" not in generate_latest(registry)
    active[0] = True
    exported = generate_latest(registry).decode()
    assert 'natgwd_ha_role{role="master"} 1.0' in exported
    assert 'natgwd_ha_role{role="backup"} 0.0' in exported
    assert 'natgwd_ha_transitions_total{role="master"} 0.0' in exported


def test_a_member_finds_itself_through_the_kernel_it_is_given(tmp_path: Path) -> None:
    """HaController asks the kernel only through HaKernel: which addresses the sync
    interface holds decides whether it is a member; a read that fails, or an address
    of neither member, is a readiness reason and starts nothing."""
    state = load_state(json.dumps(ha_doc()).encode())
    asked: list[str] = []

    def addresses(interface: str) -> list[IPv4Address]:
        asked.append(interface)
        if len(asked) == 1:
            raise OSError("netlink refused")
        return [IPv4Address("169.254.64.9")]

    kernel = quiet_ha_kernel(addresses)
    controller = HaController(tmp_path, lambda _interface, _count: None, CollectorRegistry(), kernel)
    controller.start(lambda: None)
    try:
        controller.applied(state, "a" * 64, complete=True)
        assert controller.readiness()[0] == "cannot read the addresses of sync0: netlink refused"
        controller.applied(state, "a" * 64, complete=True)
        reason, detail = controller.readiness()
        assert reason == "sync interface sync0 holds neither ha.members address (169.254.64.1 or 169.254.64.2)"
        assert detail == {"ha": {"role": "init"}}
        assert asked == ["sync0", "sync0"]
        assert not controller.paths.keepalived_conf.exists()
    finally:
        controller.stop()


def test_parse_conntrackd_stats() -> None:
    assert parse_stats(STATS, QUEUES) == {
        "entries_internal": 3,
        "entries_external": 2,
        "bytes_sent": 916,
        "bytes_received": 480,
        "messages_sent": 21,
        "messages_received": 12,
        "send_errors": 1,
        "receive_errors": 0,
        "messages_lost": 4,
        "resend_queue": 5,
    }


def test_parse_conntrackd_stats_of_nothing() -> None:
    assert parse_stats("", "") == {}


def test_hello_round_trip_and_garbage() -> None:
    assert decode_hello(encode_hello("ab" * 32, "master")) == ("ab" * 32, "master")
    assert decode_hello(encode_hello(None, "init")) == (None, "init")
    for junk in (b"", b"[]", b'{"role": 5}', b'{"sha256": 1, "role": "x"}', b"x" * 600):
        assert decode_hello(junk) is None


# --- supervisor -----------------------------------------------------------------------


def test_supervisor_restarts_and_logs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    starts = tmp_path / "starts"
    lock = tmp_path / "lock"
    lock.write_text("stale")
    script = f"import sys; open({str(starts)!r}, 'a').write('x'); print('hello from child'); sys.exit(3)"
    exits: list[int] = []
    supervisor = Supervisor()
    try:
        supervisor.run(
            ChildSpec("crasher", (sys.executable, "-c", script), prepare=lambda: lock.unlink(missing_ok=True)),
            on_exit=lambda _name, code: exits.append(code),
        )
        deadline = time.monotonic() + 15
        while len(exits) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        status = supervisor.statuses()["crasher"]
    finally:
        supervisor.stop()
    assert exits[:3] == [3, 3, 3]
    assert status.restarts >= 2 and status.last_exit == 3
    assert not lock.exists()
    assert "hello from child" in capsys.readouterr().out
    assert len(starts.read_text()) >= 3


def test_a_child_that_keeps_exiting_is_restarted_with_doubling_backoff() -> None:
    """Driven with its own clock: the restart comes exactly when its backoff has passed,
    not a moment before, and each exit doubles the backoff up to its ceiling."""
    child = Child(ChildSpec("crasher", (sys.executable, "-c", "import sys; sys.exit(3)")))
    now, waits = 1000.0, []
    try:
        child.start()
        for _ in range(10):
            assert child._process is not None
            child._process.wait()
            child.check(now)  # sees the exit
            assert not child.status.up and child.status.last_exit == 3
            backoff = child._start_at - now
            child.check(now + backoff - 0.001)
            assert not child.status.up, "restarted before its backoff passed"
            now += backoff
            child.check(now)
            assert child.status.up
            waits.append(round(backoff, 3))
    finally:
        child.stop()
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    assert child.status.restarts == 10


def test_supervisor_stops_children(tmp_path: Path) -> None:
    supervisor = Supervisor()
    supervisor.run(ChildSpec("sleeper", (sys.executable, "-c", "import time; time.sleep(60)")))
    deadline = time.monotonic() + 10

    def started_pid() -> int | None:
        status = supervisor.statuses().get("sleeper")
        return status.pid if status else None

    # The status entry appears when the child is registered, its pid once it was spawned.
    while started_pid() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = started_pid()
    assert pid is not None
    supervisor.stop()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


# --- announcements --------------------------------------------------------------------


def test_announcements_stop_when_no_longer_active(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, tuple[str, ...]]] = []
    active = [True]

    def fake_send(interface: str, addresses: list[IPv4Address]) -> int:
        sent.append((interface, tuple(map(str, addresses))))
        if len(sent) == 4:  # two rounds of two interfaces
            active[0] = False
        return len(addresses)

    monkeypatch.setattr(ha_announce, "INTERVAL_SECONDS", 0.01)
    counted: list[tuple[str, int]] = []
    announcer = ha_announce.ActiveAnnouncer(
        lambda: active[0], fake_send, lambda name, frames: counted.append((name, frames))
    )
    announcer.request({"net1": [IPv4Address("172.20.10.254")], "net2": [IPv4Address("10.115.55.200")]})
    deadline = time.monotonic() + 5
    while len(sent) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the third round would come 0.01 s later: give it ten times that
    assert sent == [("net1", ("172.20.10.254",)), ("net2", ("10.115.55.200",))] * 2
    assert counted == [("net1", 1), ("net2", 1)] * 2
