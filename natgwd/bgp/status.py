"""What FRR says about the sessions and routes, read from vtysh's JSON (pure parsing)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from ipaddress import ip_network
from typing import Any

from natgwd.state.model import IPNetwork

BGP_STATES = ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established", "Clearing", "Deleted")
BFD_STATES = ("up", "down", "init", "admin_down")
LOCAL_WEIGHT = 32768  # bgpd's weight of the routes it originates itself


@dataclass(frozen=True)
class NeighborStatus:
    address: str
    state: str
    prefixes_sent: int
    prefixes_accepted: int
    last_change: float | None  # epoch seconds the session last came up or went down
    last_error: str | None  # why it last went down (a notification, BFD, a timer...)
    bfd: str | None = None  # None: BFD not configured for this neighbour

    @property
    def established(self) -> bool:
        return self.state == "Established"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def format_neighbors(found: dict[str, NeighborStatus], announced: set[IPNetwork], now: float) -> str:
    """`natgwd status`'s BGP table: one neighbour a line, then what bgpd originates."""
    header = ("NEIGHBOR", "STATE", "BFD", "ANNOUNCED", "ACCEPTED", "SINCE", "LAST ERROR")
    rows = [
        (
            n.address,
            n.state,
            n.bfd or "-",
            str(n.prefixes_sent),
            str(n.prefixes_accepted),
            f"{now - n.last_change:.0f}s" if n.last_change is not None else "-",
            "" if n.established else (n.last_error or ""),
        )
        for n in sorted(found.values(), key=lambda n: n.address)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    prefixes = ", ".join(str(p) for p in sorted(announced, key=lambda p: (p.version, p))) or "nothing"
    return "\n".join([*lines, f"originated: {prefixes}"]) + "\n"


def decode_all(text: str) -> list[Any]:
    """The JSON values vtysh printed one after the other (one per -c command)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while (position := _skip_space(text, position)) < len(text):
        value, position = decoder.raw_decode(text, position)
        values.append(value)
    return values


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def neighbors(document: dict[str, Any], now: float) -> dict[str, NeighborStatus]:
    """`show bgp neighbors json`."""
    found = {}
    for address, info in document.items():
        if not isinstance(info, dict) or "bgpState" not in info:
            continue
        families = info.get("addressFamilyInfo", {}).values()
        established = info["bgpState"] == "Established"
        if established and "bgpTimerUpEstablishedEpoch" in info:
            changed: float | None = float(info["bgpTimerUpEstablishedEpoch"])
        elif "lastResetTimerMsecs" in info:
            changed = now - info["lastResetTimerMsecs"] / 1000
        else:
            changed = None
        error = info.get("lastNotificationReason") or info.get("lastResetDueTo")
        found[address] = NeighborStatus(
            address=address,
            state=info["bgpState"],
            prefixes_sent=sum(f.get("sentPrefixCounter", 0) for f in families if isinstance(f, dict)),
            prefixes_accepted=sum(f.get("acceptedPrefixCounter", 0) for f in families if isinstance(f, dict)),
            last_change=changed,
            last_error=error,
        )
    return found


def bfd_peers(document: list[dict[str, Any]]) -> dict[str, str]:
    """`show bfd peers json`: peer address -> up, down, init or admin_down."""
    return {p["peer"]: str(p.get("status", "down")).replace("-", "_") for p in document if "peer" in p}


def originated(document: dict[str, Any]) -> set[IPNetwork]:
    """`show bgp ipv4|ipv6 unicast json`: the prefixes bgpd originates itself."""
    found = set()
    for prefix, paths in document.get("routes", {}).items():
        if any(p.get("weight") == LOCAL_WEIGHT and p.get("peerId") == "(unspec)" for p in paths):
            found.add(ip_network(prefix))
    return found
