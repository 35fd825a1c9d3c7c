"""benchmarks.one_change's table: each method's median with its spread, the daemons' own
log, the per-change ratios (natgwd against the floor and the baseline) and the load."""

from __future__ import annotations

from benchmarks.one_change import table
from benchmarks.stats import summary


def test_the_table_shows_the_per_change_ratios_and_the_load() -> None:
    natgwd, baseline, floor = [0.004, 0.006, 0.005], [0.008, 0.006, 0.010], [0.020, 0.030, 0.025]
    result = {
        "n": 10000,
        "changes": 3,
        "loadavg_start": (2.5, 1.0, 1.0),
        "loadavg_end": (3.25, 1.0, 1.0),
        "natgwd": summary(natgwd),
        "natgwd_own": summary([0.003]),
        "baseline": summary(baseline),
        "baseline_own": summary([]),
        "floor": summary(floor),
        "natgwd_per_floor": summary([a / b for a, b in zip(natgwd, floor, strict=True)]),
        "natgwd_per_baseline": summary([a / b for a, b in zip(natgwd, baseline, strict=True)]),
    }
    text = "\n".join(table(result))
    assert "| natgwd | 5.0 ms (4.0 - 6.0) | 3.0 ms | 0.20 |" in text
    assert "| baseline | 8.0 ms (6.0 - 10.0) | - | - |" in text
    assert "| floor | 25.0 ms (20.0 - 30.0) | - | - |" in text
    assert "natgwd / baseline per change: median 0.50 (0.50 - 1.00)" in text
    assert "load average 2.5 - 3.2; 3 changes at N=10,000" in text
