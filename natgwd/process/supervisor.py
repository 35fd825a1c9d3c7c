"""Child processes that natgwd runs and keeps running (keepalived, conntrackd, FRR's daemons).

Each child is restarted with exponential backoff when it exits or cannot be started, its
output goes line by line into natgwd's log, and its state (up, restarts, failed starts,
last exit) is there for /readyz and /metrics. A child gets SIGTERM when natgwd dies, even by
SIGKILL (PR_SET_PDEATHSIG), so a killed natgwd never leaves keepalived holding the
addresses without anyone watching.

PR_SET_PDEATHSIG is set by `setpriv --pdeathsig` (util-linux, essential in Debian), which
then execs the child: not by a preexec_fn, which would run Python (ctypes, dlopen) between
fork and exec in a multithreaded process, where a lock another thread held at the fork
can never be released. The signal follows the death of the thread that forked, not of
the process: children are forked only by the supervisor's own thread, which lives as long
as natgwd and survives whatever a request or a start meets (logged, counted, retried).
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("natgwd.process.supervisor")

BACKOFF_FIRST_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 30.0
STABLE_SECONDS = 30.0  # a child that ran this long starts over at the first backoff step
STOP_TIMEOUT_SECONDS = 5.0
DIE_WITH_NATGWD = ("setpriv", "--pdeathsig", "TERM", "--")


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    # Runs before every start: clears what a killed predecessor left (a lock file).
    prepare: Callable[[], None] | None = field(default=None, compare=False)
    # A different version is a different child: it replaces the running one.
    version: str = ""


@dataclass
class ChildStatus:
    up: bool = False
    up_since: float | None = None  # monotonic time of the running process's start
    pid: int | None = None
    restarts: int = 0
    start_failures: int = 0  # starts that failed (prepare or exec) and were retried later
    last_exit: int | None = None

    def exited(self, code: int | None) -> None:
        self.up, self.up_since, self.pid, self.last_exit = False, None, None, code


@dataclass
class Child:
    spec: ChildSpec
    on_exit: Callable[[str, int], None] | None = None
    status: ChildStatus = field(default_factory=ChildStatus)
    _process: subprocess.Popen[bytes] | None = None
    _started_at: float = 0.0
    _start_at: float = 0.0  # monotonic time of the next (re)start
    _backoff: float = BACKOFF_FIRST_SECONDS

    def start(self) -> None:
        try:
            if self.spec.prepare is not None:
                self.spec.prepare()
            # A session of its own: a terminal's Ctrl-C reaches natgwd, which then stops the
            # children in order, instead of reaching all of them at once.
            process = subprocess.Popen(
                [*DIE_WITH_NATGWD, *self.spec.argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except Exception as err:  # a stale file that cannot go, a missing binary: tried again
            self.status.start_failures += 1
            log.error(
                "cannot start child",
                process=self.spec.name,
                error=f"{type(err).__name__}: {err}",
                retry_in=round(self._backoff, 2),
            )
            self._schedule(time.monotonic())
            return
        self._process, self._started_at = process, time.monotonic()
        self.status.up, self.status.up_since, self.status.pid = True, self._started_at, process.pid
        log.info("child started", process=self.spec.name, pid=process.pid, argv=list(self.spec.argv))
        threading.Thread(
            target=self._forward, args=(process,), name=f"natgwd-{self.spec.name}-log", daemon=True
        ).start()

    def check(self, now: float) -> None:
        """Restart the child if it exited and its backoff has passed."""
        process = self._process
        if process is not None:
            code = process.poll()
            if code is None:
                if now - self._started_at >= STABLE_SECONDS:
                    self._backoff = BACKOFF_FIRST_SECONDS
                return
            self._process = None
            self.status.exited(code)
            log.error("child exited", process=self.spec.name, code=code, restart_in=round(self._backoff, 2))
            self._schedule(now)
            if self.on_exit is not None:
                self.on_exit(self.spec.name, code)
            return
        if now >= self._start_at:
            self.status.restarts += 1
            self.start()

    def _schedule(self, now: float) -> None:
        self._start_at = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_SECONDS)

    def signal(self, signum: int) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("child ignored SIGTERM; killing it", process=self.spec.name, pid=process.pid)
                process.kill()
                process.wait()
        self.status.exited(process.returncode)
        log.info("child stopped", process=self.spec.name, code=process.returncode)

    def _forward(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        with process.stdout:
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    log.info("child output", process=self.spec.name, pid=process.pid, line=line)


class Supervisor:
    """Runs children from one thread of its own (PR_SET_PDEATHSIG follows the thread that
    forked a child, so that thread must live as long as the children do: no exception
    ends it)."""

    TICK_SECONDS = 0.1

    def __init__(self) -> None:
        self.errors = 0  # requests and checks that raised (logged; supervision went on)
        self._children: dict[str, Child] = {}
        self._requests: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="natgwd-supervisor", daemon=True)
        self._thread.start()

    def run(self, spec: ChildSpec, on_exit: Callable[[str, int], None] | None = None) -> None:
        """Start `spec` (stopping a child of the same name with another spec first)."""

        def start() -> None:
            current = self._children.get(spec.name)
            if current is not None and current.spec == spec:
                return
            child = Child(spec, on_exit)
            # Kept from here on: whatever stopping the old one meets, the loop starts this one.
            self._children[spec.name] = child
            if current is not None:
                current.stop()
            child.start()

        self._submit(start)

    def remove(self, name: str) -> None:
        """Stop a child and forget it; returns once it is stopped."""
        done = threading.Event()

        def stop() -> None:
            child = self._children.pop(name, None)
            if child is not None:
                child.stop()
            done.set()

        self._submit(stop)
        done.wait(STOP_TIMEOUT_SECONDS * 2)

    def signal(self, name: str, signum: int) -> None:
        def send() -> None:
            child = self._children.get(name)
            if child is not None:
                child.signal(signum)

        self._submit(send)

    def statuses(self) -> dict[str, ChildStatus]:
        with self._lock:
            return {name: ChildStatus(**vars(child.status)) for name, child in self._children.items()}

    def stop(self) -> None:
        """Stop every child, in reverse order of start, and the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join()

    def _submit(self, request: Callable[[], None]) -> None:
        with self._lock:
            self._requests.append(request)
        self._wake.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                requests, self._requests = self._requests, []
                stopping = self._stopping
            for request in requests:
                self._guarded(request)
            if stopping:
                for child in reversed(list(self._children.values())):
                    self._guarded(child.stop)
                self._children.clear()
                return
            now = time.monotonic()
            for child in list(self._children.values()):
                self._guarded(functools.partial(child.check, now))
            self._wake.wait(self.TICK_SECONDS)
            self._wake.clear()

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            self.errors += 1
            log.exception("a supervisor step failed; supervising on")


def remove_stale(path: os.PathLike[str] | str) -> None:
    """Delete a file a killed child left behind (its lock or pid file). Only called while
    that child is not running, so the file cannot be a live one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
