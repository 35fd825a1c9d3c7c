"""Cloud-NAT-style observability with real connections: conntrack pressure, open
connections per rule and EIP, SNAT port usage and allocation failures, translation logs.

Every test keeps the gateway's own loopback traffic (the /metrics scrapes) out of conntrack
with a table of its own in the gateway namespace, so that the table holds exactly the
connections the test made, and shortens conntrack's timeouts there so closed connections
leave the table within seconds."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from natgwd.lab.topology import DUAL_STACK_STATE, EXTERNAL_HOST6, Lab, Natgwd
from tests.integration.helpers import (
    DNAT_EIP,
    FIP_EIP,
    UPSTREAM,
    apply,
    samples,
    start,
    wait_for,
    wait_listening,
)

ECHO_PORT = 7777
DNAT_ID = {("kind", "dnat"), ("name", "dnat01"), ("eip", DNAT_EIP)}
SNAT_ID = {("kind", "snat"), ("name", "my-snat"), ("eip", DNAT_EIP)}
FIP_ID = {("kind", "fip"), ("name", "fip01"), ("eip", FIP_EIP)}
DNAT_EIP6 = "fd00:115::200"
DNAT6_ID = {("kind", "dnat"), ("name", "dnat01-6"), ("eip", DNAT_EIP6)}

SHORT_TIMEOUTS = {
    "nf_conntrack_tcp_timeout_time_wait": 1,
    "nf_conntrack_tcp_timeout_close": 1,
    "nf_conntrack_tcp_timeout_fin_wait": 1,
    "nf_conntrack_tcp_timeout_close_wait": 1,
    "nf_conntrack_tcp_timeout_last_ack": 1,
    "nf_conntrack_udp_timeout": 2,
    "nf_conntrack_udp_timeout_stream": 2,
}

# Opens `count` TCP connections (or UDP flows) to address:port (IPv4 or IPv6) from fixed
# source ports, exchanges one message on each, prints what the far end saw for each, and
# holds them until stdin closes.
HOLD = """
import json, select, socket, sys
address, port, count, proto, first_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
keep_alive = sys.argv[6:] == ["keep-alive"]
family, anywhere = (socket.AF_INET6, "::") if ":" in address else (socket.AF_INET, "0.0.0.0")
held, seen = [], []
for i in range(count):
    if proto == "tcp":
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((anywhere, first_port + i))
        s.settimeout(10)
        s.connect((address, port))
        s.sendall(b"hello")
        seen.append(s.recv(100).decode())
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((anywhere, first_port + i))
        s.settimeout(10)
        s.sendto(b"hello", (address, port))
        seen.append(s.recv(100).decode())
    held.append(s)
print(json.dumps(seen), flush=True)
# keep-alive: a datagram on each UDP flow every half second, so that its conntrack entry
# outlives the test's short UDP timeout for as long as it is held.
while not select.select([sys.stdin], [], [], 0.5 if keep_alive else None)[0]:
    for s in held:
        s.sendto(b"hello", (address, port))
sys.stdin.read()
"""

# An echo server that answers each TCP stream's or datagram's data with the peer address
# it saw ("ip:port"), keeping the streams open; on IPv4, or on IPv6 only with "6".
PEER_ECHO = """
import selectors, socket, sys
port = int(sys.argv[1])
family, anywhere = (socket.AF_INET6, "::") if sys.argv[2:] == ["6"] else (socket.AF_INET, "0.0.0.0")
sel = selectors.DefaultSelector()
listener = socket.create_server((anywhere, port), family=family, backlog=4096)
sel.register(listener, selectors.EVENT_READ, "accept")
udp = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET6:
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
udp.bind((anywhere, port))
sel.register(udp, selectors.EVENT_READ, "udp")
while True:
    for key, _ in sel.select():
        if key.data == "accept":
            conn, peer = listener.accept()
            sel.register(conn, selectors.EVENT_READ, peer)
        elif key.data == "udp":
            data, peer = udp.recvfrom(100)
            udp.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
        else:
            data = key.fileobj.recv(100)
            if data:
                key.fileobj.sendall(f"{key.data[0]}:{key.data[1]}".encode())
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"""


class Held:
    """Connections held open by a client process in a namespace."""

    def __init__(self, process: subprocess.Popen[str], seen: list[str]) -> None:
        self.process = process
        self.seen = seen

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(10)


def hold(
    lab: Lab, role: str, address: str, port: int, count: int, proto: str, first_port: int, keep_alive: bool = False
) -> Held:
    arguments = [address, str(port), str(count), proto, str(first_port), *(["keep-alive"] if keep_alive else [])]
    process = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns(role), sys.executable, "-c", HOLD, *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"holding {count} {proto} connections to {address}:{port} from {role} failed"
    return Held(process, json.loads(line))


def quiet_gateway(lab: Lab) -> None:
    """Keep the gateway's loopback out of conntrack; short timeouts (the test's namespace)."""
    rules = (
        "table ip obs_test {\n"
        " chain pre { type filter hook prerouting priority raw; iifname lo notrack; }\n"
        " chain out { type filter hook output priority raw; oifname lo notrack; }\n"
        "}\n"
    )
    lab.exec("gw", "nft", "-f", "-", stdin=rules)
    for name, value in SHORT_TIMEOUTS.items():
        lab.exec("gw", "sysctl", "-q", "-w", f"net.netfilter.{name}={value}")


def peer_echo(lab: Lab, role: str, port: int = ECHO_PORT, family: int = 4) -> None:
    lab.spawn(role, sys.executable, "-c", PEER_ECHO, str(port), *(["6"] if family == 6 else []))
    wait_listening(lab, role, "tcp", port)
    wait_listening(lab, role, "udp", port)


def value(daemon: Natgwd, name: str, labels: set[tuple[str, str]] | None = None) -> float | None:
    return samples(daemon).get((name, frozenset(labels or set())))


def reap(lab: Lab) -> None:
    """Have conntrack remove the gateway's expired entries now. Its garbage collector visits
    them at intervals of up to a minute when any namespace holds long-lived entries (as a
    test running alongside may); a dump removes the expired entries it meets."""
    for family in ("ipv4", "ipv6"):
        lab.exec("gw", "conntrack", "-L", "-f", family, check=False)


def wait_value(
    daemon: Natgwd, name: str, labels: set[tuple[str, str]] | None, expected: float, closing: bool = False
) -> None:
    """Poll the sample until it equals `expected`; `closing`: connections are expiring."""

    def check() -> bool:
        if closing:
            reap(daemon.lab)
        return value(daemon, name, labels) == expected

    wait_for(check, f"{name}{sorted(labels or ())} == {expected}", 30, interval=0.2 if closing else 0.05)


def conntrack_s(lab: Lab) -> dict[str, int]:
    """`conntrack -S` in the gateway, summed over the CPUs."""
    totals: dict[str, int] = {}
    for line in lab.exec("gw", "conntrack", "-S").stdout.splitlines():
        for field in line.split()[1:]:
            name, _, number = field.partition("=")
            if number.isdigit():
                totals[name] = totals.get(name, 0) + int(number)
    return totals


def test_ipv6_connections_held_across_a_restart_are_counted(dual_lab: Lab, held: list[Held]) -> None:
    # natgwd's dump at start must include IPv6 entries: a connection missing from it would
    # have its DESTROY subtracted later, and the gauge go negative.
    quiet_gateway(dual_lab)
    peer_echo(dual_lab, "vm1", 80, family=6)
    dual_state = copy.deepcopy(DUAL_STACK_STATE)
    daemon = start(dual_lab, dual_state)
    dnat6 = hold(dual_lab, "ext", DNAT_EIP6, 8888, 3, "tcp", 45000)
    held.append(dnat6)
    assert dnat6.seen == [f"{EXTERNAL_HOST6}:{45000 + i}" for i in range(3)]
    wait_value(daemon, "natgwd_rule_open_connections", DNAT6_ID, 3)

    daemon.stop()
    daemon = start(dual_lab, dual_state)
    wait_value(daemon, "natgwd_rule_open_connections", DNAT6_ID, 3)
    assert value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP6)}) == 3

    dnat6.close()
    wait_value(daemon, "natgwd_rule_open_connections", DNAT6_ID, 0, closing=True)
    assert value(daemon, "natgwd_rule_connections_closed_total", DNAT6_ID) == 3
    assert value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP6)}) == 0


def test_conntrack_pressure_counts_held_connections(lab: Lab, seed_state: dict[str, Any], held: list[Held]) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "vm1", 80)
    daemon = start(lab, seed_state)
    wait_value(daemon, "natgwd_conntrack_entries", None, 0)
    held.append(hold(lab, "ext", DNAT_EIP, 8888, 7, "tcp", 41000))

    wait_value(daemon, "natgwd_conntrack_entries", None, 7)
    assert value(daemon, "natgwd_conntrack_entries_limit") == float(
        lab.exec("gw", "sysctl", "-n", "net.netfilter.nf_conntrack_max").stdout
    )
    kernel = conntrack_s(lab)
    found = samples(daemon)
    for stat, family in (
        ("insert_failed", "natgwd_conntrack_insert_failed_total"),
        ("drop", "natgwd_conntrack_drop_total"),
        ("early_drop", "natgwd_conntrack_early_drop_total"),
        ("clash_resolve", "natgwd_conntrack_clash_resolve_total"),
        ("chaintoolong", "natgwd_conntrack_chaintoolong_total"),
        ("error", "natgwd_conntrack_error_total"),
    ):
        assert found[(family, frozenset())] == kernel[stat], family
    held[0].close()
    wait_value(daemon, "natgwd_conntrack_entries", None, 0, closing=True)


def test_open_connections_per_rule_and_eip(lab: Lab, seed_state: dict[str, Any], held: list[Held]) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "vm1", 80)
    peer_echo(lab, "ext")
    daemon = start(lab, seed_state)
    dnat = hold(lab, "ext", DNAT_EIP, 8888, 5, "tcp", 42000)
    held.append(dnat)
    snat = hold(lab, "vm1", UPSTREAM, ECHO_PORT, 3, "tcp", 43000)
    held.append(snat)
    # Kept alive: the UDP timeout here is 2 s, less than a loaded machine may take to look.
    fip = hold(lab, "vm2", UPSTREAM, ECHO_PORT, 2, "udp", 44000, keep_alive=True)
    held.append(fip)
    # What the far ends saw: the client's own address through DNAT, the EIPs otherwise.
    assert dnat.seen == [f"{UPSTREAM}:{42000 + i}" for i in range(5)]
    assert all(seen.startswith(f"{DNAT_EIP}:") for seen in snat.seen)
    assert all(seen.startswith(f"{FIP_EIP}:") for seen in fip.seen)

    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 5)
    found = samples(daemon)
    assert found[("natgwd_rule_open_connections", frozenset(SNAT_ID))] == 3
    assert found[("natgwd_rule_open_connections", frozenset(FIP_ID))] == 2
    assert found[("natgwd_eip_open_connections", frozenset({("eip", DNAT_EIP)}))] == 8
    assert found[("natgwd_eip_open_connections", frozenset({("eip", FIP_EIP)}))] == 2
    # Source ports in use towards one destination: the SNAT streams, the FIP flows.
    assert found[("natgwd_eip_max_ports_per_destination", frozenset({("eip", DNAT_EIP)}))] == 3
    assert found[("natgwd_eip_max_ports_per_destination", frozenset({("eip", FIP_EIP)}))] == 2
    assert found[("natgwd_rule_connections_closed_total", frozenset(DNAT_ID))] == 0
    screen = lab.exec("gw", sys.executable, "-m", "natgwd", "top", "--once", "--interval", "0.2", "--sort", "o").stdout
    rows = [line.split() for line in screen.splitlines()[4:]]
    assert [(row[0], row[1], row[2], row[-1]) for row in rows] == [
        ("dnat", "dnat01", DNAT_EIP, "5"),
        ("snat", "my-snat", DNAT_EIP, "3"),
        ("fip", "fip01", FIP_EIP, "2"),
    ]

    # A restart counts what is open from one dump, then follows the events again.
    daemon.stop()
    daemon = start(lab, seed_state)
    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 5)
    assert value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}) == 8

    dnat.close()
    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 0, closing=True)
    wait_value(daemon, "natgwd_rule_connections_closed_total", DNAT_ID, 5)
    assert value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}) == 3
    snat.close()
    fip.close()
    wait_value(daemon, "natgwd_eip_open_connections", {("eip", DNAT_EIP)}, 0, closing=True)
    wait_value(daemon, "natgwd_eip_open_connections", {("eip", FIP_EIP)}, 0, closing=True)
    assert value(daemon, "natgwd_eip_max_ports_per_destination", {("eip", DNAT_EIP)}) == 0
    assert value(daemon, "natgwd_conntrack_events_lost_total") == 0


# Fills conntrack with entries holding every port of the EIP's source NAT range towards
# one destination (UDP), in batches of netlink requests: as if that many flows were open.
OCCUPY = """
import socket, struct, sys
eip, dest = sys.argv[1], sys.argv[2]
dport, mark, first, last = (int(a) for a in sys.argv[3:7])
def attr(kind, payload, nested=False):
    return struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0)) + payload + bytes(-len(payload) % 4)
def tup(kind, src, sport, dst, dport):
    ip = attr(1, socket.inet_aton(src)) + attr(2, socket.inet_aton(dst))
    l4 = attr(1, bytes([17])) + attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport))
    return attr(kind, attr(1, ip, True) + attr(2, l4, True), True)
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
sock.bind((0, 0))
ports = list(range(first, last + 1))
for start in range(0, len(ports), 200):
    chunk = ports[start:start + 200]
    data = b""
    for port in chunk:
        body = struct.pack("=BBH", socket.AF_INET, 0, 0) + tup(1, "172.20.10.99", port, dest, dport)
        body += tup(2, dest, dport, eip, port) + attr(7, struct.pack(">I", 3600)) + attr(8, struct.pack(">I", mark))
        data += struct.pack("=IHHII", 16 + len(body), 0x100, 0x1 | 0x4 | 0x200 | 0x400, port, 0) + body
    sock.send(data)
    for _ in chunk:
        reply = sock.recv(65536)
        error = struct.unpack_from("=i", reply, 16)[0]
        assert error == 0, (error, chunk)
"""
NAT_PORTS = (1024, 65535)  # the source NAT range for source ports from 1024 up


def rule_mark(lab: Lab, comment: str) -> int:
    listing = json.loads(lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd").stdout)
    shards = [
        obj["set"] for obj in listing["nftables"] if obj.get("set", {}).get("name", "").startswith("rule_connections_")
    ]
    for nft_set in shards:
        for element in nft_set.get("elem", ()):
            if element["elem"].get("comment") == comment:
                return int(element["elem"]["val"])
    raise AssertionError(f"no rule {comment} in {shards}")


def test_port_exhaustion_is_counted_for_the_eip(
    lab: Lab, seed_state: dict[str, Any], held: list[Held], tmp_path: Path
) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "ext")
    daemon = start(lab, seed_state)
    mark = rule_mark(lab, f"snat/my-snat/{DNAT_EIP}")
    daemon.stop()
    # While natgwd is down, every port of the EIP towards ext:7777/udp gets taken, by
    # entries carrying the SNAT rule's mark: the restarted daemon finds them in its dump.
    lab.exec("gw", sys.executable, "-c", OCCUPY, DNAT_EIP, UPSTREAM, str(ECHO_PORT), str(mark), *map(str, NAT_PORTS))
    ports = NAT_PORTS[1] - NAT_PORTS[0] + 1
    daemon = lab.start_natgwd(seed_state)
    # The first apply after a start checks every conntrack entry: 64,512 of them here.
    daemon.wait_ready(timeout=180)
    daemon.wait_applied(timeout=180)
    eip = {("eip", DNAT_EIP)}
    wait_value(daemon, "natgwd_eip_max_ports_per_destination", eip, ports)
    assert value(daemon, "natgwd_rule_open_connections", SNAT_ID) == ports
    before_failures = value(daemon, "natgwd_eip_port_allocation_failures_total", eip)
    insert_failed = value(daemon, "natgwd_conntrack_insert_failed_total")
    assert before_failures == 0

    # Five new flows from the VPC to that destination: no port is left for any of them.
    for source_port in range(45000, 45005):
        lab.exec(
            "vm1",
            sys.executable,
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"s.bind(('0.0.0.0',{source_port})); s.sendto(b'x',(sys.argv[1],{ECHO_PORT}))",
            UPSTREAM,
        )
    wait_value(daemon, "natgwd_eip_port_allocation_failures_total", eip, 5)
    assert value(daemon, "natgwd_conntrack_insert_failed_total") == (insert_failed or 0) + 5
    assert value(daemon, "natgwd_eip_port_allocation_failures_total", {("eip", FIP_EIP)}) == 0
    # Another destination port still has every port free.
    another = hold(lab, "vm1", UPSTREAM, ECHO_PORT, 1, "tcp", 45100)
    held.append(another)
    assert another.seen[0].startswith(f"{DNAT_EIP}:")
    assert value(daemon, "natgwd_eip_port_allocation_failures_total", eip) == 5
    # The alert fires on these very figures.
    promtool_fires(tmp_path, "NatgwdPortAllocationFailing", "natgwd_eip_port_allocation_failures_total", DNAT_EIP, 0, 5)


ALERTS = Path(__file__).parents[2] / "monitoring" / "natgwd-alerts.yml"


def promtool_fires(tmp_path: Path, alert: str, series: str, eip: str, before: float, after: float) -> None:
    """`promtool test rules` with a series going from `before` to `after` (scraped values)
    expects `alert` firing for the EIP two minutes after the rise."""
    test = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'{series}{{instance="gw",eip="{eip}"}}', "values": f"{before:g}x5 {after:g}x5"}
                ],
                "alert_rule_test": [
                    {"alertname": alert, "eval_time": "5m", "exp_alerts": []},
                    {
                        "alertname": alert,
                        "eval_time": "7m",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "instance": "gw", "eip": eip},
                                "exp_annotations": {
                                    "summary": f"EIP {eip} on gw failed to allocate source ports for "
                                    f"{after - before:g} connections in 5 minutes",
                                    "description": "Add EIPs to the SNAT rule's traffic, "
                                    "or spread it over more destinations.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "scraped.test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def translog_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ends(src: str, sport: int, dst: str, dport: int, proto: int) -> dict[str, Any]:
    return {"src_ip": src, "src_port": sport, "dest_ip": dst, "dest_port": dport, "protocol": proto}


def test_translation_log_matches_both_ends(lab: Lab, seed_state: dict[str, Any], held: list[Held]) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "ext")
    peer_echo(lab, "vm1", 80)
    log_path = lab.workdir / "translations.jsonl"
    daemon = start(lab, seed_state, "--translation-log", str(log_path))
    assert lab.exec("gw", "sysctl", "-n", "net.netfilter.nf_conntrack_acct").stdout.strip() == "1"

    udp = hold(lab, "vm1", UPSTREAM, ECHO_PORT, 1, "udp", 46000)
    held.append(udp)
    tcp = hold(lab, "ext", DNAT_EIP, 8888, 1, "tcp", 46100)
    held.append(tcp)
    nat_ip, nat_port = udp.seen[0].split(":")  # what the far end saw: the EIP and a port
    assert nat_ip == DNAT_EIP
    assert tcp.seen == [f"{UPSTREAM}:46100"]  # the backend sees the client itself
    udp_original = ends("172.20.10.2", 46000, UPSTREAM, ECHO_PORT, 17)
    udp_translated = ends(DNAT_EIP, int(nat_port), UPSTREAM, ECHO_PORT, 17)
    tcp_original = ends(UPSTREAM, 46100, DNAT_EIP, 8888, 6)
    tcp_translated = ends(UPSTREAM, 46100, "172.20.10.2", 80, 6)

    starts = wait_for(lambda: len(lines := translog_lines(log_path)) == 2 and lines, "two start lines")
    by_proto = {line["connection"]["protocol"]: line for line in starts}
    assert all(line["event"] == "start" for line in starts)
    snat, dnat = by_proto[17], by_proto[6]
    assert (snat["original"], snat["translated"]) == (udp_original, udp_translated)
    assert snat["connection"] == {**udp_original, "nat_ip": DNAT_EIP, "nat_port": int(nat_port)}
    assert (snat["rule"], snat["eip"]) == ({"kind": "snat", "name": "my-snat"}, DNAT_EIP)
    assert (dnat["original"], dnat["translated"]) == (tcp_original, tcp_translated)
    assert dnat["connection"] == {**tcp_original, "nat_ip": "172.20.10.2", "nat_port": 80}
    assert (dnat["rule"], dnat["eip"]) == ({"kind": "dnat", "name": "dnat01"}, DNAT_EIP)

    udp.close()
    tcp.close()

    def ended() -> list[dict[str, Any]] | None:
        reap(lab)
        lines = translog_lines(log_path)
        return lines if len(lines) == 4 else None

    lines = wait_for(ended, "two end lines", 30, interval=0.2)
    ended = {line["connection"]["protocol"]: line for line in lines[2:]}
    assert all(line["event"] == "end" for line in ended.values())
    assert ended[17]["translated"] == udp_translated and ended[6]["translated"] == tcp_translated
    # One datagram each way: "hello" out, the address the server saw back.
    assert (ended[17]["packets_sent"], ended[17]["bytes_sent"]) == (1, 28 + len("hello"))
    assert (ended[17]["packets_received"], ended[17]["bytes_received"]) == (1, 28 + len(udp.seen[0]))
    # TCP: handshake, data, FINs: more than three packets each way.
    assert ended[6]["packets_sent"] >= 4 and ended[6]["packets_received"] >= 3
    assert ended[6]["conntrack_id"] == dnat["conntrack_id"]
    assert "end_reason" not in ended[17] and "end_reason" not in ended[6]  # closed, not ended by natgwd
    wait_value(daemon, "natgwd_translation_log_lines_total", None, 4)
    assert value(daemon, "natgwd_translation_log_dropped_lines_total") == 0


def test_translation_log_says_when_natgwd_ended_a_connection(
    lab: Lab, seed_state: dict[str, Any], held: list[Held]
) -> None:
    """A DNAT rule removed: natgwd deletes its open connection from conntrack, and the end
    line keeps the removed rule's name and says why the connection ended."""
    quiet_gateway(lab)
    peer_echo(lab, "vm1", 80)
    log_path = lab.workdir / "translations.jsonl"
    daemon = start(lab, seed_state, "--translation-log", str(log_path))
    tcp = hold(lab, "ext", DNAT_EIP, 8888, 1, "tcp", 46200)
    held.append(tcp)
    (started,) = wait_for(lambda: translog_lines(log_path) or None, "the start line")
    assert started["rule"] == {"kind": "dnat", "name": "dnat01"}

    apply(daemon, {**seed_state, "dnat": []})
    lines = wait_for(lambda: len(lines := translog_lines(log_path)) == 2 and lines, "the end line")
    end = lines[1]
    assert (end["event"], end["conntrack_id"], end["rule"]) == ("end", started["conntrack_id"], started["rule"])
    assert end["end_reason"] == "rule_removed"


PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{alerts}]
scrape_configs:
  - job_name: natgwd
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""


def prometheus_query(lab: Lab, port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(query)}"
    result = lab.exec("gw", "curl", "-s", "-m", "5", url, check=False)
    try:
        answer = json.loads(result.stdout)
    except ValueError:  # not up yet: nothing, or "Service Unavailable" while it starts
        return []
    return list(answer["data"]["result"]) if answer.get("status") == "success" else []


def test_prometheus_scrapes_natgwd(lab: Lab, seed_state: dict[str, Any], held: list[Held]) -> None:
    quiet_gateway(lab)
    peer_echo(lab, "vm1", 80)
    daemon = start(lab, seed_state, "--translation-log", str(lab.workdir / "translations.jsonl"))
    held.append(hold(lab, "ext", DNAT_EIP, 8888, 3, "tcp", 47000))
    wait_value(daemon, "natgwd_rule_open_connections", DNAT_ID, 3)

    _, body = daemon.get("/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

    config = lab.workdir / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(alerts=ALERTS, port=daemon.metrics_port))
    port = 9090
    lab.spawn(
        "gw",
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={lab.workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    )
    up = wait_for(lambda: prometheus_query(lab, port, 'up{job="natgwd"} == 1'), "Prometheus scraping natgwd", 60)
    assert len(up) == 1
    query = 'natgwd_rule_open_connections{name="dnat01"}'
    (sample,) = wait_for(lambda: prometheus_query(lab, port, query), "the open-connection gauge in Prometheus", 30)
    assert sample["value"][1] == "3"
    # Every sample natgwd exposes was ingested (no sample rejected by the scrape).
    scraped = prometheus_query(lab, port, 'scrape_samples_scraped{job="natgwd"}')
    assert scraped and float(scraped[0]["value"][1]) == len(daemon.metrics())
