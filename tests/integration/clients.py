"""The client programs integration tests run inside a namespace (helpers.client_command):

    clients.py http-probe HOST PORT INTERVAL LOG     a GET every INTERVAL s, each logged
    clients.py http-answers HOST PORT COUNT          COUNT GETs; their bodies as JSON
    clients.py echo tcp|udp HOST PORT LOG PERIOD TIMEOUT
                                                     one long-lived flow, every echo logged
    clients.py echoes tcp|udp HOST PORT LOG COUNT PERIOD TIMEOUT
                                                     COUNT such flows from one process,
                                                     flow i logging to LOG-i
    clients.py soak HOST PORT SECONDS OUT            an echo flow and a GET a second; JSON
    clients.py exchanges tcp|udp HOST PORT COUNT [TIMEOUT]
                                                     COUNT short exchanges, each on a new
                                                     connection or socket; JSON counts

They talk to natgwd.lab.servers: an HTTP GET gets a 200 whose body is the client address
the server saw; other TCP data and every datagram are echoed (datagrams with that address).
A fresh interpreter runs this file by path in the namespace: standard library only.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

OK = b"HTTP/1.1 200"


def http_get(host: str, port: int, timeout: float) -> bytes:
    """The whole answer to a GET / on a new connection (the server closes it)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data


def ok_body(answer: bytes) -> str:
    if not answer.startswith(OK):
        raise ValueError(repr(answer[:80]))
    return answer.split(b"\r\n\r\n", 1)[-1].decode()


def http_probe(host: str, port: int, interval: float, log_path: str) -> None:
    """Lines "TIME ok BODY" or "TIME fail ERROR", one a request, until killed."""
    with open(log_path, "a", buffering=1) as log:
        while True:
            started = time.time()
            try:
                log.write(f"{started:.3f} ok {ok_body(http_get(host, port, timeout=1))}\n")
            except Exception as err:
                log.write(f"{started:.3f} fail {type(err).__name__}\n")
            time.sleep(max(0.0, interval - (time.time() - started)))


def http_answers(host: str, port: int, count: int) -> None:
    """Prints the body of each of `count` GETs, '' for one that failed."""
    answers = []
    for _ in range(count):
        try:
            answers.append(http_get(host, port, timeout=2).split(b"\r\n\r\n", 1)[-1].decode())
        except OSError:
            answers.append("")
    print(json.dumps(answers))


def _address(conn: socket.socket) -> str:
    """The socket's own address as "ip:port"."""
    ip, port = conn.getsockname()[:2]
    return f"{ip}:{port}"


def echo_line(conn: socket.socket, n: int) -> None:
    """Sends line `n` and waits for it to come back unchanged."""
    message = b"ping %d\n" % n
    conn.sendall(message)
    got = b""
    while not got.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the peer")
        got += chunk
    if got != message:
        raise ValueError(f"echo {got!r} != {message!r}")


def echo_flow(proto: str, host: str, port: int, log_path: str, period: float, timeout: float) -> None:
    """One connection (TCP) or socket (UDP), never reopened, so that progress proves the
    flow itself survived: "connected IP:PORT" first, then "ok N TIME" for each echoed TCP
    line, or "ok N TIME ANSWER" for each answer to datagram N (one sent a period), until
    killed or "error ..." ends it. TIMEOUT bounds the connect and each wait for an echo."""
    with open(log_path, "a", buffering=1) as log:
        try:
            if proto == "tcp":
                conn = socket.create_connection((host, port), timeout=timeout)
            else:
                conn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                conn.connect((host, port))
            log.write(f"connected {_address(conn)}\n")
            n = 0
            while True:
                n += 1
                if proto == "tcp":
                    echo_line(conn, n)
                    log.write(f"ok {n} {time.monotonic():.4f}\n")
                    time.sleep(period)
                else:
                    _datagram_answers(conn, n, period, log)
        except Exception as err:
            log.write(f"error {type(err).__name__}: {err}\n")


def echo_flows(proto: str, host: str, port: int, log_prefix: str, count: int, period: float, timeout: float) -> None:
    """`count` echo flows at once, one thread each (many flows without an interpreter
    apiece), flow i logging to LOG_PREFIX-i as echo_flow does."""
    threads = [
        threading.Thread(target=echo_flow, args=(proto, host, port, f"{log_prefix}-{i}", period, timeout), daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _datagram_answers(conn: socket.socket, n: int, period: float, log: TextIO) -> None:
    conn.send(b"ping %d\n" % n)
    due = time.monotonic() + period
    while (left := due - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            got = conn.recv(4096)
        except TimeoutError:
            return
        log.write(f"ok {n} {time.monotonic():.4f} {got.decode()}\n")


def soak(host: str, port: int, seconds: float, out: str) -> None:
    """For `seconds`: one TCP connection echoing a line every 50 ms, and a new HTTP
    connection every second; then the counts and errors as JSON in `out`."""
    result: dict[str, Any] = {"echo_ok": 0, "echo_errors": [], "http_ok": 0, "http_errors": [], "echo_local": None}
    stop = time.monotonic() + seconds

    def failed(kind: str, err: Exception) -> None:
        result[kind].append(f"{time.time():.3f} {type(err).__name__}: {err}")

    def echo() -> None:
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                result["echo_local"] = _address(conn)
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    echo_line(conn, n)
                    result["echo_ok"] += 1
                    time.sleep(0.05)
        except Exception as err:
            failed("echo_errors", err)

    def http() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                ok_body(http_get(host, port, timeout=3))
                result["http_ok"] += 1
            except Exception as err:
                failed("http_errors", err)
            time.sleep(max(0.0, 1 - (time.monotonic() - started)))

    threads = [threading.Thread(target=echo), threading.Thread(target=http)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(out, "w") as file:
        json.dump(result, file)


def exchanges(proto: str, host: str, port: int, count: int, timeout: float = 2) -> None:
    """COUNT exchanges one after the other, each on a connection (a GET) or a UDP socket
    (one datagram) of its own, so each takes a new source port. Prints {"ok": N,
    "failures": {ERROR: N}}: a reset is ConnectionResetError, a lost answer TimeoutError."""
    ok, failures = 0, {}
    for _ in range(count):
        try:
            if proto == "tcp":
                ok_body(http_get(host, port, timeout=timeout))
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as conn:
                    conn.settimeout(timeout)
                    conn.sendto(b"ping", (host, port))
                    conn.recv(4096)
            ok += 1
        except Exception as err:
            failures[type(err).__name__] = failures.get(type(err).__name__, 0) + 1
    print(json.dumps({"ok": ok, "failures": failures}))


MODES: dict[str, Callable[[list[str]], None]] = {
    "exchanges": lambda a: exchanges(a[0], a[1], int(a[2]), int(a[3]), *map(float, a[4:5])),
    "http-probe": lambda a: http_probe(a[0], int(a[1]), float(a[2]), a[3]),
    "http-answers": lambda a: http_answers(a[0], int(a[1]), int(a[2])),
    "echo": lambda a: echo_flow(a[0], a[1], int(a[2]), a[3], float(a[4]), float(a[5])),
    "echoes": lambda a: echo_flows(a[0], a[1], int(a[2]), a[3], int(a[4]), float(a[5]), float(a[6])),
    "soak": lambda a: soak(a[0], int(a[1]), float(a[2]), a[3]),
}

if __name__ == "__main__":
    MODES[sys.argv[1]](sys.argv[2:])
