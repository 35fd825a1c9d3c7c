"""/readyz and the log never claim a last good state when none was applied (issue 17, item 4).
The daemon runs its steps here against the in-memory nftables stand-in, without root."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.runtime.daemon import Daemon, DaemonConfig
from natgwd.runtime.reconciler import Announce, Reconciler
from tests.unit.fakes import FakeLinks


def daemon_on(path: Path) -> Daemon:
    def reconciler(_announce: Announce) -> Reconciler:
        # No announcer: gratuitous ARP would go out of the host's interfaces.
        return Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=lambda: False)

    return Daemon(DaemonConfig(state_path=path, metrics_address=("127.0.0.1", 0), resync_interval=60.0), reconciler)


def rejections(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"].startswith("desired state rejected")]


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state.json"


def test_before_the_first_step_it_waits_for_the_file(state_path: Path) -> None:
    ready, detail = daemon_on(state_path).answers.readiness()
    assert not ready
    assert detail == {
        "applied_sha256": None,
        "applied_at": None,
        "reason": f"no state applied yet; waiting for {state_path}",
    }


def test_a_missing_file_at_start_is_no_state_applied_yet(state_path: Path) -> None:
    daemon = daemon_on(state_path)
    with capture_logs() as logs:
        daemon.step()
    ready, detail = daemon.answers.readiness()
    assert not ready
    assert detail["reason"] == (
        f"no state applied yet; waiting for {state_path}: $: cannot read {state_path}: file does not exist"
    )
    assert "last good" not in detail["reason"]
    assert detail["applied_sha256"] is None
    assert rejections(logs) == [
        {
            "event": "desired state rejected; no state applied yet",
            "log_level": "error",
            "path": str(state_path),
            "problems": [f"$: cannot read {state_path}: file does not exist"],
        }
    ]


def test_an_invalid_file_at_start_is_no_state_applied_yet_and_says_what_was_skipped(state_path: Path) -> None:
    state_path.write_text(json.dumps({**SEED_STATE, "version": 2}))
    daemon = daemon_on(state_path)
    with capture_logs() as logs:
        daemon.step()
    ready, detail = daemon.answers.readiness()
    assert not ready
    assert detail["reason"] == (
        f"no state applied yet; waiting for {state_path}: $.version: must be 1 (the only supported version)"
    )
    (rejected,) = rejections(logs)
    assert rejected["event"] == "desired state rejected; no state applied yet"
    assert rejected["skipped"].endswith("were skipped: they need $.version fixed first")
    assert "applied_sha256" not in rejected


def test_an_invalid_file_after_a_good_one_keeps_the_last_good_state(state_path: Path) -> None:
    state_path.write_text(json.dumps(SEED_STATE))
    daemon = daemon_on(state_path)
    daemon.step()
    ready, detail = daemon.answers.readiness()
    assert ready, detail
    applied = detail["applied_sha256"]
    assert applied is not None

    state_path.write_text(json.dumps({**SEED_STATE, "snat": [{**SEED_STATE["snat"][0], "eip": "nope"}]}))
    with capture_logs() as logs:
        daemon.step()
    ready, detail = daemon.answers.readiness()
    assert not ready
    assert detail["reason"] == (
        "desired state rejected; the last good state stays applied: "
        "$.snat[0].eip: names EIP 'nope', which is not in eips"
    )
    assert detail["applied_sha256"] == applied
    (rejected,) = rejections(logs)
    assert rejected["event"] == "desired state rejected; keeping the last good state"
    assert rejected["applied_sha256"] == applied
