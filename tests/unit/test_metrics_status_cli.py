"""Per-rule Prometheus counters, `natgwd status` output, the state-file watcher and the
`check` / `render` commands."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from natgwd.cli import main
from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.counters import COUNTING_SETS, Listings
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import Counter, Element, TableContents, plan_transaction
from natgwd.runtime.metrics import RuleCounters
from natgwd.runtime.reconciler import Reconciler
from natgwd.runtime.status import RuleStatus, format_table, record_mismatch, rule_statuses
from natgwd.runtime.watch import FileWatcher, Seen
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeLinks

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def seed() -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied


def state_of(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def applied(document: dict[str, Any]) -> tuple[FakeNft, Reconciler]:
    fake = FakeNft()
    rec = Reconciler(fake, FakeLinks(), ensure_forwarding=lambda: False)
    rec.apply(state_of(document))
    return fake, rec


def with_traffic(document: dict[str, Any]) -> tuple[FakeNft, Reconciler]:
    """The seed applied (ids: snat 1, dnat 2, fip 3) with some counted traffic."""
    fake, rec = applied(document)
    fake.count("rule_connections", "2", 5, 60)
    fake.count("rule_traffic", "original . 2", 10, 100)
    fake.count("rule_traffic", "reply . 2", 8, 1500)
    fake.count("rule_connections", "3", 1, 60)
    fake.count("rule_traffic", "original . 3", 4, 50)
    fake.count("invalid_dropped", '"net2"', 3, 40)
    return fake, rec


def scrape(read: Callable[[], Listings]) -> tuple[str, Samples]:
    text = RuleCounters(read).exposition().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def rule(kind: str, name: str, eip: str, direction: str | None = None) -> tuple[tuple[str, str], ...]:
    labels = {"kind": kind, "name": name, "eip": eip}
    if direction is not None:
        labels["direction"] = direction
    return tuple(sorted(labels.items()))


DNAT = ("dnat", "dnat01", "10.115.55.200")
FIP = ("fip", "fip01", "10.115.55.201")
SNAT = ("snat", "my-snat", "10.115.55.200")


# --- metrics ------------------------------------------------------------------------------


def test_rule_counters_are_exported_with_kind_name_and_eip() -> None:
    _, rec = with_traffic(seed())
    text, samples = scrape(rec.counting_sets)
    assert samples == {
        ("natgwd_rule_connections_total", rule(*SNAT)): 0.0,
        ("natgwd_rule_connections_total", rule(*DNAT)): 5.0,
        ("natgwd_rule_connections_total", rule(*FIP)): 1.0,
        ("natgwd_rule_packets_total", rule(*SNAT, "original")): 0.0,
        ("natgwd_rule_packets_total", rule(*SNAT, "reply")): 0.0,
        ("natgwd_rule_packets_total", rule(*DNAT, "original")): 10.0,
        ("natgwd_rule_packets_total", rule(*DNAT, "reply")): 8.0,
        ("natgwd_rule_packets_total", rule(*FIP, "original")): 4.0,
        ("natgwd_rule_packets_total", rule(*FIP, "reply")): 0.0,
        ("natgwd_rule_bytes_total", rule(*SNAT, "original")): 0.0,
        ("natgwd_rule_bytes_total", rule(*SNAT, "reply")): 0.0,
        ("natgwd_rule_bytes_total", rule(*DNAT, "original")): 1000.0,
        ("natgwd_rule_bytes_total", rule(*DNAT, "reply")): 12000.0,
        ("natgwd_rule_bytes_total", rule(*FIP, "original")): 200.0,
        ("natgwd_rule_bytes_total", rule(*FIP, "reply")): 0.0,
        ("natgwd_invalid_dropped_packets_total", (("interface", "net2"),)): 3.0,
    }
    assert 'natgwd_rule_connections_total{kind="dnat",name="dnat01",eip="10.115.55.200"} 5\n' in text


def test_counters_follow_the_rule_not_the_id() -> None:
    listings = {
        "rule_connections": [("0x00000029", "2", "120", "dnat/web/10.0.0.1")],
        "rule_traffic": [("reply . 0x00000029", "6", "600", "")],
    }
    _, samples = scrape(lambda: listings)
    assert samples == {
        ("natgwd_rule_connections_total", rule("dnat", "web", "10.0.0.1")): 2.0,
        ("natgwd_rule_packets_total", rule("dnat", "web", "10.0.0.1", "reply")): 6.0,
        ("natgwd_rule_bytes_total", rule("dnat", "web", "10.0.0.1", "reply")): 600.0,
    }


def test_elements_without_labels_or_counters_are_not_exported() -> None:
    listings = {
        "rule_connections": [
            ("0x00000001", "9", "9", "not-a-rule"),
            ("0x00000003", "9", "9", ""),
        ],
        # Traffic of ids without a labelled connections element is not exported either.
        "rule_traffic": [("original . 0x00000001", "9", "9", "")],
    }
    text, samples = scrape(lambda: listings)
    assert samples == {}
    assert "natgwd_rule_connections" in text  # families are declared, just empty


def test_label_values_are_escaped() -> None:
    listings = {
        "rule_connections": [("0x00000002", "1", "60", 'dnat/a"b\\c/10.0.0.1')],
        "invalid_dropped": [('"ne\nt2"', "3", "40", "")],
    }
    text, samples = scrape(lambda: listings)
    assert 'name="a\\"b\\\\c"' in text
    assert samples == {
        ("natgwd_rule_connections_total", rule("dnat", 'a"b\\c', "10.0.0.1")): 1.0,
        ("natgwd_invalid_dropped_packets_total", (("interface", "ne\nt2"),)): 3.0,
    }


def test_nothing_to_read_exports_nothing() -> None:
    _, samples = scrape(dict)
    assert samples == {}


def test_counting_sets_are_read_at_scrape_time() -> None:
    fake, rec = with_traffic(seed())
    counters = RuleCounters(rec.counting_sets)
    first = counters.exposition().decode()
    fake.count("rule_connections", "2", 2, 60)
    second = counters.exposition().decode()
    line = 'natgwd_rule_connections_total{kind="dnat",name="dnat01",eip="10.115.55.200"}'
    assert f"{line} 5\n" in first
    assert f"{line} 7\n" in second
    assert COUNTING_SETS == (
        "rule_connections",
        "rule_traffic",
        "invalid_dropped",
        "handed_over",
        "port_block_attempts",
    )


# --- status ---------------------------------------------------------------------------------


def test_rule_statuses_of_the_seed() -> None:
    fake, _ = with_traffic(seed())
    assert fake.table is not None
    assert rule_statuses(fake.table) == [
        RuleStatus(
            "dnat",
            "dnat01",
            "10.115.55.200",
            2,
            ["10.115.55.200:8888/tcp -> 172.20.10.2:80"],
            connections=5,
            original_packets=10,
            original_bytes=1000,
            reply_packets=8,
            reply_bytes=12000,
        ),
        RuleStatus(
            "fip",
            "fip01",
            "10.115.55.201",
            3,
            ["10.115.55.201 -> 172.20.10.3 (in)", "172.20.10.3 -> 10.115.55.201 (out)"],
            connections=1,
            original_packets=4,
            original_bytes=200,
        ),
        RuleStatus("snat", "my-snat", "10.115.55.200", 1, ["172.20.10.0/24 -> 10.115.55.200"]),
    ]


def test_a_record_is_checked_against_the_table() -> None:
    fake, _ = with_traffic(seed())
    assert fake.table is not None
    rules = rule_statuses(fake.table)
    assert record_mismatch(state_of(seed()), rules) is None
    other = seed()
    other["dnat"][0]["name"] = "another-gateways-dnat"
    assert record_mismatch(state_of(other), rules) == (
        "1 of its rules are not in the table and 1 of the table's rules are not in it "
        "(e.g. dnat/another-gateways-dnat/10.115.55.200)"
    )
    other["snat"] = other["dnat"] = []
    assert record_mismatch(state_of(other), rules) == (
        "2 of the table's rules are not in it (e.g. dnat/dnat01/10.115.55.200)"
    )
    assert record_mismatch(None, rules) == "it holds no readable state"


def test_rule_status_as_dict() -> None:
    status = RuleStatus("snat", "s", "1.2.3.4", 7, ["x"], connections=1)
    assert status.as_dict() == {
        "kind": "snat",
        "name": "s",
        "eip": "1.2.3.4",
        "id": 7,
        "translations": ["x"],
        "connections": 1,
        "original_packets": 0,
        "original_bytes": 0,
        "reply_packets": 0,
        "reply_bytes": 0,
    }


def test_format_table_of_the_seed() -> None:
    fake, _ = with_traffic(seed())
    assert fake.table is not None
    fip = "10.115.55.201 -> 172.20.10.3 (in); 172.20.10.3 -> 10.115.55.201 (out)"  # the widest cell
    w = len(fip)
    assert format_table(rule_statuses(fake.table)) == (
        f"KIND  NAME     EIP            {'TRANSLATION':{w}}  CONNS  ORIG PKTS  ORIG BYTES  REPLY PKTS  REPLY BYTES\n"
        f"dnat  dnat01   10.115.55.200  {'10.115.55.200:8888/tcp -> 172.20.10.2:80':{w}}  "
        "5      10         1000        8           12000\n"
        f"fip   fip01    10.115.55.201  {fip}  1      4          200         0           0\n"
        f"snat  my-snat  10.115.55.200  {'172.20.10.0/24 -> 10.115.55.200':{w}}  "
        "0      0          0           0           0\n"
    )


def test_format_table_without_rules_is_the_header() -> None:
    assert format_table([]) == "KIND  NAME  EIP  TRANSLATION  CONNS  ORIG PKTS  ORIG BYTES  REPLY PKTS  REPLY BYTES\n"


def test_status_ignores_foreign_elements() -> None:
    table = TableContents(
        elements={
            "rule_connections": {"5": Element(comment="junk"), "6": Element(comment="snat/s/10.0.0.1")},
            "rule_traffic": {"original . 5": Element(counter=Counter(1, 1))},
        }
    )
    assert rule_statuses(table) == [RuleStatus("snat", "s", "10.0.0.1", 6)]


def _dnat_range_statuses(external: str, internal: str) -> list[str]:
    doc = seed()
    doc["dnat"][0].update(externalPort=external, internalPort=internal)
    state = state_of(doc)
    table = desired_table(state, assign_ids(state, {})).contents()
    (dnat,) = [r for r in rule_statuses(table) if r.kind == "dnat"]
    return dnat.translations


def test_port_range_is_summarised_by_its_ends() -> None:
    assert _dnat_range_statuses("8000-8002", "80-82") == [
        "10.115.55.200:8000/tcp -> 172.20.10.2:80",
        "... 1 more ...",
        "10.115.55.200:8002/tcp -> 172.20.10.2:82",
    ]


def test_port_range_across_a_digit_boundary_is_summarised_by_its_ends() -> None:
    assert _dnat_range_statuses("9998-10001", "9998-10001") == [
        "10.115.55.200:9998/tcp -> 172.20.10.2:9998",
        "... 2 more ...",
        "10.115.55.200:10001/tcp -> 172.20.10.2:10001",
    ]


# --- the state-file watcher ---------------------------------------------------------------------


def test_watcher_reports_a_change_then_one_recheck_then_nothing(tmp_path: Path) -> None:
    """The recheck covers a second same-size write in the timestamp tick of the one read."""
    path = tmp_path / "state.json"
    path.write_text("{}")
    watcher = FileWatcher(path)
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None
    assert watcher.poll() is None


def test_watcher_detects_an_in_place_write(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 1}')
    watcher = FileWatcher(path)
    watcher.poll()
    watcher.poll()
    inode = path.stat().st_ino
    with path.open("r+") as f:
        f.write('{"version": 2, "x": 1}')
    assert path.stat().st_ino == inode
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None


def test_watcher_detects_a_same_size_rewrite_with_a_new_mtime(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("aaaa")
    st = path.stat()
    watcher = FileWatcher(path)
    watcher.poll()
    watcher.poll()
    path.write_text("bbbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert watcher.poll() is Seen.CHANGED


def test_watcher_detects_a_rename_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("aaaa")
    st = path.stat()
    watcher = FileWatcher(path)
    watcher.poll()
    watcher.poll()
    tmp = tmp_path / "state.json.tmp"
    tmp.write_text("bbbb")  # same size...
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the same mtime
    os.replace(tmp, path)
    assert path.read_text() == "bbbb"
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None


def _configmap_version(root: Path, name: str, content: str) -> None:
    version = root / name
    version.mkdir()
    (version / "state.json").write_text(content)


def test_watcher_detects_a_configmap_data_symlink_swap(tmp_path: Path) -> None:
    root = tmp_path / "config"
    root.mkdir()
    _configmap_version(root, "..2026_a", "aaaa")
    os.symlink("..2026_a", root / "..data")
    os.symlink("..data/state.json", root / "state.json")
    path = root / "state.json"
    assert path.read_text() == "aaaa"
    watcher = FileWatcher(path)
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None

    # The kubelet's update: write a new version dir, then atomically repoint ..data.
    _configmap_version(root, "..2026_b", "bbbb")
    os.utime(root / "..2026_b" / "state.json", ns=(0, (root / "..2026_a" / "state.json").stat().st_mtime_ns))
    os.symlink("..2026_b", root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    assert path.read_text() == "bbbb"
    assert os.readlink(path) == "..data/state.json"  # the visible symlink itself never changed
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None


def test_watcher_detects_disappearance_and_return(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{}")
    watcher = FileWatcher(path)
    watcher.poll()
    watcher.poll()
    path.unlink()
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None
    path.write_text("{}")
    assert watcher.poll() is Seen.CHANGED


def test_watcher_of_a_missing_file(tmp_path: Path) -> None:
    watcher = FileWatcher(tmp_path / "absent.json")
    assert watcher.poll() is Seen.CHANGED
    assert watcher.poll() is Seen.RECHECK
    assert watcher.poll() is None


# --- command line ----------------------------------------------------------------------------


def write(tmp_path: Path, document: Any, name: str = "state.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def test_check_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, seed())
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: valid: 2 eips, 1 snat, 1 dnat, 1 fip\n"
    assert err == ""


def test_check_invalid_file_lists_every_problem_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = "90-80"
    doc["snat"][0]["internalCIDR"] = "172.20.10.1/24"
    path = write(tmp_path, doc)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: invalid desired state (2 problems):",
        "  $.dnat[0].externalPort: range 90-80 is reversed (first port after last)",
        "  $.snat[0].internalCIDR: has host bits set (did you mean 172.20.10.0/24?)",
    ]


def test_check_unparseable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '{"version": 1,')
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: invalid desired state (1 problem):\n  $: not valid JSON: ")


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.json"
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}: cannot read: file does not exist\n"


def test_check_refuses_a_world_writable_file_as_run_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, seed())
    path.chmod(0o666)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{path}: cannot read: is writable by every user, who could rewrite the gateway's NAT "
        "(--allow-writable-state to accept)\n"
    )
    assert main(["check", "--allow-writable-state", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: valid: 2 eips, 1 snat, 1 dnat, 1 fip\n"


def test_check_and_render_read_standard_input_for_a_dash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for command, expected in (("check", "-: valid: 2 eips, 1 snat, 1 dnat, 1 fip\n"), ("render", None)):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(json.dumps(seed()).encode())))
        assert main([command, "-"]) == 0
        out, err = capsys.readouterr()
        assert err == ""
        if expected is None:
            state = state_of(seed())
            assert out == plan_transaction(None, desired_table(state, assign_ids(state, {}))).script()
        else:
            assert out == expected


def test_check_the_shipped_example(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parents[2] / "examples" / "seed.json"
    assert main(["check", str(example)]) == 0
    assert capsys.readouterr().out.endswith(": valid: 2 eips, 1 snat, 1 dnat, 1 fip\n")


def test_render_prints_the_creating_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, seed())
    assert main(["render", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("add table inet natgwd\n")
    state = state_of(seed())
    assert out == plan_transaction(None, desired_table(state, assign_ids(state, {}))).script()
    assert "add element inet natgwd dnat_target { 10.115.55.200 . tcp . 8888 : 172.20.10.2 . 80 }\n" in out
    assert out.endswith("\n")


def test_render_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = seed()
    doc["version"] = 2
    path = write(tmp_path, doc)
    assert main(["render", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: invalid desired state (1 problem):",
        "  $.version: must be 1 (the only supported version)",
        "  (the checks of addresses, EIP references, duplicates, conflicts and reachability were skipped: "
        "they need $.version fixed first)",
    ]


def test_check_lists_schema_and_semantic_problems_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = seed()
    doc["eips"][0]["name"] = "My-EIP"  # the schema refuses it; rules naming it are not reported again
    doc["snat"][0]["eip"] = "My-EIP"
    doc["dnat"][0]["externalPort"] = 70000  # the schema refuses it
    doc["fip"].append({"name": "fip02", "eip": "nope", "internalIp": "172.20.10.4"})
    doc["snat"].append({"name": "lan2", "eip": "my-eip2", "internalCIDR": "172.20.10.1/24"})
    path = write(tmp_path, doc)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: invalid desired state (5 problems):",
        '  $.dnat[0].externalPort: must be a port 1-65535 (integer or string) or a range "first-last"',
        "  $.eips[0].name: must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
        "with a letter or digit",
        "  $.fip[1].eip: names EIP 'nope', which is not in eips",
        "  $.snat[0].eip: must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
        "with a letter or digit",
        "  $.snat[1].internalCIDR: has host bits set (did you mean 172.20.10.0/24?)",
    ]


def test_render_invalid_file_prints_problems_as_check_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = "90-80"
    doc["snat"][0]["internalCIDR"] = "172.20.10.1/24"
    path = write(tmp_path, doc)
    assert main(["check", str(path)]) == 1
    checked = capsys.readouterr().err
    assert main(["render", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == checked
    assert err.startswith(f"{path}: invalid desired state (2 problems):\n  $.dnat[0].externalPort: ")


def test_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "required" in capsys.readouterr().err


def test_status_of_share_backends() -> None:
    doc = seed()
    for name, ip in (("web-a", "172.20.10.2"), ("web-b", "172.20.10.3")):
        doc["dnat"].append(
            {
                "name": name,
                "eip": "my-eip",
                "protocol": "tcp",
                "externalPort": 9000,
                "internalIp": ip,
                "internalPort": 8080,
                "type": "share",
            }
        )
    fake, _ = applied(doc)
    assert fake.table is not None
    shares = {r.name: r.translations for r in rule_statuses(fake.table) if r.name.startswith("web-")}
    assert shares == {
        "web-a": ["(share backend) -> 172.20.10.2:8080"],
        "web-b": ["(share backend) -> 172.20.10.3:8080"],
    }


def test_run_help_says_the_defaults_and_the_log_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "seconds between drift checks (default: 10.0)" in text
    assert "json, one object per line for a log collector; console, aligned text for a person (default: json)" in text
    assert "least severe lines logged; debug adds each HTTP request and the HA peers' hellos (default: info)" in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text


def test_the_demo_help_does_not_run_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    from natgwd.lab import demo

    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m natgwd.lab.demo [-h]\n")
    assert "Needs root: it builds network namespaces." in out
