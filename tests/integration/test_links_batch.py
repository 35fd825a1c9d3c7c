"""Addresses are sent to the kernel many to a send (natgwd.kernel.rtbatch): a refusal in
the middle of a batch is named with the kernel's reason, every other address of the batch
is added all the same (as one request at a time did), and the report says exactly what
changed, so the reconciler's retry finishes the job. On the real kernel, in a namespace of
the test's own (IPv6 disabled on net1 makes the kernel refuse net1's IPv6 address)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from natgwd.kernel.rtbatch import CHUNK

REFUSED = "fd00:10::fe/64"
NET1_ADDED = [f"172.21.0.{i}/16" for i in range(1, CHUNK + 37)]  # the refusal lands in the second send
NET2_ADDED = [f"10.115.49.{i}/21" for i in range(1, 31)]

HELPER = r"""
import json, sys
from ipaddress import ip_interface
from pyroute2 import IPRoute
from natgwd.kernel.netlink import NATGWD_PROTO, Netlink
from natgwd.planning.links import InterfaceSpec, LinkPlan

def plan(net1, net2):
    spec = lambda name, addresses: InterfaceSpec(name, frozenset(map(ip_interface, addresses)))
    return LinkPlan((spec("net1", net1), spec("net2", net2)), ())

def kernel():
    # pyroute2's own dump: what the kernel holds, read independently of natgwd.kernel.rtbatch
    with IPRoute() as ipr:
        return {
            name: sorted(
                f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}"
                for m in ipr.get_addr(index=ipr.link_lookup(ifname=name)[0])
                if m.get("IFA_PROTO") == NATGWD_PROTO
            )
            for name in ("net1", "net2")
        }

step = json.loads(sys.stdin.read())
netlink = Netlink()
before = plan(*step["before"])
after = plan(*step["after"])
if step["how"] == "add":
    report = netlink.add(before, after)
else:
    report = netlink.apply(after)
print(json.dumps({"changes": report.changes, "errors": report.errors, "missing": report.missing, "kernel": kernel()}))
"""

BASE = (["172.20.10.254/24"], ["10.115.48.1/21"])
WANTED = (["172.20.10.254/24", *NET1_ADDED, REFUSED], ["10.115.48.1/21", *NET2_ADDED])


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60, **kwargs)


@pytest.fixture
def namespace() -> Iterator[str]:
    from tests.conftest import _integration_unavailable

    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    name = "ngwlb" + secrets.token_hex(3)
    _run(["ip", "netns", "add", name])
    try:
        for command in (
            ["link", "add", "net1", "type", "veth", "peer", "name", "net1-peer"],
            ["link", "add", "net2", "type", "veth", "peer", "name", "net2-peer"],
        ):
            _run(["ip", "-n", name, *command])
        _sysctl(name, "net1", 1)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=60)


def _sysctl(namespace: str, interface: str, disabled: int) -> None:
    _run(["ip", "netns", "exec", namespace, "sysctl", "-qw", f"net.ipv6.conf.{interface}.disable_ipv6={disabled}"])


def _links(namespace: str, how: str, before: tuple[list[str], list[str]], after: tuple[list[str], list[str]]) -> Any:
    step = json.dumps({"how": how, "before": before, "after": after})
    done = _run(["ip", "netns", "exec", namespace, sys.executable, "-c", HELPER], input=step)
    return json.loads(done.stdout.splitlines()[-1])


def _refusal_of_the_ipv6_address(errors: list[str]) -> None:
    assert len(errors) == 1, errors
    # EACCES, and the kernel's own words for it (extended acknowledgement)
    assert errors[0].startswith(f"add address {REFUSED} dev net1: (13, "), errors
    assert "IPv6 is disabled" in errors[0], errors


def test_a_refused_address_amid_a_batch_is_named_and_the_others_are_added(namespace: str) -> None:
    first = _links(namespace, "apply", BASE, BASE)
    assert first["errors"] == [] and first["missing"] == []
    assert first["kernel"] == {"net1": ["172.20.10.254/24"], "net2": ["10.115.48.1/21"]}

    # The delta path: 131 addresses in one batch over several sends, the refused one among them.
    added = _links(namespace, "add", BASE, WANTED)
    _refusal_of_the_ipv6_address(added["errors"])
    assert added["changes"] == [f"add address {a} dev net1" for a in NET1_ADDED] + [
        f"add address {a} dev net2" for a in NET2_ADDED
    ]
    held = {"net1": sorted(["172.20.10.254/24", *NET1_ADDED]), "net2": sorted(["10.115.48.1/21", *NET2_ADDED])}
    assert added["kernel"] == held

    # The reconciler's retry is a full apply: the same refusal, nothing else to change.
    retried = _links(namespace, "apply", WANTED, WANTED)
    _refusal_of_the_ipv6_address(retried["errors"])
    assert retried["changes"] == [] and retried["kernel"] == held

    # Once the kernel accepts it, the retry adds that address alone.
    _sysctl(namespace, "net1", 0)
    done = _links(namespace, "apply", WANTED, WANTED)
    assert done["errors"] == [] and done["changes"] == [f"add address {REFUSED} dev net1"]
    assert done["kernel"]["net1"] == sorted([*held["net1"], REFUSED])

    # And a full apply of the first plan removes every address it added, in batches too.
    back = _links(namespace, "apply", WANTED, BASE)
    assert back["errors"] == []
    assert sorted(back["changes"]) == sorted(f"delete address {a}" for a in [*NET1_ADDED, REFUSED, *NET2_ADDED])
    assert back["kernel"] == {"net1": ["172.20.10.254/24"], "net2": ["10.115.48.1/21"]}
