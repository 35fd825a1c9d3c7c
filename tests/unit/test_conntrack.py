"""natgwd.kernel.conntrack.ConntrackCleaner over stand-in sockets: entries are judged as the dump
streams them and deleted at once on a second socket, so the cleaner never holds the table
(a gateway may track a million connections); entries already gone are not counted."""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

from pyroute2.netlink.exceptions import NetlinkError

from natgwd.kernel.conntrack import ConntrackCleaner
from natgwd.lab.topology import SEED_STATE
from natgwd.observability.endings import Endings
from natgwd.planning.stale import Translations
from natgwd.state.validation import load_state

TABLE_SIZE = 20_000


class Entry:
    """A dumped conntrack entry; counts how many exist at once."""

    alive = 0
    most_alive = 0

    def __init__(self, index: int) -> None:
        stale = index % 4 == 0  # DNAT'd to a backend dnat01 no longer names
        backend = "172.20.10.9" if stale else "172.20.10.2"
        self.index = index
        self.tuple_orig = SimpleNamespace(
            proto=6, saddr=f"10.115.{index // 250 % 250}.{index % 250 + 1}", daddr="10.115.55.200", dport=8888
        )
        self.tuple_reply = SimpleNamespace(saddr=backend, sport=80, daddr=self.tuple_orig.saddr, dport=40000)
        self.mark = 2
        Entry.alive += 1
        Entry.most_alive = max(Entry.most_alive, Entry.alive)

    def __del__(self) -> None:
        Entry.alive -= 1


class Socket:
    def __init__(self, sockets: list[Socket], gone: set[int], family: int = socket.AF_INET) -> None:
        self.deleted: list[int] = []
        self.dumps = 0
        self._gone = gone
        self.family = family
        sockets.append(self)

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def dump_entries(self, **_filters: Any) -> Iterator[Entry]:
        self.dumps += 1
        if self.family == socket.AF_INET:  # the IPv6 table of this test is empty
            for index in range(TABLE_SIZE):
                yield Entry(index)

    def delete(self, entry: Entry) -> None:
        if entry.index in self._gone:
            raise NetlinkError(errno.ENOENT)
        self.deleted.append(entry.index)


def test_a_full_scan_streams_the_table_and_deletes_on_a_second_socket() -> None:
    sockets: list[Socket] = []
    expired = {0, 4}
    cleaner = ConntrackCleaner(connect=lambda family: Socket(sockets, expired, family), count=lambda: TABLE_SIZE)  # type: ignore[arg-type, return-value]
    state = load_state(json.dumps(SEED_STATE).encode())
    deleted = cleaner.clean(Translations(state, [1, 2, 3]), None)
    # The IPv6 table holds nothing stale: no socket to delete with is opened for it.
    dumps, deletes, dumps6 = sockets
    assert [s.family for s in sockets] == [socket.AF_INET] * 2 + [socket.AF_INET6]
    assert dumps.dumps == 1 and deletes.dumps == 0 and not dumps.deleted
    assert dumps6.dumps == 1 and not dumps6.deleted
    assert deleted == {"dnat": TABLE_SIZE // 4 - len(expired)}
    assert deletes.deleted == [index for index in range(0, TABLE_SIZE, 4) if index not in expired]
    assert Entry.most_alive <= 3, f"{Entry.most_alive} entries held at once"


def test_each_deleted_entry_is_recorded_before_its_delete() -> None:
    """The DESTROY event may be read on the watch thread as soon as the kernel sends it: the
    translation log finds why natgwd ended the connection only if it was recorded first."""
    endings = Endings()
    recorded_at_delete: list[str | None] = []

    class Recording(Socket):
        def delete(self, entry: Entry) -> None:
            recorded_at_delete.append(endings.take(entry.id))  # type: ignore[attr-defined]
            endings.ending(entry.id, "dnat")  # type: ignore[attr-defined]
            super().delete(entry)

    class Identified(Entry):
        def __init__(self, index: int) -> None:
            super().__init__(index)
            self.id = index + 1

    sockets: list[Socket] = []
    cleaner = ConntrackCleaner(
        connect=lambda family: Recording(sockets, set(), family), endings=endings, count=lambda: None
    )  # type: ignore[arg-type, return-value]
    state = load_state(json.dumps(SEED_STATE).encode())
    with patch.object(Recording, "dump_entries", lambda self, **_: iter([Identified(i) for i in range(8)])):
        cleaner.clean(Translations(state, [1, 2, 3]), None)
    assert recorded_at_delete == ["dnat", "dnat", "dnat", "dnat"]  # entries 0 and 4 of both families
    assert [endings.take(i + 1) for i in range(8)] == ["dnat", None, None, None, "dnat", None, None, None]


def test_an_empty_table_is_not_dumped() -> None:
    """A dump walks every bucket of the kernel's hash table, milliseconds per filter even
    with no entry: with the namespace's count at 0 there is nothing to dump; with the count
    unknown (no such file), the table is dumped as before."""
    state = load_state(json.dumps(SEED_STATE).encode())
    for count, dumped in ((0, False), (None, True), (1, True)):
        sockets: list[Socket] = []

        def connect(family: int, sockets: list[Socket] = sockets) -> Socket:
            return Socket(sockets, set(), family)

        cleaner = ConntrackCleaner(connect=connect, count=lambda c=count: c)  # type: ignore[arg-type, misc]
        cleaner.clean(Translations(state, [1, 2, 3]), None)
        assert (sum(s.dumps for s in sockets) > 0) == dumped, count


def test_the_count_is_the_namespace_table_s(tmp_path: Path) -> None:
    from natgwd.kernel.conntrack import tracked_count

    (tmp_path / "count").write_text("3\n")
    assert tracked_count(tmp_path / "count") == 3
    assert tracked_count(tmp_path / "missing") is None
