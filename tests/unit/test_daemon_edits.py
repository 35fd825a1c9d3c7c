"""The daemon's glue for nat-gateway.sh calls (natgwd.kubeovn.shim.service), against the
in-memory nftables stand-in, without root: calls run on the reconciling thread (here, the
test's own calls of step()), land in the edit log, are folded into the state file without
counting as a change, lose to a state file someone else writes, and survive a failed apply."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from natgwd.kernel.fake import FakeNft
from natgwd.kubeovn.shim import service
from natgwd.kubeovn.shim.call import Reply
from natgwd.kubeovn.shim.editlog import EditLog
from natgwd.kubeovn.shim.filestate import document_bytes
from natgwd.kubeovn.shim.protocol import Request
from natgwd.lab.topology import SEED_STATE
from natgwd.runtime.changes import changed_names
from natgwd.runtime.daemon import Daemon, DaemonConfig
from natgwd.runtime.reconciler import Announce, Reconciler
from natgwd.runtime.statefile import Reading
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeLinks

EIP = "10.115.55.200"  # the seed's my-eip


def on_files(tmp_path: Path, fold_after: float = 600.0) -> tuple[Daemon, FakeNft]:
    """A natgwd (not stepped yet) on the state file and edit log in `tmp_path`."""
    nft = FakeNft()

    def reconciler(_announce: Announce) -> Reconciler:
        return Reconciler(nft, FakeLinks(), ensure_forwarding=lambda: False)

    state_path = tmp_path / "state.json"
    config = DaemonConfig(
        state_path=state_path,
        metrics_address=("127.0.0.1", 0),
        resync_interval=600.0,
        edit_port=0,
        edit_token_path=tmp_path / "edit.token",
        edit_fold_after=fold_after,
    )
    return Daemon(config, reconciler), nft


def started(tmp_path: Path) -> tuple[Daemon, FakeNft]:
    (tmp_path / "state.json").write_text(json.dumps(SEED_STATE, indent=1))
    daemon, nft = on_files(tmp_path)
    daemon.step()
    assert daemon.reconciler.state is not None
    return daemon, nft


def call(daemon: Daemon, *argv: str) -> Reply:
    """Submit from another thread, as the endpoint does, and turn the loop until answered."""
    assert daemon.edits is not None
    replies: list[Reply] = []
    thread = threading.Thread(target=lambda: replies.append(daemon.edits.submit(Request(None, argv))))  # type: ignore[union-attr]
    thread.start()
    while thread.is_alive():
        daemon.step()
        thread.join(0.01)
    return replies[0]


def reconciles(daemon: Daemon, result: str) -> float:
    value = daemon.registry.get_sample_value("natgwd_reconciles_total", {"result": result})
    return value or 0.0


def dnat_ports(daemon: Daemon) -> list[str]:
    assert daemon.reconciler.state is not None
    return sorted(str(rule.external_port) for rule in daemon.reconciler.state.dnat)


def test_calls_are_applied_and_logged_and_the_fold_is_no_change(tmp_path: Path) -> None:
    daemon, nft = started(tmp_path)
    file_before = daemon.config.state_path.read_bytes()
    applied_before = reconciles(daemon, "applied")
    reply = call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80")
    assert reply == Reply(0, f"dnat-add {EIP},9000,tcp,172.20.10.2,80\nnatgwd: applied\n", "")
    assert dnat_ports(daemon) == ["8888", "9000"]
    assert daemon.config.state_path.read_bytes() == file_before, "a call appends to the log"
    assert daemon.edits is not None and daemon.edits.log.entries == 1
    assert reconciles(daemon, "applied") == applied_before + 1

    transactions = len(nft.transactions)
    data = daemon.edits.compact()
    assert data is not None and json.loads(data) == daemon.edits.document
    for _ in range(3):  # the watcher's change and recheck of natgwd's own write
        daemon.step()
    assert len(nft.transactions) == transactions
    assert reconciles(daemon, "applied") == applied_before + 1
    assert reconciles(daemon, "unchanged") == 0
    ready, detail = daemon.answers.readiness()
    assert ready and detail["applied_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_state_file_written_by_someone_else_wins_over_the_log(tmp_path: Path) -> None:
    daemon, _ = started(tmp_path)
    assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
    foreign = {**SEED_STATE, "dnat": []}
    daemon.config.state_path.write_text(json.dumps(foreign))
    daemon.step()
    assert dnat_ports(daemon) == []
    assert daemon.edits is not None and not daemon.edits.log.path.exists()
    assert call(daemon, "dnat-add", f"{EIP},9001,tcp,172.20.10.2,80").code == 0
    assert dnat_ports(daemon) == ["9001"]


def test_a_failed_apply_answers_1_and_the_retry_keeps_the_accepted_calls(tmp_path: Path) -> None:
    daemon, nft = started(tmp_path)
    assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
    nft.fail_next = "injected"
    reply = call(daemon, "dnat-add", f"{EIP},9001,tcp,172.20.10.2,80")
    assert reply.code == 1 and "natgwd: applying the change failed: injected" in reply.err
    assert daemon.edits is not None and daemon.edits.log.entries == 1
    daemon.reconcile_file(Reading.FORCED)  # what the scheduled retry does
    assert dnat_ports(daemon) == ["8888", "9000"]
    assert call(daemon, "dnat-add", f"{EIP},9001,tcp,172.20.10.2,80").code == 0
    assert dnat_ports(daemon) == ["8888", "9000", "9001"]


def test_a_restart_whose_first_apply_fails_still_brings_back_the_logged_calls(tmp_path: Path) -> None:
    daemon, _ = started(tmp_path)
    assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
    again, nft = on_files(tmp_path)  # natgwd killed, a new one on the same files
    nft.fail_next = "injected"
    again.step()
    assert again.reconciler.state is None
    again.reconcile_file(Reading.FORCED)  # what the scheduled retry does
    assert dnat_ports(again) == ["8888", "9000"]
    assert call(again, "dnat-add", f"{EIP},9001,tcp,172.20.10.2,80").code == 0
    third, _ = on_files(tmp_path)
    third.step()
    assert dnat_ports(third) == ["8888", "9000", "9001"]


def test_an_invalid_result_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    daemon, nft = started(tmp_path)
    transactions = len(nft.transactions)
    reply = call(daemon, "floating-ip-add", f"{EIP},172.20.10.4")  # my-eip has DNAT and SNAT
    assert reply.code == 1 and "refused, the desired state would be invalid" in reply.err
    assert len(nft.transactions) == transactions
    assert daemon.edits is not None and daemon.edits.log.entries == 0


def test_each_change_is_logged_by_name_and_so_is_the_fold(tmp_path: Path) -> None:
    daemon, _ = started(tmp_path)
    with capture_logs() as logged:
        assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
        assert call(daemon, "dnat-del", f"{EIP},8888,tcp").code == 0
        assert daemon.edits is not None and daemon.edits.compact() is not None
        hand_edited = json.loads(daemon.config.state_path.read_bytes())
        hand_edited["fip"][0]["internalIp"] = "172.20.10.9"
        hand_edited["eips"].append({"name": "spare", "v4ip": "10.115.55.210"})
        daemon.config.state_path.write_text(json.dumps(hand_edited))
        for _ in range(3):
            daemon.step()
    changes = [
        (e["source"], e["added"], e["changed"], e["removed"]) for e in logged if e["event"] == "desired state changed"
    ]
    (added,) = changes[0][1]
    assert added.startswith("dnat/")
    assert changes == [
        ("a nat-gateway.sh call", [added], [], []),
        ("a nat-gateway.sh call", [], [], ["dnat/dnat01"]),
        ("the state file", ["eip/spare"], ["fip/fip01"], []),
    ]
    folds = [e for e in logged if e["event"] == "edit log folded into the state file"]
    assert [(e["edits"], e["path"]) for e in folds] == [(2, str(daemon.config.state_path))]


def test_changed_names_of_a_whole_state() -> None:
    before = load_state(json.dumps(SEED_STATE).encode())
    after_doc = json.loads(json.dumps(SEED_STATE))
    after_doc["snat"] = []
    after_doc["dnat"][0]["internalPort"] = "81"
    assert changed_names(before, load_state(json.dumps(after_doc).encode()), None) == {
        "added": [],
        "changed": ["dnat/dnat01"],
        "removed": ["snat/my-snat"],
    }
    everything = changed_names(None, before, None)
    assert everything["added"] == ["dnat/dnat01", "eip/my-eip", "eip/my-eip2", "fip/fip01", "snat/my-snat"]


def test_a_call_that_cannot_be_recorded_answers_1_and_its_retry_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, nft = started(tmp_path)
    assert daemon.edits is not None
    real_append = EditLog.append

    def full_disk(log: EditLog, base: str, delta: dict[str, Any]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(EditLog, "append", full_disk)
    reply = call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80")
    assert reply.code == 1 and "cannot record the change: No space left on device" in reply.err, reply
    assert dnat_ports(daemon) == ["8888"], "undone in the kernel too"
    assert nft.table is not None
    assert not [key for elements in nft.table.elements.values() for key in elements if "9000" in key]

    monkeypatch.setattr(EditLog, "append", real_append)
    reply = call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80")
    assert (reply.code, reply.out.splitlines()[-1]) == (0, "natgwd: applied"), reply
    again, _ = on_files(tmp_path)  # natgwd killed, a new one on the same files
    again.step()
    assert dnat_ports(again) == ["8888", "9000"]


class RecordingHa:
    """The HA controller's part the daemon drives: the digests it is told."""

    def __init__(self) -> None:
        self.digests: list[str | None] = []

    def applied(self, state: Any, digest: str | None, complete: bool) -> None:
        if digest is not None:
            self.digests.append(digest)

    def applied_digest(self, digest_of: Callable[[], str | None]) -> None:
        self.digests.append(digest_of())

    def readiness(self) -> tuple[str | None, dict[str, Any]]:
        return None, {}

    def effective(self, state: Any, _document: Any) -> Any:
        return state


def test_the_applied_sha256_is_that_of_the_calls_applied_and_stays_across_the_fold(tmp_path: Path) -> None:
    daemon, _ = started(tmp_path)
    ha = RecordingHa()
    daemon.ha = ha  # type: ignore[assignment]
    file_digest = hashlib.sha256(daemon.config.state_path.read_bytes()).hexdigest()
    assert daemon.answers.readiness()[1]["applied_sha256"] == file_digest
    assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
    assert daemon.edits is not None and daemon.edits.document is not None
    effective = hashlib.sha256(document_bytes(daemon.edits.document)).hexdigest()
    assert effective != file_digest
    assert daemon.answers.readiness()[1]["applied_sha256"] == effective
    assert ha.digests[-1] == effective, "the HA peer compares the calls applied too"

    data = daemon.edits.compact()
    assert data is not None and hashlib.sha256(data).hexdigest() == effective
    assert daemon.answers.readiness()[1]["applied_sha256"] == effective

    again, _ = on_files(tmp_path)  # a restart that folds a log of calls in
    assert call(daemon, "dnat-add", f"{EIP},9001,tcp,172.20.10.2,80").code == 0
    again.step()
    assert again.edits is not None and again.edits.document is not None
    folded = hashlib.sha256(document_bytes(again.edits.document)).hexdigest()
    assert again.answers.readiness()[1]["applied_sha256"] == folded != effective


class LazyHa(RecordingHa):
    """An HA controller that asks for the digest only when it needs it (no peer here)."""

    def __init__(self) -> None:
        super().__init__()
        self.digest_of: Callable[[], str | None] | None = None

    def applied_digest(self, digest_of: Callable[[], str | None]) -> None:
        self.digest_of = digest_of


def test_a_call_does_not_serialize_the_whole_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The applied sha256 of calls logged on the file is that of the whole document
    serialized: made when the HA peer check or /readyz asks, not per call (at 12,000
    rules it cost more than the call itself)."""
    daemon, _ = started(tmp_path)
    ha = LazyHa()
    daemon.ha = ha  # type: ignore[assignment]
    serialized: list[int] = []
    real = service.document_bytes

    def counted(doc: dict[str, Any]) -> bytes:
        serialized.append(1)
        return real(doc)

    monkeypatch.setattr(service, "document_bytes", counted)
    for port in (9000, 9001, 9002):
        assert call(daemon, "dnat-add", f"{EIP},{port},tcp,172.20.10.2,80").code == 0
    assert serialized == []
    assert ha.digest_of is not None and daemon.edits is not None and daemon.edits.document is not None
    assert ha.digest_of() == hashlib.sha256(real(daemon.edits.document)).hexdigest()
    assert len(serialized) == 1


@pytest.mark.parametrize(
    "line",
    [
        b'{"add": {"dnat": [{}]}}',  # an added rule without a name
        b'{"add": {"dnat": {"name": "x"}}}',
        b'{"add": {"nosuchlist": [{"name": "x"}]}}',
        b'{"del": {"dnat": "dnat01"}}',
        b'{"del": {"dnat": [["dnat01"]]}}',
        b'{"unset": [["qosPolicies"]]}',
        b'{"unset": "dnat"}',
        b'{"set": ["dnat"]}',
        b'{"set": {"dnat": 5}}',
        b'{"set": {"dnat": [{"name": 5}]}}',
        b'{"other": {}}',
    ],
)
def test_a_well_formed_but_wrong_edit_log_line_is_refused_and_the_other_calls_kept(tmp_path: Path, line: bytes) -> None:
    daemon, _ = started(tmp_path)
    assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
    assert call(daemon, "dnat-add", f"{EIP},9001,tcp,172.20.10.2,80").code == 0
    assert daemon.edits is not None
    header, first, second, end = daemon.edits.log.path.read_bytes().split(b"\n")
    # Damage or tampering: a line between the two calls'.
    daemon.edits.log.path.write_bytes(b"\n".join([header, first, line, second, end]))

    again, _ = on_files(tmp_path)  # natgwd restarted on the same files
    with capture_logs() as logs:
        again.step()
    assert dnat_ports(again) == ["8888", "9000", "9001"]
    assert again.registry.get_sample_value("natgwd_edit_log_lines_refused_total") == 1
    refused = [entry for entry in logs if entry["event"] == "edit log line refused"]
    assert len(refused) == 1 and refused[0]["line"] == 3 and refused[0]["log_level"] == "error"
    assert again.answers.readiness()[0]
    # The refused line stays out: the next call and a fold of the log go on without it.
    assert call(again, "dnat-add", f"{EIP},9002,tcp,172.20.10.2,80").code == 0
    assert again.edits is not None and again.edits.compact() is not None
    assert dnat_ports(again) == ["8888", "9000", "9001", "9002"]


def test_an_edit_log_that_cannot_be_folded_into_the_file_does_not_stop_natgwd(tmp_path: Path) -> None:
    daemon, _ = started(tmp_path)
    assert call(daemon, "dnat-add", f"{EIP},9000,tcp,172.20.10.2,80").code == 0
    # A state file someone made invalid, under a log header rewritten to name it.
    bad = b'{"version": 1, "dnat": 5}'
    daemon.config.state_path.write_bytes(bad)
    assert daemon.edits is not None
    lines = daemon.edits.log.path.read_bytes().split(b"\n")
    lines[0] = json.dumps({"extends": hashlib.sha256(bad).hexdigest()}).encode()
    daemon.edits.log.path.write_bytes(b"\n".join(lines))

    again, _ = on_files(tmp_path)
    again.step()
    ready, detail = again.answers.readiness()
    assert not ready and "dnat" in detail["reason"]
    assert again.registry.get_sample_value("natgwd_edit_log_lines_refused_total") == 1
