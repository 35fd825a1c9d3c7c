"""natgwd.runtime.endpoints: /metrics compressed for clients that ask (on loopback, port 0)."""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Iterator

import pytest

from natgwd.runtime.endpoints import Endpoints, accepts_gzip, close

BODY = b'natgwd_rule_connections_total{kind="dnat",name="d",eip="10.0.0.1"} 5\n' * 1000


@pytest.fixture
def port() -> Iterator[int]:
    # In parts made as they are taken, as the daemon gives it.
    endpoints = Endpoints(lambda: iter((BODY[:1000], b"", BODY[1000:])), lambda: (True, {}), lambda: (True, {}))
    server = endpoints.listen(("127.0.0.1", 0))
    try:
        yield server.server_address[1]
    finally:
        close(server)


def get(port: int, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def test_metrics_are_gzipped_when_the_client_accepts_it(port: int) -> None:
    response, body = get(port, {"Accept-Encoding": "gzip"})
    assert response.status == 200
    assert response.getheader("Content-Encoding") == "gzip"
    assert response.getheader("Vary") == "Accept-Encoding"
    assert int(response.getheader("Content-Length") or 0) == len(body) < len(BODY) // 10
    assert gzip.decompress(body) == BODY


def test_metrics_are_plain_otherwise(port: int) -> None:
    response, body = get(port, {"Accept-Encoding": "identity"})
    assert response.getheader("Content-Encoding") is None
    assert body == BODY


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("GZIP", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0", False),
        ("br, deflate", False),
        ("", False),
        ("gzip;q=x", False),
    ],
)
def test_accept_encoding(header: str, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


def test_an_ipv6_address_is_served() -> None:
    """Guards against the pod's IPv6 address (or an explicit one) failing to bind: the
    HTTP server's socket family follows the address."""
    endpoints = Endpoints(lambda: iter((BODY,)), lambda: (True, {}), lambda: (True, {}))
    server = endpoints.listen(("::1", 0))
    try:
        connection = http.client.HTTPConnection("::1", server.server_address[1], timeout=5)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b"ok\n"
        connection.close()
    finally:
        close(server)
