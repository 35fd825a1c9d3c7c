"""The shell around conntrack netlink (pyroute2): dump candidate entries, delete the stale.

Dumps are filtered in the kernel where a change allows it; every candidate is judged by
natgwd.planning.stale against the whole desired state, so a filter only bounds the work. Entries
are judged as the dump streams them and stale ones are deleted at once on a second
socket (as conntrack(8) deletes from its dump callback), so memory stays flat however
large the table: a gateway may track a million connections.
"""

from __future__ import annotations

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


def _connect() -> Conntrack:
    return Conntrack(nfgen_family=socket.AF_INET)


class ConntrackCleaner:
    def __init__(self, connect: Callable[[], Conntrack] = _connect) -> None:
        self._connect = connect

    def clean(self, translations: Translations, filters: list[Filter] | None) -> Counter[str]:
        """Delete the stale entries among those the filters select (all when None);
        returns how many were deleted, by reason."""
        deleted: Counter[str] = Counter()
        with self._connect() as dumps, self._connect() as deletes:
            for entry in self._candidates(dumps, filters):
                reason = translations.stale(_flow(entry))
                if reason is None:
                    continue
                try:
                    deletes.delete(entry)
                except NetlinkError as err:
                    # Already gone: expired, deleted by its peer, or met twice (an entry
                    # can match the filters of both an original and a reply dump).
                    if err.code != errno.ENOENT:
                        raise
                    continue
                deleted[reason] += 1
        return deleted

    def _candidates(self, ct: Conntrack, filters: list[Filter] | None) -> Iterator[object]:
        if filters is None:
            yield from ct.dump_entries()
            return
        for f in filters:
            selector = NFCTAttrTuple(family=socket.AF_INET, **{f.field: f.address})
            if f.tuple == "orig":
                yield from ct.dump_entries(tuple_orig=selector)
            else:
                yield from ct.dump_entries(tuple_reply=selector)
