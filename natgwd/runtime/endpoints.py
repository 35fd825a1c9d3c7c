"""The HTTP endpoint: GET /metrics, /healthz, /readyz. Nothing else is served."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from natgwd.runtime.memory import release_freed_memory

log = structlog.get_logger("natgwd.http")

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


MAX_CONCURRENT_REQUESTS = 64
REQUEST_DEADLINE_SECONDS = 5.0  # to send a whole request line and headers


class _Gate:
    """At most MAX_CONCURRENT_REQUESTS connections are served at once, on every address
    natgwd listens on together. When all are taken, the connection that has been sending
    its request the longest is cut to make room: a client that trickles its request one
    byte at a time cannot hold the port, and a probe, which sends its request at once,
    always gets through."""

    def __init__(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        self._reading: dict[socket.socket, float] = {}  # connections still sending a request
        self._reading_lock = threading.Lock()
        threading.Thread(target=self._reap, name="natgwd-http-reaper", daemon=True).start()

    def enter(self) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        self._cut_slowest()
        return self._slots.acquire(timeout=1.0)

    def leave(self) -> None:
        self._slots.release()

    def reading(self, connection: socket.socket, still: bool) -> None:
        with self._reading_lock:
            if still:
                self._reading[connection] = time.monotonic()
            else:
                self._reading.pop(connection, None)

    def _reap(self) -> None:
        """Cut requests not complete within the deadline: the per-operation socket timeout
        does not stop a client that sends a byte every second."""
        while True:
            time.sleep(0.5)
            limit = time.monotonic() - REQUEST_DEADLINE_SECONDS
            with self._reading_lock:
                late = [connection for connection, since in self._reading.items() if since < limit]
            for connection in late:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _cut_slowest(self) -> None:
        with self._reading_lock:
            if not self._reading:
                return
            slowest = min(self._reading, key=self._reading.__getitem__)
        with contextlib.suppress(OSError):
            slowest.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    """One listening address; `device`: take only the connections that arrive on that
    interface (a pod address must not answer what reaches it through another interface)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], gate: _Gate, device: str | None
    ) -> None:
        self.gate = gate
        self.device = device
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.device is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
        # Not HTTPServer's: it looks the host's name up (socket.getfqdn), a reverse DNS query
        # that takes seconds where DNS does not answer, for a name no answer uses.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.gate.enter():
            self.shutdown_request(request)
            return
        self.gate.reading(request, True)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.reading(request, False)
            self.gate.leave()


class _Server6(_Server):
    address_family = socket.AF_INET6


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value admits gzip: "gzip" or "*", not weighted q=0."""
    for entry in accept_encoding.split(","):
        coding, *parameters = (part.strip().lower() for part in entry.split(";"))
        if coding in ("gzip", "x-gzip", "*"):
            weights = [parameter.removeprefix("q=") for parameter in parameters if parameter.startswith("q=")]
            try:
                return not weights or float(weights[0]) > 0
            except ValueError:
                return False
    return False


def gzipped(parts: Iterable[bytes]) -> list[bytes]:
    """One gzip stream of the parts, in parts. Each part is compressed on a helper thread
    while the next is being made (zlib lets go of the GIL): at 10,000 rules, compressing
    the rule counters takes about as long as making the rest."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: the gzip format
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="natgwd-gzip") as helper:  # one: in order
        pending = [helper.submit(compressor.compress, part) for part in parts]
        return [*(compressed.result() for compressed in pending), compressor.flush()]


class Endpoints:
    """/metrics, /healthz and /readyz, served on as many addresses as `listen` is given,
    sharing one bound on the connections served at once. `exposition` gives the body of
    /metrics in the Prometheus text format, in parts (sent one after the other: at 10,000
    rules they are 8 MB, not to be copied into one)."""

    def __init__(self, exposition: Callable[[], Iterable[bytes]], readiness: Readiness, liveness: Readiness) -> None:
        self._handler = _handler(exposition, readiness, liveness)
        self._gate: _Gate | None = None  # its reaper thread from the first listen on

    def listen(self, address: tuple[str, int], device: str | None = None) -> ThreadingHTTPServer:
        """Serve on `address` in a background thread until `close`. Raises what binding raises."""
        self._gate = self._gate or _Gate()
        kind = _Server6 if ":" in address[0] else _Server
        server = kind(address, self._handler, self._gate, device)
        threading.Thread(target=server.serve_forever, name="natgwd-http", daemon=True).start()
        return server


def close(server: ThreadingHTTPServer) -> None:
    """Stop listening (connections being served finish on their own threads)."""
    server.shutdown()
    server.server_close()


def _handler(
    exposition: Callable[[], Iterable[bytes]], readiness: Readiness, liveness: Readiness
) -> type[BaseHTTPRequestHandler]:

    class Handler(BaseHTTPRequestHandler):
        # A client that stalls mid-request holds one of the slots for at most this long per
        # socket operation.
        timeout = 3
        server_version = "natgwd"
        sys_version = ""

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # reads the headers too
            self.server.gate.reading(self.connection, False)  # type: ignore[attr-defined]
            return parsed

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if accepts_gzip(self.headers.get("Accept-Encoding", "")):
                    # 10,000 rules are 7.9 MB of text and 0.6 MB compressed (Prometheus asks).
                    self._send(200, CONTENT_TYPE_LATEST, *gzipped(exposition()), gzipped=True)
                else:
                    self._send(200, CONTENT_TYPE_LATEST, *exposition())
                # A scrape frees some 30 MB at 10,000 rules; given back after it was sent.
                release_freed_memory()
            elif path == "/":
                self._send(200, "text/plain; charset=utf-8", b"natgwd: /metrics /healthz /readyz\n")
            elif path == "/healthz":
                alive, detail = liveness()
                body = b"ok\n" if alive else json.dumps({"alive": False, **detail}).encode() + b"\n"
                self._send(200 if alive else 503, "text/plain; charset=utf-8", body)
            elif path == "/readyz":
                ready, detail = readiness()
                body = json.dumps({"ready": ready, **detail}, indent=1).encode() + b"\n"
                self._send(200 if ready else 503, "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")

        def _refuse(self) -> None:
            self._send(405, "text/plain; charset=utf-8", b"only GET is served\n", allow="GET")

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse  # noqa: N815

        def _send(
            self, status: int, content_type: str, *body: bytes, allow: str | None = None, gzipped: bool = False
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(sum(map(len, body))))
            if allow:
                self.send_header("Allow", allow)
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Vary", "Accept-Encoding")
            self.end_headers()
            for part in body:
                self.wfile.write(part)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http request", client=self.client_address[0], request=format % args)

    return Handler
