"""The seed topology in network namespaces, for the demo, the integration tests and the
benchmarks. Nothing here touches the host's interfaces: every link lives in namespaces
the lab creates, and everything is removed on close, also after a failure.

    vm1 172.20.10.2 ─┐                                    ┌─ ext 10.115.55.254/21 (upstream
    vm2 172.20.10.3 ─┼─ lan (bridge, 172.20.10.1) ─ net1 [gw] net2 ─┘   gateway, "the internet")
    vm3 172.20.10.4 ─┘                                  natgwd runs in gw

The gateway's interfaces start down and without addresses: natgwd configures them.

With ipv6=True the lab is dual-stack (DUAL_STACK_STATE): the VMs also have fd00:10::2-4
behind fd00:10::fe, the VPC router fd00:10::1 and the upstream fd00:115::fe. Every
namespace but the gateway skips duplicate address detection (accept_dad 0): the
gateway's addresses are natgwd's, which adds them without it (IFA_F_NODAD).

With second_external=True the gateway also has net3 on a second external network, to the
upstream router "ext2" (10.116.0.254/24, and fd00:116::fe/64 with ipv6). Both upstream
routers also carry REMOTE_HOST, one address "on the internet" that each reaches directly:
which of them answers tells which network a connection took.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEED_STATE: dict[str, Any] = {
    "version": 1,
    "internal": {
        "interface": "net1",
        "addresses": ["172.20.10.254/24"],
        "routes": [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}],
    },
    "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": "10.115.55.254"},
    "eips": [{"name": "my-eip", "v4ip": "10.115.55.200"}, {"name": "my-eip2", "v4ip": "10.115.55.201"}],
    "snat": [{"name": "my-snat", "eip": "my-eip", "internalCIDR": "172.20.10.0/24"}],
    "dnat": [
        {
            "name": "dnat01",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": "8888",
            "internalIp": "172.20.10.2",
            "internalPort": "80",
        },
    ],
    "fip": [{"name": "fip01", "eip": "my-eip2", "internalIp": "172.20.10.3"}],
}

# The seed made dual-stack: every IPv4 rule gets its IPv6 twin on the same EIP names.
# Unique local addresses only (fd00::/8): nothing here is routed beyond the lab.
DUAL_STACK_STATE: dict[str, Any] = {
    **SEED_STATE,
    "internal": {
        "interface": "net1",
        "addresses": ["172.20.10.254/24", "fd00:10::fe/64"],
        "routes": [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}, {"dst": "fd00:55::/64", "via": "fd00:10::1"}],
    },
    "external": {
        "interface": "net2",
        "addresses": ["10.115.48.1/21", "fd00:115::1/64"],
        "gateway": "10.115.55.254",
        "gateway6": "fd00:115::fe",
    },
    "eips": [
        {"name": "my-eip", "v4ip": "10.115.55.200", "v6ip": "fd00:115::200"},
        {"name": "my-eip2", "v4ip": "10.115.55.201", "v6ip": "fd00:115::201"},
    ],
    "snat": [*SEED_STATE["snat"], {"name": "my-snat6", "eip": "my-eip", "internalCIDR": "fd00:10::/64"}],
    "dnat": [
        *SEED_STATE["dnat"],
        {
            "name": "dnat01-6",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": "8888",
            "internalIp": "fd00:10::2",
            "internalPort": "80",
        },
    ],
    "fip": [*SEED_STATE["fip"], {"name": "fip01-6", "eip": "my-eip2", "internalIp": "fd00:10::3"}],
}

VM_ADDRESSES = ("172.20.10.2", "172.20.10.3", "172.20.10.4")
VM6_ADDRESSES = ("fd00:10::2", "fd00:10::3", "fd00:10::4")
LAN_ROUTER6 = "fd00:10::1/64"
EXTERNAL_HOST6 = "fd00:115::fe"
EXTERNAL2_HOST, EXTERNAL2_HOST6 = "10.116.0.254", "fd00:116::fe"
# Benchmarking (198.18.0.0/15) and unique local ranges: never routed beyond the lab.
REMOTE_HOST, REMOTE_HOST6 = "198.18.0.1", "fd00:198::1"
LAN_ROUTER = "172.20.10.1/24"
EXTERNAL_HOST = "10.115.55.254"
EXTERNAL_PREFIX = 21


def patience(seconds: float) -> float:
    """A wait's bound, stretched by NATGWD_LAB_PATIENCE (the test suite sets 3): waits end
    on their condition, so a longer bound costs nothing when things work and keeps a loaded
    CI machine's slow moment from failing a test."""
    return seconds * float(os.environ.get("NATGWD_LAB_PATIENCE", "1"))


def run(cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout, **kw)


@dataclass
class Natgwd:
    """A natgwd process running in the gateway namespace."""

    lab: Lab
    state_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    role: str = "gw"  # the namespace it runs in

    def write_state(self, state: dict[str, Any] | str | bytes) -> None:
        """Replace the state file atomically (write a sibling, rename over)."""
        data = (
            state
            if isinstance(state, bytes)
            else (state if isinstance(state, str) else json.dumps(state, indent=1)).encode()
        )
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.state_path)

    def get(self, path: str) -> tuple[int, str]:
        """GET a path of natgwd's HTTP endpoint from inside the gateway namespace."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        result = self.lab.exec(
            self.role, "curl", "-s", "-m", "5", "-o", "/dev/stdout", "-w", "\n%{http_code}", url, check=False
        )
        body, _, status = result.stdout.rpartition("\n")
        return int(status or 0), body

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{label="v",...}': value}."""
        _, body = self.get("/metrics")
        samples = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def wait_ready(self, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + patience(timeout)
        body = ""
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if status == 200:
                return dict(json.loads(body))
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise TimeoutError(f"natgwd not ready: {body or 'no answer'}\n--- log ---\n{self.log()}")

    def wait_applied(self, sha256: str | None = None, timeout: float = 15) -> dict[str, Any]:
        """Wait until natgwd reports the current file (or the given digest) applied."""
        import hashlib

        wanted = sha256 or hashlib.sha256(self.state_path.read_bytes()).hexdigest()
        deadline = time.monotonic() + patience(timeout)
        detail: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if body:
                detail = json.loads(body)
                if status == 200 and detail.get("applied_sha256") == wanted:
                    return detail
            time.sleep(0.05)
        raise TimeoutError(f"state {wanted[:12]} not applied: {detail}\n--- log ---\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: "ngw" + secrets.token_hex(3))
    vms: tuple[str, ...] = VM_ADDRESSES
    ipv6: bool = False
    second_external: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="natgwd-lab-")))
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def applied_state_path(self) -> Path:
        return self.workdir / "applied.json"

    # --- names ----------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """Namespace name of a role: gw, lan, ext, vm1, vm2, ..."""
        return f"{self.prefix}-{role}"

    def vm_roles(self) -> list[str]:
        return [f"vm{i + 1}" for i in range(len(self.vms))]

    # --- building -------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        self.exec(role, "ip", "link", "set", "lo", "up")
        if self.ipv6 and role != "gw":
            # Set before the namespace's links exist: "default" is what new links inherit.
            for scope in ("all", "default"):
                self.exec(role, "sysctl", "-qw", f"net.ipv6.conf.{scope}.accept_dad=0")
        return name

    def _veth(self, a_role: str, a_name: str, b_role: str, b_name: str) -> None:
        run(
            [
                "ip",
                "link",
                "add",
                a_name,
                "netns",
                self.ns(a_role),
                "type",
                "veth",
                "peer",
                "name",
                b_name,
                "netns",
                self.ns(b_role),
            ]
        )

    def build(self) -> None:
        for role in ("gw", "lan", "ext", *(["ext2"] if self.second_external else []), *self.vm_roles()):
            self._add_ns(role)
        # Internal L2 segment: a bridge in "lan", which also plays the VPC router 172.20.10.1.
        self.exec("lan", "ip", "link", "add", "br0", "type", "bridge")
        self.exec("lan", "ip", "addr", "add", LAN_ROUTER, "dev", "br0")
        self.exec("lan", "ip", "link", "set", "br0", "up")
        self._add_vms()
        self._gateway_links()

    def _add_vms(self) -> None:
        """The VMs, each on a port of the bridge br0 in "lan", routed via the gateway."""
        for role, address in zip(self.vm_roles(), self.vms, strict=True):
            self._veth(role, "eth0", "lan", f"p-{role}")
            self.exec("lan", "ip", "link", "set", f"p-{role}", "master", "br0", "up")
            self.exec(role, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            self.exec(role, "ip", "link", "set", "eth0", "up")
            self.exec(role, "ip", "route", "add", "default", "via", "172.20.10.254")

    def _gateway_links(self) -> None:
        # net1 on the internal segment; net2 on the external one, where the upstream
        # gateway is directly.
        self._veth("gw", "net1", "lan", "p-gw")
        self.exec("lan", "ip", "link", "set", "p-gw", "master", "br0", "up")
        self._veth("gw", "net2", "ext", "eth0")
        self.exec("ext", "ip", "addr", "add", f"{EXTERNAL_HOST}/{EXTERNAL_PREFIX}", "dev", "eth0")
        self.exec("ext", "ip", "link", "set", "eth0", "up")
        if self.ipv6:
            self._build_ipv6()
        if self.second_external:
            self._veth("gw", "net3", "ext2", "eth0")
            self.exec("ext2", "ip", "addr", "add", f"{EXTERNAL2_HOST}/24", "dev", "eth0")
            self.exec("ext2", "ip", "link", "set", "eth0", "up")
            if self.ipv6:
                self.exec("ext2", "ip", "addr", "add", f"{EXTERNAL2_HOST6}/64", "dev", "eth0")
            for role in ("ext", "ext2"):
                self.exec(role, "ip", "addr", "add", f"{REMOTE_HOST}/32", "dev", "lo")
                if self.ipv6:
                    self.exec(role, "ip", "addr", "add", f"{REMOTE_HOST6}/128", "dev", "lo")

    def _build_ipv6(self) -> None:
        self.exec("lan", "ip", "addr", "add", LAN_ROUTER6, "dev", "br0")
        for role, address in zip(self.vm_roles(), VM6_ADDRESSES, strict=False):
            self.exec(role, "ip", "addr", "add", f"{address}/64", "dev", "eth0")
            self.exec(role, "ip", "-6", "route", "add", "default", "via", "fd00:10::fe")
        self.exec("ext", "ip", "addr", "add", f"{EXTERNAL_HOST6}/64", "dev", "eth0")

    def recreate_gateway(self, timeout: float = 10) -> None:
        """A new gateway namespace in place of the old one, as when Kubernetes recreates
        the gateway pod: new interfaces, nothing configured, no NAT state. net1 keeps its
        MAC address (Kube-OVN gives the recreated pod the same lanIp and MAC); net2 gets a
        new one (gratuitous ARP tells the upstream gateway). Stop every process in the old
        namespace first."""
        mac = json.loads(self.exec("gw", "ip", "-j", "link", "show", "net1").stdout)[0]["address"]
        # A process left inside (a call's watchdog, a child of a killed daemon) would keep
        # the old namespace, and so its links, alive.
        for pid in run(["ip", "netns", "pids", self.ns("gw")], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "del", self.ns("gw")])
        # The peers of the old veths go with the namespace, asynchronously: the kernel's
        # namespace cleanup is one queue for the whole machine, slow while others tear down.
        deadline = time.monotonic() + patience(timeout)
        while any(
            self.exec(role, "ip", "link", "show", name, check=False).returncode == 0
            for role, name in (("lan", "p-gw"), ("ext", "eth0"))
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the old gateway's links did not go away")
            time.sleep(0.05)
        run(["ip", "netns", "add", self.ns("gw")])
        self.exec("gw", "ip", "link", "set", "lo", "up")
        self._gateway_links()
        self.exec("gw", "ip", "link", "set", "net1", "address", mac)

    def close(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self._processes.clear()
        for name in reversed(self._namespaces):
            run(["ip", "netns", "del", name], check=False)
        self._namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- running things -------------------------------------------------------------

    def exec(
        self, role: str, *cmd: str, check: bool = True, timeout: float = 30, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns(role), *cmd], check=check, timeout=timeout, input=stdin)

    def spawn(
        self, role: str, *cmd: str, log_path: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in a namespace; killed on close."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self._processes.append(process)
        return process

    def start_natgwd(
        self,
        state: dict[str, Any] | str | bytes | None = None,
        *args: str,
        metrics_port: int = 9469,
        state_path: Path | None = None,
    ) -> Natgwd:
        path = state_path or self.workdir / "state.json"
        log_path = self.workdir / f"natgwd-{len(self._processes)}.log"
        cmd = [
            sys.executable,
            "-m",
            "natgwd",
            "run",
            "--state",
            str(path),
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
            "--applied-state",
            str(self.applied_state_path),
            *args,
        ]
        daemon = Natgwd(self, path, None, log_path, metrics_port)  # type: ignore[arg-type]
        if state is not None:
            daemon.write_state(state)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        daemon.process = self.spawn("gw", *cmd, log_path=log_path, env=env)
        return daemon

    def serve(
        self, role: str, *, tcp: Sequence[int] = (), udp: Sequence[int] = (), tag: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start `natgwd.lab.servers` in a namespace and wait until its ports listen. With a
        tag, answers end in " @tag" (to tell servers apart)."""
        args = [f"--tcp={p}" for p in tcp] + [f"--udp={p}" for p in udp] + ([f"--tag={tag}"] if tag else [])
        process = self.spawn(role, sys.executable, "-m", "natgwd.lab.servers", *args)
        deadline = time.monotonic() + patience(10)
        wanted = {("tcp", p) for p in tcp} | {("udp", p) for p in udp}
        while time.monotonic() < deadline:
            listening = self._listening(role)
            if wanted <= listening:
                return process
            time.sleep(0.05)
        raise TimeoutError(f"server in {role} did not listen on {sorted(wanted)}")

    def _listening(self, role: str) -> set[tuple[str, int]]:
        out = self.exec(role, "ss", "-Hlntu", check=False).stdout
        found = set()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 5:
                found.add((parts[0], int(parts[4].rsplit(":", 1)[1])))
        return found

    def http_get(self, role: str, address: str, port: int, path: str = "/", timeout: float = 5) -> str:
        """GET from a namespace; the lab server answers with the client address it saw."""
        host = f"[{address}]" if ":" in address else address
        url = urllib.parse.urlunsplit(("http", f"{host}:{port}", path, "", ""))
        return self.exec(role, "curl", "-s", "-m", str(timeout), url, timeout=timeout + 5).stdout

    def udp_exchange(
        self, role: str, address: str, port: int, payloads: Sequence[bytes], timeout: float = 2, source_port: int = 0
    ) -> list[str]:
        """Send datagrams from one socket in a namespace; return each answer (the client
        address the server saw), '' for a datagram that got none."""
        family, anywhere = ("AF_INET6", "::") if ":" in address else ("AF_INET", "0.0.0.0")
        script = (
            "import socket,sys,json\n"
            f"s=socket.socket(socket.{family},socket.SOCK_DGRAM)\n"
            f"s.bind(({anywhere!r},{source_port}))\n"
            f"s.settimeout({timeout})\n"
            "out=[]\n"
            f"for p in {list(payloads)!r}:\n"
            f"    s.sendto(p,({address!r},{port}))\n"
            "    try: out.append(s.recv(65535).decode())\n"
            "    except socket.timeout: out.append('')\n"
            "print(json.dumps(out))\n"
        )
        result = self.exec(role, sys.executable, "-c", script, timeout=timeout * len(payloads) + 10)
        return list(json.loads(result.stdout))
