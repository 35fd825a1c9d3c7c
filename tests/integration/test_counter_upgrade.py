"""An upgrade over a table of the layout before the counting sets were split into shards
(natgwd.planning.layout.shard): the restarted daemon must carry every rule's counters
over into the shards, exactly, in its one transaction, so that no Prometheus counter
goes backwards or to zero.

The old table is written as natgwd wrote it before the split (the same sets, chain rules
and rule tags), with its rules' ids and comments; traffic through it is counted by the
old chain, then natgwd starts over it."""

from __future__ import annotations

import json
import signal
from typing import Any

from natgwd.lab.topology import Lab
from natgwd.planning.layout import ACCOUNT, RULE_CONNECTIONS, RULE_TRAFFIC, account_shard, shard, shards
from natgwd.planning.table import AddRule, rule_tag
from tests.integration.helpers import RuleCounters, events_named, start, udp_bytes
from tests.integration.lifecycle_helpers import counters

EIP1 = "10.115.55.200"
UPSTREAM = "10.115.55.254"
ACCOUNT_HEADER = "type filter hook postrouting priority 300; policy accept;"
# The account chain before the split: both sets counted in it directly.
OLD_ACCOUNT = (
    f"ct status & confirmed == 0 ct mark @{RULE_CONNECTIONS}",
    f"ct direction . ct mark @{RULE_TRAFFIC}",
)


def nft_sets(lab: Lab) -> dict[str, dict[str, Any]]:
    listing = json.loads(lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd").stdout)
    return {obj["set"]["name"]: obj["set"] for obj in listing["nftables"] if "set" in obj}


def elements(nft_set: dict[str, Any]) -> list[dict[str, Any]]:
    return [item["elem"] for item in nft_set.get("elem", ())]


def to_old_layout(lab: Lab) -> dict[str, int]:
    """Rewrite natgwd's table to the layout before the split, in one transaction: the
    shards' elements (ids and comments) in one set each, counted by the old account
    chain. Returns the id of every rule by its comment."""
    sets = nft_sets(lab)
    marks: dict[str, int] = {}
    for name in shards(RULE_CONNECTIONS):
        for element in elements(sets[name]):
            marks[element["comment"]] = int(element["val"])
    connections = ", ".join(f'{mark} comment "{comment}"' for comment, mark in marks.items())
    traffic = ", ".join(f"{direction} . {mark}" for mark in marks.values() for direction in ("original", "reply"))
    script = [
        f"add set inet natgwd {RULE_CONNECTIONS} {{ type mark; counter; }}",
        f"add set inet natgwd {RULE_TRAFFIC} {{ type ct_dir . mark; counter; }}",
        f"add element inet natgwd {RULE_CONNECTIONS} {{ {connections} }}",
        f"add element inet natgwd {RULE_TRAFFIC} {{ {traffic} }}",
        f"flush chain inet natgwd {ACCOUNT}",
        *(AddRule(ACCOUNT, rule, rule_tag(ACCOUNT_HEADER, rule)).render() for rule in OLD_ACCOUNT),
        *(f"delete chain inet natgwd {account_shard(index)}" for index in range(len(shards(RULE_CONNECTIONS)))),
        *(f"delete set inet natgwd {name}" for name in (*shards(RULE_CONNECTIONS), *shards(RULE_TRAFFIC))),
    ]
    lab.exec("gw", "nft", "-f", "-", stdin="\n".join(script) + "\n")
    return marks


def old_counters(lab: Lab, mark: int) -> RuleCounters:
    """A rule's counters as the old sets hold them."""
    sets = nft_sets(lab)

    def counter(nft_set: str, key: Any) -> dict[str, int]:
        (found,) = [e["counter"] for e in elements(sets[nft_set]) if e["val"] == key]
        return dict(found)

    connections = counter(RULE_CONNECTIONS, mark)
    original = counter(RULE_TRAFFIC, {"concat": ["original", mark]})
    reply = counter(RULE_TRAFFIC, {"concat": ["reply", mark]})
    return RuleCounters(
        connections["packets"], original["packets"], reply["packets"], original["bytes"], reply["bytes"]
    )


def exchange(lab: Lab, role: str, address: str, port: int, count: int, source_port: int) -> RuleCounters:
    """One UDP flow of `count` echoed datagrams: what it adds to its rule's counters."""
    payloads = [b"u" * (10 * (i + 1)) for i in range(count)]
    answers = lab.udp_exchange(role, address, port, payloads, source_port=source_port)
    assert all(answers), answers
    return RuleCounters(1, count, count, udp_bytes(payloads), udp_bytes(answers))


def plus(a: RuleCounters, b: RuleCounters) -> RuleCounters:
    return RuleCounters(*(x + y for x, y in zip(a.values(), b.values(), strict=True)))


def test_an_upgrade_carries_every_counter_over_into_the_shards(lab: Lab, seed_state: dict[str, Any]) -> None:
    lab.serve("vm1", udp=[5000])
    lab.serve("ext", udp=[6000])
    seed_state["dnat"].append(
        {
            "name": "dnat-udp",
            "eip": "my-eip",
            "protocol": "udp",
            "externalPort": "5000",
            "internalIp": "172.20.10.2",
            "internalPort": "5000",
        }
    )
    daemon = start(lab, seed_state)
    assert daemon.stop(signal.SIGTERM) == 0  # the table stays
    marks = to_old_layout(lab)
    dnat, snat = marks[f"dnat/dnat-udp/{EIP1}"], marks[f"snat/my-snat/{EIP1}"]

    # Counted by the old layout's chain while no natgwd runs.
    dnat_old = exchange(lab, "ext", EIP1, 5000, 3, source_port=41001)
    snat_old = exchange(lab, "vm3", UPSTREAM, 6000, 4, source_port=41002)
    assert old_counters(lab, dnat) == dnat_old
    assert old_counters(lab, snat) == snat_old

    restarted = start(lab, seed_state)
    sets = nft_sets(lab)
    assert RULE_CONNECTIONS not in sets and RULE_TRAFFIC not in sets
    (connections,) = [e for e in elements(sets[shard(RULE_CONNECTIONS, dnat)]) if e["val"] == dnat]
    assert connections["counter"]["packets"] == 1  # seeded in the rule's shard
    # In one transaction: the old sets gone, the shards made and seeded, the chains replaced.
    transactions = events_named(restarted, "nftables transaction applied")
    assert len(transactions) == 1, transactions
    assert counters(restarted, "dnat", "dnat-udp", EIP1) == dnat_old
    assert counters(restarted, "snat", "my-snat", EIP1) == snat_old

    dnat_new = exchange(lab, "ext", EIP1, 5000, 2, source_port=41003)
    snat_new = exchange(lab, "vm3", UPSTREAM, 6000, 5, source_port=41004)
    assert counters(restarted, "dnat", "dnat-udp", EIP1) == plus(dnat_old, dnat_new)
    assert counters(restarted, "snat", "my-snat", EIP1) == plus(snat_old, snat_new)
