"""`natgwd top`: an exposition parsed, rates between two scrapes, the screen sorted."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from natgwd.cli import main
from natgwd.observability.top import parse, rates, render

SNAT = ("snat", "my-snat", "10.115.55.200")
DNAT = ("dnat", "dnat01", "10.115.55.200")


def exposition(snat_conns: int, snat_bytes: int, dnat_conns: int, dnat_bytes: int, entries: int) -> str:
    snat, dnat = 'kind="snat",name="my-snat",eip="10.115.55.200"', 'kind="dnat",name="dnat01",eip="10.115.55.200"'
    return "\n".join(
        (
            "# HELP natgwd_rule_connections_total x",
            f"natgwd_rule_connections_total{{{snat}}} {snat_conns}",
            f"natgwd_rule_connections_total{{{dnat}}} {dnat_conns}",
            f'natgwd_rule_packets_total{{{snat},direction="original"}} {snat_conns * 3}',
            f'natgwd_rule_packets_total{{{snat},direction="reply"}} {snat_conns * 2}',
            f'natgwd_rule_bytes_total{{{snat},direction="original"}} {snat_bytes}',
            f'natgwd_rule_bytes_total{{{dnat},direction="reply"}} {dnat_bytes}',
            f"natgwd_rule_open_connections{{{dnat}}} 7",
            f"natgwd_conntrack_entries {entries}",
            "natgwd_conntrack_entries_limit 262144",
            "natgwd_conntrack_insert_failed_total 4",
            'natgwd_eip_max_ports_per_destination{eip="10.115.55.200"} 321',
            'natgwd_eip_port_allocation_failures_total{eip="10.115.55.200"} 4',
            'natgwd_reconciles_total{result="applied"} 1.0',
        )
    )


def test_parse_adds_directions_up() -> None:
    scrape = parse(exposition(10, 1000, 1, 50, 5), at=1.0)
    assert scrape.packets[SNAT] == 50
    assert scrape.open == {DNAT: 7}
    assert scrape.gauges["natgwd_conntrack_entries"] == 5
    assert scrape.ports == {"10.115.55.200": 321}


def test_rates_over_the_interval_and_after_a_reset() -> None:
    before = parse(exposition(10, 1000, 100, 50, 5), at=1.0)
    after = parse(exposition(30, 5000, 3, 50, 5), at=3.0)
    by_rule = {row.rule: row for row in rates(before, after)}
    assert (by_rule[SNAT].connections, by_rule[SNAT].packets, by_rule[SNAT].bytes) == (10, 50, 2000)
    assert by_rule[DNAT].connections == 1.5  # went down: reset, counted from zero
    assert by_rule[DNAT].open == 7


def test_render_sorts_and_fits() -> None:
    before = parse(exposition(10, 1000, 1, 50, 5), at=1.0)
    after = parse(exposition(30, 5000, 3, 50, 26215), at=3.0)
    by_bytes = render(before, after, "bytes", 120, 40)
    assert "conntrack 26.2k/262.1k (10.0%)" in by_bytes[0]
    assert "321 ports of EIP 10.115.55.200" in by_bytes[1]
    assert by_bytes[4].startswith("snat  my-snat") and "16.0kb" in by_bytes[4]
    by_open = render(before, after, "open", 120, 40)
    assert by_open[4].startswith("dnat  dnat01")
    assert len(render(before, after, "open", 30, 5)) == 5
    assert all(len(line) <= 30 for line in render(before, after, "open", 30, 5))


@pytest.fixture
def metrics_address() -> Iterator[str]:
    """A loopback /metrics answering the exposition above."""

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition(10, 1000, 1, 50, 5).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_once_prints_a_screen_without_keys(metrics_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--once", "--interval", "0.01", "--metrics-address", metrics_address]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "sorted by bytes\n" in out
    assert "q quits" not in out
    assert "snat  my-snat" in out


def test_the_live_view_without_a_terminal_says_so(metrics_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--metrics-address", metrics_address]) == 1  # pytest's output is no terminal
    assert capsys.readouterr() == ("", "natgwd top: the live view needs a terminal (--once prints one screen)\n")


@pytest.mark.parametrize("once", [[], ["--once"]])
def test_without_a_daemon_one_line_on_stderr(once: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # bound, never listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        assert main(["top", *once, "--interval", "0.01", "--metrics-address", address]) == 1
    assert capsys.readouterr() == (
        "",
        f"natgwd top: cannot read http://{address}/metrics: connection refused "
        "(is natgwd running? --metrics-address)\n",
    )


def test_bgp_sessions_get_a_line() -> None:
    text = "\n".join(
        [
            'natgwd_bgp_neighbor_up{neighbor="10.115.55.254"} 1.0',
            'natgwd_bgp_prefixes_announced{neighbor="10.115.55.254"} 2.0',
            'natgwd_bgp_bfd_state{neighbor="10.115.55.254",state="up"} 1.0',
            'natgwd_bgp_bfd_state{neighbor="10.115.55.254",state="down"} 0.0',
            'natgwd_bgp_neighbor_up{neighbor="fd00:115::fe"} 0.0',
            "natgwd_bgp_unannounced_prefixes 2.0",
        ]
    )
    scrape = parse(text, at=1.0)
    lines = render(scrape, scrape, "open", 200, 40)
    assert lines[2] == (
        "BGP 10.115.55.254 up (2 announced, BFD up)   fd00:115::fe DOWN (0 announced)"
        "   2 owned EIP prefixes NOT announced"
    )
    assert not any(line.startswith("BGP") for line in render(parse("", 1.0), parse("", 2.0), "open", 200, 40))
