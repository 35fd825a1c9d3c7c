"""The shell around conntrack netlink (pyroute2): dump candidate entries, delete the stale.

Dumps are filtered in the kernel where a change allows it; every candidate is judged by
natgwd.planning.stale against the whole desired state, so a filter only bounds the work. Entries
are judged as the dump streams them and stale ones are deleted at once on a second
socket (as conntrack(8) deletes from its dump callback), so memory stays flat however
large the table: a gateway may track a million connections.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from natgwd.observability.endings import Endings
from natgwd.planning.stale import Filter, Flow, Translations


def _flow(entry: object) -> Flow:
    orig, reply = entry.tuple_orig, entry.tuple_reply  # type: ignore[attr-defined]
    return Flow(
        proto=orig.proto or 0,
        orig_src=orig.saddr,
        orig_dst=orig.daddr,
        orig_dport=orig.dport,
        reply_src=reply.saddr,
        reply_sport=reply.sport,
        reply_dst=reply.daddr,
        reply_dport=reply.dport,
        mark=entry.mark or 0,  # type: ignore[attr-defined]
    )


def _connect(family: int = socket.AF_INET) -> Conntrack:
    return Conntrack(nfgen_family=family)


CONNTRACK_COUNT = Path("/proc/sys/net/netfilter/nf_conntrack_count")


def tracked_count(path: Path = CONNTRACK_COUNT) -> int | None:
    """How many entries the namespace's conntrack table holds (None: unknown)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


class ConntrackCleaner:
    """Entries of both families: a dump asks for one family (nfgen_family), so each
    family gets a dump socket and a delete socket of its own. They stay open from one
    clean to the next (opening and closing netlink sockets costs milliseconds on a busy
    machine) and are opened again after an error; the delete socket only once an entry
    is stale."""

    def __init__(
        self,
        connect: Callable[[int], Conntrack] = _connect,
        endings: Endings | None = None,
        count: Callable[[], int | None] = tracked_count,
    ) -> None:
        self._connect = connect
        self._count = count
        self._endings = endings  # with a translation log: which connections natgwd ended, and why
        self._sockets: dict[tuple[int, str], Conntrack] = {}

    def clean(self, translations: Translations, filters: list[Filter] | None) -> Counter[str]:
        """Delete the stale entries among those the filters select (all when None);
        returns how many were deleted, by reason. An empty table is not dumped: a dump
        walks every bucket of the kernel's hash table (262,144 on a few gigabytes of
        memory), milliseconds per filter however few entries there are. Read after the
        nftables commit, an empty table means no entry predates the change (an entry is
        counted from its first packet on, before it is confirmed)."""
        deleted: Counter[str] = Counter()
        if self._count() == 0:
            return deleted
        for family in (socket.AF_INET, socket.AF_INET6):
            wanted = (
                None if filters is None else [f for f in filters if (":" in f.address) == (family == socket.AF_INET6)]
            )
            if wanted == []:
                continue
            try:
                self._clean_family(family, translations, wanted, deleted)
            except BaseException:
                self._close(family)
                raise
        return deleted

    def _socket(self, family: int, role: str) -> Conntrack:
        found = self._sockets.get((family, role))
        if found is None:
            found = self._sockets[family, role] = self._connect(family)
        return found

    def _close(self, family: int) -> None:
        for role in ("dumps", "deletes"):
            ct = self._sockets.pop((family, role), None)
            if ct is not None:
                with contextlib.suppress(Exception):
                    ct.close()

    def _clean_family(
        self, family: int, translations: Translations, filters: list[Filter] | None, deleted: Counter[str]
    ) -> None:
        for entry in self._candidates(self._socket(family, "dumps"), family, filters):
            reason = translations.stale(_flow(entry))
            if reason is None:
                continue
            if self._endings is not None and entry.id:  # type: ignore[attr-defined]
                self._endings.ending(entry.id, reason)  # type: ignore[attr-defined]
            try:
                self._socket(family, "deletes").delete(entry)
            except NetlinkError as err:
                # Already gone: expired, deleted by its peer, or met twice (an entry
                # can match the filters of both an original and a reply dump; its record
                # stays for the first delete's event).
                if err.code != errno.ENOENT:
                    raise
                continue
            deleted[reason] += 1

    def _candidates(self, ct: Conntrack, family: int, filters: list[Filter] | None) -> Iterator[object]:
        if filters is None:
            yield from ct.dump_entries()
            return
        if family == socket.AF_INET6:
            # pyroute2's kernel-side filter finds no IPv6 entry at all (its CTA_FILTER is
            # IPv4's): one dump, filtered here.
            yield from (entry for entry in ct.dump_entries() if any(_selects(f, entry) for f in filters))
            return
        for f in filters:
            selector = NFCTAttrTuple(family=family, **{f.field: f.address})
            if f.tuple == "orig":
                yield from ct.dump_entries(tuple_orig=selector)
            else:
                yield from ct.dump_entries(tuple_reply=selector)


def _selects(f: Filter, entry: object) -> bool:
    tuple_ = entry.tuple_orig if f.tuple == "orig" else entry.tuple_reply  # type: ignore[attr-defined]
    return bool(getattr(tuple_, f.field) == f.address)
