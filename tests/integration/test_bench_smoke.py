"""The comparative benchmark runs end to end at a tiny size and reports every method and
metric. No timing is asserted: benchmarks measure, tests only check that they run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.compare import METHODS, check_prerequisites

REPO = Path(__file__).resolve().parents[2]
N = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    problems = check_prerequisites()
    if problems:
        pytest.skip("; ".join(problems))
    directory = tmp_path_factory.mktemp("bench")
    markdown = directory / "RESULTS.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            f"--sizes={N}",
            "--rounds=1",
            "--min-rounds=1",
            "--full-repeats=1",
            "--conn-seconds=0.5",
            "--conn-repeats=1",
            "--iperf-seconds=1",
            "--iperf-repeats=2",
            "--scrapes=1",
            "--profile=always",
            f"--cold-sizes={N * 10}",
            "--cold-repeats=1",
            f"--results-dir={directory}",
            f"--markdown={markdown}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (path,) = directory.glob("bench-*.json")
    return json.loads(path.read_text()), markdown, directory


def test_every_method_measured(run: tuple[dict[str, Any], Path, Path]) -> None:
    results, _, _ = run
    assert results["sizes"] == [N]
    for method in METHODS:
        cell = results["cells"][method][str(N)]
        assert cell["status"] == "ok", (method, cell.get("reason"))
        assert cell["full"]["n"] >= 1 and cell["full"]["median"] > 0
        for kind in ("add", "change", "delete"):
            assert cell["changes"][kind]["n"] >= 1, (method, kind)
        assert cell["conn"]["median"] > 0, method


def test_throughput_interleaved_with_natgwd_running_and_stopped(run: tuple[dict[str, Any], Path, Path]) -> None:
    results, _, _ = run
    throughput = results["throughput"]
    assert throughput["order"] == ["plain", "natgwd", "natgwd-stopped", *METHODS[1:]]
    for row in throughput["order"]:
        for path in ("dnat", "snat"):
            measured = throughput["rows"][row][path]
            assert measured["n"] == 2 and measured["min"] > 0, (row, path)
        # The SNAT path really was source-NATed (the server saw an EIP, not the VM), also
        # with natgwd stopped: its table stays.
        seen = throughput["rows"][row]["snat"]["server_saw"]
        assert seen == "172.20.10.2" if row == "plain" else seen not in (None, "172.20.10.2"), row


def test_cold_start_times_the_eips_against_its_floor(run: tuple[dict[str, Any], Path, Path]) -> None:
    results, markdown, _ = run
    size = results["cold_start"]["sizes"][str(N * 10)]
    assert size["eips_added"] > 0
    for method in ("natgwd", "floor"):
        assert size[method]["n"] == 1 and size[method]["median"] > 0, method
    assert size["natgwd_own"]["n"] == 1 and size["ratios"]
    assert "1b. A cold start: the EIPs inside the clock" in markdown.read_text()


def test_baseline_natgwd_extras_and_profile(run: tuple[dict[str, Any], Path, Path]) -> None:
    results, _, _ = run
    plain = results["plain_routing"]
    assert plain["conn"]["median"] > 0
    natgwd = results["cells"]["natgwd"][str(N)]["natgwd"]
    assert natgwd["rss_kb"]["after_full_apply"]["VmRSS"] > 0
    assert natgwd["scrape"]["n"] >= 1 and natgwd["metrics_bytes"] > 0
    assert any(event.get("daemon_seconds") is not None for event in natgwd["events"])
    for kind in ("full_apply", "one_change"):
        stages = {s["stage"]: s for s in results["profile"][kind]["stages"]}
        assert stages["total: Daemon.reconcile_file"]["calls"] == 1
    for key in ("machine", "versions", "mix", "command", "loadavg_start", "loadavg_end"):
        assert results[key]


def test_report_rendered(run: tuple[dict[str, Any], Path, Path]) -> None:
    results, markdown, directory = run
    text = markdown.read_text()
    for method in METHODS:
        assert results["methods"][method]["title"] in text
    for heading in ("Full apply", "One change", "connections per second", "iperf3", "memory and /metrics"):
        assert heading in text
    assert "natgwd stopped (SIGTERM; its table left in place)" in text
    assert "natgwd running over natgwd stopped, pair by pair" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (directory / "apply_time.png").stat().st_size > 0
    assert (directory / "conn_rate.png").stat().st_size > 0
