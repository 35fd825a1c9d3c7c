"""Generated valid states against the real kernel: the rendered script passes the dry run,
applies, and reads back as exactly the planned contents; planning again against what was
read back is an empty transaction (no flapping resyncs).

One helper process runs inside a fresh network namespace of its own and judges the states
the test sends it, one JSON line each, so the kernel work stays in that namespace.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from natgwd.lab.topology import SEED_STATE, run
from tests.unit.test_properties import valid_documents

HELPER = r"""
import json, sys
from natgwd.kernel.nft import KernelNft
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import plan_transaction
from natgwd.state.validation import load_state

nft = KernelNft()
for line in sys.stdin:
    result = {}
    try:
        state = load_state(line.encode())
        table = desired_table(state, assign_ids(state, {}))
        planned = table.contents()
        nft.delete_table()
        tx = plan_transaction(None, table)
        nft.check(tx)
        result["dry_run"] = "ok"
        nft.apply(tx)
        kernel = nft.read_table()
        result["equal"] = kernel == planned
        if kernel is not None and not result["equal"]:
            diff = {}
            for part in ("sets", "chains"):
                a, b = getattr(kernel, part), getattr(planned, part)
                diff[part] = {k: [repr(a.get(k)), repr(b.get(k))] for k in set(a) | set(b) if a.get(k) != b.get(k)}
            for name in set(kernel.elements) | set(planned.elements):
                a, b = kernel.elements.get(name, {}), planned.elements.get(name, {})
                if a != b:
                    diff[name] = {
                        "kernel_only": sorted(repr((k, e)) for k, e in a.items() if b.get(k) != e)[:5],
                        "planned_only": sorted(repr((k, e)) for k, e in b.items() if a.get(k) != e)[:5],
                    }
            result["diff"] = diff
        again = plan_transaction(kernel, table)
        result["second_plan"] = again.script()
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        try:
            nft.delete_table()
        except Exception as err:
            result["cleanup_error"] = str(err)
    print(json.dumps(result), flush=True)
"""


class KernelJudge:
    """The helper process in its namespace: send a document, get its verdict."""

    def __init__(self, namespace: str) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def judge(self, document: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(document) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the helper died (exit {self.process.poll()})"
        verdict: dict[str, Any] = json.loads(line)
        return verdict

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def judge() -> Iterator[KernelJudge]:
    from tests.conftest import _integration_unavailable

    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    namespace = "ngwrk" + secrets.token_hex(3)
    run(["ip", "netns", "add", namespace])
    helper = None
    try:
        helper = KernelJudge(namespace)
        yield helper
    finally:
        if helper is not None:
            helper.close()
        run(["ip", "netns", "del", namespace], check=False)


def assert_round_trip(verdict: dict[str, Any]) -> None:
    assert "error" not in verdict, verdict["error"]
    assert verdict["dry_run"] == "ok"
    assert verdict["equal"], json.dumps(verdict.get("diff"), indent=1)
    assert verdict["second_plan"] == "", f"planning against the kernel is not empty:\n{verdict['second_plan']}"
    assert "cleanup_error" not in verdict, verdict


def test_seed_state_round_trips_through_the_kernel(judge: KernelJudge) -> None:
    """Prevents: the seed's own script being refused by the kernel or read back differently."""
    assert_round_trip(judge.judge(SEED_STATE))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(document=valid_documents())
def test_generated_states_round_trip_through_the_kernel(judge: KernelJudge, document: dict[str, Any]) -> None:
    """Prevents: a valid state whose script the kernel refuses (natgwd would never become
    ready), or one that reads back differently from the plan, which would make every
    resync see drift and rewrite the table (flapping counters, needless transactions)."""
    assert_round_trip(judge.judge(document))


def test_a_scaled_out_state_round_trips_through_the_kernel(judge: KernelJudge) -> None:
    """Prevents: the hand-over chain (raw priority, fib with the mark, notrack) or its group
    maps being refused by the kernel or read back differently."""
    from tests.unit.test_scaleout_table import scaled

    assert_round_trip(judge.judge(scaled()))
