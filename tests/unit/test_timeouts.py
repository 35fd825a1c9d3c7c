"""Idle timeouts: the state file's `timeouts` (checks naming the field, how a rule's policy
and the gateway's combine) and the table they plan (objects, chains, one element per
rule with a policy), applied whole and change by change."""

from __future__ import annotations

import json
from typing import Any

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.plan import TablePlan, assign_ids, desired_table
from natgwd.planning.table import DeleteNamed, FlushChain, plan_transaction
from natgwd.planning.timeouts import RETAINED_OBJECTS, RULE_TIMEOUT, TIMEOUTS_CHAIN, policies_of
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.model import DesiredState
from natgwd.state.timeouts import MAX_SECONDS, TimeoutPolicy, parse_timeouts
from natgwd.state.tracker import StateTracker
from natgwd.state.validation import InvalidStateError, load_state
from tests.unit.fakes import FakeLinks


def seed(**top: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    document.update(top)
    return document


def state_of(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidStateError) as caught:
        state_of(document)
    return [(p.path, p.reason) for p in caught.value.problems]


def script(state: DesiredState) -> str:
    return plan_transaction(None, desired_table(state, assign_ids(state, {}))).script()


# --- the state file -------------------------------------------------------------------


def test_fields_resolve_to_the_kernels_states_most_specific_first() -> None:
    policy = parse_timeouts(
        {"tcpTransitory": 30, "tcpTimeWait": 120, "tcpEstablished": 1200, "udp": 20, "tcpStates": {"syn_sent": 5}}
    )
    assert policy == TimeoutPolicy(
        tcp=(
            ("syn_sent", 5),
            ("syn_recv", 30),
            ("established", 1200),
            ("fin_wait", 30),
            ("close_wait", 30),
            ("last_ack", 30),
            ("time_wait", 120),
            ("close", 30),
        ),
        udp=(("unreplied", 20), ("replied", 20)),
    )
    assert parse_timeouts({}) is None and parse_timeouts(None) is None


def test_a_rules_policy_wins_over_the_gateways_state_by_state() -> None:
    document = seed(timeouts={"tcpEstablished": 1200, "udp": 30})
    document["snat"][0]["timeouts"] = {"tcpEstablished": 5}
    state = state_of(document)
    gateway = TimeoutPolicy(tcp=(("established", 1200),), udp=(("unreplied", 30), ("replied", 30)))
    assert state.timeouts == gateway
    own = TimeoutPolicy(tcp=(("established", 5),), udp=(("unreplied", 30), ("replied", 30)))
    # The SNAT rule has its own (UDP from the gateway's); the DNAT rule and the FIP keep the gateway's.
    assert policies_of(state) == {own: 1, gateway: 2}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "must be at least 1 second"),
        (-5, "must be at least 1 second"),
        (MAX_SECONDS + 1, f"must be at most {MAX_SECONDS} seconds (the kernel's limit)"),
        ("30", "must be an integer"),
        (True, "must be an integer"),
        (2.5, "must be an integer"),
    ],
)
def test_a_bad_timeout_is_refused_naming_its_field(value: Any, reason: str) -> None:
    document = seed(timeouts={"udp": value})
    assert problems(document) == [("$.timeouts.udp", reason)]
    document = seed()
    document["dnat"][0]["timeouts"] = {"tcpStates": {"time_wait": value}}
    assert problems(document) == [("$.dnat[0].timeouts.tcpStates.time_wait", reason)]


def test_an_unknown_state_or_field_is_refused_with_the_names_allowed() -> None:
    document = seed(timeouts={"tcpStates": {"syn_snt": 3}})
    [(path, reason)] = problems(document)
    assert path == "$.timeouts.tcpStates.syn_snt"
    assert reason.startswith("unknown field (allowed here: close, close_wait, established, fin_wait, last_ack,")
    document = seed()
    document["fip"][0]["timeouts"] = {"sctp": 30}
    [(path, reason)] = problems(document)
    assert path == "$.fip[0].timeouts.sctp"
    assert reason == "unknown field (allowed here: icmp, tcpEstablished, tcpStates, tcpTimeWait, tcpTransitory, udp)"


# --- the table ------------------------------------------------------------------------


def test_without_any_policy_nothing_is_rendered() -> None:
    text = script(state_of(seed()))
    assert "timeout" not in text


def test_a_gateway_policy_gives_every_rule_its_chain() -> None:
    state = state_of(seed(timeouts={"tcpEstablished": 1200, "tcpTimeWait": 120, "udp": 30}))
    name = TimeoutPolicy(tcp=(("established", 1200), ("time_wait", 120)), udp=(("unreplied", 30), ("replied", 30))).name
    text = script(state)
    assert (
        f"add ct timeout inet natgwd {name}_tcp {{ protocol tcp; policy = {{ established: 1200, time_wait: 120 }}; }}"
        in text
    )
    assert (
        f"add ct timeout inet natgwd {name}_udp {{ protocol udp; policy = {{ unreplied: 30, replied: 30 }}; }}" in text
    )
    assert f'add rule inet natgwd {name} meta l4proto tcp ct timeout set "{name}_tcp"' in text
    assert f"add rule inet natgwd {TIMEOUTS_CHAIN} ct status & confirmed == 0 ct mark vmap @{RULE_TIMEOUT}" in text
    # Objects first: the rules that name them come after.
    assert text.index("add ct timeout") < text.index(f"add chain inet natgwd {name}")
    assert f"add element inet natgwd {RULE_TIMEOUT} {{ 1 : goto {name}, 2 : goto {name}, 3 : goto {name} }}" in text


def test_a_rule_without_a_policy_and_no_gateway_policy_has_no_element() -> None:
    document = seed()
    document["dnat"][0]["timeouts"] = {"tcpEstablished": 5}
    state = state_of(document)
    table = desired_table(state, assign_ids(state, {}))
    dnat_id = 2  # snat, dnat, fip in that order
    assert set(table.elements[RULE_TIMEOUT]) == {str(dnat_id)}
    assert [o.name.rsplit("_", 1)[1] for o in table.objects] == ["tcp"]


def reconciler() -> Reconciler:
    return Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=lambda: False)


def test_a_changed_policy_gets_new_objects_and_the_old_ones_stay_on_the_delta_path() -> None:
    """The last rule of a policy changes to another: the new object and chain come in the
    transaction that moves the element; the old object stays for the connections made
    under it (the kernel stops refreshing the connections of a deleted one)."""
    tracker, rec = StateTracker(), reconciler()
    document = seed()
    document["dnat"][0]["timeouts"] = {"tcpEstablished": 5}
    first = tracker.check(json.dumps(document).encode())
    rec.apply(first.state)
    tracker.accept(first)
    fake: FakeNft = rec.nft  # type: ignore[assignment]
    old = TimeoutPolicy(tcp=(("established", 5),)).name
    assert fake.table is not None and set(fake.table.objects) == {f"{old}_tcp"}

    document["dnat"][0]["timeouts"] = {"tcpEstablished": 9}
    change = tracker.check(json.dumps(document).encode())
    assert change.delta is not None
    outcome = rec.apply(change.state, change.delta, change.base)
    assert outcome.by_delta
    new = TimeoutPolicy(tcp=(("established", 9),)).name
    assert set(fake.table.objects) == {f"{old}_tcp", f"{new}_tcp"}
    operations = fake.transactions[-1].operations
    assert FlushChain(old) in operations and not [
        op for op in operations if isinstance(op, DeleteNamed) and op.of_object
    ]
    assert fake.table.elements[RULE_TIMEOUT] == {"2": fake.table.elements[RULE_TIMEOUT]["2"]}
    assert fake.table.elements[RULE_TIMEOUT]["2"].value == f"goto {new}"

    # The last policy gone: no element, no chain (emptied, then deleted), the objects kept.
    del document["dnat"][0]["timeouts"]
    tracker.accept(change)
    last = tracker.check(json.dumps(document).encode())
    assert rec.apply(last.state, last.delta, last.base).by_delta
    assert set(fake.table.objects) == {f"{old}_tcp", f"{new}_tcp"} and RULE_TIMEOUT not in fake.table.sets
    outcome = rec.resync()
    assert not outcome.repairs  # kept objects are no drift
    assert not [name for name in fake.table.chains if name.startswith("timeout")]
    fake.table.objects.clear()
    assert fake.table == TablePlan(last.state, rec.rule_ids).table.contents()


def test_objects_no_longer_wanted_stay_up_to_a_bound() -> None:
    """Past RETAINED_OBJECTS, the excess objects go, last in the transaction, after the
    chains that named them were flushed."""
    state = state_of(seed())
    desired = desired_table(state, assign_ids(state, {}))
    current = desired.contents()
    current.objects = {f"timeout_{i:012x}_tcp": "ct timeout" for i in range(RETAINED_OBJECTS + 2)}
    operations = plan_transaction(current, desired).operations
    assert operations == [
        DeleteNamed("timeout_000000000000_tcp", "ct timeout"),
        DeleteNamed("timeout_000000000001_tcp", "ct timeout"),
    ]


def test_icmp_objects_are_made_before_the_transaction_that_names_them() -> None:
    """nftables 1.0.6 cannot write an ICMP ct timeout: the objects (ICMP and ICMPv6) are
    made over netlink first and named by the script's rules."""
    document = seed()
    document["fip"][0]["timeouts"] = {"icmp": 5}
    state = state_of(document)
    tx = plan_transaction(None, desired_table(state, assign_ids(state, {})))
    name = TimeoutPolicy(icmp=(("timeout", 5),)).name
    assert [(spec.name, spec.netlink) for spec in tx.made_first] == [
        (f"{name}_icmp", (1, 5)),
        (f"{name}_icmpv6", (58, 5)),
    ]
    assert not [op for op in tx.operations if "add ct timeout" in op.render()]
    text = tx.script()
    assert f'meta l4proto icmp ct timeout set "{name}_icmp"' in text
    assert f'meta l4proto ipv6-icmp ct timeout set "{name}_icmpv6"' in text
    # `natgwd render` shows them, as comments nft skips.
    made = f"add ct timeout inet natgwd {name}_icmp {{ protocol icmp; policy = {{ timeout: 5 }}; }}"
    assert f"# made over netlink first: {made}\n" in text

    fake = FakeNft()
    rec = Reconciler(fake, FakeLinks(), ensure_forwarding=lambda: False)
    rec.apply(state)
    assert fake.table is not None and {f"{name}_icmp", f"{name}_icmpv6"} <= set(fake.table.objects)
    del document["fip"][0]["timeouts"]
    rec.apply(state_of(document))
    assert fake.table.chains[name] == () and RULE_TIMEOUT not in fake.table.sets  # emptied, deleted next time


def test_a_restarted_daemon_adopts_the_policies_without_a_change() -> None:
    """Objects (those made over netlink too), chains and elements read back from the
    kernel are the planned ones: a restart changes nothing, and a resync finds no drift."""
    document = seed(timeouts={"tcpEstablished": 1200, "icmp": 30})
    document["snat"][0]["timeouts"] = {"udp": 5}
    state = state_of(document)
    fake = FakeNft()
    Reconciler(fake, FakeLinks(), ensure_forwarding=lambda: False).apply(state)
    applied = len(fake.transactions)
    restarted = Reconciler(fake, FakeLinks(), ensure_forwarding=lambda: False)
    restarted.apply(state)
    assert len(fake.transactions) == applied
    assert not restarted.resync().repairs
