"""natgwd.state.spans: a new text that differs from the last one inside one rule list is
read by decoding only that list's changed items, and reads exactly as a full decode."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from benchmarks.rulesets import encode, workload
from natgwd.state import tracker as tracker_module
from natgwd.state.decode import scanner
from natgwd.state.problems import InvalidStateError
from natgwd.state.spans import Spans, layout_of, splice
from natgwd.state.tracker import StateTracker


def document(count: int) -> dict[str, Any]:
    dnat = [
        {"name": f"d{i}", "eip": "e", "protocol": "tcp", "externalPort": 1000 + i, "internalIp": "10.0.0.2"}
        | {"internalPort": 80}
        for i in range(count)
    ]
    return {"version": 1, "eips": [{"name": "e", "v4ip": "10.1.1.1"}], "snat": [], "dnat": dnat, "fip": []}


def edited(before: dict[str, Any], edit: str, at: int) -> dict[str, Any]:
    after = copy.deepcopy(before)
    items = after["dnat"]
    if edit == "change":
        items[at]["internalIp"] = "10.0.0.3"
    elif edit == "insert":
        items.insert(at, dict(items[at], name="new", externalPort=9999))
    else:
        del items[at]
    return after


@pytest.mark.parametrize("indent", [None, 1, 4])
@pytest.mark.parametrize("edit", ["change", "insert", "delete"])
@pytest.mark.parametrize("at", [0, 50, 99])
def test_one_changed_rule_is_decoded_alone(indent: int | None, edit: str, at: int) -> None:
    before = document(100)
    old_text = json.dumps(before, indent=indent)
    layout = layout_of(old_text, json.loads(old_text), scanner())
    assert layout is not None
    after = edited(before, edit, at)
    text = json.dumps(after, indent=indent)
    spliced = splice(layout, before, text, scanner())
    assert spliced is not None
    assert spliced.document == json.loads(text)
    assert spliced.kind == "dnat"
    # At most the changed item and a neighbour whose text runs on like it are decoded.
    assert len(after["dnat"]) - spliced.head - spliced.tail <= (1 if edit == "delete" else 2)
    # The items outside the splice are the last document's own objects.
    assert all(a is b for a, b in zip(spliced.document["dnat"][: spliced.head], before["dnat"], strict=False))
    assert spliced.layout == layout_of(text, json.loads(text), scanner())


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(version=2),  # outside the rule lists
        lambda d: d["eips"].append({"name": "f", "v4ip": "10.1.1.2"}),
        lambda d: (d["dnat"][0].update(internalPort=81), d["snat"].append({"name": "s"})),  # two lists
    ],
)
def test_a_change_outside_one_rule_list_is_left_to_the_full_decode(change: Any) -> None:
    before = document(10)
    layout = layout_of(json.dumps(before), before, scanner())
    assert layout is not None
    after = copy.deepcopy(before)
    change(after)
    assert splice(layout, before, json.dumps(after), scanner()) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "dnat": [{"name": "a", "name": "b"}], "snat": [], "fip": []}',  # duplicate key
        '{"version": 1, "dnat": [{"name": NaN}], "snat": [], "fip": []}',
        '{"version": 1, "dnat": [{"name": "a"}, ], "snat": [], "fip": []}',  # trailing comma
        '{"version": 1, "dnat": [{"name": "a"}], "snat": [], "fip": [] ',
    ],
)
def test_text_a_full_decode_refuses_is_never_spliced(text: str) -> None:
    before = {"version": 1, "dnat": [{"name": "x"}], "snat": [], "fip": []}
    old_text = json.dumps(before)
    layout = layout_of(old_text, before, scanner())
    assert layout is not None
    assert splice(layout, before, text, scanner()) is None


def test_white_space_after_the_document_is_no_change() -> None:
    before = document(10)
    text = json.dumps(before)
    layout = layout_of(text, before, scanner())
    assert layout is not None
    spliced = splice(layout, before, text + "\n \t\n", scanner())
    assert spliced is not None and spliced.document is before
    assert spliced.head == len(before[spliced.kind]) and spliced.tail == 0
    assert splice(layout, before, text + "\n x", scanner()) is None


@pytest.mark.parametrize("settled", [True, False])
def test_a_state_checked_in_full_is_laid_out_after_its_apply(settled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prevents: the full path scanning its whole text for the next change's splice before
    the apply (80 ms of a cold start at 50,000 rules), or a next change that is decoded in
    full because the layout was left unmade."""
    work = workload(100)
    raw = encode(work.state)
    tracker = StateTracker()
    first = tracker.check(raw)
    assert first.delta is None and first.layout is None
    tracker.accept(first)
    if settled:
        tracker.settle()
        assert tracker.accepted is not None
        assert tracker.accepted.layout == layout_of(raw.decode(), first.validated.document, scanner())
    changed = copy.deepcopy(work.state)
    changed["dnat"][5]["internalPort"] = "81"

    def no_full_decode(text: str) -> Any:
        raise AssertionError("decoded in full")

    monkeypatch.setattr(tracker_module, "decode_text", no_full_decode)
    change = tracker.check(encode(changed))
    assert change.delta is not None and len(change.delta) == 2


def test_a_port_1_turned_true_after_a_full_check_is_refused() -> None:
    """Prevents: the DNAT rules whose port is the integer 1 (port_one, made after the
    apply with the layout) left unmade, so that `true`, equal to 1 in Python, passed as
    an unchanged rule."""
    work = workload(100)
    work.state["dnat"][5]["externalPort"] = 1
    tracker = StateTracker()
    tracker.accept(tracker.check(encode(work.state)))
    work.state["dnat"][5]["externalPort"] = True
    with pytest.raises(InvalidStateError, match=r"dnat\[5\]\.externalPort"):
        tracker.check(encode(work.state))


def test_a_long_series_of_changes_keeps_every_span_where_a_fresh_read_finds_it() -> None:
    """Each change moves the spans after it by a shift kept per run of spans: after many
    changes (more than the runs kept before they are merged), in all three lists, at
    their ends and inside, the layout is still exactly that of the text read afresh."""
    import random

    rng = random.Random(26)
    before = document(60)
    before["snat"] = [{"name": f"s{i}", "eip": "e", "internalCIDR": "10.0.0.0/24"} for i in range(5)]
    before["fip"] = [{"name": f"f{i}", "eip": "e", "internalIp": "10.0.0.9"} for i in range(5)]
    text = json.dumps(before, indent=1)
    layout = layout_of(text, before, scanner())
    assert layout is not None
    for round_ in range(120):
        after = copy.deepcopy(before)
        kind = rng.choice(["dnat", "dnat", "snat", "fip"])
        items = after[kind]
        at = rng.choice([0, len(items) - 1, rng.randrange(len(items))])
        edit = rng.choice(["change", "insert", "delete"] if len(items) > 2 else ["change", "insert"])
        if edit == "change":
            items[at]["name"] += "x" * rng.randrange(1, 3)
        elif edit == "insert":
            items.insert(at, dict(items[at], name=f"n{round_}"))
        else:
            del items[at]
        text = json.dumps(after, indent=1)
        spliced = splice(layout, before, text, scanner())
        assert spliced is not None and spliced.document == after
        assert spliced.layout == layout_of(text, json.loads(text), scanner()), f"round {round_}"
        for k, spans in spliced.layout.items.items():
            assert [spans[i] for i in range(len(spans))] == list(spans), k
        before, layout = spliced.document, spliced.layout


def test_spans_count_and_index_across_their_runs() -> None:
    spans = Spans([(0, [(0, 2), (3, 5)]), (100, [(-90, -80)]), (0, []), (-5, [(30, 40), (50, 60)])])
    assert list(spans) == [(0, 2), (3, 5), (10, 20), (25, 35), (45, 55)]
    assert len(spans) == 5 and spans[2] == (10, 20) and spans[4] == (45, 55)
    with pytest.raises(IndexError):
        spans[5]
    assert [spans.ending_by(offset) for offset in (0, 2, 5, 19, 20, 55, 99)] == [0, 1, 2, 2, 3, 5, 5]
    assert [spans.starting_before(offset) for offset in (0, 1, 10, 11, 45, 46)] == [0, 1, 2, 3, 4, 5]
    assert spans.replaced(1, 2, [(4, 6)], 3) == Spans([(0, [(0, 2), (4, 6), (28, 38), (48, 58)])])
    assert spans.shifted(0) is spans


def test_spans_replaced_many_times_read_as_a_plain_list_would() -> None:
    """More replacements than the runs kept before a merge, against a list of spans."""
    import random

    rng = random.Random(11)
    plain = [(10 * i, 10 * i + 5) for i in range(200)]
    spans = Spans([(0, list(plain))])
    for _ in range(300):
        head = rng.randrange(len(plain) + 1)
        tail = len(plain) - head - rng.randrange(min(3, len(plain) - head + 1))  # 0 to 2 items out
        stop = len(plain) - tail
        low = plain[head - 1][1] if head else 0
        middle = [(low + 2 * i + 1, low + 2 * i + 2) for i in range(rng.randrange(3))]
        # The text from `low` to the first span of the tail, rewritten shorter or longer.
        shift = low + 2 * len(middle) + rng.randrange(2, 6) - (plain[stop][0] if tail else low + 4)
        plain = [*plain[:head], *middle, *((s + shift, e + shift) for s, e in plain[stop:])]
        spans = spans.replaced(head, tail, middle, shift)
        assert list(spans) == plain and len(spans) == len(plain)
        offset = rng.randrange(-5, 2100)
        assert spans.ending_by(offset) == sum(1 for _, end in plain if end <= offset)
        assert spans.starting_before(offset) == sum(1 for start, _ in plain if start < offset)
