"""`natgwd top`: an exposition parsed, rates between two scrapes, the screen sorted."""

from __future__ import annotations

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
