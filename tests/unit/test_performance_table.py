"""benchmarks/RESULTS.md and docs/performance.md's table are generated from the one results
file they name, and the throughput section of a report keeps every run, the running/stopped
pair and the order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report

DOCS = Path(__file__).resolve().parents[2] / "docs" / "performance.md"
RESULTS = report.REPO / "benchmarks" / "RESULTS.md"


def test_results_md_is_what_its_results_file_renders() -> None:
    text = RESULTS.read_text()
    source = report.source_of(text)
    assert source.is_file(), f"RESULTS.md names {source}, which is not in the repository"
    images = [source.parent / name for name in report.PLOTS if (source.parent / name).is_file()]
    assert text == report.document(json.loads(source.read_text()), source, RESULTS, images), (
        f"RESULTS.md differs from its results file: python -m benchmarks.report {source.relative_to(report.REPO)}"
    )


def test_results_md_and_the_docs_table_come_from_the_same_run() -> None:
    assert report.source_of(RESULTS.read_text()) == report.docs_source(DOCS.read_text())


def test_docs_table_matches_the_results_file_it_names() -> None:
    text = DOCS.read_text()
    source = report.docs_source(text)
    assert source.is_file(), f"docs/performance.md names {source}, which is not in the repository"
    regenerated = report.replace_docs_table(text, report.performance_table(json.loads(source.read_text()), source))
    assert text == regenerated, (
        "docs/performance.md's table differs from its results file: "
        f"python -m benchmarks.report {source.relative_to(report.REPO)} --docs docs/performance.md"
    )


def test_docs_table_figures_come_from_the_file() -> None:
    source = report.docs_source(DOCS.read_text())
    results = json.loads(source.read_text())
    table = "\n".join(report.performance_table(results, source))
    natgwd = results["cells"]["natgwd"]["10000"]
    assert f"**{report.rate(natgwd['conn']['median'])}**" in table
    assert report.seconds(natgwd["changes"]["all"]["median"]) in table
    assert source.name in table


def throughput(values: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    rows = {
        row: {
            path: {"n": len(v), "median": sorted(v)[len(v) // 2], "min": min(v), "max": max(v), "values": v}
            for path, v in paths.items()
        }
        for row, paths in values.items()
    }
    return {
        "n": 1000,
        "seconds": 5,
        "runs": 5,
        "order": list(values),
        "titles": {"plain": "no NAT", "natgwd": "natgwd", "natgwd-stopped": "natgwd stopped", "floor": "floor"},
        "loadavg_start": [1.0, 1.0, 1.0],
        "loadavg_end": [2.0, 2.0, 2.0],
        "rows": rows,
    }


def test_throughput_section_shows_min_max_median_and_running_over_stopped() -> None:
    runs = [10.0, 12.0, 11.0, 14.0, 13.0]
    data = throughput(
        {
            "plain": {"dnat": runs, "snat": runs},
            "natgwd": {"dnat": runs, "snat": [9.0, 12.0, 11.0, 14.0, 13.0]},
            "natgwd-stopped": {"dnat": runs, "snat": [10.0, 12.0, 11.0, 14.0, 13.0]},
            "floor": {"dnat": [11.0] * 5, "snat": [22.0] * 5},
        }
    )
    text = "\n".join(report.throughput_section(data))
    assert "| DNAT: ext → EIP:port → vm1 | natgwd | 12.0 | 10.0 - 14.0 | 5 | 1.00x |" in text
    assert "| SNAT: vm1 → ext | natgwd stopped | 12.0 | 10.0 - 14.0 | 5 | 1.00x |" in text
    assert "| SNAT: vm1 → ext | floor | 22.0 | 22.0 - 22.0 | 5 | 1.83x |" in text
    # Pair by pair: SNAT 0.90, 1, 1, 1, 1.
    assert "DNAT 1.00 (1.00 - 1.00); SNAT 1.00 (0.90 - 1.00)" in text
    assert "no NAT, natgwd, natgwd stopped, floor, then again" in text


def test_a_results_file_without_the_interleaved_section_says_so() -> None:
    text = "\n".join(report.throughput_section(None))
    assert "Not in this run" in text and "--throughput-only" in text


@pytest.mark.parametrize("missing", ["natgwd", "natgwd-stopped"])
def test_no_pair_line_without_both_rows(missing: str) -> None:
    data = throughput({"natgwd": {"dnat": [1.0], "snat": [1.0]}, "natgwd-stopped": {"dnat": [1.0], "snat": [1.0]}})
    del data["rows"][missing]
    assert report.running_stopped(data) == []
