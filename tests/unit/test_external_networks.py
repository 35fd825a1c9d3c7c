"""Several external networks in the pure parts: validation (names, interfaces, binding an
EIP by subnet or by name), the link plan (addresses per interface, a table per network),
the policy rules, and the steering chain and maps of the plan."""

from __future__ import annotations

import copy
import json
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.planning.links import MAIN_TABLE, link_plan
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.policy import FORWARDED_TABLE, NETWORK_BASE, PolicyRule, policy_rules
from natgwd.state.model import DesiredState
from natgwd.state.validation import InvalidStateError, load_state
from tests.unit.test_scaleout_state import SECTION as SCALE_OUT

SECOND = {"name": "ext2", "interface": "net3", "addresses": ["10.116.0.1/24"], "gateway": "10.116.0.254"}


def two_networks() -> dict[str, Any]:
    document = copy.deepcopy(SEED_STATE)
    document["externals"] = [copy.deepcopy(SECOND)]
    document["eips"] += [
        {"name": "eip3", "v4ip": "10.116.0.200"},  # in ext2's subnet
        {"name": "eip4", "v4ip": "10.115.55.204", "externalSubnet": "ext2"},  # named
    ]
    document["snat"].append({"name": "vm3", "eip": "eip3", "internalCIDR": "172.20.10.4/32"})
    document["fip"].append({"name": "fip4", "eip": "eip4", "internalIp": "172.20.10.5"})
    return document


def load(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidStateError) as caught:
        load(document)
    return [(p.path, p.reason) for p in caught.value.problems]


def test_eips_are_bound_by_subnet_by_name_or_to_external() -> None:
    state = load(two_networks())
    assert {e.name: e.network for e in state.eips} == {
        "my-eip": "external",
        "my-eip2": "external",
        "eip3": "ext2",
        "eip4": "ext2",
    }
    assert [n.name for n in state.externals] == ["external", "ext2"]


def test_a_single_network_file_is_unchanged() -> None:
    state = load(copy.deepcopy(SEED_STATE))
    assert state.more_externals == () and policy_rules(state) == ()
    table = desired_table(state, assign_ids(state, {}))
    assert "steer" not in {c.name for c in table.chains}


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        (lambda d: d["externals"][0].update(name="external"), "$.externals[0].name", "already the name of external"),
        (lambda d: d["externals"][0].update(interface="net2"), "$.externals[0].interface", "already external's"),
        (lambda d: d["externals"][0].update(interface="net1"), "$.externals[0].interface", "already internal's"),
        (
            lambda d: d["eips"][3].update(externalSubnet="nowhere"),
            "$.eips[3].externalSubnet",
            "names no external network (known: 'external', 'ext2')",
        ),
        (
            lambda d: d["internal"]["routes"].append({"dst": "10.116.0.128/25", "via": "172.20.10.1"}),
            "$.internal.routes[1].dst",
            "lies inside the external subnet 10.116.0.0/24",
        ),
    ],
)
def test_bad_networks_are_refused(change: Any, path: str, reason: str) -> None:
    document = two_networks()
    change(document)
    found = problems(document)
    assert any(p == path and reason in r for p, r in found), found


def test_link_plan_puts_each_eip_on_its_network_with_a_table_each() -> None:
    plan = link_plan(load(two_networks()))
    addresses = {i.name: i.addresses for i in plan.interfaces}
    assert addresses["net3"] == {
        IPv4Interface("10.116.0.1/24"),
        IPv4Interface("10.116.0.200/24"),
        IPv4Interface("10.115.55.204/32"),  # named into ext2, outside its subnet
    }
    assert IPv4Interface("10.116.0.200/24") not in addresses["net2"]
    defaults = {(r.table, str(r.via), r.interface) for r in plan.routes if r.dst.prefixlen == 0}
    assert defaults == {
        (MAIN_TABLE, "10.115.55.254", "net2"),
        (NETWORK_BASE, "10.115.55.254", "net2"),
        (NETWORK_BASE + 1, "10.116.0.254", "net3"),
    }


def test_policy_rules() -> None:
    rules = set(policy_rules(load(two_networks())))
    ext2 = NETWORK_BASE + 1
    assert PolicyRule(4, NETWORK_BASE, MAIN_TABLE, suppress_prefixlength=0) in rules
    assert PolicyRule(4, NETWORK_BASE + 1, ext2, fwmark=ext2) in rules
    assert PolicyRule(4, NETWORK_BASE + 1, ext2, src="10.116.0.200") in rules
    assert PolicyRule(4, NETWORK_BASE + 1, NETWORK_BASE, src="10.115.55.200") in rules
    assert len(rules) == 1 + 2 + 4  # suppress, a mark rule per network, a source rule per EIP


def test_the_steer_chain_marks_with_the_network_of_the_translation() -> None:
    state = load(two_networks())
    table = desired_table(state, assign_ids(state, {}))
    values = {name: {k: e.value for k, e in elements.items()} for name, elements in table.elements.items()}
    ext, ext2 = str(NETWORK_BASE), str(NETWORK_BASE + 1)
    assert values["eip_network"] == {
        "10.115.55.200": ext,
        "10.115.55.201": ext,
        "10.116.0.200": ext2,
        "10.115.55.204": ext2,
    }
    assert values["fip_out_network"] == {"172.20.10.3": ext, "172.20.10.5": ext2}
    assert values["snat_p32_network"] == {"172.20.10.4": ext2}
    assert values["snat_p24_network"] == {"172.20.10.0": ext}
    chains = {c.name: c for c in table.chains}
    assert chains["steer"].header == "type filter hook prerouting priority mangle; policy accept;"
    assert chains["steer"].rules == (
        'iifname "net1" ct direction original meta mark set ip saddr map @fip_out_network',
        'iifname "net1" ct direction original meta mark 0 meta mark set ip saddr map @snat_p32_network',
        'iifname "net1" ct direction original meta mark 0 meta mark set ip saddr & 255.255.255.0 map @snat_p24_network',
        "ct direction reply meta mark set ct original ip daddr map @eip_network",
    )
    assert all('oifname { "net2", "net3" }' in r for r in chains["postrouting"].rules[2:])  # after the hairpins
    assert set(values["invalid_dropped"]) == {'"net2"', '"net3"'}
    assert state.externals[1].gateway == IPv4Address("10.116.0.254")


# --- external.defaultRoute "forwarded" (a Kube-OVN lb-svc pod) ------------------------------


def forwarded() -> dict[str, Any]:
    document = copy.deepcopy(SEED_STATE)
    document["external"]["defaultRoute"] = "forwarded"
    return document


def test_forwarded_default_route_is_natgwds_table_by_incoming_interface() -> None:
    """The default route serves packets arriving on the internal or external interface
    (after every main-table route but the default one); the gateway's own traffic keeps
    the main table's default route, which natgwd then leaves alone."""
    state = load(forwarded())
    plan = link_plan(state)
    defaults = [(r.dst, r.table) for r in plan.routes if r.dst.prefixlen == 0]
    assert defaults == [(IPv4Interface("0.0.0.0/0").network, FORWARDED_TABLE)]
    assert set(plan.rules) == {
        PolicyRule(4, NETWORK_BASE, MAIN_TABLE, suppress_prefixlength=0, iif="net1"),
        PolicyRule(4, NETWORK_BASE, MAIN_TABLE, suppress_prefixlength=0, iif="net2"),
        PolicyRule(4, NETWORK_BASE + 1, FORWARDED_TABLE, iif="net1"),
        PolicyRule(4, NETWORK_BASE + 1, FORWARDED_TABLE, iif="net2"),
    }
    assert str(plan.rules[0]) == f"ipv4 rule {NETWORK_BASE}: iif net1 suppress_prefixlength 0 lookup 254"
    document = forwarded()
    del document["external"]["gateway"]
    assert policy_rules(load(document)) == ()  # no gateway, no default route to steer to
    assert link_plan(load(SEED_STATE)).rules == ()  # "main", the default


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (lambda d: d.update(externals=[copy.deepcopy(SECOND)]), "several external networks"),
        (lambda d: d.update(scaleOut=copy.deepcopy(SCALE_OUT)), "scaleOut"),
    ],
)
def test_forwarded_default_route_is_refused_with_tables_of_their_own(change: Any, what: str) -> None:
    document = forwarded()
    change(document)
    assert ("$.external.defaultRoute", f'"forwarded" cannot be combined with {what} (their own tables)') in problems(
        document
    )
