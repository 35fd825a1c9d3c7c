"""A member of a scaled-out gateway (the `scaleOut` section; docs/scaling-out.md).

After each apply, HaController hands the state over here. This writes keepalived.conf
(one VRRP instance per EIP group) and conntrackd.conf, keeps both running under HaController's
Supervisor (conntrackd first), and keeps each group's hand-over table pointing at the
group's owner:

- this member became master of a group (a line on the notify FIFO): the group's table is
  emptied (its packets are translated here), its EIPs announced;
- another member advertises as a group's master (natgwd.ha.adverts): the group's table
  routes to that member's LAN address.

The groups' EIPs this member holds are published on `ownership` for announcements.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import structlog

from natgwd.ha.adverts import AdvertListener
from natgwd.ha.announce import ActiveAnnouncer, Send
from natgwd.ha.ownership import Ownership
from natgwd.ha.render import HaPaths
from natgwd.ha.roles import CONNTRACKD, KEEPALIVED, Event, Role
from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.ha.scale_render import conntrackd_conf, group_of_instance, instance_name, keepalived_conf
from natgwd.process.supervisor import ChildSpec, ChildStatus, Supervisor, remove_stale
from natgwd.state.model import DesiredState
from natgwd.state.problems import Problem
from natgwd.state.scaleout import EipGroup, ScaleOutConfig

log = structlog.get_logger("natgwd.ha.scale")

# A member is seen while its adverts keep coming; backups send none, so a member that owns
# nothing is not seen (the metric says so).
SEEN_SECONDS = 3.0
# How often the BFD gate follows `serving` (OVN's BFD detection takes longer anyway).
GATE_PERIOD = 0.2
# An engine counts as running for the gate only once it has run this long: one that exits
# at once on every start is "running" between its start and the supervisor's next look,
# which opened the gate for a moment on every restart.
GATE_ENGINE_SETTLE_SECONDS = 1.0
GATE_VERIFY_TURNS = 10  # the kernel's gate read back every 2 s (a table deleted by hand comes back closed)


@dataclass(frozen=True)
class Member:
    config: ScaleOutConfig
    index: int

    @property
    def address(self) -> IPv4Address:
        return self.config.members[self.index]


def group_addresses(state: DesiredState, config: ScaleOutConfig) -> dict[int, tuple[IPv4Interface, ...]]:
    """Per group, the addresses its owner holds on the external interface: its EIPs, and
    for group 0 also the gateway's own external addresses."""
    addresses: dict[int, list[IPv4Interface]] = {g.index: [] for g in config.groups}
    if config.discovery_scope is None:
        # Discovered members are kube-ovn-controller's replicas: each keeps the external
        # address its own pod network gave it.
        addresses[0] += [a for a in state.external.addresses if isinstance(a, IPv4Interface)]
    for eip in state.eips:
        group = config.group_of(eip.name)
        addresses[group.index] += [a for a in state.eip_interfaces(eip) if isinstance(a, IPv4Interface)]
    return {index: tuple(dict.fromkeys(values)) for index, values in addresses.items()}


class ScaleController:
    def __init__(
        self,
        paths: HaPaths,
        metrics: ScaleMetrics,
        keepalived: str,
        conntrackd: str,
        garp: Send,
        on_garp_sent: Callable[[str, int], None],
        set_route: Callable[[int, IPv4Address | None, str], None],
        addresses_of: Callable[[str], list[IPv4Address]],
        no_redirects: Callable[[str], bool],
        bfd_gate: Callable[[str, bool | None], bool],
        listen: Callable[[str, Callable[[IPv4Address, int, int], None]], AdvertListener] = AdvertListener,
    ) -> None:
        self.paths = paths
        self.metrics = metrics
        self.ownership = Ownership()
        self._keepalived, self._conntrackd = keepalived, conntrackd
        self._garp, self._on_garp_sent = garp, on_garp_sent
        self._set_route = set_route
        self._addresses_of = addresses_of
        self._no_redirects = no_redirects
        self._listen = listen
        self._bfd_gate = bfd_gate
        self._gate: tuple[str, bool] | None = None  # (interface, open) as last written
        self._gate_stop = threading.Event()
        self._gate_lock = threading.Lock()
        self._gate_error: str | None = None  # the last failure to switch it, logged once
        self._lock = threading.RLock()
        self._supervisor: Supervisor | None = None
        self._state: DesiredState | None = None
        self._member: Member | None = None
        self._problem: str | None = None
        self._keepalived_started = False
        self._roles: dict[int, Role] = {}  # this member's VRRP role per group
        self._owners: dict[int, IPv4Address] = {}  # each group's owner as last heard
        self._routes: dict[int, IPv4Address | None] = {}  # what each hand-over table holds
        self._seen: dict[IPv4Address, float] = {}
        self._listener: AdvertListener | None = None
        self._announcers: dict[int, ActiveAnnouncer] = {}
        self._write: Callable[[Any, str], bool] = lambda _path, _text: True
        self._on_takeover: Callable[[], None] = lambda: None
        metrics.members_seen.set_function(self.members_seen)

    # --- HaController's calls ----------------------------------------------------------

    def start(
        self,
        supervisor: Supervisor,
        write: Callable[[Any, str], bool],
        on_takeover: Callable[[], None],
    ) -> None:
        """`on_takeover`: run when this member becomes a group's master (conntrackd's
        commands that make the kernel's table, the dead owner's injected connections
        included, its own, so that it hands them on to a member that returns)."""
        self._supervisor, self._write, self._on_takeover = supervisor, write, on_takeover
        threading.Thread(target=self._watch_gate, name="bfd-gate", daemon=True).start()

    def stop(self) -> None:
        """natgwd stops: the gate closes (OVN stops routing to this member) before the
        member leaves."""
        self._gate_stop.set()
        with self._lock:
            state = self._state
            if state is not None and state.scale_out is not None:
                self._write_gate(state.internal.interface, False)
        self.leave()

    def check(self, state: DesiredState) -> list[Problem]:
        """What makes `state` unusable on this member (it is then not applied)."""
        config = state.scale_out
        if config is None:
            return []
        try:
            present = self._addresses_of(config.interface)
        except OSError as err:
            return [Problem("$.scaleOut.interface", f"cannot read the addresses of {config.interface}: {err}")]
        if config.member_on(present) is None:
            here = ", ".join(str(a) for a in present) or "none"
            return [
                Problem(
                    "$.scaleOut.members",
                    f"lists no address of this member (on {config.interface}: {here}); "
                    "every member must find itself in the list, exactly once",
                )
            ]
        return []

    def applied(self, state: DesiredState, complete: bool) -> None:
        config = state.scale_out
        assert config is not None and self._supervisor is not None
        with self._lock:
            self._state = state
            if not complete and not self._keepalived_started:
                self._problem = "waiting for the first complete apply before starting keepalived"
                return
            if not config.settled and not self._keepalived_started:
                # keepalived starts with the members already there as peers, as a backup.
                heard = len(config.members) - 1
                self._problem = f"discovering the other members on {config.interface} (heard so far: {heard})"
                return
            index = config.member_on(self._addresses_of(config.interface))
            if index is None:
                self._problem = f"no scaleOut.members address is on {config.interface}"
                return
            member = Member(config, index)
            if self._member is not None and self._member != member and not self._same_seat(self._member, member):
                self.leave()
            self._member, self._problem = member, None
            self._redirects_off(config.interface)
            self._run(state, member)
            self._publish()

    @staticmethod
    def _same_seat(old: Member, new: Member) -> bool:
        """Discovered members came or went, or the groups' EIPs changed: keepalived reloads
        (every group keeps its owner until the election says otherwise), conntrackd runs on
        (its multicast configuration names no member)."""
        return (
            old.config.discovery_scope is not None
            and new.config.discovery_scope == old.config.discovery_scope
            and old.address == new.address
            and old.config.interface == new.config.interface
            and len(old.config.groups) == len(new.config.groups)
        )

    def leave(self) -> None:
        """Stop being a member: keepalived (it gives the addresses up) and conntrackd stop,
        the hand-over tables are emptied."""
        with self._lock:
            if self._supervisor is not None and self._keepalived_started:
                self._supervisor.remove(KEEPALIVED)
                self._supervisor.remove(CONNTRACKD)
            self._keepalived_started = False
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
            member = self._member
            for index in list(self._routes):
                if member is not None and index < len(member.config.groups):
                    self._route(member.config.groups[index], None)
            self._routes.clear()
            self._roles.clear()
            self._owners.clear()
            self._member = None
            self.ownership.set(frozenset())

    def readiness(self) -> tuple[str | None, dict[str, Any]]:
        with self._lock:
            member = self._member
            detail: dict[str, Any] = {}
            config = self._state.scale_out if self._state is not None else None
            if member is None and config is not None:  # e.g. within the discovery window
                detail = {
                    "members": [str(a) for a in config.members],
                    "members_from": "state" if config.discovery_scope is None else "discovery",
                }
            if member is not None:
                detail = {
                    "me": str(member.address),
                    "members": [str(a) for a in member.config.members],
                    # Where the member list came from: the state's scaleOut section, or
                    # hellos on the LAN (kube-ovn-controller's Deployment).
                    "members_from": "state" if member.config.discovery_scope is None else "discovery",
                    "owned_groups": sorted(instance_name(g) for g in member.config.groups if self._owns(g)),
                    "owned_eips": sorted(self.ownership.owned()),
                    "owners": {
                        instance_name(g): str(self._owner(g)) if self._owner(g) else None for g in member.config.groups
                    },
                    "members_seen": self.members_seen(),
                }
            reasons = [self._problem] if self._problem else []
            statuses = self._supervisor.statuses() if self._supervisor else {}
            for name in self._wanted_children():
                status = statuses.get(name)
                if status is None or not status.up:
                    reasons.append(f"{name} is not running (restarts: {status.restarts if status else 0})")
            return "; ".join(reasons) or None, {"scale_out": detail}

    def serving(self) -> bool:
        """Ready to forward as a member: readiness says so (state applied, keepalived and
        conntrackd up, past the discovery window), the engines have run for a moment
        (GATE_ENGINE_SETTLE_SECONDS), and every group's owner is known, this
        member or one heard advertising (a group with no known owner would be translated
        here, whoever owns it)."""
        reason, _ = self.readiness()
        statuses = self._supervisor.statuses() if self._supervisor else {}
        started_by = time.monotonic() - GATE_ENGINE_SETTLE_SECONDS
        with self._lock:
            member = self._member
            return (
                reason is None
                and all(settled(statuses.get(name), started_by) for name in self._wanted_children())
                and member is not None
                and all(self._owns(g) or self._owner(g) is not None for g in member.config.groups)
            )

    def on_role(self, instance: str, role: Role | Event) -> None:
        """A line of keepalived's notify FIFO for one of the groups' instances (Event.HEALED:
        another member owned the group too, a healed split brain or a preempted owner's
        last adverts; this one keeps it and announces its addresses again)."""
        index = group_of_instance(instance)
        with self._lock:
            member = self._member
            if index is None or member is None or index >= len(member.config.groups):
                return
            group = member.config.groups[index]
            if role is Event.HEALED:
                log.warning("another member owned this group too; it yields, this member keeps it", group=instance)
                self._announce(group)
                return
            role = Role(role)
            previous, self._roles[index] = self._roles.get(index), role
            if role == Role.MASTER:
                self._owners[index] = member.address
            elif self._owners.get(index) == member.address:
                del self._owners[index]  # the next advert says who took it
            self._route(group, self._handover_target(group))
            self._publish()
        log.info("group role changed", group=instance, role=role, previous=previous)
        self.metrics.ownership_changes.labels(instance, role).inc()
        if role == Role.MASTER:
            self._announce(group)
            if member.config.conntrack_sync:
                self._on_takeover()

    def members_seen(self) -> int:
        now = time.monotonic()
        member = self._member
        heard = {address for address, at in self._seen.items() if now - at < SEEN_SECONDS}
        return len(heard | ({member.address} if member else set()))

    def owners(self) -> dict[str, str | None]:
        """Each group's owner as this member knows it (for `natgwd status`)."""
        with self._lock:
            member = self._member
            if member is None:
                return {}
            return {instance_name(g): str(o) if (o := self._owner(g)) else None for g in member.config.groups}

    # --- pieces -------------------------------------------------------------------------

    def _run(self, state: DesiredState, member: Member) -> None:
        assert self._supervisor is not None
        config, paths = member.config, self.paths
        paths.directory.mkdir(parents=True, exist_ok=True)
        ctd_text = conntrackd_conf(config, member.index, paths)
        self._write(paths.conntrackd_conf, ctd_text)
        if config.conntrack_sync:
            self._supervisor.run(
                ChildSpec(
                    CONNTRACKD,
                    (self._conntrackd, "-C", str(paths.conntrackd_conf)),
                    prepare=lambda: remove_stale(paths.conntrackd_lock),
                    version=hashlib.sha256(ctd_text.encode()).hexdigest()[:12],
                )
            )
        else:
            self._supervisor.remove(CONNTRACKD)
        text = keepalived_conf(config, member.index, group_addresses(state, config), state.external.interface, paths)
        changed = self._write(paths.keepalived_conf, text)
        if self._listener is None:
            self._listener = self._listen(config.interface, self._on_advert)
        if not self._keepalived_started:
            self._supervisor.run(
                ChildSpec(
                    KEEPALIVED,
                    (
                        self._keepalived,
                        *("--vrrp", "--dont-fork", "--log-console", "--log-detail"),
                        *("-f", str(paths.keepalived_conf)),
                        *("-p", str(paths.keepalived_pid), "-r", str(paths.vrrp_pid)),
                    ),
                    prepare=self._clear_pids,
                ),
                on_exit=self._keepalived_exited,
            )
            self._keepalived_started = True
        elif changed:
            log.info("reloading keepalived for the new groups or addresses")
            self._supervisor.signal(KEEPALIVED, 1)  # SIGHUP: a restart would give every group up
        for group in config.groups:
            self._route(group, self._handover_target(group))

    def _on_advert(self, source: IPv4Address, vrid: int, priority: int) -> None:
        with self._lock:
            member = self._member
            if member is None or source == member.address or source not in member.config.members:
                return  # another gateway's adverts, on a LAN several share, say nothing of ours
            self._seen[source] = time.monotonic()
            group = next((g for g in member.config.groups if g.virtual_router_id == vrid), None)
            if group is None or self._roles.get(group.index) == Role.MASTER:
                return
            if priority == 0:
                # The owner gives the group up (it stops); the next master will advertise.
                if self._owners.get(group.index) == source:
                    del self._owners[group.index]
            else:
                self._owners[group.index] = source
            self._route(group, self._handover_target(group))

    def _handover_target(self, group: EipGroup) -> IPv4Address | None:
        """Where the group's packets go: None (translated here) on its owner, and while
        its owner is not known yet."""
        member = self._member
        owner = self._owners.get(group.index)
        if member is None or owner is None or owner == member.address:
            return None
        return owner

    def _route(self, group: EipGroup, via: IPv4Address | None) -> None:
        member = self._member
        if member is None or (group.index in self._routes and self._routes[group.index] == via):
            return
        try:
            self._set_route(group.mark, via, member.config.interface)
        except OSError as err:
            log.error("cannot set the hand-over route", group=instance_name(group), via=str(via), error=str(err))
            return
        self._routes[group.index] = via
        log.info("hand-over route", group=instance_name(group), via=str(via) if via else "translated here")

    def _owns(self, group: EipGroup) -> bool:
        return self._roles.get(group.index) == Role.MASTER

    def _owner(self, group: EipGroup) -> IPv4Address | None:
        return self._owners.get(group.index)

    def _publish(self) -> None:
        member, state = self._member, self._state
        if member is None or state is None:
            return
        owned = [g for g in member.config.groups if self._owns(g)]
        eips = frozenset(name for g in owned for name in member.config.eips_of(g, (e.name for e in state.eips)))
        self.ownership.set(eips)
        self.metrics.publish(member.config, {g.index for g in owned}, len(eips))

    def _announce(self, group: EipGroup) -> None:
        state, member = self._state, self._member
        if state is None or member is None:
            return
        announcer = self._announcers.get(group.index)
        if announcer is None:
            index = group.index
            announcer = ActiveAnnouncer(lambda: self._roles.get(index) == Role.MASTER, self._garp, self._on_garp_sent)
            self._announcers[index] = announcer
        addresses = group_addresses(state, member.config).get(group.index, ())
        announcer.request({state.external.interface: [a.ip for a in addresses]})

    def _redirects_off(self, interface: str) -> None:
        """A member sends handed-over packets back out of the interface they came in by: with
        ICMP redirects the LAN's router would be told to send them to the owner itself, past
        ECMP (and past its dead-member detection)."""
        for scope in ("all", interface):
            try:
                if self._no_redirects(scope):
                    log.info("ICMP redirects off", scope=scope)
            except OSError as err:
                log.warning("cannot turn ICMP redirects off", scope=scope, error=str(err))

    def _wanted_children(self) -> list[str]:
        member = self._member
        if not self._keepalived_started or member is None:
            return []
        return [KEEPALIVED, CONNTRACKD] if member.config.conntrack_sync else [KEEPALIVED]

    def _keepalived_exited(self, _name: str, _code: int) -> None:
        # Not under self._lock (the supervisor thread calls this while leave() may wait for
        # it). keepalived killed hard leaves its addresses; the next one removes them.
        self._roles = {}
        self._publish()

    def _watch_gate(self) -> None:
        turn = 0
        while not self._gate_stop.wait(GATE_PERIOD):
            turn += 1
            try:
                self.update_gate(verify=turn % GATE_VERIFY_TURNS == 0)
            except Exception:  # the gate must not take the daemon down; the next turn retries
                log.exception("cannot update the BFD gate")

    def update_gate(self, verify: bool = False) -> None:
        """Open or close the BFD gate as `serving` says; written only when that changes
        (a table without the gate, not scaled out, is left alone). `verify`: read the
        kernel's first (a read moves no ruleset generation), for a table made anew."""
        with self._lock:
            state = self._state
            if state is None or state.scale_out is None:
                self._gate = None
                return
            interface = state.internal.interface
        if verify and self._gate is not None and self._gate[0] == interface:
            try:
                found = bool(self._bfd_gate(interface, None))
            except Exception as err:  # NftError or OSError: read again later
                log.warning("cannot read the BFD gate", interface=interface, error=str(err))
            else:
                if found != self._gate[1]:
                    log.warning("BFD gate found changed in the kernel", interface=interface, open=found)
                    self._gate = None
        self._write_gate(interface, self.serving())

    def _write_gate(self, interface: str, open_: bool) -> None:
        # One writer at a time: the gate's thread must not open it after stop() closed it.
        with self._gate_lock:
            if self._gate == (interface, open_) or (open_ and self._gate_stop.is_set()):
                return
            try:
                self._bfd_gate(interface, open_)
            except Exception as err:  # NftError or OSError: retried next turn
                if str(err) != self._gate_error:  # once, not every turn
                    log.warning("cannot switch the BFD gate", interface=interface, open=open_, error=str(err))
                self._gate, self._gate_error = None, str(err)
                return
            self._gate, self._gate_error = (interface, open_), None
        self.metrics.bfd_gate_open.set(1 if open_ else 0)
        log.info("BFD gate", interface=interface, state="open" if open_ else "closed")

    def _clear_pids(self) -> None:
        for path in (self.paths.keepalived_pid, self.paths.vrrp_pid):
            remove_stale(path)


def settled(status: ChildStatus | None, started_by: float) -> bool:
    """The engine runs, and its process started by monotonic time `started_by`."""
    return status is not None and status.up_since is not None and status.up_since <= started_by
