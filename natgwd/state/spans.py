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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from natgwd.state.model import RULE_KINDS, RuleKind

Span = tuple[int, int]  # [start, end) of an item in the text
_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 16
Scan = Callable[[str, int], tuple[Any, int]]  # json's scanner: (value, end) of the value at an offset


@dataclass(frozen=True)
class Layout:
    """The text of an accepted document and where its rule lists and their items lie."""

    text: str
    lists: dict[RuleKind, Span]  # from "[" to after "]"
    items: dict[RuleKind, list[Span]]
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
    items: dict[RuleKind, list[Span]] = {}
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
                lists[key], items[key] = (start, at), spans
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
    head = bisect.bisect_right(spans, prefix, key=lambda span: span[1])
    tail = len(spans) - bisect.bisect_left(spans, changed_end, key=lambda span: span[0])
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
    tail_spans = spans[len(spans) - tail :]
    moved = [(s + shift, e + shift) for s, e in tail_spans] if shift else tail_spans
    new_items = {k: v for k, v in last.items.items() if k != kind}
    new_lists = dict(last.lists)
    for other, (s, e) in last.lists.items():
        if other != kind and s > start and shift:
            new_lists[other] = (s + shift, e + shift)
            new_items[other] = [(a + shift, b + shift) for a, b in last.items[other]]
    new_lists[kind] = (start, end + shift)
    new_items[kind] = [*spans[:head], *new_spans, *moved]
    return Splice({**document, kind: items}, kind, head, tail, Layout(text, new_lists, new_items, last.end + shift))


def _middle(
    text: str, spans: list[Span], head: int, tail: int, start: int, end: int, shift: int, scan: Scan
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
