"""natgwd.runtime.collector: the cycle collector is paused while the daemon validates and
applies the state file and while a scrape makes its parts, and as it was afterwards,
whatever happened."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.observability.exposition import RuleLabel
from natgwd.planning.counters import Listings
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


def test_overlapping_pauses_enable_it_when_the_last_ends() -> None:
    """A scrape's pause ending during an apply's (another thread) leaves it paused."""
    first, second = collector.paused(), collector.paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_scrape_makes_each_part_with_the_collector_paused_and_not_between_them(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(SEED_STATE))
    daemon = daemon_on(path)
    daemon.reconcile_file(Reading.CHANGED)
    seen: list[bool] = []
    real_scrape = daemon.answers.rule_counters.labelled_exposition

    def labelled_exposition(listings: Listings) -> tuple[Iterator[bytes], Mapping[str, RuleLabel]]:
        parts, labelled = real_scrape(listings)
        seen.append(gc.isenabled())
        return ((seen.append(gc.isenabled()) or part) for part in parts), labelled

    daemon.answers.rule_counters.labelled_exposition = labelled_exposition  # type: ignore[method-assign]
    for _ in daemon.answers.exposition():
        assert gc.isenabled()  # between the parts: the client's pace
    assert seen and not any(seen)
    assert b"natgwd_rule_connections_total{" in b"".join(daemon.answers.exposition())


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
