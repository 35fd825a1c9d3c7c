"""What the fault tests (tests/integration/test_faults_*.py) share: process figures read
from /proc, the nftables table compared independently of rule ids, and states with
thousands of rules."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from natgwd.kernel.nft import parse_table
from natgwd.lab.topology import SEED_STATE, Lab, Natgwd
from natgwd.planning.layout import RULE_CONNECTIONS, RULE_TRAFFIC, whole_elements
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import TableContents
from natgwd.runtime.daemon import own_endpoints
from natgwd.state.validation import load_state
from tests.integration.helpers import (
    METRICS_PORT,
    UPSTREAM_PORT,
    encode,
    events_named,
    log_events,
    wait_for,
)

THREAD_BOUND = 40


# --- small helpers ------------------------------------------------------------------------


def seed() -> dict[str, Any]:
    return copy.deepcopy(SEED_STATE)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) in MB."""
    return int(proc_status(pid)[key].split()[0]) / 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def errors_logged(daemon: Natgwd) -> list[dict[str, Any]]:
    return [e for e in log_events(daemon) if e.get("level") in ("error", "critical")]


def metric(daemon: Natgwd, name: str) -> float | None:
    return daemon.metrics().get(name)


def serve_all(lab: Lab) -> None:
    lab.serve("vm1", tcp=[80])
    lab.serve("vm2", tcp=[80])
    lab.serve("vm3", tcp=[80])
    lab.serve("ext", tcp=[UPSTREAM_PORT])


# --- nftables contents, independent of rule ids ----------------------------------------------

# Maps and sets whose keys and values hold no rule id.
_ID_FREE = re.compile(r"^(eips|invalid_dropped|dnat_target|dnat_share|fip_in_target|fip_out_target|snat_p\d+_target)$")
# Maps whose keys hold no rule id (their values are ids).
_ID_VALUED = re.compile(r"^(dnat_rule|fip_in_rule|fip_out_rule|snat_p\d+_rule)$")


def signature(contents: TableContents) -> dict[str, Any]:
    """What a table holds, leaving out rule ids (which differ between runs): the sets and
    chains, every id-free map, the keys of the id-valued maps, the rule labels of
    rule_connections and the size of rule_traffic (across their shards)."""
    found: dict[str, Any] = {
        "sets": dict(contents.sets),
        # Share chains name rule ids in their rules: only their presence is compared.
        "chains": {n: (len(t) if n.startswith("share_") else t) for n, t in contents.chains.items()},
    }
    for name, elements in contents.elements.items():
        if _ID_FREE.match(name):
            found[name] = frozenset((key, e.value) for key, e in elements.items())
        elif _ID_VALUED.match(name):
            found[name] = frozenset(elements)
    # Which shard holds a rule's elements depends on its id.
    found[RULE_CONNECTIONS] = frozenset(e.comment for _, e in whole_elements(contents.elements, RULE_CONNECTIONS))
    found[RULE_TRAFFIC] = sum(1 for _ in whole_elements(contents.elements, RULE_TRAFFIC))
    return found


# The lab's natgwd serves /metrics on 127.0.0.1 and has no edit endpoint: its table keeps
# that endpoint out of conntrack (the untracked chains), whatever the state.
LAB_ENDPOINTS = own_endpoints([("127.0.0.1", METRICS_PORT)], edits=False)


def expected_signature(state: dict[str, Any]) -> dict[str, Any]:
    model = load_state(encode(state))
    return signature(desired_table(model, assign_ids(model, {}), untracked=LAB_ENDPOINTS).contents())


def kernel_contents(lab: Lab) -> TableContents | None:
    result = lab.exec("gw", "nft", "-j", "list", "table", "inet", "natgwd", check=False)
    if result.returncode != 0:
        assert "No such file or directory" in result.stderr, result.stderr
        return None
    return parse_table(json.loads(result.stdout)["nftables"])


def kernel_signature(lab: Lab) -> dict[str, Any] | None:
    contents = kernel_contents(lab)
    return signature(contents) if contents is not None else None


def net2_addresses(lab: Lab) -> set[str]:
    links = json.loads(lab.exec("gw", "ip", "-j", "-4", "addr", "show", "dev", "net2").stdout)
    return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", ())}


def forwarding(lab: Lab) -> str:
    return lab.exec("gw", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


# --- states with thousands of rules ------------------------------------------------------------


def many_rules(
    variant: int,
    dnat: int,
    snat: int,
    fip: int,
    dnat_eips: int = 10,
    ranges: int = 4,
    range_length: int = 250,
) -> dict[str, Any]:
    """The seed plus `dnat` DNAT (`ranges` of them port ranges), `snat` SNAT and `fip`
    FIP rules; backends behind the internal route 10.60.0.0/16 via 172.20.10.1. Variants
    0 and 1 differ everywhere: every DNAT target, a tenth of the DNAT names, the SNAT
    prefix lengths (maps and the postrouting chain come and go) and EIPs, the FIP
    backends and 20 of the FIP EIPs."""
    state = seed()
    state["internal"]["routes"].append({"dst": "10.60.0.0/16", "via": "172.20.10.1"})
    base = IPv4Address("10.115.49.1")
    for i in range(dnat_eips):
        state["eips"].append({"name": f"dnat-eip-{i}", "v4ip": str(base + i)})
    own = min(20, fip)
    fip_slots = list(range(fip - own)) + [fip - own + variant * own + k for k in range(own)]
    for slot in fip_slots:
        state["eips"].append({"name": f"fip-eip-{slot}", "v4ip": str(IPv4Address("10.115.50.0") + slot)})
    for i in range(ranges):
        first = 20000 + i * 1000
        state["dnat"].append(
            {
                "name": f"range-{i}",
                "eip": f"dnat-eip-{i % dnat_eips}",
                "protocol": "tcp",
                "externalPort": f"{first}-{first + range_length - 1}",
                "internalIp": str(IPv4Address("10.60.250.0") + variant * 10 + i + 1),
                "internalPort": f"{30000 + variant * 5000}-{30000 + variant * 5000 + range_length - 1}",
            }
        )
    for i in range(dnat - ranges):
        renamed = variant == 1 and i % 10 == 0
        state["dnat"].append(
            {
                "name": f"dnat-{i}-b" if renamed else f"dnat-{i}",
                "eip": f"dnat-eip-{i % dnat_eips}",
                "protocol": "tcp" if i % 2 else "udp",
                "externalPort": 10000 + i // dnat_eips,
                "internalIp": str(IPv4Address("10.60.0.0") + variant * 16384 + i + 1),
                "internalPort": 80 + variant,
            }
        )
    prefixes = ((24, 26, 28), (24, 25, 27))[variant]
    for i in range(snat):
        network = IPv4Network((int(IPv4Address("10.62.0.0")) + i * 256, prefixes[i % 3]))
        state["snat"].append(
            {"name": f"snat-{i}", "eip": f"dnat-eip-{(i + variant) % dnat_eips}", "internalCIDR": str(network)}
        )
    for k, slot in enumerate(fip_slots):
        backend = IPv4Address("10.60.200.0") + (k + variant * 7) % 600 + 1
        state["fip"].append({"name": f"fip-{k}", "eip": f"fip-eip-{slot}", "internalIp": str(backend)})
    return state


def eip_addresses(state: dict[str, Any]) -> set[str]:
    """What net2 should carry for a state: its own address and every EIP (/21)."""
    return set(state["external"]["addresses"]) | {f"{e['v4ip']}/21" for e in state["eips"]}


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# --- natgwd seen from outside ------------------------------------------------------------


def metrics_latency(lab: Lab) -> tuple[int, float]:
    """(status, seconds) of one GET /metrics from inside the gateway."""
    out = lab.exec(
        "gw",
        "curl",
        "-s",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{time_total}",
        f"http://127.0.0.1:{METRICS_PORT}/metrics",
        check=False,
        timeout=20,
    ).stdout
    status, _, seconds = out.partition(" ")
    return int(status or 0), float(seconds or "nan")


def settled_fds(daemon: Natgwd) -> int:
    """natgwd's fd count once the start-up GARP's packet socket is closed."""
    pid = daemon.process.pid
    wait_for(lambda: events_named(daemon, "gratuitous ARP sent"), "the start-up GARP sent", timeout=10)
    wait_for(lambda: not packet_sockets(pid), "the GARP socket closed", timeout=10)
    return fd_count(pid)


def packet_sockets(pid: int) -> set[str]:
    """The inodes of the AF_PACKET sockets `pid` holds."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(target[len("socket:[") : -1])
    with open(f"/proc/{pid}/net/packet") as table:
        return held & {line.split()[8] for line in table.readlines()[1:]}
