"""Where each rule of a state file lies in its text, so that a new version of the file is
decoded only where it differs from the last accepted one.

A change rewrites a few rules of a file of megabytes, and decoding all of it again costs
about a millisecond per thousand rules. The new text is compared with the last one at
memory speed; when the difference lies inside one rule list, only the items between that
list's equal head and tail are decoded (with the decoder a full decode uses: duplicate
keys and NaN refused, fractions noted), and the document is the last one with that list's
middle replaced. Anything else (a change outside the rule lists, in several lists, or
text this reader does not follow) is left to the full decode.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from natgwd.state.model import RULE_KINDS, RuleKind

Span = tuple[int, int]  # [start, end) of an item in the text
_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 16
_MAX_RUNS = 32  # merged at more: a lookup walks the runs, a merge every span
Scan = Callable[[str, int], tuple[Any, int]]  # json's scanner: (value, end) of the value at an offset


class Spans:
    """The spans of a list's items, in runs each moved by its own shift: a change that
    lengthens the text moves the runs after it, not each of their (thousands of) spans.
    Runs are merged back into one when a few dozen changes have split them."""

    __slots__ = ("_length", "_runs")

    def __init__(self, runs: list[tuple[int, list[Span]]]) -> None:
        self._runs = [(shift, spans) for shift, spans in runs if spans]
        self._length = sum(len(spans) for _, spans in self._runs)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Span]:
        for shift, spans in self._runs:
            yield from ((start + shift, end + shift) for start, end in spans) if shift else spans

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spans) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Spans({list(self)!r})"

    def __getitem__(self, index: int) -> Span:
        if not 0 <= index < self._length:
            raise IndexError(index)
        for shift, spans in self._runs:
            if index < len(spans):
                start, end = spans[index]
                return start + shift, end + shift
            index -= len(spans)
        raise AssertionError("unreachable")

    def ending_by(self, offset: int) -> int:
        """How many spans end at or before `offset` (they are in the text's order)."""
        return self._count(offset, 1, bisect.bisect_right)

    def starting_before(self, offset: int) -> int:
        """How many spans start before `offset`."""
        return self._count(offset, 0, bisect.bisect_left)

    def _count(self, offset: int, side: int, find: Callable[..., int]) -> int:
        counted = 0
        for shift, spans in self._runs:
            within = find(spans, offset - shift, key=itemgetter(side))
            counted += within
            if within < len(spans):
                break  # the runs after it lie further on
        return counted

    def shifted(self, shift: int) -> Spans:
        return Spans([(moved + shift, spans) for moved, spans in self._runs]) if shift else self

    def replaced(self, head: int, tail: int, middle: list[Span], shift: int) -> Spans:
        """The spans with those between the first `head` and the last `tail` replaced by
        `middle`, and the last `tail` moved by `shift`."""
        after = Spans(self._slice(self._length - tail, self._length)).shifted(shift)
        runs = [*self._slice(0, head), (0, middle), *after._runs]
        if len(runs) > _MAX_RUNS:
            runs = [(0, list(Spans(runs)))]
        return Spans(runs)

    def _slice(self, first: int, stop: int) -> list[tuple[int, list[Span]]]:
        """The runs of spans [first, stop)."""
        runs = []
        at = 0
        for shift, spans in self._runs:
            low, high = max(first - at, 0), min(stop - at, len(spans))
            if low < high:
                runs.append((shift, spans if (low, high) == (0, len(spans)) else spans[low:high]))
            at += len(spans)
        return runs


@dataclass(frozen=True)
class Layout:
    """The text of an accepted document and where its rule lists and their items lie."""

    text: str
    lists: dict[RuleKind, Span]  # from "[" to after "]"
    items: dict[RuleKind, Spans]
    end: int  # after the document's closing "}"


@dataclass(frozen=True)
class Splice:
    """A new text read as the last document with one rule list's middle replaced."""

    document: dict[str, Any]
    kind: RuleKind
    head: int  # items equal (the very objects) at the head of the list
    tail: int  # and at its tail
    layout: Layout


def layout_of(text: str, document: Any, scan: Scan) -> Layout | None:
    """Where the rule lists of `document` (decoded from `text`) lie; None when the text is
    not a top-level object whose rule lists this reader can follow."""
    if not isinstance(document, dict):
        return None
    lists: dict[RuleKind, Span] = {}
    items: dict[RuleKind, Spans] = {}
    try:
        at = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
        if text[at] != "{":
            return None
        at += 1
        while True:
            at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
            if text[at] == "}":
                break
            key, at = scan(text, at)
            at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
            if text[at] != ":":
                return None
            at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
            start = at
            if key in RULE_KINDS and text[at] == "[":
                spans, at = _items(text, at, scan)
                lists[key], items[key] = (start, at), Spans([(0, spans)])
            else:
                _, at = scan(text, at)
            at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
            if text[at] == ",":
                at += 1
            elif text[at] != "}":
                return None
    except (IndexError, StopIteration, ValueError, RecursionError):
        return None
    return Layout(text, lists, items, at + 1)


def _items(text: str, at: int, scan: Scan) -> tuple[list[Span], int]:
    """The spans of the items of the list that opens at `at`, and where it ends."""
    spans: list[Span] = []
    at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
    if text[at] == "]":
        return spans, at + 1
    while True:
        _, end = scan(text, at)
        spans.append((at, end))
        at = _SPACE.match(text, end).end()  # type: ignore[union-attr]
        if text[at] == "]":
            return spans, at + 1
        if text[at] != ",":
            raise ValueError("expected , or ]")
        at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]


def splice(last: Layout, document: dict[str, Any], text: str, scan: Scan) -> Splice | None:
    """`text` as `document` (the last accepted one, decoded from last.text) with the
    items of one rule list replaced; None when the difference is not inside one list."""
    old = last.text
    shorter = min(len(old), len(text))
    prefix = _common_prefix(old, text, shorter)
    if prefix == len(old) == len(text):
        return None  # the same text: nothing to splice
    if prefix >= last.end and not text[last.end :].strip(" \t\n\r"):
        # Only the white space after the document differs (a writer's stamp, a newline).
        first = RULE_KINDS[0]
        return Splice(document, first, len(document.get(first, ())), 0, Layout(text, last.lists, last.items, last.end))
    suffix = _common_suffix(old, text, shorter - prefix)
    changed_end = len(old) - suffix  # the difference is old[prefix:changed_end]
    kind = next((k for k, (start, end) in last.lists.items() if start < prefix and changed_end < end), None)
    if kind is None:
        return None
    shift = len(text) - len(old)
    spans = last.items[kind]
    head = spans.ending_by(prefix)
    tail = len(spans) - spans.starting_before(changed_end)
    tail = min(tail, len(spans) - head)
    start, end = last.lists[kind]
    try:
        decoded, new_spans = _middle(text, spans, head, tail, start, end + shift, shift, scan)
    except (IndexError, StopIteration, ValueError, RecursionError):
        return None
    if decoded is None:
        return None
    old_items = document[kind]
    items = [*old_items[:head], *decoded, *old_items[len(old_items) - tail :]]
    new_items = dict(last.items)
    new_lists = dict(last.lists)
    for other, (s, e) in last.lists.items():
        if other != kind and s > start and shift:
            new_lists[other] = (s + shift, e + shift)
            new_items[other] = last.items[other].shifted(shift)
    new_lists[kind] = (start, end + shift)
    new_items[kind] = spans.replaced(head, tail, new_spans, shift)
    return Splice({**document, kind: items}, kind, head, tail, Layout(text, new_lists, new_items, last.end + shift))


def _middle(
    text: str, spans: Spans, head: int, tail: int, start: int, end: int, shift: int, scan: Scan
) -> tuple[list[Any] | None, list[Span]]:
    """The items between the head and the tail of the list [start, end) of the new text."""
    stop = spans[len(spans) - tail][0] + shift if tail else end - 1  # the first tail item, or "]"
    at = spans[head - 1][1] if head else start + 1
    decoded: list[Any] = []
    new_spans: list[Span] = []
    first = head == 0
    while True:
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        if not first:
            if text[at] == "]":
                return (decoded, new_spans) if tail == 0 and at == stop else (None, [])
            if text[at] != ",":
                return None, []
            at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
        elif text[at] == "]":
            return (decoded, new_spans) if tail == 0 and at == stop else (None, [])
        first = False
        if tail and at >= stop:
            return (decoded, new_spans) if at == stop else (None, [])
        item, item_end = scan(text, at)
        decoded.append(item)
        new_spans.append((at, item_end))
        at = item_end


def _common_prefix(a: str, b: str, limit: int) -> int:
    """How many characters a and b share at their start (at most `limit`): chunks
    compared at memory speed, then a bisection inside the chunk that differs."""
    low = 0
    while low + _CHUNK <= limit and a[low : low + _CHUNK] == b[low : low + _CHUNK]:
        low += _CHUNK
    high = min(low + _CHUNK, limit)
    if a[low:high] == b[low:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low]; a[low:high] != b[low:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _common_suffix(a: str, b: str, limit: int) -> int:
    """How many characters a and b share at their end (at most `limit`)."""
    la, lb = len(a), len(b)
    low = 0
    while low + _CHUNK <= limit and a[la - low - _CHUNK : la - low] == b[lb - low - _CHUNK : lb - low]:
        low += _CHUNK
    high = min(low + _CHUNK, limit)
    if a[la - high : la - low] == b[lb - high : lb - low]:
        return high
    while high - low > 1:  # the last `low` equal; the last `high` not
        middle = (low + high) // 2
        if a[la - middle : la - low] == b[lb - middle : lb - low]:
            low = middle
        else:
            high = middle
    return low
