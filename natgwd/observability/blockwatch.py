"""Port-block allocation failures per internal address (natgwd.planning.portblocks).

The same reckoning as the EIP's failures (natgwd.observability.connwatch), one address
finer: the `account` chain counts each port-block connection's first packet by (rule id,
source address) in `port_block_attempts`, before conntrack confirms the connection; a
NEW event comes only for a confirmed one. So, per address, first packets counted minus
NEW events with that mark and original source is the connections its block could not
take (nf_nat found no free port in the block, conntrack refused the entry). Counted from
the moment the watcher subscribed; the exported value only ever rises (an entry confirmed
but not yet read can only lower the figure for a moment).

Only source-translated NEW events are kept per (mark, source): their sources are the
VPC's addresses, so the memory is bounded by the VPC, not by the internet's clients.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from operator import itemgetter

from natgwd.observability.ctevents import RAW_MARK, CtEvent, Raw, address_text
from natgwd.observability.exposition import RuleLabel, escaped
from natgwd.planning.counters import CountedElement, canonical_key

Key = tuple[int, str]  # (rule id, internal address)

NAME = "natgwd_port_block_allocation_failures_total"
HELP = (
    "New TCP/UDP connections from the internal address that its port block could not take "
    "(no free port of the block towards the destination: conntrack refused them)."
)


_MARK_SOURCE = itemgetter(RAW_MARK, 0)


def _key(listed: str) -> Key:
    mark, _, address = canonical_key(listed).partition(" . ")
    return int(mark), address


class BlockFailures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened: Counter[Key] = Counter()  # NEW events since the counting began
        self._base: dict[Key, int] | None = None  # first packets counted when it began
        self._prior: dict[Key, int] = {}  # failures counted in earlier epochs
        self._failures: dict[Key, int] = {}
        self._pending: dict[Key, int] = {}  # the base, until the dump is taken

    def begin(self, attempts: Iterable[CountedElement]) -> None:
        """Counting starts again (the watcher subscribed anew): `attempts` is the listing
        read right after subscribing; the events taken from now on are counted."""
        with self._lock:
            self._base = None
            self._opened = Counter()
            self._pending = {_key(key): int(count) for key, count, _, _ in attempts}

    def counting(self) -> None:
        """The dump is taken and the queued events too: failures can be reckoned."""
        with self._lock:
            self._prior = dict(self._failures)
            self._base = self._pending

    def take(self, events: Iterable[CtEvent]) -> None:
        """Events the tracker counted (each connection once)."""
        with self._lock:
            for event in events:
                if event.kind == "new" and event.source_translated:
                    self._opened[event.mark, event.orig.src] += 1

    def count(self, translated: Iterable[Raw]) -> None:
        """Source-translated NEW events in the raw form the tracker counted, summed in a C loop."""
        opened = Counter(map(_MARK_SOURCE, translated))
        with self._lock:
            for (mark, source), n in opened.items():
                self._opened[int.from_bytes(mark, "big"), address_text(source)] += n

    def exposition(self, attempts: Iterable[CountedElement], labelled: Mapping[str, RuleLabel], drained: bool) -> str:
        """The metric's lines, from a scrape's listing of the attempts set; `labelled`:
        the rules' labels by mark (as listed); `drained`: the events queued until the
        listing are taken."""
        listed = [(_key(key), int(count)) for key, count, _, _ in attempts]
        if not listed:
            return ""
        lines = [f"# HELP {NAME} {HELP}", f"# TYPE {NAME} counter"]
        by_id = {label.id: label for label in labelled.values()}
        with self._lock:
            base, failures = self._base, self._failures
            for key, count in listed:
                if drained and base is not None:
                    failed = count - base.get(key, 0) - self._opened.get(key, 0) + self._prior.get(key, 0)
                    failures[key] = max(failures.get(key, 0), failed)
                label = by_id.get(key[0])
                if label is None:
                    continue
                name = label.comment.split("/")[1]
                lines.append(
                    f'{NAME}{{name="{escaped(name)}",eip="{escaped(label.eip)}",address="{key[1]}"}} '
                    f"{failures.get(key, 0)}"
                )
        return "\n".join(lines) + "\n"
