"""EIPs added and removed on the delta path (natgwd.state.eipdelta): what qualifies, and
that the reconciler changes their addresses and the nftables table together or not at all.
(That the delta path's state and table equal the full path's: test_delta_equivalence.)"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.kernel.netlink import AddressChangeError
from natgwd.kernel.nft import NftError
from natgwd.planning.plan import eip_texts
from natgwd.planning.stale import changed_filters, delta_filters
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.eipdelta import eip_change
from natgwd.state.tracker import Change, StateTracker
from natgwd.state.validation import validate_document
from tests.unit.fakes import FakeLinks
from tests.unit.test_scaleout_state import doc as scaled_out_document

BASE: dict[str, Any] = {
    "version": 1,
    "internal": {"interface": "net1", "addresses": ["172.20.10.254/24"]},
    "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": "10.115.55.254"},
    "eips": [{"name": "e1", "v4ip": "10.115.55.200"}, {"name": "e2", "v4ip": "10.115.55.201"}],
    "dnat": [
        {"name": "d1", "eip": "e1", "protocol": "tcp", "externalPort": 80}
        | {"internalIp": "172.20.10.5", "internalPort": 80}
    ],
    "fip": [{"name": "f2", "eip": "e2", "internalIp": "172.20.10.6"}],
}


def edited(document: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy sharing the items it does not change, as the edit service makes it."""
    return {**document, **changes}


def checked(tracker: StateTracker, document: dict[str, Any]) -> Change:
    return tracker.check_document(document)


def started() -> tuple[StateTracker, Reconciler, FakeNft, FakeLinks, dict[str, Any]]:
    tracker, nft, links = StateTracker(), FakeNft(), FakeLinks()
    reconciler = Reconciler(nft, links, ensure_forwarding=lambda: False)
    document = copy.deepcopy(BASE)
    change = tracker.check_document(document)
    reconciler.apply(change.state)
    tracker.accept(change)
    return tracker, reconciler, nft, links, document


def eip_addresses(nft: FakeNft) -> set[str]:
    assert nft.table is not None
    return set(nft.table.elements["eips"])


@pytest.mark.parametrize(
    ("new", "why"),
    [
        ([{"name": "e3", "v4ip": "10.115.55.200"}], "e1's address"),
        ([{"name": "e1", "v4ip": "10.115.55.209"}], "e1's name"),
        ([{"name": "e3", "v4ip": "224.0.0.3"}], "not unicast"),
        ([{"name": "e3", "v4ip": "10.115.55.203", "qosPolicy": "q"}], "not plain: a QoS policy"),
        ([{"name": "e3", "v6ip": "fd00::3"}], "not plain: IPv6"),
        ([{"name": "e3", "v4ip": "10.115.55.203"}, {"name": "e3", "v4ip": "10.115.55.204"}], "a name twice"),
    ],
)
def test_an_eip_the_delta_path_does_not_check_is_left_to_the_full_path(new: list[Any], why: str) -> None:
    state = validate_document(copy.deepcopy(BASE)).state
    assert eip_change(state, BASE["eips"], [*BASE["eips"], *new], BASE) is None, why


def test_plain_eips_appended_and_removed_are_a_change() -> None:
    state = validate_document(copy.deepcopy(BASE)).state
    e1, e2 = BASE["eips"]
    change = eip_change(state, [e1, e2], [e2, {"name": "e3", "v4ip": "10.115.55.203"}], BASE)
    assert change is not None
    assert [e.name for e in change.removed] == ["e1"] and [e.name for e in change.added] == ["e3"]
    assert [e.name for e in change.eips] == ["e2", "e3"]
    assert eip_change(state, [e1, e2], [e2, e1], BASE) is None, "a reordering"
    assert eip_change(state, [e1, e2], [e1, e2, {"name": "e3", "v4ip": "10.1.1.1"}], {**BASE, "ha": {}}) is None


def test_an_eip_added_and_removed_by_delta_changes_its_address_and_the_table() -> None:
    tracker, reconciler, nft, links, document = started()
    added = edited(document, eips=[*document["eips"], {"name": "e3", "v4ip": "10.115.55.203"}])
    change = checked(tracker, added)
    assert change.delta is not None and [e.name for e in change.delta.added_eips] == ["e3"]
    outcome = reconciler.apply(change.state, change.delta, change.base)
    tracker.accept(change)
    assert outcome.by_delta and outcome.complete
    assert outcome.link_changes == ["add address 10.115.55.203/21 dev net2"]
    assert [str(a) for c in links.address_changes for a in c.added] == ["10.115.55.203/21"]
    assert eip_addresses(nft) == {"10.115.55.200", "10.115.55.201", "10.115.55.203"}
    assert links.plans == links.plans[:1], "no full link apply"

    # eip-del of e2 with its FIP, as the drop-in does it.
    removed = edited(added, eips=[added["eips"][0], added["eips"][2]], fip=[])
    change = checked(tracker, removed)
    assert change.delta is not None and [e.name for e in change.delta.removed_eips] == ["e2"]
    outcome = reconciler.apply(change.state, change.delta, change.base)
    assert outcome.by_delta
    assert [str(a) for a in links.address_changes[-1].removed] == ["10.115.55.201/21"]
    assert eip_addresses(nft) == {"10.115.55.200", "10.115.55.203"}
    assert reconciler.verify_plan(validate_document(removed).state)


def test_an_eip_removed_while_a_rule_names_it_is_left_to_the_full_path() -> None:
    tracker, *_, document = started()
    with pytest.raises(Exception, match="e2"):
        checked(tracker, edited(document, eips=document["eips"][:1]))


def test_a_refused_address_leaves_the_last_state_applied() -> None:
    tracker, reconciler, nft, links, document = started()
    before = copy.deepcopy(nft.table)
    links.refuse = ("10.115.55.203",)
    change = checked(tracker, edited(document, eips=[*document["eips"], {"name": "e3", "v4ip": "10.115.55.203"}]))
    with pytest.raises(AddressChangeError, match=r"10\.115\.55\.203"):
        reconciler.apply(change.state, change.delta, change.base)
    assert nft.table == before and links.address_changes == []
    assert reconciler.state is not None and [e.name for e in reconciler.state.eips] == ["e1", "e2"]

    links.refuse = ()
    outcome = reconciler.apply(change.state, change.delta, change.base)
    assert outcome.by_delta and "10.115.55.203" in eip_addresses(nft)


def test_a_refused_transaction_takes_the_addresses_back() -> None:
    tracker, reconciler, nft, links, document = started()
    change = checked(tracker, edited(document, eips=[*document["eips"], {"name": "e3", "v4ip": "10.115.55.203"}]))
    nft.fail_next = "planted"
    with pytest.raises(NftError):
        reconciler.apply(change.state, change.delta, change.base)
    assert links.address_changes == [], "the address added for it is deleted again"
    assert "10.115.55.203" not in eip_addresses(nft)


def test_the_conntrack_filters_of_an_eip_change_are_those_of_the_whole_states() -> None:
    tracker, *_, document = started()
    added = edited(document, eips=[*document["eips"], {"name": "e3", "v4ip": "10.115.55.203"}])
    removed = edited(document, eips=document["eips"][:1], fip=[])
    for wanted in (added, removed):
        change = checked(tracker, wanted)
        assert change.delta is not None and change.base is not None and change.delta.eips_changed
        texts = {**eip_texts(change.base), **eip_texts(change.state)}
        assert delta_filters(change.delta, texts) == changed_filters(change.base, change.state)


def test_an_eip_of_a_gateway_scaled_out_by_discovery_is_left_to_the_full_path() -> None:
    """Prevents: the controller's eip-add refused on every replica of its Deployment (the
    document has no scaleOut section, the state applied is scaled out by the members
    discovered, and the delta's plan lacked the new EIP's group)."""
    document = scaled_out_document()
    scaled = validate_document(document).state
    assert scaled.scale_out is not None
    del document["scaleOut"]
    eips = [*document["eips"], {"name": "added", "v4ip": "10.115.55.222"}]
    assert eip_change(scaled, document["eips"], eips, {**document, "eips": eips}) is None
