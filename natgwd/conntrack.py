"""The shell around conntrack netlink (pyroute2): dump candidate entries, delete the stale.

Dumps are filtered in the kernel where a change allows it; every candidate is judged by
natgwd.stale against the whole desired state, so a filter only bounds the work.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter
from collections.abc import Iterator

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from natgwd.stale import Filter, Flow, Translations


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


class ConntrackCleaner:
    def clean(self, translations: Translations, filters: list[Filter] | None) -> Counter[str]:
        """Delete the stale entries among those the filters select (all when None);
        returns how many were deleted, by reason."""
        deleted: Counter[str] = Counter()
        with Conntrack(nfgen_family=socket.AF_INET) as ct:
            # Drain every dump before deleting: one netlink socket serves both.
            candidates = {_key(e): e for e in self._candidates(ct, filters)}
            for entry in candidates.values():
                reason = translations.stale(_flow(entry))
                if reason is None:
                    continue
                try:
                    ct.delete(entry)
                except NetlinkError as err:
                    if err.code != errno.ENOENT:  # already gone (expired, or deleted by its peer)
                        raise
                    continue
                deleted[reason] += 1
        return deleted

    def _candidates(self, ct: Conntrack, filters: list[Filter] | None) -> Iterator[object]:
        if filters is None:
            yield from list(ct.dump_entries())
            return
        for f in filters:
            selector = NFCTAttrTuple(family=socket.AF_INET, **{f.field: f.address})
            if f.tuple == "orig":
                yield from list(ct.dump_entries(tuple_orig=selector))
            else:
                yield from list(ct.dump_entries(tuple_reply=selector))


def _key(entry: object) -> tuple[object, ...]:
    t = entry.tuple_orig  # type: ignore[attr-defined]
    return (t.proto, t.saddr, t.daddr, t.sport, t.dport, t.icmp_id, t.icmp_type)
