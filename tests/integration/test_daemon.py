"""The daemon's behaviour in the seed topology: file watching, invalid input, drift repair,
restarts, readiness, signals, metrics, `natgwd status`, and leaving foreign state alone.

Every test builds its own lab (namespaces with unique names, removed afterwards) and runs
natgwd in the lab's gateway namespace; traffic never leaves the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab.topology import Lab, Natgwd
from tests.integration.helpers import (
    DNAT_EIP,
    FIP_EIP,
    UPSTREAM,
    UPSTREAM_PORT,
    assert_dnat_works,
    assert_fip_works,
    assert_snat_works,
    encode,
    events_named,
    fetch,
    gateway_routes,
    natgwd_table_exists,
    non_json_log_lines,
    pod_network,
    readyz,
    sha256,
    wait_for,
)

DNAT_KEY = "{ 10.115.55.200 . tcp . 8888 }"
NATGWD_PROTO = 249


# --- helpers ------------------------------------------------------------------------------


def inotify_watched_inodes(pid: int) -> set[int]:
    """The inodes a process watches with inotify, from /proc/PID/fdinfo."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                inodes |= {int(ino, 16) for ino in re.findall(r"^inotify wd:\S+ ino:([0-9a-f]+)", info, re.M)}
    return inodes


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def sample_name(name: str, labels: dict[str, str]) -> str:
    """A sample's key with its labels sorted, independent of the exposition's label order."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_exposition(body: str) -> tuple[dict[str, float], dict[str, str]]:
    """Samples ({sorted-label key: value}) and metric types ({family: type}) of a scrape."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, f"unparseable sample line {line!r}"
            name, labels, value = match.groups()
            samples[sample_name(name, dict(_LABEL.findall(labels or "")))] = float(value)
    return samples, types


def scrape(daemon: Natgwd) -> dict[str, float]:
    status, body = daemon.get("/metrics")
    assert status == 200, body
    return parse_exposition(body)[0]


def metric(daemon: Natgwd, name: str, **labels: str) -> float | None:
    return scrape(daemon).get(sample_name(name, labels))


def rule_counters(daemon: Natgwd) -> dict[str, float]:
    """Every per-rule counter sample of a scrape."""
    return {k: v for k, v in scrape(daemon).items() if k.startswith("natgwd_rule_")}


def nft_table(lab: Lab, family: str = "inet", name: str = "natgwd") -> str:
    """`nft -j list table` in the gateway: the exact bytes, handles and counters included."""
    return lab.exec("gw", "nft", "-j", "list", "table", family, name).stdout


def has_element(lab: Lab, set_name: str, key: str) -> bool:
    return lab.exec("gw", "nft", "get", "element", "inet", "natgwd", set_name, key, check=False).returncode == 0


def rule_counts(lab: Lab) -> dict[str, int]:
    """Rules per chain of natgwd's table."""
    counts: dict[str, int] = {}
    for obj in json.loads(nft_table(lab))["nftables"]:
        if "chain" in obj:
            counts.setdefault(obj["chain"]["name"], 0)
        elif "rule" in obj:
            counts[obj["rule"]["chain"]] = counts.get(obj["rule"]["chain"], 0) + 1
    return counts


def handles(lab: Lab) -> list[tuple[str, str, int]]:
    """(kind, name or chain, handle) of every set, map, chain and rule of natgwd's table."""
    found = []
    for obj in json.loads(nft_table(lab))["nftables"]:
        kind, body = next(iter(obj.items()))
        if kind in ("set", "map", "chain"):
            found.append((kind, body["name"], body["handle"]))
        elif kind == "rule":
            found.append((kind, body["chain"], body["handle"]))
    return found


def addresses(lab: Lab, ifname: str) -> dict[str, int | None]:
    """IPv4 addresses of an interface in the gateway, with their IFA_PROTO (None if unset)."""
    script = (
        "import json\n"
        "from pyroute2 import IPRoute\n"
        "with IPRoute() as ipr:\n"
        f"    idx = ipr.link_lookup(ifname={ifname!r})[0]\n"
        "    print(json.dumps({f\"{m.get('IFA_ADDRESS')}/{m['prefixlen']}\": m.get('IFA_PROTO')"
        " for m in ipr.get_addr(family=2, index=idx)}))\n"
    )
    return dict(json.loads(lab.exec("gw", sys.executable, "-c", script).stdout))


def assert_pid_is_natgwd(daemon: Natgwd) -> None:
    """`ip netns exec` execs the command: the Popen pid is natgwd's own, so signals reach it."""
    argv = Path(f"/proc/{daemon.process.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:4] == [b"-m", b"natgwd", b"run"], argv


def http_status(lab: Lab, daemon: Natgwd, method: str, path: str) -> int:
    url = f"http://127.0.0.1:{daemon.metrics_port}{path}"
    out = lab.exec("gw", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, url)
    return int(out.stdout)


@pytest.fixture
def served(lab: Lab) -> Lab:
    """The lab with servers: vm1 and vm2 on tcp/80, the upstream host on tcp/8080."""
    lab.serve("vm1", tcp=[80])
    lab.serve("vm2", tcp=[80])
    lab.serve("ext", tcp=[UPSTREAM_PORT])
    return lab


def with_second_dnat(state: dict[str, Any]) -> dict[str, Any]:
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
    return state


# --- 1. invalid input ---------------------------------------------------------------------


def test_invalid_file_changes_nothing(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: a rejected desired-state file touching the data plane (flushing or partly
    applying rules), or being rejected silently (no metric, no reason, no log)."""
    lab = served
    daemon = lab.start_natgwd(seed_state, "--resync-interval", "1")
    good = daemon.wait_applied()
    assert_dnat_works(lab)
    assert_snat_works(lab)
    before = nft_table(lab)  # traffic stopped: counters are still from here on
    invalid_before = metric(daemon, "natgwd_reconciles_total", result="invalid")
    assert invalid_before == 0
    assert metric(daemon, "natgwd_desired_state_valid") == 1

    # 1. A shape problem (an unknown field): the schema pass reports it with its path.
    bad = json.loads(json.dumps(seed_state))
    bad["dnat"].append({**bad["dnat"][0], "name": "dnat02", "eip": "nope", "externalPort": "9999", "bogus": True})
    daemon.write_state(bad)
    wait_for(lambda: metric(daemon, "natgwd_reconciles_total", result="invalid") == 1, "the file rejected", timeout=5)
    assert nft_table(lab) == before
    assert metric(daemon, "natgwd_desired_state_valid") == 0
    status, detail = readyz(daemon)
    assert status == 503
    assert "$.dnat[1].bogus" in detail["reason"]
    assert detail["applied_sha256"] == good["applied_sha256"]
    (rejected,) = events_named(daemon, "desired state rejected; keeping the last good state")
    assert rejected["level"] == "error"
    assert any(p.startswith("$.dnat[1].bogus: unknown field") for p in rejected["problems"]), rejected

    # 2. A semantic problem (a DNAT naming an unknown EIP), once the shape is right.
    del bad["dnat"][1]["bogus"]
    daemon.write_state(bad)
    wait_for(lambda: metric(daemon, "natgwd_reconciles_total", result="invalid") == 2, "the file rejected", timeout=5)
    assert nft_table(lab) == before
    status, detail = readyz(daemon)
    assert status == 503
    assert "$.dnat[1].eip" in detail["reason"]
    rejected = events_named(daemon, "desired state rejected; keeping the last good state")[-1]
    assert "$.dnat[1].eip: names EIP 'nope', which is not in eips" in rejected["problems"]
    assert not non_json_log_lines(daemon), non_json_log_lines(daemon)[:3]
    assert metric(daemon, "natgwd_desired_state_valid") == 0
    assert metric(daemon, "natgwd_reconciles_total", result="applied") == 1
    assert_dnat_works(lab)  # the last good state keeps working

    # The last good state is still defended against drift, and readiness stays 503.
    lab.exec("gw", "nft", "delete", "element", "inet", "natgwd", "dnat_target", DNAT_KEY)
    wait_for(
        lambda: has_element(lab, "dnat_target", DNAT_KEY), "the element restored while the file is invalid", timeout=5
    )
    assert readyz(daemon)[0] == 503
    assert_dnat_works(lab)

    # 3. A valid file again.
    fixed = with_second_dnat(json.loads(json.dumps(seed_state)))
    daemon.write_state(fixed)
    daemon.wait_applied(sha256(encode(fixed)), timeout=5)
    assert metric(daemon, "natgwd_desired_state_valid") == 1
    assert metric(daemon, "natgwd_reconciles_total", result="applied") == 2
    assert has_element(lab, "dnat_target", "{ 10.115.55.200 . tcp . 9999 }")
    assert_dnat_works(lab)
    assert daemon.process.poll() is None


def test_starts_without_a_state_file(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: natgwd exiting (a crash loop) or installing an empty table when the
    state file does not exist yet, e.g. a ConfigMap mounted after the container started."""
    daemon = lab.start_natgwd(None)
    assert not daemon.state_path.exists()

    def missing_file_reported() -> bool:
        status, body = daemon.get("/readyz")
        return status == 503 and "file does not exist" in body

    wait_for(missing_file_reported, "readyz naming the missing file", timeout=10)
    # The file's directory is watched, so that the file is read as soon as it appears.
    assert daemon.state_path.parent.stat().st_ino in inotify_watched_inodes(daemon.process.pid)
    assert daemon.get("/healthz") == (200, "ok\n")
    assert metric(daemon, "natgwd_desired_state_valid") == 0
    assert not natgwd_table_exists(lab)
    assert daemon.process.poll() is None
    daemon.write_state(seed_state)
    daemon.wait_applied(sha256(encode(seed_state)), timeout=5)
    assert metric(daemon, "natgwd_desired_state_valid") == 1
    assert natgwd_table_exists(lab)


def test_invalid_file_while_retrying_is_rejected_once(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: a hot loop that re-reads and rejects the same invalid file five times a
    second, writing an error line each time and inflating reconciles_total{result="invalid"}."""
    seed_state["external"]["interface"] = "net9"  # incomplete: natgwd retries with backoff
    daemon = lab.start_natgwd(seed_state)
    wait_for(lambda: "interface net9 does not exist" in daemon.get("/readyz")[1], "readyz naming net9", timeout=10)
    seed_state["bogus"] = True
    daemon.write_state(seed_state)
    wait_for(
        lambda: (metric(daemon, "natgwd_reconciles_total", result="invalid") or 0) >= 1, "the file rejected", timeout=5
    )
    time.sleep(2)  # ten poll cycles; the file does not change
    assert metric(daemon, "natgwd_reconciles_total", result="invalid") == 1
    assert len(events_named(daemon, "desired state rejected; keeping the last good state")) == 1
    assert not non_json_log_lines(daemon), non_json_log_lines(daemon)[:3]


def test_half_written_file_is_rejected_then_applied(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: a writer caught mid-write (no atomic rename) crashing natgwd, or a
    truncated document being applied as if it were the whole state (deleting rules)."""
    lab = served
    daemon = lab.start_natgwd(seed_state)
    daemon.wait_applied()
    before = nft_table(lab)
    new = encode(with_second_dnat(json.loads(json.dumps(seed_state))))
    half = len(new) // 2
    with daemon.state_path.open("wb") as file:  # truncates in place: no rename
        file.write(new[:half])
        file.flush()
        os.fsync(file.fileno())

        def half_rejected() -> bool:
            status, detail = readyz(daemon)
            return status == 503 and "not valid JSON" in detail.get("reason", "")

        wait_for(half_rejected, "the half-written file rejected", timeout=5)
        assert daemon.process.poll() is None
        assert metric(daemon, "natgwd_desired_state_valid") == 0
        assert (metric(daemon, "natgwd_reconciles_total", result="invalid") or 0) >= 1
        assert nft_table(lab) == before
        assert_dnat_works(lab)
        file.write(new[half:])
    daemon.wait_applied(sha256(new), timeout=5)
    assert metric(daemon, "natgwd_desired_state_valid") == 1
    assert has_element(lab, "dnat_target", "{ 10.115.55.200 . tcp . 9999 }")
    assert_dnat_works(lab)
    assert daemon.process.poll() is None


# --- 3. file watching ---------------------------------------------------------------------


def _timed_apply(daemon: Natgwd, data: bytes, write: Callable[[], None], how: str) -> None:
    started = time.monotonic()
    write()
    daemon.wait_applied(sha256(data), timeout=5)
    print(f"{how}: applied {time.monotonic() - started:.3f}s after the write")


def test_file_watch_in_place_write_and_rename(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: a change to the state file going unnoticed when written in place (same
    inode) or renamed over (new inode), which left the old state applied."""
    daemon = lab.start_natgwd(seed_state)
    daemon.wait_applied()

    in_place = encode(with_second_dnat(json.loads(json.dumps(seed_state))))
    _timed_apply(daemon, in_place, lambda: daemon.state_path.write_bytes(in_place), "in-place write")
    assert has_element(lab, "dnat_target", "{ 10.115.55.200 . tcp . 9999 }")

    # A touch is noticed, but the same bytes are not applied again.
    applied = metric(daemon, "natgwd_reconciles_total", result="applied")
    unchanged = metric(daemon, "natgwd_reconciles_total", result="unchanged") or 0
    os.utime(daemon.state_path)
    wait_for(
        lambda: metric(daemon, "natgwd_reconciles_total", result="unchanged") == unchanged + 1,
        "the touch seen",
        timeout=5,
    )
    assert metric(daemon, "natgwd_reconciles_total", result="applied") == applied

    renamed = json.loads(json.dumps(seed_state))
    renamed["dnat"][0]["externalPort"] = "8889"
    _timed_apply(daemon, encode(renamed), lambda: daemon.write_state(renamed), "rename over")
    assert has_element(lab, "dnat_target", "{ 10.115.55.200 . tcp . 8889 }")
    assert not has_element(lab, "dnat_target", "{ 10.115.55.200 . tcp . 9999 }")
    assert not has_element(lab, "dnat_target", DNAT_KEY)


def _configmap_version(volume: Path, version: str, data: bytes) -> None:
    """What the kubelet does: a new timestamped dir, an atomic swap of `..data`, then the
    old dir removed."""
    data_link = volume / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    (volume / version).mkdir()
    (volume / version / "state.json").write_bytes(data)
    temporary = volume / "..data_tmp"
    temporary.symlink_to(version)
    os.replace(temporary, data_link)
    if old is not None:
        shutil.rmtree(volume / old)


def test_file_watch_configmap_volume(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: missing a Kubernetes ConfigMap update, which swaps the `..data` symlink
    and leaves the state.json symlink itself untouched."""
    volume = lab.workdir / "configmap"
    volume.mkdir()
    _configmap_version(volume, "..2026_x", encode(seed_state))
    (volume / "state.json").symlink_to("..data/state.json")
    daemon = lab.start_natgwd(None, state_path=volume / "state.json")
    daemon.wait_applied(sha256(encode(seed_state)))

    for version, port in (("..2026_y", "8889"), ("..2026_z", "8890")):
        state = json.loads(json.dumps(seed_state))
        state["dnat"][0]["externalPort"] = port
        data = encode(state)
        _timed_apply(daemon, data, lambda v=version, d=data: _configmap_version(volume, v, d), f"configmap {version}")
        assert has_element(lab, "dnat_target", f"{{ 10.115.55.200 . tcp . {port} }}")
    assert (volume / "state.json").is_symlink()
    assert sorted(p.name for p in volume.iterdir()) == ["..2026_z", "..data", "state.json"]


# --- 4. drift -----------------------------------------------------------------------------


def test_drift_is_repaired(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: changes made behind natgwd's back (a flushed or deleted table, a deleted
    element, address or route, forwarding turned off) staying in place, counters going
    backwards after a repair, and a repair touching other tables or addresses."""
    lab = served
    daemon = lab.start_natgwd(seed_state, "--resync-interval", "1")
    daemon.wait_applied()
    lab.exec("gw", "nft", "add", "table", "ip", "other")
    lab.exec("gw", "nft", "add", "chain", "ip", "other", "c")
    lab.exec("gw", "ip", "addr", "add", "192.0.2.10/24", "dev", "net2")
    other = nft_table(lab, "ip", "other")
    wanted_rules = rule_counts(lab)
    assert set(wanted_rules) == {
        *("prerouting", "postrouting", "account", "forward", "untracked_in", "untracked_out"),
        *(f"account_{index}" for index in range(16)),  # a chain per counting shard
    }
    assert all(wanted_rules.values()), wanted_rules

    def repairs(resource: str) -> float:
        return metric(daemon, "natgwd_drift_repairs_total", resource=resource) or 0.0

    def repaired(resource: str, before: float) -> Callable[[], bool]:
        return lambda: repairs(resource) > before

    # Rules flushed.
    nft_before = repairs("nftables")
    lab.exec("gw", "nft", "flush", "table", "inet", "natgwd")
    wait_for(lambda: rule_counts(lab) == wanted_rules, "the flushed rules restored", timeout=5)
    wait_for(repaired("nftables", nft_before), "the nftables repair counted", timeout=5)
    assert_dnat_works(lab)

    # One element deleted.
    nft_before = repairs("nftables")
    lab.exec("gw", "nft", "delete", "element", "inet", "natgwd", "dnat_target", DNAT_KEY)
    wait_for(lambda: has_element(lab, "dnat_target", DNAT_KEY), "the deleted element restored", timeout=5)
    wait_for(repaired("nftables", nft_before), "the nftables repair counted", timeout=5)
    assert_dnat_works(lab)
    assert_snat_works(lab)

    # The whole table deleted: counters are seeded back, never reset.
    counters = rule_counters(daemon)
    assert counters[sample_name("natgwd_rule_connections_total", {"kind": "dnat", "name": "dnat01", "eip": DNAT_EIP})]
    nft_before = repairs("nftables")
    lab.exec("gw", "nft", "delete", "table", "inet", "natgwd")
    wait_for(
        lambda: natgwd_table_exists(lab) and rule_counts(lab) == wanted_rules, "the deleted table restored", timeout=5
    )
    wait_for(repaired("nftables", nft_before), "the nftables repair counted", timeout=5)
    after = rule_counters(daemon)
    assert after.keys() == counters.keys()
    went_back = {k: (v, after[k]) for k, v in counters.items() if after[k] < v}
    assert not went_back, f"counters went backwards: {went_back}"
    assert_dnat_works(lab)
    assert_snat_works(lab)

    # An EIP address deleted.
    links_before = repairs("addresses_routes")
    lab.exec("gw", "ip", "addr", "del", f"{DNAT_EIP}/21", "dev", "net2")
    wait_for(
        lambda: addresses(lab, "net2").get(f"{DNAT_EIP}/21") == NATGWD_PROTO, "the EIP address restored", timeout=5
    )
    wait_for(repaired("addresses_routes", links_before), "the address repair counted", timeout=5)
    assert_dnat_works(lab)

    # The default route deleted.
    links_before = repairs("addresses_routes")
    lab.exec("gw", "ip", "route", "del", "default")
    wait_for(
        lambda: gateway_routes(lab).get("default", {}).get("gateway") == UPSTREAM,
        "the default route restored",
        timeout=5,
    )
    wait_for(repaired("addresses_routes", links_before), "the route repair counted", timeout=5)
    assert gateway_routes(lab)["default"]["protocol"] == str(NATGWD_PROTO)
    assert_snat_works(lab)

    # Forwarding turned off.
    forwarding_before = repairs("forwarding")
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")
    wait_for(
        lambda: lab.exec("gw", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1", "forwarding on", timeout=5
    )
    wait_for(repaired("forwarding", forwarding_before), "the forwarding repair counted", timeout=5)
    assert_snat_works(lab)

    # Someone else's table and address survived all of these resyncs.
    assert nft_table(lab, "ip", "other") == other
    assert addresses(lab, "net2").get("192.0.2.10/24", "missing") is None
    assert daemon.process.poll() is None


# --- 5. restart ---------------------------------------------------------------------------


def _applied_events(daemon: Natgwd) -> list[dict[str, Any]]:
    return events_named(daemon, "desired state applied")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_adopts_without_a_blip(served: Lab, seed_state: dict[str, Any], sig: signal.Signals) -> None:
    """Prevents: a stopped or killed natgwd taking NAT down with it, and a restarted one
    re-creating the table (a traffic blip, counters reset to zero, new handles)."""
    lab = served
    first = lab.start_natgwd(seed_state)
    first.wait_applied()
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)
    assert_pid_is_natgwd(first)

    code = first.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    # Down: the table stays and keeps translating.
    assert natgwd_table_exists(lab)
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)
    table_handles = handles(lab)
    down_table = nft_table(lab)

    second = lab.start_natgwd(seed_state)
    second.wait_applied()
    (adopted,) = events_named(second, "adopted nftables table")
    assert adopted["found"] is True
    assert adopted["rules"] == 3
    (applied,) = _applied_events(second)
    assert applied["nft_operations"] == 0, applied
    assert applied["changed_elements"] == 0, applied
    assert applied["link_changes"] == 0, applied
    assert not events_named(second, "nftables transaction applied")
    assert not non_json_log_lines(second), non_json_log_lines(second)[:3]
    assert handles(lab) == table_handles
    assert nft_table(lab) == down_table  # counters included: nothing reset, no traffic since
    counters = rule_counters(second)
    for kind, name, eip in (("dnat", "dnat01", DNAT_EIP), ("snat", "my-snat", DNAT_EIP), ("fip", "fip01", FIP_EIP)):
        # Two connections each: one while natgwd ran, one while it was down.
        key = sample_name("natgwd_rule_connections_total", {"kind": kind, "name": name, "eip": eip})
        assert counters[key] == 2, (key, counters)
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)
    assert second.stop() == 0


def test_a_second_natgwd_in_the_namespace_refuses_to_start_naming_the_first(
    lab: Lab, seed_state: dict[str, Any]
) -> None:
    """Prevents: a second natgwd on another state file replacing the first's table and
    deleting its EIPs, and the first "repairing" that back, for ever (issue 21, item 3)."""
    first = lab.start_natgwd(seed_state, "--resync-interval", "1")
    first.wait_applied()
    table, owned = nft_table(lab), lab.exec("gw", "ip", "-j", "address").stdout
    other = lab.workdir / "other.json"
    other.write_text(json.dumps({**seed_state, "dnat": [], "fip": []}))
    second = lab.exec(
        "gw",
        sys.executable,
        "-m",
        "natgwd",
        "run",
        "--state",
        str(other),
        "--metrics-address",
        "127.0.0.1:9470",
        "--applied-state",
        "",
        check=False,
    )
    assert second.returncode == 12
    lines = [line for line in second.stderr.splitlines() if not line.startswith("{")]
    assert lines == [
        f"natgwd: another natgwd runs in this network namespace "
        f"(pid {first.process.pid}, --state {first.state_path}, metrics on 127.0.0.1:{first.metrics_port})"
    ]
    assert nft_table(lab) == table
    assert lab.exec("gw", "ip", "-j", "address").stdout == owned
    assert readyz(first)[0] == 200
    assert not events_named(first, "drift repaired")
    assert first.stop() == 0


# --- 6. health and readiness --------------------------------------------------------------


def test_readiness_waits_for_a_missing_interface(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: reporting ready while a declared interface is missing (or failing
    /healthz then), holding the nftables table back until it appears, and needing a
    restart once it does."""
    lab = served
    seed_state["external"]["interface"] = "net9"
    daemon = lab.start_natgwd(seed_state)

    def not_ready_for_net9() -> bool:
        status, body = daemon.get("/readyz")
        return status == 503 and "interface net9 does not exist" in body

    wait_for(not_ready_for_net9, "readyz naming net9", timeout=10)
    assert daemon.get("/healthz") == (200, "ok\n")
    assert natgwd_table_exists(lab), "the nft table waits for nothing"
    assert 'oifname "net9"' in lab.exec("gw", "nft", "list", "table", "inet", "natgwd").stdout
    assert metric(daemon, "natgwd_interfaces_missing") == 1

    lab.exec("gw", "ip", "link", "set", "net2", "name", "net9")
    daemon.wait_ready(timeout=15)
    assert daemon.get("/healthz") == (200, "ok\n")
    assert metric(daemon, "natgwd_interfaces_missing") == 0
    assert addresses(lab, "net9") == {
        "10.115.48.1/21": NATGWD_PROTO,
        f"{DNAT_EIP}/21": NATGWD_PROTO,
        f"{FIP_EIP}/21": NATGWD_PROTO,
    }
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert daemon.process.poll() is None


def test_http_endpoints(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: unknown paths answering anything but 404 (so a typo in a probe's path
    looks healthy), and methods other than GET being accepted on the served paths."""
    daemon = lab.start_natgwd(seed_state)
    daemon.wait_ready()
    assert daemon.get("/healthz") == (200, "ok\n")
    status, detail = readyz(daemon)
    assert status == 200
    assert detail["ready"] is True
    assert detail["applied_sha256"] == sha256(encode(seed_state))
    assert "reason" not in detail
    for path in ("/nope", "/metricsx", "/healthz/x", "/readyz/", "/../etc/passwd"):
        assert http_status(lab, daemon, "GET", path) == 404, path
    for method in ("POST", "PUT", "DELETE"):
        for path in ("/metrics", "/healthz", "/readyz"):
            assert http_status(lab, daemon, method, path) == 405, (method, path)
    assert daemon.get("/readyz")[0] == 200


# --- 7. metrics ---------------------------------------------------------------------------


def test_metrics_exposition(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: metrics that are missing, misnamed (no natgwd_ prefix, counters without
    _total, durations not in seconds) or wrong (rule counts, validity, last success)."""
    state = with_second_dnat(seed_state)
    daemon = lab.start_natgwd(state)
    daemon.wait_applied()
    status, body = daemon.get("/metrics")
    assert status == 200
    samples, types = parse_exposition(body)

    for family, kind in types.items():
        assert re.fullmatch(r"natgwd_[a-z][a-z0-9_]*[a-z0-9]", family), family
        assert (kind == "counter") == family.endswith("_total"), f"{family} is a {kind}"
    for name in samples:
        assert re.fullmatch(r"natgwd_[a-z][a-z0-9_]*[a-z0-9]", name.split("{")[0]), name
    assert types["natgwd_reconciles_total"] == "counter"
    assert types["natgwd_drift_repairs_total"] == "counter"
    assert types["natgwd_rule_connections_total"] == "counter"
    assert types["natgwd_rule_packets_total"] == "counter"
    assert types["natgwd_rule_bytes_total"] == "counter"
    assert types["natgwd_reconcile_duration_seconds"] == "histogram"
    assert types["natgwd_desired_state_valid"] == "gauge"
    assert types["natgwd_last_successful_reconcile_timestamp_seconds"] == "gauge"
    assert types["natgwd_rules"] == "gauge"

    assert samples[sample_name("natgwd_reconciles_total", {"result": "applied"})] == 1
    assert samples[sample_name("natgwd_reconciles_total", {"result": "invalid"})] == 0
    assert samples[sample_name("natgwd_reconciles_total", {"result": "error"})] == 0
    count = samples["natgwd_reconcile_duration_seconds_count"]
    assert count >= 1
    assert samples[sample_name("natgwd_reconcile_duration_seconds_bucket", {"le": "+Inf"})] == count
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v)
        for k, v in samples.items()
        if k.startswith("natgwd_reconcile_duration_seconds_bucket")
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets must be cumulative"
    assert samples[sample_name("natgwd_rules", {"kind": "dnat"})] == len(state["dnat"]) == 2
    assert samples[sample_name("natgwd_rules", {"kind": "snat"})] == 1
    assert samples[sample_name("natgwd_rules", {"kind": "fip"})] == 1
    assert samples["natgwd_desired_state_valid"] == 1
    last = samples["natgwd_last_successful_reconcile_timestamp_seconds"]
    assert 0 < last <= time.time() + 1
    assert time.time() - last < 60
    for resource in ("nftables", "addresses_routes", "forwarding"):
        assert samples[sample_name("natgwd_drift_repairs_total", {"resource": resource})] == 0
    assert samples[sample_name("natgwd_interfaces_missing", {})] == 0
    in_kernel = 0
    for obj in json.loads(nft_table(lab))["nftables"]:
        body = obj.get("set") or obj.get("map")
        if body:
            in_kernel += len(body.get("elem", []))
    assert in_kernel > 0
    assert samples["natgwd_nftables_elements"] == in_kernel
    for kind, name, eip in (
        ("snat", "my-snat", DNAT_EIP),
        ("dnat", "dnat01", DNAT_EIP),
        ("dnat", "dnat02", DNAT_EIP),
        ("fip", "fip01", FIP_EIP),
    ):
        labels = {"kind": kind, "name": name, "eip": eip}
        assert samples[sample_name("natgwd_rule_connections_total", labels)] == 0
        for direction in ("original", "reply"):
            assert samples[sample_name("natgwd_rule_packets_total", {**labels, "direction": direction})] == 0
            assert samples[sample_name("natgwd_rule_bytes_total", {**labels, "direction": direction})] == 0


def _connects(lab: Lab, role: str, address: str, port: int) -> bool:
    """Whether a TCP connection from `role` to address:port is accepted; a refusal (the
    address answers, nothing listens) is False, anything else (no route, a timeout: the
    check would prove nothing) fails the test."""
    url = f"http://{address}:{port}/healthz"
    done = lab.exec(role, "curl", "-s", "-o", "/dev/null", "-m", "3", url, check=False)
    assert done.returncode in (0, 7), f"{role} -> {address}:{port}: curl exit {done.returncode}, not a clear answer"
    return done.returncode == 0


def _start_serving(lab: Lab, state: dict[str, Any] | None, *args: str) -> Natgwd:
    """natgwd as the image's entrypoint and the drop-in start it: no --metrics-address
    unless given, and no NATGWD_METRICS_ADDRESS in its environment; no state file yet
    with `state` None (the drop-in's until the controller's `init`)."""
    path = lab.workdir / "state.json"
    log_path = lab.workdir / f"natgwd-serving-{len(args)}.log"
    daemon = Natgwd(lab, path, None, log_path, 9469)  # type: ignore[arg-type]
    if state is not None:
        daemon.write_state(state)
    command = [sys.executable, "-m", "natgwd", "run", "--state", str(path), "--applied-state", "", *args]
    env = {k: v for k, v in os.environ.items() if k != "NATGWD_METRICS_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    daemon.process = lab.spawn("gw", *command, log_path=log_path, env=env)
    return daemon


def _listening(lab: Lab) -> set[str]:
    """The gateway's sockets listening on port 9469, as address[%device]:port."""
    words = lab.exec("gw", "ss", "-Hltn", "sport", "= :9469").stdout.split()
    return {word for word in words if word.endswith(":9469")}


def _untracked(lab: Lab) -> str:
    return lab.exec("gw", "nft", "list", "chain", "inet", "natgwd", "untracked_in", check=False).stdout


def test_metrics_never_listen_on_an_eip_or_an_external_network(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: /metrics, /healthz and /readyz (every rule name and counter) answering on
    the EIPs and the external network when natgwd is started without --metrics-address, as
    the image and the Kube-OVN drop-in start it (issue 21, item 1), or answering nowhere
    Prometheus scrapes (loopback alone): by default natgwd serves loopback and the pod's own
    address (eth0), only once a state says eth0 is neither external nor an EIP's, closed
    again when a change makes it so, and only to connections arriving on eth0 (the gateway
    forwards: a host on the external or the VPC side could route to the pod address through
    it). And the manifests' address (the pod's own) answers nowhere else."""
    gateway = pod_network(lab)
    # An address on eth0 inside the external network (10.115.48.0/21): never served.
    in_external = "10.115.48.7"
    lab.exec("gw", "ip", "addr", "add", f"{in_external}/32", "dev", "eth0")
    lab.exec("pod", "ip", "route", "add", in_external, "via", gateway)
    # The external side and the VMs route to the pod network through the gateway.
    external = seed_state["external"]["addresses"][0].split("/")[0]
    lab.exec("ext", "ip", "route", "add", f"{gateway}/32", "via", external)
    eips = [eip["v4ip"] for eip in seed_state["eips"]]
    internal = seed_state["internal"]["addresses"][0].split("/")[0]
    closed = [
        *(("ext", eip) for eip in eips),
        ("ext", external),
        ("ext", in_external),
        ("ext", gateway),
        ("vm1", internal),
        ("vm1", eips[0]),
        ("vm1", gateway),
        ("pod", in_external),
    ]

    def serving_only(*addresses: str) -> None:
        assert _listening(lab) == {f"{a}%eth0:9469" if a == gateway else f"{a}:9469" for a in addresses}
        for address in addresses:
            assert _connects(lab, "pod" if address == gateway else "gw", address, 9469)
        for role, address in [*closed, *([] if gateway in addresses else [("pod", gateway)])]:
            assert not _connects(lab, role, address, 9469), f"/metrics answers {role} on {address}"

    # As the drop-in starts it: no flags but the edit endpoint's, no state until `init`.
    token = lab.workdir / "edit.token"
    daemon = _start_serving(lab, None, "--edit-port", "0", "--edit-token", str(token))
    wait_for(lambda: _connects(lab, "gw", "127.0.0.1", 9469), "natgwd serving on loopback")
    # Which interfaces are external is not known yet (and the EIPs are not there yet).
    assert _listening(lab) == {"127.0.0.1:9469"}
    assert not _connects(lab, "pod", gateway, 9469)
    daemon.write_state(seed_state)
    daemon.wait_applied()
    wait_for(lambda: f"ip daddr {gateway} tcp dport 9469 notrack" in _untracked(lab), "the pod address untracked")
    serving_only("127.0.0.1", gateway)
    status = lab.exec("pod", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{gateway}:9469/metrics")
    assert status.stdout == "200"
    lab.exec("gw", "conntrack", "-F", check=False)
    assert _connects(lab, "pod", gateway, 9469)
    tracked = lab.exec("gw", "conntrack", "-L", "-p", "tcp", "--dport", "9469", check=False)
    assert gateway not in tracked.stdout, tracked.stdout

    # A change that makes the pod address an EIP, then one that makes eth0 the external
    # interface: the pod address is closed (and tracked again) before either is applied.
    served = {"127.0.0.1:9469", f"{gateway}%eth0:9469"}
    with_eip = json.loads(json.dumps(seed_state))
    with_eip["eips"].append({"name": "pod", "v4ip": gateway})
    moved = json.loads(json.dumps(seed_state))
    moved["external"]["interface"] = "eth0"
    for changed in (with_eip, moved):
        daemon.write_state(changed)
        daemon.wait_applied()
        assert _listening(lab) == {"127.0.0.1:9469"}
        assert gateway not in _untracked(lab)
        assert _connects(lab, "gw", "127.0.0.1", 9469)
        daemon.write_state(seed_state)
        daemon.wait_applied()
        if changed is with_eip:
            wait_for(lambda: _listening(lab) == served, "the pod address served again")
    # natgwd left the external addresses it put on eth0 there (it removes its addresses
    # from the interfaces of the state only): while eth0 holds an EIP, it stays closed.
    left = [
        a for a in (external, *eips) if f" {a}/" in lab.exec("gw", "ip", "-o", "addr", "show", "dev", "eth0").stdout
    ]
    if left:
        assert _listening(lab) == {"127.0.0.1:9469"}
        for address in left:
            lab.exec("gw", "ip", "addr", "del", f"{address}/21", "dev", "eth0")
        os.kill(daemon.process.pid, signal.SIGHUP)  # a resync: eth0 is read again
    wait_for(lambda: _listening(lab) == served, "the pod address served again")
    serving_only("127.0.0.1", gateway)
    assert daemon.stop() == 0

    # As the manifests start it: on the pod's address, where Prometheus scrapes.
    daemon = _start_serving(lab, seed_state, "--metrics-address", f"{gateway}:9469")
    wait_for(lambda: _connects(lab, "pod", gateway, 9469), "natgwd serving on the pod network")
    status = lab.exec("pod", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{gateway}:9469/metrics")
    assert status.stdout == "200"
    assert _listening(lab) == {f"{gateway}:9469"}
    for role, address in closed:
        if address != gateway:  # an explicit address takes what reaches it, through any interface
            assert not _connects(lab, role, address, 9469), f"/metrics answers {role} on {address}"
    assert daemon.stop() == 0


# Fills the namespace's conntrack table to nf_conntrack_max (a global limit, counted per
# namespace): assured UDP entries, which early drop does not evict, created over ctnetlink
# in batches (no acks: an error still comes back). The entries go with the namespace.
CONNTRACK_FILL = r"""
import socket, struct
NESTED = 0x8000
def attr(kind, payload):
    data = struct.pack("HH", 4 + len(payload), kind) + payload
    return data + bytes(-len(data) % 4)
def tuple_(src, dst, sport, dport):
    ports = attr(1, bytes([17])) + attr(2, struct.pack("!H", sport)) + attr(3, struct.pack("!H", dport))
    return attr(1 | NESTED, attr(1, src) + attr(2, dst)) + attr(2 | NESTED, ports)
def message(n):
    src, dst = socket.inet_aton("10.250.0.1"), struct.pack("!I", (10 << 24 | 251 << 16) + n // 60000)
    sport = 1024 + n % 60000
    body = struct.pack("BBH", socket.AF_INET, 0, 0)
    body += attr(1 | NESTED, tuple_(src, dst, sport, 9)) + attr(2 | NESTED, tuple_(dst, src, 9, sport))
    status = 0x2 | 0x4 | 0x8  # seen reply, assured, confirmed (creating one without it is refused)
    body += attr(3, struct.pack("!I", status)) + attr(7, struct.pack("!I", 3600))
    flags = 0x1 | 0x400 | 0x200  # request, create, excl
    return struct.pack("IHHII", 16 + len(body), 1 << 8, flags, n, 0) + body
limit = int(open("/proc/sys/net/netfilter/nf_conntrack_max").read())
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
for start in range(0, limit + 1024, 512):
    sock.sendall(b"".join(message(n) for n in range(start, start + 512)))
print(open("/proc/sys/net/netfilter/nf_conntrack_count").read().strip(), limit)
"""


def test_natgwd_answers_with_the_conntrack_table_full(lab: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: /healthz, /readyz and /metrics going silent, and nat-gateway.sh calls
    failing, when the gateway's conntrack table is full, as natgwd's own connections
    waited for a conntrack entry (issue 21, item 5): exactly when the pressure alert
    matters its data was gone, and a liveness probe would restart the gateway. natgwd's
    own traffic is untracked now (here /metrics on the pod's address and the edit endpoint
    on loopback); NAT traffic still is (a new connection through DNAT finds no room)."""
    limit = int(lab.exec("gw", "cat", "/proc/sys/net/netfilter/nf_conntrack_max").stdout)
    if limit > 4_000_000:
        pytest.skip(f"nf_conntrack_max is {limit}: filling the table would take too long")
    gateway = pod_network(lab)
    token = lab.workdir / "edit.token"
    lab.serve("vm1", tcp=[80])
    args = ("--metrics-address", f"{gateway}:9469", "--edit-port", "0", "--edit-token", str(token))
    daemon = _start_serving(lab, seed_state, *args)
    wait_for(lambda: _connects(lab, "pod", gateway, 9469), "natgwd serving on the pod network")
    assert fetch(lab, "ext", DNAT_EIP, 8888)

    def full() -> bool:
        """Fill (again: an entry may have gone meanwhile) and check that a new NAT connection
        finds the table full."""
        count, _ = lab.exec("gw", sys.executable, "-c", CONNTRACK_FILL, timeout=120).stdout.split()
        blocked = lab.exec("ext", "curl", "-s", "-m", "2", f"http://{DNAT_EIP}:8888/", check=False)
        return int(count) == limit and blocked.returncode == 28

    wait_for(full, "the conntrack table full", timeout=60)

    for path in ("/healthz", "/readyz", "/metrics"):  # as the kubelet and Prometheus ask
        url = f"http://{gateway}:9469{path}"
        status = lab.exec("pod", "curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url, check=False)
        assert status.stdout == "200", f"{path}: {status.stdout} (curl exit {status.returncode})"
    shim = Path(__file__).resolve().parents[2] / "image" / "nat-gateway.sh"
    environment = [f"NATGWD_EDIT_TOKEN={token}", "NATGWD_SHIM_TIMEOUT=10", "NATGWD_PYTHON=/nonexistent"]
    call = lab.exec("gw", "env", *environment, "bash", str(shim), "dnat-add", f"{DNAT_EIP},9999,tcp,172.20.10.2,80")
    assert call.returncode == 0 and call.stdout.endswith("natgwd: applied\n"), call.stderr
    assert "9999" in lab.exec("gw", "nft", "list", "map", "inet", "natgwd", "dnat_target").stdout
    assert int(lab.exec("gw", "cat", "/proc/sys/net/netfilter/nf_conntrack_count").stdout) == limit
    assert daemon.stop() == 0


# --- 8. SIGHUP ----------------------------------------------------------------------------


def test_sighup_rereads_and_resyncs(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: SIGHUP being ignored (or killing the daemon) so that drift waits for the
    next resync, however long the interval."""
    lab = served
    daemon = lab.start_natgwd(seed_state, "--resync-interval", "3600")
    daemon.wait_applied()
    assert_pid_is_natgwd(daemon)

    lab.exec("gw", "nft", "delete", "element", "inet", "natgwd", "dnat_target", DNAT_KEY)
    time.sleep(0.5)  # a few poll cycles: nothing restores it before the signal
    assert not has_element(lab, "dnat_target", DNAT_KEY)
    assert fetch(lab, "ext", DNAT_EIP, 8888) == ""
    applied_before = metric(daemon, "natgwd_reconciles_total", result="applied")

    os.kill(daemon.process.pid, signal.SIGHUP)
    wait_for(lambda: has_element(lab, "dnat_target", DNAT_KEY), "the element restored after SIGHUP", timeout=5)
    assert daemon.process.poll() is None
    assert events_named(daemon, "SIGHUP: re-reading the desired state and resyncing")
    assert not non_json_log_lines(daemon), non_json_log_lines(daemon)[:3]
    # Re-read: the file is applied again (forced), and the element counted as a repair.
    wait_for(
        lambda: metric(daemon, "natgwd_reconciles_total", result="applied") == (applied_before or 0) + 1,
        "the re-read file applied",
        timeout=5,
    )
    # The forced apply or the resync after it restores the element: counted once, by
    # whichever of them runs into it first (the resync may still be going here).
    wait_for(
        lambda: metric(daemon, "natgwd_drift_repairs_total", resource="nftables") == 1, "the repair counted", timeout=5
    )
    assert_dnat_works(lab)
    assert readyz(daemon)[0] == 200
    assert metric(daemon, "natgwd_drift_repairs_total", resource="nftables") == 1


# --- 9. natgwd status ---------------------------------------------------------------------


def test_status_lists_rules_with_counters(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: `natgwd status` showing wrong translations, or counters that disagree
    with /metrics (two readings of the same kernel counters)."""
    lab = served
    daemon = lab.start_natgwd(seed_state)
    daemon.wait_applied()
    assert_dnat_works(lab)
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)

    status = [sys.executable, "-m", "natgwd", "status", "--applied-state", str(lab.applied_state_path)]
    text = lab.exec("gw", *status).stdout
    applied_line, *lines = text.splitlines()
    assert applied_line.startswith(f"applied state sha256 {sha256(encode(seed_state))} at "), applied_line
    header = re.split(r"\s{2,}", lines[0])
    assert header == [
        "KIND",
        "NAME",
        "EIP",
        "TRANSLATION",
        "CONNS",
        "ORIG PKTS",
        "ORIG BYTES",
        "REPLY PKTS",
        "REPLY BYTES",
    ]
    rows = {(r[0], r[1]): r for r in (re.split(r"\s{2,}", line) for line in lines[1:])}
    assert set(rows) == {("dnat", "dnat01"), ("fip", "fip01"), ("snat", "my-snat")}
    assert rows["dnat", "dnat01"][2:4] == [DNAT_EIP, "10.115.55.200:8888/tcp -> 172.20.10.2:80"]
    assert rows["snat", "my-snat"][2:4] == [DNAT_EIP, "172.20.10.0/24 -> 10.115.55.200"]
    assert rows["fip", "fip01"][2:4] == [
        FIP_EIP,
        "10.115.55.201 -> 172.20.10.3 (in); 172.20.10.3 -> 10.115.55.201 (out)",
    ]

    as_json = json.loads(lab.exec("gw", *status, "--json").stdout)
    assert as_json["applied"]["sha256"] == sha256(encode(seed_state))
    samples = scrape(daemon)
    assert len(as_json["rules"]) == 3
    for rule in as_json["rules"]:
        labels = {"kind": rule["kind"], "name": rule["name"], "eip": rule["eip"]}
        row = rows[rule["kind"], rule["name"]]
        expected = [
            samples[sample_name("natgwd_rule_connections_total", labels)],
            samples[sample_name("natgwd_rule_packets_total", {**labels, "direction": "original"})],
            samples[sample_name("natgwd_rule_bytes_total", {**labels, "direction": "original"})],
            samples[sample_name("natgwd_rule_packets_total", {**labels, "direction": "reply"})],
            samples[sample_name("natgwd_rule_bytes_total", {**labels, "direction": "reply"})],
        ]
        from_json = [
            rule["connections"],
            rule["original_packets"],
            rule["original_bytes"],
            rule["reply_packets"],
            rule["reply_bytes"],
        ]
        assert [float(v) for v in row[4:]] == expected, (row, expected)
        assert from_json == expected, (rule, expected)
    dnat = next(r for r in as_json["rules"] if r["kind"] == "dnat")
    assert dnat["connections"] == 2
    assert dnat["translations"] == ["10.115.55.200:8888/tcp -> 172.20.10.2:80"]
    assert dnat["original_packets"] > 0 and dnat["reply_packets"] > 0


# --- 10. foreign state --------------------------------------------------------------------


def test_foreign_state_is_never_touched(served: Lab, seed_state: dict[str, Any]) -> None:
    """Prevents: natgwd deleting what it did not create: another nftables table, an
    address or route present before it started, even one it also declared and then dropped."""
    lab = served
    lab.exec("gw", "nft", "add", "table", "ip", "keepme")
    lab.exec("gw", "nft", "add", "chain", "ip", "keepme", "c")
    lab.exec("gw", "nft", "add", "rule", "ip", "keepme", "c", "ip", "daddr", "192.0.2.1", "counter", "accept")
    keepme = nft_table(lab, "ip", "keepme")
    lab.exec("gw", "ip", "link", "set", "net1", "up")
    lab.exec("gw", "ip", "addr", "add", "172.20.10.254/24", "dev", "net1")  # also declared by the state
    lab.exec("gw", "ip", "addr", "add", "10.115.50.50/21", "dev", "net2")
    lab.exec("gw", "ip", "route", "add", "10.99.0.0/16", "via", "172.20.10.1", "dev", "net1")

    def foreign_intact() -> None:
        assert nft_table(lab, "ip", "keepme") == keepme
        assert addresses(lab, "net1").get("172.20.10.254/24", "missing") is None
        assert addresses(lab, "net2").get("10.115.50.50/21", "missing") is None
        route = gateway_routes(lab).get("10.99.0.0/16")
        assert route is not None
        # iproute2 leaves out "protocol" for proto boot, the default of `ip route add`
        assert (route["gateway"], route["dev"], route.get("protocol", "boot")) == ("172.20.10.1", "net1", "boot")

    # A: declares the hand-made address and route too.
    state_a = json.loads(json.dumps(seed_state))
    state_a["internal"]["routes"].append({"dst": "10.99.0.0/16", "via": "172.20.10.1"})
    daemon = lab.start_natgwd(state_a, "--resync-interval", "1")
    daemon.wait_applied()
    foreign_intact()
    changes = [e["change"] for e in events_named(daemon, "link change")]
    assert "add address 172.20.10.254/24 dev net1" not in changes
    assert not any("10.99.0.0/16" in c for c in changes), changes
    assert not non_json_log_lines(daemon), non_json_log_lines(daemon)[:3]
    assert_snat_works(lab)

    # B: drops both, moves natgwd's own addresses, changes rules.
    state_b = json.loads(json.dumps(seed_state))
    state_b["internal"]["addresses"] = ["172.20.10.250/24"]
    state_b["external"]["addresses"] = ["10.115.48.2/21"]
    state_b = with_second_dnat(state_b)
    daemon.write_state(state_b)
    daemon.wait_applied(sha256(encode(state_b)))
    foreign_intact()
    assert addresses(lab, "net1") == {"172.20.10.254/24": None, "172.20.10.250/24": NATGWD_PROTO}
    assert addresses(lab, "net2") == {
        "10.115.50.50/21": None,
        "10.115.48.2/21": NATGWD_PROTO,
        f"{DNAT_EIP}/21": NATGWD_PROTO,
        f"{FIP_EIP}/21": NATGWD_PROTO,
    }
    assert_dnat_works(lab)
    assert_snat_works(lab)

    # C: back to A; then a couple of resyncs.
    daemon.write_state(state_a)
    daemon.wait_applied(sha256(encode(state_a)))
    last = metric(daemon, "natgwd_last_successful_reconcile_timestamp_seconds") or 0
    wait_for(
        lambda: (metric(daemon, "natgwd_last_successful_reconcile_timestamp_seconds") or 0) > last + 1,
        "two more resyncs",
        timeout=10,
    )
    foreign_intact()
    assert addresses(lab, "net1") == {"172.20.10.254/24": None}
    assert "10.115.48.1/21" in addresses(lab, "net2")
    assert_dnat_works(lab)
    assert_fip_works(lab)


def test_changing_the_external_address_keeps_eips_and_foreign_addresses(
    served: Lab, seed_state: dict[str, Any]
) -> None:
    """Prevents: a state change that only replaces external.addresses taking every EIP off
    net2 (all DNAT/SNAT/FIP down until the next resync) and deleting an operator's address
    in the same subnet for good, while natgwd reports the state applied and ready."""
    lab = served
    daemon = lab.start_natgwd(seed_state, "--resync-interval", "3600")
    daemon.wait_applied()
    lab.exec("gw", "ip", "addr", "add", "10.115.50.50/21", "dev", "net2")  # a secondary, added by hand
    seed_state["external"]["addresses"] = ["10.115.48.2/21"]
    daemon.write_state(seed_state)
    daemon.wait_applied(sha256(encode(seed_state)))
    assert addresses(lab, "net2") == {
        "10.115.48.2/21": NATGWD_PROTO,
        f"{DNAT_EIP}/21": NATGWD_PROTO,
        f"{FIP_EIP}/21": NATGWD_PROTO,
        "10.115.50.50/21": None,
    }
    assert_dnat_works(lab)
