"""A state that only adds an EIP or a route: the reconciler adds that alone (Netlink.add,
trusting the last verified apply) and the kernel ends exactly where a full apply puts it,
which the next resync confirms by finding nothing to repair. On the real kernel, in the
lab's gateway namespace."""

from __future__ import annotations

import json
import sys
from typing import Any

from natgwd.lab.topology import Lab

HELPER = r"""
import json, sys
from natgwd.kernel.netlink import Netlink, ensure_forwarding
from natgwd.kernel.nft import KernelNft
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.validation import load_state


class CountingNetlink(Netlink):
    # Which path each plan took: `add` (what it adds alone) or `apply` (the whole plan).
    def __init__(self):
        self.paths = []

    def add(self, before, after):
        report = super().add(before, after)
        self.paths.append("add" if report is not None else "declined")
        return report

    def apply(self, plan):
        self.paths.append("apply")
        return super().apply(plan)


links = CountingNetlink()
reconciler = Reconciler(KernelNft(), links, ensure_forwarding)
results = []
for line in sys.stdin:
    step = json.loads(line)
    links.paths.clear()
    if step.get("resync"):
        outcome = reconciler.resync()
    else:
        outcome = reconciler.apply(load_state(json.dumps(step["state"]).encode()))
    results.append({"paths": list(links.paths), "changes": outcome.link_changes, "repairs": outcome.repairs})
print(json.dumps(results))
"""


def with_more(seed: dict[str, Any]) -> dict[str, Any]:
    more = json.loads(json.dumps(seed))
    more["eips"].append({"name": "eip-more", "v4ip": "10.115.55.230"})
    more["snat"].append({"name": "snat-more", "eip": "eip-more", "internalCIDR": "172.20.10.64/26"})
    more["internal"].setdefault("routes", []).append({"dst": "172.31.0.0/16", "via": "172.20.10.1"})
    return more


def test_an_added_eip_and_route_are_added_alone_and_match_a_full_apply(lab: Lab, seed_state: dict[str, Any]) -> None:
    steps = [{"state": seed_state}, {"state": with_more(seed_state)}, {"resync": True}]
    done = lab.exec("gw", sys.executable, "-c", HELPER, stdin="".join(json.dumps(s) + "\n" for s in steps), timeout=60)
    first, added, resync = json.loads(done.stdout.splitlines()[-1])
    assert first["paths"] == ["apply"]
    assert added["paths"] == ["add"]
    assert sorted(added["changes"]) == [
        "add address 10.115.55.230/21 dev net2",  # the prefix of the external subnet
        "route 172.31.0.0/16 via 172.20.10.1 dev net1",
    ]
    assert resync["paths"] == ["apply"] and resync["repairs"] == {}, "the resync found what a full apply would do"
    shown = lab.exec("gw", "ip", "-4", "-o", "addr", "show", "dev", "net2").stdout
    assert "10.115.55.230/21" in shown
    route = lab.exec("gw", "ip", "-4", "route", "show", "172.31.0.0/16").stdout
    assert "via 172.20.10.1 dev net1" in route
