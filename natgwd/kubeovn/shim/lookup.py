"""What the edits look up in a document's lists of rules and EIPs (the names taken, the
rules of an EIP, the EIP of an address), indexed so that a call costs what it changes, not
what the document holds: in a controller's replay the rules come back one call each, and
scans of 10,000 DNAT rules per call made each call slower than the one before.

An index belongs to one list object. Edits never change an item of these lists, nor the
lists they copy, other than by appending (natgwd.kubeovn.shim.edits): a working copy's
list starts from the index of the list it copies, keeps what is appended to it in an index
of its own, and is merged into the copied one only once the call is accepted (`keep`), so
that a refused call leaves the accepted document's indexes as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Items = list[dict[str, Any]]


class _Index:
    """The names of a list's first `length` items, and those items by the value of `key`
    (in list order); on top of `under`, the index of the list this one copies, for the
    items the copy began with."""

    __slots__ = ("by_key", "items", "key", "length", "names", "under")

    def __init__(self, items: Items, key: str, under: _Index | None = None) -> None:
        self.items, self.key, self.under = items, key, under
        self.length: int = under.length if under is not None else 0
        self.names: set[str] = set()
        self.by_key: dict[str, Items] = {}

    def catch_up(self) -> None:
        """Index what was appended to the list since."""
        names, by_key, key = self.names, self.by_key, self.key
        for item in self.items[self.length :]:
            name, value = item.get("name"), item.get(key)
            if isinstance(name, str):  # an item of another type can equal no name asked for
                names.add(name)
            if isinstance(value, str):
                by_key.setdefault(value, []).append(item)
        self.length = len(self.items)

    def taken(self, name: str) -> bool:
        return name in self.names or (self.under is not None and name in self.under.names)

    def having(self, value: str) -> Iterator[dict[str, Any]]:
        """The items whose `key` is `value`, in list order."""
        if self.under is not None:
            yield from self.under.by_key.get(value, ())
        yield from self.by_key.get(value, ())

    def stand_alone(self) -> None:
        """Take over the copied list's index, which is not used again (its list is no longer
        the accepted one's)."""
        under = self.under
        if under is None:
            return
        under.names.update(self.names)
        for value, items in self.by_key.items():
            under.by_key.setdefault(value, []).extend(items)
        self.names, self.by_key, self.under = under.names, under.by_key, None


class Lookup:
    """The indexes of the lists a call's edits look into; the edit service keeps one from
    call to call, a single call (the file protocol) starts from none."""

    def __init__(self) -> None:
        self._indexes: dict[int, _Index] = {}  # by id() of the list, which the index holds

    def _found(self, items: Items) -> _Index | None:
        index = self._indexes.get(id(items))
        return index if index is not None and index.items is items else None

    def copied(self, original: Items, copy: Items, key: str) -> None:
        """`copy` is a new list of `original`'s items, for an edit to append to."""
        under = self._found(original)
        if under is not None:
            under.catch_up()
            self._indexes[id(copy)] = _Index(copy, key, under)

    def index(self, items: Items, key: str) -> _Index:
        index = self._found(items)
        if index is None or index.key != key or len(items) < index.length:
            index = self._indexes[id(items)] = _Index(items, key)
        index.catch_up()
        return index

    def keep(self, lists: list[Items]) -> None:
        """The document holding `lists` is accepted: only their indexes are used again."""
        kept = {}
        for items in lists:
            index = self._found(items)
            if index is not None:
                index.stand_alone()
                kept[id(items)] = index
        self._indexes = kept
