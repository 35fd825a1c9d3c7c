"""The edit service copies the document's frame on write: a call's working copy shares the
EIPs (and rules) of the document it edits, and an edit that changes an EIP's fields (its
QoS) replaces it with a copy. So the document a call started from stays exactly as it was,
whatever the call does (a refused call changes nothing), and the EIPs a call did not touch
are the very objects of the document before it (the edit log's diff and natgwd's change
tracker find them unchanged by identity, at the cost of the change)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from natgwd.kubeovn.shim.call import Call, edited, prepare
from natgwd.kubeovn.shim.edits import Context
from natgwd.lab.topology import SEED_STATE


def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["eips"] += [{"name": f"eip-{i}", "v4ip": f"10.115.55.{210 + i}"} for i in range(5)]
    doc["qosPolicies"] = [
        {
            "name": "qos-10-115-55-211",
            "bindingType": "EIP",
            "bandwidthLimitRules": [{"name": "ingress", "direction": "ingress", "rateMax": "10", "burstMax": "10"}],
        }
    ]
    doc["eips"][-4]["qosPolicy"] = "qos-10-115-55-211"
    return doc


@pytest.mark.parametrize(
    ("argv", "touched"),
    [
        (("eip-ingress-qos-add", "10.115.55.210,1,20,20"), {"10.115.55.210"}),
        (("eip-egress-qos-add", "10.115.55.211,1,5,5"), {"10.115.55.211"}),
        (("eip-ingress-qos-del", "10.115.55.211"), {"10.115.55.211"}),
        (("eip-add", "10.115.55.230/24"), set()),
        (("eip-del", "10.115.55.212/24"), set()),
        (("dnat-add", "10.115.55.213,8080,tcp,172.20.10.9,80"), set()),
    ],
)
def test_a_call_leaves_its_document_as_it_was_and_shares_the_eips_it_did_not_touch(
    argv: tuple[str, ...], touched: set[str]
) -> None:
    doc = document()
    snapshot = json.loads(json.dumps(doc))
    call = prepare(argv, lambda: None)  # type: ignore[arg-type, return-value]
    assert isinstance(call, Call)
    after = edited(call, doc, Context("10.115.55.254"), Path("/nonexistent/state.json"))
    assert doc == snapshot, "the call changed the document it started from"
    before_ids = {id(eip) for eip in doc["eips"]}
    for eip in after["eips"]:
        shared = id(eip) in before_ids
        assert shared == (eip["v4ip"] not in touched and eip["v4ip"] != "10.115.55.230"), eip
    assert after != snapshot
