"""One natgwd per network namespace: two would rewrite each other's table and addresses
for ever, each "repairing" the other's drift.

The claim is an abstract Unix socket named after natgwd's table. Abstract names belong to
the network namespace (not to a file system, which differs per container or per run), so
a natgwd anywhere in the same namespace finds it, one in another namespace does not; and
the kernel lets go of it when its process ends, however it ends (no stale lock). A second
natgwd connects to it and is told who holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading

import structlog

from natgwd.planning.table import FAMILY, TABLE

log = structlog.get_logger("natgwd.runtime.instance")

NAME = f"natgwd/{FAMILY}/{TABLE}"
ASK_SECONDS = 2.0
MAX_ANSWER_BYTES = 4096


class AlreadyRunningError(Exception):
    """Another natgwd holds the namespace; the message names it."""


class Claim:
    """Holds the namespace while the process lives (or until `release`), and answers
    whoever asks who holds it."""

    def __init__(self, state: str, metrics: str, name: str = NAME) -> None:
        self._answer = json.dumps({"pid": os.getpid(), "state": state, "metrics": metrics}).encode()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.bind("\0" + name)
        except OSError:
            self._socket.close()
            raise AlreadyRunningError(f"another natgwd runs in this network namespace ({_ask(name)})") from None
        self._socket.listen(8)
        self._answerer = threading.Thread(target=self._answer_all, name="natgwd-claim", daemon=True)
        self._answerer.start()

    def _answer_all(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # released
            with connection, contextlib.suppress(OSError):
                connection.settimeout(ASK_SECONDS)
                connection.sendall(self._answer)

    def release(self) -> None:
        """Frees the name before returning. The answering thread's pending accept holds the
        socket in the kernel until it returns, so the name would outlive `close` by a moment
        (a claim right after was refused, once in a CI run): shutdown wakes it, and it is
        waited for before the close."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._answerer.join(timeout=ASK_SECONDS)
        self._socket.close()


def _ask(name: str) -> str:
    """Who holds `name`, as far as it can be told: the kernel's record of the listening
    process (its pid in this pid namespace; 0 when it is not visible here), and the state
    file and metrics address it answers with."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(ASK_SECONDS)
        try:
            sock.connect("\0" + name)
        except OSError as err:
            return f"it could not be asked who it is: {err.strerror or err}"
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        data = b""
        with contextlib.suppress(OSError):
            while len(data) < MAX_ANSWER_BYTES and (chunk := sock.recv(MAX_ANSWER_BYTES)):
                data += chunk
    try:
        answer = json.loads(data)
        own_pid, state, metrics = int(answer["pid"]), str(answer["state"]), str(answer["metrics"])
    except (ValueError, TypeError, KeyError):
        return f"pid {pid}" if pid else "a process in another pid namespace"
    where = f"pid {pid}" if pid else f"pid {own_pid} in another pid namespace"
    return f"{where}, --state {state}, metrics on {metrics}"
