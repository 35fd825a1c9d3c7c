"""natgwd.planning.counters: listings in the kernel's notation, and the memory that seeds re-created
counting elements."""

from __future__ import annotations

from natgwd.planning.counters import CounterMemory, canonical_key
from natgwd.planning.table import Counter, Element


def test_canonical_keys_write_marks_in_decimal() -> None:
    assert canonical_key("0x0000002a") == "42"
    assert canonical_key("reply . 0x00010000") == "reply . 65536"
    assert canonical_key('"net2"') == '"net2"'


def test_a_scrape_listing_is_remembered_in_the_plans_notation() -> None:
    memory = CounterMemory()
    memory.remember_listings(
        {
            "rule_connections": [("0x00000007", "5", "300", "dnat/d/10.0.0.1")],
            "rule_traffic": [("reply . 0x00000007", "2", "80", "")],
        }
    )
    assert memory.of("rule_connections").get("7") == Counter(5, 300)
    assert memory.of("rule_traffic").get("reply . 7") == Counter(2, 80)
    assert memory.of("rule_traffic").get("original . 7") is None


def test_the_larger_reading_wins_whatever_the_order() -> None:
    memory = CounterMemory()
    memory.remember({"rule_connections": {"7": Element(counter=Counter(9, 900))}})
    # A scrape that read the kernel before that table read, but handed its listing in after.
    memory.remember_listings({"rule_connections": [("0x00000007", "8", "800", "")]})
    assert memory.of("rule_connections").get("7") == Counter(9, 900)
    memory.remember_listings({"rule_connections": [("0x00000007", "10", "1000", "")]})
    memory.remember({"rule_connections": {"7": Element(counter=Counter(9, 900))}})
    assert memory.of("rule_connections").get("7") == Counter(10, 1000)


def test_only_counting_sets_are_remembered() -> None:
    memory = CounterMemory()
    memory.remember({"dnat_target": {"10.0.0.1 . tcp . 80": Element("10.1.0.1 . 80", counter=Counter(1, 1))}})
    assert memory.of("dnat_target").get("10.0.0.1 . tcp . 80") is None


def test_forgetting_keeps_only_present_elements_including_a_pending_listing() -> None:
    memory = CounterMemory()
    memory.remember({"rule_connections": {"1": Element(counter=Counter(1, 60))}})
    memory.remember_listings({"rule_connections": [("0x00000002", "2", "120", ""), ("0x00000003", "3", "180", "")]})
    memory.forget_except({"rule_connections": {"2": Element()}})
    assert memory.of("rule_connections").get("1") is None
    assert memory.of("rule_connections").get("2") == Counter(2, 120)
    assert memory.of("rule_connections").get("3") is None


def test_a_reading_of_zero_is_not_kept() -> None:
    memory = CounterMemory()
    memory.remember_listings({"rule_connections": [("7", "0", "0", "dnat/d/10.0.0.1"), ("8", "1", "60", "")]})
    memory.remember({"rule_traffic": {"reply . 7": Element(counter=Counter(0, 0))}})
    assert memory.of("rule_connections").get("7") is None
    assert memory.of("rule_connections").get("8") == Counter(1, 60)
    assert memory.of("rule_traffic").get("reply . 7") is None


def test_forgetting_nothing_removed_keeps_everything() -> None:
    memory = CounterMemory()
    memory.remember({"rule_connections": {"1": Element(counter=Counter(1, 60)), "2": Element(counter=Counter(2, 9))}})
    memory.forget_except({"rule_connections": {"1": Element(), "2": Element(), "3": Element()}})
    assert memory.of("rule_connections").get("1") == Counter(1, 60)
    assert memory.of("rule_connections").get("2") == Counter(2, 9)
