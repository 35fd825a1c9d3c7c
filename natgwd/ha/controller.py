"""An HA member: natgwd's side of an active/standby pair.

After each apply the daemon hands the state over (`applied`). With an `ha` section this
writes keepalived.conf and conntrackd.conf, keeps both running under the Supervisor
(conntrackd first, so it syncs before keepalived can make this member active) and reacts
to keepalived's role changes, which arrive as lines on its notify FIFO:

- becoming master: make the kernel's table, the peer's injected connections included,
  conntrackd's own (`-f internal`, `-R`), then gratuitous ARP for every moved address;
- becoming backup (or fault): `-n` (ask the master for its table).

keepalived starts only after the first complete apply: a member never takes the addresses
before its nftables table and routes are in place. A standby keeps table and routes
loaded, so a takeover only moves addresses.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from natgwd.bgp.ownership import NOTHING, Claims
from natgwd.ha.announce import ActiveAnnouncer, Send
from natgwd.ha.autoscale import auto_scale_out, unsupported
from natgwd.ha.conntrackd import BACKUP_COMMANDS, MASTER_COMMANDS, Conntrackd
from natgwd.ha.discovery import MemberDiscovery
from natgwd.ha.metrics import HaCollector, HaMetrics, HaSnapshot
from natgwd.ha.notify import NotifyFifo
from natgwd.ha.peer import PeerCheck
from natgwd.ha.render import INSTANCE, HaPaths, conntrackd_conf, keepalived_conf
from natgwd.ha.roles import CONNTRACKD, KEEPALIVED, Event, Role
from natgwd.ha.scale import ScaleController
from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.process.supervisor import ChildSpec, Supervisor, remove_stale
from natgwd.state.ha import HELLO_PORT, HaConfig, HaMember, virtual_addresses
from natgwd.state.model import DesiredState
from natgwd.state.problems import Problem
from natgwd.state.scaleout import ScaleOutConfig

log = structlog.get_logger("natgwd.ha.controller")


@dataclass(frozen=True)
class Binaries:
    """The programs' names or paths (not the children's names, though they read the same)."""

    keepalived: str = "keepalived"
    conntrackd: str = "conntrackd"


@dataclass(frozen=True)
class HaKernel:
    """What a member asks of the kernel, passed in as the reconciler's shells are (tests
    pass fakes): the IPv4 addresses on an interface, liberal TCP window tracking set
    (True when it was not), gratuitous ARP for addresses taken over; scaled out, a
    group's hand-over route (table, via or None, interface) and ICMP redirects off for a
    scope (True when they were on), and the BFD gate on an interface opened (True), closed
    (False) or only read (None), which answers whether it is open (natgwd.planning.bfdgate);
    all raise OSError (the gate also NftError)."""

    addresses: Callable[[str], list[IPv4Address]]
    tcp_liberal: Callable[[], bool]
    garp: Send
    handover_route: Callable[[int, IPv4Address | None, str], None]
    no_redirects: Callable[[str], bool]
    bfd_gate: Callable[[str, bool | None], bool]


class HaController:
    def __init__(
        self,
        run_dir: Path,
        on_garp_sent: Callable[[str, int], None],
        registry: CollectorRegistry,
        kernel: HaKernel,
        binaries: Binaries = Binaries(),
        discovery_scope: str | None = None,
    ) -> None:
        """`discovery_scope`: the Deployment whose replica this is (natgwd.ha.hello): a state
        without a scaleOut or ha section is scaled out over the members found on the LAN."""
        self.paths = HaPaths(run_dir)
        self.binaries = binaries
        self._kernel = kernel
        self._conntrackd = Conntrackd(binaries.conntrackd, self.paths.conntrackd_conf)
        self._fifo = NotifyFifo(self.paths.notify_fifo, self._on_instance_notice)
        self._announcer = ActiveAnnouncer(lambda: self._role == Role.MASTER, kernel.garp, on_garp_sent)
        self._master_since: float | None = None  # monotonic
        self.metrics = HaMetrics(registry, self._configured)
        registry.register(HaCollector(self._snapshot))
        self._supervisor: Supervisor | None = None
        self._lock = threading.RLock()
        self._state: DesiredState | None = None
        self._digest: str | None = None
        # With nat-gateway.sh calls applied on top of the state file: makes the digest of
        # what is applied (a serialization of the whole document), asked only when the
        # peer check needs it, never per call.
        self._digest_of: Callable[[], str | None] | None = None
        self._members: tuple[HaMember, HaMember] | None = None
        self._written: dict[Path, str] = {}
        self._keepalived_started = False
        self._peer = PeerCheck()
        self._problem: str | None = None
        self._role = Role.INIT
        self._resync: Callable[[], None] = lambda: None
        self._role_listeners: list[Callable[[], None]] = []
        # A scaled-out member (the `scaleOut` section) shares the run directory, the
        # notify FIFO and the supervisor.
        self.scale = ScaleController(
            self.paths,
            ScaleMetrics(registry, self._scaled_out),
            binaries.keepalived,
            binaries.conntrackd,
            kernel.garp,
            on_garp_sent,
            kernel.handover_route,
            kernel.addresses,
            kernel.no_redirects,
            kernel.bfd_gate,
        )
        self.discovery = (
            MemberDiscovery(discovery_scope, self.scale.metrics, self.paths.directory) if discovery_scope else None
        )
        self._not_scaled: str | None = None  # why a state was not scaled out automatically

    # --- the daemon's calls ------------------------------------------------------------

    def start(self, resync: Callable[[], None], members_changed: Callable[[], None] = lambda: None) -> None:
        """`resync` asks the daemon to put routes back at once: the kernel drops every
        route through an interface whose last address keepalived just removed.
        `members_changed`: the discovered members changed (the daemon applies `effective`
        of its state again)."""
        self._resync = resync
        self._supervisor = Supervisor()
        self.scale.start(self._supervisor, self._write, lambda: self._conntrackd.run(MASTER_COMMANDS))
        if self.discovery is not None:
            self.discovery.start(members_changed)

    def effective(self, state: DesiredState, document: object) -> DesiredState:
        """The state to apply for the document `state` was validated from: with discovery on,
        a document without its own scaleOut or ha section (the pair of issue 14) is scaled
        out over the members discovered so far (natgwd.ha.autoscale); else `state` itself."""
        discovery = self.discovery
        if discovery is None or not isinstance(document, dict) or "scaleOut" in document or "ha" in document:
            return state
        try:
            config = self._discovered(discovery, state)
        except Exception:  # discovery must not take the daemon down; the last settings stay
            log.exception("cannot derive the scale-out settings of the discovered members")
            return state
        return state if config == state.scale_out else replace(state, scale_out=config)

    def stop(self) -> None:
        """Stop keepalived (it gives the addresses up at once: priority 0) and conntrackd."""
        if self.discovery is not None:
            self.discovery.stop()
        with self._lock:
            self.scale.stop()
            self._stop_member()
            if self._supervisor is not None:
                self._supervisor.stop()

    def applied(self, state: DesiredState, digest: str | None, complete: bool) -> None:
        """`digest`: the sha256 of what is applied (None: told later, by applied_digest)."""
        with self._lock:
            self._state = state
            if digest is not None:
                self._digest, self._digest_of = digest, None
            if state.scale_out is not None:
                self._stop_member()
                self.paths.directory.mkdir(parents=True, exist_ok=True)
                self._fifo.ensure()
                self._liberal()
                self.scale.applied(state, complete)
                return
            self.scale.leave()
            ha = state.ha
            if ha is None:
                self._stop_member()
                return
            if not complete and not self._keepalived_started:
                self._problem = "waiting for the first complete apply before starting keepalived"
                return
            members = self._resolve(ha)
            if members is None:
                return
            self._problem = None
            self._liberal()
            self._run(state, ha, *members)

    def applied_digest(self, digest_of: Callable[[], str | None]) -> None:
        """What is applied changed with no new state to act on (nat-gateway.sh calls
        recorded): `digest_of()` is its sha256, asked for when a hello goes to the peer or
        the peer check is read (a controller's replay must not pay a whole document's
        serialization per call)."""
        with self._lock:
            self._digest_of = digest_of

    def _current_digest(self) -> str | None:
        digest_of = self._digest_of
        if digest_of is not None:
            self._digest = digest_of()  # made once per document (natgwd.kubeovn.shim.service)
        return self._digest

    def check(self, state: DesiredState) -> list[Problem]:
        """What makes `state` unusable on this member, before anything is applied."""
        return self.scale.check(state)

    def readiness(self) -> tuple[str | None, dict[str, Any]]:
        with self._lock:
            state = self._state
            if state is not None and state.scale_out is not None:
                return self.scale.readiness()
            if self.discovery is not None and self._not_scaled is not None:
                return None, {"scale_out": {"members_from": "discovery", "not_scaled_out": self._not_scaled}}
            if state is None or state.ha is None:
                return None, {}
            detail: dict[str, Any] = {"role": str(self._role)}
            if self._members is not None:
                me, peer = self._members
                detail.update(me=str(me.address), peer=str(peer.address))
            view = self._peer.view()
            if view is not None:
                detail.update(peer_reachable=view.reachable, peer_role=view.role, peer_sha256=view.sha256)
            reasons = [self._problem] if self._problem else []
            statuses = self._supervisor.statuses() if self._supervisor else {}
            for name in self._wanted_children(state.ha):
                status = statuses.get(name)
                if status is None or not status.up:
                    restarts = status.restarts if status else 0
                    reasons.append(f"{name} is not running (restarts: {restarts})")
            return "; ".join(reasons) or None, {"ha": detail}

    # --- who owns the EIPs (natgwd.bgp.ownership) ------------------------------------

    def claims(self, state: DesiredState) -> Claims:
        """The active member owns every EIP, the standby stands by for every one; a gateway
        without an ha section is alone and owns them all."""
        names = frozenset(e.name for e in state.eips)
        if state.ha is None or self._role == Role.MASTER:
            return Claims(names)
        if self._role == Role.BACKUP:
            return Claims(frozenset(), names)
        return NOTHING  # init, fault, stopped: whoever announces, not this member

    def on_change(self, callback: Callable[[], None]) -> None:
        self._role_listeners.append(callback)

    def member_address(self) -> IPv4Address | None:
        members = self._members
        return members[0].address if members else None

    def _tell_role_listeners(self) -> None:
        for listener in self._role_listeners:
            listener()

    # --- pieces ---------------------------------------------------------------------

    def _discovered(self, discovery: MemberDiscovery, state: DesiredState) -> ScaleOutConfig | None:
        """The settings discovery gives `state`, None when it cannot be scaled out (then it
        runs as a single gateway; readiness says why)."""
        interface = state.internal.interface
        reason = unsupported(state)
        own: IPv4Address | None = None
        if reason is None:
            try:
                present = set(self._kernel.addresses(interface))
            except OSError as err:
                present, reason = set(), f"cannot read the addresses of {interface}: {err}"
            # The pod's LAN address: the one `init` put in the state, else one in its subnet.
            ours = [a for a in state.internal.addresses if isinstance(a, IPv4Interface)]
            exact = [a.ip for a in ours if a.ip in present]
            near = sorted(p for p in present if any(p in a.network for a in ours))
            found = exact or near
            own = found[0] if found else None
            if own is None and reason is None:
                reason = f"no address of {interface} is in internal.addresses"
        if reason != self._not_scaled:
            if reason is not None:
                log.warning("not scaled out: running as a single gateway", reason=reason)
            self._not_scaled = reason
        if own is None:
            return None
        discovery.follow(interface, own)
        view = discovery.view()
        return auto_scale_out(state, view.members, discovery.scope, view.settled)

    def _resolve(self, ha: HaConfig) -> tuple[HaMember, HaMember] | None:
        """Which member this is, by the addresses on the sync interface."""
        try:
            present = self._kernel.addresses(ha.interface)
        except OSError as err:
            self._problem = f"cannot read the addresses of {ha.interface}: {err}"
            return None
        members = ha.member_on(present)
        if members is None:
            wanted = " or ".join(str(m.address) for m in ha.members)
            self._problem = f"sync interface {ha.interface} holds neither ha.members address ({wanted})"
            log.error("HA member unknown", interface=ha.interface, wanted=wanted, present=[str(a) for a in present])
            return None
        if members != self._members:
            log.info("HA member", me=str(members[0].address), peer=str(members[1].address))
            self._peer.stop()
            self._members = members
        return members

    def _run(self, state: DesiredState, ha: HaConfig, me: HaMember, peer: HaMember) -> None:
        assert self._supervisor is not None
        paths = self.paths
        paths.directory.mkdir(parents=True, exist_ok=True)
        self._fifo.ensure()
        ctd_text = conntrackd_conf(ha, me, peer, paths)
        self._write(paths.conntrackd_conf, ctd_text)
        if ha.conntrack_sync:
            # The config's digest in the spec: a changed config restarts conntrackd.
            version = hashlib.sha256(ctd_text.encode()).hexdigest()[:12]
            self._supervisor.run(
                ChildSpec(
                    CONNTRACKD,
                    (self.binaries.conntrackd, "-C", str(paths.conntrackd_conf)),
                    prepare=lambda: remove_stale(paths.conntrackd_lock),
                    version=version,
                )
            )
        else:
            self._supervisor.remove(CONNTRACKD)
        text = keepalived_conf(ha, me, peer, virtual_addresses(state), paths, state.internal.interface)
        changed = self._write(paths.keepalived_conf, text)
        if not self._keepalived_started:
            self._supervisor.run(
                ChildSpec(
                    KEEPALIVED,
                    (
                        self.binaries.keepalived,
                        *("--vrrp", "--dont-fork", "--log-console", "--log-detail"),
                        *("-f", str(paths.keepalived_conf)),
                        *("-p", str(paths.keepalived_pid), "-r", str(paths.vrrp_pid)),
                    ),
                    prepare=self._clear_keepalived_pids,
                ),
                on_exit=self._keepalived_exited,
            )
            self._keepalived_started = True
        elif changed:
            # A reload, not a restart: a restart would give the addresses up.
            log.info("reloading keepalived for the new addresses")
            self._supervisor.signal(KEEPALIVED, 1)  # SIGHUP
        self._peer.start(ha.interface, me.address, peer.address, HELLO_PORT, self._hello, self._peer_returned)
        self._peer.tell(self._current_digest())

    def _liberal(self) -> None:
        try:
            if self._kernel.tcp_liberal():
                log.info("TCP window tracking set liberal for HA")
        except OSError as err:
            # Read-only /proc/sys: the pod's securityContext.sysctls sets it (deploy/).
            log.warning("cannot set TCP window tracking liberal", error=str(err))

    def _write(self, path: Path, text: str) -> bool:
        if self._written.get(path) == text:
            return False
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self._written[path] = text
        return True

    def _on_instance_notice(self, instance: str, notice: Role | Event) -> None:
        if instance == INSTANCE:
            self._on_notice(notice)
        else:
            self.scale.on_role(instance, notice)

    def _on_notice(self, notice: Role | Event) -> None:
        if notice is Event.HEALED:
            log.warning("the peer was active too (split brain); it yields now, this member stays active")
            self._announce_all()
            return
        role = Role(notice)
        with self._lock:
            previous, self._role = self._role, role
            state = self._state
            self._master_since = time.monotonic() if role == Role.MASTER else None
        log.info("HA role changed", role=str(role), previous=str(previous))
        self._tell_role_listeners()
        self._resync()
        self.metrics.role_changed(role)
        if state is None or state.ha is None:
            return
        if role == Role.MASTER:
            if state.ha.conntrack_sync:
                started = time.monotonic()
                self._conntrackd.run(MASTER_COMMANDS)
                self.metrics.takeover_seconds.set(time.monotonic() - started)
            self._announce_all()
        elif role in (Role.BACKUP, Role.FAULT) and state.ha.conntrack_sync:
            self._conntrackd.run(BACKUP_COMMANDS)

    def _peer_returned(self, silent_since: float) -> None:
        """The peer is heard again after a silence. It may have taken the addresses
        meanwhile (a cut sync link): if this member was active all along, upstream and the
        VMs may still send to the peer's MAC, and keepalived announces again only if it
        happens to hear the peer's lower priority before the peer yields. So announce here
        too. A member that became active during the silence is the one about to yield: it
        must not announce.
        (Not `conntrackd -n` to pull the peer's connections: injecting the peer's copy over
        this member's live entries stalled every TCP flow for seconds, measured; the peer's
        FTFW resend queue delivers what it sent into the cut link anyway.)"""
        with self._lock:
            since = self._master_since
        log.warning("the peer is reachable again", role=str(self._role))
        if since is not None and since <= silent_since:
            self._announce_all()

    def _announce_all(self) -> None:
        state = self._state
        if state is None:
            return
        self._announcer.request({name: [a.ip for a in values] for name, values in virtual_addresses(state).items()})

    def _hello(self) -> tuple[str | None, str]:
        digest = self._current_digest()
        self._peer.tell(digest)  # said in the log once the peer's answer to it comes
        return digest, str(self._role)

    def _scaled_out(self) -> bool:
        state = self._state
        return state is not None and state.scale_out is not None

    def _configured(self) -> bool:
        state = self._state  # one read: the scrape thread does not take the lock for it
        return state is not None and state.ha is not None

    def _snapshot(self) -> HaSnapshot | None:
        with self._lock:
            state = self._state
            scaled = state is not None and state.scale_out is not None and self._supervisor is not None
        if scaled:
            assert self._supervisor is not None
            statuses = self._supervisor.statuses()
            conntrackd = statuses.get(CONNTRACKD)
            stats = self._conntrackd.stats() if conntrackd is not None and conntrackd.up else None
            return HaSnapshot(statuses, None, None, stats, self._supervisor.errors)
        with self._lock:
            if state is None or state.ha is None or self._supervisor is None:
                return None
            digest = self._current_digest()
            self._peer.tell(digest)
            statuses = self._supervisor.statuses()
            errors = self._supervisor.errors
            view = self._peer.view()
            match = self._peer.same_state(digest)
        conntrackd = statuses.get(CONNTRACKD)
        stats = self._conntrackd.stats() if conntrackd is not None and conntrackd.up else None
        return HaSnapshot(statuses, bool(view and view.reachable), bool(match), stats, errors)

    def _wanted_children(self, ha: HaConfig) -> list[str]:
        if not self._keepalived_started:
            return []
        return [KEEPALIVED, CONNTRACKD] if ha.conntrack_sync else [KEEPALIVED]

    def _keepalived_exited(self, _name: str, _code: int) -> None:
        # keepalived killed hard leaves its addresses behind; the next one removes them
        # as it starts (it enters BACKUP by removing every configured address).
        # Not under self._lock: the supervisor thread calls this, and _stop_member holds the
        # lock while it waits for that thread.
        self._role = Role.INIT
        self.metrics.set_role(Role.INIT)
        self._tell_role_listeners()

    def _clear_keepalived_pids(self) -> None:
        # keepalived refuses to start while its pid file names a live process, and a
        # killed keepalived's pid may be reused by anything.
        for path in (self.paths.keepalived_pid, self.paths.vrrp_pid):
            remove_stale(path)

    def _stop_member(self) -> None:
        if self._supervisor is not None and self._keepalived_started:
            self._supervisor.remove(KEEPALIVED)
            self._supervisor.remove(CONNTRACKD)
            # keepalived took its addresses along, the ones natgwd now configures itself
            # without an `ha` section included: put them back.
            self._resync()
        self._keepalived_started = False
        self._peer.stop()
        self._members = None
