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

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

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
        mark=entry.mark or 0,  # type: ignore[attr-defined]
    )


def _connect(family: int = socket.AF_INET) -> Conntrack:
    return Conntrack(nfgen_family=family)


class ConntrackCleaner:
    """Entries of both families: a dump asks for one family (nfgen_family), so each
    family gets dumps and a delete socket of its own."""

    def __init__(self, connect: Callable[[int], Conntrack] = _connect) -> None:
        self._connect = connect

    def clean(self, translations: Translations, filters: list[Filter] | None) -> Counter[str]:
        """Delete the stale entries among those the filters select (all when None);
        returns how many were deleted, by reason."""
        deleted: Counter[str] = Counter()
        for family in (socket.AF_INET, socket.AF_INET6):
            wanted = (
                None if filters is None else [f for f in filters if (":" in f.address) == (family == socket.AF_INET6)]
            )
            if wanted == []:
                continue
            self._clean_family(family, translations, wanted, deleted)
        return deleted

    def _clean_family(
        self, family: int, translations: Translations, filters: list[Filter] | None, deleted: Counter[str]
    ) -> None:
        with self._connect(family) as dumps, contextlib.ExitStack() as stack:
            deletes: Conntrack | None = None  # opened at the first stale entry: most changes find none
            for entry in self._candidates(dumps, family, filters):
                reason = translations.stale(_flow(entry))
                if reason is None:
                    continue
                if deletes is None:
                    deletes = stack.enter_context(self._connect(family))
                try:
                    deletes.delete(entry)
                except NetlinkError as err:
                    # Already gone: expired, deleted by its peer, or met twice (an entry
                    # can match the filters of both an original and a reply dump).
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
