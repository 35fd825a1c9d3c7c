"""Where natgwd's time goes: cProfile of the daemon's own path for one file.

    ip netns exec NS python -m benchmarks.profile_natgwd DIR     (started by benchmarks.compare)

DIR holds base.json (the gateway without rules), full.json and change.json (the full
state plus one added DNAT). In a namespace with net1/net2, natgwd's Daemon is built as
`natgwd run` builds it, and Daemon.reconcile_file (read the file, sha256, validate, plan,
the nftables transaction, links, conntrack, the applied-state record) is run for each
file: once without the profiler (wall time) and once under cProfile. The result goes to
DIR/profile.json.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

# (label, file, function): cumulative time of each, from the profile. Labels starting
# with "of which" are parts of the stage above them (not counted again in shares).
STAGES = (
    ("read file", "natgwd/runtime/statefile.py", "read"),
    ("validate (StateTracker.check)", "natgwd/state/tracker.py", "check"),
    ("of which decoding in full", "natgwd/state/decode.py", "decode_text"),
    ("of which the full validation (validate_document)", "natgwd/state/validation.py", "validate_document"),
    ("plan: assign_ids", "natgwd/planning/plan.py", "assign_ids"),
    ("plan in full (TablePlan)", "natgwd/planning/plan.py", "__init__"),
    ("plan a change (TablePlan.change)", "natgwd/planning/plan.py", "change"),
    ("diff: plan_transaction", "natgwd/planning/table.py", "plan_transaction"),
    ("render the script (Transaction.script)", "natgwd/planning/table.py", "script"),
    ("libnftables cmd (nft._Context)", "natgwd/kernel/nft.py", "__call__"),
    ("TableContents of the new table (DesiredTable.contents)", "natgwd/planning/table.py", "contents"),
    ("links (Netlink.apply)", "natgwd/kernel/netlink.py", "apply"),
    ("conntrack: changed filters (stale.changed_filters)", "natgwd/planning/stale.py", "changed_filters"),
    ("conntrack cleanup (_clean_conntrack)", "natgwd/runtime/reconciler.py", "_clean_conntrack"),
    ("applied-state record", "natgwd/runtime/record.py", "write"),
    ("total: Daemon.reconcile_file", "natgwd/runtime/daemon.py", "reconcile_file"),
)


def stage_times(profile: cProfile.Profile) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out = []
    for label, filename, function in STAGES:
        seconds, calls = 0.0, 0
        for (path, _line, name), (_cc, ncalls, _tt, cumulative, _callers) in stats.items():
            if name == function and path.endswith(filename):
                seconds += cumulative
                calls += ncalls
        out.append({"stage": label, "seconds": seconds, "calls": calls})
    return out


def top(profile: cProfile.Profile, sort: str, limit: int) -> str:
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).strip_dirs().sort_stats(sort).print_stats(limit)
    text = stream.getvalue()
    start = text.find("   ncalls")
    return text[start:].rstrip() + "\n" if start >= 0 else text


def main(argv: list[str]) -> int:
    from natgwd.cli import GC_THRESHOLDS
    from natgwd.kernel.conntrack import ConntrackCleaner
    from natgwd.kernel.netlink import Netlink, ensure_forwarding
    from natgwd.kernel.nft import KernelNft
    from natgwd.runtime.daemon import Daemon, DaemonConfig
    from natgwd.runtime.logs import configure
    from natgwd.runtime.reconciler import Announce, Reconciler
    from natgwd.runtime.statefile import Reading

    directory = Path(argv[0])
    configure("json", "info")  # as the daemon logs (to stderr: the worker's log file)
    gc.set_threshold(*GC_THRESHOLDS)  # as `natgwd run` collects
    state_path = directory / "state.json"
    config = DaemonConfig(
        state_path=state_path,
        metrics_address=("127.0.0.1", 0),
        resync_interval=3600.0,
        applied_state_path=directory / "applied.json",
    )

    def reconciler(announce: Announce) -> Reconciler:
        return Reconciler(KernelNft(), Netlink(), ensure_forwarding, ConntrackCleaner(), announce)

    daemon = Daemon(config, reconciler)
    files = {name: (directory / f"{name}.json").read_bytes() for name in ("base", "full", "change")}

    def apply(name: str, profile: cProfile.Profile | None = None) -> float:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_bytes(files[name])
        os.replace(tmp, state_path)
        started = time.perf_counter()
        if profile is not None:
            profile.enable()
        daemon.reconcile_file(Reading.CHANGED)
        if profile is not None:
            profile.disable()
        seconds = time.perf_counter() - started
        readiness = daemon.answers.readiness()
        if not readiness[0]:
            raise RuntimeError(f"{name} not applied: {readiness[1]}")
        return seconds

    result: dict[str, Any] = {}
    apply("base")
    for kind, before, after in (("full_apply", "base", "full"), ("one_change", "full", "change")):
        apply(before)
        wall = apply(after)
        apply(before)
        profile = cProfile.Profile()
        profiled = apply(after, profile)
        result[kind] = {
            "wall_seconds": wall,
            "profiled_seconds": profiled,
            "stages": stage_times(profile),
            "cumulative": top(profile, "cumulative", 25),
            "tottime": top(profile, "tottime", 15),
        }
    (directory / "profile.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
