"""The scrape's text, made from pieces and from label texts kept between scrapes, is
byte for byte what one line per sample makes, whatever changed between two scrapes: the
kernel's listing order, a rule's comment, rules added and removed."""

from __future__ import annotations

import types
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from natgwd.observability.connwatch import ConnectionWatch
from natgwd.observability.ctevents import Counted
from natgwd.observability.exposition import escaped
from natgwd.planning.counters import CountedElement, Listings
from natgwd.planning.plan import RuleLabels
from natgwd.runtime import metrics
from natgwd.runtime.metrics import RuleCounters

FAMILIES = (
    ("natgwd_rule_connections_total", "Connections the rule translated (first packets seen by NAT)."),
    ("natgwd_rule_packets_total", "Packets of the connections the rule translated, by direction."),
    ("natgwd_rule_bytes_total", "Bytes (IP length) of the connections the rule translated, by direction."),
    (
        "natgwd_invalid_dropped_packets_total",
        "Packets dropped because conntrack found them invalid (they would leave un-NATed).",
    ),
)


def one_line_per_sample(listings: Listings) -> bytes:
    """The exposition as natgwd wrote it before label texts were kept: the reference."""
    connections, packets, octets, invalid = ([f"# HELP {f} {h}", f"# TYPE {f} counter"] for f, h in FAMILIES)
    labels_of = {}
    for mark, count, _, comment in listings.get("rule_connections", ()):
        rule = RuleLabels.from_comment(comment)
        if rule is not None:
            labels_of[mark] = labels = f'kind="{rule.kind}",name="{escaped(rule.name)}",eip="{escaped(rule.eip)}"'
            connections.append(f"natgwd_rule_connections_total{{{labels}}} {count}")
    for key, count, size, _ in listings.get("rule_traffic", ()):
        direction, _, mark = key.partition(" . ")
        if (rule_labels := labels_of.get(mark)) is not None:
            labels = f'{rule_labels},direction="{escaped(direction)}"'
            packets.append(f"natgwd_rule_packets_total{{{labels}}} {count}")
            octets.append(f"natgwd_rule_bytes_total{{{labels}}} {size}")
    for interface, count, _, _ in listings.get("invalid_dropped", ()):
        invalid.append(
            f'natgwd_invalid_dropped_packets_total{{interface="{escaped(interface.strip(chr(34)))}"}} {count}'
        )
    return "\n".join((*connections, *packets, *octets, *invalid, "")).encode()


names = st.text(alphabet='ab/"\\\n .-', min_size=0, max_size=6)
comments = st.one_of(
    st.tuples(st.sampled_from(("snat", "dnat", "fip")), names, names).map("/".join),
    st.sampled_from(("", "not-a-rule", "dnat/a/b/c")),
)
counts = st.integers(0, 2**64 - 1).map(str)


@st.composite
def listings(draw: st.DrawFn, marks: list[int]) -> dict[str, list[CountedElement]]:
    present = draw(st.lists(st.sampled_from(marks), unique=True)) if marks else []
    connections = [(str(mark), draw(counts), draw(counts), draw(comments)) for mark in present]
    traffic = [
        (f"{direction} . {mark}", draw(counts), draw(counts), "")
        for mark in draw(st.lists(st.sampled_from(marks), unique=True))
        for direction in draw(st.sets(st.sampled_from(("original", "reply", 'o"dd'))))
    ]
    interfaces = [(f'"{name}"', draw(counts), draw(counts), "") for name in draw(st.lists(names, max_size=3))]
    return {
        "rule_connections": draw(st.permutations(connections)),
        "rule_traffic": draw(st.permutations(traffic)),
        "invalid_dropped": interfaces,
    }


scrapes = st.lists(st.integers(1, 40), min_size=1, max_size=12, unique=True).flatmap(
    lambda marks: st.lists(listings(marks), min_size=1, max_size=4)
)


@settings(max_examples=200, deadline=None)
@given(scrapes)
def test_every_scrape_is_what_one_line_per_sample_makes(sequence: list[dict[str, list[CountedElement]]]) -> None:
    counters = RuleCounters(dict)
    for listing in sequence:
        assert counters.exposition(listing) == one_line_per_sample(listing)


@settings(max_examples=50, deadline=None)
@given(scrapes)
def test_a_scrape_in_small_parts_is_the_same_text(sequence: list[dict[str, list[CountedElement]]]) -> None:
    """Parts of PART_PIECES pieces (about a megabyte each at scale: one part held at a time)."""
    counters = RuleCounters(dict)
    with patch.object(metrics, "PART_PIECES", 5):
        for listing in sequence:
            parts, expected = list(counters.labelled_exposition(listing)[0]), one_line_per_sample(listing)
            assert b"".join(parts) == expected
            assert all(part for part in parts)
            assert len(parts) >= expected.count(b"\n") // 10  # a line is one piece at least, a header two


def test_the_same_rules_listed_in_another_order_keep_their_counts() -> None:
    first = {
        "rule_connections": [("1", "10", "0", "dnat/a/10.0.0.1"), ("2", "20", "0", "dnat/b/10.0.0.1")],
        "rule_traffic": [("original . 1", "11", "110", ""), ("original . 2", "21", "210", "")],
    }
    second = {name: listing[::-1] for name, listing in first.items()}
    counters = RuleCounters(dict)
    counters.exposition(first)
    text = counters.exposition(second).decode()
    assert 'natgwd_rule_connections_total{kind="dnat",name="a",eip="10.0.0.1"} 10\n' in text
    assert 'natgwd_rule_packets_total{kind="dnat",name="b",eip="10.0.0.1",direction="original"} 21\n' in text
    assert counters.exposition(second) == one_line_per_sample(second)


def test_a_changed_comment_changes_the_labels() -> None:
    counters = RuleCounters(dict)
    counters.exposition({"rule_connections": [("7", "1", "0", "dnat/old/10.0.0.1")]})
    text = counters.exposition({"rule_connections": [("7", "1", "0", "dnat/new/10.0.0.1")]}).decode()
    assert 'name="new"' in text
    assert 'name="old"' not in text


def watch() -> ConnectionWatch:
    made = ConnectionWatch(dict, dict)
    made._sock = types.SimpleNamespace(  # type: ignore[assignment]
        receive=lambda block: [], receive_counted=lambda datagrams: Counted([], [], False)
    )
    made._base = {}
    return made


@settings(max_examples=50, deadline=None)
@given(scrapes)
def test_the_watch_writes_the_same_with_the_rule_counters_labels(
    sequence: list[dict[str, list[CountedElement]]],
) -> None:
    counters, shared, alone = RuleCounters(dict), watch(), watch()
    for listing in sequence:
        _, labelled = counters.labelled_exposition(listing)
        assert shared.exposition(listing, labelled) == alone.exposition(listing)


def test_scrapes_of_unchanged_rules_with_new_counts_and_elements() -> None:
    connections = [("1", "10", "0", "dnat/a/10.0.0.1"), ("2", "20", "0", "fip/b/10.0.0.2"), ("3", "1", "0", "")]
    first = {
        "rule_connections": connections,
        "rule_traffic": [("original . 1", "1", "10", ""), ("reply . 2", "2", "20", "")],
    }
    later = [
        {
            "rule_connections": connections,
            "rule_traffic": [("reply . 2", "5", "50", ""), ("original . 1", "4", "40", "")],
        },
        # A key seen for the first time, and one of an element that names no rule.
        {
            "rule_connections": connections,
            "rule_traffic": [("reply . 1", "7", "70", ""), ("original . 3", "1", "1", "")],
        },
        {"rule_connections": connections[::-1], "rule_traffic": [("reply . 1", "8", "80", "")]},
    ]
    counters = RuleCounters(dict)
    for listing in (first, *later):
        assert counters.exposition(listing) == one_line_per_sample(listing)


@st.composite
def growing_counts(draw: st.DrawFn) -> list[dict[str, list[CountedElement]]]:
    """Scrapes of the same rules (in changing orders, now and then one more) whose first
    packets only grow, as the kernel's counters do: the case the kept labels and the
    failures' shortcut are for."""
    rules = draw(st.lists(st.tuples(st.integers(1, 30), comments), min_size=1, max_size=8, unique_by=lambda r: r[0]))
    counted = dict.fromkeys((mark for mark, _ in rules), 0)
    sequence = []
    for _ in range(draw(st.integers(2, 6))):
        if draw(st.booleans()) and (mark := draw(st.integers(31, 40))) not in counted:
            rules.append((mark, draw(comments)))
            counted[mark] = 0
        for mark in draw(st.lists(st.sampled_from(sorted(counted)), max_size=3)):
            counted[mark] += draw(st.integers(0, 3))
        listed = [(str(mark), str(counted[mark]), "0", comment) for mark, comment in rules]
        sequence.append({"rule_connections": draw(st.permutations(listed))})
    return sequence


@settings(max_examples=100, deadline=None)
@given(growing_counts(), st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2)), max_size=6))
def test_unchanged_rules_with_growing_counts_write_what_a_fresh_start_writes(
    sequence: list[dict[str, list[CountedElement]]], opened: list[tuple[int, int]]
) -> None:
    counters, kept, recounted = RuleCounters(dict), watch(), watch()
    for mark, count in opened:  # NEW events: a rule's committed connections
        for made in (kept, recounted):
            made.tracker._opened[mark] += count
    for listing in sequence:
        assert counters.exposition(listing) == one_line_per_sample(listing)
        _, labelled = counters.labelled_exposition(listing)
        recounted._failures_for = None  # every rule visited, as before the shortcut
        assert kept.exposition(listing, labelled) == recounted.exposition(listing, labelled)
