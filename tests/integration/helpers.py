"""Shared helpers for the integration tests: waiting for a condition, starting natgwd on a
state (also behind a wrapper or with extra environment), reading its readiness, log and
per-rule counters, small servers and clients inside the lab's namespaces, and reading
addresses, routes and natgwd's table back. Everything runs only inside the lab's namespaces."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from natgwd.lab.topology import Lab, Natgwd, patience

T = TypeVar("T")

UDP_IP_OVERHEAD = 20 + 8  # IPv4 header without options + UDP header
METRICS_PORT = 9469  # Lab.start_natgwd's default; natgwd_command uses it too
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def wait_for(
    check: Callable[[], T | Literal[False] | None], what: str, timeout: float = 15.0, interval: float = 0.05
) -> T:
    """Poll until `check` returns something truthy; return it, or fail the test naming `what`."""
    # Literal[False] and None in the check's type: a check like `cond and value` or one
    # returning `value | None` gives the type of `value` back, since falsy results never are.
    deadline = time.monotonic() + patience(timeout)
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {patience(timeout)}s waiting for {what} (last: {result!r})")
        time.sleep(interval)


# --- natgwd ---------------------------------------------------------------------------


def encode(state: dict[str, Any]) -> bytes:
    """The bytes Natgwd.write_state writes for a state."""
    return json.dumps(state, indent=1).encode()


def sha256(data: bytes) -> str:
    """The hex digest natgwd reports as applied_sha256 for a file of these bytes."""
    return hashlib.sha256(data).hexdigest()


def start(lab: Lab, state: dict[str, Any], *args: str) -> Natgwd:
    """Start natgwd on `state` (extra command-line `args`) and wait until it reports
    exactly that file applied."""
    daemon = lab.start_natgwd(state, *args)
    daemon.wait_ready()
    daemon.wait_applied()
    return daemon


def apply(daemon: Natgwd, state: dict[str, Any]) -> dict[str, Any]:
    """Replace the desired state; wait until it is applied (conntrack cleanup included)
    and return /readyz's detail."""
    daemon.write_state(state)
    return daemon.wait_applied()


def natgwd_command(state_path: Path, applied_state: str, *args: str, metrics_port: int = METRICS_PORT) -> list[str]:
    """The command line Lab.start_natgwd uses, for starting natgwd behind a wrapper or
    with a custom environment (which Lab.start_natgwd does not offer)."""
    return [
        sys.executable,
        "-m",
        "natgwd",
        "run",
        "--state",
        str(state_path),
        "--metrics-address",
        f"127.0.0.1:{metrics_port}",
        "--applied-state",
        applied_state,
        *args,
    ]


def start_natgwd_with(
    lab: Lab,
    state: dict[str, Any],
    *args: str,
    wrapper: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    applied_state: str | None = None,
    name: str = "x",
) -> Natgwd:
    """Start natgwd in the gateway (not waiting) behind a `wrapper` command (setpriv,
    unshare, ...) that ends by exec'ing it, so the Popen pid is natgwd's own, and with
    extra environment variables `env`. `applied_state` defaults to the lab's record."""
    state_path = lab.workdir / "state.json"
    log_path = lab.workdir / f"natgwd-{name}.log"
    daemon = Natgwd(lab, state_path, None, log_path, METRICS_PORT)  # type: ignore[arg-type]
    daemon.write_state(state)
    applied = str(lab.applied_state_path) if applied_state is None else applied_state
    command = [*wrapper, *natgwd_command(state_path, applied, *args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    daemon.process = lab.spawn("gw", *command, log_path=log_path, env=full_env)
    return daemon


def readyz(daemon: Natgwd) -> tuple[int, dict[str, Any]]:
    """/readyz's status and JSON detail. natgwd always sends a body; an empty one means
    curl got no answer (status 0), and the detail is then {} so that polling goes on."""
    status, body = daemon.get("/readyz")
    return status, (json.loads(body) if body else {})


# --- natgwd's log ---------------------------------------------------------------------


def _log_lines(daemon: Natgwd) -> list[tuple[str, dict[str, Any] | None]]:
    """Each line of natgwd's log with its JSON object, or None where it is not one."""
    parsed = []
    for line in daemon.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        parsed.append((line, event if isinstance(event, dict) else None))
    return parsed


def log_events(daemon: Natgwd) -> list[dict[str, Any]]:
    """natgwd's JSON log lines. Anything else (a traceback, say) is skipped, so that a
    test can still read the events; tests that must not see such lines also assert
    `not non_json_log_lines(daemon)`."""
    return [event for _, event in _log_lines(daemon) if event is not None]


def non_json_log_lines(daemon: Natgwd) -> list[str]:
    """The log lines that are not a JSON object: exactly those log_events skips."""
    return [line for line, event in _log_lines(daemon) if event is None]


def events_named(daemon: Natgwd, event: str) -> list[dict[str, Any]]:
    return [e for e in log_events(daemon) if e.get("event") == event]


# --- metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleCounters:
    connections: float
    packets_original: float
    packets_reply: float
    bytes_original: float
    bytes_reply: float

    def not_below(self, other: RuleCounters) -> bool:
        """Whether no counter is lower than in `other` (counters never go backwards)."""
        return all(a >= b for a, b in zip(self.values(), other.values(), strict=True))

    def values(self) -> tuple[float, ...]:
        return (self.connections, self.packets_original, self.packets_reply, self.bytes_original, self.bytes_reply)


def samples(daemon: Natgwd) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The /metrics samples keyed by (name, labels as a set), whatever the label order."""
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for key, value in daemon.metrics().items():
        match = _SAMPLE.match(key)
        assert match is not None, f"unparsable sample {key!r}"
        labels = frozenset(_LABEL.findall(match.group("labels") or ""))
        parsed[(match.group("name"), labels)] = value
    return parsed


def rule_counters(daemon: Natgwd, kind: str, name: str, eip: str) -> RuleCounters | None:
    """The rule's counters from /metrics; None when the rule exports none."""
    found = samples(daemon)
    base = {("kind", kind), ("name", name), ("eip", eip)}

    def value(metric: str, direction: str | None = None) -> float | None:
        labels = base | ({("direction", direction)} if direction else set())
        return found.get((metric, frozenset(labels)))

    values = (
        value("natgwd_rule_connections_total"),
        value("natgwd_rule_packets_total", "original"),
        value("natgwd_rule_packets_total", "reply"),
        value("natgwd_rule_bytes_total", "original"),
        value("natgwd_rule_bytes_total", "reply"),
    )
    if all(v is None for v in values):
        return None
    assert None not in values, f"incomplete counters for {kind}/{name}/{eip}: {values}"
    return RuleCounters(*values)  # type: ignore[arg-type]


def wait_counters(
    daemon: Natgwd,
    kind: str,
    name: str,
    eip: str,
    done: Callable[[RuleCounters], bool],
    timeout: float = 10,
) -> RuleCounters:
    """Poll the rule's counters until `done` holds for them; return them."""
    deadline = time.monotonic() + patience(timeout)
    counters = None
    while time.monotonic() < deadline:
        counters = rule_counters(daemon, kind, name, eip)
        if counters is not None and done(counters):
            return counters
        time.sleep(0.05)
    raise TimeoutError(f"counters of {kind}/{name}/{eip} never got there: {counters}")


# --- traffic --------------------------------------------------------------------------


def host_of(answer: str) -> str:
    """The address part of a lab server's "ip:port" answer (fails on anything else)."""
    host, sep, port = answer.rpartition(":")
    assert sep and port.isdigit(), f"not an ip:port answer: {answer!r}"
    return host


def tcp_get(lab: Lab, role: str, address: str, port: int, timeout: float = 2, source: str | None = None) -> str:
    """GET over HTTP from a namespace; the body, or '' when the connection failed."""
    cmd = ["curl", "-s", "-m", str(timeout)]
    if source:
        cmd += ["--interface", source]
    host = f"[{address}]" if ":" in address else address
    result = lab.exec(role, *cmd, f"http://{host}:{port}/", check=False, timeout=timeout + 10)
    return result.stdout if result.returncode == 0 else ""


def wait_listening(lab: Lab, role: str, proto: str, port: int, timeout: float = 10) -> None:
    flag = "-Hlnt" if proto == "tcp" else "-Hlnu"
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        out = lab.exec(role, "ss", flag, f"sport = :{port}", check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {proto}/{port} in {role}")


def udp_sink(lab: Lab, role: str, port: int) -> subprocess.Popen[bytes]:
    """A UDP socket bound to `port` that never answers (and never causes port-unreachables)."""
    script = (
        "import socket,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(('0.0.0.0',{port}))\n"
        "while True: time.sleep(3600)\n"
    )
    process = lab.spawn(role, sys.executable, "-c", script)
    wait_listening(lab, role, "udp", port)
    return process


def serve_tag(lab: Lab, role: str, port: int, tag: str) -> subprocess.Popen[bytes]:
    """An HTTP server answering every request with `tag`, to tell backends apart."""
    script = (
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        body={tag.encode()!r}\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Length',str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "    def log_message(self,*a): pass\n"
        f"http.server.HTTPServer(('0.0.0.0',{port}),H).serve_forever()\n"
    )
    process = lab.spawn(role, sys.executable, "-c", script)
    wait_listening(lab, role, "tcp", port)
    return process


def send_udp(lab: Lab, role: str, address: str, port: int, payloads: Sequence[bytes], source_port: int) -> None:
    """Send datagrams from one socket (one flow) without waiting for answers."""
    script = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(('0.0.0.0',{source_port}))\n"
        f"for p in {list(payloads)!r}:\n"
        f"    s.sendto(p,({address!r},{port}))\n"
    )
    lab.exec(role, sys.executable, "-c", script)


def udp_bytes(payloads: Sequence[bytes] | Sequence[str]) -> int:
    """Total IP length of UDP datagrams carrying these payloads."""
    return sum(UDP_IP_OVERHEAD + len(p) for p in payloads)


# --- addresses and routes -------------------------------------------------------------


def addresses(lab: Lab, role: str) -> dict[str, set[str]]:
    """IPv4 addresses per interface, as "address/prefix"."""
    links = json.loads(lab.exec(role, "ip", "-j", "-4", "addr").stdout)
    return {
        link["ifname"]: {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", ()) if a["family"] == "inet"}
        for link in links
    }


@dataclass(frozen=True)
class RouteEntry:
    dst: str
    gateway: str | None
    dev: str
    onlink: bool


def routes(lab: Lab, role: str) -> set[RouteEntry]:
    """The main table's IPv4 routes."""
    return {
        RouteEntry(r["dst"], r.get("gateway"), r["dev"], "onlink" in r.get("flags", ()))
        for r in json.loads(lab.exec(role, "ip", "-j", "-4", "route").stdout)
    }


def nft_table(lab: Lab) -> str:
    return lab.exec("gw", "nft", "list", "table", "inet", "natgwd").stdout


def natgwd_table_exists(lab: Lab) -> bool:
    """Whether the gateway has natgwd's nftables table (inet natgwd)."""
    return lab.exec("gw", "nft", "list", "table", "inet", "natgwd", check=False).returncode == 0


def gateway_routes(lab: Lab) -> dict[str, dict[str, Any]]:
    """The gateway's main-table IPv4 routes by destination, as `ip -j route` gives them."""
    return {r["dst"]: r for r in json.loads(lab.exec("gw", "ip", "-j", "-4", "route").stdout)}


# The seed's addresses, and a lab server on the upstream host (natgwd.lab.topology.EXTERNAL_HOST).
DNAT_EIP = "10.115.55.200"
FIP_EIP = "10.115.55.201"
UPSTREAM = "10.115.55.254"
UPSTREAM_PORT = 8080


def fetch(lab: Lab, role: str, address: str, port: int, timeout: float = 3) -> str:
    """The client address the lab server saw, or '' when the connection failed."""
    url = f"http://{address}:{port}/"
    return lab.exec(role, "curl", "-s", "-m", str(timeout), url, check=False, timeout=timeout + 10).stdout


def assert_dnat_works(lab: Lab) -> None:
    seen = fetch(lab, "ext", DNAT_EIP, 8888)
    assert seen.startswith(f"{UPSTREAM}:"), f"DNAT {DNAT_EIP}:8888 -> vm1:80 failed: {seen!r}"


def assert_snat_works(lab: Lab) -> None:
    seen = fetch(lab, "vm1", UPSTREAM, UPSTREAM_PORT)
    assert seen.startswith(f"{DNAT_EIP}:"), f"SNAT of vm1 to {DNAT_EIP} failed: {seen!r}"


def assert_fip_works(lab: Lab) -> None:
    seen = fetch(lab, "vm2", UPSTREAM, UPSTREAM_PORT)
    assert seen.startswith(f"{FIP_EIP}:"), f"FIP of vm2 to {FIP_EIP} failed: {seen!r}"


# --- probing ---------------------------------------------------------------------------


def kill_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


CLIENTS = Path(__file__).with_name("clients.py")


def client_command(mode: str, *args: object) -> list[str]:
    """The command line of one of the client programs of clients.py (see its docstring)."""
    return [sys.executable, str(CLIENTS), mode, *map(str, args)]


@dataclass
class Prober:
    """HTTP requests every `interval` seconds from a namespace, each logged with its time."""

    name: str
    path: Path
    process: subprocess.Popen[bytes]

    def results(self) -> list[tuple[float, bool, str]]:
        found = []
        for line in self.path.read_text().splitlines() if self.path.exists() else ():
            when, outcome, *rest = line.split(" ", 2)
            found.append((float(when), outcome == "ok", rest[0] if rest else ""))
        return found


def prober(lab: Lab, role: str, address: str, port: int, name: str, interval: float = 0.05) -> Prober:
    path = lab.workdir / f"probe-{name}.log"
    process = lab.spawn(role, *client_command("http-probe", address, port, interval, path))
    probe = Prober(name, path, process)
    wait_for(lambda: any(ok for _, ok, _ in probe.results()), f"the {name} prober's first success", timeout=10)
    return probe


POD_NETWORK = ("10.244.7.5", "10.244.7.1")  # the gateway's eth0 and the node (Prometheus) beside it


def pod_network(lab: Lab) -> str:
    """A namespace "pod" for the node beside the gateway's eth0 (the pod network, where the
    kubelet probes and Prometheus scrapes); the gateway's address there."""
    gateway, node = POD_NETWORK
    lab._add_ns("pod")
    lab._veth("gw", "eth0", "pod", "eth0")
    for role, address in (("gw", gateway), ("pod", node)):
        lab.exec(role, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        lab.exec(role, "ip", "link", "set", "eth0", "up")
    return gateway
