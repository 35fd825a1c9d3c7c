"""The daemon applies a change of rules on the delta path, and every resync checks what the
deltas built against the full path: a difference (a bug) is counted in
natgwd_delta_mismatches_total and repaired by applying the file in full. Against the
in-memory nftables stand-in, without root."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.plan import TableChange, TablePlan, assign_ids, desired_table
from natgwd.runtime.daemon import Daemon
from natgwd.state.rules import Rule
from natgwd.state.validation import load_state
from tests.unit.test_readiness_wording import daemon_on


def write(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    os.replace(tmp, path)


def moved(document: dict[str, Any], address: str) -> dict[str, Any]:
    changed: dict[str, Any] = json.loads(json.dumps(document))
    changed["dnat"][0]["internalIp"] = address
    return changed


def sample(daemon: Daemon, name: str, **labels: str) -> float | None:
    return daemon.registry.get_sample_value(name, labels)


def kernel_of(daemon: Daemon) -> Any:
    nft = daemon.reconciler.nft
    assert isinstance(nft, FakeNft) and nft.table is not None
    return nft.table


def full_plan_of(document: dict[str, Any]) -> Any:
    state = load_state(json.dumps(document).encode())
    return desired_table(state, assign_ids(state, {})).contents()


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    path = tmp_path / "state.json"
    write(path, SEED_STATE)
    daemon = daemon_on(path)
    daemon.step()
    assert sample(daemon, "natgwd_state_changes_total", path="full") == 1
    return daemon


def test_a_changed_rule_takes_the_delta_path_and_the_resync_confirms_it(daemon: Daemon) -> None:
    write(daemon.config.state_path, moved(SEED_STATE, "172.20.10.9"))
    daemon.step()
    assert sample(daemon, "natgwd_state_changes_total", path="delta") == 1
    assert kernel_of(daemon) == full_plan_of(moved(SEED_STATE, "172.20.10.9"))
    daemon.resync()
    assert sample(daemon, "natgwd_delta_mismatches_total") == 0
    assert sample(daemon, "natgwd_state_changes_total", path="full") == 1  # nothing applied again


def test_a_delta_that_differs_from_the_full_path_is_counted_and_repaired(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_change = TablePlan.change

    def losing_an_element(
        self: TablePlan, state: Any, removed: list[Rule], added: list[Rule], *eips: Any
    ) -> TableChange:
        # A planted bug: the change forgets the new DNAT target.
        change = real_change(self, state, removed, added, *eips)
        change.elements["dnat_target"].clear()
        return change

    monkeypatch.setattr(TablePlan, "change", losing_an_element)
    write(daemon.config.state_path, moved(SEED_STATE, "172.20.10.9"))
    daemon.step()
    assert sample(daemon, "natgwd_state_changes_total", path="delta") == 1
    assert kernel_of(daemon) != full_plan_of(moved(SEED_STATE, "172.20.10.9"))
    with capture_logs() as logs:
        daemon.resync()
    assert sample(daemon, "natgwd_delta_mismatches_total") == 1
    assert any(entry["event"].startswith("a change applied rule by rule differs") for entry in logs)
    assert kernel_of(daemon) == full_plan_of(moved(SEED_STATE, "172.20.10.9"))
    assert sample(daemon, "natgwd_state_changes_total", path="full") == 2
