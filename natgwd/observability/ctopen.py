"""Open connections per rule and per EIP, kept from conntrack events, without a dump per
scrape.

Every NAT statement natgwd writes also sets the connection's ct mark to the rule's id, so
a NEW event names the rule, and a DESTROY event of the same connection names it again.

Exact across restarts (and after lost events): `Tracker.start` subscribes to the events
*before* dumping the table, seeds the counts from the dump, then takes the events that
queued up meanwhile in a "window" mode that uses the identities of the dumped entries to
decide what is already counted:
- a NEW of a dumped connection is skipped (the dump saw it already);
- a DESTROY of a dumped connection, or of one NEW-counted in the window, is subtracted;
- any other DESTROY in the window is of a connection that ended before the dump reached
  it, never counted, and is ignored.
After the window every live connection was either dumped or NEW-counted, so every NEW is
added and every DESTROY subtracted, and the identities are dropped: nothing is kept per
connection. A connection's identity is its conntrack id with its original tuple: the id
alone is a 32-bit hash, and 129,024 entries here already held two pairs of equal ids.

Port usage: a source-NATed connection's reply tuple is (destination -> EIP:port), so the
connections open from one EIP to one destination (protocol, address, port) are the
source ports in use there, which is what runs out (GCP port_usage; AWS's 55,000 per
destination). Counted per destination, the maximum kept per EIP.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter, ne

from natgwd.observability.ctevents import RAW_MARK, CtEvent, Raw, address_text

Destination = tuple[str, int, str, int]  # EIP, protocol, destination address, destination port


@dataclass(frozen=True)
class Snapshot:
    open: dict[int, int]  # mark -> connections open now
    opened: dict[int, int]  # mark -> connections committed (NEW events) since start
    closed: dict[int, int]  # mark -> connections closed (DESTROY events) since start
    ports: dict[str, int]  # EIP -> the most source ports in use towards one destination


def _identity(event: CtEvent) -> int:
    return hash((event.id, event.orig))


_MARK = itemgetter(RAW_MARK)
_DESTINATION = itemgetter(4, 1, 3, 5)  # the EIP, protocol, destination address and port
# Source-translated: the reply is not addressed to the original source and port.
_ORIG_START, _REPLY_END = itemgetter(0, 2), itemgetter(4, 6)


class Tracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[int] = Counter()
        self._opened: Counter[int] = Counter()
        self._closed: Counter[int] = Counter()
        self._by_destination: Counter[Destination] = Counter()
        self._most: dict[str, int] = {}  # EIP -> highest count among its destinations
        self._stale_most: set[str] = set()  # EIPs whose maximum may have dropped
        # Identities (hash of id and original tuple) of the dumped connections still open,
        # and of those NEW-counted since; None once the window is over.
        self._dumped: set[int] | None = None
        self._window: set[int] | None = None

    # --- the event thread ------------------------------------------------------------

    def start(self, dumped: Iterable[CtEvent]) -> None:
        """Forget everything and count the dumped entries; the events taken next are the
        window's, until `end_window`. Counted aside and swapped in: a dump of a million
        entries takes seconds, during which scrapes still get the last figures."""
        fresh = Tracker()
        identities = set()
        for entry in dumped:
            if entry.mark:
                identities.add(_identity(entry))
                fresh._add(entry, 1)
        with self._lock:
            self._open, self._opened, self._closed = fresh._open, fresh._opened, fresh._closed
            self._by_destination, self._most, self._stale_most = fresh._by_destination, fresh._most, set()
            self._dumped, self._window = identities, set()

    def end_window(self) -> None:
        with self._lock:
            self._dumped = self._window = None

    def take(self, events: Iterable[CtEvent]) -> list[CtEvent]:
        """Count the events; returns those that changed the counts (for translation logs)."""
        counted: list[CtEvent] = []
        with self._lock:
            dumped, window = self._dumped, self._window
            for event in events:
                if not event.mark or event.kind == "entry":
                    continue
                if dumped is not None and window is not None:
                    identity = _identity(event)
                    if event.kind == "new":
                        if identity in dumped:
                            continue
                        window.add(identity)
                    elif identity in dumped:
                        dumped.discard(identity)
                    elif identity in window:
                        window.discard(identity)
                    else:
                        continue
                if event.kind == "new":
                    self._opened[event.mark] += 1
                    self._add(event, 1)
                else:
                    self._closed[event.mark] += 1
                    self._add(event, -1)
                counted.append(event)
        return counted

    def _add(self, event: CtEvent, delta: int) -> None:
        self._open[event.mark] += delta
        if event.source_translated:
            self._move((event.reply.dst, event.orig.proto, event.reply.src, event.reply.sport), delta)

    def count(self, news: Sequence[Raw], destroys: Sequence[Raw]) -> list[Raw]:
        """Count events in the raw form (natgwd.observability.ctevents.Raw), outside the
        window (the watcher takes the window's events the general way before anything
        else reads the socket); returns the source-translated NEW events (for the port
        blocks). The events of a batch are summed per mark and per destination in C loops
        and each sum applied once: the same counts as `take` event by event, since only
        the batch's end state is ever read (a scrape takes every queued event first)."""
        if self._dumped is not None:
            raise RuntimeError("events in the raw form are counted only after the window")
        opened, closed = Counter(map(_MARK, news)), Counter(map(_MARK, destroys))
        translated = list(compress(news, map(ne, map(_REPLY_END, news), map(_ORIG_START, news))))
        ports = Counter(map(_DESTINATION, translated))
        # Counted first: Counter.subtract takes an iterable element by element in Python.
        ports.subtract(
            Counter(
                map(_DESTINATION, compress(destroys, map(ne, map(_REPLY_END, destroys), map(_ORIG_START, destroys))))
            )
        )
        with self._lock:
            for mark_bytes, n in opened.items():
                mark = int.from_bytes(mark_bytes, "big")
                self._opened[mark] += n
                self._open[mark] += n
            for mark_bytes, n in closed.items():
                mark = int.from_bytes(mark_bytes, "big")
                self._closed[mark] += n
                self._open[mark] -= n
            for (eip_bytes, proto, address, port), delta in ports.items():
                if delta:
                    eip = address_text(eip_bytes)
                    self._move((eip, proto, address_text(address), int.from_bytes(port, "big")), delta)
        return translated

    def _move(self, key: Destination, delta: int) -> None:
        """Under the lock: `delta` more connections open towards a destination."""
        eip = key[0]
        before = self._by_destination[key]
        count = before + delta
        if count > 0:
            self._by_destination[key] = count
        else:
            del self._by_destination[key]
        most = self._most.get(eip, 0)
        if count > most:
            self._most[eip] = count
        elif delta < 0 and before == most:
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
