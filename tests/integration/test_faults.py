"""natgwd under faults: killed mid-change, fed torn and hostile files, interfered with by
other processes, run with only the capabilities it needs, flooded on its HTTP port, and
soaked with a change every 100 ms.

Every test builds its own lab (network namespaces with unique names, removed afterwards,
with every process started in them); traffic never leaves the lab. Measured figures are
printed (run with -s to see them); only generous bounds are asserted.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from natgwd.kernel.nft import parse_table
from natgwd.lab.topology import SEED_STATE, Lab, Natgwd
from natgwd.planning.layout import RULE_CONNECTIONS, RULE_TRAFFIC
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import TableContents
from natgwd.runtime.endpoints import MAX_CONCURRENT_REQUESTS
from natgwd.state.validation import MAX_FILE_BYTES, load_state
from tests.integration.helpers import (
    DNAT_EIP,
    FIP_EIP,
    METRICS_PORT,
    UPSTREAM,
    UPSTREAM_PORT,
    assert_dnat_works,
    assert_fip_works,
    assert_snat_works,
    client_command,
    encode,
    events_named,
    fetch,
    gateway_routes,
    kill_process,
    log_events,
    non_json_log_lines,
    prober,
    readyz,
    sha256,
    start_natgwd_with,
    wait_for,
)

SEED_DNAT_KEY = "{ 10.115.55.200 . tcp . 8888 }"
NATGWD_PROTO = 249
RSS_BOUND_MB = 300
THREAD_BOUND = 40


# --- small helpers ------------------------------------------------------------------------


def seed() -> dict[str, Any]:
    return copy.deepcopy(SEED_STATE)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) in MB."""
    return int(proc_status(pid)[key].split()[0]) / 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def errors_logged(daemon: Natgwd) -> list[dict[str, Any]]:
    return [e for e in log_events(daemon) if e.get("level") in ("error", "critical")]


def metric(daemon: Natgwd, name: str) -> float | None:
    return daemon.metrics().get(name)


def serve_all(lab: Lab) -> None:
    lab.serve("vm1", tcp=[80])
    lab.serve("vm2", tcp=[80])
    lab.serve("vm3", tcp=[80])
    lab.serve("ext", tcp=[UPSTREAM_PORT])


# --- nftables contents, independent of rule ids ----------------------------------------------

# Maps and sets whose keys and values hold no rule id.
_ID_FREE = re.compile(r"^(eips|invalid_dropped|dnat_target|dnat_share|fip_in_target|fip_out_target|snat_p\d+_target)$")
# Maps whose keys hold no rule id (their values are ids).
_ID_VALUED = re.compile(r"^(dnat_rule|fip_in_rule|fip_out_rule|snat_p\d+_rule)$")


def signature(contents: TableContents) -> dict[str, Any]:
    """What a table holds, leaving out rule ids (which differ between runs): the sets and
    chains, every id-free map, the keys of the id-valued maps, the rule labels of
    rule_connections and the size of rule_traffic."""
    found: dict[str, Any] = {
        "sets": dict(contents.sets),
        # Share chains name rule ids in their rules: only their presence is compared.
        "chains": {n: (len(t) if n.startswith("share_") else t) for n, t in contents.chains.items()},
    }
    for name, elements in contents.elements.items():
        if _ID_FREE.match(name):
            found[name] = frozenset((key, e.value) for key, e in elements.items())
        elif _ID_VALUED.match(name):
            found[name] = frozenset(elements)
        elif name == RULE_CONNECTIONS:
            found[name] = frozenset(e.comment for e in elements.values())
        elif name == RULE_TRAFFIC:
            found[name] = len(elements)
    return found


def expected_signature(state: dict[str, Any]) -> dict[str, Any]:
    model = load_state(encode(state))
    return signature(desired_table(model, assign_ids(model, {})).contents())


def kernel_contents(lab: Lab) -> TableContents | None:
    result = lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd", check=False)
    if result.returncode != 0:
        assert "No such file or directory" in result.stderr, result.stderr
        return None
    return parse_table(json.loads(result.stdout)["nftables"])


def kernel_signature(lab: Lab) -> dict[str, Any] | None:
    contents = kernel_contents(lab)
    return signature(contents) if contents is not None else None


def describe_mix(got: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> str:
    """For a table that is neither A nor B: per part, how much of it is A's and B's."""
    lines = []
    for key in sorted(set(got) | set(a) | set(b)):
        g, x, y = got.get(key), a.get(key), b.get(key)
        if g in (x, y) and x == y:
            continue
        if isinstance(g, frozenset):
            lines.append(
                f"{key}: {len(g)} elements, {len(g & (x or frozenset()))} of A's {len(x or ())}, "
                f"{len(g & (y or frozenset()))} of B's {len(y or ())}"
            )
        else:
            lines.append(f"{key}: kernel {g!r:.200}, A {x!r:.200}, B {y!r:.200}")
    return "\n".join(lines)


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


def net2_addresses(lab: Lab) -> set[str]:
    links = json.loads(lab.exec("gw", "ip", "-j", "-4", "addr", "show", "dev", "net2").stdout)
    return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", ())}


def forwarding(lab: Lab) -> str:
    return lab.exec("gw", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


# --- states with thousands of rules ------------------------------------------------------------


def many_rules(
    variant: int,
    dnat: int,
    snat: int,
    fip: int,
    dnat_eips: int = 10,
    ranges: int = 4,
    range_length: int = 250,
) -> dict[str, Any]:
    """The seed plus `dnat` DNAT (`ranges` of them port ranges), `snat` SNAT and `fip`
    FIP rules; backends behind the internal route 10.60.0.0/16 via 172.20.10.1. Variants
    0 and 1 differ everywhere: every DNAT target, a tenth of the DNAT names, the SNAT
    prefix lengths (maps and the postrouting chain come and go) and EIPs, the FIP
    backends and 20 of the FIP EIPs."""
    state = seed()
    state["internal"]["routes"].append({"dst": "10.60.0.0/16", "via": "172.20.10.1"})
    base = IPv4Address("10.115.49.1")
    for i in range(dnat_eips):
        state["eips"].append({"name": f"dnat-eip-{i}", "v4ip": str(base + i)})
    own = min(20, fip)
    fip_slots = list(range(fip - own)) + [fip - own + variant * own + k for k in range(own)]
    for slot in fip_slots:
        state["eips"].append({"name": f"fip-eip-{slot}", "v4ip": str(IPv4Address("10.115.50.0") + slot)})
    for i in range(ranges):
        first = 20000 + i * 1000
        state["dnat"].append(
            {
                "name": f"range-{i}",
                "eip": f"dnat-eip-{i % dnat_eips}",
                "protocol": "tcp",
                "externalPort": f"{first}-{first + range_length - 1}",
                "internalIp": str(IPv4Address("10.60.250.0") + variant * 10 + i + 1),
                "internalPort": f"{30000 + variant * 5000}-{30000 + variant * 5000 + range_length - 1}",
            }
        )
    for i in range(dnat - ranges):
        renamed = variant == 1 and i % 10 == 0
        state["dnat"].append(
            {
                "name": f"dnat-{i}-b" if renamed else f"dnat-{i}",
                "eip": f"dnat-eip-{i % dnat_eips}",
                "protocol": "tcp" if i % 2 else "udp",
                "externalPort": 10000 + i // dnat_eips,
                "internalIp": str(IPv4Address("10.60.0.0") + variant * 16384 + i + 1),
                "internalPort": 80 + variant,
            }
        )
    prefixes = ((24, 26, 28), (24, 25, 27))[variant]
    for i in range(snat):
        network = IPv4Network((int(IPv4Address("10.62.0.0")) + i * 256, prefixes[i % 3]))
        state["snat"].append(
            {"name": f"snat-{i}", "eip": f"dnat-eip-{(i + variant) % dnat_eips}", "internalCIDR": str(network)}
        )
    for k, slot in enumerate(fip_slots):
        backend = IPv4Address("10.60.200.0") + (k + variant * 7) % 600 + 1
        state["fip"].append({"name": f"fip-{k}", "eip": f"fip-eip-{slot}", "internalIp": str(backend)})
    return state


def eip_addresses(state: dict[str, Any]) -> set[str]:
    """What net2 should carry for a state: its own address and every EIP (/21)."""
    return set(state["external"]["addresses"]) | {f"{e['v4ip']}/21" for e in state["eips"]}


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# --- a. crash atomicity -----------------------------------------------------------------------


@dataclass
class CrashReport:
    kills: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    aimed_at_transaction: int = 0
    delays: list[float] = field(default_factory=list)


def crash_loop(lab: Lab, kills: int, seed_value: int) -> CrashReport:
    rng = random.Random(seed_value)
    states = [many_rules(0, 3000, 300, 300), many_rules(1, 3000, 300, 300)]
    data = [encode(s) for s in states]
    signatures = [expected_signature(s) for s in states]
    assert signatures[0] != signatures[1]
    for key in ("dnat_target", "fip_in_target", "eips", RULE_CONNECTIONS):
        assert signatures[0][key] != signatures[1][key], key
    print(
        "crash: states of",
        [len(s["dnat"]) + len(s["snat"]) + len(s["fip"]) for s in states],
        "rules,",
        [len(s["dnat_target"]) for s in signatures],
        "DNAT elements",
    )

    daemon = lab.start_natgwd(states[0], "--resync-interval", "3600")
    daemon.wait_applied(sha256(data[0]), timeout=90)
    assert kernel_signature(lab) == signatures[0]

    # Calibrate: one change without a kill, to know when its transaction runs.
    written = time.time()
    daemon.write_state(data[1])
    daemon.wait_applied(sha256(data[1]), timeout=90)
    apply_seconds = time.time() - written
    (tx, *_) = [e for e in reversed(events_named(daemon, "nftables transaction applied")) if event_time(e) > written]
    tx_end = event_time(tx) - written
    tx_start = tx_end - float(tx["seconds"])
    print(
        f"crash: a change applies {apply_seconds:.3f}s after the write; "
        f"its transaction ran {tx_start:.3f}-{tx_end:.3f}s"
    )

    report = CrashReport()
    current = 1
    for kill in range(kills):
        following = 1 - current
        if kill % 2:
            delay = rng.uniform(max(0.0, tx_start - 0.03), tx_end + 0.03)
            report.aimed_at_transaction += 1
        else:
            delay = rng.uniform(0, apply_seconds * 1.3)
        report.delays.append(delay)
        written = time.time()
        daemon.write_state(data[following])
        time.sleep(delay)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)

        got = kernel_signature(lab)
        assert got is not None, f"kill {kill}: the table is gone"
        logged = any(event_time(e) > written for e in events_named(daemon, "nftables transaction applied"))
        if got == signatures[current]:
            assert not logged, f"kill {kill}: natgwd logged the transaction but the kernel holds the old state"
            report.outcomes["old state"] += 1
        elif got == signatures[following]:
            # Committed but not logged yet: the kill landed inside the apply call, after the commit.
            report.outcomes["new state" if logged else "new state, killed before logging it"] += 1
        else:
            which = ("A", "B") if current == 0 else ("B", "A")
            pytest.fail(
                f"kill {kill} ({delay:.3f}s after writing {which[1]}): the kernel holds a mix of A and B:\n"
                + describe_mix(got, signatures[0], signatures[1])
            )
        record = json.loads(lab.applied_state_path.read_bytes())  # never torn: written by rename
        assert record["sha256"] in {sha256(d) for d in data}
        report.kills += 1

        daemon = lab.start_natgwd(None, "--resync-interval", "3600")
        daemon.wait_applied(sha256(data[following]), timeout=90)
        assert kernel_signature(lab) == signatures[following], f"restart after kill {kill} did not converge"
        assert net2_addresses(lab) == eip_addresses(states[following])
        current = following
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert daemon.stop() == 0
    return report


def _crash_test(lab: Lab, kills: int) -> None:
    lab.serve("vm1", tcp=[80])
    lab.serve("ext", tcp=[UPSTREAM_PORT])
    started = time.monotonic()
    report = crash_loop(lab, kills, seed_value=20261126)
    print(
        f"crash: {report.kills} SIGKILLs survived in {time.monotonic() - started:.0f}s "
        f"({report.aimed_at_transaction} aimed at the transaction window); kernel afterwards: "
        f"{dict(report.outcomes)}; delays {min(report.delays):.3f}-{max(report.delays):.3f}s"
    )
    assert report.kills == kills


def test_sigkill_during_large_changes_leaves_one_whole_state(lab: Lab) -> None:
    """Prevents: a natgwd killed while changing thousands of rules leaving the kernel with
    part of the old and part of the new state (a transaction split in several), and a
    restarted natgwd failing to converge on the file."""
    _crash_test(lab, kills=15)


@pytest.mark.slow
def test_sigkill_during_large_changes_leaves_one_whole_state_long(lab: Lab) -> None:
    """The same as above with 100 kills."""
    _crash_test(lab, kills=100)


# --- b. torn and hostile files ------------------------------------------------------------------


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


# --- c. drift and interference --------------------------------------------------------------------

INTRUDER_SETUP = """
nft add table ip intruder
nft add chain ip intruder intruder_fwd '{ type filter hook forward priority 10; policy accept; }'
nft add rule ip intruder intruder_fwd ip daddr 192.0.2.1 counter accept
nft add set ip intruder blocked '{ type ipv4_addr; }'
nft add element ip intruder blocked '{ 192.0.2.99 }'
nft add table inet natgwd_shadow
nft add chain inet natgwd_shadow c
nft add rule inet natgwd_shadow c ip daddr 192.0.2.2 counter
ip addr add 192.0.2.10/24 dev net2
ip addr add 172.20.10.250/24 dev net1
ip route add 10.99.0.0/16 via 172.20.10.1 dev net1
"""


def foreign_state(lab: Lab) -> dict[str, Any]:
    """Everything in the gateway that is not natgwd's, exactly (handles, counters)."""
    return {
        "intruder": lab.exec("gw", "nft", "-j", "list", "table", "ip", "intruder").stdout,
        "shadow": lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd_shadow").stdout,
        "tables": sorted(set(lab.exec("gw", "nft", "list", "tables").stdout.splitlines()) - {"table inet natgwd"}),
        "net1": lab.exec("gw", "ip", "-4", "addr", "show", "dev", "net1").stdout.count("172.20.10.250/24"),
        "net2": lab.exec("gw", "ip", "-4", "addr", "show", "dev", "net2").stdout.count("192.0.2.10/24"),
        "route": {k: v for k, v in gateway_routes(lab).get("10.99.0.0/16", {}).items() if k != "flags"},
    }


@dataclass(frozen=True)
class Round:
    name: str
    disruption: str  # shell commands run in the gateway
    state: dict[str, Any]
    change: str  # "none", "after" (written right after the disruption) or "before" (just before it)

    @property
    def bound(self) -> float:
        """Seconds within which natgwd must have repaired and applied everything: about
        two resync intervals (1 s), a retry after a transaction the disruption made fail,
        and slack."""
        return 5.0


def drift_rounds() -> list[Round]:
    second = seed()
    second["dnat"].append(
        {
            "name": "dnat02",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": 9999,
            "internalIp": "172.20.10.4",
            "internalPort": 80,
        }
    )
    third = copy.deepcopy(second)
    third["dnat"][1]["internalIp"] = "172.20.10.3"
    third["snat"].append({"name": "vpc2", "eip": "my-eip2", "internalCIDR": "10.55.0.0/16"})
    return [
        Round(
            "no change in flight: flush table, EIP address, default route, forwarding",
            f"nft flush table inet natgwd; ip addr del {FIP_EIP}/21 dev net2; ip route del default; "
            "sysctl -qw net.ipv4.ip_forward=0",
            seed(),
            change="none",
        ),
        Round(
            "flush table, EIP address, default route, forwarding",
            f"nft flush table inet natgwd; ip addr del {DNAT_EIP}/21 dev net2; ip route del default; "
            "sysctl -qw net.ipv4.ip_forward=0",
            second,
            change="after",
        ),
        Round(
            "elements deleted and hijacked, foreign rule, chain and set in natgwd's table",
            f"nft delete element inet natgwd dnat_target '{SEED_DNAT_KEY}'; "
            "nft add element inet natgwd dnat_target '{ 10.115.55.200 . tcp . 7777 : 172.20.10.4 . 80 }'; "
            "nft delete element inet natgwd rule_connections '{ 1 }'; "
            "nft insert rule inet natgwd prerouting tcp dport 8888 drop; "
            "nft add chain inet natgwd sneaky; nft add set inet natgwd sneaky_set '{ type ipv4_addr; }'; "
            "nft add rule ip intruder intruder_fwd ip daddr 192.0.2.3 counter drop; "
            "sysctl -qw net.ipv4.ip_forward=0",
            third,
            change="before",
        ),
        Round(
            "table deleted, own address and internal route removed",
            "nft delete table inet natgwd; ip addr del 10.115.48.1/21 dev net2; "
            "ip route del 10.55.0.0/16; nft add element ip intruder blocked '{ 192.0.2.98 }'",
            seed(),
            change="after",
        ),
    ]


def converged(lab: Lab, daemon: Natgwd, state: dict[str, Any], wanted: dict[str, Any]) -> bool:
    status, detail = readyz(daemon)
    if status != 200 or detail.get("applied_sha256") != sha256(encode(state)):
        return False
    if kernel_signature(lab) != wanted:
        return False
    if not eip_addresses(state) <= net2_addresses(lab):
        return False
    routes = gateway_routes(lab)
    default = routes.get("default", {})
    if default.get("gateway") != UPSTREAM or default.get("protocol") != str(NATGWD_PROTO):
        return False
    if routes.get("10.55.0.0/16", {}).get("gateway") != "172.20.10.1":
        return False
    return forwarding(lab) == "1"


def test_drift_and_interference_under_traffic_and_changes(lab: Lab) -> None:
    """Prevents: natgwd failing to repair its own table, addresses, routes and forwarding
    when another process breaks them while traffic flows and a state change is in flight,
    a repair or change touching anything that is not natgwd's (other tables, even one
    named like its own, addresses, routes), and traffic through unchanged rules failing
    outside the moments it was broken by hand."""
    serve_all(lab)
    daemon = lab.start_natgwd(seed(), "--resync-interval", "1")
    daemon.wait_applied()
    lab.exec("gw", "sh", "-ec", INTRUDER_SETUP)
    probes = [
        prober(lab, "ext", DNAT_EIP, 8888, "dnat"),
        prober(lab, "vm1", UPSTREAM, UPSTREAM_PORT, "snat"),
        prober(lab, "vm2", UPSTREAM, UPSTREAM_PORT, "fip"),
    ]
    windows: list[tuple[float, float]] = []
    rng = random.Random(7)
    for round_ in drift_rounds():
        wanted = expected_signature(round_.state)
        started = time.time()
        if round_.change == "before":
            daemon.write_state(round_.state)
            time.sleep(rng.uniform(0, 0.3))
        lab.exec("gw", "sh", "-c", round_.disruption)
        if round_.change == "after":
            daemon.write_state(round_.state)
        foreign = foreign_state(lab)  # including the intruder's own change of this round
        wait_for(
            functools.partial(converged, lab, daemon, round_.state, wanted), f"repair after: {round_.name}", timeout=20
        )
        repaired = time.time()
        windows.append((started, repaired))
        print(f"drift round '{round_.name}': repaired and applied {repaired - started:.2f}s after the disruption")
        assert repaired - started < round_.bound, f"not repaired within {round_.bound}s"
        time.sleep(1.2)  # one more resync: the repair is stable and leaves foreign state alone
        assert foreign_state(lab) == foreign
        assert converged(lab, daemon, round_.state, wanted)
        assert_dnat_works(lab)
        assert_snat_works(lab)
        assert_fip_works(lab)
    time.sleep(1)
    ended = time.time()
    for probe in probes:
        kill_process(probe.process)
    repairs = {k: v for k, v in daemon.metrics().items() if k.startswith("natgwd_drift_repairs_total")}
    print(f"drift: repairs counted {repairs}")
    assert all(v >= 1 for v in repairs.values()), repairs
    for probe in probes:
        results = [r for r in probe.results() if r[0] < ended]
        failures = [r for r in results if not r[1]]
        outside = [r for r in failures if not any(a - 0.1 <= r[0] <= b + 1.0 for a, b in windows)]
        print(f"drift: {probe.name} traffic {len(results)} requests, {len(failures)} failed, all inside the windows")
        assert not outside, f"{probe.name} failed outside the disruption windows: {outside[:5]}"
        assert all(ok for when, ok, _ in results if when > windows[-1][1] + 1.0), f"{probe.name} not recovered"
    assert daemon.process.poll() is None
    assert not non_json_log_lines(daemon)


def test_drift_just_before_a_change_is_repaired_within_two_resyncs(lab: Lab) -> None:
    """Prevents: a change to the state file laundering drift that happened just before it:
    the apply diffed against memory and recorded the ruleset generation after its own
    commit, so resyncs skipped reading the table and rules flushed by hand stayed flushed
    (~60 s at the default interval) while /readyz said ready."""
    interval = 3.0
    lab.serve("vm1", tcp=[80])
    daemon = lab.start_natgwd(seed(), "--resync-interval", str(interval))
    daemon.wait_applied()
    lab.exec("gw", "nft", "flush", "table", "inet", "natgwd")
    changed = seed()
    changed["dnat"].append({**changed["dnat"][0], "name": "dnat02", "externalPort": 7000})
    flushed = time.monotonic()
    daemon.write_state(changed)
    (started,) = events_named(daemon, "natgwd started")
    # Before natgwd's first resync: the sixth resync, which reads the table whatever the
    # generation says, is then ~18 s away, well past the bound below.
    assert time.time() - event_time(started) < interval - 0.5, "too slow to set the scene"
    daemon.wait_applied(sha256(encode(changed)))
    ready_but_broken = not fetch(lab, "ext", DNAT_EIP, 8888, timeout=1)
    # Two resync intervals, plus the 2 s in which a fresh write holds resyncs back, plus slack.
    deadline = flushed + 2 * interval + 2 + 1
    while time.monotonic() < deadline and not fetch(lab, "ext", DNAT_EIP, 8888, timeout=1):
        time.sleep(0.2)
    print(
        f"flush just before a change: /readyz ready while DNAT broken: {ready_but_broken}; "
        f"DNAT still broken {time.monotonic() - flushed:.1f}s later"
    )
    assert_dnat_works(lab)


def test_drift_is_repaired_while_the_file_keeps_changing(lab: Lab) -> None:
    """Prevents: frequent state changes (every 0.5 s here) keeping natgwd from ever
    repairing drift in rules that did not change (resyncs used to wait for 2 s without a
    write; an element deleted by hand stayed deleted through 20 s of such writes)."""
    lab.serve("vm1", tcp=[80])
    daemon = lab.start_natgwd(seed(), "--resync-interval", "1")
    daemon.wait_applied()
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            state = seed()
            state["dnat"].append({**state["dnat"][0], "name": "moving", "externalPort": 7000, "internalPort": n})
            daemon.write_state(state)
            stop.wait(0.5)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(1)
        lab.exec("gw", "nft", "delete", "element", "inet", "natgwd", "dnat_target", SEED_DNAT_KEY)
        deleted = time.monotonic()
        present = f"{SEED_DNAT_KEY[1:-1].strip()} : 172.20.10.2 . 80"

        def restored() -> bool:
            return present in lab.exec("gw", "nft", "list", "map", "inet", "natgwd", "dnat_target").stdout

        wait_for(restored, "the deleted element restored while the file keeps changing", timeout=6)
        print(f"drift under churn: repaired after {time.monotonic() - deleted:.2f}s")
    finally:
        stop.set()
        thread.join(5)


# --- d. least privilege --------------------------------------------------------------------------

ONLY_NET_CAPS = "-all,+net_admin,+net_raw"
CAP_NET_ADMIN_AND_RAW = 0x3000


def setpriv(uid: int | None) -> list[str]:
    """As uid 0 (or another uid) with NET_ADMIN and NET_RAW only: inheritable, ambient and
    bounding sets all reduced, so nothing can gain any other capability."""
    ids = ["--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid else []
    return [
        "setpriv",
        *ids,
        f"--inh-caps={ONLY_NET_CAPS}",
        f"--ambient-caps={ONLY_NET_CAPS}",
        f"--bounding-set={ONLY_NET_CAPS}",
        "--",
    ]


def readable_runtime(into: Path) -> Path:
    """natgwd and the distributions it needs at run time, copied into `into` (readable by
    every user) for PYTHONPATH: the checkout and its .venv may sit in a folder only root can
    enter (root's home, mkdtemp), which another uid cannot import from."""
    import natgwd

    shutil.copytree(Path(natgwd.__file__).parent, into / "natgwd", ignore=shutil.ignore_patterns("__pycache__"))
    todo, seen = ["natgwd"], set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            found = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency not installed
        todo += [re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0] for r in found.requires or () if "extra ==" not in r]
        if name == "natgwd":
            continue  # its files are the editable install's hook into the checkout
        for file in found.files or ():
            source = Path(str(found.locate_file(file)))
            if not file.parts[0].startswith("..") and source.is_file():
                (into / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, into / file)
    return into


@pytest.mark.parametrize("uid", [0, 65534], ids=["uid0", "uid65534"])
def test_runs_with_only_net_admin_and_net_raw(lab: Lab, uid: int) -> None:
    """Prevents: natgwd needing more than CAP_NET_ADMIN and CAP_NET_RAW (as the README
    says): nftables, addresses, routes, conntrack, gratuitous ARP and turning on
    ip_forward must all work with just those two."""
    from tests.integration.lifecycle_helpers import capture_arp

    serve_all(lab)
    os.chmod(lab.workdir, 0o755)  # mkdtemp's 0700 would keep a non-root uid from its file
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")  # natgwd must turn it on itself
    capture = capture_arp(lab, "ext", "eth0")
    applied = None if uid == 0 else ""  # nowhere to write the record as another uid
    wrapper, env = setpriv(uid), {}
    if uid:
        # The system's interpreter (the venv's is a link inside the checkout) on a copy of
        # natgwd that any uid can read; -P: not the working directory (the checkout) either.
        env = {"PYTHONPATH": str(readable_runtime(lab.workdir / "runtime"))}
        wrapper += ["sh", "-c", 'shift; exec "$INTERPRETER" -P "$@"', "sh"]
        env["INTERPRETER"] = os.path.realpath(sys.executable)
    daemon = start_natgwd_with(
        lab, seed(), "--resync-interval", "1", wrapper=wrapper, env=env, applied_state=applied, name="caps"
    )
    daemon.wait_applied(timeout=20)

    status = proc_status(daemon.process.pid)
    assert "python" in status["Name"], status["Name"]
    assert status["Uid"].split() == [str(uid)] * 4
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[key], 16) == CAP_NET_ADMIN_AND_RAW, (key, status[key])
    decoded = lab.exec("gw", "capsh", f"--decode={status['CapEff']}").stdout.strip()
    print(f"least privilege (uid {uid}): CapEff {status['CapEff']} = {decoded}")

    assert forwarding(lab) == "1", "natgwd did not turn ip_forward on"
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)

    def announced() -> bool:
        frames = {(f.psrc, f.eth_src) for f in capture.gratuitous()}
        return {DNAT_EIP, FIP_EIP} <= {address for address, _ in frames}

    wait_for(announced, "gratuitous ARP for both EIPs", timeout=10)
    garp_metric = 'natgwd_gratuitous_arp_packets_total{interface="net2"}'
    garp = wait_for(lambda: daemon.metrics().get(garp_metric) == 6 and 6, "6 GARP frames counted", timeout=10)

    # Forwarding turned off at run time is repaired too, and rules follow a change.
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")
    wait_for(lambda: forwarding(lab) == "1", "forwarding repaired with reduced capabilities", timeout=10)
    changed = seed()
    changed["dnat"][0]["externalPort"] = "8889"
    daemon.write_state(changed)
    daemon.wait_applied(sha256(encode(changed)))
    assert fetch(lab, "ext", DNAT_EIP, 8889).startswith(f"{UPSTREAM}:")
    assert not errors_logged(daemon), errors_logged(daemon)
    print(f"least privilege (uid {uid}): ip_forward 0 -> 1 written at start and repaired at run time; GARP {garp:.0f}")


def test_read_only_proc_sys_still_forwards(lab: Lab) -> None:
    """Prevents: natgwd depending on a writable /proc/sys (unprivileged Kubernetes pods
    mount it read-only): with forwarding off and /proc/sys read-only it must still turn
    forwarding on for its interfaces (over netlink), pass traffic, and repair forwarding
    turned off by hand."""
    serve_all(lab)
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")  # every interface's forwarding off too
    read_only = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind -o ro /proc/sys /proc/sys && exec "$@"',
        "sh",
    ]
    daemon = start_natgwd_with(lab, seed(), "--resync-interval", "1", wrapper=[*read_only, *setpriv(0)], name="ro")
    daemon.wait_applied(timeout=20)
    mounts = Path(f"/proc/{daemon.process.pid}/mountinfo").read_text()
    assert any(" /proc/sys " in line and " ro," in line for line in mounts.splitlines()), "not read-only"
    assert int(proc_status(daemon.process.pid)["CapEff"], 16) == CAP_NET_ADMIN_AND_RAW

    def interface_forwarding() -> dict[str, str]:
        return {
            name: lab.exec("gw", "cat", f"/proc/sys/net/ipv4/conf/{name}/forwarding").stdout.strip()
            for name in ("net1", "net2")
        }

    print(f"read-only /proc/sys: ip_forward {forwarding(lab)}, per interface {interface_forwarding()}")
    assert interface_forwarding() == {"net1": "1", "net2": "1"}
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.conf.net2.forwarding=0")
    wait_for(lambda: interface_forwarding()["net2"] == "1", "net2 forwarding repaired over netlink", timeout=10)
    assert_snat_works(lab)
    assert not errors_logged(daemon), errors_logged(daemon)
    assert daemon.process.poll() is None


# --- e. HTTP exposure ----------------------------------------------------------------------------

RAW_HTTP = r"""
import json, socket, sys
port = int(sys.argv[1])
answers = []
for request in json.loads(sys.stdin.read()):
    c = socket.create_connection(("127.0.0.1", port), timeout=15)
    c.sendall(request.encode("latin-1"))
    data = b""
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as err:
        data += ("<%s>" % type(err).__name__).encode()
    c.close()
    head, _, body = data.partition(b"\r\n\r\n")
    answers.append([head.split(b"\r\n")[0].decode("latin-1"), head.decode("latin-1"), body[:200].decode("latin-1")])
print(json.dumps(answers))
"""


def raw_requests(lab: Lab, requests: list[str]) -> list[tuple[str, str, str]]:
    """Send each request on its own connection from inside the gateway; (status line,
    head, start of body) of each answer."""
    out = lab.exec("gw", sys.executable, "-c", RAW_HTTP, str(METRICS_PORT), stdin=json.dumps(requests)).stdout
    return [(a[0], a[1], a[2]) for a in json.loads(out)]


def test_http_serves_only_get_of_four_paths(lab: Lab) -> None:
    """Prevents: the metrics port answering anything but GET of /, /metrics, /healthz and
    /readyz (a typo'd probe looking healthy, a write method accepted)."""
    daemon = lab.start_natgwd(seed())
    daemon.wait_applied()
    served = ["/", "/metrics", "/healthz", "/readyz", "/metrics?x=1"]
    # (http.server turns a leading "//" into "/": //metrics is /metrics, not tested here.)
    unknown = ["/nope", "/metrics/", "/healthz/x", "/../metrics", "/METRICS", "/%2e%2e/", "*"]
    requests = [f"GET {p} HTTP/1.0\r\n\r\n" for p in served + unknown]
    methods = ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    requests += [f"{m} {p} HTTP/1.0\r\nContent-Length: 0\r\n\r\n" for m in methods for p in ("/metrics", "/", "/nope")]
    odd = ["TRACE", "CONNECT", "BREW", "get"]
    requests += [f"{m} /metrics HTTP/1.0\r\n\r\n" for m in odd]
    answers = raw_requests(lab, requests)
    statuses = [a[0].split(" ")[1] if a[0].count(" ") else a[0] for a in answers]
    by_request = dict(zip((r.split("\r\n")[0] for r in requests), statuses, strict=True))
    print("http surface:", by_request)
    for path, status in zip(served, statuses, strict=False):
        assert status == "200", (path, status)
    for path, status in zip(unknown, statuses[len(served) :], strict=False):
        assert status == "404", (path, status)
    start = len(served) + len(unknown)
    for (method, path), status, answer in zip(
        ((m, p) for m in methods for p in ("/metrics", "/", "/nope")), statuses[start:], answers[start:], strict=False
    ):
        assert status == "405", (method, path, status)
        assert "Allow: GET" in answer[1], answer
    for method, status, answer in zip(
        odd, statuses[start + 3 * len(methods) :], answers[start + 3 * len(methods) :], strict=True
    ):
        # http.server answers methods it has no handler for with 501 (RFC 9110 allows it).
        assert status in ("405", "501"), (method, status)
        assert "natgwd_" not in answer[2]
    assert daemon.process.poll() is None


SLOW_CLIENTS = r"""
import json, socket, sys, time
port, count, hold, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sockets, connected, refused = [], [], 0
for i in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metr")  # a partial request line, then nothing
        sockets.append(s)
        connected.append(time.monotonic())
    except OSError:
        refused += 1
open(out + ".ready", "w").close()
closed_after = {}
deadline = time.monotonic() + hold
for s in sockets:
    s.setblocking(False)
while time.monotonic() < deadline and len(closed_after) < len(sockets):
    for i, s in enumerate(sockets):
        if i in closed_after:
            continue
        try:
            if s.recv(4096) == b"":
                closed_after[i] = time.monotonic() - connected[i]
        except BlockingIOError:
            pass
        except OSError:
            closed_after[i] = time.monotonic() - connected[i]
    time.sleep(0.05)
for s in sockets:
    s.close()
times = sorted(closed_after.values())
json.dump({"opened": len(sockets), "refused_connect": refused, "closed_by_server": len(times),
           "closed_at_once": sum(1 for t in times if t < 1.5), "held": [round(t, 2) for t in times if t >= 1.5],
           "still_open_at_end": len(sockets) - len(times)}, open(out, "w"))
"""

MALFORMED = r"""
import collections, json, random, re, socket, sys, threading, time
port, count = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(3)
def garbage():
    return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 4096))).replace(b"\n", b"") + b"\r\n\r\n"
kinds = {
    "garbage": garbage,
    "100KB-request-line": lambda: b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    "200-headers": lambda: b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "100KB-header": lambda: b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
    "bad-version": lambda: b"GET /metrics HTTP/9.9\r\n\r\n",
    "no-version-junk": lambda: b"GET /metrics junk junk\r\n\r\n",
    "bare-method": lambda: b"GET\r\n\r\n",
    "nul-in-path": lambda: b"GET /met\x00rics HTTP/1.1\r\n\r\n",
    "header-without-colon": lambda: b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    "unknown-method": lambda: b"BREW /metrics HTTP/1.1\r\n\r\n",
    "binary-method": lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}
names = list(kinds)
results = collections.Counter()
lock = threading.Lock()
todo = list(range(count))
def worker():
    while True:
        with lock:
            if not todo:
                return
            i = todo.pop()
        name = names[i % len(names)]
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=15)
            c.sendall(kinds[name]())
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            c.close()
            line = data.split(b"\r\n", 1)[0].decode("latin-1")
            code = re.search(rb"Error code: (\d+)", data)
            if line.startswith("HTTP/"):
                status = line.split(" ")[1]
            elif code:  # http.server answers an HTTP/0.9-looking request with a bare error page
                status = code.group(1).decode() + "-bare"
            else:
                status = "closed" if not data else "no-status:" + line[:20]
        except socket.timeout:
            status = "timeout"
        except OSError as err:
            status = type(err).__name__
        with lock:
            results[name + " " + status] += 1
threads = [threading.Thread(target=worker) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""


def metrics_latency(lab: Lab) -> tuple[int, float]:
    """(status, seconds) of one GET /metrics from inside the gateway."""
    out = lab.exec(
        "gw",
        "curl",
        "-s",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{time_total}",
        f"http://127.0.0.1:{METRICS_PORT}/metrics",
        check=False,
        timeout=20,
    ).stdout
    status, _, seconds = out.partition(" ")
    return int(status or 0), float(seconds or "nan")


@dataclass
class Flood:
    slow: dict[str, Any]
    probes_while_held: list[tuple[int, float]]
    max_threads: int
    max_fds: int


def slow_flood(lab: Lab, daemon: Natgwd, count: int, hold: float) -> Flood:
    """`count` connections that send a partial request line and stall, held up to `hold`
    seconds; /metrics is tried and natgwd's threads and fds are sampled meanwhile."""
    pid = daemon.process.pid
    out = lab.workdir / "slow.json"
    process = lab.spawn("gw", sys.executable, "-c", SLOW_CLIENTS, str(METRICS_PORT), str(count), str(hold), str(out))
    wait_for(lambda: Path(f"{out}.ready").exists(), "the slow clients connected", timeout=20)
    probes: list[tuple[int, float]] = []
    max_threads = max_fds = 0
    while process.poll() is None:
        max_threads, max_fds = max(max_threads, thread_count(pid)), max(max_fds, fd_count(pid))
        if len(probes) < 3:
            probes.append(metrics_latency(lab))
        time.sleep(0.2)
    return Flood(json.loads(out.read_text()), probes, max_threads, max_fds)


def settled_fds(daemon: Natgwd) -> int:
    """natgwd's fd count once the start-up GARP socket is closed."""
    wait_for(lambda: events_named(daemon, "gratuitous ARP sent"), "the start-up GARP sent", timeout=10)
    time.sleep(0.3)
    return fd_count(daemon.process.pid)


def test_http_survives_slow_and_malformed_clients(lab: Lab) -> None:
    """Prevents: slow or malformed clients on the metrics port costing unbounded threads
    or descriptors, hanging natgwd, or leaving it unable to answer afterwards."""
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    pid = daemon.process.pid
    fds, threads = settled_fds(daemon), thread_count(pid)
    print(f"http flood: baseline {threads} threads, {fds} fds")

    flood = slow_flood(lab, daemon, count=200, hold=14)
    print(
        f"http flood: 200 slow clients: {flood.slow}; /metrics meanwhile (status, s): {flood.probes_while_held}; "
        f"max {flood.max_threads} threads, {flood.max_fds} fds"
    )
    assert flood.slow["still_open_at_end"] == 0, "idle connections were not timed out"
    # One thread per connection being served, at most MAX_CONCURRENT_REQUESTS of them;
    # the others are closed at once.
    assert flood.max_threads <= threads + MAX_CONCURRENT_REQUESTS + 2

    results = json.loads(lab.exec("gw", sys.executable, "-c", MALFORMED, str(METRICS_PORT), "200", timeout=120).stdout)
    print(f"http flood: 200 malformed requests: {results}")
    assert sum(results.values()) == 200
    for outcome in results:
        kind, status = outcome.rsplit(" ", 1)
        if kind == "header-without-colon":
            continue  # http.server's header parser skips such a line and serves the GET
        # An error answer (4xx/5xx, with or without a status line), or the connection
        # closed (reset when natgwd closed it with the client's excess bytes unread);
        # never a hang, never a success.
        assert status in ("closed", "ConnectionResetError", "BrokenPipeError") or status[:1] in "45", outcome

    status, seconds = metrics_latency(lab)
    print(f"http flood: /metrics after the flood: {status} in {seconds * 1000:.0f} ms")
    assert status == 200  # answered (curl -m 10); how fast is a figure, not a verdict
    assert daemon.process.poll() is None
    assert thread_count(pid) < THREAD_BOUND
    after = wait_for(lambda: ((n := fd_count(pid)) <= fds and n) or None, f"fds back to {fds}", timeout=15)
    print(f"http flood: afterwards {thread_count(pid)} threads, {after} fds")
    assert readyz(daemon)[0] == 200


DRIP_FEED = r"""
import json, socket, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
attackers = []
for i in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"G")
        attackers.append(s)
    except OSError:
        pass
started, dripped, probes = time.monotonic(), 0.0, []
while time.monotonic() - started < seconds:
    if time.monotonic() - dripped >= 1:  # one more byte of an endless request line
        for s in list(attackers):
            try:
                s.sendall(b"E")
            except OSError:
                attackers.remove(s)
        dripped = time.monotonic()
    if time.monotonic() - started >= seconds / 2:  # long past any idle timeout
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=2)
            c.settimeout(2)
            c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            probes.append(c.recv(100).split(b"\r\n")[0].decode("latin-1") or "closed unanswered")
            c.close()
        except OSError as err:
            probes.append(type(err).__name__)
    time.sleep(0.3)
print(json.dumps({"attackers_still_connected": len(attackers), "probes": probes}))
"""


def test_probes_answer_during_a_drip_feed_attack(lab: Lab) -> None:
    """Prevents: a few slow connections to the (by default 0.0.0.0) metrics port taking
    down the liveness and readiness probes for as long as the attacker likes."""
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    count = MAX_CONCURRENT_REQUESTS + 36
    out = lab.exec("gw", sys.executable, "-c", DRIP_FEED, str(METRICS_PORT), str(count), "8", timeout=60).stdout
    result = json.loads(out)
    print(f"drip feed, {count} connections: {result}")
    assert daemon.process.poll() is None
    assert result["probes"]
    assert all(" 200 " in probe for probe in result["probes"]), result["probes"]


# --- f. load and soak ------------------------------------------------------------------------------

CHURN_SENTINEL = "10.60.251.251"
# Holding two 10,000-rule states and tables at once (an apply, a scrape, a full-table
# resync) takes natgwd from ~130 MB after the first apply to a plateau: ~235 MB within
# seconds, ~300 MB after one or two more high-water steps (within 30-90 s), then flat for
# the rest of a 14-minute run. A leak shows as growth over hundreds of applies: it is
# measured in the long soak from the end of its first quarter. In the short soak a
# high-water step alone can exceed the 50 MB growth bound, so it checks a ceiling.
WARM_UP_SHARE = 0.25
LEAK_BOUND_MB = 50
SOAK_RSS_CEILING_MB = 400


def soak_state() -> dict[str, Any]:
    """10,000 rules: the seed's three, 9,497 DNAT (one of them `churn`, whose target the
    soak keeps changing), 300 SNAT and 200 FIP."""
    state = many_rules(0, dnat=9496, snat=300, fip=200, dnat_eips=20, ranges=0)
    state["dnat"].append(
        {
            "name": "churn",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": 7000,
            "internalIp": CHURN_SENTINEL,
            "internalPort": 80,
        }
    )
    assert len(state["dnat"]) + len(state["snat"]) + len(state["fip"]) == 10_000
    return state


@dataclass
class Samples:
    rss: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    scrapes: list[tuple[int, float]] = field(default_factory=list)


def _soak(lab: Lab, seconds: float) -> None:
    lab.serve("vm1", tcp=[80])
    template = encode(soak_state())
    assert template.count(f'"{CHURN_SENTINEL}"'.encode()) == 1

    def target(n: int) -> str:
        return str(IPv4Address("10.60.128.0") + n % 10000 + 1)

    def version(n: int) -> bytes:
        return template.replace(f'"{CHURN_SENTINEL}"'.encode(), f'"{target(n)}"'.encode())

    daemon = lab.start_natgwd(version(0), "--resync-interval", "5")
    daemon.wait_applied(timeout=90)
    pid = daemon.process.pid
    daemon.write_state(version(1))
    daemon.wait_applied(sha256(version(1)), timeout=30)
    fds, rss_applied = settled_fds(daemon), rss_mb(pid)
    warm_up = max(5.0, seconds * WARM_UP_SHARE)
    rss_start: float | None = None  # after warm_up seconds of churn: the steady state
    applied_start = metric(daemon, 'natgwd_reconciles_total{result="applied"}') or 0

    out = lab.workdir / "soak-traffic.json"
    traffic = lab.spawn("ext", *client_command("soak", DNAT_EIP, 8888, seconds, out))
    writes = [1]
    stop = threading.Event()

    def writer() -> None:
        n = 1
        while not stop.is_set():
            n += 1
            daemon.write_state(version(n))
            writes[0] = n
            stop.wait(0.1)

    thread = threading.Thread(target=writer, daemon=True)
    samples = Samples()
    started = time.monotonic()
    thread.start()
    try:
        while traffic.poll() is None and time.monotonic() < started + seconds + 30:
            samples.rss.append(rss_mb(pid))
            if rss_start is None and time.monotonic() - started >= warm_up:
                rss_start = samples.rss[-1]
            samples.fds.append(fd_count(pid))
            samples.threads.append(thread_count(pid))
            samples.scrapes.append(metrics_latency(lab))
            assert daemon.process.poll() is None, daemon.log()[-2000:]
            time.sleep(max(0.0, 1 - (time.monotonic() - started) % 1))
    finally:
        stop.set()
        thread.join(5)
    assert rss_start is not None, "the soak ended before its warm-up"
    last = version(writes[0])
    daemon.wait_applied(sha256(last), timeout=30)
    traffic.wait(30)
    result = json.loads(out.read_text())
    applied = (metric(daemon, 'natgwd_reconciles_total{result="applied"}') or 0) - applied_start
    after = wait_for(lambda: ((n := fd_count(pid)) <= fds + 5 and n) or None, f"fds back near {fds}", timeout=15)
    rss_end = rss_mb(pid)
    samples.rss.append(rss_end)
    worst = max(s for _, s in samples.scrapes)
    print(
        f"soak {seconds:.0f}s, 10,000 rules: {writes[0] - 1} writes, {applied:.0f} applied; "
        f"RSS after the first apply {rss_applied:.1f}, after {warm_up:.0f}s of churn {rss_start:.1f} / "
        f"max {max(samples.rss):.1f} / end {rss_end:.1f} MB; "
        f"fds baseline {fds} / max {max(samples.fds)} / end {after}; threads max {max(samples.threads)}; "
        f"/metrics {len(samples.scrapes)} scrapes, worst {worst * 1000:.0f} ms; "
        f"traffic: {result['echo_ok']} echoes on one connection, {result['http_ok']} new HTTP connections"
    )
    churn = lab.exec("gw", "nft", "get", "element", "inet", "natgwd", "dnat_target", "{ 10.115.55.200 . tcp . 7000 }")
    assert f"{target(writes[0])} . 80" in churn.stdout, churn.stdout
    # The scrapes timed above were whole: every rule's counters, the echo's among them.
    counters = daemon.metrics()
    assert sum(name.startswith("natgwd_rule_connections_total{") for name in counters) == 10_000
    assert sum(name.startswith("natgwd_rule_packets_total{") for name in counters) == 20_000
    echo_and_http = 1 + result["http_ok"] + len(result["http_errors"])
    assert counters['natgwd_rule_connections_total{kind="dnat",name="dnat01",eip="10.115.55.200"}'] == echo_and_http
    assert not result["echo_errors"], result["echo_errors"]
    assert not result["http_errors"], result["http_errors"]
    assert result["echo_ok"] >= seconds * 5
    assert result["http_ok"] >= seconds - 3
    assert all(status == 200 for status, _ in samples.scrapes), samples.scrapes
    assert applied >= 2
    assert not errors_logged(daemon), errors_logged(daemon)[:3]
    assert not non_json_log_lines(daemon)
    assert max(samples.rss) < SOAK_RSS_CEILING_MB  # the end included
    if seconds >= 300:
        assert rss_end < rss_start + LEAK_BOUND_MB
    assert max(samples.threads) < THREAD_BOUND
    assert daemon.process.poll() is None


def test_soak_a_change_every_100ms_with_10000_rules(lab: Lab) -> None:
    """Prevents: constant changes to a large state leaking memory or descriptors, making
    /metrics unavailable, logging errors, or disturbing established and new connections
    through rules that do not change."""
    _soak(lab, 30)


@pytest.mark.slow
def test_soak_a_change_every_100ms_with_10000_rules_long(lab: Lab) -> None:
    """The same as above for 10 minutes."""
    _soak(lab, 600)
