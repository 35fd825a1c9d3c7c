"""`python -m natgwd.lab.demo`: the seed's NAT gateway in network namespaces, with real traffic.

Builds the topology of natgwd.lab.topology, starts natgwd with the seed's desired state, sends a
ping and a UDP flow out through SNAT, an HTTP request in through DNAT, and HTTP both ways
through the floating IP, prints what the far ends saw and the per-rule counters, then
removes everything it created.
"""

from __future__ import annotations

import argparse
import json
import sys

from natgwd.lab.topology import EXTERNAL_HOST, SEED_STATE, Lab

FIP = SEED_STATE["fip"][0]
FIP_EIP = next(eip["v4ip"] for eip in SEED_STATE["eips"] if eip["name"] == FIP["eip"])


def _say(title: str, text: str = "") -> None:
    print(f"\n== {title}")
    if text:
        print(text.rstrip())


def main(argv: list[str] | None = None) -> int:
    # Only --help: the demo needs root and builds network namespaces, so it must not start
    # when someone asks what it does.
    argparse.ArgumentParser(
        prog="python -m natgwd.lab.demo",
        description=(__doc__ or "").split("\n\n", 1)[1].strip(),
        epilog="Needs root: it builds network namespaces.",
    ).parse_args(argv)
    with Lab() as lab:
        _say("topology", f"namespaces {lab.prefix}-{{gw,lan,ext,vm1,vm2,vm3}}; natgwd runs in {lab.ns('gw')}")
        lab.serve("vm1", tcp=[80])
        lab.serve("vm2", tcp=[80])
        lab.serve("ext", tcp=[8080], udp=[5353])
        daemon = lab.start_natgwd(SEED_STATE, "--log-format", "console")
        ready = daemon.wait_ready()
        state = "\n".join(f"  {key}: {json.dumps(value)}" for key, value in SEED_STATE.items())
        _say("desired state (the seed's gateway plus a floating IP)", state)
        _say("natgwd is ready", json.dumps(ready))
        _say(
            "gateway addresses and routes, configured by natgwd",
            lab.exec("gw", "ip", "-br", "addr").stdout + lab.exec("gw", "ip", "route").stdout,
        )

        ping = lab.exec("vm3", "ping", "-c", "3", "-i", "0.2", "-W", "2", EXTERNAL_HOST, check=False)
        _say(f"ping from vm3 (172.20.10.4) to {EXTERNAL_HOST} through SNAT", ping.stdout.splitlines()[-2])
        conntrack = lab.exec("gw", "conntrack", "-L", "-p", "icmp", check=False).stdout
        _say("the gateway's conntrack entry: reply goes to the EIP", conntrack)
        answers = lab.udp_exchange("vm3", EXTERNAL_HOST, 5353, [b"hello"] * 5)
        _say("UDP flow vm3 -> ext:5353; the external server saw the client as", "\n".join(answers))

        seen = lab.http_get("ext", "10.115.55.200", 8888)
        _say("HTTP from ext to EIP 10.115.55.200:8888, DNAT to vm1 172.20.10.2:80; vm1 saw the client as", seen)

        seen = lab.http_get("vm2", EXTERNAL_HOST, 8080)
        _say(f"HTTP from vm2 ({FIP['internalIp']}, floating IP {FIP_EIP}) out to ext:8080; ext saw the client as", seen)
        seen = lab.http_get("ext", FIP_EIP, 80)
        _say(f"HTTP from ext in to the floating IP {FIP_EIP}:80, 1:1 NAT to vm2; vm2 saw the client as", seen)

        status = lab.exec(
            "gw", sys.executable, "-m", "natgwd", "status", "--applied-state", str(lab.applied_state_path)
        ).stdout
        _say("natgwd status (rules with live counters)", status)
        metrics = [line for line in daemon.get("/metrics")[1].splitlines() if line.startswith("natgwd_rule_")]
        _say("per-rule counters on /metrics", "\n".join(metrics))
        _say(
            f"the floating IP's counters: {FIP['name']} counted both connections, out and in",
            "\n".join(line for line in metrics if f'name="{FIP["name"]}"' in line),
        )
        daemon.stop()
        _say("natgwd log", daemon.log())
    _say("cleaned up: every namespace and process of the demo is gone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
