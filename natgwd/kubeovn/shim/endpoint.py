"""natgwd's edit endpoint: nat-gateway.sh calls over loopback TCP, so that a call costs a
bash process and a round trip instead of a Python start, a lock and a read, validation
and write of the whole state file.

A listener on 127.0.0.1 (its own threads) reads each request (natgwd.kubeovn.shim.protocol),
hands it to `submit` (which runs it on the daemon's reconciling thread and waits) and
writes the reply. Any local process can connect to loopback: at start the endpoint writes
a new random token and its port to a file only root can read (mode 0600), and a request
without that token is refused before its arguments are read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from natgwd.kubeovn.shim.call import Reply
from natgwd.kubeovn.shim.protocol import MAX_REQUEST_BYTES, Request, RequestError, encode_reply, parse_request

log = structlog.get_logger("natgwd.kubeovn.shim.endpoint")

READ_SECONDS = 5.0  # a request is a few hundred bytes: a client this slow is not a caller
MAX_CONNECTIONS = 128  # each waits for its turn on the reconciling thread


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


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    token: str
    submit: Callable[[Request], Reply]
    slots: threading.BoundedSemaphore


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(READ_SECONDS)
        if not self.server.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                self._reply(Reply(1, "", "natgwd: too many calls at once; try again\n"))
            self._drain(sock)
            return
        try:
            request = self._read(sock)
            if request is not None:
                self._reply(self.server.submit(request))
        except RequestError as err:
            log.warning("edit request refused", reason=str(err), peer=str(self.client_address))
            self._reply(Reply(1, "", f"natgwd: {err}\n"))
            self._drain(sock)
        except OSError:
            pass  # the caller went away or stalled: nobody to answer
        finally:
            self.server.slots.release()

    def _read(self, sock: socket.socket) -> Request | None:
        data = b""
        while (request := parse_request(data, self.server.token)) is None:
            chunk = sock.recv(64 * 1024)
            if not chunk:
                return None
            data += chunk
        return request

    def _drain(self, sock: socket.socket) -> None:
        """Read what the caller still sends (bounded) before closing: closing a socket with
        unread input resets the connection, and the caller could lose the reply."""
        with contextlib.suppress(OSError):  # the caller gone or stalled: closing is all that is left
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            left = MAX_REQUEST_BYTES
            while left > 0 and (chunk := sock.recv(64 * 1024)):
                left -= len(chunk)

    def _reply(self, reply: Reply) -> None:
        self.request.sendall(encode_reply(reply.code, reply.out, reply.err))


class EditEndpoint:
    def __init__(self, port: int, token_path: Path, submit: Callable[[Request], Reply]) -> None:
        self.token_path = token_path
        self._server = _Server(("127.0.0.1", port), _Handler, bind_and_activate=True)
        self._server.token = secrets.token_hex(32)
        self._server.submit = submit
        self._server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._server.serve_forever, name="natgwd-edits", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        write_token_file(self.token_path, self.port, self._server.token)
        log.info("edit endpoint listening", address=f"127.0.0.1:{self.port}", token_file=str(self.token_path))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
