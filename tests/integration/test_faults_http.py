"""natgwd under faults: its HTTP port flooded with slow, malformed and drip-fed clients, and
asked for what it does not serve.

Every test builds its own lab (network namespaces with unique names, removed afterwards,
with every process started in them); traffic never leaves the lab. Measured figures are
printed (run with -s to see them); only generous bounds are asserted.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natgwd.lab.topology import Lab, Natgwd
from natgwd.runtime.endpoints import MAX_CONCURRENT_REQUESTS
from tests.integration.fault_helpers import (
    THREAD_BOUND,
    fd_count,
    metrics_latency,
    seed,
    settled_fds,
    thread_count,
)
from tests.integration.helpers import (
    METRICS_PORT,
    readyz,
    wait_for,
)

RAW_HTTP = r"""
import json, socket, sys
port = int(sys.argv[1])
answers = []
for request in json.loads(sys.stdin.read()):
    c = socket.create_connection(("127.0.0.1", port), timeout=15)
    c.sendall(request.encode("latin-1"))
    data = b""
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as err:
        data += ("<%s>" % type(err).__name__).encode()
    c.close()
    head, _, body = data.partition(b"\r\n\r\n")
    answers.append([head.split(b"\r\n")[0].decode("latin-1"), head.decode("latin-1"), body[:200].decode("latin-1")])
print(json.dumps(answers))
"""


def raw_requests(lab: Lab, requests: list[str]) -> list[tuple[str, str, str]]:
    """Send each request on its own connection from inside the gateway; (status line,
    head, start of body) of each answer."""
    out = lab.exec("gw", sys.executable, "-c", RAW_HTTP, str(METRICS_PORT), stdin=json.dumps(requests)).stdout
    return [(a[0], a[1], a[2]) for a in json.loads(out)]


def test_http_serves_only_get_of_four_paths(lab: Lab) -> None:
    """Prevents: the metrics port answering anything but GET of /, /metrics, /healthz and
    /readyz (a typo'd probe looking healthy, a write method accepted)."""
    daemon = lab.start_natgwd(seed())
    daemon.wait_applied()
    served = ["/", "/metrics", "/healthz", "/readyz", "/metrics?x=1"]
    # (http.server turns a leading "//" into "/": //metrics is /metrics, not tested here.)
    unknown = ["/nope", "/metrics/", "/healthz/x", "/../metrics", "/METRICS", "/%2e%2e/", "*"]
    requests = [f"GET {p} HTTP/1.0\r\n\r\n" for p in served + unknown]
    methods = ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    requests += [f"{m} {p} HTTP/1.0\r\nContent-Length: 0\r\n\r\n" for m in methods for p in ("/metrics", "/", "/nope")]
    odd = ["TRACE", "CONNECT", "BREW", "get"]
    requests += [f"{m} /metrics HTTP/1.0\r\n\r\n" for m in odd]
    answers = raw_requests(lab, requests)
    statuses = [a[0].split(" ")[1] if a[0].count(" ") else a[0] for a in answers]
    by_request = dict(zip((r.split("\r\n")[0] for r in requests), statuses, strict=True))
    print("http surface:", by_request)
    for path, status in zip(served, statuses, strict=False):
        assert status == "200", (path, status)
    for path, status in zip(unknown, statuses[len(served) :], strict=False):
        assert status == "404", (path, status)
    start = len(served) + len(unknown)
    for (method, path), status, answer in zip(
        ((m, p) for m in methods for p in ("/metrics", "/", "/nope")), statuses[start:], answers[start:], strict=False
    ):
        assert status == "405", (method, path, status)
        assert "Allow: GET" in answer[1], answer
    for method, status, answer in zip(
        odd, statuses[start + 3 * len(methods) :], answers[start + 3 * len(methods) :], strict=True
    ):
        # http.server answers methods it has no handler for with 501 (RFC 9110 allows it).
        assert status in ("405", "501"), (method, status)
        assert "natgwd_" not in answer[2]
    assert daemon.process.poll() is None


SLOW_CLIENTS = r"""
import json, socket, sys, time
port, count, hold, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sockets, connected, refused = [], [], 0
for i in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metr")  # a partial request line, then nothing
        sockets.append(s)
        connected.append(time.monotonic())
    except OSError:
        refused += 1
open(out + ".ready", "w").close()
closed_after = {}
deadline = time.monotonic() + hold
for s in sockets:
    s.setblocking(False)
while time.monotonic() < deadline and len(closed_after) < len(sockets):
    for i, s in enumerate(sockets):
        if i in closed_after:
            continue
        try:
            if s.recv(4096) == b"":
                closed_after[i] = time.monotonic() - connected[i]
        except BlockingIOError:
            pass
        except OSError:
            closed_after[i] = time.monotonic() - connected[i]
    time.sleep(0.05)
for s in sockets:
    s.close()
times = sorted(closed_after.values())
json.dump({"opened": len(sockets), "refused_connect": refused, "closed_by_server": len(times),
           "closed_at_once": sum(1 for t in times if t < 1.5), "held": [round(t, 2) for t in times if t >= 1.5],
           "still_open_at_end": len(sockets) - len(times)}, open(out, "w"))
"""

MALFORMED = r"""
import collections, json, random, re, socket, sys, threading, time
port, count = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(3)
def garbage():
    return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 4096))).replace(b"\n", b"") + b"\r\n\r\n"
kinds = {
    "garbage": garbage,
    "100KB-request-line": lambda: b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    "200-headers": lambda: b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "100KB-header": lambda: b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
    "bad-version": lambda: b"GET /metrics HTTP/9.9\r\n\r\n",
    "no-version-junk": lambda: b"GET /metrics junk junk\r\n\r\n",
    "bare-method": lambda: b"GET\r\n\r\n",
    "nul-in-path": lambda: b"GET /met\x00rics HTTP/1.1\r\n\r\n",
    "header-without-colon": lambda: b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    "unknown-method": lambda: b"BREW /metrics HTTP/1.1\r\n\r\n",
    "binary-method": lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}
names = list(kinds)
results = collections.Counter()
lock = threading.Lock()
todo = list(range(count))
def worker():
    while True:
        with lock:
            if not todo:
                return
            i = todo.pop()
        name = names[i % len(names)]
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=15)
            c.sendall(kinds[name]())
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            c.close()
            line = data.split(b"\r\n", 1)[0].decode("latin-1")
            code = re.search(rb"Error code: (\d+)", data)
            if line.startswith("HTTP/"):
                status = line.split(" ")[1]
            elif code:  # http.server answers an HTTP/0.9-looking request with a bare error page
                status = code.group(1).decode() + "-bare"
            else:
                status = "closed" if not data else "no-status:" + line[:20]
        except socket.timeout:
            status = "timeout"
        except OSError as err:
            status = type(err).__name__
        with lock:
            results[name + " " + status] += 1
threads = [threading.Thread(target=worker) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""


@dataclass
class Flood:
    slow: dict[str, Any]
    probes_while_held: list[tuple[int, float]]
    max_threads: int
    max_fds: int


def slow_flood(lab: Lab, daemon: Natgwd, count: int, hold: float) -> Flood:
    """`count` connections that send a partial request line and stall, held up to `hold`
    seconds; /metrics is tried and natgwd's threads and fds are sampled meanwhile."""
    pid = daemon.process.pid
    out = lab.workdir / "slow.json"
    process = lab.spawn("gw", sys.executable, "-c", SLOW_CLIENTS, str(METRICS_PORT), str(count), str(hold), str(out))
    wait_for(lambda: Path(f"{out}.ready").exists(), "the slow clients connected", timeout=20)
    probes: list[tuple[int, float]] = []
    max_threads = max_fds = 0
    while process.poll() is None:
        max_threads, max_fds = max(max_threads, thread_count(pid)), max(max_fds, fd_count(pid))
        if len(probes) < 3:
            probes.append(metrics_latency(lab))
        time.sleep(0.2)
    return Flood(json.loads(out.read_text()), probes, max_threads, max_fds)


def test_http_survives_slow_and_malformed_clients(lab: Lab) -> None:
    """Prevents: slow or malformed clients on the metrics port costing unbounded threads
    or descriptors, hanging natgwd, or leaving it unable to answer afterwards."""
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    pid = daemon.process.pid
    fds, threads = settled_fds(daemon), thread_count(pid)
    print(f"http flood: baseline {threads} threads, {fds} fds")

    flood = slow_flood(lab, daemon, count=200, hold=14)
    print(
        f"http flood: 200 slow clients: {flood.slow}; /metrics meanwhile (status, s): {flood.probes_while_held}; "
        f"max {flood.max_threads} threads, {flood.max_fds} fds"
    )
    assert flood.slow["still_open_at_end"] == 0, "idle connections were not timed out"
    # One thread per connection being served, at most MAX_CONCURRENT_REQUESTS of them;
    # the others are closed at once.
    assert flood.max_threads <= threads + MAX_CONCURRENT_REQUESTS + 2

    results = json.loads(lab.exec("gw", sys.executable, "-c", MALFORMED, str(METRICS_PORT), "200", timeout=120).stdout)
    print(f"http flood: 200 malformed requests: {results}")
    assert sum(results.values()) == 200
    for outcome in results:
        kind, status = outcome.rsplit(" ", 1)
        if kind == "header-without-colon":
            continue  # http.server's header parser skips such a line and serves the GET
        # An error answer (4xx/5xx, with or without a status line), or the connection
        # closed (reset when natgwd closed it with the client's excess bytes unread);
        # never a hang, never a success.
        assert status in ("closed", "ConnectionResetError", "BrokenPipeError") or status[:1] in "45", outcome

    status, seconds = metrics_latency(lab)
    print(f"http flood: /metrics after the flood: {status} in {seconds * 1000:.0f} ms")
    assert status == 200  # answered (curl -m 10); how fast is a figure, not a verdict
    assert daemon.process.poll() is None
    assert thread_count(pid) < THREAD_BOUND
    after = wait_for(lambda: ((n := fd_count(pid)) <= fds and n) or None, f"fds back to {fds}", timeout=15)
    print(f"http flood: afterwards {thread_count(pid)} threads, {after} fds")
    assert readyz(daemon)[0] == 200


DRIP_FEED = r"""
import json, socket, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
attackers = []
for i in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"G")
        attackers.append(s)
    except OSError:
        pass
started, dripped, probes = time.monotonic(), 0.0, []
while time.monotonic() - started < seconds:
    if time.monotonic() - dripped >= 1:  # one more byte of an endless request line
        for s in list(attackers):
            try:
                s.sendall(b"E")
            except OSError:
                attackers.remove(s)
        dripped = time.monotonic()
    if time.monotonic() - started >= seconds / 2:  # long past any idle timeout
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=2)
            c.settimeout(2)
            c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            probes.append(c.recv(100).split(b"\r\n")[0].decode("latin-1") or "closed unanswered")
            c.close()
        except OSError as err:
            probes.append(type(err).__name__)
    time.sleep(0.3)
print(json.dumps({"attackers_still_connected": len(attackers), "probes": probes}))
"""


def test_probes_answer_during_a_drip_feed_attack(lab: Lab) -> None:
    """Prevents: a few slow connections to the (by default 0.0.0.0) metrics port taking
    down the liveness and readiness probes for as long as the attacker likes."""
    daemon = lab.start_natgwd(seed(), "--resync-interval", "3600")
    daemon.wait_applied()
    count = MAX_CONCURRENT_REQUESTS + 36
    out = lab.exec("gw", sys.executable, "-c", DRIP_FEED, str(METRICS_PORT), str(count), "8", timeout=60).stdout
    result = json.loads(out)
    print(f"drip feed, {count} connections: {result}")
    assert daemon.process.poll() is None
    assert result["probes"]
    assert all(" 200 " in probe for probe in result["probes"]), result["probes"]
