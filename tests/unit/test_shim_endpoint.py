"""natgwd's edit endpoint for nat-gateway.sh calls, without root: the request framing (what
anything on loopback may send), the edit log (diff, fold, a line cut short, compaction), and
the bash nat-gateway.sh driving an EditService through a real loopback endpoint, with a
stand-in for the daemon's reconciling thread that validates as natgwd does."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natgwd.kubeovn.shim import endpoint, protocol
from natgwd.kubeovn.shim.call import edited, prepare
from natgwd.kubeovn.shim.editlog import EditLog, diff, fold
from natgwd.kubeovn.shim.edits import Context, Doc, compact
from natgwd.kubeovn.shim.endpoint import EditEndpoint
from natgwd.kubeovn.shim.protocol import MAX_ARGS, MAX_FIELD_BYTES, Request, RequestError, parse_request
from natgwd.kubeovn.shim.service import COMPACT_IDLE_SECONDS, EditService
from natgwd.state.validation import load_state
from tests.unit.fakes import UPSTREAM, FakeLinks
from tests.unit.test_shim import EIP1, EIP2, VM1, VM2

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "image" / "nat-gateway.sh"
TOKEN = "t" * 64

# --- the framing ------------------------------------------------------------------------


def test_a_request_round_trips_and_may_arrive_in_pieces() -> None:
    data = protocol.encode_request(TOKEN, UPSTREAM, ["dnat-add", f"{EIP1},80,tcp,{VM1},80", ""])
    for cut in range(len(data)):
        assert parse_request(data[:cut], TOKEN) is None, cut
    assert parse_request(data, TOKEN) == Request(UPSTREAM, ("dnat-add", f"{EIP1},80,tcp,{VM1},80", ""))
    assert parse_request(protocol.encode_request(TOKEN, None, []), TOKEN) == Request(None, ())


def test_a_wrong_token_is_refused_before_the_arguments_arrive() -> None:
    head = protocol.MAGIC + b"\0" + b"u" * 64 + b"\0"
    with pytest.raises(RequestError, match="wrong token"):
        parse_request(head, TOKEN)
    with pytest.raises(RequestError, match="wrong token"):
        parse_request(protocol.MAGIC + b"\0\0\x001\0x\0", TOKEN)  # an empty token is wrong too


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GET / HTTP/1.1\r\n", "not a natgwd edit request"),
        (b"\x16\x03\x01\x02\x00\x01", "not a natgwd edit request"),
        (b"natgwd-edit/2\0", "not a natgwd edit request"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\0-1\0", "argument count"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\0" + str(MAX_ARGS + 1).encode() + b"\0", "argument count"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\0" + b"9" * 40 + b"\0", "argument count"),
        # A NUL inside an argument: one field more than announced.
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\0001\0eip-add\0" + b"1.2.3.4\0", "after the last argument"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\x001\0eip-add\0junk", "after the last argument"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\x001\0\xff\xfe\0", "not UTF-8"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\x001\0" + b"a" * (MAX_FIELD_BYTES + 1), "larger than"),
        (protocol.MAGIC + b"\0" + TOKEN.encode() + b"\0\x004000\0" + b"a" * 60000 + b"\0" * 20, "larger than"),
    ],
)
def test_garbage_and_oversize_requests_are_refused(data: bytes, match: str) -> None:
    if match == "larger than" and b"\x004000\0" in data:
        data = data * 20  # past the whole request's bound, in fields each under theirs
    with pytest.raises(RequestError, match=match):
        parse_request(data, TOKEN)


def test_the_token_field_is_refused_once_longer_than_the_token() -> None:
    """Before the token is checked nothing is known about the caller: it may send no more
    than the token's own length, not a field of 64 KiB (issue 21, item 4)."""
    opening = protocol.MAGIC + b"\0"
    assert parse_request(opening + TOKEN.encode(), TOKEN) is None
    with pytest.raises(RequestError, match="refused: wrong token"):
        parse_request(opening + TOKEN.encode() + b"t", TOKEN)


def test_replies_carry_code_and_texts() -> None:
    data = protocol.encode_reply(2, "out\n", "err with a \0 NUL\n")
    assert protocol.decode_reply(data) == (2, "out\n", "err with a \\0 NUL\n")
    with pytest.raises(ValueError):
        protocol.decode_reply(b"0\0out\0")


# --- the edit log -------------------------------------------------------------------------

SEED: Doc = {
    "version": 1,
    "internal": {"interface": "net1", "addresses": ["172.20.10.254/24"]},
    "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": UPSTREAM},
}


def run_calls(doc: Doc, calls: list[list[str]]) -> list[Doc]:
    """The documents after each call (each from a working copy: `doc` stays as it was)."""
    documents = [doc]
    for argv in calls:
        call = prepare(argv, FakeLinks)
        assert not hasattr(call, "code"), call
        documents.append(compact(edited(call, documents[-1], Context(UPSTREAM), Path("state.json"))))  # type: ignore[arg-type]
    return documents


CALLS = [
    ["eip-add", f"{EIP1}/21"],
    ["dnat-add", f"{EIP1},80,tcp,{VM1},80"],
    ["dnat-add", f"{EIP1},81,tcp,{VM1},81"],
    ["snat-add", f"{EIP2},172.20.10.0/24"],  # adds EIP2 with a warning
    ["eip-egress-qos-add", f"{EIP1},1,20,1"],  # changes the EIP in place, adds a policy
    ["dnat-del", f"{EIP1},80,tcp"],  # from the middle
    ["nft-dnat-map-add", f"{EIP1},90,tcp,{VM1}:90@{VM2}:90"],
    ["nft-dnat-map-add", f"{EIP1},90,tcp,{VM2}:90"],
    ["subnet-route-add", "10.55.0.0/16,172.20.10.1"],
    ["eip-egress-qos-del", EIP1],
    ["eip-del", EIP1],  # and the rules still using it
]


def test_diff_then_fold_gives_each_document_back() -> None:
    documents = run_calls(SEED, CALLS)
    deltas = [diff(a, b) for a, b in itertools.pairwise(documents)]
    assert all(deltas), "every call changed something"
    for i in range(len(deltas) + 1):
        assert compact(fold(SEED, deltas[:i])) == documents[i], i
    # The common call appends: the delta is the new rule alone, not the list.
    assert deltas[2] == {"add": {"dnat": [documents[3]["dnat"][-1]]}}
    assert deltas[5] == {"del": {"dnat": [documents[5]["dnat"][0]["name"]]}}
    assert diff(documents[3], documents[3]) == {}


def test_edits_leave_the_document_they_start_from_untouched() -> None:
    documents = run_calls(SEED, CALLS)
    snapshot = json.dumps(documents)
    run_calls(documents[4], CALLS[4:])
    assert json.dumps(documents) == snapshot


def test_the_log_reads_back_and_drops_a_line_cut_short(tmp_path: Path) -> None:
    log = EditLog(tmp_path / "state.json.edits")
    assert log.load() == [] and log.base is None
    deltas = [{"add": {"dnat": [{"name": f"d{i}"}]}} for i in range(3)]
    for delta in deltas:
        log.append("a" * 64, delta)
    assert (log.entries, log.base) == (3, "a" * 64)
    with log.path.open("ab") as file:
        file.write(b'{"add": {"dnat": [{"na')  # natgwd killed in the middle of an append
    again = EditLog(log.path)
    assert again.load() == deltas and again.entries == 3
    assert log.path.read_bytes().endswith(b"\n"), "the cut line is gone, so that appends follow"
    again.append("a" * 64, {"unset": ["qosPolicy"]})
    assert EditLog(log.path).load() == [*deltas, {"unset": ["qosPolicy"]}]
    # A log of another state file is replaced by the first append on this one.
    again.append("b" * 64, deltas[0])
    third = EditLog(log.path)
    assert third.load() == [deltas[0]] and third.base == "b" * 64


def test_an_append_on_a_full_disk_is_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EditLog(tmp_path / "state.json.edits")
    deltas = [{"add": {"dnat": [{"name": f"d{i}"}]}} for i in range(2)]
    log.append("a" * 64, deltas[0])
    before = log.path.read_bytes()
    real_pwrite = os.pwrite
    room = [10]  # bytes the disk still takes

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if not room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        taken = real_pwrite(fd, data[: room[0]], offset)
        room[0] -= taken
        return taken

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as raised:
        log.append("a" * 64, deltas[1])
    assert raised.value.errno == errno.ENOSPC
    assert log.path.read_bytes() == before and log.entries == 1, "the part written is cut off again"
    room[0] = 1 << 20  # space freed: short writes are continued
    log.append("a" * 64, deltas[1])
    assert EditLog(log.path).load() == deltas


def test_a_line_cut_short_and_appended_to_loses_no_later_line(tmp_path: Path) -> None:
    # What a natgwd that ignored a short write left: a cut line, and the next calls after it.
    deltas = [{"add": {"dnat": [{"name": f"d{i}", "externalPort": "80"}]}} for i in range(4)]
    lines = [json.dumps(d).encode() for d in deltas]
    path = tmp_path / "state.json.edits"
    header = json.dumps({"extends": "a" * 64}).encode()
    path.write_bytes(b"\n".join([header, lines[0], b'{"add":{"dnat":[{"name":"cut' + lines[2], lines[3], b""]))
    log = EditLog(path)
    assert log.load() == [deltas[0], deltas[2], deltas[3]]
    assert (log.entries, log.size) == (3, path.stat().st_size)


# --- the service behind a real endpoint, driven by the bash nat-gateway.sh ------------------


def endpoint_only(directory: Path, token_line: str, timeout: int) -> dict[str, str]:
    """nat-gateway.sh's environment with the token file `token_line` names an endpoint in,
    and no Python to fall back to: the call can only go through that endpoint."""
    token = directory / "edit.token"
    token.write_text(f"{token_line}\n")
    return {
        "PATH": os.environ["PATH"],
        "NATGWD_EDIT_TOKEN": str(token),
        "NATGWD_SHIM_TIMEOUT": str(timeout),
        "NATGWD_PYTHON": "/nonexistent",
    }


class FakeDaemon:
    """The daemon's part: the reconciling thread serves the calls, validates as natgwd does
    (load_state), and reconciles the state file when it changes."""

    def __init__(self, directory: Path, links: FakeLinks, compact_idle: float = COMPACT_IDLE_SECONDS) -> None:
        self.state_path = directory / "state.json"
        self.token = directory / "edit.token"
        self.wake = threading.Event()
        self.written: list[bytes] = []
        self.applied: list[Doc] = []
        self.service = EditService(
            self.state_path, self.wake.set, self.written.append, links=lambda: links, compact_idle=compact_idle
        )
        self.endpoint = EditEndpoint(0, self.token, self.service.submit)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if self.state_path.exists():  # what the daemon's first reconcile of the file does
            raw = self.state_path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            effective = self.service.effective(raw, digest)
            load_state(effective)
            self.service.accepted(effective, digest)
        self.endpoint.start()
        self.thread.start()

    def _apply(self, document: Doc) -> None:
        load_state(json.dumps(document).encode())
        self.applied.append(document)

    def _loop(self) -> None:
        while not self.stopping:
            self.wake.wait(0.05)
            self.wake.clear()
            self.service.serve_pending(self._apply)
            if self.service.compaction_due():
                self.service.compact()

    def kill(self) -> None:
        """As kill -9: no compaction, the endpoint gone."""
        self.stopping = True
        self.thread.join(5)
        self.endpoint.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path, FakeLinks())
    fake.start()
    yield fake
    fake.kill()


def script(daemon: FakeDaemon, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": os.environ["PATH"],
        "NATGWD_EDIT_TOKEN": str(daemon.token),
        "GATEWAY_V4": UPSTREAM,
        "NATGWD_PYTHON": "/nonexistent",  # the endpoint, never the Python fallback
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=60)


def test_the_script_drives_natgwd_through_the_endpoint(daemon: FakeDaemon) -> None:
    assert stat.S_IMODE(daemon.token.stat().st_mode) == 0o600
    init = script(daemon, "init", "net1,net2")
    assert (init.returncode, init.stdout, init.stderr) == (0, "init net1,net2\nnatgwd: applied\n", "")
    assert json.loads(daemon.state_path.read_bytes()) == daemon.service.document, "no file yet: init writes it"

    version = script(daemon, "get-iptables-version")
    assert (version.returncode, version.stdout) == (0, "get-iptables-version \niptables v1.8.9 (nf_tables)\n")

    added = script(daemon, "dnat-add", f"{EIP1},8888,tcp,{VM1},80")
    assert added.returncode == 0 and added.stdout.endswith("natgwd: applied\n")
    assert added.stderr == f"Warning: natgwd: EIP {EIP1} was not added (eip-add); added it\n"
    again = script(daemon, "dnat-add", f"{EIP1},8888,tcp,{VM1},80")
    assert (again.returncode, again.stdout.splitlines()[-1]) == (0, "natgwd: nothing to change")
    other = script(daemon, "dnat-add", f"{EIP1},8888,tcp,{VM2},80")
    assert other.returncode == 1 and "already goes to 172.20.10.2:80" in other.stderr
    invalid = script(daemon, "floating-ip-add", f"{EIP1},{VM2}")  # the EIP has a DNAT: validation refuses
    assert invalid.returncode == 1 and "refused, the desired state would be invalid" in invalid.stderr, invalid
    missing = script(daemon, "subnet-route-del", "10.99.0.0/16")
    assert missing.returncode == 2 and "no route to 10.99.0.0/16 on net1" in missing.stderr
    assert script(daemon, "nonsense").returncode == 1

    assert [d.get("dnat", []) for d in daemon.applied][-1][0]["internalIp"] == VM1
    assert len(daemon.applied) == 2, "refused and unchanged calls applied nothing"


def test_no_token_and_no_python_is_said(daemon: FakeDaemon) -> None:
    absent = daemon.token.with_name("absent.token")
    result = script(daemon, "init", "net1,net2", NATGWD_EDIT_TOKEN=str(absent))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"natgwd: no edit endpoint token at {absent} (NATGWD_EDIT_TOKEN), and no Python at /nonexistent "
        "to edit the state file instead (NATGWD_PYTHON: the Python with natgwd installed)\n"
    )


def test_a_wrong_token_is_refused_and_changes_nothing(daemon: FakeDaemon) -> None:
    assert script(daemon, "init", "net1,net2").returncode == 0
    before = json.dumps(daemon.service.document)
    port = daemon.token.read_text().split()[0]
    forged = daemon.token.with_name("forged.token")
    forged.write_text(f"{port} {'0' * 64}\n")
    result = script(daemon, "eip-add", f"{EIP1}/21", NATGWD_EDIT_TOKEN=str(forged))
    assert (result.returncode, result.stderr) == (1, "natgwd: refused: wrong token\n")
    # Refused as soon as the token is read, while the script may still be sending 600 kB:
    # it still gets the refusal.
    result = script(daemon, "dnat-add", *(["x" * 200] * 3000), NATGWD_EDIT_TOKEN=str(forged))
    assert (result.returncode, result.stderr) == (1, "natgwd: refused: wrong token\n")
    with socket.create_connection((endpoint.ADDRESS, int(port))) as sock:  # garbage: refused, nothing changed
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert b"not a natgwd edit request" in sock.recv(4096)
    assert json.dumps(daemon.service.document) == before
    assert not daemon.service.log.path.exists()


class Trickler:
    """Connections that send a valid opening and then one token character at a time, as a
    local process without the token would hold the endpoint; notes each one natgwd cut."""

    def __init__(self, port: int, count: int, interval: float) -> None:
        self.count = count
        self.sockets: list[socket.socket] = []
        self.cut: set[socket.socket] = set()
        self.sent: dict[socket.socket, int] = {}  # token characters sent
        self._port = port
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=run, daemon=True) for run in (self._open, self._trickle)]
        for thread in self._threads:
            thread.start()

    def _open(self) -> None:
        while len(self.sockets) < self.count and not self._stop.is_set():
            sock = socket.create_connection((endpoint.ADDRESS, self._port), timeout=30)
            sock.sendall(protocol.MAGIC + b"\0")
            with self._lock:
                self.sockets.append(sock)
                self.sent[sock] = 0

    def _trickle(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                alive = [sock for sock in self.sockets if sock not in self.cut]
            for sock in alive:
                try:
                    sock.sendall(b"0")
                    self.sent[sock] += 1
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:
                        sock.recv(4096)  # natgwd's answer, or the end of the connection
                        self.cut.add(sock)
                except OSError:
                    self.cut.add(sock)

    def all_cut(self) -> bool:
        return len(self.cut) == self.count

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        for sock in self.sockets:
            sock.close()


def test_slow_connections_without_the_token_hold_no_call_back(daemon: FakeDaemon) -> None:
    """200 local connections that trickle a token one character at a time must not take the
    controller's calls' places, nor a thread each; each is cut at the request deadline
    (issue 21, item 4)."""
    assert script(daemon, "init", "net1,net2").returncode == 0
    threads = threading.active_count()
    port = int(daemon.token.read_text().split()[0])
    # A character every 0.2 s: the 64-character token would take 13 s, past the deadline.
    trickler = Trickler(port, 200, interval=0.2)
    try:
        deadline = time.monotonic() + 120
        while len(trickler.sockets) < 200:
            assert time.monotonic() < deadline, f"{len(trickler.sockets)} of 200 slow connections opened"
            time.sleep(0.05)
        for n in range(4):
            added = script(daemon, "dnat-add", f"{EIP1},{8000 + n},tcp,{VM1},80")
            assert added.returncode == 0, added.stderr
            assert added.stdout.endswith("natgwd: applied\n")
        assert threading.active_count() - threads <= endpoint.WORKERS + 1 + 2  # + the trickler's two
        while not trickler.all_cut():
            assert time.monotonic() < deadline, f"{len(trickler.cut)} of 200 slow connections cut"
            time.sleep(0.1)
        assert max(trickler.sent.values()) < len(TOKEN), "cut by the deadline, before a whole token was sent"
    finally:
        trickler.close()
    assert [len(d.get("dnat", [])) for d in daemon.applied][-1] == 4


@contextlib.contextmanager
def unanswered_listener() -> Iterator[int]:
    """The port of a listener whose accept queue is full, so that a connect's SYNs are
    dropped, as when conntrack is full: the connect hangs."""
    with socket.socket() as listener:
        listener.bind((endpoint.ADDRESS, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued: list[socket.socket] = []
        try:
            while True:  # until a connect gets no answer: the queue is full
                sock = socket.socket()
                sock.settimeout(0.5)
                queued.append(sock)
                try:
                    sock.connect((endpoint.ADDRESS, port))
                except TimeoutError:
                    break
            yield port
        finally:
            for sock in queued:
                sock.close()


def test_the_timeout_bounds_the_connect_too(tmp_path: Path) -> None:
    """A connect nobody answers must end at NATGWD_SHIM_TIMEOUT, not after the kernel's
    two minutes of SYN retries (issue 21, item 5)."""
    with unanswered_listener() as port:
        environment = endpoint_only(tmp_path, f"{port} {TOKEN}", timeout=1)
        call = subprocess.run(
            ["bash", str(SCRIPT), "eip-add", f"{EIP1}/21"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert (call.returncode, call.stdout) == (1, "")
    assert call.stderr == f"natgwd: its edit endpoint ({environment['NATGWD_EDIT_TOKEN']}) did not answer within 1s\n"


def test_accepted_calls_survive_a_kill_and_compaction_rewrites_the_file(tmp_path: Path) -> None:
    # No fold while the first daemon lives: on a loaded machine two calls may be a second apart.
    first = FakeDaemon(tmp_path, FakeLinks(), compact_idle=3600)
    first.start()
    try:
        assert script(first, "init", "net1,net2").returncode == 0
        initial = first.state_path.read_bytes()
        for port in range(9000, 9020):
            assert script(first, "dnat-add", f"{EIP1},{port},tcp,{VM1},80").returncode == 0
        assert script(first, "dnat-del", f"{EIP1},9005,tcp").returncode == 0
        wanted = first.service.document
        assert first.state_path.read_bytes() == initial, "calls append to the log, not rewrite the file"
        assert first.service.log.entries == 21
    finally:
        first.kill()
    second = FakeDaemon(tmp_path, FakeLinks())
    second.start()
    try:
        assert second.service.document == wanted, "every accepted call is back after the kill"
        assert script(second, "dnat-add", f"{EIP1},9100,tcp,{VM2},80").returncode == 0
        # The calls pause: the log is folded into the state file, atomically, and emptied.
        # The fold reports what it wrote, after emptying the log: wait for the report of the
        # whole document. (On a loaded machine the calls replayed from the log may be folded
        # alone first, when the next call comes more than the idle time after the start.)
        deadline = time.monotonic() + 30
        while not (second.written and json.loads(second.written[-1]) == second.service.document):
            assert time.monotonic() < deadline, "the log folded into the state file"
            time.sleep(0.05)
        data = second.state_path.read_bytes()
        assert len(second.service.document["dnat"]) == 20
        assert second.written[-1] == data
        assert second.service.log.entries == 0 and not second.service.log.path.exists()
        load_state(data)
    finally:
        second.kill()


def test_a_replaced_state_file_wins_over_an_older_log(tmp_path: Path) -> None:
    first = FakeDaemon(tmp_path, FakeLinks())
    first.start()
    try:
        assert script(first, "init", "net1,net2").returncode == 0
        assert script(first, "eip-add", f"{EIP1}/21").returncode == 0
    finally:
        first.kill()
    replaced: dict[str, Any] = {**SEED, "eips": [{"name": "other", "v4ip": EIP2}]}
    first.state_path.write_text(json.dumps(replaced))
    second = FakeDaemon(tmp_path, FakeLinks())
    second.start()
    try:
        assert second.service.document == replaced
        assert not second.service.log.path.exists(), "the log of the previous file is dropped"
    finally:
        second.kill()


def test_the_watchdog_holds_none_of_the_callers_output(tmp_path: Path) -> None:
    """Guards against a call that holds its caller for the whole timeout: a watchdog
    outliving the call (seen once in a replay of 13,150 calls: 120 s) that holds the
    caller's stdout or stderr keeps the caller (the controller's exec) waiting for the end
    of the output. While the call hangs in its connect, its watchdog holds neither; when
    the call ends, the watchdog ends with it, long before its timeout."""
    with unanswered_listener() as port:
        environment = endpoint_only(tmp_path, f"{port} {TOKEN}", timeout=60)
        with eip_add_call(environment) as call:
            deadline = time.monotonic() + 30
            while (watchdog := [pid for pid in _session(call.pid) if pid != call.pid]) == []:
                assert time.monotonic() < deadline, "no watchdog while the call connects"
                time.sleep(0.01)
            # The watchdog redirects its output as it starts: wait for that.
            while (output := {os.readlink(f"/proc/{watchdog[0]}/fd/{fd}") for fd in (1, 2)}) != {"/dev/null"}:
                assert time.monotonic() < deadline, output
                time.sleep(0.01)
            os.kill(call.pid, signal.SIGTERM)  # as the watchdog's timeout does
            _, err = call.communicate(timeout=30)  # returns only once every holder of the pipes is gone
            assert call.returncode == 1 and b"did not answer within 60s" in err
            while _session(call.pid):
                assert time.monotonic() < deadline, "the watchdog outlived the call"
                time.sleep(0.01)


def test_the_watchdog_ends_once_the_request_is_sent(tmp_path: Path) -> None:
    """The watchdog bounds the connect and the request; the reply's wait is bounded by the
    script's `read -t`. Ended while natgwd works, it costs the call nothing at its end."""
    listener = socket.socket()
    listener.bind((endpoint.ADDRESS, 0))
    listener.listen(1)
    environment = endpoint_only(tmp_path, f"{listener.getsockname()[1]} {TOKEN}", timeout=60)
    with contextlib.closing(listener), eip_add_call(environment) as call:
        listener.settimeout(30)
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(30)
            request = b""
            while request.count(b"\0") < 6:  # version, token, gateway, count, command, rule
                chunk = connection.recv(4096)
                assert chunk, request
                request += chunk
            deadline = time.monotonic() + 30
            while _session(call.pid) != [call.pid]:
                assert time.monotonic() < deadline, "the watchdog outlived the request"
                time.sleep(0.01)
            assert call.poll() is None, "the call waits for its reply"
            connection.sendall(protocol.encode_reply(0, f"eip-add {EIP1}/21\n", ""))
        out, err = call.communicate(timeout=30)
        assert (call.returncode, out, err) == (0, f"eip-add {EIP1}/21\n".encode(), b"")


@contextlib.contextmanager
def eip_add_call(environment: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """nat-gateway.sh's eip-add, in a session of its own (with its watchdog), killed whole
    if it is still there at the end."""
    call = subprocess.Popen(
        ["bash", str(SCRIPT), "eip-add", f"{EIP1}/21"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield call
    finally:
        if call.poll() is None:
            os.killpg(call.pid, 9)
            call.wait()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # gone meanwhile
        return ""


def _session(leader: int) -> list[int]:
    """The live processes of `leader`'s session (the call and its watchdog)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader and fields[0] != "Z":  # the session id; a zombie holds nothing
                found.append(int(entry))
    return found
