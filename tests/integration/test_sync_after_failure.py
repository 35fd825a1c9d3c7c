"""The one sync path on the real kernel: a transaction refused before it reaches the
kernel (so the ruleset generation does not move), then a resync. The table must read back
exactly as planned, with no chain's rules doubled, and per-rule counters must equal the
traffic sent (a doubled `account` rule would count every packet twice); a share group's
chain is emptied with its last backend and deleted by the next transaction.

The reconciler runs in a helper process inside the lab's gateway namespace, with the nft
shell wrapped to refuse one transaction on request: the test hook.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from natgwd.kernel.nft import parse_table
from natgwd.lab.topology import EXTERNAL_HOST, Lab
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import TableContents
from natgwd.state.validation import load_state
from tests.integration.helpers import send_udp, udp_bytes, udp_sink

HELPER = r"""
import json, sys
from natgwd.kernel.netlink import Netlink, ensure_forwarding
from natgwd.kernel.nft import KernelNft, NftError
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.validation import load_state


class RefusingNft(KernelNft):
    refuse_next = False

    def apply(self, tx):
        if self.refuse_next:
            self.refuse_next = False
            raise NftError("refused by the test")
        super().apply(tx)


nft = RefusingNft()
reconciler = Reconciler(nft, Netlink(), ensure_forwarding)
steps = []
for line in sys.stdin:
    step = json.loads(line)
    state = load_state(json.dumps(step["state"]).encode())
    if step["refuse"]:
        before = nft.generation()
        nft.refuse_next = True
        try:
            reconciler.apply(state)
        except NftError:
            steps.append({"refused": True, "generation_moved": nft.generation() != before})
        outcome = reconciler.resync()
    else:
        outcome = reconciler.apply(state)
    steps.append({"operations": outcome.nft_operations, "repairs": outcome.repairs})
print(json.dumps(steps))
"""


def seed_with_share(seed: dict[str, Any]) -> dict[str, Any]:
    shared = json.loads(json.dumps(seed))
    shared["dnat"].append(
        {
            "name": "web-0",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": 9000,
            "internalIp": "172.20.10.2",
            "internalPort": 80,
            "type": "share",
        }
    )
    return shared


def moved_dnat(seed: dict[str, Any]) -> dict[str, Any]:
    moved = json.loads(json.dumps(seed))
    moved["dnat"][0]["internalIp"] = "172.20.10.4"
    return moved


def run_reconciler(lab: Lab, *states: dict[str, Any], refuse_second: bool = False) -> list[dict[str, Any]]:
    """Apply the states in turn; with `refuse_second`, the second one's transaction is
    refused and a resync follows."""
    lines = "".join(
        json.dumps({"state": state, "refuse": refuse_second and index == 1}) + "\n"
        for index, state in enumerate(states)
    )
    done = lab.exec("gw", sys.executable, "-c", HELPER, stdin=lines, timeout=60)
    steps: list[dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])  # after the log lines
    return steps


def kernel_table(lab: Lab) -> TableContents:
    listing = json.loads(lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd").stdout)
    return parse_table(listing["nftables"])


def planned(state: dict[str, Any]) -> TableContents:
    desired = load_state(json.dumps(state).encode())
    # A fresh kernel: the reconciler gives ids in rule order from 1, as assign_ids does.
    return desired_table(desired, assign_ids(desired, {})).contents()


def test_resync_after_a_refused_transaction_leaves_exactly_the_plan(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: a resync after a refused apply re-creating the table on top of itself
    (every chain's rules doubled, every packet counted twice)."""
    steps = run_reconciler(lab, seed_state, moved_dnat(seed_state), refuse_second=True)
    assert steps[1] == {"refused": True, "generation_moved": False}
    assert steps[2] == {"operations": 0, "repairs": {}}, "the resync found nothing to do"
    kernel = kernel_table(lab)
    assert kernel == planned(seed_state)
    assert {name: len(tags) for name, tags in kernel.chains.items()} == {
        name: len(tags) for name, tags in planned(seed_state).chains.items()
    }

    # Counters equal the traffic: five datagrams of one flow through SNAT (rule id 1).
    sink = udp_sink(lab, "ext", 5353)
    try:
        payloads = [b"x" * size for size in (10, 20, 30, 40, 50)]
        send_udp(lab, "vm1", EXTERNAL_HOST, 5353, payloads, source_port=40000)
    finally:
        sink.kill()
    counted = kernel_table(lab).elements
    connections = counted["rule_connections_1"]["1"].counter  # rule 1's shard
    assert connections is not None
    assert (connections.packets, connections.bytes) == (
        1,
        udp_bytes(payloads[:1]),
    )
    traffic = counted["rule_traffic_1"]["original . 1"].counter
    assert traffic is not None
    assert (traffic.packets, traffic.bytes) == (5, udp_bytes(payloads))


def test_a_share_groups_chain_is_deleted_in_the_transaction_after_its_last_jump(
    lab: Lab, seed_state: dict[str, Any]
) -> None:
    """Prevents: deleting a share chain in the transaction that deletes the verdict-map
    element jumping to it, which kernels before 6.2 refuse (the whole change would fail)."""
    steps = run_reconciler(lab, seed_with_share(seed_state), seed_state, seed_state)
    # The third is a plain apply of the same state: it only deletes the emptied chain.
    assert steps[2] == {"operations": 1, "repairs": {}}
    kernel = kernel_table(lab)
    assert not [name for name in kernel.chains if name.startswith("share_")]
    assert kernel.chains == planned(seed_state).chains
