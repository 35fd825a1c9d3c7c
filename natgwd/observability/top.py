"""`natgwd top`: the gateway's rules by connections, packets and bytes per second, with
open connections and conntrack pressure, refreshed live from natgwd's own /metrics (for
the operator who runs iftop today). Keys: c, p, b, o sort by connections/s, packets/s,
bytes/s, open connections; q quits.
"""

from __future__ import annotations

import argparse
import curses
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^(natgwd_[a-z_]+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SORTS = {"c": "connections", "p": "packets", "b": "bytes", "o": "open"}
SORT_HELP = "c: connections/s, p: packets/s, b: bytes/s, o: open connections"
_BGP = {
    "natgwd_bgp_neighbor_up": "up",
    "natgwd_bgp_prefixes_announced": "announced",
    "natgwd_bgp_bfd_state": "bfd_up",
}

Rule = tuple[str, str, str]  # kind, name, EIP


@dataclass
class Scrape:
    at: float
    connections: dict[Rule, float] = field(default_factory=dict)
    packets: dict[Rule, float] = field(default_factory=dict)  # both directions
    octets: dict[Rule, float] = field(default_factory=dict)
    open: dict[Rule, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)  # unlabelled samples (pressure)
    ports: dict[str, float] = field(default_factory=dict)  # EIP -> ports towards busiest destination
    failures: dict[str, float] = field(default_factory=dict)  # EIP -> port allocation failures
    bgp: dict[str, dict[str, float]] = field(default_factory=dict)  # neighbour -> up, announced, bfd_up


def parse(text: str, at: float) -> Scrape:
    scrape = Scrape(at)
    per_rule = {
        "natgwd_rule_connections_total": scrape.connections,
        "natgwd_rule_packets_total": scrape.packets,
        "natgwd_rule_bytes_total": scrape.octets,
        "natgwd_rule_open_connections": scrape.open,
    }
    per_eip = {
        "natgwd_eip_max_ports_per_destination": scrape.ports,
        "natgwd_eip_port_allocation_failures_total": scrape.failures,
    }
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels_text, number = match.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        value = float(number)
        if name in per_rule:
            rule = (labels.get("kind", ""), labels.get("name", ""), labels.get("eip", ""))
            target = per_rule[name]
            target[rule] = target.get(rule, 0.0) + value  # directions added up
        elif name in per_eip:
            per_eip[name][labels.get("eip", "")] = value
        elif name in _BGP and "neighbor" in labels and labels.get("state", "up") == "up":
            scrape.bgp.setdefault(labels["neighbor"], {})[_BGP[name]] = value
        elif not labels:
            scrape.gauges[name] = value
    return scrape


@dataclass(frozen=True)
class Row:
    rule: Rule
    connections: float  # per second
    packets: float
    bytes: float
    open: float


def rates(before: Scrape, after: Scrape) -> list[Row]:
    seconds = max(after.at - before.at, 1e-9)

    def rate(now: dict[Rule, float], then: dict[Rule, float], rule: Rule) -> float:
        # A counter that went down was reset (the rule re-created): count from zero.
        current, previous = now.get(rule, 0.0), then.get(rule, 0.0)
        return (current - previous if current >= previous else current) / seconds

    rules = after.connections.keys() | after.open.keys()
    return [
        Row(
            rule,
            rate(after.connections, before.connections, rule),
            rate(after.packets, before.packets, rule),
            rate(after.octets, before.octets, rule),
            after.open.get(rule, 0.0),
        )
        for rule in rules
    ]


def _si(value: float, unit: str = "") -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def render(before: Scrape, after: Scrape, sort: str, width: int, height: int, live: bool = True) -> list[str]:
    """The screen's lines: pressure, then the rules sorted by `sort` (a SORTS value); `live`
    names the keys (a screen printed once takes none)."""
    gauges = after.gauges
    entries, limit = gauges.get("natgwd_conntrack_entries", 0.0), gauges.get("natgwd_conntrack_entries_limit", 0.0)
    fill = f"{100 * entries / limit:.1f}%" if limit else "-"
    seconds = max(after.at - before.at, 1e-9)

    def per_second(name: str) -> str:
        return _si(max(0.0, gauges.get(name, 0.0) - before.gauges.get(name, 0.0)) / seconds)

    busiest = max(after.ports.items(), key=lambda item: item[1], default=("-", 0.0))
    lines = [
        f"natgwd top   conntrack {_si(entries)}/{_si(limit)} ({fill})   "
        f"insert_failed/s {per_second('natgwd_conntrack_insert_failed_total')}   "
        f"drop/s {per_second('natgwd_conntrack_drop_total')}   "
        f"early_drop/s {per_second('natgwd_conntrack_early_drop_total')}",
        f"busiest SNAT destination: {_si(busiest[1])} ports of EIP {busiest[0]}   "
        f"port allocation failures: {_si(sum(after.failures.values()))}   "
        f"sorted by {sort}" + (" (c p b o, q quits)" if live else ""),
        *_bgp_lines(after),
        "",
        f"{'KIND':<5} {'NAME':<28} {'EIP':<16} {'CONN/S':>8} {'PKT/S':>8} {'BIT/S':>9} {'OPEN':>8}",
    ]
    rows = sorted(rates(before, after), key=lambda row: (-getattr(row, sort), row.rule))
    for row in rows[: max(0, height - len(lines))]:
        kind, name, eip = row.rule
        lines.append(
            f"{kind:<5} {name[:28]:<28} {eip:<16} {_si(row.connections):>8} {_si(row.packets):>8} "
            f"{_si(row.bytes * 8, 'b'):>9} {_si(row.open):>8}"
        )
    return [line[:width] for line in lines]


def _bgp_lines(scrape: Scrape) -> list[str]:
    """One line for the routed EIPs' sessions, when natgwd announces over BGP."""
    if not scrape.bgp:
        return []
    parts = []
    for neighbor, values in sorted(scrape.bgp.items()):
        text = f"{neighbor} {'up' if values.get('up') else 'DOWN'} ({_si(values.get('announced', 0.0))} announced"
        if "bfd_up" in values:
            text += f", BFD {'up' if values['bfd_up'] else 'down'}"
        parts.append(text + ")")
    missing = scrape.gauges.get("natgwd_bgp_unannounced_prefixes", 0.0)
    return ["BGP " + "   ".join(parts) + (f"   {_si(missing)} owned EIP prefixes NOT announced" if missing else "")]


def fetch(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return parse(answer.read().decode(), time.monotonic())


def _live(screen: curses.window, url: str, interval: float, sort: str, first: Scrape) -> None:
    curses.curs_set(0)
    screen.timeout(100)
    before = after = first
    due = time.monotonic() + interval
    while True:
        if time.monotonic() >= due:
            before, after = after, fetch(url)
            due = time.monotonic() + interval
        height, width = screen.getmaxyx()
        screen.erase()
        for y, line in enumerate(render(before, after, sort, width - 1, height)):
            screen.addstr(y, 0, line)
        screen.refresh()
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key > 0 and chr(key) in SORTS:
            sort = SORTS[chr(key)]


def run(args: argparse.Namespace) -> int:
    url = f"http://{args.metrics_address}/metrics"
    try:
        # The first scrape before the screen is taken: a daemon not there is one line.
        first = fetch(url)
        if args.once:
            time.sleep(args.interval)
            print("\n".join(render(first, fetch(url), SORTS[args.sort], 200, 10_000, live=False)))
        elif not sys.stdin.isatty() or not sys.stdout.isatty():
            print("natgwd top: the live view needs a terminal (--once prints one screen)", file=sys.stderr)
            return 1
        else:
            curses.wrapper(_live, url, args.interval, SORTS[args.sort], first)
    except OSError as err:
        print(f"natgwd top: cannot read {url}: {_reason(err)} (is natgwd running? --metrics-address)", file=sys.stderr)
        return 1
    return 0


def _reason(err: OSError) -> str:
    cause = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(cause, OSError):
        return (cause.strerror or str(cause)).lower()
    return str(cause)


def add_arguments(top: argparse.ArgumentParser) -> None:
    top.add_argument("--metrics-address", default="127.0.0.1:9469", help="natgwd's host:port for /metrics")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--sort", choices=sorted(SORTS), default="b", help=f"the first sort key: {SORT_HELP}")
    top.add_argument(
        "--once", action="store_true", help="print one screen (rates over one interval) and exit; no terminal needed"
    )
