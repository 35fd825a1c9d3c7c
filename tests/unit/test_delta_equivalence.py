"""The delta path (natgwd.state.tracker, TablePlan.change, Reconciler.apply with a delta)
against the full path: for random valid states and random edits, the delta path accepts
exactly when the full path does, and yields the same state, the same table in the kernel
(FakeNft) and the same problems.

The values are drawn from small pools so that edits collide often: duplicate names,
overlapping ports, share groups, FIPs on DNAT EIPs, unknown EIPs, unreachable or
malformed addresses, ports typed 80, "80", 80.0 or true, IPv6 addresses spelled several
ways (FD00:10:0::2 is fd00:10::2: the same key wherever an address is one), SNAT
pools that gain, lose and repeat EIPs, SNAT rules by destination that overlap."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natgwd.kernel.fake import FakeNft
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.decode import scanner
from natgwd.state.semantics import Validated
from natgwd.state.spans import layout_of
from natgwd.state.tracker import StateTracker
from natgwd.state.validation import InvalidStateError, validate, validate_document
from tests.unit.fakes import FakeLinks

FRAME: dict[str, Any] = {
    "version": 1,
    "internal": {
        "interface": "net1",
        "addresses": ["172.20.10.254/24", "fd00:10::fe/64"],
        "routes": [{"dst": "172.30.0.0/16", "via": "172.20.10.1"}],
    },
    "external": {"interface": "net2", "addresses": ["10.115.55.254/24", "fd00:115::fe/64"], "gateway": "10.115.55.1"},
    "eips": [
        {"name": "e1", "v4ip": "10.115.55.200"},
        {"name": "e2", "v4ip": "10.115.55.201", "v6ip": "fd00:115::201"},
        {"name": "e3", "v4ip": "10.115.55.202"},
        {"name": "e6", "v6ip": "FD00:115:0::206"},
    ],
}

# Valid values repeated: most rules drawn are valid, and collide with each other.
# Two external networks: rules also fill the maps that steer packets to their network.
TWO_NETWORKS: dict[str, Any] = {
    **FRAME,
    "externals": [{"name": "ext2", "interface": "net3", "addresses": ["10.116.0.1/24"], "gateway": "10.116.0.254"}],
    "eips": [*FRAME["eips"][:2], {"name": "e3", "v4ip": "10.116.0.203"}, FRAME["eips"][3]],
}

names = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"])
eips = st.sampled_from(["e1", "e1", "e2", "e2", "e3", "e6", "nope"])
reachable = ["172.20.10.2", "172.20.10.2", "172.20.10.3", "172.20.10.4", "172.30.1.1", "fd00:10::2", "fd00:10::3"]
reachable += ["FD00:10::2", "fd00:10:0:0::3", "fd00:0010::2"]
internal_ips = st.sampled_from([*reachable, "192.168.9.9", "10.0.0.300"])
ports = st.sampled_from([80, 80, 81, 81, "80", 8080, 1, "80-81", "81-82", 80.0, True, 0, "70000", "82-81"])
cidrs = st.sampled_from(
    ["172.20.10.0/24", "172.20.10.0/26", "172.20.10.1/24", "172.30.0.0/16", "fd00:10::/64", "FD00:10:0::/64"]
)
# Another EIP: a new address, or e2's or e6's address spelled another way.
new_eips = st.sampled_from(
    [
        {"name": "e9", "v4ip": "10.115.55.209"},
        {"name": "e8", "v4ip": "10.99.0.8"},  # outside the external subnet: a host prefix
        {"name": "e7", "v4ip": "10.115.55.200"},  # e1's address
        {"name": "e1", "v4ip": "10.115.55.207"},  # e1's name
        {"name": "e7", "v4ip": "224.0.0.7"},  # no unicast address
        {"name": "e7", "v4ip": "10.115.55.207", "qosPolicy": "q"},
        {"name": "e9", "v6ip": "fd00:115:0::201"},
        {"name": "e9", "v6ip": "fd00:115::206"},
    ]
)

# Idle timeouts: the same policy on several rules, one that differs, the schema's refusals
# (zero; `true`, which equals 1 in Python), and an empty one (no policy).
timeouts = st.sampled_from(
    [{"udp": 5}, {"udp": 5}, {"tcpEstablished": 7, "tcpStates": {"time_wait": 3}}, {}, {"udp": 0}, {"udp": True}]
)
# A gateway policy, so that rules without their own have one too.
TIMED: dict[str, Any] = {**FRAME, "timeouts": {"tcpEstablished": 1200, "udp": 30}}

# Port blocks: fitting a /24 or /26, too big for a /24, or on IPv6 (refused).
port_blocks = st.sampled_from([{"size": 200}, {"size": 252, "firstPort": 1024}, {"size": 900, "firstPort": 2000}])
pools = st.lists(eips, min_size=1, max_size=3)  # a SNAT pool (natgwd.planning.pools)
# SNAT rules by destination (natgwd.state.destinations), overlapping often.
destinations = st.lists(
    st.sampled_from(["198.51.100.0/24", "198.51.100.0/25", "203.0.113.7", "fd00:99::/64", "0.0.0.0/0", "nope"]),
    min_size=1,
    max_size=2,
)
snat_items = st.one_of(
    st.fixed_dictionaries(
        {"name": names, "eip": eips, "internalCIDR": cidrs},
        optional={"timeouts": timeouts, "destinations": destinations, "portBlock": port_blocks},
    ),
    st.fixed_dictionaries(
        {"name": names, "eips": pools, "internalCIDR": cidrs},
        optional={"timeouts": timeouts, "destinations": destinations},
    ),
)
fip_items = st.fixed_dictionaries(
    {"name": names, "eip": eips, "internalIp": internal_ips}, optional={"timeouts": timeouts}
)
dnat_items = st.fixed_dictionaries(
    {
        "name": names,
        "eip": eips,
        "protocol": st.sampled_from(["tcp", "udp"]),
        "externalPort": ports,
        "internalIp": internal_ips,
        "internalPort": ports,
    },
    optional={"type": st.sampled_from(["exclusive", "share", "share"]), "timeouts": timeouts},
)
ITEMS = {"snat": snat_items, "dnat": dnat_items, "fip": fip_items}
FIELDS = {
    "snat": {
        "eip": eips,
        "eips": pools,
        "internalCIDR": cidrs,
        "timeouts": timeouts,
        "destinations": destinations,
        "portBlock": port_blocks,
    },
    "dnat": {
        "eip": eips,
        "externalPort": ports,
        "internalIp": internal_ips,
        "internalPort": ports,
        "timeouts": timeouts,
    },
    "fip": {"eip": eips, "internalIp": internal_ips, "timeouts": timeouts},
}


def encode(document: dict[str, Any], indent: int | None = None) -> bytes:
    return json.dumps(document, indent=indent).encode()


def made_valid(document: dict[str, Any]) -> Validated:
    """Drop the rules the full path refuses until it accepts (what is left of a random draw)."""
    while True:
        try:
            return validate(encode(document))
        except InvalidStateError as err:
            culprits = {(p.section, p.index) for p in err.problems if p.section is not None}
            assert culprits, err
            for section in ("snat", "dnat", "fip"):
                document[section] = [item for i, item in enumerate(document[section]) if (section, i) not in culprits]


@st.composite
def edits(draw: st.DrawFn, document: dict[str, Any]) -> dict[str, Any]:
    edited = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["snat", "dnat", "fip"]))
        items = edited[section]
        action = draw(
            st.sampled_from(["insert", "delete", "delete", "change", "retype", "join", "leave", "move", "frame"])
        )
        if action == "insert" or not items:
            item = draw(ITEMS[section])
            # Mostly an EIP another rule uses already: that is where rules conflict.
            used = [rule["eip"] for kind in ("snat", "dnat", "fip") for rule in edited[kind] if "eip" in rule]
            if used and draw(st.booleans()):
                item["eip"] = draw(st.sampled_from(used))
            items.insert(draw(st.integers(0, len(items))), item)
        elif action == "delete":
            items.pop(draw(st.integers(0, len(items) - 1)))
        elif action == "leave" and section == "dnat" and (shared := [i for i, r in enumerate(items) if r.get("type")]):
            items.pop(draw(st.sampled_from(shared)))
        elif action == "change":
            item = items[draw(st.integers(0, len(items) - 1))]
            field = draw(st.sampled_from(sorted(FIELDS[section])))
            item[field] = draw(FIELDS[section][field])
        elif action == "retype" and section == "dnat":
            # The same port in another JSON type: equal in Python, not to the schema.
            item = items[draw(st.integers(0, len(items) - 1))]
            field = draw(st.sampled_from(["externalPort", "internalPort"]))
            value = item[field]
            if type(value) is int:
                item[field] = draw(st.sampled_from([str(value), float(value)] + ([True] if value == 1 else [])))
        elif action == "join" and section == "dnat":
            # Another backend for the identity of an existing rule (a share group's, or a
            # conflict with an exclusive rule).
            item = dict(items[draw(st.integers(0, len(items) - 1))])
            item.update(name=draw(names), internalIp=draw(internal_ips), type="share")
            items.insert(draw(st.integers(0, len(items))), item)
        elif action == "move":
            items.insert(draw(st.integers(0, len(items) - 1)), items.pop(draw(st.integers(0, len(items) - 1))))
        elif action == "frame" and edited["eips"] and draw(st.booleans()):
            # eip-del: the EIP and, mostly, every rule that names it (a rule left naming it is refused).
            gone = edited["eips"].pop(draw(st.integers(0, len(edited["eips"]) - 1)))["name"]
            if draw(st.integers(0, 3)):
                for kind in ("snat", "dnat", "fip"):
                    edited[kind] = [rule for rule in edited[kind] if rule.get("eip") != gone]
        else:
            edited["eips"] = [*edited["eips"], draw(new_eips)]
    return edited


def reconciler() -> Reconciler:
    return Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=lambda: False)


def check(data: st.DataObject) -> None:
    base = dict(data.draw(st.sampled_from([FRAME, TWO_NETWORKS, TIMED]), label="frame"))
    for section, strategy in ITEMS.items():
        base[section] = data.draw(st.lists(strategy, max_size=8), label=section)
    # A share group or two: backends of one (EIP, protocol, port).
    for group in range(data.draw(st.integers(0, 2), label="share groups")):
        eip, port = data.draw(st.sampled_from(["e1", "e2", "e3"])), 9000 + group
        backends = data.draw(st.lists(st.sampled_from(["172.20.10.5", "172.20.10.6", "172.20.10.7"]), min_size=1))
        base["dnat"] += [
            {"name": f"s{group}{i}", "eip": eip, "protocol": "tcp", "externalPort": port}
            | {"internalIp": ip, "internalPort": 80, "type": "share"}
            for i, ip in enumerate(backends)
        ]
    accepted = made_valid(base)
    edited = data.draw(edits(accepted.document), label="edited")
    # The text matters too: a change inside one rule list is decoded alone (state.spans).
    indent = data.draw(st.sampled_from([None, 1, 2]), label="indent")
    raw = encode(edited, indent)

    tracker = StateTracker()
    first = tracker.check(encode(accepted.document, data.draw(st.sampled_from([indent, None]), label="base indent")))
    tracker.accept(first)
    try:
        full = validate(raw)
    except InvalidStateError as refused:
        with pytest.raises(InvalidStateError) as caught:
            tracker.check(raw)
        assert caught.value.problems == refused.problems
        return
    change = tracker.check(raw)
    assert change.state == full.state
    assert change.validated.document == full.document
    # A valid change of rules alone is decided on the delta path (a refusal there would
    # only cost time, since the full path then decides); one of plain EIPs may be too
    # (natgwd.state.eipdelta), any other change of the frame is not.
    frame_changed = any(edited.get(key) != accepted.document.get(key) for key in TWO_NETWORKS if key != "eips")
    if frame_changed:
        assert change.delta is None
    elif edited.get("eips") == accepted.document.get("eips"):
        assert change.delta is not None

    by_delta, in_full = reconciler(), reconciler()
    for rec in (by_delta, in_full):
        rec.apply(first.state)
    outcome = by_delta.apply(change.state, change.delta, change.base)
    assert outcome.by_delta == (change.delta is not None)
    in_full.apply(full.state)
    delta_kernel, full_kernel = by_delta.nft.table, in_full.nft.table  # type: ignore[attr-defined]
    assert delta_kernel == full_kernel
    assert by_delta.verify_plan(validate_document(json.loads(raw)).state)
    # The next change starts from what this one left: back to the first state. Its
    # layout (a change checked in full makes it after the apply, or at the next check).
    tracker.accept(change)
    if data.draw(st.booleans(), label="settled"):
        tracker.settle()
        assert tracker.accepted is not None
        assert tracker.accepted.layout == layout_of(raw.decode(), full.document, scanner())
    back = tracker.check(encode(accepted.document))
    assert back.state == accepted.state
    assert by_delta.apply(back.state, back.delta, back.base).by_delta == (back.delta is not None)
    in_full.apply(accepted.state)
    assert by_delta.nft.table == in_full.nft.table  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_delta_path_equals_the_full_path(data: st.DataObject) -> None:
    check(data)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_delta_path_equals_the_full_path_at_length(data: st.DataObject) -> None:
    check(data)
