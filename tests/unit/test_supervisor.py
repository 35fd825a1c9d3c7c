"""natgwd.process.supervisor under faults: a start that raises (its prepare meets a directory
where a stale file was, an exec fails) is logged, counted and retried with backoff, a
request or callback that raises is counted, and the supervisor's thread goes on, so the
children it forked keep running (PR_SET_PDEATHSIG follows that thread); and its children
still die with the process that supervises them, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from natgwd.process.supervisor import ChildSpec, Supervisor, remove_stale
from tests.integration.helpers import wait_for

SLEEPER = (sys.executable, "-c", "import time; time.sleep(600)")


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    made = Supervisor()
    try:
        yield made
    finally:
        made.stop()


def running(supervisor: Supervisor, name: str) -> int:
    def pid() -> int | None:
        status = supervisor.statuses().get(name)
        return status.pid if status is not None else None

    return wait_for(pid, f"{name} up", timeout=60)


def test_a_start_that_raises_is_retried_and_the_other_children_keep_running(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    supervisor.run(ChildSpec("sleeper", SLEEPER))
    sleeper = running(supervisor, "sleeper")
    stale = tmp_path / "stale.pid"
    stale.mkdir()  # remove_stale meets EISDIR until the directory is gone
    tries: list[None] = []

    def prepare() -> None:
        tries.append(None)
        remove_stale(stale)

    supervisor.run(ChildSpec("late", SLEEPER, prepare=prepare))
    wait_for(lambda: len(tries) >= 2, "the failed start to be tried again", timeout=60)
    assert supervisor.statuses()["late"].start_failures >= 1
    assert alive(sleeper), "the supervisor's thread ended: its children got their death signal"
    stale.rmdir()
    late = running(supervisor, "late")
    assert alive(late) and alive(sleeper)


def test_a_popen_that_raises_and_a_callback_that_raises_are_survived(supervisor: Supervisor) -> None:
    supervisor.run(ChildSpec("sleeper", SLEEPER))
    sleeper = running(supervisor, "sleeper")
    supervisor.run(ChildSpec("unexecutable", ("no\0such",)))  # Popen raises ValueError, not OSError

    calls: list[int] = []

    def raising(_name: str, code: int) -> None:
        calls.append(code)
        raise RuntimeError("a callback's bug")

    supervisor.run(ChildSpec("crasher", (sys.executable, "-c", "raise SystemExit(3)")), on_exit=raising)
    wait_for(lambda: len(calls) >= 2, "crasher restarted after its callback raised", timeout=60)
    assert supervisor.errors >= 1
    assert supervisor.statuses()["unexecutable"].start_failures >= 1
    assert alive(sleeper)


# Supervises a sleeper, writes its pid to the file named by argv[1], and waits to be killed.
SUPERVISING = f"""
import sys, time
from pathlib import Path
from natgwd.process.supervisor import ChildSpec, Supervisor
supervisor = Supervisor()
supervisor.run(ChildSpec("sleeper", {SLEEPER!r}))
while not (status := supervisor.statuses().get("sleeper")) or status.pid is None:
    time.sleep(0.01)
Path(sys.argv[1] + ".tmp").write_text(str(status.pid))
Path(sys.argv[1] + ".tmp").rename(sys.argv[1])
time.sleep(600)
"""


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    pid_file, output = tmp_path / "child.pid", tmp_path / "output"
    with output.open("wb") as out:
        # A session of its own: no signal another test sends its process group reaches it.
        parent = subprocess.Popen(
            [sys.executable, "-c", SUPERVISING, str(pid_file)], stdout=out, stderr=out, start_new_session=True
        )
    child = None
    try:
        wait_for(lambda: pid_file.exists() or parent.poll() is not None, "the supervised child's pid", timeout=60)
        assert pid_file.exists(), output.read_text()
        child = int(pid_file.read_text())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not alive(child), "the child to get SIGTERM when its supervisor died", timeout=60)
    finally:
        parent.kill()
        parent.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
