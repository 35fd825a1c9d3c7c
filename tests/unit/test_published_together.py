"""The applied-state record, /readyz and the daemon's own /metrics name a new state at the
same moment: a probe that reads the record and then asks /readyz (or the other way round)
never finds the two disagreeing. A probe asking while the record is being replaced waits
for the daemon to finish publishing, then sees the new state everywhere. Against the
in-memory stand-ins, without root."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from natgwd.io import applied
from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.runtime.answers import Answers
from natgwd.runtime.daemon import Daemon, DaemonConfig
from natgwd.runtime.reconciler import Announce, Reconciler
from tests.unit.fakes import FakeLinks


def write(path: Path, document: dict[str, Any]) -> bytes:
    raw = json.dumps(document, indent=1).encode()
    tmp = path.with_name(".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)
    return raw


def daemon_with_record(tmp_path: Path) -> Daemon:
    def reconciler(_announce: Announce) -> Reconciler:
        return Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=lambda: False)

    config = DaemonConfig(
        state_path=tmp_path / "state.json",
        metrics_address=("127.0.0.1", 0),
        resync_interval=60.0,
        applied_state_path=tmp_path / "applied.json",
    )
    return Daemon(config, reconciler)


def probe(answers: Answers) -> tuple[str | None, float | None]:
    """What /readyz names and what /metrics' own part counts, as a scrape takes them."""
    _ready, detail = answers.readiness()
    with answers.published:
        text = generate_latest(answers.registry).decode()
    dnat = next(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('natgwd_rules{kind="dnat"}')
    )
    return detail["applied_sha256"], dnat


def test_a_probe_during_the_record_s_replacement_sees_the_new_state_everywhere(
    tmp_path: Path, monkeypatch: Any
) -> None:
    daemon = daemon_with_record(tmp_path)
    write(daemon.config.state_path, SEED_STATE)
    daemon.step()
    changed = json.loads(json.dumps(SEED_STATE))
    changed["dnat"].pop()
    raw = write(daemon.config.state_path, changed)
    new_digest = hashlib.sha256(raw).hexdigest()

    seen: list[tuple[str | None, float | None]] = []
    probers: list[threading.Thread] = []
    real_write = applied.write

    def replacing(path: Path, sha256: str, applied_at: float, raw_state: bytes) -> None:
        real_write(path, sha256, applied_at, raw_state)
        # The record names the new state now: a probe in this very moment...
        prober = threading.Thread(target=lambda: seen.append(probe(daemon.answers)))
        probers.append(prober)
        prober.start()
        prober.join(timeout=1.0)  # ...waits for the daemon (it returns at once if nothing holds it)

    monkeypatch.setattr(applied, "write", replacing)
    daemon.step()
    head = applied.read_head(tmp_path / "applied.json")
    assert head is not None and head.sha256 == new_digest
    (prober,) = probers
    prober.join(timeout=30)
    assert seen == [(new_digest, float(len(changed["dnat"])))], "the probe saw the state before the record's"
