"""natgwd.runtime.collector: the cycle collector is paused while the daemon validates and
applies the state file, and as it was afterwards, whatever happened."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.runtime import collector
from natgwd.runtime.statefile import Reading
from natgwd.state.tracker import StateTracker
from tests.unit.test_readiness_wording import daemon_on


@pytest.fixture(autouse=True)
def collector_enabled() -> Iterator[None]:
    gc.enable()
    yield
    gc.enable()


def test_paused_in_the_block_and_enabled_after_it_also_after_an_error() -> None:
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("refused")
    assert gc.isenabled()


def test_a_collector_paused_already_stays_paused() -> None:
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_the_daemon_validates_and_applies_the_file_with_the_collector_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(SEED_STATE))
    daemon = daemon_on(path)
    seen: list[bool] = []
    real_check = StateTracker.check

    def check(self: StateTracker, raw: bytes) -> object:
        seen.append(gc.isenabled())
        return real_check(self, raw)

    monkeypatch.setattr(StateTracker, "check", check)
    daemon.reconcile_file(Reading.CHANGED)
    assert seen == [False]
    assert daemon.answers.readiness()[0]  # applied
    assert gc.isenabled()
