"""The watch thread's recount after lost conntrack events (ENOBUFS): the counts are rebuilt
from a fresh dump, not carried on from the events before the loss, and the loss is counted.
The socket and the dump are stand-ins; the thread, its loop and the tracker are natgwd's."""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from natgwd.observability import connwatch
from natgwd.observability.connwatch import ConnectionWatch
from natgwd.observability.ctevents import Counted, CtEvent, EventsLostError, raw
from tests.unit.test_ctopen import snat


class Kernel:
    """What the stand-ins serve: the table a dump returns, and the events (or a loss) the
    socket delivers, each made readable by a byte on a socket pair (the thread selects)."""

    def __init__(self) -> None:
        self.table: list[CtEvent] = []
        self.dumps = 0
        self.sockets: list[FakeEventSocket] = []

    def dump(self, family: int = socket.AF_INET) -> Iterator[CtEvent]:
        if family == socket.AF_INET:
            self.dumps += 1
            yield from list(self.table)

    def send(self, item: list[CtEvent] | type[EventsLostError]) -> None:
        self.sockets[-1].pending.put(item)
        self.sockets[-1].writer.send(b"x")


class FakeEventSocket:
    def __init__(self, kernel: Kernel) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.pending: queue.Queue[list[CtEvent] | type[EventsLostError]] = queue.Queue()
        self.closed = False
        kernel.sockets.append(self)

    def fileno(self) -> int:
        return self.reader.fileno()

    def receive(self, block: bool = True) -> list[CtEvent]:
        try:
            self.reader.recv(1)
            item = self.pending.get_nowait()
        except (BlockingIOError, queue.Empty):
            return []
        if item is EventsLostError:
            raise EventsLostError
        assert isinstance(item, list)
        return item

    def receive_counted(self, datagrams: int) -> Counted:
        received = self.receive(block=False)
        news = [raw(event) for event in received if event.mark and event.kind == "new"]
        destroys = [raw(event) for event in received if event.mark and event.kind == "destroy"]
        return Counted(news, destroys, bool(received))

    def close(self) -> None:
        self.closed = True
        self.reader.close()
        self.writer.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    found = Kernel()
    monkeypatch.setattr(connwatch, "EventSocket", lambda: FakeEventSocket(found))
    monkeypatch.setattr(connwatch, "dump", found.dump)
    return found


def test_lost_events_are_counted_and_the_open_connections_recounted(kernel: Kernel) -> None:
    kernel.table = [snat("entry", 1)]
    watch = ConnectionWatch(dict, dict)
    watch.start()
    try:
        wait_until(lambda: watch.tracker.snapshot().open == {1: 1}, "the first dump counted")
        kernel.send([snat("new", 2), snat("new", 3)])
        wait_until(lambda: watch.tracker.snapshot().open == {1: 3}, "two NEW events counted")

        # Meanwhile 2 and 3 closed and 4 opened, and those events were lost: the table now
        # holds 1 and 4. The counts come from a new dump on a new socket.
        kernel.table = [snat("entry", 1), snat("entry", 4)]
        kernel.send(EventsLostError)
        wait_until(lambda: watch.lost == 1, "the loss counted")
        wait_until(lambda: watch.tracker.snapshot().open == {1: 2}, "the recount")
        assert kernel.dumps == 2
        assert len(kernel.sockets) == 2 and kernel.sockets[0].closed
        assert b"natgwd_conntrack_events_lost_total 1" in watch.exposition({})

        # Events go on being counted on the new socket.
        kernel.send([snat("new", 5)])
        wait_until(lambda: watch.tracker.snapshot().open == {1: 3}, "a NEW after the recount")
        kernel.send([snat("destroy", 1), snat("destroy", 5)])
        wait_until(lambda: watch.tracker.snapshot().open == {1: 1}, "closes after the recount")
    finally:
        watch.stop()
    assert watch.lost == 1
