"""`make demo` (python -m natgwd.lab.demo) shows traffic through SNAT, DNAT and the floating IP
both ways, with the floating IP's counters (issue 17, item 6). The demo builds and removes
its own lab."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def sections(output: str) -> dict[str, str]:
    """The demo's "== title" sections and their text."""
    found: dict[str, str] = {}
    for block in output.split("\n== ")[1:]:
        title, _, text = block.partition("\n")
        found[title] = text.strip()
    return found


def test_demo_sends_traffic_through_the_floating_ip_both_ways() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    done = subprocess.run([sys.executable, "-m", "natgwd.lab.demo"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = sections(done.stdout)
    out = next(text for title, text in shown.items() if title.startswith("HTTP from vm2"))
    into = next(text for title, text in shown.items() if title.startswith("HTTP from ext in to the floating IP"))
    assert out.startswith("10.115.55.201:"), out  # vm2 leaves as its floating IP
    assert into.startswith("10.115.55.254:"), into  # ext reaches vm2 at the floating IP, its address kept
    counters = next(text for title, text in shown.items() if title.startswith("the floating IP's counters"))
    assert 'natgwd_rule_connections_total{kind="fip",name="fip01",eip="10.115.55.201"} 2' in counters.splitlines()
    assert "cleaned up: every namespace and process of the demo is gone" in shown
