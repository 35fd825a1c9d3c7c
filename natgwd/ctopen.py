"""Open connections per rule and per EIP, kept from conntrack events, without a dump per
scrape.

Every NAT statement natgwd writes also sets the connection's ct mark to the rule's id, so
a NEW event names the rule, and a DESTROY event of the same connection names it again.

Exact across restarts (and after lost events): `Tracker.start` subscribes to the events
*before* dumping the table, seeds the counts from the dump, then takes the events that
queued up meanwhile in a "window" mode that uses the ids of the dumped entries to decide
what is already counted:
- a NEW whose id was dumped is skipped (the dump saw the connection already);
- a DESTROY of a dumped id, or of an id NEW-counted in the window, is subtracted;
- any other DESTROY in the window is of a connection that ended before the dump reached
  it, never counted, and is ignored.
After the window every live connection was either dumped or NEW-counted, so a DESTROY is
subtracted unless its id is that of a connection already gone. Only the ids of dumped
entries are kept (until they close), not one per connection.

Port usage: a source-NATed connection's reply tuple is (destination -> EIP:port), so the
connections open from one EIP to one destination (protocol, address, port) are the
source ports in use there, which is what runs out (GCP port_usage; AWS's 55,000 per
destination). Counted per destination, the maximum kept per EIP.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from natgwd.ctevents import CtEvent

Destination = tuple[str, int, str, int]  # EIP, protocol, destination address, destination port


@dataclass(frozen=True)
class Snapshot:
    open: dict[int, int]  # mark -> connections open now
    opened: dict[int, int]  # mark -> connections committed (NEW events) since start
    closed: dict[int, int]  # mark -> connections closed (DESTROY events) since start
    ports: dict[str, int]  # EIP -> the most source ports in use towards one destination


class Tracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[int] = Counter()
        self._opened: Counter[int] = Counter()
        self._closed: Counter[int] = Counter()
        self._by_destination: Counter[Destination] = Counter()
        self._most: dict[str, int] = {}  # EIP -> highest count among its destinations
        self._stale_most: set[str] = set()  # EIPs whose maximum may have dropped
        self._dumped: set[int] = set()  # ids of dumped entries still open
        self._window: set[int] | None = None  # ids NEW-counted while in the window

    # --- the event thread ------------------------------------------------------------

    def start(self, dumped: Iterable[CtEvent]) -> None:
        """Forget everything and count the dumped entries; the events taken next are the
        window's, until `end_window`. Counted aside and swapped in: a dump of a million
        entries takes seconds, during which scrapes still get the last figures."""
        fresh = Tracker()
        for entry in dumped:
            if entry.mark:
                fresh._dumped.add(entry.id)
                fresh._add(entry, 1)
        with self._lock:
            self._open, self._opened, self._closed = fresh._open, fresh._opened, fresh._closed
            self._by_destination, self._most, self._stale_most = fresh._by_destination, fresh._most, set()
            self._dumped, self._window = fresh._dumped, set()

    def end_window(self) -> None:
        with self._lock:
            self._window = None

    def take(self, events: Iterable[CtEvent]) -> list[CtEvent]:
        """Count the events; returns those that changed the counts (for translation logs)."""
        counted: list[CtEvent] = []
        with self._lock:
            for event in events:
                if not event.mark:
                    continue
                if event.kind == "new":
                    if event.id in self._dumped:
                        continue
                    if self._window is not None:
                        self._window.add(event.id)
                    self._opened[event.mark] += 1
                    self._add(event, 1)
                elif event.kind == "destroy":
                    if event.id in self._dumped:
                        self._dumped.discard(event.id)
                    elif self._window is not None:
                        if event.id not in self._window:
                            continue
                        self._window.discard(event.id)
                    self._closed[event.mark] += 1
                    self._add(event, -1)
                else:
                    continue
                counted.append(event)
        return counted

    def _add(self, event: CtEvent, delta: int) -> None:
        self._open[event.mark] += delta
        if not event.source_translated:
            return
        eip = event.reply.dst
        key = (eip, event.orig.proto, event.reply.src, event.reply.sport)
        count = self._by_destination[key] + delta
        if count > 0:
            self._by_destination[key] = count
        else:
            del self._by_destination[key]
        if count > self._most.get(eip, 0):
            self._most[eip] = count
        elif delta < 0 and count + 1 == self._most.get(eip):
            self._stale_most.add(eip)

    # --- scrapes -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._stale_most:
                # Recomputed only for the EIPs whose busiest destination lost a connection.
                stale, self._stale_most = self._stale_most, set()
                for eip in stale:
                    self._most[eip] = 0
                for (eip, *_), count in self._by_destination.items():
                    if eip in stale and count > self._most[eip]:
                        self._most[eip] = count
            return Snapshot(
                {mark: n for mark, n in self._open.items() if n},
                dict(self._opened),
                dict(self._closed),
                dict(self._most),
            )
