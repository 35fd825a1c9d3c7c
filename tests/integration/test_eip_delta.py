"""EIPs added on the delta path (natgwd.state.eipdelta) on the real kernel: when the kernel
refuses one of their addresses, the others of the batch are deleted again and the table is
left as it was, so the last good state keeps translating; the same change then applied
adds every address and translates to the new EIP. In the lab's gateway namespace, with
the reconciler in a process of its own whose address requests the test can spoil."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from natgwd.lab.topology import EXTERNAL_HOST, Lab
from natgwd.planning.table import FAMILY, TABLE
from tests.integration.helpers import tcp_get

HELPER = r"""
import json, sys
from natgwd.kernel import netlink
from natgwd.kernel.netlink import Netlink, ensure_forwarding
from natgwd.kernel.nft import KernelNft
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.tracker import StateTracker

real_new_address = netlink.new_address
refused = set()


def new_address(index, address, proto, flags=0):
    # The kernel refuses an IPv4 prefix longer than 32 bits (EINVAL): a genuine refusal
    # amid a batch of good requests.
    request = real_new_address(index, address, proto, flags)
    if str(address.ip) in refused:
        body = bytearray(request.body)
        body[1] = 33
        request = type(request)(request.kind, request.flags, bytes(body))
    return request


netlink.new_address = new_address
tracker, reconciler = StateTracker(), Reconciler(KernelNft(), Netlink(), ensure_forwarding)
for line in sys.stdin:
    step = json.loads(line)
    refused.clear()
    refused.update(step.get("refuse", ()))
    try:
        change = tracker.check_document(step["state"])
        outcome = reconciler.apply(change.state, change.delta, change.base)
    except OSError as err:
        print("RESULT", json.dumps({"error": str(err)}), flush=True)
        continue
    tracker.accept(change)
    print("RESULT", json.dumps({"by_delta": outcome.by_delta, "complete": outcome.complete}), flush=True)
"""

NEW_EIPS = [{"name": "eip-new", "v4ip": "10.115.55.230"}, {"name": "eip-refused", "v4ip": "10.115.55.231"}]


def with_new_eips(seed: dict[str, Any]) -> dict[str, Any]:
    """The seed with two EIPs appended and a DNAT rule on the first, as calls make it."""
    dnat = {"name": "dnat-new", "eip": "eip-new", "protocol": "tcp", "externalPort": 9000}
    dnat |= {"internalIp": "172.20.10.2", "internalPort": 80}
    return {**seed, "eips": [*seed["eips"], *NEW_EIPS], "dnat": [*seed["dnat"], dnat]}


def net2_addresses(lab: Lab) -> set[str]:
    shown = lab.exec("gw", "ip", "-4", "-o", "addr", "show", "dev", "net2").stdout
    return {line.split()[3] for line in shown.splitlines()}


def table(lab: Lab) -> Any:
    return json.loads(lab.exec("gw", "nft", "-j", "list", "table", FAMILY, TABLE).stdout)


def test_a_refused_eip_address_leaves_the_last_state_and_the_change_applies_later(
    lab: Lab, seed_state: dict[str, Any]
) -> None:
    lab.serve("vm1", tcp=[80], tag="vm1")
    helper = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("gw"), sys.executable, "-c", HELPER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def step(state: dict[str, Any], refuse: tuple[str, ...] = ()) -> dict[str, Any]:
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.write(json.dumps({"state": state, "refuse": refuse}) + "\n")
        helper.stdin.flush()
        while not (line := helper.stdout.readline()).startswith("RESULT "):  # past natgwd's log lines
            assert line, "the helper ended"
        answer: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
        return answer

    try:
        assert step(seed_state) == {"by_delta": False, "complete": True}
        assert tcp_get(lab, "ext", "10.115.55.200", 8888).endswith("@vm1")
        before_addresses, before_table = net2_addresses(lab), table(lab)  # its counters included

        wanted = with_new_eips(seed_state)
        refused = step(wanted, refuse=("10.115.55.231",))
        assert "add address 10.115.55.231/21 dev net2" in refused.get("error", ""), refused
        assert net2_addresses(lab) == before_addresses, "the address added with it was deleted again"
        assert table(lab) == before_table
        assert tcp_get(lab, "ext", "10.115.55.200", 8888).endswith("@vm1"), "the last good state translates"
        assert tcp_get(lab, "ext", "10.115.55.230", 9000) == ""

        assert step(wanted) == {"by_delta": True, "complete": True}
        assert {"10.115.55.230/21", "10.115.55.231/21"} <= net2_addresses(lab)
        answer = tcp_get(lab, "ext", "10.115.55.230", 9000)
        assert answer.startswith(f"{EXTERNAL_HOST}:") and answer.endswith("@vm1"), answer

        # eip-del of both: their addresses go with the DNAT rule.
        assert step(seed_state) == {"by_delta": True, "complete": True}
        assert net2_addresses(lab) == before_addresses
        assert tcp_get(lab, "ext", "10.115.55.230", 9000) == ""
        assert tcp_get(lab, "ext", "10.115.55.200", 8888).endswith("@vm1")
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        try:
            helper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        if helper.stdout is not None:
            helper.stdout.close()
