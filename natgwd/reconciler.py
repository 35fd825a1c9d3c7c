"""Keep the kernel equal to a desired state: one atomic nftables transaction per change,
then interfaces, addresses and routes.

The reconciler keeps the table contents it last wrote (like kube-proxy's element
storage) so that a change costs a diff against memory. The kernel is read back when there
is no trusted copy (start, after a failed transaction) and on every resync, which is how
drift is found and repaired.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as CounterOf
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Protocol

import structlog

from natgwd.counters import COUNTING_SETS, CounterMemory, Listings
from natgwd.links import LinkPlan, link_plan
from natgwd.model import DesiredState
from natgwd.netlink import LinkReport
from natgwd.nft import Nft
from natgwd.plan import ID_HIGH_WATER, RULE_CONNECTIONS, RuleLabels, assign_ids, desired_table
from natgwd.stale import Filter, Translations, changed_filters
from natgwd.table import DesiredTable, TableContents, Transaction, plan_transaction

log = structlog.get_logger("natgwd.reconciler")

FULL_READ_EVERY = 6  # resyncs


class Links(Protocol):
    def apply(self, plan: LinkPlan) -> LinkReport: ...


class Cleaner(Protocol):
    def clean(self, translations: Translations, filters: list[Filter] | None) -> CounterOf[str]: ...


Announce = Callable[[str, list[IPv4Address]], None]


@dataclass
class Outcome:
    """What one reconcile did. `complete` is False while interfaces are missing or a
    netlink change failed; nftables is then already applied and the rest is retried."""

    nft_operations: int = 0
    changed_elements: int = 0
    link_changes: list[str] = field(default_factory=list)
    missing_interfaces: list[str] = field(default_factory=list)
    link_errors: list[str] = field(default_factory=list)
    conntrack_deleted: dict[str, int] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)  # drift undone, by resource

    @property
    def complete(self) -> bool:
        return not self.missing_interfaces and not self.link_errors


class Reconciler:
    def __init__(
        self,
        nft: Nft,
        links: Links,
        ensure_forwarding: Callable[[], bool],
        conntrack: Cleaner | None = None,
        announce: Announce | None = None,
    ) -> None:
        self.nft = nft
        self.links = links
        self.ensure_forwarding = ensure_forwarding
        self.conntrack = conntrack
        self.announce = announce
        self._full_conntrack_scan = True  # the first programming checks every entry (#4193)
        self._announced_all = False
        self._links_applied: LinkPlan | None = None
        self._generation: int | None = None  # the ruleset generation after our last commit
        self._resyncs = 0
        self.state: DesiredState | None = None
        self._table: DesiredTable | None = None
        self._written: TableContents | None = None  # what we believe the kernel holds
        self._ids: dict[RuleLabels, int] | None = None
        self._highest_id = 0
        self._counters = CounterMemory()
        self._lock = threading.Lock()

    # --- applying -------------------------------------------------------------------

    def apply(self, state: DesiredState) -> Outcome:
        """Make the kernel hold `state`. Raises NftError with nothing changed in nftables
        if the transaction is refused."""
        with self._lock:
            self.ensure_forwarding()
            drifted = False
            if self._written is None or self._ids is None:
                self._adopt()
            elif (generation := self.nft.generation()) != self._generation:
                # Someone committed since we last wrote or read: diff against the kernel,
                # not against memory, or their change (a flushed chain...) would stay.
                kernel = self.nft.read_table()
                drifted = kernel != self._written
                self._generation, self._written = generation, kernel
            assert self._ids is not None
            ids = assign_ids(state, self._ids, self._highest_id)
            table = desired_table(state, ids, self._highest_id)
            tx = plan_transaction(self._written, table, self._counters)
            self._commit(tx)
            previous = self.state
            self._written = table.contents()
            self._ids, self._table, self.state = ids, table, state
            self._highest_id = max(self._highest_id, *ids.values(), 0)
            self._counters.forget_except(table.elements)
            plan = link_plan(state)
            # Unchanged links were verified by the last apply; resync keeps verifying them.
            outcome = Outcome() if plan == self._links_applied else self._apply_links(state, plan)
            outcome.nft_operations, outcome.changed_elements = len(tx.operations), tx.changed_elements
            if drifted:
                log.warning("nftables drift found while applying", operations=len(tx.operations))
                outcome.repairs["nftables"] = len(tx.operations)
                self._full_conntrack_scan = True  # as in resync: flows may have left un-NATed
            if self._full_conntrack_scan:
                outcome.conntrack_deleted = self._clean_conntrack(None)
            elif previous != state:
                outcome.conntrack_deleted = self._clean_conntrack(changed_filters(previous, state))
            return outcome

    def resync(self) -> Outcome:
        """Compare the kernel with the applied state and repair what differs (reported in
        the outcome's repairs)."""
        with self._lock:
            repairs: dict[str, int] = {}
            if self.state is None or self._table is None:
                return Outcome()
            if self.ensure_forwarding():
                repairs["forwarding"] = 1
            self._resyncs += 1
            generation = self.nft.generation()
            # No nftables commit since ours: nothing can have drifted. Still read the table
            # now and then, in case a commit slipped in between ours and reading its number.
            unchanged = generation == self._generation and self._resyncs % FULL_READ_EVERY != 0
            kernel = self._written if unchanged else self.nft.read_table()
            if not unchanged:
                self._generation = generation
                if kernel is not None:
                    self._counters.remember(kernel.elements)
            tx = plan_transaction(kernel, self._table, self._counters)
            if tx:
                log.warning(
                    "nftables drift",
                    table_missing=kernel is None,
                    operations=len(tx.operations),
                    changed_elements=tx.changed_elements,
                )
                self._commit(tx)
                repairs["nftables"] = len(tx.operations)
                # Connections that started while rules were missing left un-NATed.
                self._full_conntrack_scan = True
            self._written = self._table.contents()
            outcome = self._apply_links(self.state, link_plan(self.state))
            outcome.nft_operations, outcome.changed_elements = len(tx.operations), tx.changed_elements
            if self._full_conntrack_scan:
                outcome.conntrack_deleted = self._clean_conntrack(None)
            if outcome.link_changes:
                repairs["addresses_routes"] = len(outcome.link_changes)
            outcome.repairs = repairs
            return outcome

    @property
    def element_count(self) -> int:
        written = self._written
        return written.element_count() if written is not None else 0

    @property
    def rule_ids(self) -> Mapping[RuleLabels, int]:
        """The id (ct mark) of every applied rule; a new mapping on each change, never edited."""
        return self._ids or {}

    def counting_sets(self) -> Listings:
        """The kernel's counting sets, for a scrape; also remembered for re-seeding."""
        listings = self.nft.read_counters(COUNTING_SETS)
        self._counters.remember_listings(listings)
        return listings

    # --- pieces ---------------------------------------------------------------------

    def _adopt(self) -> None:
        """Start from whatever table is in the kernel, with its rule ids, so a restart
        changes nothing that is already right (no flush, no traffic blip)."""
        self._generation = self.nft.generation()
        kernel = self.nft.read_table()
        self._written = kernel
        existing: dict[RuleLabels, int] = {}
        if kernel is not None:
            self._counters.remember(kernel.elements)
            for mark, element in kernel.elements.get(RULE_CONNECTIONS, {}).items():
                labels = RuleLabels.from_comment(element.comment or "")
                if labels is not None and mark.isdigit():
                    existing[labels] = int(mark)
            recorded = [int(m) for m in kernel.elements.get(ID_HIGH_WATER, {}) if m.isdigit()]
            self._highest_id = max(self._highest_id, *recorded, 0)
        if self._ids is not None:
            # The table vanished under us: keep the ids (and counters) we already gave out.
            existing = {**self._ids, **existing}
        self._ids = existing
        log.info(
            "adopted nftables table",
            found=kernel is not None,
            rules=len(existing),
            elements=kernel.element_count() if kernel else 0,
        )

    def _commit(self, tx: Transaction) -> None:
        if not tx:
            return
        started = time.monotonic()
        before = self.nft.generation()
        try:
            self.nft.apply(tx)
        except Exception:
            self._written = None  # unknown now: read the kernel next time
            raise
        after = self.nft.generation()
        # Our commit is the only one since the kernel was last known to us only if the
        # generation moved by exactly one from the one we knew; else read it next time.
        self._generation = after if before == self._generation and after == before + 1 else None
        log.info(
            "nftables transaction applied",
            operations=len(tx.operations),
            changed_elements=tx.changed_elements,
            seconds=round(time.monotonic() - started, 4),
        )

    def _apply_links(self, state: DesiredState, plan: LinkPlan) -> Outcome:
        report = self.links.apply(plan)
        self._links_applied = plan if not report.missing and not report.errors else None
        for change in report.changes:
            log.info("link change", change=change)
        for error in report.errors:
            log.error("link change failed", error=error)
        self._announce_eips(state, report)
        return Outcome(link_changes=report.changes, missing_interfaces=report.missing, link_errors=report.errors)

    def _announce_eips(self, state: DesiredState, report: LinkReport) -> None:
        """Gratuitous ARP for every EIP once the external interface exists after start
        (upstream may still have the MAC of the gateway's previous home), then for each
        EIP address as it is added."""
        external = state.external.interface
        if self.announce is None or external in report.missing:
            return
        eips = {e.v4ip for e in state.eips}
        if self._announced_all:
            added = sorted(a.ip for name, a in report.added_addresses if name == external and a.ip in eips)
        else:
            added, self._announced_all = sorted(eips), True
        if added:
            self.announce(external, added)

    def _clean_conntrack(self, filters: list[Filter] | None) -> dict[str, int]:
        if self.conntrack is None or self.state is None or self._ids is None:
            return {}
        started = time.monotonic()
        try:
            deleted = self.conntrack.clean(Translations(self.state, self._ids.values()), filters)
        except OSError as err:  # NetlinkError is an OSError
            log.error("conntrack cleanup failed; retrying with a full scan next time", error=str(err))
            self._full_conntrack_scan = True
            return {}
        self._full_conntrack_scan = False
        if deleted:
            log.info(
                "stale conntrack entries deleted",
                by_reason=dict(deleted),
                full_scan=filters is None,
                seconds=round(time.monotonic() - started, 4),
            )
        return dict(deleted)
