"""natgwd's edit endpoint: nat-gateway.sh calls over loopback TCP, so that a call costs a
bash process and a round trip instead of a Python start, a lock and a read, validation
and write of the whole state file.

A listener on ADDRESS, a loopback address of natgwd's own (its own threads), reads each
request (natgwd.kubeovn.shim.protocol), hands it to `submit` (which runs it on the daemon's
reconciling thread and waits) and writes the reply. Any local process can connect to
loopback: at start the endpoint writes a new random token and its port to a file only root
can read (mode 0600), and a request without that token is refused before its arguments
are read. A process without the token
can hold neither a thread nor a caller's place: see EditEndpoint.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from natgwd.kubeovn.shim.call import Reply
from natgwd.kubeovn.shim.protocol import MAX_REQUEST_BYTES, Request, RequestError, encode_reply, parse_request

log = structlog.get_logger("natgwd.kubeovn.shim.endpoint")

# natgwd's alone (all of 127.0.0.0/8 is loopback): its traffic is kept out of conntrack
# whatever the port (natgwd.planning.plan), so the rule stays the same when the port changes.
ADDRESS = "127.94.69.1"
REQUEST_SECONDS = 5.0  # from connecting to the last byte: a request is a few hundred bytes
MAX_READING = 256  # connections still sending their request; a new one cuts the oldest beyond it
WORKERS = 8  # threads that carry complete calls to the reconciling thread and answer them
MAX_QUEUED = 1024  # complete calls waiting for a worker
DRAIN_SECONDS = 1.0  # after a refusal, how long the rest of the request is read and dropped
SEND_SECONDS = 5.0  # for the caller to take the reply


def write_token_file(path: Path, port: int, token: str) -> None:
    """`PORT TOKEN`, readable by root alone, replaced atomically (a client reading it while
    natgwd restarts sees the old line or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and whatever a leftover temp file had
        os.write(fd, f"{port} {token}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class _Reading:
    """A connection whose request is not complete yet (or, `draining`, was refused)."""

    sock: socket.socket
    until: float  # monotonic deadline
    data: bytes = b""
    draining: bool = False
    left: int = MAX_REQUEST_BYTES  # while draining: bytes still read before closing


class EditEndpoint:
    """One thread reads every request without blocking, under a deadline for the whole
    request, so a caller that trickles its bytes costs a socket, not a thread, and is cut
    at the deadline; when too many connections are still sending, the oldest is cut (a
    real call sends its request at once). Complete, authenticated calls go to a few
    worker threads, which wait for the reconciling thread and write the reply."""

    def __init__(
        self,
        port: int,
        token_path: Path,
        submit: Callable[[Request], Reply],
        request_seconds: float = REQUEST_SECONDS,
    ) -> None:
        self.token_path = token_path
        self._submit = submit
        self._request_seconds = request_seconds
        self._token = secrets.token_hex(32)
        self._listener = socket.create_server((ADDRESS, port), backlog=socket.SOMAXCONN)
        self._listener.setblocking(False)
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._reading: dict[socket.socket, _Reading] = {}
        self._calls: queue.Queue[tuple[socket.socket, Request] | None] = queue.Queue()
        self._stopping = False
        self._reader = threading.Thread(target=self._read_all, name="natgwd-edits", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, name=f"natgwd-edits-{n}", daemon=True) for n in range(WORKERS)
        ]

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        self._reader.start()
        for worker in self._workers:
            worker.start()
        write_token_file(self.token_path, self.port, self._token)
        log.info("edit endpoint listening", address=f"{ADDRESS}:{self.port}", token_file=str(self.token_path))

    def stop(self) -> None:
        """Stop taking calls. Workers still waiting for the reconciling thread answer when
        it refuses its pending calls, then end."""
        self._stopping = True
        self._wake_write.send(b"x")
        self._reader.join()
        for _ in self._workers:
            self._calls.put(None)

    # --- the reading thread ----------------------------------------------------------------

    def _read_all(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._read_some()
                except Exception:  # the endpoint must outlive whatever one connection trips over
                    log.exception("edit endpoint: reading failed unexpectedly")
        finally:
            for reading in list(self._reading.values()):
                self._close(reading)
            self._selector.close()
            self._listener.close()
            self._wake_read.close()
            self._wake_write.close()

    def _read_some(self) -> None:
        now = time.monotonic()
        soonest = min((r.until for r in self._reading.values()), default=now + 1.0)
        for key, _ in self._selector.select(max(soonest - now, 0.0)):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is not self._wake_read:
                # None: cut earlier in this round (to make room for a new connection).
                reading = self._reading.get(key.fileobj)  # type: ignore[call-overload]
                if reading is not None:
                    self._read(reading)
        self._expire(time.monotonic())

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. out of file descriptors: the caller retries
                log.warning("edit endpoint cannot accept a connection", error=str(err))
                return
            if len(self._reading) >= MAX_READING:
                oldest = min(self._reading.values(), key=lambda r: r.until)
                log.warning("edit request cut: too many connections still sending", waited_for=self._request_seconds)
                self._close(oldest)
            sock.setblocking(False)
            reading = _Reading(sock, time.monotonic() + self._request_seconds)
            self._reading[sock] = reading
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, reading: _Reading) -> None:
        try:
            chunk = reading.sock.recv(64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if reading.draining:
            reading.left -= len(chunk)
            if not chunk or reading.left <= 0:
                self._close(reading)
            return
        if not chunk:  # the caller went away
            self._close(reading)
            return
        reading.data += chunk
        try:
            request = parse_request(reading.data, self._token)
        except RequestError as err:
            log.warning("edit request refused", reason=str(err))
            self._refuse(reading, f"natgwd: {err}\n")
            return
        if request is None:
            return
        if self._calls.qsize() >= MAX_QUEUED:
            self._refuse(reading, "natgwd: too many calls at once; try again\n")
            return
        self._selector.unregister(reading.sock)
        del self._reading[reading.sock]
        self._calls.put((reading.sock, request))

    def _refuse(self, reading: _Reading, message: str) -> None:
        """Answer, then read what the caller still sends (bounded) before closing: closing
        a socket with unread input resets the connection, and the caller could lose the
        reply. The reply is small: it fits the socket's buffer, so it is sent at once."""
        with contextlib.suppress(OSError):
            reading.sock.send(encode_reply(1, "", message))
            reading.sock.shutdown(socket.SHUT_WR)
        reading.draining = True
        reading.until = time.monotonic() + DRAIN_SECONDS

    def _expire(self, now: float) -> None:
        for reading in [r for r in self._reading.values() if r.until <= now]:
            if not reading.draining:
                log.warning("edit request cut: not complete in time", seconds=self._request_seconds)
                with contextlib.suppress(OSError):
                    reading.sock.send(encode_reply(1, "", "natgwd: request not complete in time\n"))
            self._close(reading)

    def _close(self, reading: _Reading) -> None:
        self._reading.pop(reading.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(reading.sock)
        reading.sock.close()

    # --- the workers -----------------------------------------------------------------------

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            sock, request = call
            with sock:
                try:
                    reply = self._submit(request)
                except Exception as err:  # a worker lost would be a call slot lost for good
                    log.exception("edit call failed unexpectedly")
                    reply = Reply(1, "", f"natgwd: the call failed: {type(err).__name__}\n")
                with contextlib.suppress(OSError):  # the caller went away or stalled: nobody to answer
                    sock.setblocking(True)
                    sock.settimeout(SEND_SECONDS)
                    sock.sendall(encode_reply(reply.code, reply.out, reply.err))
