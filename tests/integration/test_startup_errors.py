"""`natgwd run` that cannot start says why in one line naming the value, logs an event, and
exits with the code of that cause, never with a traceback (issue 17, item 2).

natgwd runs in a network namespace of its own (`unshare --net`, loopback up), which
vanishes with it: were it to start after all, it would find nothing of the host's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from natgwd.runtime.startup import Exit

# In the fresh namespace: loopback up, optionally a listener holding a port, then natgwd.
# A natgwd that starts after all is stopped at the deadline and reported as still running.
_RUNNER = """
import json, socket, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
occupy, command = sys.argv[1], sys.argv[2:]
holder = None
if occupy:
    host, port = occupy.rsplit(":", 1)
    holder = socket.socket()
    holder.bind((host, int(port)))
    holder.listen()
try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    print(json.dumps({"code": done.returncode, "stderr": done.stderr}))
except subprocess.TimeoutExpired as expired:
    print(json.dumps({"code": None, "stderr": str(expired.stderr)}))
"""


def run_alone(
    tmp_path: Path, metrics_address: str, occupy: str = "", extra: tuple[str, ...] = ()
) -> tuple[int | None, list[str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace of its own)")
    state = tmp_path / "state.json"
    command = [
        sys.executable,
        "-m",
        "natgwd",
        "run",
        "--state",
        str(state),
        "--applied-state",
        "",
        "--metrics-address",
        metrics_address,
        *extra,
    ]
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", _RUNNER, occupy, *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result["code"], result["stderr"].splitlines()


@pytest.mark.parametrize(
    ("address", "occupy", "code", "line"),
    [
        ("9469", "", Exit.ADDRESS_SYNTAX, "natgwd: --metrics-address '9469' is not HOST:PORT (e.g. 127.0.0.1:9469)"),
        (
            "localhost:99999",
            "",
            Exit.ADDRESS_PORT,
            "natgwd: --metrics-address 'localhost:99999': port 99999 is not in 0-65535",
        ),
        (
            "127.0.0.1:9469",
            "127.0.0.1:9469",
            Exit.ADDRESS_IN_USE,
            "natgwd: cannot serve /metrics on 127.0.0.1:9469 (--metrics-address): "
            "the address is already in use (another process listens there)",
        ),
        (
            "192.0.2.1:9469",
            "",
            Exit.ADDRESS_NOT_HERE,
            "natgwd: cannot serve /metrics on 192.0.2.1:9469 (--metrics-address): "
            "no interface of this host has that address",
        ),
        (
            "ä" * 70 + ":9469",
            "",
            Exit.ADDRESS_UNKNOWN_HOST,
            f"natgwd: cannot serve /metrics on {'ä' * 70}:9469 (--metrics-address): "
            f"host {'ä' * 70!r} is not a valid host name",
        ),
    ],
    ids=["no-port", "port-out-of-range", "in-use", "not-on-this-host", "invalid-host-name"],
)
def test_startup_failure_is_one_line_a_log_event_and_its_own_exit_code(
    tmp_path: Path, address: str, occupy: str, code: Exit, line: str
) -> None:
    exit_code, stderr = run_alone(tmp_path, address, occupy)
    assert exit_code == code, stderr
    events = [json.loads(text) for text in stderr if text.startswith("{")]
    plain = [text for text in stderr if not text.startswith("{")]
    assert plain == [line]  # one line, and no traceback
    (failed,) = [event for event in events if event["event"] == "natgwd cannot start"]
    assert failed["level"] == "error"
    assert failed["exit_code"] == code
    assert failed["value"] in line
    assert failed["reason"] == line.removeprefix("natgwd: ")
    assert all(event["event"] != "natgwd started" for event in events)


def test_an_invalid_observability_option_is_one_line_and_its_own_exit_code(tmp_path: Path) -> None:
    extra = ("--no-connection-events", "--translation-log", "-")
    exit_code, stderr = run_alone(tmp_path, "127.0.0.1:0", extra=extra)
    assert exit_code == Exit.OBSERVE_OPTION, stderr
    plain = [text for text in stderr if not text.startswith("{")]
    assert plain == ["natgwd: --translation-log needs --connection-events"]
    events = [json.loads(text) for text in stderr if text.startswith("{")]
    (failed,) = [event for event in events if event["event"] == "natgwd cannot start"]
    assert (failed["exit_code"], failed["value"]) == (Exit.OBSERVE_OPTION, "--translation-log")


def test_exit_codes_are_distinct() -> None:
    assert len({int(code) for code in Exit}) == len(Exit)
    assert {0, 1, 2}.isdisjoint(int(code) for code in Exit)
