"""The open-connection tracker: dump, window and events counted exactly once."""

from __future__ import annotations

from natgwd.observability.blockwatch import BlockFailures
from natgwd.observability.ctevents import CtEvent, CtTuple, Kind, raw
from natgwd.observability.ctopen import Tracker

EIP = "10.115.55.200"


def snat(kind: Kind, conntrack_id: int, mark: int = 1, port: int = 80, sport: int = 40000) -> CtEvent:
    return CtEvent(
        kind,
        conntrack_id,
        mark,
        CtTuple(6, "172.20.10.2", sport + conntrack_id, "10.115.55.254", port),
        CtTuple(6, "10.115.55.254", port, EIP, 20000 + conntrack_id),
    )


def dnat(kind: Kind, conntrack_id: int, mark: int = 2) -> CtEvent:
    return CtEvent(
        kind,
        conntrack_id,
        mark,
        CtTuple(6, "10.115.55.254", 50000 + conntrack_id, EIP, 8888),
        CtTuple(6, "172.20.10.2", 80, "10.115.55.254", 50000 + conntrack_id),
    )


def test_window_counts_each_connection_once() -> None:
    tracker = Tracker()
    # Dumped: 1 and 2. Unmarked entries are not natgwd's and are ignored.
    tracker.start([snat("entry", 1), snat("entry", 2), snat("entry", 9, mark=0)])
    tracker.take(
        [
            snat("new", 2),  # created after subscribing, dumped too: already counted
            snat("new", 3),  # created after subscribing, not dumped
            snat("destroy", 4),  # ended before the dump reached it: never counted
            snat("destroy", 1),  # dumped, then closed
        ]
    )
    tracker.end_window()
    assert tracker.snapshot().open == {1: 2}  # 2 and 3
    tracker.take([snat("destroy", 3), snat("destroy", 2), dnat("new", 5)])
    snapshot = tracker.snapshot()
    assert snapshot.open == {2: 1}
    assert snapshot.opened == {1: 1, 2: 1}  # NEW events counted since start (3 and 5)
    assert snapshot.closed == {1: 3}


def test_after_the_window_every_destroy_is_counted() -> None:
    tracker = Tracker()
    tracker.start([])
    tracker.end_window()
    counted = tracker.take([snat("new", 1), snat("destroy", 1), snat("new", 1, mark=0)])
    assert [e.kind for e in counted] == ["new", "destroy"]
    assert tracker.snapshot().open == {}


def test_ports_in_use_towards_the_busiest_destination() -> None:
    tracker = Tracker()
    tracker.start([snat("entry", 1, port=80), snat("entry", 2, port=80), snat("entry", 3, port=443)])
    tracker.end_window()
    tracker.take([dnat("new", 10), dnat("new", 11)])  # DNAT does not use the EIP's source ports
    assert tracker.snapshot().ports == {EIP: 2}
    tracker.take([snat("destroy", 1, port=80)])
    assert tracker.snapshot().ports == {EIP: 1}
    tracker.take([snat("new", 4, port=443), snat("new", 5, port=443)])
    assert tracker.snapshot().ports == {EIP: 3}
    tracker.take([snat("destroy", n, port=443) for n in (3, 4, 5)] + [snat("destroy", 2, port=80)])
    assert tracker.snapshot().ports == {EIP: 0}


def test_start_again_forgets_the_old_counts() -> None:
    tracker = Tracker()
    tracker.start([snat("entry", 1)])
    tracker.end_window()
    tracker.take([snat("new", 2)])
    tracker.start([snat("entry", 2)])
    tracker.end_window()
    snapshot = tracker.snapshot()
    assert snapshot.open == {1: 1}
    assert snapshot.opened == {}


def test_equal_ids_of_different_connections_are_told_apart() -> None:
    tracker = Tracker()
    same_id = [snat("entry", 1, sport=40000), snat("entry", 1, sport=41000)]
    tracker.start(same_id)
    tracker.take([snat("destroy", 1, sport=40000), snat("destroy", 1, sport=41000), snat("new", 1, sport=42000)])
    assert tracker.snapshot().open == {1: 1}
    tracker.end_window()
    # Another connection with an equal id later: counted, and so is its end.
    tracker.take([snat("new", 1, sport=43000), snat("destroy", 1, sport=42000)])
    assert tracker.snapshot().open == {1: 1}


def test_events_counted_in_bulk_as_one_by_one() -> None:
    """The raw form counted a batch at a time (the gauges' way) against CtEvents one by one:
    the same open and closed counts, busiest destinations (one dropping from its top) and
    port-block sources; unmarked events were left out by the socket."""
    events = [
        *(snat("new", i, port=80) for i in range(5)),
        *(snat("new", i, port=443) for i in range(5, 9)),
        dnat("new", 20),
        snat("destroy", 0, port=80),
        snat("destroy", 1, port=80),
        snat("new", 30, mark=3, port=53),
        dnat("destroy", 20),
    ]
    one, bulk = Tracker(), Tracker()
    one_blocks, bulk_blocks = BlockFailures(), BlockFailures()
    for tracker in (one, bulk):
        tracker.start([])
        tracker.end_window()
    one_blocks.take(one.take(events[:6]))
    one_blocks.take(one.take(events[6:]))
    for batch in (events[:6], events[6:]):
        news = [raw(event) for event in batch if event.kind == "new"]
        bulk_blocks.count(bulk.count(news, [raw(event) for event in batch if event.kind == "destroy"]))
    assert bulk.snapshot() == one.snapshot()
    assert bulk.snapshot().ports == {EIP: 4}  # port 443's 4, after port 80 dropped from 5 to 3
    assert bulk_blocks._opened == one_blocks._opened
