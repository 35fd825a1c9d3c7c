"""natgwd.observability.ctstats: conntrack statistics summed over CPUs and exposed."""

from __future__ import annotations

from natgwd.observability.ctstats import Pressure, exposition, summed

# As pyroute2's Conntrack.stat() gives them on a 2-CPU machine.
PER_CPU = [
    {"cpu": 0, "found": 3, "invalid": 1, "insert_failed": 5, "drop": 5, "early_drop": 0, "clash_resolve": 2},
    {"cpu": 1, "found": 4, "invalid": 0, "insert_failed": 7, "drop": 6, "early_drop": 1, "chain_toolong": 1},
]


def test_statistics_are_summed_over_cpus() -> None:
    assert summed(PER_CPU) == {
        "found": 7,
        "invalid": 1,
        "insert_failed": 12,
        "drop": 11,
        "early_drop": 1,
        "clash_resolve": 2,
        "chain_toolong": 1,
    }


def test_pressure_exposition() -> None:
    text = exposition(Pressure(10, 262144, summed(PER_CPU))).decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert "natgwd_conntrack_entries 10" in lines
    assert "natgwd_conntrack_entries_limit 262144" in lines
    assert "natgwd_conntrack_insert_failed_total 12" in lines
    assert "natgwd_conntrack_chaintoolong_total 1" in lines
    assert "# TYPE natgwd_conntrack_drop_total counter" in text
    assert "natgwd_conntrack_error_total" not in text  # not reported: not exported
