"""natgwd.kernel.tc against the kernel over a sequence of random QoS states: every transition
leaves exactly the planned classes and filters (read back with `tc`), applying the same
state again changes nothing, and removal leaves nothing. Runs in a namespace of its own
with one veth pair; no traffic."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.qos.plan import tree, wants
from natgwd.state.validation import InvalidStateError, load_state

STATES = 25
WORKER = """
import json, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for results
from natgwd.kernel.tc import KernelTc
from natgwd.qos.plan import wants
from natgwd.state.validation import load_state
shaper = KernelTc()
out = []
for raw in json.load(open(sys.argv[1])):
    planned = wants(load_state(raw.encode()))
    first = shaper.apply(planned)
    again = shaper.apply(planned)
    out.append({"errors": first.errors + again.errors, "again": again.changes})
    print(json.dumps(out[-1]), flush=True)
    input()  # the test reads the kernel, then lets the next state go
print(json.dumps({"removed": shaper.remove_all().changes}), flush=True)
"""


def random_state(rng: random.Random) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    state["eips"] += [{"name": f"e{i}", "v4ip": f"10.115.50.{i + 1}"} for i in range(rng.randint(0, 30))]
    policies = []
    for p in range(rng.randint(0, 4)):
        rules = [
            {"name": d, "direction": d, "rateMax": str(rng.choice([0.5, 1, 2.5, 10, 100, 1000])), "burstMax": b}
            for d in ("ingress", "egress")
            if rng.random() < 0.7
            for b in [rng.choice([0, "0.25", 1, 8])]
        ]
        policies.append({"name": f"p{p}", "bindingType": "EIP", "bandwidthLimitRules": rules})
    for eip in state["eips"]:
        if policies and rng.random() < 0.6:
            eip["qosPolicy"] = rng.choice(policies)["name"]
    gateway_rules = []
    for r in range(rng.randint(0, 4)):
        rule = {"name": f"g{r}", "direction": rng.choice(["ingress", "egress"]), "rateMax": str(rng.randint(1, 500))}
        if rng.random() < 0.8:
            rule["matchValue"] = f"{rng.choice(['src', 'dst'])} 10.{rng.randint(0, 255)}.0.0/{rng.choice([16, 24])}"
            rule["matchValue"] = rule["matchValue"].replace(".0.0/24", f".{rng.randint(0, 255)}.0/24")
            rule["priority"] = r
        gateway_rules.append(rule)
    if gateway_rules:
        policies.append({"name": "gw", "bindingType": "NATGW", "bandwidthLimitRules": gateway_rules})
        state["qosPolicy"] = "gw"
    state["qosPolicies"] = policies
    return state


def valid_states(seed: int) -> list[str]:
    rng = random.Random(seed)
    found = []
    while len(found) < STATES:
        raw = json.dumps(random_state(rng))
        try:
            load_state(raw.encode())
        except InvalidStateError:
            continue  # two NIC-wide rules in one direction and the like: refused, as they should be
        found.append(raw)
    return found


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[str]:
    name = f"ngwq{random.getrandbits(24):06x}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "net2", "type", "veth", "peer", "name", "peer"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "net2", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_namespace(namespace: str, *command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True).stdout


def kernel_tree(namespace: str, device: str) -> tuple[set[str], int]:
    """Class ids (without the default) and the number of filters natgwd's tree has."""
    classes = in_namespace(namespace, "tc", "class", "show", "dev", device)
    filters = in_namespace(namespace, "tc", "filter", "show", "dev", device, "parent", "4e47:")
    ids = {line.split()[2] for line in classes.splitlines() if line.startswith("class htb")} - {"4e47:fffe"}
    return ids, sum("flowid" in line for line in filters.splitlines())


@pytest.mark.parametrize("seed", [1, 2])
def test_random_states_round_trip_through_the_kernel(namespace: str, tmp_path: Path, seed: int) -> None:
    states = valid_states(seed)
    (tmp_path / "states.json").write_text(json.dumps(states))
    worker = start_worker(namespace, WORKER, str(tmp_path / "states.json"))
    assert worker.stdin is not None and worker.stdout is not None
    try:
        for raw in states:
            result = json.loads(worker.stdout.readline())
            assert result == {"errors": [], "again": []}, raw
            planned = wants(load_state(raw.encode()))
            for direction, device in (("egress", "net2"), ("ingress", "ifb-net2")):
                wanted = planned.by_direction[direction]
                expected = tree(direction, wanted, {}) if wanted else None
                ids, filters = kernel_tree(namespace, device) if wanted else (set(), 0)
                assert len(ids) == (len(wanted) if expected else 0), (direction, raw)
                assert filters == (len(expected.filters) if expected else 0), (direction, raw)
            worker.stdin.write("\n")
            worker.stdin.flush()
        json.loads(worker.stdout.readline())  # removed
        worker.wait(30)
    finally:
        worker.kill()
        worker.wait()
    qdiscs = in_namespace(namespace, "tc", "qdisc", "show")
    assert all(line.startswith("qdisc noqueue") for line in qdiscs.splitlines()), qdiscs
    assert in_namespace(namespace, "ip", "-br", "link", "show", "type", "ifb") == ""


DRIFT_WORKER = """
import json, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from natgwd.kernel.tc import KernelTc
from natgwd.qos.plan import wants
from natgwd.state.validation import load_state
shaper = KernelTc()
planned = wants(load_state(open(sys.argv[1], "rb").read()))
for _ in sys.stdin:
    report = shaper.apply(planned)
    print(json.dumps(report.changes + report.errors), flush=True)
"""


def listing(namespace: str, device: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The tree's classes (their leaf qdiscs aside) and each filter's class and match (their
    handles aside: a filter added again may get another)."""
    classes = in_namespace(namespace, "tc", "class", "show", "dev", device).splitlines()
    lines = in_namespace(namespace, "tc", "filter", "show", "dev", device, "parent", "4e47:").splitlines()
    filters = []
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if "flowid" in line:
            filters.append((line.split("flowid ")[1].split()[0], following.strip()))
    return sorted(" ".join(w for w in c.split() if ":" not in w or w.startswith("4e47:")) for c in classes), sorted(
        filters
    )


def test_drift_behind_natgwds_back_is_repaired_after_resyncs_that_found_nothing(namespace: str, tmp_path: Path) -> None:
    """Guards against a resync trusting a tree it verified before: a filter sent to another
    class, a filter deleted, a stray filter and a class's rate, each changed with `tc`
    (the classes untouched for the filters), are repaired by the next resync."""
    state: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    state["eips"] += [{"name": f"e{i}", "v4ip": f"10.115.50.{i}", "qosPolicy": "p"} for i in range(1, 6)]
    rules = [{"name": d, "direction": d, "rateMax": "10"} for d in ("ingress", "egress")]
    state["qosPolicies"] = [{"name": "p", "bindingType": "EIP", "bandwidthLimitRules": rules}]
    (tmp_path / "state.json").write_text(json.dumps(state))
    worker = start_worker(namespace, DRIFT_WORKER, str(tmp_path / "state.json"))
    assert worker.stdin is not None and worker.stdout is not None

    def resync() -> list[str]:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write("\n")
        worker.stdin.flush()
        changes: list[str] = json.loads(worker.stdout.readline())
        return changes

    def tc(*command: str) -> None:
        subprocess.run(["ip", "netns", "exec", namespace, "tc", *command], check=True)

    try:
        assert resync()  # the trees built
        assert resync() == []  # read and verified
        assert resync() == []  # as verified
        shaped = {device: listing(namespace, device) for device in ("net2", "ifb-net2")}
        match = ("match", "ip", "src", "10.115.50.2/32")
        drifts = [
            (("filter", "replace", "dev", "net2", "parent", "4e47:", "protocol", "ip", "prio", "100", "handle",
              "4e4:2:800", "u32", "ht", "4e4:2:", *match, "flowid", "4e47:fffe"), ["delete filter", "add filter"]),
            (("filter", "del", "dev", "net2", "parent", "4e47:", "protocol", "ip", "prio", "100", "handle",
              "4e4:3:800", "u32"), ["add filter"]),
            (("filter", "add", "dev", "net2", "parent", "4e47:", "protocol", "ip", "prio", "300", "u32", *match,
              "flowid", "4e47:fffe"), ["delete filter"]),
            (("class", "change", "dev", "ifb-net2", "parent", "4e47:", "classid", "4e47:fffe", "htb", "rate",
              "1mbit"), ["change class"]),
        ]  # fmt: skip
        for command, repairs in drifts:
            tc(*command)
            assert [" ".join(c.split()[:2]) for c in resync()] == repairs, command
            assert {device: listing(namespace, device) for device in shaped} == shaped, command
            assert resync() == [], command
            assert resync() == [], command
    finally:
        worker.kill()
        worker.wait()


def start_worker(namespace: str, script: str, argument: str) -> subprocess.Popen[str]:
    """A Python worker in the namespace, told what to do line by line on its stdin."""
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", script, argument],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
