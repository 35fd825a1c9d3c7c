"""Two natgwd gateways as an active/standby pair, in namespaces:

    vm1..vm3 ── lan (bridge br0, 172.20.10.1) ──┬── net1 [gwa] net2 ──┬── ext (bridge br0,
                                                └── net1 [gwb] net2 ──┘   10.115.55.254/21)
                          gwa sync0 169.254.64.1/30 ─── sync0 gwb 169.254.64.2/30

Long-lived flows that log every echo with its time, so a failover's gap is measured from
the flows themselves. Every process in the lab's namespaces is killed on close (natgwd's
children included), by PID, then the namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natgwd.lab.topology import EXTERNAL_HOST, EXTERNAL_PREFIX, LAN_ROUTER, SEED_STATE, Lab, Natgwd, run
from tests.integration.helpers import METRICS_PORT, client_command, natgwd_command, wait_for

GATEWAYS = ("gwa", "gwb")
SYNC = {"gwa": "169.254.64.1", "gwb": "169.254.64.2"}
PRIORITY = {"gwa": 150, "gwb": 100}
# What the Kubernetes manifest grants (image/kubernetes/ha/statefulset.yaml): root with only
# these capabilities runs natgwd, keepalived and conntrackd.
MINIMAL_CAPABILITIES = ("setpriv", "--bounding-set", "-all,+net_admin,+net_raw", "--inh-caps", "-all", "--")


def ha_state(advert_interval: float = 0.2, conntrack_sync: bool = True) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    # A share DNAT group (Kube-OVN's load-balanced DNAT): two backends behind my-eip:9999.
    state["dnat"] += [
        {"name": f"share-{vm}", "eip": "my-eip", "protocol": "tcp", "externalPort": "9999"}
        | {"internalIp": ip, "internalPort": "80", "type": "share"}
        for vm, ip in (("vm1", "172.20.10.2"), ("vm3", "172.20.10.4"))
    ]
    state["ha"] = {
        "interface": "sync0",
        "virtualRouterId": 51,
        "advertInterval": advert_interval,
        "conntrackSync": conntrack_sync,
        "members": [{"address": SYNC[g], "priority": PRIORITY[g]} for g in GATEWAYS],
    }
    return state


class HaLab(Lab):
    def build(self) -> None:
        for role in (*GATEWAYS, "lan", "ext", *self.vm_roles()):
            self._add_ns(role)
        for segment, address in (("lan", LAN_ROUTER), ("ext", f"{EXTERNAL_HOST}/{EXTERNAL_PREFIX}")):
            self.exec(segment, "ip", "link", "add", "br0", "type", "bridge")
            self.exec(segment, "ip", "addr", "add", address, "dev", "br0")
            self.exec(segment, "ip", "link", "set", "br0", "up")
        for gateway in GATEWAYS:
            for interface, segment in (("net1", "lan"), ("net2", "ext")):
                self._veth(gateway, interface, segment, f"p-{gateway}")
                self.exec(segment, "ip", "link", "set", f"p-{gateway}", "master", "br0", "up")
        self._add_vms()
        self._veth("gwa", "sync0", "gwb", "sync0")
        for gateway in GATEWAYS:
            self.exec(gateway, "ip", "addr", "add", f"{SYNC[gateway]}/30", "dev", "sync0")
            self.exec(gateway, "ip", "link", "set", "sync0", "up")

    def close(self) -> None:
        # natgwd's children run in sessions of their own: kill everything in the
        # gateways' namespaces by PID before the namespaces go.
        for gateway in GATEWAYS:
            if self.ns(gateway) in self._namespaces:
                kill_all(self, gateway)
        super().close()

    def start_member(
        self, gateway: str, state: dict[str, Any], wrapper: Sequence[str] = (), args: Sequence[str] = ()
    ) -> Natgwd:
        """natgwd in a gateway's namespace, with files of its own, behind a `wrapper`
        command (setpriv) that execs it; `args`: more of natgwd's options."""
        directory = self.workdir / gateway
        directory.mkdir(exist_ok=True)
        daemon = Natgwd(self, directory / "state.json", None, directory / "natgwd.log", METRICS_PORT, gateway)  # type: ignore[arg-type]
        daemon.write_state(state)
        command = natgwd_command(
            daemon.state_path,
            str(directory / "applied.json"),
            *("--ha-run-dir", str(directory / "run"), "--resync-interval", "2"),
            *args,
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        daemon.process = self.spawn(gateway, *wrapper, *command, log_path=daemon.log_path, env=env)
        return daemon


def pids_in(lab: Lab, role: str) -> list[int]:
    out = run(["ip", "netns", "pids", lab.ns(role)], check=False).stdout
    return [int(p) for p in out.split()]


def kill_all(lab: Lab, role: str) -> list[int]:
    """SIGKILL every process in a namespace the lab created; the PIDs killed. All are
    stopped first, so none can react to another's death (keepalived would hand over at
    once, with priority 0, on the SIGTERM it gets when natgwd dies): a silent failure."""
    pids = pids_in(lab, role)
    for signum in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
    wait_for(lambda: not pids_in(lab, role) or None, f"every process in {role} to die", timeout=10)
    return pids


def role_of(daemon: Natgwd) -> str | None:
    status, body = daemon.get("/readyz")
    if not body:
        return None
    ha = json.loads(body).get("ha", {})
    return ha.get("role") if status == 200 else None


def wait_role(daemon: Natgwd, role: str, timeout: float = 20) -> None:
    wait_for(lambda: role_of(daemon) == role, f"{daemon.role} to be {role}", timeout=timeout)


def metric(daemon: Natgwd, sample: str) -> float | None:
    return daemon.metrics().get(sample)


# --- flows ----------------------------------------------------------------------------


@dataclass
class Flow:
    """A long-lived flow from one namespace: a TCP connection that sends a line every
    `period` and checks its echo (never reconnecting), or a UDP socket that sends a
    datagram every `period` and logs each answer (the address the server saw)."""

    name: str
    log_path: Path

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def errors(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("error")]

    def echoes(self) -> list[tuple[float, str]]:
        """(time, answer) of every echo; the answer is the UDP server's view, '' for TCP."""
        found = []
        for line in self.lines():
            if line.startswith("ok "):
                parts = line.split(" ", 3)
                found.append((float(parts[2]), parts[3] if len(parts) > 3 else ""))
        return found

    def local(self) -> str:
        return wait_for(
            lambda: next((x.split()[1] for x in self.lines() if x.startswith("connected")), None), "connect"
        )

    def wait_more(self, count: int, timeout: float = 20) -> None:
        wanted = len(self.echoes()) + count

        def reached() -> bool:
            assert not self.errors(), f"flow {self.name} broke: {self.errors()}"
            return len(self.echoes()) >= wanted

        wait_for(reached, f"{count} more echoes on {self.name}", timeout=timeout)

    def largest_gap(self, since: float) -> float:
        times = [t for t, _ in self.echoes()]
        later = [t for t in times if t >= since]
        before = [t for t in times if t < since][-1:]
        series = before + later
        return max((b - a for a, b in itertools.pairwise(series)), default=0.0)


def start_flow(lab: Lab, role: str, proto: str, address: str, port: int, name: str, period: float = 0.02) -> Flow:
    flow = Flow(name, lab.workdir / f"flow-{name}.log")
    lab.spawn(role, *client_command("echo", proto, address, port, flow.log_path, period, 30))
    flow.local()
    return flow


def start_flows(
    lab: Lab, role: str, proto: str, address: str, port: int, name: str, count: int, period: float = 0.2
) -> list[Flow]:
    """`count` flows like start_flow's from one process, named NAME-0...; returns without
    waiting for them to connect (a flow that cannot logs its error)."""
    prefix = lab.workdir / f"flow-{name}"
    lab.spawn(role, *client_command("echoes", proto, address, port, prefix, count, period, 30))
    return [Flow(f"{name}-{i}", Path(f"{prefix}-{i}")) for i in range(count)]


def established_peers(lab: Lab, role: str, port: int) -> list[str]:
    """The remote ends of established TCP connections to a local port, as ss shows them."""
    out = lab.exec(role, "ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
    return sorted(line.split()[-1] for line in out.splitlines() if line.strip())


def connection_marks(lab: Lab, role: str) -> set[int]:
    """The ct marks (natgwd's rule ids) of the kernel's connections in a namespace."""
    return marks_of(lab.exec(role, "conntrack", "-L", check=False).stdout.splitlines())


def marks_of(lines: Sequence[str]) -> set[int]:
    return {int(word[5:]) for line in lines for word in line.split() if word.startswith("mark=")} - {0}


@dataclass
class DestroyWatch:
    """`conntrack -E` on a namespace's connection deletions, from the moment `watch_destroys`
    returns: a deleted connection is a gap in which the member's packets find none."""

    log_path: Path

    def destroyed_marks(self) -> set[int]:
        return marks_of(self.log_path.read_text().splitlines())


def watch_destroys(lab: Lab, role: str) -> DestroyWatch:
    watch = DestroyWatch(lab.workdir / f"destroys-{role}.log")
    lab.spawn(role, "conntrack", "-E", "-e", "DESTROY", log_path=watch.log_path)
    # A probe entry (TEST-NET addresses, in the table only: no packet is sent), deleted until
    # its deletion is seen: then the watcher is subscribed.
    probe = ("-s", "192.0.2.1", "-d", "192.0.2.2", "-p", "udp", "--sport", "9", "--dport", "9")

    def subscribed() -> bool:
        lab.exec(role, "conntrack", "-I", *probe, "-t", "30", "-u", "SEEN_REPLY", check=False)
        lab.exec(role, "conntrack", "-D", *probe, check=False)
        return "192.0.2.1" in watch.log_path.read_text() if watch.log_path.exists() else False

    wait_for(subscribed, f"conntrack -E to listen in {role}")
    return watch
