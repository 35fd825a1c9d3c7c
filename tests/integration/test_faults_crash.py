"""natgwd under faults: killed (SIGKILL) at random moments in the middle of large changes; the
kernel keeps one whole state, old or new, and the restarted daemon converges to the file.

Every test builds its own lab (network namespaces with unique names, removed afterwards,
with every process started in them); traffic never leaves the lab. Measured figures are
printed (run with -s to see them); only generous bounds are asserted.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from natgwd.lab.topology import Lab
from natgwd.planning.layout import RULE_CONNECTIONS
from tests.integration.fault_helpers import (
    eip_addresses,
    event_time,
    expected_signature,
    kernel_signature,
    many_rules,
    net2_addresses,
)
from tests.integration.helpers import (
    UPSTREAM_PORT,
    assert_dnat_works,
    assert_snat_works,
    encode,
    events_named,
    sha256,
)


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
