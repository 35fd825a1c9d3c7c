"""natgwd.observability.connwatch against messages it cannot decode: a malformed event,
met by the watch thread or by a scrape, is counted as lost and the open connections are
recounted from a dump; a scrape still answers. The kernel's side is one end of a datagram
socket pair (ctnetlink's messages, as test_ctevents builds them)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from natgwd.observability import connwatch, ctevents
from natgwd.observability.connwatch import ConnectionWatch
from natgwd.observability.ctevents import CtEvent, EventsLostError, EventSocket, parse
from tests.integration.helpers import wait_for
from tests.unit.test_ctevents import GOOD, cut_attribute, message, odd_address, snat_attrs

OPEN_ENTRY = message(0x100, 0x2, snat_attrs(9, 2))  # one connection of the rule whose mark is 2


class Kernel:
    """The kernel's ends of the event sockets natgwd opened, and the dumps it was asked for."""

    def __init__(self) -> None:
        self.ends: list[socket.socket] = []
        self.dumps = 0

    def event_socket(self) -> EventSocket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        made = EventSocket.__new__(EventSocket)
        made.sock = ours
        self.ends.append(theirs)
        return made

    def dump(self) -> Iterator[CtEvent]:
        self.dumps += 1
        return iter(parse(OPEN_ENTRY).events)

    def close(self) -> None:
        for end in self.ends:
            end.close()


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    made = Kernel()
    monkeypatch.setattr(connwatch, "EventSocket", made.event_socket)
    monkeypatch.setattr(connwatch, "dump", made.dump)
    yield made
    made.close()


def lost_total(text: bytes) -> int:
    (line,) = [line for line in text.decode().splitlines() if line.startswith("natgwd_conntrack_events_lost_total ")]
    return int(line.split()[1])


def test_a_scrape_that_meets_a_malformed_event_answers_and_has_the_thread_recount(kernel: Kernel) -> None:
    watch = ConnectionWatch(dict, dict)
    watch._begin()  # as the thread does, without the thread: the scrape alone reads the socket
    kernel.ends[0].send(GOOD + odd_address())
    text = watch.exposition({})
    assert lost_total(text) == 0  # counted by the thread, when it has recounted
    assert watch._lost_pending.is_set()


def test_a_malformed_event_is_counted_as_lost_and_the_counts_rebuilt(kernel: Kernel) -> None:
    watch = ConnectionWatch(dict, dict)
    watch.start()
    try:
        wait_for(lambda: kernel.dumps == 1 and watch._base is not None, "the first count")
        kernel.ends[0].send(cut_attribute())
        wait_for(lambda: kernel.dumps == 2 and watch._base is not None, "a recount")
        assert watch.lost == 1
        assert watch.tracker.snapshot().open == {2: 1}
        # A scrape racing the thread for the next one: answered either way, one more recount.
        kernel.ends[1].send(odd_address())
        watch.exposition({})
        wait_for(lambda: kernel.dumps == 3 and watch._base is not None, "another recount")
        assert lost_total(watch.exposition({})) == 2
        assert watch.tracker.snapshot().open == {2: 1}
    finally:
        watch.stop()


def test_a_malformed_message_in_a_dump_is_a_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    monkeypatch.setattr(ctevents, "_socket", lambda groups, buffer_bytes: ours)
    theirs.send(OPEN_ENTRY + odd_address())
    try:
        with pytest.raises(EventsLostError, match="malformed"):
            list(ctevents.dump())
    finally:
        theirs.close()
