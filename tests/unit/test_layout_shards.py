"""natgwd.planning.layout's split of the counting sets into shards by rule id, and the
counter memory across the split (an upgrade from a table with the unsplit sets)."""

from __future__ import annotations

from natgwd.planning.counters import CounterMemory
from natgwd.planning.layout import (
    COUNTING_SHARDS,
    INVALID_DROPS,
    RULE_CONNECTIONS,
    RULE_TRAFFIC,
    key_shard,
    parts,
    shard,
    shards,
    whole_elements,
    whole_set,
)
from natgwd.planning.table import Counter, Element


def test_a_rule_is_in_the_shard_of_its_ids_low_bits() -> None:
    assert COUNTING_SHARDS & (COUNTING_SHARDS - 1) == 0  # the vmap takes `ct mark & (shards - 1)`
    assert shard(RULE_CONNECTIONS, 3) == "rule_connections_3"
    assert shard(RULE_TRAFFIC, COUNTING_SHARDS + 3) == "rule_traffic_3"
    assert key_shard(RULE_TRAFFIC, f"reply . {2 * COUNTING_SHARDS + 5}") == "rule_traffic_5"
    assert key_shard(RULE_CONNECTIONS, "5") == shard(RULE_CONNECTIONS, 5)
    assert len(set(shards(RULE_TRAFFIC))) == COUNTING_SHARDS


def test_shards_belong_to_their_logical_set_and_other_sets_to_themselves() -> None:
    assert {whole_set(name) for name in shards(RULE_CONNECTIONS)} == {RULE_CONNECTIONS}
    assert whole_set(RULE_TRAFFIC) == RULE_TRAFFIC  # the unsplit set of an older table
    assert whole_set(INVALID_DROPS) == INVALID_DROPS
    assert parts(RULE_TRAFFIC) == shards(RULE_TRAFFIC)
    assert parts(INVALID_DROPS) == (INVALID_DROPS,)


def test_a_logical_sets_elements_come_from_its_shards_and_an_unsplit_set() -> None:
    elements = {
        "rule_connections_1": {"1": Element(comment="a")},
        "rule_connections_2": {"18": Element(comment="b")},
        RULE_CONNECTIONS: {"7": Element(comment="old")},
        "rule_traffic_1": {"original . 1": Element()},
    }
    assert dict(whole_elements(elements, RULE_CONNECTIONS)) == {
        "1": Element(comment="a"),
        "18": Element(comment="b"),
        "7": Element(comment="old"),
    }
    assert dict(whole_elements(elements, INVALID_DROPS)) == {}


def test_the_counters_of_an_unsplit_table_seed_the_shards() -> None:
    """A restart over a table written before the split: its sets' counters are what the
    elements of the shards are seeded from."""
    memory = CounterMemory()
    memory.remember(
        {
            RULE_CONNECTIONS: {"7": Element(comment="dnat/d/10.0.0.1", counter=Counter(3, 180))},
            RULE_TRAFFIC: {"reply . 7": Element(counter=Counter(5, 900)), "original . 7": Element()},
        }
    )
    assert memory.of(shard(RULE_CONNECTIONS, 7)).get("7") == Counter(3, 180)
    assert memory.of(shard(RULE_TRAFFIC, 7)).get("reply . 7") == Counter(5, 900)
    # The plan's elements are in the shards: those of rule 7 are still wanted.
    memory.forget_except(
        {shard(RULE_CONNECTIONS, 7): {"7": Element()}, shard(RULE_TRAFFIC, 7): {"reply . 7": Element()}}
    )
    assert memory.of(RULE_CONNECTIONS).get("7") == Counter(3, 180)
    memory.forget(shard(RULE_TRAFFIC, 7), ["reply . 7"])
    assert memory.of(RULE_TRAFFIC).get("reply . 7") is None
