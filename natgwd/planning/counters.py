"""The kernel's per-element counters as a scrape lists them, and the reconciler's memory
of them.

A scrape reads 36,000 counting elements at 10,000 rules, and may run while a change is
being planned on another thread of the same interpreter. So a listing is kept in the
kernel's own notation (marks in hex, counts as decimal text) and exported as it is; it is
turned into the plan's notation only when the memory is consulted, which is when an
element has to be re-created.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from natgwd.planning.plan import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC
from natgwd.planning.table import Counter, Element

COUNTING_SETS = (RULE_CONNECTIONS, RULE_TRAFFIC, INVALID_DROPS)


# (key, packets, bytes, comment) as the kernel lists them: the key in the kernel's notation
# ("0x00000007", "original . 0x00000007", '"net2"'), the counts in decimal digits, the
# comment "" when there is none. A plain tuple: a scrape makes 36,000 of them.
CountedElement = tuple[str, str, str, str]


Listings = Mapping[str, list[CountedElement]]  # set name -> its elements


def canonical_key(listed: str) -> str:
    """The key as the plan writes it: marks in decimal."""
    return " . ".join(str(int(part, 16)) if part.startswith("0x") else part for part in listed.split(" . "))


def counted_elements(listing: Iterable[CountedElement]) -> dict[str, Element]:
    return {
        canonical_key(key): Element(None, comment or None, Counter(int(packets), int(octets)))
        for key, packets, octets, comment in listing
    }


class CounterMemory:
    """The last known counter of every counting element, by (set, key): a re-created
    element (its table or itself deleted by someone else) is seeded from it, so that no
    rule's counters go backwards.

    Rule ids are never reused, so an element's counter only grows while it exists: merging
    keeps the larger value, whatever order readings arrive in."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], Counter] = {}
        self._latest_listings: Listings | None = None  # from a scrape, not yet merged
        self._lock = threading.Lock()

    def remember_listings(self, listings: Listings) -> None:
        """From a scrape: kept as it is, merged when next consulted."""
        with self._lock:
            self._latest_listings = listings

    def remember(self, sets: Mapping[str, Mapping[str, Element]]) -> None:
        """From a table read (the reconciler's thread)."""
        self._merge_listings()
        for name in COUNTING_SETS:
            for key, element in sets.get(name, {}).items():
                if element.counter is not None:
                    self._keep((name, key), element.counter)

    def get(self, name_and_key: tuple[str, str]) -> Counter | None:
        self._merge_listings()
        return self._known.get(name_and_key)

    def forget_except(self, present: Mapping[str, Mapping[str, object]]) -> None:
        """Forget elements that are no longer wanted (their rules are gone)."""
        self._merge_listings()
        self._known = {
            (name, key): counter for (name, key), counter in self._known.items() if key in present.get(name, {})
        }

    def forget(self, name: str, keys: Iterable[str]) -> None:
        """Forget elements of set `name` that are gone with their rules."""
        for key in keys:
            self._known.pop((name, key), None)

    def _merge_listings(self) -> None:
        with self._lock:
            listings, self._latest_listings = self._latest_listings, None
        for name, listing in (listings or {}).items():
            for key, element in counted_elements(listing).items():
                assert element.counter is not None
                self._keep((name, key), element.counter)

    def _keep(self, name_and_key: tuple[str, str], counter: Counter) -> None:
        known = self._known.get(name_and_key)
        if known is None or (counter.packets, counter.bytes) > (known.packets, known.bytes):
            self._known[name_and_key] = counter
