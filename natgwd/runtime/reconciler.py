"""Keep the kernel equal to a desired state: one atomic nftables transaction per change,
then interfaces, addresses and routes.

The reconciler keeps the table contents it last wrote (like kube-proxy's element
storage) so that a change costs a diff against memory. The kernel is read back when memory
says nothing about it (start, after a failed transaction), when anyone else committed since
(the ruleset generation moved), and every few resyncs; that is how drift is found and
repaired. Applies and resyncs are one path (`_sync`), so what one knows the other trusts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as CounterOf
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Protocol

import structlog

from natgwd.kernel.netlink import AddressChange, LinkReport
from natgwd.kernel.nft import Nft
from natgwd.planning.counters import COUNTING_SETS, CounterMemory, Listings
from natgwd.planning.layout import ID_HIGH_WATER, RULE_CONNECTIONS, whole_elements
from natgwd.planning.links import LinkPlan, link_plan, with_addresses
from natgwd.planning.plan import Endpoint, RuleLabels, TableChange, TablePlan, merge_elements
from natgwd.planning.stale import Filter, Translations, changed_filters, delta_filters
from natgwd.planning.table import DesiredTable, TableContents, Transaction, plan_transaction
from natgwd.planning.timeouts import RETAINED_OBJECTS
from natgwd.qos.plan import ClassStats, QosWants, TcReport, wants
from natgwd.runtime.memory import release_freed_memory
from natgwd.state.model import DesiredState, IPAddress, IPInterface
from natgwd.state.timeouts import TimeoutPolicy
from natgwd.state.tracker import RuleDelta

log = structlog.get_logger("natgwd.runtime.reconciler")

FULL_READ_EVERY = 6  # resyncs
LARGE_TRANSACTION = 5000  # elements
FULL_SCAN_SECONDS = 1.0  # between conntrack scans owed to SNAT changes


class Links(Protocol):
    def apply(self, plan: LinkPlan) -> LinkReport: ...

    def add(self, before: LinkPlan, after: LinkPlan) -> LinkReport | None: ...

    def change_addresses(
        self, interface: str, removed: Sequence[IPInterface], added: Sequence[IPInterface]
    ) -> AddressChange: ...

    def undo(self, change: AddressChange) -> None: ...


class Shaper(Protocol):
    def apply(self, wants: QosWants) -> TcReport: ...

    def stats(self, external: str) -> list[ClassStats]: ...

    @property
    def leaf(self) -> str | None: ...


class Cleaner(Protocol):
    def clean(self, translations: Translations, filters: list[Filter] | None) -> CounterOf[str]: ...


Announce = Callable[[str, list[IPAddress]], None]


class Sync(Enum):
    """What a sync is for."""

    APPLY = "apply"  # a state to make the kernel hold: takes on trust what the last apply verified
    RESYNC = "resync"  # the applied state again: verifies links and shaping, all it changes is drift


class Repair(StrEnum):
    """What drift a sync undid (the label of natgwd_drift_repairs_total)."""

    FORWARDING = "forwarding"
    NFTABLES = "nftables"
    ADDRESSES_ROUTES = "addresses_routes"
    QOS = "qos"


@dataclass
class Outcome:
    """What one reconcile did. `complete` is False while interfaces are missing or a
    netlink or traffic-control change failed; nftables is then already applied and the
    rest is retried."""

    nft_operations: int = 0
    changed_elements: int = 0
    link_changes: list[str] = field(default_factory=list)
    missing_interfaces: list[str] = field(default_factory=list)
    link_errors: list[str] = field(default_factory=list)
    conntrack_deleted: dict[str, int] = field(default_factory=dict)
    repairs: dict[Repair, int] = field(default_factory=dict)  # drift undone
    qos_changes: list[str] = field(default_factory=list)
    qos_errors: list[str] = field(default_factory=list)
    by_delta: bool = False  # planned from the changed rules alone

    @property
    def complete(self) -> bool:
        return not self.missing_interfaces and not self.link_errors and not self.qos_errors


class Reconciler:
    def __init__(
        self,
        nft: Nft,
        links: Links,
        ensure_forwarding: Callable[[], bool],
        conntrack: Cleaner | None = None,
        announce: Announce | None = None,
        qos: Shaper | None = None,
    ) -> None:
        self.nft = nft
        self.qos = qos
        self._qos_applied: QosWants | None = None
        self.links = links
        self.ensure_forwarding = ensure_forwarding
        self.conntrack = conntrack
        self.announce = announce
        self._full_conntrack_scan = True  # the first programming checks every entry (#4193)
        self._scan_owed = False  # a full scan for SNAT changes, put off (FULL_SCAN_SECONDS)
        self._last_full_scan = float("-inf")
        self._announced_all = False
        self._links_applied: LinkPlan | None = None
        self._generation: int | None = None  # the ruleset generation of what _written describes
        self._must_read = True  # memory says nothing about the kernel until it was read
        self._resyncs = 0
        self.state: DesiredState | None = None
        # natgwd's own endpoints, kept out of conntrack (set_untracked).
        self.untracked: tuple[Endpoint, ...] = ()
        self._plan: TablePlan | None = None  # the applied state's table
        self._written: TableContents | None = None  # the kernel's table, unless _must_read (None: no table)
        self._ids: dict[RuleLabels, int] | None = None  # of the applied rules, or adopted from the kernel
        self._highest_id = 0
        self._counters = CounterMemory()
        self._lock = threading.Lock()

    def set_untracked(self, endpoints: tuple[Endpoint, ...]) -> None:
        """natgwd's own endpoints from now on: the next apply plans the table in full
        (a resync would count the difference as drift)."""
        with self._lock:
            if endpoints != self.untracked:
                self.untracked = endpoints
                self._plan = None

    # --- syncing --------------------------------------------------------------------

    def apply(self, state: DesiredState, delta: RuleDelta | None = None, base: DesiredState | None = None) -> Outcome:
        """Make the kernel hold `state`. `delta`: how `state` differs from `base` by its
        rules alone (natgwd.state.tracker); when `base` is the applied state, only the
        changed rules are planned. Raises NftError with nothing changed in nftables if
        the transaction is refused."""
        with self._lock:
            if delta is None or base is None or self._plan is None or base is not self._plan.state:
                delta = None
            elif base.scale_out != state.scale_out:
                delta = None  # discovered members regrouped the EIPs: the hand-over maps change
            elif delta.eips_changed and (state.ha is not None or state.scale_out is not None):
                delta = None  # keepalived holds the EIPs, and the groups' maps name them
            return self._sync(state, Sync.APPLY, delta=delta)

    def resync(self) -> Outcome:
        """Compare the kernel with the applied state and repair what differs (reported in
        the outcome's repairs)."""
        with self._lock:
            if self.state is None:
                return Outcome()
            self._resyncs += 1
            return self._sync(self.state, Sync.RESYNC)

    def verify_plan(self, state: DesiredState) -> bool:
        """Whether the table kept up to date change by change equals the full plan of
        `state` (validated as a whole). If not, the next sync plans in full."""
        with self._lock:
            plan = self._plan
            if plan is None:
                return True
            try:
                full = TablePlan(state, plan.ids, plan.highest_id, self.untracked)
                same = state == plan.state and full.table.contents() == plan.table.contents()
            except KeyError:  # a rule without an id
                same = False
            if not same:
                log.error("the table planned change by change differs from the full plan; planning in full")
                self._plan = None
            return same

    def _sync(self, state: DesiredState, mode: Sync, delta: RuleDelta | None = None) -> Outcome:
        """The one path from a desired state to the kernel, for applies, resyncs, SIGHUP,
        adoption at start and repair after a failure.

        A resync re-verifies what an apply may take on trust (links, and now and then the
        table even when no one committed), and everything it has to change is drift."""
        resync = mode is Sync.RESYNC
        repairs: dict[Repair, int] = {}
        if self.ensure_forwarding() and self.state is not None:
            repairs[Repair.FORWARDING] = 1
        kernel, drifted, generation = self._current_table(reread=resync and self._resyncs % FULL_READ_EVERY == 0)
        plan, change = self._plan, None
        if resync and plan is not None:
            tx = plan_transaction(kernel, plan.table, self._counters)
        elif plan is not None and delta is not None:
            change = plan.change(state, delta.removed, delta.added, delta.removed_eips, delta.added_eips)
            tx = self._change_transaction(kernel, plan, change)
        else:
            assert self._ids is not None
            plan = TablePlan.assigning(state, self._ids, self._highest_id, self.untracked)
            tx = plan_transaction(kernel, plan.table, self._counters)
        # EIPs a change adds or removes: their addresses first, all or nothing, so that a
        # refused address leaves the kernel as it was; taken back if nftables refuses.
        addresses = None
        if delta is not None and delta.eips_changed and self._links_applied is not None:
            addresses = self._change_eip_addresses(state, delta)
        try:
            self._commit(tx, generation)
        except Exception:
            if addresses is not None:
                self._undo_addresses(addresses)
            raise
        assert plan is not None
        eip_text = plan.frame.eip_text  # the removed rules' EIPs (a change of EIPs changes the frame)
        previous = self.state
        if change is not None:
            assert plan is not None
            self._remember_change(kernel, plan, change, tx)
            if plan.frame.eip_text is not eip_text:
                eip_text = {**eip_text, **plan.frame.eip_text}
        else:
            if plan is not self._plan:
                self._plan = plan
                self._counters.forget_except(plan.elements)
            self._written = plan.table.contents()
            self._written.chains.update(dict.fromkeys(tx.emptied_chains, ()))
            self._written.objects = tx.objects_after(kernel.objects if kernel is not None else {})
        self._highest_id = max(self._highest_id, plan.highest_id)
        self._ids = plan.ids
        self.state = plan.state
        # A resync wants what was applied already, so all it changes is drift, except for
        # deleting chains an earlier transaction emptied.
        repaired = len(tx.operations) - tx.finishing if resync else len(tx.operations) if drifted else 0
        if repaired:
            log.warning("nftables drift", operations=repaired, changed_elements=tx.changed_elements)
            repairs[Repair.NFTABLES] = repaired
            # Connections that started while rules were missing or wrong left un-NATed.
            self._full_conntrack_scan = True
        # A change of rules alone leaves links and shaping as they are (they depend on
        # the EIPs and interfaces); unchanged links were verified by the last apply, and a
        # resync verifies them again.
        outcome = Outcome()
        if addresses is not None:
            outcome = self._eip_addresses_applied(state, addresses)
        elif delta is None or self._links_applied is None:
            links = link_plan(state)
            if resync or links != self._links_applied:
                outcome = self._apply_links(state, links, mode)
            self._apply_qos(state, outcome, mode)
        outcome.nft_operations, outcome.changed_elements = len(tx.operations), tx.changed_elements
        outcome.by_delta = change is not None
        if resync and outcome.link_changes:
            repairs[Repair.ADDRESSES_ROUTES] = len(outcome.link_changes)
        if resync and outcome.qos_changes:
            repairs[Repair.QOS] = len(outcome.qos_changes)
        outcome.repairs = repairs
        if self._full_conntrack_scan:
            outcome.conntrack_deleted = self._clean_conntrack(None)
        elif delta is not None or (previous is not None and previous != state):
            filters = delta_filters(delta, eip_text) if delta is not None else changed_filters(previous, state)
            if filters is not None:
                outcome.conntrack_deleted = self._clean_conntrack(filters)
            else:
                # A SNAT change: only a scan of every entry finds the flows of its CIDR.
                # A controller replaying 1,000 SNAT rules must not pay one per call: at
                # most one a second, and one after the last change (clean_owed_conntrack).
                self._scan_owed = True
                outcome.conntrack_deleted = self._clean_owed_conntrack()
        return outcome

    def clean_owed_conntrack(self) -> dict[str, int]:
        """The full conntrack scan SNAT changes owe, once FULL_SCAN_SECONDS passed since
        the last one (the daemon asks at every turn of its loop)."""
        with self._lock:
            return self._clean_owed_conntrack()

    def _clean_owed_conntrack(self) -> dict[str, int]:
        if not self._scan_owed or time.monotonic() < self._last_full_scan + FULL_SCAN_SECONDS:
            return {}
        return self._clean_conntrack(None)

    def _change_transaction(self, kernel: TableContents | None, plan: TablePlan, change: TableChange) -> Transaction:
        """The transaction of a change of rules. With memory trusted (no one else
        committed) it is planned from the touched elements alone; else against the
        kernel's table as read, as a whole."""
        if kernel is not None and kernel is self._written:
            touched = {
                name: {key: kernel.elements[name][key] for key in keyed if key in kernel.elements.get(name, {})}
                for name, keyed in change.elements.items()
            }
            wanted = {name: {k: e for k, e in keyed.items() if e} for name, keyed in change.elements.items()}
            current = TableContents(kernel.sets, kernel.chains, touched, objects=kernel.objects)
            # No counter to seed: a counting element a change adds is a new rule id's (a
            # changed rule keeps its id and its elements).
            desired = DesiredTable(
                change.sets, change.chains, wanted, objects=change.objects, retained_objects=RETAINED_OBJECTS
            )
            return plan_transaction(current, desired)
        elements = {name: dict(keyed) for name, keyed in plan.elements.items()}
        for name, keyed in change.elements.items():
            merge_elements(elements.setdefault(name, {}), keyed)
        wanted_sets = {spec.name for spec in change.sets}
        whole = {name: keyed for name, keyed in elements.items() if name in wanted_sets}
        desired = DesiredTable(
            change.sets, change.chains, whole, objects=change.objects, retained_objects=RETAINED_OBJECTS
        )
        return plan_transaction(kernel, desired, self._counters)

    def _remember_change(
        self, kernel: TableContents | None, plan: TablePlan, change: TableChange, tx: Transaction
    ) -> None:
        """The kernel took a change of rules: the plan and the memory of the kernel's
        table follow it in place, at the cost of the change."""
        trusted = kernel is not None and kernel is self._written
        plan.commit(change)
        objects = tx.objects_after(kernel.objects if kernel is not None else {})
        if not trusted:
            self._written = plan.table.contents()
        else:
            assert self._written is not None
            written = self._written
            for name in written.sets.keys() - {spec.name for spec in change.sets}:
                written.elements.pop(name, None)
            written.sets = {spec.name: spec.keyword for spec in change.sets}
            for name, keyed in change.elements.items():
                if name in written.sets:  # else deleted with its set
                    merge_elements(written.elements.setdefault(name, {}), keyed)
            written.chains = {chain.name: chain.tags for chain in change.chains}
        self._written.chains.update(dict.fromkeys(tx.emptied_chains, ()))
        self._written.objects = objects
        for name, keyed in change.elements.items():
            self._counters.forget(name, [key for key, element in keyed.items() if element is None])

    @property
    def element_count(self) -> int:
        written = self._written
        return written.element_count() if written is not None else 0

    @property
    def timeout_policies(self) -> dict[TimeoutPolicy, int]:
        """How many applied rules apply each idle-timeout policy."""
        plan = self._plan
        return dict(plan.timeout_policies) if plan is not None else {}

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

    def _current_table(self, reread: bool) -> tuple[TableContents | None, bool, int]:
        """What the kernel's table holds (None: no table), and whether it drifted from
        what we last knew it to hold. Memory is trusted only while no one else committed
        since our last commit or read, and never after a failure."""
        generation = self.nft.generation()
        if not self._must_read and generation == self._generation and not reread:
            return self._written, False, generation
        kernel = self.nft.read_table()
        release_freed_memory()  # the listing of a whole table: megabytes of JSON at 10,000 rules
        drifted = not self._must_read and kernel != self._written
        self._generation, self._written, self._must_read = generation, kernel, False
        if kernel is not None:
            self._counters.remember(kernel.elements)
        if self._ids is None:
            self._adopt(kernel)
        return kernel, drifted, generation

    def _adopt(self, kernel: TableContents | None) -> None:
        """Take over the rule ids of the table found at start, so a restart changes
        nothing that is already right (no flush, no traffic blip)."""
        existing: dict[RuleLabels, int] = {}
        if kernel is not None:
            for mark, element in whole_elements(kernel.elements, RULE_CONNECTIONS):
                labels = RuleLabels.from_comment(element.comment or "")
                if labels is not None and mark.isdigit():
                    existing[labels] = int(mark)
            recorded = [int(m) for m in kernel.elements.get(ID_HIGH_WATER, {}) if m.isdigit()]
            self._highest_id = max(self._highest_id, *recorded, 0)
        self._ids = existing
        log.info(
            "adopted nftables table",
            found=kernel is not None,
            rules=len(existing),
            elements=kernel.element_count() if kernel else 0,
        )

    def _commit(self, tx: Transaction, before: int) -> None:
        """Apply `tx` to a kernel last seen at generation `before` (read at the start of
        this sync: one netlink round trip fewer per change)."""
        if not tx:
            return
        started = time.monotonic()
        try:
            self.nft.apply(tx)
        except Exception:
            # Refused, as far as we know, but whatever made it fail may have changed the
            # kernel too: the next sync reads the kernel instead of trusting memory.
            self._must_read = True
            raise
        if tx.changed_elements >= LARGE_TRANSACTION:
            # libnftables' parse of it left tens of megabytes free but mapped.
            release_freed_memory()
        after = self.nft.generation()
        # Our commit is the only one since the kernel was last known to us only if the
        # generation moved by exactly one; else read it next time.
        commits = 2 if tx.made_first and tx.operations else 1  # objects made over netlink first
        self._generation = after if after == before + commits else None
        log.info(
            "nftables transaction applied",
            operations=len(tx.operations),
            changed_elements=tx.changed_elements,
            seconds=round(time.monotonic() - started, 4),
        )

    def _change_eip_addresses(self, state: DesiredState, delta: RuleDelta) -> AddressChange | None:
        """The addresses of the EIPs `delta` removes and adds (plain IPv4 EIPs of one
        external network: natgwd.state.eipdelta), on the external interface; in HA mode
        keepalived's. Raises OSError with none of them changed."""
        if state.ha is not None or state.scale_out is not None:
            return None
        assert self.state is not None
        removed = [a for eip in delta.removed_eips for a in self.state.eip_interfaces(eip)]
        added = [a for eip in delta.added_eips for a in state.eip_interfaces(eip)]
        change = self.links.change_addresses(state.external.interface, removed, added)
        log.info(
            "eip addresses changed", removed=[str(a) for a in change.removed], added=[str(a) for a in change.added]
        )
        return change

    def _undo_addresses(self, change: AddressChange) -> None:
        try:
            self.links.undo(change)
        except OSError as err:
            # The next sync applies the links in full, which undoes what is left.
            log.error("cannot undo an address change", error=str(err))
            self._links_applied = None

    def _eip_addresses_applied(self, state: DesiredState, change: AddressChange) -> Outcome:
        """The links plan after change_addresses, without planning the links again."""
        assert self._links_applied is not None
        self._links_applied = with_addresses(self._links_applied, change.interface, change.removed, change.added)
        added = [(change.interface, address) for address in change.added]
        self._announce_eips(state, LinkReport(added_addresses=added))
        changes = [f"delete address {a} dev {change.interface}" for a in change.removed]
        changes += [f"add address {a} dev {change.interface}" for a in change.added]
        return Outcome(link_changes=changes)

    def _apply_links(self, state: DesiredState, plan: LinkPlan, mode: Sync) -> Outcome:
        """Links as `plan` says: what it adds alone when the last plan was applied and
        this is no resync, else the whole plan against the kernel."""
        report = None
        if mode is Sync.APPLY and self._links_applied is not None:
            report = self.links.add(self._links_applied, plan)
        if report is None:
            report = self.links.apply(plan)
        self._links_applied = plan if not report.missing and not report.errors else None
        for change in report.changes:
            log.info("link change", change=change)
        for error in report.errors:
            log.error("link change failed", error=error)
        self._announce_eips(state, report)
        return Outcome(link_changes=report.changes, missing_interfaces=report.missing, link_errors=report.errors)

    def _apply_qos(self, state: DesiredState, outcome: Outcome, mode: Sync) -> None:
        """Shape as the state's QoS policies say (and remove natgwd's shaping where they
        say nothing), once the external interface exists. Unchanged QoS was verified by
        the last apply (reading 1,000 EIPs' trees back takes half a second); a resync
        reads the kernel anyway."""
        if self.qos is None or state.external.interface in outcome.missing_interfaces:
            return
        wanted = wants(state)
        if mode is Sync.APPLY and wanted == self._qos_applied:
            return
        try:
            report = self.qos.apply(wanted)
        except Exception as err:  # a shaping failure must not stop NAT from being kept
            log.exception("traffic control failed")
            report = TcReport(errors=[f"traffic control: {type(err).__name__}: {err}"])
        self._qos_applied = None if report.errors else wanted
        for change in report.changes:
            log.info("qos change", change=change)
        for error in report.errors:
            log.error("qos not applied", error=error)
        outcome.qos_changes = report.changes
        outcome.qos_errors = report.errors

    def _announce_eips(self, state: DesiredState, report: LinkReport) -> None:
        """Gratuitous ARP (IPv4) or an unsolicited neighbour advertisement (IPv6) for every
        EIP address once the external interface exists after start (upstream may still
        have the MAC of the gateway's previous home), then for each EIP address as it is
        added."""
        # In HA mode the EIPs are the active member's alone: it announces them on taking over.
        if (
            self.announce is None
            or state.ha is not None
            or state.scale_out is not None
            or state.external.interface in report.missing
        ):
            return
        first, self._announced_all = not self._announced_all, True
        # Each EIP on the interface of its own external network.
        for network in state.externals:
            if network.interface in report.missing:
                continue
            eips = {a for e in state.eips if e.network == network.name for a in e.addresses}
            if first:
                added = list(eips)
            else:
                added = [a.ip for name, a in report.added_addresses if name == network.interface and a.ip in eips]
            added.sort(key=lambda a: (a.version, a))
            if added:
                self.announce(network.interface, added)

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
        if filters is None:
            self._scan_owed, self._last_full_scan = False, time.monotonic()
        if deleted:
            log.info(
                "stale conntrack entries deleted",
                by_reason=dict(deleted),
                full_scan=filters is None,
                seconds=round(time.monotonic() - started, 4),
            )
        return dict(deleted)
