"""The kernel's per-element counters as a scrape lists them, and the reconciler's memory
of them.

A scrape reads 36,000 counting elements at 10,000 rules, and may run while a change is
being planned on another thread of the same interpreter. So a listing is kept as text
(counts as decimal digits; marks in decimal as netlink is read, in hex as `nft list`
writes them) and exported as it is; it is turned into the plan's notation only when the
memory is consulted, which is when an element has to be re-created.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from itertools import compress
from operator import itemgetter

from natgwd.planning.handover import HANDED_OVER
from natgwd.planning.layout import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC, parts, whole_set
from natgwd.planning.portblocks import PORT_BLOCK_ATTEMPTS
from natgwd.planning.table import Counter, Element

# Logical sets: a scrape lists each whole, from its shards.
COUNTING_SETS = (RULE_CONNECTIONS, RULE_TRAFFIC, INVALID_DROPS, HANDED_OVER, PORT_BLOCK_ATTEMPTS)


# (key, packets, bytes, comment) as the kernel lists them: the key as read ("7",
# "original . 7", or "0x00000007" as `nft list` writes it; '"net2"'), the counts in decimal digits, the
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
    """The last known counter of every counting element, by (logical set, key): a
    re-created element (its table or itself deleted by someone else) is seeded from it, so
    that no rule's counters go backwards. By logical set (natgwd.planning.layout.whole_set):
    a key is in one shard only, and the counters of a table written before the counting
    sets were split seed the elements of their shards (an upgrade's restart).

    Rule ids are never reused, so an element's counter only grows while it exists: merging
    keeps the larger value, whatever order readings arrive in. A reading of zero is not
    kept: a re-created element starts from zero anyway. So an idle rule costs no memory,
    and forgetting removed rules, at every change, touches only what was removed."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, Counter]] = {name: {} for name in COUNTING_SETS}
        self._latest_listings: dict[str, list[CountedElement]] | None = None  # from a scrape, not yet merged
        self._lock = threading.Lock()

    def remember_listings(self, listings: Listings) -> None:
        """From a scrape: its elements that counted a packet (a byte comes with one),
        merged when next consulted (a scrape must not wait for the merge; picked out in
        one C loop)."""
        counted = {
            name: list(compress(listing, map("0".__ne__, map(itemgetter(1), listing))))
            for name, listing in listings.items()
            if name in self._known
        }
        with self._lock:
            self._latest_listings = counted

    def remember(self, sets: Mapping[str, Mapping[str, Element]]) -> None:
        """From a table read (the reconciler's thread)."""
        self._merge_listings()
        for name, keyed in sets.items():
            known = self._known.get(whole_set(name))
            if known is not None:
                for key, element in keyed.items():
                    if element.counter is not None:
                        self._keep(known, key, element.counter)

    def of(self, set_name: str) -> Mapping[str, Counter]:
        """The last known counter of each element of a counting set (or of the logical set
        a shard belongs to) that ever counted."""
        self._merge_listings()
        return self._known.get(whole_set(set_name), {})

    def forget_except(self, present: Mapping[str, Mapping[str, object]]) -> None:
        """Forget elements that are no longer wanted (their rules are gone)."""
        self._merge_listings()
        for name, known in self._known.items():
            wanted = set().union(*(present.get(part, {}).keys() for part in {name, *parts(name)}))
            if not known.keys() <= wanted:
                for key in known.keys() - wanted:
                    del known[key]

    def forget(self, name: str, keys: Iterable[str]) -> None:
        """Forget elements of set `name` that are gone with their rules."""
        known = self._known.get(whole_set(name))
        if known:
            for key in keys:
                known.pop(key, None)

    def _merge_listings(self) -> None:
        with self._lock:
            listings, self._latest_listings = self._latest_listings, None
        for name, listing in (listings or {}).items():
            known = self._known[name]
            for key, packets, octets, _ in listing:
                self._keep(known, canonical_key(key) if "0x" in key else key, Counter(int(packets), int(octets)))

    @staticmethod
    def _keep(known: dict[str, Counter], key: str, counter: Counter) -> None:
        if not (counter.packets or counter.bytes):
            return
        before = known.get(key)
        if before is None or (counter.packets, counter.bytes) > (before.packets, before.bytes):
            known[key] = counter
