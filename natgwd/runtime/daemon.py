"""`natgwd run`: watch the desired-state file, reconcile, resync, serve metrics.

One thread reconciles; the HTTP server reads counters from the kernel on its own threads.
On SIGTERM the daemon exits and leaves the data plane in place, as kube-proxy does: NAT
keeps working while the daemon is down, and the next start adopts the table.

The loop is here; its parts are beside it: the state file as read (statefile.py), the
retries (retry.py), the applied-state record (record.py), what the HTTP endpoint answers
(answers.py); nat-gateway.sh calls come through natgwd.kubeovn.shim.service.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from natgwd.bgp.metrics import BgpCollector
from natgwd.bgp.ownership import Ownership, SoleOwner
from natgwd.bgp.speaker import BgpSpeaker
from natgwd.ha.controller import HaController
from natgwd.io import paths
from natgwd.io.portblock_history import History
from natgwd.kernel.garp import Announcer
from natgwd.kernel.netlink import usable_addresses
from natgwd.kernel.nft import NftError
from natgwd.kubeovn.shim.endpoint import ADDRESS as EDIT_ADDRESS
from natgwd.kubeovn.shim.endpoint import EditEndpoint
from natgwd.kubeovn.shim.service import COMPACT_IDLE_SECONDS, EditService
from natgwd.observability.connwatch import MakeWatch
from natgwd.planning.counters import Listings
from natgwd.planning.plan import Endpoint
from natgwd.runtime import collector
from natgwd.runtime.answers import Answers, Progress
from natgwd.runtime.changes import changed_names
from natgwd.runtime.endpoints import Endpoints, close
from natgwd.runtime.instance import AlreadyRunningError, Claim
from natgwd.runtime.listeners import MetricsListeners
from natgwd.runtime.metrics import DaemonMetrics
from natgwd.runtime.notify import Notifier
from natgwd.runtime.reconciler import Announce, Outcome, Reconciler
from natgwd.runtime.record import AppliedRecord
from natgwd.runtime.retry import Backoff
from natgwd.runtime.startup import Exit, StartupError, listen_error
from natgwd.runtime.statefile import Content, LastRead, Reading, StateFile, Unreadable
from natgwd.runtime.watch import DirectoryWaker
from natgwd.state.model import DesiredState, IPAddress
from natgwd.state.tracker import Change, StateTracker
from natgwd.state.validation import InvalidStateError, Problem, validate_document

log = structlog.get_logger("natgwd.runtime.daemon")

# One stat() per poll: detection within 50 ms costs next to nothing. inotify (watch.py)
# usually wakes the poll at once; this is the bound where it cannot.
POLL_SECONDS = 0.05


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    state_path: Path
    metrics_address: tuple[str, int]  # host "auto": natgwd.runtime.listeners
    resync_interval: float
    applied_state_path: Path | None = None
    allow_writable_state: bool = False
    edit_port: int | None = None  # nat-gateway.sh calls on 127.0.0.1:PORT (0: any free port)
    edit_token_path: Path = paths.EDIT_TOKEN
    edit_fold_after: float = COMPACT_IDLE_SECONDS  # seconds without a call before the edit log is folded in
    port_block_history_path: Path | None = None  # the applied port-block layouts, for `natgwd whois`


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        make_reconciler: Callable[[Announce], Reconciler],
        make_ha: Callable[[Callable[[str, int], None], CollectorRegistry], HaController] | None = None,
        make_watch: MakeWatch | None = None,
        make_bgp: Callable[[Ownership], BgpSpeaker] | None = None,
        read_addresses: Callable[[str], Sequence[IPAddress]] | None = None,
    ) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)

        def count_garp(interface: str, frames: int) -> None:
            self.metrics.garp_sent.labels(interface).inc(frames)

        self.reconciler = make_reconciler(Announcer(count_garp).request)
        self.ha = make_ha(count_garp, self.registry) if make_ha is not None else None
        # The HA pair decides who owns the EIPs, else this gateway owns them all.
        self.bgp = make_bgp(self.ha if self.ha is not None else SoleOwner()) if make_bgp is not None else None
        if self.bgp is not None:
            self.registry.register(BgpCollector(self.bgp.snapshot))
        # Open connections, port usage and translation logs, from conntrack events.
        self.watch = make_watch(self._counting_sets, lambda: self.reconciler.rule_ids) if make_watch else None
        self.file = StateFile(config.state_path, config.allow_writable_state)
        self.notifier = Notifier()
        self._told_ready = False
        self._wake = threading.Event()
        self.edits = (
            EditService(
                config.state_path,
                self._wake.set,
                self._edits_written,
                compact_idle=config.edit_fold_after,
                refused_lines=self.metrics.edit_log_lines_refused.inc,
            )
            if config.edit_port is not None
            else None
        )
        self._stopping = False
        self._force = False
        self._members_changed = _WakingEvent(self._wake)  # discovered members (natgwd.ha.discovery)
        self.tracker = StateTracker()
        self._unverified = False  # changes applied rule by rule since the last full check
        self._applied_digest: str | None = None
        self.progress = Progress(f"no state applied yet; waiting for {config.state_path}")
        # What /readyz and /metrics say of the applied state changes with the record, under this lock.
        self.published = threading.Lock()
        self.answers = Answers(
            self.progress,
            config.resync_interval,
            self.applied_sha256,
            self.registry,
            self.reconciler,
            self._counting_sets,
            self.watch,
            self.ha,
            self.bgp,
            self.published,
        )
        endpoints = Endpoints(self.answers.exposition, self.answers.readiness, self.answers.liveness)
        self.listeners = MetricsListeners(
            config.metrics_address, endpoints.listen, close, read_addresses or usable_addresses
        )
        self.retry = Backoff()
        self.record = AppliedRecord(config.applied_state_path)
        self.port_blocks = History(config.port_block_history_path)
        self._next_resync = time.monotonic() + config.resync_interval

    # --- lifecycle --------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        metrics = "{}:{}".format(*self.config.metrics_address)
        try:
            # Before anything touches the kernel; held until the process ends.
            claim = Claim(str(self.config.state_path), metrics)
        except AlreadyRunningError as err:
            raise StartupError(Exit.ALREADY_RUNNING, str(err), str(self.config.state_path)) from None
        try:
            return self._run()
        finally:
            claim.release()

    def _run(self) -> int:
        try:
            self.listeners.start()
        except (OSError, TypeError, UnicodeError) as err:  # TypeError: a host name IDNA cannot encode
            raise listen_error(self.config.metrics_address, err) from None
        endpoint = self._start_edit_endpoint()
        self.reconciler.set_untracked(own_endpoints(self.listeners.addresses, endpoint is not None))
        waker = DirectoryWaker(self.config.state_path, self._wake.set)
        waker.start()
        if self.ha is not None:
            self.ha.start(self.resync_soon, self._members_changed.set)
        if self.bgp is not None:
            self.bgp.start()
        self.record.recall()
        if self.watch is not None:
            self.watch.start()
        log.info(
            "natgwd started",
            state=str(self.config.state_path),
            metrics=["{}:{}".format(*address) for address in self.listeners.addresses],
            resync_interval=self.config.resync_interval,
        )
        try:
            while not self._stopping:
                self.progress.last_step = time.monotonic()
                self._wake.clear()  # before the step: a wake during it (an edit call) is not lost
                self.step()
                self.notifier.watchdog()
                self._wake.wait(POLL_SECONDS)
        finally:
            if endpoint is not None and self.edits is not None:
                endpoint.stop()
                self.edits.refuse_pending("natgwd is stopping; try again")
                self.edits.compact()
            self.notifier.send("STOPPING=1")
            if self.bgp is not None:
                # Upstream moves the EIPs' traffic away (to the standby's path, if it
                # announces one) before anything here stops.
                self.bgp.withdraw()
            if self.ha is not None:
                # A planned switchover: keepalived hands the addresses over as it stops.
                self.ha.stop()
            if self.bgp is not None:
                self.bgp.stop()
            waker.stop()
            if self.watch is not None:
                self.watch.stop()
            self.listeners.stop()
        log.info("natgwd stopped; the data plane stays in place")
        return 0

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        self._stopping = True
        self._wake.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP: re-reading the desired state and resyncing")
        self._force = True
        self._wake.set()

    def resync_soon(self) -> None:
        """From any thread: resync at the next turn of the loop."""
        self._next_resync = 0.0
        self._wake.set()

    def step(self) -> None:
        now = time.monotonic()
        if self._force:
            self._force = False
            self.file.poll()
            self.reconcile_file(Reading.FORCED)
            self.resync()
            return
        if self._members_changed.is_set():
            self._members_changed.clear()
            self._apply_members()
        reading = self.file.poll()
        if reading is not None:
            self.reconcile_file(reading)
        if self.edits is not None:
            if self.edits.serve_pending(self._apply_edit) and self.ha is not None:
                self.ha.applied_digest(self.applied_sha256)  # the peer compares calls too
            if self.edits.compaction_due():
                self.edits.compact()
        for reason, count in self.reconciler.clean_owed_conntrack().items():
            self.metrics.conntrack_deleted.labels(reason).inc(count)
        # Not `elif`: a file rewritten every few hundred milliseconds must not starve
        # retries and drift repair.
        if self.retry.is_due(now):
            self.reconcile_file(Reading.FORCED)
        elif now >= self._next_resync:
            self.resync()

    # --- reconciling ------------------------------------------------------------------

    def reconcile_file(self, reading: Reading) -> None:
        """Read, validate and apply the file (unchanged content as `reading` says)."""
        with collector.paused():  # (natgwd.runtime.collector: walked once, after the record)
            self._reconcile_file(reading)

    def _reconcile_file(self, reading: Reading) -> None:
        started = time.monotonic()
        content = self.file.read()
        if isinstance(content, Unreadable):
            if not self.file.seen(content, reading):
                self._rejected(list(content.problems), content)
            return
        if self.file.seen(content, reading):
            if reading is Reading.CHANGED:
                self.metrics.reconciles.labels("unchanged").inc()
            return
        content.hash_aside()  # wanted once the change is applied
        raw = content.raw
        self.file.last_read = content
        applied_raw = self.edits.effective(raw, content.digest) if self.edits is not None else raw
        try:
            change = self.tracker.check(applied_raw)
        except InvalidStateError as err:
            self._rejected(err.problems, content, err.skipped)
            return
        except Exception as err:  # no input may take the daemon down, whatever it trips over
            log.exception("validation failed unexpectedly")
            self._rejected([Problem("$", f"cannot be validated: {type(err).__name__}")], content)
            return
        change = self._effective(change)
        state = change.state
        refused = self.ha.check(state) if self.ha is not None else []
        if refused:
            self._rejected(refused, content)
            return
        self.metrics.desired_state_valid.set(1)
        try:
            outcome = self._apply_change(change)
        except (NftError, OSError) as err:
            self._failed(f"applying the desired state failed: {err}")
            return
        self.tracker.accept(change)
        _log_changes(change, "the state file")
        self._unverified |= outcome.by_delta
        with self.published:
            self.metrics.state_changes.labels("delta" if outcome.by_delta else "full").inc()
            self._count(outcome)
            self._applied_digest = digest = content.digest
            self.progress.applied_at = time.time()
            if self.edits is not None:
                self.edits.accepted(applied_raw, digest, change.validated.document)
            effective = self.applied_sha256() or digest  # with calls logged on the file: not the file's
            self.record.write(applied_raw, effective, self.progress.applied_at)
            self._count_rules(state)
            self.metrics.show_timeout_policies(self.reconciler.timeout_policies)
            self._applied_to_members(state, effective, outcome.complete)
            self._finished(outcome, started, {"sha256": effective[:12]})
        self.tracker.settle()  # after the record: what the next check needs

    # --- nat-gateway.sh calls (natgwd.kubeovn.shim.service) -------------------------------

    def _start_edit_endpoint(self) -> EditEndpoint | None:
        if self.edits is None or self.config.edit_port is None:
            return None
        try:
            endpoint = EditEndpoint(self.config.edit_port, self.config.edit_token_path, self.edits.submit)
            endpoint.start()
        except OSError as err:
            where = f"{EDIT_ADDRESS}:{self.config.edit_port}"
            message = f"cannot start the edit endpoint on {where} (--edit-port, --edit-token): {err}"
            raise StartupError(Exit.ADDRESS_OTHER, message, where) from None
        return endpoint

    def _apply_document(self, document: dict[str, Any]) -> tuple[DesiredState, Outcome]:
        """Validate and apply a document an edit produced: only its changed rules are
        checked and planned (it keeps the other rules' very objects)."""
        change = self._effective(self.tracker.check_document(document))
        outcome = self._apply_change(change)
        self.tracker.accept(change)
        _log_changes(change, "a nat-gateway.sh call")
        self.metrics.state_changes.labels("delta" if outcome.by_delta else "full").inc()
        self._unverified |= outcome.by_delta
        return change.state, outcome

    def _apply_edit(self, document: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            state, outcome = self._apply_document(document)
        except (NftError, OSError) as err:
            self._failed(f"applying an edit failed: {err}")
            raise
        assert self.edits is not None
        # The hash of the whole document would cost a serialization of it per call: the
        # line names the file the calls extend (None before `init` wrote one) and how many
        # were logged on it before this one; /readyz has the hash.
        extends, logged = self.edits.logged_on()
        with self.published:
            self._count(outcome)
            self.progress.applied_at = time.time()
            self._count_rules(state)
            self.metrics.show_timeout_policies(self.reconciler.timeout_policies)
            self._applied_to_members(state, None, outcome.complete)  # the digest once the call is recorded
            self._finished(outcome, started, {"state_sha256": extends and extends[:12], "calls_logged_before": logged})

    def _effective(self, change: Change) -> Change:
        """The change with the state to apply: scaled out over the discovered members when
        the HA controller discovers them (HaController.effective)."""
        if self.ha is None:
            return change
        state = self.ha.effective(change.state, change.validated.document)
        if state is change.state:
            return change
        return replace(change, validated=replace(change.validated, state=state))

    def _apply_members(self) -> None:
        """The discovered members changed: the accepted document again, with the new list
        (keepalived reloads; the table changes only if the groups did)."""
        accepted = self.tracker.accepted
        if accepted is None or self.ha is None:
            return
        change = replace(accepted, delta=None, base=accepted.state, journal=[])
        change = self._effective(change)
        if change.state is accepted.state:
            return
        started = time.monotonic()
        try:
            outcome = self._apply_change(change)
        except (NftError, OSError) as err:
            self._failed(f"applying the discovered members failed: {err}")
            return
        self.tracker.accept(change)
        with self.published:
            self._count(outcome)
            self._applied_to_members(change.state, self.applied_sha256(), outcome.complete)
            self._finished(outcome, started, {"members": "discovered"})

    def _count_rules(self, state: DesiredState) -> None:
        for kind, rules in (("snat", state.snat), ("dnat", state.dnat), ("fip", state.fip)):
            self.metrics.rules.labels(kind).set(len(rules))

    def _apply_change(self, change: Change) -> Outcome:
        """Apply a checked change, listening for /metrics only where it allows: closed
        before the change where it forbids (the address becomes an EIP or external),
        opened once it is applied where it allows."""
        self._follow_listeners(change.state, widen=False)
        outcome = self.reconciler.apply(change.state, change.delta, change.base)
        self.port_blocks.applied(change.state, time.time())
        self._follow_listeners(change.state, widen=True)
        return outcome

    def _follow_listeners(self, state: DesiredState, widen: bool, reread: bool = False) -> None:
        """natgwd.runtime.listeners.MetricsListeners.follow, and the untracked endpoints with
        it: before an apply, its table has them; after one, they are applied at once (a
        full plan of the same state: the chains alone change)."""
        if self.listeners.follow(state, widen, reread):
            self.reconciler.set_untracked(own_endpoints(self.listeners.addresses, self.edits is not None))
            if widen:
                self.reconciler.apply(state)

    def _edits_written(self, data: bytes) -> None:
        """The edit service rewrote the state file as the applied document: no change to
        apply (the watcher's recheck re-reads it quietly)."""
        digest = hashlib.sha256(data).hexdigest()
        with self.published:
            self.file.last_read, self._applied_digest = Content(data, digest), digest
            self.progress.applied_at = time.time()
            self.file.poll()
            self.record.write(data, digest, self.progress.applied_at)

    def resync(self) -> None:
        self._next_resync = time.monotonic() + self.config.resync_interval
        if self.reconciler.state is None:
            return
        if self._unverified:
            self._verify_deltas()
        started = time.monotonic()
        try:
            # eth0's addresses may have changed since the last apply.
            self._follow_listeners(self.reconciler.state, widen=True, reread=True)
            outcome = self.reconciler.resync()
        except (NftError, OSError) as err:
            self._failed(f"resync failed: {err}")
            return
        self._count(outcome)
        if (effective := self.applied_sha256()) is not None:
            # Retries what waits on the kernel (the sync interface's address, a complete apply).
            self._applied_to_members(self.reconciler.state, effective, outcome.complete)
        last = self.file.last_read
        if (last.digest if isinstance(last, Content) else last) == self._applied_digest:
            self._finished(outcome, started, None)

    def _applied_to_members(self, state: DesiredState, digest: str | None, complete: bool) -> None:
        """The HA pair first: it decides which EIPs this member owns, which the speaker
        then announces."""
        if self.ha is not None:
            self.ha.applied(state, digest, complete)
        if self.bgp is not None:
            self.bgp.applied(state, complete)

    def _verify_deltas(self) -> None:
        """Validate and plan the applied document in full, off the path of changes, and
        compare with what the changes made of it. A difference is a bug: it is logged,
        counted, and the file is applied again on the full path."""
        self._unverified = False
        accepted = self.tracker.accepted
        if accepted is None:
            return
        try:
            full = validate_document(accepted.validated.document)
            state = full.state
            if self.ha is not None and state.scale_out is None and accepted.state.scale_out is not None:
                state = replace(state, scale_out=accepted.state.scale_out)  # discovered, not in the document
            same = state == accepted.state and self.reconciler.verify_plan(state)
        except InvalidStateError as err:
            full, same = None, False
            log.error("the applied document fails a full validation", problems=[str(p) for p in err.problems[:5]])
        if same:
            return
        self.metrics.delta_mismatches.inc()
        log.error("a change applied rule by rule differs from the full path; applying the state file in full")
        self.tracker.forget()
        self.reconcile_file(Reading.FORCED)

    def _count(self, outcome: Outcome) -> None:
        for reason, count in outcome.conntrack_deleted.items():
            self.metrics.conntrack_deleted.labels(reason).inc(count)
        for resource, count in outcome.repairs.items():
            log.warning("drift repaired", resource=str(resource), changes=count)
            self.metrics.drift_repairs.labels(resource).inc(count)

    def applied_sha256(self) -> str | None:
        """The sha256 of what is applied: the state file's, or with nat-gateway.sh calls
        applied on top of it (or before there is a file), that of the file folding them in
        will write."""
        effective = self.edits.applied_digest() if self.edits is not None else None
        return effective or self._applied_digest

    def _finished(self, outcome: Outcome, started: float, applied: dict[str, Any] | None) -> None:
        """`applied`: what the "desired state applied" line names (None: a resync, no line)."""
        seconds = time.monotonic() - started
        self.metrics.interfaces_missing.set(len(outcome.missing_interfaces))
        self.metrics.nft_elements.set(self.reconciler.element_count)

        if outcome.complete:
            self.progress.not_ready = None
            if not self._told_ready:
                self.notifier.send("READY=1")
                self._told_ready = True
            self.retry.reset()
            self.metrics.last_success.set(time.time())
            self.metrics.reconcile_duration.observe(seconds)
        else:
            waiting = [f"interface {name} does not exist" for name in outcome.missing_interfaces]
            self.progress.not_ready = "; ".join(waiting + outcome.link_errors + outcome.qos_errors)
            self.retry.schedule()
        if applied is not None:
            self.metrics.reconciles.labels("applied").inc()
            log.info(
                "desired state applied",
                **applied,
                complete=outcome.complete,
                nft_operations=outcome.nft_operations,
                changed_elements=outcome.changed_elements,
                link_changes=len(outcome.link_changes),
                missing_interfaces=outcome.missing_interfaces,
                seconds=round(seconds, 4),
            )

    def _rejected(self, problems: list[Problem], seen: LastRead, skipped: str | None = None) -> None:
        self.file.last_read = seen
        self.retry.cancel()  # nothing to retry until the file changes
        self.metrics.desired_state_valid.set(0)
        self.metrics.reconciles.labels("invalid").inc()
        listed = "; ".join(str(p) for p in problems[:5])
        path = str(self.config.state_path)
        extra = {"skipped": skipped} if skipped else {}
        if self._applied_digest is None:
            self.progress.not_ready = f"no state applied yet; waiting for {path}: {listed}"
            log.error(
                "desired state rejected; no state applied yet", path=path, problems=[str(p) for p in problems], **extra
            )
            return
        self.progress.not_ready = f"desired state rejected; the last good state stays applied: {listed}"
        log.error(
            "desired state rejected; keeping the last good state",
            path=path,
            problems=[str(p) for p in problems],
            applied_sha256=self._applied_digest,
            **extra,
        )

    def _failed(self, reason: str) -> None:
        self.metrics.reconciles.labels("error").inc()
        self.progress.not_ready = reason
        log.error("reconcile failed", reason=reason, retry_in=self.retry.delay)
        self.retry.schedule()

    def _counting_sets(self) -> Listings:
        try:
            return self.reconciler.counting_sets()
        except NftError as err:
            log.error("reading counters failed", error=str(err))
            return {}


def _log_changes(change: Change, source: str) -> None:
    """Which rules and EIPs an applied change added, changed and removed, by name."""
    names = changed_names(change.base, change.state, change.delta)
    if any(names.values()):
        log.info("desired state changed", source=source, **names)


def own_endpoints(metrics: Sequence[tuple[str, int]], edits: bool) -> tuple[Endpoint, ...]:
    """natgwd's listening addresses, to keep out of conntrack: /metrics where it is bound
    (on every address: its loopback ones only, never the EIPs, which NAT needs tracked),
    and the edit endpoint's loopback address (whatever its port, which may change with
    every start: the rules stay the same, and a restart changes nothing in the table)."""
    found: list[Endpoint] = []
    for host, port in metrics:
        address = ip_address(host)
        loopback: list[IPv4Address | IPv6Address] = [IPv4Address("127.0.0.1"), IPv6Address("::1")]
        found += [(a, port) for a in (loopback if address.is_unspecified else [address])]
    if edits:
        found.append((IPv4Address(EDIT_ADDRESS), None))
    return tuple(found)


class _WakingEvent(threading.Event):
    """An event that also wakes the daemon's loop when set (from any thread)."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake_loop = wake

    def set(self) -> None:
        super().set()
        self._wake_loop.set()
