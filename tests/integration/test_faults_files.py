"""natgwd under faults: torn and hostile desired-state files (truncated, non-atomic writers,
a directory, a FIFO, /dev/zero, symlink loops, huge or deeply nested files, bad permissions)
are rejected with a reason, and the last good state stays applied.

Every test builds its own lab (network namespaces with unique names, removed afterwards,
with every process started in them); traffic never leaves the lab. Measured figures are
printed (run with -s to see them); only generous bounds are asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab.topology import Lab, Natgwd
from natgwd.state.decode import MAX_FILE_BYTES
from tests.integration.fault_helpers import (
    fd_count,
    metric,
    rss_mb,
    seed,
)
from tests.integration.helpers import (
    DNAT_EIP,
    UPSTREAM,
    assert_dnat_works,
    encode,
    events_named,
    fetch,
    non_json_log_lines,
    readyz,
    sha256,
    wait_for,
)

RSS_BOUND_MB = 300


def table_snapshot(lab: Lab) -> Any:
    """natgwd's table exactly (handles included), leaving out element counters, which
    traffic moves."""
    document = json.loads(lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd").stdout)

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not (k == "counter" and isinstance(v, dict))}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(document["nftables"][1:])  # without metainfo


@dataclass
class Gateway:
    """A lab with natgwd running the seed, shared by the hostile-file cases."""

    lab: Lab
    daemon: Natgwd
    good: bytes
    rss: dict[str, float] = field(default_factory=dict)

    def restore(self) -> None:
        """Put the good file back and wait until it is applied and ready again."""
        clear(self.daemon.state_path)
        self.daemon.write_state(self.good)
        self.daemon.wait_applied(sha256(self.good), timeout=15)


def clear(path: Path) -> None:
    """Remove whatever is at `path`: a file, a symlink, a FIFO or a directory."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    from tests.conftest import _integration_unavailable

    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab() as lab:
        lab.serve("vm1", tcp=[80])
        lab.serve("vm3", tcp=[80])
        good = encode(seed())
        daemon = lab.start_natgwd(good)
        daemon.wait_applied(sha256(good), timeout=15)
        gw = Gateway(lab, daemon, good)
        yield gw
        print("hostile files: natgwd RSS after each case (MB):", {k: round(v, 1) for k, v in gw.rss.items()})
        print(f"hostile files: peak RSS (VmHWM) {rss_mb(daemon.process.pid, 'VmHWM'):.1f} MB")


def other_state() -> bytes:
    """A valid state that differs from the seed: dnat02, tcp/9999 -> vm3:80."""
    state = seed()
    state["dnat"].append(
        {
            "name": "dnat02",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": 9999,
            "internalIp": "172.20.10.4",
            "internalPort": 80,
        }
    )
    return encode(state)


def put_bytes(data: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        tmp = path.with_name(".hostile.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    return make


def put_other_state_with(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """A valid, different state whose file is then made unacceptable by `change`."""

    def make(path: Path) -> None:
        tmp = path.with_name(".hostile.tmp")
        tmp.write_bytes(other_state())
        change(tmp)
        os.replace(tmp, path)

    return make


def put_directory(path: Path) -> None:
    clear(path)
    path.mkdir()
    (path / "state.json").write_bytes(other_state())


def put_symlink_loop(path: Path) -> None:
    clear(path)
    loop = path.with_name("loop.json")
    with contextlib.suppress(FileNotFoundError):
        loop.unlink()
    loop.symlink_to(path.name)
    path.symlink_to(loop.name)


def put_dangling_symlink(path: Path) -> None:
    clear(path)
    path.symlink_to("nowhere/state.json")


def put_fifo(path: Path) -> None:
    """Renamed into place: removing the file first would show natgwd a missing file, a
    second (and rightful) rejection before the FIFO's."""
    tmp = path.with_name(".hostile.fifo")
    clear(tmp)
    os.mkfifo(tmp)
    os.replace(tmp, path)


def put_dev_zero(path: Path) -> None:
    clear(path)
    path.symlink_to("/dev/zero")


def put_100mb(path: Path) -> None:
    tmp = path.with_name(".hostile.tmp")
    with tmp.open("wb") as file:
        file.write(b'{"version": 1, "padding": "')
        chunk = b"x" * (1024 * 1024)
        for _ in range(100):
            file.write(chunk)
        file.write(b'"}')
    os.replace(tmp, path)


def replaced_port(value: bytes) -> bytes:
    return encode(seed()).replace(b'"externalPort": "8888"', b'"externalPort": ' + value)


def nested_in_state(opener: bytes, depth: int) -> bytes:
    closer = b"]" if opener == b"[" else b"}"
    body = (b'{"a":' if opener == b"{" else opener) * depth + b"1" + closer * depth
    return encode(seed())[:-2] + b', "deep": ' + body + b"}"


def other_state_with_ipv6(change: Callable[[dict[str, Any]], None]) -> bytes:
    """other_state() made dual-stack on the internal side (fd00:10::fe/64), then changed."""
    state = json.loads(other_state())
    state["internal"]["addresses"].append("fd00:10::fe/64")
    change(state)
    return encode(state)


def _ipv6_dnat02(state: dict[str, Any]) -> None:
    state["dnat"][-1]["internalIp"] = "fd00:10::4"  # on my-eip, which has no v6ip


def _v6ip_in_v4ip(state: dict[str, Any]) -> None:
    state["eips"][0]["v4ip"] = "fd00:115::200"


def _link_local_v6ip(state: dict[str, Any]) -> None:
    state["eips"][0]["v6ip"] = "fe80::1"


def group_writable_by_65534(path: Path) -> None:
    os.chown(path, 0, 65534)
    path.chmod(0o664)


@dataclass(frozen=True)
class Hostile:
    make: Callable[[Path], None]
    reason: str  # in /readyz and in a problem of the log line


HOSTILE: dict[str, Hostile] = {
    "truncated-1-byte": Hostile(put_bytes(other_state()[:1]), "not valid JSON"),
    "truncated-half": Hostile(put_bytes(other_state()[: len(other_state()) // 2]), "not valid JSON"),
    "truncated-last-byte": Hostile(put_bytes(other_state()[:-1]), "not valid JSON"),
    "empty": Hostile(put_bytes(b""), "file is empty"),
    "whitespace-only": Hostile(put_bytes(b" \n\t\r\n" * 100), "file is empty"),
    "directory": Hostile(put_directory, "is a directory"),
    "symlink-loop": Hostile(put_symlink_loop, "Too many levels of symbolic links"),
    "dangling-symlink": Hostile(put_dangling_symlink, "file does not exist"),
    "fifo": Hostile(put_fifo, "is not a regular file"),
    "symlink-to-dev-zero": Hostile(put_dev_zero, "is not a regular file"),
    "100mb": Hostile(put_100mb, f"file is larger than {MAX_FILE_BYTES} bytes"),
    "100000-deep-arrays": Hostile(put_bytes(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "100000-deep-objects": Hostile(put_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), "nested too deeply"),
    "deep-inside-a-state": Hostile(put_bytes(nested_in_state(b"[", 100_000)), "nested too deeply"),
    "nul-byte": Hostile(put_bytes(other_state().replace(b'"dnat02"', b'"dnat\x0002"')), "NUL byte at offset"),
    "invalid-utf8": Hostile(put_bytes(other_state().replace(b'"dnat02"', b'"dnat\xff\xfe02"')), "not UTF-8"),
    "utf8-bom": Hostile(put_bytes(b"\xef\xbb\xbf" + other_state()), "not valid JSON"),
    "duplicate-top-level-key": Hostile(
        put_bytes(b'{"version": 1, ' + other_state()[1:]), "duplicate key 'version' in one object"
    ),
    "duplicate-nested-key": Hostile(
        put_bytes(
            other_state().replace(
                b'"internalIp": "172.20.10.4"', b'"internalIp": "172.20.10.4", "internalIp": "172.20.10.2"'
            )
        ),
        "duplicate key 'internalIp' in one object",
    ),
    "port-70000": Hostile(put_bytes(replaced_port(b"70000")), "$.dnat[0].externalPort: must be a port 1-65535"),
    "port-1e400": Hostile(put_bytes(replaced_port(b"1e400")), "$.dnat[0].externalPort: must be a port 1-65535"),
    "port-2**80": Hostile(put_bytes(replaced_port(str(2**80).encode())), "$.dnat[0].externalPort: must be a port"),
    "port-string-2**80": Hostile(put_bytes(replaced_port(f'"{2**80}"'.encode())), "$.dnat[0].externalPort"),
    "port-5000-digits": Hostile(put_bytes(replaced_port(b"9" * 5000)), "digits"),
    "port-negative": Hostile(put_bytes(replaced_port(b"-80")), "$.dnat[0].externalPort: must be a port"),
    "nan": Hostile(put_bytes(replaced_port(b"NaN")), "NaN is not a JSON number"),
    "not-an-object": Hostile(put_bytes(b"[]"), "$: must be an object"),
    "ipv6-rule-on-an-ipv4-eip": Hostile(
        put_bytes(other_state_with_ipv6(_ipv6_dnat02)), "fd00:10::4 is IPv6 but EIP 'my-eip' has no v6ip"
    ),
    "ipv6-address-in-v4ip": Hostile(
        put_bytes(other_state_with_ipv6(_v6ip_in_v4ip)), "an IPv6 address goes in v6ip, beside v4ip"
    ),
    "link-local-v6ip": Hostile(put_bytes(other_state_with_ipv6(_link_local_v6ip)), "link-local or IPv4-mapped"),
    "world-writable": Hostile(put_other_state_with(lambda p: p.chmod(0o666)), "is writable by every user"),
    "group-writable-foreign-group": Hostile(
        put_other_state_with(group_writable_by_65534), "is writable by group 65534"
    ),
    "owned-by-another-uid": Hostile(put_other_state_with(lambda p: os.chown(p, 65534, 65534)), "is owned by uid 65534"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_rejected_and_changes_nothing(gateway: Gateway, case: str) -> None:
    """Prevents: a torn or hostile state file crashing or hanging natgwd, being applied
    (even in part), being rejected without saying why, or blowing up its memory."""
    hostile = HOSTILE[case]
    lab, daemon = gateway.lab, gateway.daemon
    gateway.restore()
    before = table_snapshot(lab)
    rejections_before = len(events_named(daemon, "desired state rejected; keeping the last good state"))

    hostile.make(daemon.state_path)

    def rejected() -> dict[str, Any] | None:
        status, detail = readyz(daemon)
        return detail if status == 503 and hostile.reason in detail.get("reason", "") else None

    detail = wait_for(rejected, f"/readyz naming {hostile.reason!r}", timeout=15)
    assert detail["applied_sha256"] == sha256(gateway.good), detail
    assert daemon.process.poll() is None
    assert daemon.get("/healthz") == (200, "ok\n")
    rejections = events_named(daemon, "desired state rejected; keeping the last good state")[rejections_before:]
    assert rejections, "no log line for the rejection"
    assert rejections[-1]["level"] == "error"
    assert any(hostile.reason in problem for problem in rejections[-1]["problems"]), rejections[-1]
    assert metric(daemon, "natgwd_desired_state_valid") == 0
    assert table_snapshot(lab) == before
    assert_dnat_works(lab)
    assert fetch(lab, "ext", DNAT_EIP, 9999) == "", "dnat02 of the rejected state is reachable"
    assert not non_json_log_lines(daemon), non_json_log_lines(daemon)[:3]
    rss = rss_mb(daemon.process.pid)
    gateway.rss[case] = rss
    print(f"hostile {case}: rejected ({detail['reason'][:140]}); RSS {rss:.1f} MB")
    assert rss < RSS_BOUND_MB
    if case == "100mb":
        peak = rss_mb(daemon.process.pid, "VmHWM")
        print(f"hostile 100mb: peak RSS {peak:.1f} MB")
        assert peak < RSS_BOUND_MB
    gateway.restore()
    assert table_snapshot(lab) == before


def test_non_atomic_writer_is_invalid_until_complete(gateway: Gateway) -> None:
    """Prevents: a writer that writes in place, in pieces, with pauses (no rename) getting
    a prefix of its document applied, or natgwd not picking up the finished file."""
    lab, daemon = gateway.lab, gateway.daemon
    gateway.restore()
    before = table_snapshot(lab)
    new = other_state()
    pieces = [new[i : i + len(new) // 7 + 1] for i in range(0, len(new), len(new) // 7 + 1)]
    observed: Counter[str] = Counter()
    with daemon.state_path.open("wb") as file:  # truncates in place: an empty file first
        for index, piece in enumerate(pieces):
            file.write(piece)
            file.flush()
            if index == len(pieces) - 1:
                break  # complete: natgwd may apply it from now on
            time.sleep(0.3)
            status, detail = readyz(daemon)
            assert detail["applied_sha256"] == sha256(gateway.good), "a partial file was applied"
            observed[f"{status} {detail.get('reason', '')[:60]}"] += 1
            assert table_snapshot(lab) == before
            assert_dnat_works(lab)
    daemon.wait_applied(sha256(new), timeout=10)
    assert fetch(lab, "ext", DNAT_EIP, 9999).startswith(f"{UPSTREAM}:")
    print(f"non-atomic writer: {len(pieces)} pieces 0.3s apart; readiness seen meanwhile: {dict(observed)}")
    gateway.restore()


def test_world_writable_file_is_accepted_with_the_flag(lab: Lab) -> None:
    """Prevents: --allow-writable-state not doing what it says (a writable ConfigMap
    mount would then never be applied)."""
    daemon = lab.start_natgwd(None, "--allow-writable-state")
    daemon.state_path.write_bytes(other_state())
    daemon.state_path.chmod(0o666)
    daemon.wait_applied(sha256(other_state()), timeout=15)
    assert daemon.process.poll() is None


def test_unreadable_file_is_rejected_once(gateway: Gateway) -> None:
    """Prevents: a hot loop of rejections (log spam, an inflated invalid counter) for one
    unusable file: it was re-read and rejected on every 200 ms poll for the 2 s after it
    changed (about 10 error lines for one FIFO)."""
    daemon = gateway.daemon
    gateway.restore()
    before = len(events_named(daemon, "desired state rejected; keeping the last good state"))
    put_fifo(daemon.state_path)
    time.sleep(3)
    count = len(events_named(daemon, "desired state rejected; keeping the last good state")) - before
    print(f"one FIFO in place of the file: rejected {count} times")
    gateway.restore()
    assert count == 1


def test_directory_in_place_of_the_file_leaks_no_descriptor(lab: Lab) -> None:
    """Prevents: descriptors leaking each time natgwd reads something that is not a file
    (os.fdopen raised IsADirectoryError without closing the fd: ~10 per directory swap)."""
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    pid = daemon.process.pid
    wait_for(
        lambda: events_named(daemon, "gratuitous ARP sent"), "the start-up GARP (its socket closes after)", timeout=10
    )
    baseline = fd_count(pid)
    put_directory(daemon.state_path)
    wait_for(lambda: "is a directory" in readyz(daemon)[1].get("reason", ""), "the directory rejected", timeout=10)
    time.sleep(2.5)
    for _ in range(3):
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.3)
    clear(daemon.state_path)
    daemon.write_state(seed())
    daemon.wait_applied()
    after = fd_count(pid)
    print(f"directory at the state path: fds {baseline} -> {after}")
    assert after <= baseline


def test_many_schema_errors_stay_bounded(lab: Lab) -> None:
    """Prevents: a file well under the size limit exhausting natgwd's memory (an OOM kill
    of the gateway pod) or blocking the reconcile loop for minutes: memory and time grew
    with the number of schema errors (this 1.2 MB file took ~0.5 GB and 12 s; a 32 MiB
    one, tens of GB)."""
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    pid = daemon.process.pid
    without_eips = {k: v for k, v in seed().items() if k != "eips"}
    bomb = encode(without_eips)[:-2] + b', "eips": [' + b"{}," * 399_999 + b"{}]}"
    print(f"schema-error bomb: {len(bomb) / 1e6:.1f} MB")
    started = time.monotonic()
    put_bytes(bomb)(daemon.state_path)
    peak = 0.0

    def rejected() -> bool:
        nonlocal peak
        peak = max(peak, rss_mb(pid))
        return readyz(daemon)[0] == 503

    # Time is a figure here, not a verdict (a loaded machine is slow): the bound that
    # matters is memory, and the rejection must come (minutes of blocking did not).
    wait_for(rejected, "the bomb rejected", timeout=120, interval=0.2)
    seconds = time.monotonic() - started
    peak = max(peak, rss_mb(pid, "VmHWM"))
    print(f"schema-error bomb: rejected after {seconds:.1f}s, peak RSS {peak:.0f} MB")
    assert daemon.process.poll() is None
    assert peak < RSS_BOUND_MB


def test_nesting_just_under_the_parser_limit_does_not_kill_natgwd(lab: Lab) -> None:
    """Prevents: a small state file crashing natgwd (a crash loop in Kubernetes): a port
    nested ~980 deep, just under json.loads' limit, made jsonschema's repr() raise
    RecursionError out of load_state."""
    lab.serve("vm1", tcp=[80])
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    before = table_snapshot(lab)
    base = encode(seed())
    died_at = None
    for depth in range(950, 1000):
        nested = b"[" * depth + b"]" * depth
        daemon.write_state(base.replace(b'"externalPort": "8888"', b'"externalPort": ' + nested))
        time.sleep(0.25)
        if daemon.process.poll() is not None:
            died_at = depth
            break
    print(f"nesting near the parser limit: natgwd {f'died at depth {died_at}' if died_at else 'survived'}")
    assert table_snapshot(lab) == before
    assert_dnat_works(lab)  # the data plane stays either way
    assert died_at is None, daemon.log()[-600:]
