"""The BGP speaker: FRR's zebra, bfdd and bgpd, run and kept running by natgwd, and what
they announce kept equal to what this member owns.

FRR, not BIRD: bgpd and bfdd are separate daemons whose state vtysh prints as JSON, and
bgpd changes its `network` statements in place, without touching a session. The upstream
routers the tests use run BIRD: the two implementations check each other.

A thread of its own reconciles, on every ownership change and once a second:
- the daemons run (the Supervisor restarts them with backoff; their output goes into
  natgwd's log), with configuration files written from the state; a change to anything
  but the announcements restarts them, a change to the announcements does not;
- bgpd originates exactly the EIPs this member owns (standby ones with a longer AS path
  if asked), and nothing before the first complete apply nor after `withdraw`;
- the sessions' and BFD's state is read for /metrics and /readyz, and changes are logged.

bgpd listens on no port (-p 0): it connects to the neighbours, nothing can connect to
natgwd's addresses. bfdd has to listen (UDP 3784 and 4784): BFD is two-way.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import structlog

from natgwd.bgp.ownership import NOTHING, Ownership
from natgwd.bgp.render import (
    Announcements,
    FrrPaths,
    bfdd_conf,
    bgpd_conf,
    host_prefix,
    network_commands,
    zebra_conf,
)
from natgwd.bgp.status import NeighborStatus
from natgwd.bgp.vtysh import Vtysh
from natgwd.process.supervisor import ChildSpec, ChildStatus, Supervisor, remove_stale
from natgwd.state.bgp import BgpConfig
from natgwd.state.model import DesiredState, IPNetwork

log = structlog.get_logger("natgwd.bgp.speaker")

DAEMONS = ("zebra", "bfdd", "bgpd")
POLL_SECONDS = 1.0
WITHDRAW_POLL_SECONDS = 0.05
WITHDRAW_TIMEOUT_SECONDS = 3.0
FRR_USER = "frr"
STARTUP_WAIT_SECONDS = 3.0
FLAP_JITTER_SECONDS = 2.0


@dataclass(frozen=True)
class FrrBinaries:
    directory: Path = Path("/usr/lib/frr")
    vtysh: str = "vtysh"


@dataclass(frozen=True)
class Snapshot:
    """What the speaker last found; `configured` lists the state's neighbours in order."""

    children: dict[str, ChildStatus]
    configured: tuple[str, ...]
    neighbors: dict[str, NeighborStatus]
    owned: frozenset[IPNetwork]
    standby: frozenset[IPNetwork]
    originated: frozenset[IPNetwork]
    families: dict[str, int] = field(default_factory=dict)  # neighbour -> 4 or 6

    def unannounced(self) -> frozenset[IPNetwork]:
        """Owned prefixes that bgpd does not originate or no session of their family carries."""
        carried = {self.families[a] for a, n in self.neighbors.items() if n.established and a in self.families}
        return frozenset(p for p in self.owned if p not in self.originated or p.version not in carried)


class BgpSpeaker:
    def __init__(self, run_dir: Path, ownership: Ownership, binaries: FrrBinaries = FrrBinaries()) -> None:
        self.paths = FrrPaths(run_dir)
        self.binaries = binaries
        self._vtysh = Vtysh(run_dir, binaries.vtysh)
        self._ownership = ownership
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._state: DesiredState | None = None
        self._complete = False  # a complete apply happened: announcing may start
        self._withdrawing = False
        self._stopping = False
        self._snapshot: Snapshot | None = None
        self._held: Announcements | None = None  # what bgpd was last told, for its pid
        self._held_pid: int | None = None
        self._written: dict[Path, str] = {}
        self._supervisor: Supervisor | None = None
        self._running: BgpConfig | None = None  # the section FRR's daemons run with
        self._retiring_since: float | None = None  # the section went: withdrawing before the stop
        self._thread: threading.Thread | None = None
        self._problem: str | None = None
        ownership.on_change(self._wake.set)

    # --- the daemon's calls ------------------------------------------------------------

    def start(self) -> None:
        self._supervisor = Supervisor()
        self._thread = threading.Thread(target=self._loop, name="natgwd-bgp", daemon=True)
        self._thread.start()

    def applied(self, state: DesiredState, complete: bool) -> None:
        with self._lock:
            self._state = state
            self._complete |= complete
        self._wake.set()

    def withdraw(self, timeout: float = WITHDRAW_TIMEOUT_SECONDS) -> bool:
        """Withdraw every announcement and wait until the neighbours were told (a planned
        stop: upstream moves traffic away before this member goes). True when confirmed."""
        with self._lock:
            if self._state is None or self._state.bgp is None or self._thread is None:
                return True
            self._withdrawing = True
        self._wake.set()
        started = time.monotonic()
        with self._changed:
            done = self._changed.wait_for(self._withdrawn, timeout)
        log.info(
            "BGP announcements withdrawn" if done else "BGP withdrawal not confirmed in time",
            seconds=round(time.monotonic() - started, 3),
        )
        return done

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self._supervisor is not None:
            self._supervisor.stop()

    def readiness(self) -> tuple[str | None, dict[str, Any]]:
        with self._lock:
            state, snapshot, problem = self._state, self._snapshot, self._problem
        if state is None or state.bgp is None:
            return None, {}
        if snapshot is None:
            return problem or "the BGP speaker has not started yet", {"bgp": {}}
        reasons = [problem] if problem else []
        for name in DAEMONS:
            status = snapshot.children.get(name)
            if status is None or not status.up:
                reasons.append(f"{name} is not running (restarts: {status.restarts if status else 0})")
        missing = snapshot.unannounced()
        if missing:
            reasons.append(f"owned EIPs not announced: {', '.join(str(p) for p in sorted(missing, key=str))}")
        detail = {
            "neighbors": {
                address: _neighbor_detail(snapshot.neighbors.get(address)) for address in snapshot.configured
            },
            "announced": sorted(str(p) for p in snapshot.originated),
        }
        return "; ".join(reasons) or None, {"bgp": detail}

    def snapshot(self) -> Snapshot | None:
        with self._lock:
            return self._snapshot

    # --- the speaker's thread ---------------------------------------------------------

    def _withdrawn(self) -> bool:
        snapshot = self._snapshot
        if snapshot is None:
            return True  # nothing was ever announced
        bgpd = snapshot.children.get("bgpd")
        if bgpd is None or not bgpd.up:
            return True
        if snapshot.originated:
            return False
        return all(n.prefixes_sent == 0 for n in snapshot.neighbors.values() if n.established)

    def _loop(self) -> None:
        while True:
            with self._lock:
                stopping = self._stopping
                withdrawing = self._withdrawing or self._retiring_since is not None
            if stopping:
                return
            try:
                self._tick()
            except Exception:  # the speaker must outlive whatever FRR prints
                log.exception("BGP speaker step failed")
            self._wake.wait(WITHDRAW_POLL_SECONDS if withdrawing else POLL_SECONDS)
            self._wake.clear()

    def _tick(self) -> None:
        assert self._supervisor is not None
        with self._lock:
            state, complete, withdrawing = self._state, self._complete, self._withdrawing
        if state is None:
            return
        bgp = state.bgp
        if bgp is None:
            self._retire()
            return
        self._retiring_since = None
        router_id = bgp.router_id or self._ownership.member_address() or _first_ipv4(state)
        if router_id is None:
            self._set_problem("no BGP router id: set bgp.routerId (the gateway has no IPv4 address to use)")
            return
        claims = self._ownership.claims(state) if complete and not withdrawing else NOTHING
        wanted = _announcements(state, bgp, claims.owned, claims.standby if bgp.standby_prepend else frozenset())
        if not self._run_daemons(bgp, router_id, wanted):
            return
        statuses = self._supervisor.statuses()
        present = self._announce(bgp, wanted, statuses.get("bgpd"))
        found = self._read_neighbors(statuses) if statuses.get("bgpd", ChildStatus()).up else {}
        snapshot = Snapshot(
            children=statuses,
            configured=tuple(str(n.address) for n in bgp.neighbors),
            neighbors=found,
            owned=frozenset(p for p, standby in wanted.items() if not standby),
            standby=frozenset(p for p, standby in wanted.items() if standby),
            originated=frozenset(present),
            families={str(n.address): n.family for n in bgp.neighbors},
        )
        self._log_changes(self._snapshot, snapshot)
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def _set_problem(self, problem: str | None) -> None:
        with self._lock:
            if problem != self._problem and problem:
                log.error("BGP speaker cannot run", reason=problem)
            self._problem = problem

    def _run_daemons(self, bgp: BgpConfig, router_id: IPv4Address, wanted: Announcements) -> bool:
        assert self._supervisor is not None
        paths = self.paths
        try:
            owner = pwd.getpwnam(FRR_USER)
            paths.directory.mkdir(parents=True, exist_ok=True)
            os.chown(paths.directory, owner.pw_uid, owner.pw_gid)
            texts = {"zebra": zebra_conf(), "bfdd": bfdd_conf(bgp), "bgpd": bgpd_conf(bgp, router_id, wanted)}
            for name, text in texts.items():
                self._write(paths.conf(name), text, owner.pw_uid, owner.pw_gid)
        except (KeyError, OSError) as err:
            self._set_problem(f"cannot prepare FRR's directory {paths.directory}: {err}")
            return False
        self._set_problem(None)
        # The sessions' part of the configuration: a change to it restarts bgpd; one to the
        # announcements only is made in place (_announce).
        versions = {
            "zebra": "",
            "bfdd": _digest(texts["bfdd"]),
            "bgpd": _digest(bgpd_conf(bgp, router_id, {})),
        }
        if self._running is None:
            for name in DAEMONS:
                remove_stale(paths.vty(name))
        for name in DAEMONS:
            self._supervisor.run(ChildSpec(name, self._argv(name), self._prepare(name), versions[name]))
            if self._running is None:
                # One after the other, each once the previous answers: bgpd's BFD requests
                # go through zebra to bfdd, and one made before bfdd is there waits for a
                # replay (measured: BFD up 11 s after the start instead of 4.5 s).
                _wait_for_file(paths.vty(name), STARTUP_WAIT_SECONDS)
        self._running = bgp
        return True

    def _argv(self, name: str) -> tuple[str, ...]:
        paths = self.paths
        argv = [
            str(self.binaries.directory / name),
            *("-f", str(paths.conf(name)), "-i", str(paths.pid(name))),
            *("-z", str(paths.zserv), "--vty_socket", str(paths.directory)),
            *("-P", "0", "--log", "stdout"),
        ]
        if name == "bfdd":
            argv += ["--bfdctl", str(paths.bfdctl)]
        if name == "bgpd":
            argv += ["-p", "0", "--no_kernel"]  # no listening socket; learned routes never installed
        return tuple(argv)

    def _prepare(self, name: str) -> Callable[[], None]:
        def prepare() -> None:
            remove_stale(self.paths.pid(name))
            if name == "zebra":
                remove_stale(self.paths.zserv)

        return prepare

    def _retire(self) -> None:
        """The bgp section went: withdraw, as a planned stop does, and stop FRR once the
        neighbours were told (or after the same bound). Stopping bgpd at once ends the
        sessions instead, and an upstream that keeps a gone peer's routes for a graceful
        restart went on routing the EIPs here for up to two minutes."""
        assert self._supervisor is not None
        if self._running is None:
            return
        now = time.monotonic()
        if self._retiring_since is None:
            self._retiring_since = now
            log.info("BGP section removed: withdrawing before FRR stops")
        statuses = self._supervisor.statuses()
        bgpd = statuses.get("bgpd")
        present = self._announce(self._running, {}, bgpd)
        neighbors = self._read_neighbors(statuses) if bgpd is not None and bgpd.up else {}
        told = not present and all(n.prefixes_sent == 0 for n in neighbors.values() if n.established)
        if told or now - self._retiring_since >= WITHDRAW_TIMEOUT_SECONDS:
            if not told:
                log.warning("BGP withdrawal not confirmed in time: stopping FRR anyway")
            self._stop_daemons()
            self._retiring_since = None

    def _stop_daemons(self) -> None:
        assert self._supervisor is not None
        if self._running is None:
            return
        self._running = None
        for name in reversed(DAEMONS):
            self._supervisor.remove(name)
        with self._changed:
            self._snapshot, self._held, self._held_pid = None, None, None
            self._changed.notify_all()
        log.info("BGP speaker stopped: the state has no bgp section")

    def _write(self, path: Path, text: str, uid: int, gid: int) -> None:
        if self._written.get(path) == text:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        # 0600: bgpd.conf holds the neighbours' passwords.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chown(tmp, uid, gid)
        os.replace(tmp, path)
        self._written[path] = text

    def _announce(self, bgp: BgpConfig, wanted: Announcements, bgpd: ChildStatus | None) -> set[IPNetwork]:
        """Make bgpd originate `wanted`; what it originates afterwards."""
        if bgpd is None or not bgpd.up:
            return set()
        present = self._vtysh.originated()
        if present is None:
            return set()
        if bgpd.pid != self._held_pid:
            self._held, self._held_pid = None, bgpd.pid
        commands = network_commands(bgp.asn, wanted, self._held, present)
        if not commands:
            self._held = dict(wanted)
            return present
        if self._vtysh.run(commands) is None:
            self._held = None
            return present
        added = sorted(str(p) for p in wanted if p not in present)
        removed = sorted(str(p) for p in present if p not in wanted)
        log.info(
            "BGP announcements changed",
            added=added,
            withdrawn=removed,
            standby=sorted(str(p) for p, s in wanted.items() if s),
        )
        self._held = dict(wanted)
        return set(wanted)

    def _read_neighbors(self, statuses: dict[str, ChildStatus]) -> dict[str, NeighborStatus]:
        state = self._state
        with_bfd = {str(n.address) for n in state.bgp.neighbors if n.bfd} if state and state.bgp else set()
        bfdd = statuses.get("bfdd")
        found = self._vtysh.neighbors(with_bfd, ask_bfdd=bfdd is not None and bfdd.up)
        before = self._snapshot.neighbors if self._snapshot is not None else {}
        return {address: _steady(status, before.get(address)) for address, status in found.items()}

    def _log_changes(self, before: Snapshot | None, after: Snapshot) -> None:
        old = before.neighbors if before else {}
        for address, now in after.neighbors.items():
            was = old.get(address)
            if was is not None and (was.state, was.bfd) == (now.state, now.bfd):
                continue
            event = log.info if now.established else log.warning
            event(
                "BGP neighbour state",
                neighbor=address,
                state=now.state,
                previous=was.state if was else None,
                bfd=now.bfd,
                last_error=now.last_error,
            )


def _announcements(
    state: DesiredState, bgp: BgpConfig, owned: frozenset[str], standby: frozenset[str]
) -> dict[IPNetwork, bool]:
    wanted: dict[IPNetwork, bool] = {}
    for eip in bgp.announced(state.eips):
        if eip.name in owned or eip.name in standby:
            for address in eip.addresses:
                wanted[host_prefix(address)] = eip.name not in owned
    return wanted


def _steady(status: NeighborStatus, before: NeighborStatus | None) -> NeighborStatus:
    """`status` with the last flap time seen before, unless the session flapped since:
    FRR derives that time from the uptime at each query, so it wanders by a second."""
    if before is None or before.state != status.state or before.last_change is None or status.last_change is None:
        return status
    if abs(status.last_change - before.last_change) > FLAP_JITTER_SECONDS:
        return status
    return replace(status, last_change=before.last_change)


def _first_ipv4(state: DesiredState) -> IPv4Address | None:
    return next((a.ip for n in state.externals for a in n.addresses if isinstance(a.ip, IPv4Address)), None)


def _wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _neighbor_detail(status: NeighborStatus | None) -> dict[str, Any]:
    if status is None:
        return {"state": "unknown"}
    detail: dict[str, Any] = {"state": status.state, "prefixes_sent": status.prefixes_sent}
    if status.bfd is not None:
        detail["bfd"] = status.bfd
    if not status.established and status.last_error:
        detail["last_error"] = status.last_error
    return detail
