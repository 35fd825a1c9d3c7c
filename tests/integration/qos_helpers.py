"""iperf3 between the lab's namespaces, for the QoS tests: servers, clients, and the
shaped-rate check (generous bounds: this machine is shared)."""

from __future__ import annotations

import json
import subprocess

from natgwd.lab.topology import Lab
from tests.integration.helpers import wait_listening

PAYLOAD = 1448 / 1514  # TCP payload per Ethernet frame at MTU 1500 with timestamps
TOLERANCE = 0.2
MBIT = 1_000_000


def iperf_server(lab: Lab, role: str, port: int) -> subprocess.Popen[bytes]:
    process = lab.spawn(role, "iperf3", "-s", "-p", str(port))
    wait_listening(lab, role, "tcp", port)
    return process


def iperf_command(lab: Lab, role: str, address: str, port: int, seconds: int) -> list[str]:
    """iperf3 from a namespace to `address`, JSON out, the first second left out."""
    client = ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-O", "1", "-J"]
    return ["ip", "netns", "exec", lab.ns(role), *client]


def received(output: str) -> float:
    """Bits per second the receiver got (the omitted first second left out)."""
    report = json.loads(output)
    assert "error" not in report, report["error"]
    return float(report["end"]["sum_received"]["bits_per_second"])


def iperf(lab: Lab, role: str, address: str, port: int, seconds: int = 3) -> float:
    command = iperf_command(lab, role, address, port, seconds)
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=False)
    return received(result.stdout)


def assert_shaped(measured: float, limit_mbit: float, what: str) -> None:
    expected = limit_mbit * MBIT * PAYLOAD
    low, high = expected * (1 - TOLERANCE), expected * (1 + TOLERANCE)
    assert low <= measured <= high, f"{what}: {measured / MBIT:.2f} Mbit/s, expected {expected / MBIT:.2f} ± 20%"
