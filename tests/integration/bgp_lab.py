"""An upstream router running BIRD (a BGP implementation other than natgwd's FRR) in a lab
namespace, and routed EIPs: addresses in no subnet the upstream is connected to, reached
only through the /32 and /128 routes natgwd announces.

BIRD runs in the foreground under the lab (killed on close); birdc talks to it over its
control socket in the lab's directory.
"""

from __future__ import annotations

import copy
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natgwd.lab.topology import DUAL_STACK_STATE, Lab
from tests.integration.helpers import wait_for

GATEWAY_ASN, UPSTREAM_ASN = 65001, 65000
# Benchmarking and unique local ranges, outside every lab subnet.
ROUTED = {"my-eip": ("198.19.100.10", "fd00:119::10"), "my-eip2": ("198.19.100.11", "fd00:119::11")}
FAST_BFD = {"minRx": 100, "minTx": 100, "multiplier": 3}


def routed_state(neighbors: list[dict[str, Any]], ipv6: bool = True, **bgp: Any) -> dict[str, Any]:
    """The dual-stack seed (or its IPv4 half) with routed EIPs and a bgp section."""
    state: dict[str, Any] = copy.deepcopy(DUAL_STACK_STATE)
    for eip in state["eips"]:
        v4, v6 = ROUTED[eip["name"]]
        eip["v4ip"] = v4
        if ipv6:
            eip["v6ip"] = v6
        else:
            eip.pop("v6ip", None)
    if not ipv6:
        state["internal"]["addresses"] = state["internal"]["addresses"][:1]
        state["internal"]["routes"] = state["internal"]["routes"][:1]
        state["external"] = {k: v for k, v in state["external"].items() if k != "gateway6"}
        state["external"]["addresses"] = state["external"]["addresses"][:1]
        for kind, field in (("snat", "internalCIDR"), ("dnat", "internalIp"), ("fip", "internalIp")):
            state[kind] = [r for r in state[kind] if ":" not in r[field]]
    state["bgp"] = {"asn": GATEWAY_ASN, "neighbors": neighbors, **bgp}
    return state


@dataclass(frozen=True)
class Peer:
    """One BGP session of the upstream router, to `address` (a gateway)."""

    name: str
    local: str
    address: str
    asn: int = GATEWAY_ASN
    password: str | None = None


class Bird:
    def __init__(self, lab: Lab, role: str, router_id: str, peers: list[Peer], bfd: bool = True) -> None:
        self.lab, self.role, self.router_id, self.bfd = lab, role, router_id, bfd
        self.directory = lab.workdir / f"bird-{role}"
        self.directory.mkdir(exist_ok=True)
        self.conf = self.directory / "bird.conf"
        self.socket = self.directory / "bird.ctl"
        self.write(peers)
        self.process = lab.spawn(
            role,
            *("bird", "-f", "-c", str(self.conf), "-s", str(self.socket), "-P", str(self.directory / "bird.pid")),
            log_path=self.directory / "bird.log",
        )
        wait_for(lambda: self.socket.exists() and self.birdc("show status").returncode == 0, "BIRD to answer")

    def write(self, peers: list[Peer]) -> None:
        lines = [
            f"router id {self.router_id};",
            "protocol device {}",
            # Routes go into the kernel at once (no scan wait): traffic follows them.
            "protocol kernel k4 { ipv4 { import none; export all; }; }",
            "protocol kernel k6 { ipv6 { import none; export all; }; }",
        ]
        if self.bfd:
            lines.append(
                'protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }'
            )
        for peer in peers:
            family = "ipv6" if ":" in peer.address else "ipv4"
            lines += [
                f"protocol bgp {peer.name} {{",
                f"  local {peer.local} as {UPSTREAM_ASN};",
                f"  neighbor {peer.address} as {peer.asn};",
                f"  {family} {{ import all; export none; }};",
                # BIRD keeps a session with BFD Idle for its error wait after a BFD failure
                # (60 s by default): short waits let a returning gateway in quickly.
                "  error wait time 1, 5;",
                "  connect retry time 1;",
                *(["  bfd on;"] if self.bfd else []),
                *([f'  password "{peer.password}";'] if peer.password else []),
                "}",
            ]
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.conf)

    def reconfigure(self, peers: list[Peer]) -> None:
        self.write(peers)
        result = self.birdc("configure")
        assert "Reconfigured" in result.stdout or "Reconfiguration in progress" in result.stdout, result.stdout

    def birdc(self, *command: str) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.role, "birdc", "-s", str(self.socket), *command, check=False)

    def state(self, protocol: str) -> str:
        """The protocol's BGP state as BIRD shows it (Established, Active, Idle...)."""
        for line in self.birdc("show", "protocols", protocol).stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == protocol:
                return parts[-1] if len(parts) >= 6 else parts[3]
        return ""

    def wait_established(self, *protocols: str, timeout: float = 30) -> None:
        for protocol in protocols:
            wait_for(lambda p=protocol: self.state(p) == "Established", f"BGP {protocol} established", timeout=timeout)  # type: ignore[misc]

    def bfd_up(self, address: str) -> bool:
        """Whether BIRD's BFD session with `address` is up (BGP then falls with it)."""
        for line in self.birdc("show", "bfd", "sessions").stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == address:
                return len(parts) > 2 and parts[2] == "Up"
        return False

    def log(self) -> str:
        path = self.directory / "bird.log"
        return path.read_text(errors="replace") if path.exists() else ""


def kernel_route(lab: Lab, role: str, prefix: str) -> str | None:
    """The upstream's kernel route to an EIP: its nexthop address, or None."""
    family = "-6" if ":" in prefix else "-4"
    out = lab.exec(role, "ip", family, "route", "show", prefix, check=False).stdout.split()
    return out[out.index("via") + 1] if "via" in out else None


def wait_route(lab: Lab, role: str, prefix: str, via: str | None, timeout: float = 20) -> None:
    wait_for(lambda: kernel_route(lab, role, prefix) == via or None, f"{prefix} via {via} in {role}", timeout=timeout)


def frr_run_dir(lab: Lab, name: str) -> Path:
    """A directory for FRR (which drops its privileges to user frr) the frr user can reach."""
    os.chmod(lab.workdir, 0o711)
    return lab.workdir / name / "frr"
