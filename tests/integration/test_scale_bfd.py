"""The BFD gate of a scaled-out member: OVN (here FRR's bfdd on the router) routes to a
member only while its BFD session is up, and the session, answered by a bfdd standing in
for Kube-OVN's sidecar, is up only while natgwd is ready to forward as a member. Prevents
flows hashed to a member that would translate them without its state or its groups'
owners (natgwd not yet ready, keepalived or conntrackd down): resets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.lab.topology import Natgwd
from tests.integration.bfd_lab import Bfdd
from tests.integration.ha_lab import metric, pids_in
from tests.integration.helpers import wait_for
from tests.integration.scale_lab import LAN_ROUTER, ScaleLab, member_address, scale_state

GATE = "natgwd_scale_bfd_gate_open"


@pytest.fixture
def lab() -> Iterator[ScaleLab]:
    with ScaleLab(members=2) as built:
        yield built


def wrapped_engines(lab: ScaleLab) -> tuple[Path, dict[str, Path]]:
    """A directory for PATH with keepalived and conntrackd, each the real engine unless
    its `blocked` file exists (then it exits at once, as an engine that cannot start)."""
    directory = lab.workdir / "engines"
    directory.mkdir()
    blocked = {}
    for name in ("keepalived", "conntrackd"):
        real = shutil.which(name)
        assert real is not None, name
        blocked[name] = lab.workdir / f"{name}.blocked"
        wrapper = directory / name
        wrapper.write_text(f'#!/bin/sh\n[ -e "{blocked[name]}" ] && exit 1\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return directory, blocked


def engine_pids(lab: ScaleLab, role: str, name: str) -> list[int]:
    pids = []
    for pid in pids_in(lab, role):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(os.path.basename(arg) == name.encode() for arg in argv[:1]):
            pids.append(pid)
    return pids


def test_bfd_is_up_only_while_the_member_is_ready_to_forward(lab: ScaleLab) -> None:
    engines, blocked = wrapped_engines(lab)
    ovn = Bfdd(lab, "rtr", LAN_ROUTER, member_address(0))
    sidecar = Bfdd(lab, "m0", member_address(0), LAN_ROUTER)
    # No natgwd yet, nothing gates BFD: the engines' session comes up (the lab's BFD works).
    ovn.wait("up")

    # natgwd's first table holds the gate closed, and keepalived cannot start: not ready.
    blocked["keepalived"].touch()
    daemon = lab.start_member("m0", scale_state(2), env={"PATH": f"{engines}:{os.environ['PATH']}"})
    # Down on both sides, not Init: the gate drops BFD both ways.
    ovn.wait("down")
    sidecar.wait("down")
    wait_not_ready(daemon, "keepalived is not running")
    assert metric(daemon, GATE) == 0

    # keepalived runs, m0 owns both groups (the other member is away): ready, the gate opens.
    blocked["keepalived"].unlink()
    daemon.wait_ready(timeout=20)
    ovn.wait("up")
    wait_for(lambda: metric(daemon, GATE) == 1 or None, "the gate gauge at 1")

    # conntrackd dies and cannot start again: natgwd says not ready, the gate closes.
    blocked["conntrackd"].touch()
    for pid in engine_pids(lab, "m0", "conntrackd"):
        os.kill(pid, signal.SIGKILL)
    ovn.wait("down")
    wait_not_ready(daemon, "conntrackd is not running")
    # Closed for good: the supervisor's restarts of a conntrackd that exits at once never
    # open it (the gauge is set right after the kernel's gate, so it may lag BFD a moment).
    wait_for(lambda: metric(daemon, GATE) == 0 or None, "the gate gauge at 0")
    assert gate_elements(lab) == []

    # Back: open again.
    blocked["conntrackd"].unlink()
    ovn.wait("up", timeout=20)
    daemon.wait_ready(timeout=5)
    wait_for(lambda: metric(daemon, GATE) == 1 or None, "the gate gauge at 1")

    # natgwd's table deleted by hand: natgwd makes it again (drift repair), the gate closed
    # with it, then reads the gate back and opens it again.
    lab.exec("m0", "nft", "delete", "table", "inet", "natgwd")
    wait_for(lambda: gate_elements(lab) == ["net1"] or None, "the gate open again in the kernel", timeout=20)
    ovn.wait("up")
    assert metric(daemon, GATE) == 1


def wait_not_ready(daemon: Natgwd, reason: str) -> None:
    """/readyz says 503 for `reason` (between the supervisor's attempts to start the engine,
    which exits at once, it may count it as running for a moment)."""

    def said() -> bool:
        status, body = daemon.get("/readyz")
        return status == 503 and reason in body

    wait_for(lambda: said() or None, f"/readyz: {reason}")


def gate_elements(lab: ScaleLab) -> list[str] | None:
    """The BFD gate's set in m0's kernel (None: no table)."""
    result = lab.exec("m0", "nft", "-j", "list", "set", "inet", "natgwd", "bfd_open", check=False)
    if result.returncode != 0:
        return None
    return [e for obj in json.loads(result.stdout)["nftables"] for e in obj.get("set", {}).get("elem", [])]
