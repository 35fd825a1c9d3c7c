"""benchmarks.python_stages runs: both trees timed, each stage of each round recorded."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import python_stages


def test_both_trees_are_timed_in_turn(tmp_path: Path) -> None:
    """Prevents: the in-process A/B of docs/performance.md rotting unnoticed."""
    repo = Path(python_stages.__file__).resolve().parent.parent
    argv = ["--sizes", "50", "--rounds", "1", "--repeats", "1", "--baseline", str(repo)]
    assert python_stages.main([*argv, "--results-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("python_stages-*.json")
    rounds = json.loads(path.read_text())["sizes"]["50"]
    assert set(rounds) == {"natgwd", "baseline"}
    for runs in rounds.values():
        assert len(runs) == 1 and set(runs[0]) == set(python_stages.STAGES)
        assert all(seconds > 0 for seconds in runs[0].values())
