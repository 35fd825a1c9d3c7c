"""IPv6 beside IPv4 in the pure parts: the plan (IPv6 maps and rules only when an EIP has
a v6ip), status lines, stale conntrack judgement and dump filters, links (addresses,
default route) and the neighbour advertisement frame."""

from __future__ import annotations

import copy
import json
import socket
import struct
from ipaddress import IPv6Address, IPv6Interface, IPv6Network
from types import SimpleNamespace
from typing import Any

from natgwd.kernel.conntrack import ConntrackCleaner
from natgwd.kernel.fake import FakeNft
from natgwd.kernel.garp import _checksum, na_frame
from natgwd.lab.topology import DUAL_STACK_STATE, SEED_STATE
from natgwd.planning.layout import shards
from natgwd.planning.links import DEFAULT_ROUTE6, RouteSpec, link_plan
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.stale import Filter, Flow, Translations, changed_filters
from natgwd.planning.table import plan_transaction
from natgwd.runtime.reconciler import Reconciler
from natgwd.runtime.status import rule_statuses
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeLinks


def load(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def dual() -> dict[str, Any]:
    return copy.deepcopy(DUAL_STACK_STATE)


def script(document: dict[str, Any]) -> str:
    state = load(document)
    return plan_transaction(None, desired_table(state, assign_ids(state, {}))).script()


# --- plan -----------------------------------------------------------------------------------


def table_of(state: DesiredState) -> Any:
    return desired_table(state, assign_ids(state, {}))


def test_an_ipv4_only_table_has_nothing_of_ipv6() -> None:
    text = script(SEED_STATE)
    assert "ip6" not in text and "ipv6_addr" not in text
    assert "eips6" not in text and "snat6_" not in text


def test_the_dual_stack_table_holds_both_families_in_one_script() -> None:
    state = load(dual())
    ids = assign_ids(state, {})
    table = desired_table(state, ids)
    values = {name: {k: e.value for k, e in elements.items()} for name, elements in table.elements.items()}
    mark = {labels.name: str(i) for labels, i in ids.items()}
    assert values["eips6"] == {"fd00:115::200": None, "fd00:115::201": None}
    assert values["snat6_p64_target"] == {"fd00:10::": "fd00:115::200"}
    assert values["snat6_p64_rule"] == {"fd00:10::": mark["my-snat6"]}
    assert values["snat_p24_target"] == {"172.20.10.0": "10.115.55.200"}
    assert values["dnat_target6"] == {"fd00:115::200 . tcp . 8888": "fd00:10::2 . 80"}
    assert values["dnat_rule6"] == {"fd00:115::200 . tcp . 8888": mark["dnat01-6"]}
    assert values["fip_in_target6"] == {"fd00:115::201": "fd00:10::3"}
    assert values["fip_out_target6"] == {"fd00:10::3": "fd00:115::201"}
    assert values["fip_out_rule6"] == {"fd00:10::3": mark["fip01-6"]}
    # One id space and one set of counting elements for both families.
    assert sorted(int(mark) for name in shards("rule_connections") for mark in values[name]) == list(range(1, 7))
    chains = {chain.name: chain.rules for chain in table.chains}
    assert chains["postrouting"][4:] == (
        'iifname "net1" oifname "net1" ct status dnat ct original ip6 daddr @eips6 '
        "snat ip6 to ip6 saddr map @fip_out_target6",
        'iifname "net1" oifname "net1" ct status dnat ct original ip6 daddr @eips6 snat ip6 to ct original ip6 daddr',
        'oifname "net2" ct mark set ip6 saddr map @fip_out_rule6 snat ip6 to ip6 saddr map @fip_out_target6',
        'oifname "net2" ct mark set ip6 saddr & ffff:ffff:ffff:ffff:: map @snat6_p64_rule '
        "snat ip6 to ip6 saddr & ffff:ffff:ffff:ffff:: map @snat6_p64_target fully-random",
    )
    assert chains["prerouting"][3] == (
        "ct mark set ip6 daddr map @fip_in_rule6 dnat ip6 to ip6 daddr map @fip_in_target6"
    )
    # The IPv4 chains' rules are those of the IPv4-only table, IPv6 follows them.
    v4 = {chain.name: chain.rules for chain in desired_table(load(SEED_STATE), ids).chains}
    assert chains["prerouting"][:3] == v4["prerouting"] and chains["account"] == v4["account"]
    assert chains["forward"] == v4["forward"]  # the invalid drop matches both families


def test_snat66_longest_prefix_first_and_host_routes() -> None:
    document = dual()
    document["eips"].append({"name": "host", "v6ip": "fd00:115::300"})
    document["snat"] += [
        {"name": "one", "eip": "host", "internalCIDR": "fd00:10::4"},
        {"name": "wide", "eip": "host", "internalCIDR": "fd00::/16"},
    ]
    document["internal"]["routes"].append({"dst": "fd00::/16", "via": "fd00:10::1"})
    rules = [r for c in table_of(load(document)).chains if c.name == "postrouting" for r in c.rules]
    maps = [r.split("map @")[1].split(" ")[0] for r in rules if "snat6_" in r]
    assert maps == ["snat6_p128_rule", "snat6_p64_rule", "snat6_p16_rule"]
    assert any("ct mark set ip6 saddr map @snat6_p128_rule" in r for r in rules)


def test_ipv6_share_group_uses_the_ipv6_target_map() -> None:
    document = dual()
    for name, backend in (("a", "fd00:10::2"), ("b", "fd00:10::3")):
        document["dnat"].append(
            {
                "name": name,
                "eip": "my-eip",
                "protocol": "udp",
                "externalPort": 53,
                "internalIp": backend,
                "internalPort": 53,
                "type": "share",
            }
        )
    document["fip"] = document["fip"][:1]
    table = table_of(load(document))
    [share] = [c for c in table.chains if c.name.startswith("share_")]
    assert share.rules[1] == "meta l4proto { tcp, udp } dnat ip6 to ct mark map @share_target6"
    assert sorted(e.value for e in table.elements["share_target6"].values()) == ["fd00:10::2 . 53", "fd00:10::3 . 53"]


# --- status ---------------------------------------------------------------------------------


def test_status_shows_ipv6_translations() -> None:
    fake = FakeNft()
    Reconciler(fake, FakeLinks(), ensure_forwarding=lambda: False).apply(load(dual()))
    assert fake.table is not None
    found = {(r.name, r.eip): r.translations for r in rule_statuses(fake.table)}
    assert found[("dnat01-6", "fd00:115::200")] == ["[fd00:115::200]:8888/tcp -> [fd00:10::2]:80"]
    assert found[("fip01-6", "fd00:115::201")] == [
        "fd00:10::3 -> fd00:115::201 (out)",
        "fd00:115::201 -> fd00:10::3 (in)",
    ]
    assert found[("my-snat6", "fd00:115::200")] == ["fd00:10::/64 -> fd00:115::200"]
    assert found[("dnat01", "10.115.55.200")] == ["10.115.55.200:8888/tcp -> 172.20.10.2:80"]


# --- conntrack ------------------------------------------------------------------------------

UP = "fd00:115::fe"


def flow(src: str, dst: str, reply_src: str, reply_dst: str, dport: int = 80, reply_sport: int = 80) -> Flow:
    return Flow(6, src, dst, dport, reply_src, reply_sport, reply_dst, 1)


def test_ipv6_flows_are_judged_by_ipv6_rules() -> None:
    translations = Translations(load(dual()), range(1, 7))
    # DNAT to the current backend, and to one no rule names any more.
    assert translations.stale(flow(UP, "fd00:115::200", "fd00:10::2", UP, 8888)) is None
    assert translations.stale(flow(UP, "fd00:115::200", "fd00:10::9", UP, 8888)) == "dnat"
    # SNAT66 to the EIP of the /64, and to another address.
    assert translations.stale(flow("fd00:10::4", UP, UP, "fd00:115::200")) is None
    assert translations.stale(flow("fd00:10::4", UP, UP, "fd00:115::201")) == "snat"
    # FIP both ways.
    assert translations.stale(flow("fd00:10::3", UP, UP, "fd00:115::201")) is None
    assert translations.stale(flow(UP, "fd00:115::201", "fd00:10::2", UP)) == "fip"
    # IPv4 is untouched by the IPv6 rules.
    assert translations.stale(flow("172.20.10.4", "10.115.55.254", "10.115.55.254", "10.115.55.200")) is None


def test_a_changed_v6ip_needs_both_addresses_dumped_and_they_go_to_the_ipv6_dump() -> None:
    old, changed = dual(), dual()
    changed["eips"][1]["v6ip"] = "fd00:115::299"
    filters = changed_filters(load(old), load(changed))
    assert filters is not None
    assert {f.address for f in filters} == {"fd00:115::201", "fd00:115::299"}

    def entry(daddr: str) -> SimpleNamespace:
        return SimpleNamespace(
            tuple_orig=SimpleNamespace(proto=6, saddr=UP, daddr=daddr, dport=80),
            tuple_reply=SimpleNamespace(saddr="fd00:10::3", sport=80, daddr=UP, dport=40000),
            mark=0,
        )

    dumped: list[tuple[int, dict[str, Any]]] = []

    class Dumps:
        def __init__(self, family: int) -> None:
            self.family = family

        def __enter__(self) -> Dumps:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def dump_entries(self, **selector: Any) -> list[object]:
            dumped.append((self.family, selector))
            return [entry("fd00:115::299"), entry("fd00:115::7")]

    judged: list[str] = []

    class Judge:
        def stale(self, flow: Flow) -> None:
            judged.append(flow.orig_dst)

    cleaner = ConntrackCleaner(connect=Dumps, count=lambda: 2)  # type: ignore[arg-type]
    cleaner.clean(Judge(), filters)  # type: ignore[arg-type]
    # One unfiltered IPv6 dump (pyroute2 cannot filter IPv6 in the kernel), filtered here.
    assert dumped == [(socket.AF_INET6, {})]
    assert judged == ["fd00:115::299"]


def test_ipv4_filters_do_not_open_an_ipv6_dump() -> None:
    opened: list[int] = []

    class Dumps:
        def __enter__(self) -> Dumps:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def dump_entries(self, **selector: Any) -> list[object]:
            return []

    def connect(family: int) -> Dumps:
        opened.append(family)
        return Dumps()

    cleaner = ConntrackCleaner(connect=connect, count=lambda: 2)  # type: ignore[arg-type]
    cleaner.clean(Translations(load(SEED_STATE), [1, 2, 3]), [Filter("orig", "daddr", "10.115.55.200")])
    assert opened == [socket.AF_INET]  # one dump socket; nothing stale, so none to delete with


# --- links ----------------------------------------------------------------------------------


def test_link_plan_has_ipv6_addresses_and_default_route() -> None:
    plan = link_plan(load(dual()))
    external = next(i for i in plan.interfaces if i.name == "net2")
    assert {a for a in external.addresses if a.version == 6} == {
        IPv6Interface("fd00:115::1/64"),
        IPv6Interface("fd00:115::200/64"),
        IPv6Interface("fd00:115::201/64"),
    }
    assert RouteSpec(DEFAULT_ROUTE6, IPv6Address("fd00:115::fe"), "net2", onlink=True) in plan.routes
    assert [r.dst.version for r in plan.routes] == [4, 4, 6, 6]
    assert IPv6Network("fd00:55::/64") in {r.dst for r in plan.routes}


def test_an_ipv6_eip_outside_every_external_subnet_is_a_host_address() -> None:
    document = dual()
    document["eips"].append({"name": "far", "v6ip": "fd00:999::1"})
    state = load(document)
    assert state.eip_interfaces(state.eips[2]) == (IPv6Interface("fd00:999::1/128"),)


# --- neighbour advertisement ----------------------------------------------------------------


def test_neighbour_advertisement_frame() -> None:
    mac = bytes.fromhex("0200c0ffee01")
    eip = IPv6Address("fd00:115::200")
    frame = na_frame(mac, eip)
    assert frame[:6] == bytes.fromhex("333300000001") and frame[6:12] == mac
    assert struct.unpack("!H", frame[12:14])[0] == 0x86DD
    ip = frame[14:54]
    version, length, next_header, hop_limit = ip[0] >> 4, *struct.unpack("!HBB", ip[4:8])
    assert (version, next_header, hop_limit) == (6, 58, 255)
    assert ip[8:24] == eip.packed and ip[24:40] == IPv6Address("ff02::1").packed
    icmp = frame[54:]
    assert length == len(icmp) == 32
    assert (icmp[0], icmp[1]) == (136, 0)
    assert struct.unpack("!I", icmp[4:8])[0] == 0x20000000  # override, not solicited, not router
    assert icmp[8:24] == eip.packed
    assert icmp[24:] == b"\x02\x01" + mac  # target link-layer address option
    pseudo = ip[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert _checksum(pseudo + icmp) == 0  # the checksum field makes the sum come out right
