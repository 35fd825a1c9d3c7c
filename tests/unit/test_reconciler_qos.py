"""natgwd.runtime.reconciler with a shaper: QoS applied after the interfaces, skipped when
unchanged, verified at every resync (changes then count as repairs), and its failures
reported without stopping NAT."""

from __future__ import annotations

import json
from typing import Any

from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.qos.plan import ClassStats, QosWants, TcReport
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeLinks


class FakeShaper:
    def __init__(self) -> None:
        self.applied: list[QosWants] = []
        self.next_report = TcReport()
        self.fail: Exception | None = None
        self.leaf = None

    def apply(self, wants: QosWants) -> TcReport:
        if self.fail is not None:
            raise self.fail
        self.applied.append(wants)
        report, self.next_report = self.next_report, TcReport()
        return report

    def stats(self, external: str) -> list[ClassStats]:
        return []


def state(rate: int | None = None, dnat_port: str = "8888") -> Any:
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["dnat"][0]["externalPort"] = dnat_port
    if rate is not None:
        doc["qosPolicies"] = [
            {"name": "p", "bandwidthLimitRules": [{"name": "i", "direction": "ingress", "rateMax": rate}]}
        ]
        doc["eips"][0]["qosPolicy"] = "p"
    return load_state(json.dumps(doc).encode())


def make(links: FakeLinks | None = None) -> tuple[Reconciler, FakeShaper]:
    shaper = FakeShaper()
    return Reconciler(FakeNft(), links or FakeLinks(), ensure_forwarding=lambda: False, qos=shaper), shaper


def test_qos_applied_and_skipped_when_unchanged_but_verified_at_resync() -> None:
    rec, shaper = make()
    rec.apply(state(10))
    assert len(shaper.applied) == 1
    assert shaper.applied[0].active("ingress") and not shaper.applied[0].active("egress")
    rec.apply(state(10, dnat_port="9999"))  # a NAT change only
    assert len(shaper.applied) == 1
    rec.apply(state(20))
    assert len(shaper.applied) == 2
    shaper.next_report = TcReport(changes=["add ifb ifb-net2"])
    outcome = rec.resync()
    assert len(shaper.applied) == 3
    assert outcome.repairs == {"qos": 1} and outcome.qos_changes == ["add ifb ifb-net2"]
    rec.apply(state(None))  # QoS removed: the shaper is told, to remove its trees
    assert not shaper.applied[-1].active("ingress")


def test_qos_errors_make_the_outcome_incomplete_and_are_retried() -> None:
    rec, shaper = make()
    shaper.next_report = TcReport(errors=["egress QoS not applied: net2 has a root qdisc tbf 1: ..."])
    outcome = rec.apply(state(10))
    assert not outcome.complete and outcome.qos_errors == ["egress QoS not applied: net2 has a root qdisc tbf 1: ..."]
    rec.apply(state(10))  # the same state again: tried again, since it failed
    assert len(shaper.applied) == 2


def test_a_shaper_crash_does_not_stop_nat() -> None:
    rec, shaper = make()
    shaper.fail = ValueError("no free class id")
    outcome = rec.apply(state(10))
    assert outcome.qos_errors == ["traffic control: ValueError: no free class id"]
    assert outcome.nft_operations > 0


def test_no_qos_while_the_external_interface_is_missing() -> None:
    rec, shaper = make(FakeLinks(missing=("net2",)))
    rec.apply(state(10))
    assert shaper.applied == []
