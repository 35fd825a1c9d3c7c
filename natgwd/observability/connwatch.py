"""The connection watcher: one thread reading conntrack events into natgwd.observability.ctopen's
tracker (and the translation log), and the /metrics lines made from it at scrape time.

Port-allocation failures per EIP. Linux has no such counter: a source NAT that finds no
free tuple still hands the packet on, and conntrack refuses the entry when it confirms the
connection (insert_failed, the packet dropped), after every nftables hook. natgwd's
`account` chain (filter, postrouting 300, after source NAT) counts each rule's first
packets before that confirmation (natgwd_rule_connections_total), and a NEW event is sent
only for a confirmed entry. So for each rule, first packets counted minus NEW events is
the connections the kernel failed to commit, and the rule names the EIP. The counts are
taken from the moment the watcher subscribed: the counter is read after subscribing, and
events are drained after reading it, so an entry confirmed but not yet read can only make
the figure lower for a moment, never higher; the exported value only ever rises. (With
fully-random source NAT nothing else fails a commit in practice; a clash on a DNAT rule's
connection would be counted for its EIP too.)
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, compress, repeat
from operator import attrgetter, itemgetter

import structlog

from natgwd.observability.blockwatch import BlockFailures
from natgwd.observability.ctevents import CtEvent, EventsLostError, EventSocket, dump
from natgwd.observability.ctopen import Tracker
from natgwd.observability.exposition import RuleLabel, RuleLabelTexts, escaped, family_text
from natgwd.observability.translog import TransLog
from natgwd.planning.counters import CountedElement, Listings
from natgwd.planning.layout import RULE_CONNECTIONS
from natgwd.planning.plan import RuleLabels
from natgwd.planning.portblocks import PORT_BLOCK_ATTEMPTS

log = structlog.get_logger("natgwd.observability.connwatch")

RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
RETIRED_LABELS = 65536  # removed rules whose labels end lines may still need
GATHER_SECONDS = 0.05  # 64 MB of socket buffer holds some 60,000 events, seconds at a high rate
TAKEN_TOGETHER = 256  # datagrams (an event each) counted under one lock


def _attempts(listings: Listings) -> dict[int, tuple[RuleLabels, int]]:
    """mark -> (rule, first packets counted) from a scrape's listing."""
    found = {}
    for key, count, _, comment in listings.get(RULE_CONNECTIONS, ()):
        labels = RuleLabels.from_comment(comment)
        if labels is not None:
            found[int(key, 0)] = (labels, int(count))
    return found


class ConnectionWatch:
    def __init__(
        self,
        listings: Callable[[], Listings],
        rule_ids: Callable[[], Mapping[RuleLabels, int]],
        translog: TransLog | None = None,
    ) -> None:
        self._listings = listings
        self._rule_ids = rule_ids
        self._translog = translog
        self.tracker = Tracker()
        self.blocks = BlockFailures()  # per internal address of port-block rules
        self.lost = 0  # times events were lost and the counts rebuilt
        self._stopping = threading.Event()
        self._lost_pending = threading.Event()
        self._lost_reason = ""  # why, when a scrape met the loss
        self._thread = threading.Thread(target=self._run, name="natgwd-connwatch", daemon=True)
        self._lock = threading.Lock()
        self._receiving = threading.RLock()  # one reader of the socket at a time
        self._sock: EventSocket | None = None
        self._base: dict[int, int] | None = None  # mark -> first packets counted when counting began
        self._prior: dict[int, int] = {}  # mark -> failures counted in earlier epochs
        self._failures: dict[int, tuple[str, int]] = {}  # mark -> (EIP, failures exported)
        self._failures_for: Mapping[str, RuleLabel] | None = None  # the rules every entry was made for
        self._labels_for: tuple[int, dict[int, RuleLabels]] = (0, {})
        self._rules = RuleLabelTexts()
        # The last scrape's rules, by id in order, and their label texts.
        # For the labels of the last scrape: the labels by rule id, their texts, and the rules' EIPs.
        self._by_id: tuple[Mapping[str, RuleLabel], dict[int, RuleLabel], list[str], tuple[str, ...]] = (
            {},
            {},
            [],
            (),
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    # --- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        retry = RETRY_SECONDS
        while not self._stopping.is_set():
            counted = False
            try:
                sock = self._begin()
                counted = True
                retry = RETRY_SECONDS
                while not self._stopping.is_set() and not self._lost_pending.is_set():
                    ready, _, _ = select.select([sock], [], [], 0.5)
                    if ready and self._drain():
                        # Let events gather in the socket's buffer, then take them together:
                        # woken at every event, this thread cost 15% of the new-connection
                        # rate on 2 cores. A scrape drains first, so its figures stay exact.
                        self._stopping.wait(GATHER_SECONDS)
                if self._lost_pending.is_set():
                    raise EventsLostError(self._lost_reason)
            except EventsLostError as lost:
                self._lost_pending.clear()
                self.lost += 1
                log.warning("conntrack events lost; recounting from a dump", reason=str(lost))
                if not counted:
                    # The dump itself met a malformed message: dumping again at once could
                    # meet it again.
                    self._stopping.wait(retry)
                    retry = min(retry * 2, RETRY_MAX_SECONDS)
            except Exception:
                log.exception("watching conntrack failed; starting again", retry_in=retry)
                self._stopping.wait(retry)
                retry = min(retry * 2, RETRY_MAX_SECONDS)
            finally:
                with self._receiving:
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = None

    def _begin(self) -> EventSocket:
        with self._receiving:
            self._sock = sock = EventSocket()  # subscribe first: nothing that happens from here is missed
            listings = self._listings()
            attempts = _attempts(listings)
            started = time.monotonic()
            with self._lock:
                self._base = None  # no failure figures while the counts are rebuilt
            self.blocks.begin(listings.get(PORT_BLOCK_ATTEMPTS, ()))
            self.tracker.start(dump())
            while events := sock.receive(block=False):
                self._take(events)
            self.tracker.end_window()
            self.blocks.counting()
            snapshot = self.tracker.snapshot()
            with self._lock:
                for mark, (_, failed) in self._failures.items():
                    self._prior[mark] = failed
                self._failures_for = None  # a new base: every rule visited again
                self._base = {mark: count for mark, (_, count) in attempts.items()}
        log.info(
            "counting open connections from conntrack events",
            dump_seconds=round(time.monotonic() - started, 3),
            open=sum(snapshot.open.values()),
            new_while_dumping=sum(snapshot.opened.values()),
        )
        return sock

    def _drain(self, timeout: float = -1) -> bool:
        """Take every event queued so far (the thread, and a scrape after reading counters);
        False when another reader held the socket longer than `timeout` (a dump under way)."""
        if not self._receiving.acquire(timeout=timeout):
            return False
        try:
            take = self._take_decoded if self._translog is not None else self._take_raw
            while self._sock is not None and take(self._sock):
                pass
        except EventsLostError as lost:
            self._lost_reason = str(lost)
            self._lost_pending.set()  # the thread recounts
            return False
        finally:
            self._receiving.release()
        return self._sock is not None

    def _take_raw(self, sock: EventSocket) -> bool:
        """Up to TAKEN_TOGETHER datagrams, counted in the raw form: the gauges read a few
        fields of each event. True when more may be queued."""
        news, destroys, more = sock.receive_counted(TAKEN_TOGETHER)
        if news or destroys:
            self.blocks.count(self.tracker.count(news, destroys))
        return more

    def _take_decoded(self, sock: EventSocket) -> bool:
        """Up to TAKEN_TOGETHER datagrams decoded whole, for the translation log too."""
        events: list[CtEvent] = []
        for _ in range(TAKEN_TOGETHER):
            if not (received := sock.receive(block=False)):
                break
            events += received
        if events:
            self._take(events)
        return bool(received)

    def _take(self, events: list[CtEvent]) -> None:
        counted = self.tracker.take(events)
        self.blocks.take(counted)
        if self._translog is not None and counted:
            self._translog.write(counted, self._labels_by_mark())

    def _labels_by_mark(self) -> dict[int, RuleLabels]:
        ids = self._rule_ids()
        if self._labels_for[0] != id(ids):  # the reconciler hands out a new mapping per change
            # A removed rule's connections end after it (natgwd deletes them, or they time
            # out): their end lines keep its labels. Ids are never reused, so an old
            # mark still names its rule; the oldest are forgotten past a bound.
            current = {mark: labels for labels, mark in ids.items()}
            retired = {mark: labels for mark, labels in self._labels_for[1].items() if mark not in current}
            retired = dict(list(retired.items())[-RETIRED_LABELS:])
            self._labels_for = (id(ids), {**retired, **current})
        return self._labels_for[1]

    # --- scrapes --------------------------------------------------------------------------

    def exposition(
        self,
        listings: Listings,
        labelled: Mapping[str, RuleLabel] | None = None,
        draining: Iterable[str] = (),
    ) -> bytes:
        """The lines for a scrape, given the counting sets it listed just before: the
        events queued until now are taken first, so every first packet counted in the
        listing whose connection was committed has had its NEW event counted. `labelled`:
        the rules' labels the scrape's rule counters were written with (made here otherwise).
        `draining`: the addresses of the draining EIPs, whose open connections are the
        ones left to close."""
        connections = listings.get(RULE_CONNECTIONS, ())
        if labelled is None:
            labelled = self._rules.of(connections)
        if labelled is not self._by_id[0]:
            by_id = {label.id: label for label in sorted(labelled.values(), key=_ID)}
            distinct = tuple(dict.fromkeys(label.eip for label in by_id.values()))
            self._by_id = (labelled, by_id, [label.text for label in by_id.values()], distinct)
        _, by_id, texts, rule_eips = self._by_id
        drained = self._drain(timeout=1.0)
        snapshot = self.tracker.snapshot()
        with self._lock:
            if drained and self._base is not None:
                self._count_failures(connections, labelled, self._base, snapshot.opened)
            failures_per_eip: dict[str, int] = {}
            for eip, failed in self._failures.values():
                failures_per_eip[eip] = failures_per_eip.get(eip, 0) + failed
        open_per_eip = dict.fromkeys(rule_eips, 0)
        for mark, now_open in snapshot.open.items():
            if (label := by_id.get(mark)) is not None:
                open_per_eip[label.eip] += now_open
        ids = by_id.keys()
        pieces = [
            family_text(_FAMILIES[0], texts, repeat("} "), list(map(str, map(snapshot.open.get, ids, repeat(0))))),
            family_text(_FAMILIES[1], texts, repeat("} "), list(map(str, map(snapshot.closed.get, ids, repeat(0))))),
        ]
        eips = sorted(open_per_eip.keys() | failures_per_eip.keys())
        eip_labels = [escaped(eip) for eip in eips]
        for family, values in (
            (_FAMILIES[2], (open_per_eip.get(eip, 0) for eip in eips)),
            (_FAMILIES[3], (snapshot.ports.get(eip, 0) for eip in eips)),
            (_FAMILIES[4], (failures_per_eip.get(eip, 0) for eip in eips)),
        ):
            pieces.append(family_text(family, eip_labels, repeat('"} '), list(map(str, values)), opening='{eip="'))
        draining_eips = sorted(draining)
        pieces.append(
            family_text(
                _FAMILIES[6],
                [escaped(eip) for eip in draining_eips],
                repeat('"} '),
                [str(open_per_eip.get(eip, 0)) for eip in draining_eips],
                opening='{eip="',
            )
        )
        pieces.append(iter((self.blocks.exposition(listings.get(PORT_BLOCK_ATTEMPTS, ()), labelled, drained),)))
        name, kind, help_text = _FAMILIES[5]
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {self.lost}"]
        if self._translog is not None:
            lines += self._translog.exposition()
        pieces.append(iter(("\n".join(lines) + "\n",)))
        return "".join(chain.from_iterable(pieces)).encode()

    def _count_failures(
        self,
        connections: Sequence[CountedElement],
        labelled: Mapping[str, RuleLabel],
        base: Mapping[int, int],
        opened: Mapping[int, int],
    ) -> None:
        """Under self._lock: the failures of every rule, from its first packets counted.
        While the rules stay the same (the same mapping from RuleLabelTexts), a rule that
        counts no first packet now has its entry from an earlier scrape, and its figure
        cannot have risen (its first packets minus its NEW events is at most zero, plus
        its earlier epochs' failures, which its entry holds already): only the others are
        visited (picked out in a C loop)."""
        failures = self._failures
        if labelled is self._failures_for:
            connections = list(compress(connections, map("0".__ne__, map(_COUNT, connections))))
        for mark, count, _, _ in connections:
            if (label := labelled.get(mark)) is None:
                continue
            rule_id, eip = label.id, label.eip
            failed = int(count) - base.get(rule_id, 0) - opened.get(rule_id, 0) + self._prior.get(rule_id, 0)
            known = failures.get(rule_id)
            if known is None or known[0] != eip or failed > known[1]:
                failures[rule_id] = (eip, max(known[1] if known is not None else 0, failed))
        self._failures_for = labelled


_ID = attrgetter("id")
_COUNT = itemgetter(1)

_FAMILIES = (  # name, type, help
    ("natgwd_rule_open_connections", "gauge", "Connections the rule translated that are open now (conntrack)."),
    (
        "natgwd_rule_connections_closed_total",
        "counter",
        "Connections the rule translated that closed or timed out, since natgwd started.",
    ),
    ("natgwd_eip_open_connections", "gauge", "Connections translated to or from the EIP that are open now."),
    (
        "natgwd_eip_max_ports_per_destination",
        "gauge",
        "Source ports of the EIP in use towards its busiest destination (protocol, address, port).",
    ),
    (
        "natgwd_eip_port_allocation_failures_total",
        "counter",
        "New connections through the EIP's rules that conntrack could not commit (no free NAT tuple).",
    ),
    (
        "natgwd_conntrack_events_lost_total",
        "counter",
        "Times conntrack events were lost (socket buffer full, malformed message) and open connections "
        "recounted from a dump.",
    ),
    (
        "natgwd_eip_draining_open_connections",
        "gauge",
        "Connections still open through a draining EIP (it takes no new ones); 0: it can be retired.",
    ),
)


# What the daemon calls to make the watcher: given its scrape's listing and the rule ids.
MakeWatch = Callable[[Callable[[], Listings], Callable[[], Mapping[RuleLabels, int]]], ConnectionWatch]
