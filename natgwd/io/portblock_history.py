"""The history of applied port-block layouts, for `natgwd whois EIP:PORT --at TIME`.

A layout is every SNAT rule with port blocks as applied (its EIP's address, CIDR, block
size, first port): the owner of a port follows from it (natgwd.state.portblocks), so no
record per connection is kept. The daemon appends a layout, with the time it was
applied, whenever the applied one differs from the last recorded; the file keeps the last
MAX_LAYOUTS and is replaced atomically, so it survives restarts and a reader sees a whole
file. A layout is in force from its time until the next one's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

import structlog

from natgwd.planning.plan import address_text
from natgwd.state.model import DesiredState
from natgwd.state.portblocks import PortBlock, owner

log = structlog.get_logger("natgwd.io.portblock_history")

MAX_LAYOUTS = 1000
FORMAT = 1


@dataclass(frozen=True, order=True)
class Blocks:
    """One rule's blocks as applied."""

    eip: str  # the EIP's address, as nft writes it
    cidr: str
    size: int
    first_port: int
    rule: str

    def owner(self, port: int) -> IPv4Address | IPv6Address | None:
        return owner(ip_network(self.cidr), PortBlock(self.size, self.first_port), port)

    def block_of(self, address: IPv4Address | IPv6Address) -> tuple[int, int]:
        """The first and last port of an address of the CIDR."""
        offset = int(address) - int(ip_network(self.cidr).network_address)
        return PortBlock(self.size, self.first_port).block(offset)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "eip": self.eip,
            "internalCIDR": self.cidr,
            "size": self.size,
            "firstPort": self.first_port,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> Blocks:
        return cls(str(item["eip"]), str(item["internalCIDR"]), int(item["size"]), int(item["firstPort"]), item["rule"])


Layout = tuple[Blocks, ...]


@dataclass(frozen=True)
class Entry:
    applied_at: datetime
    layout: Layout


def layout_of(state: DesiredState) -> Layout:
    eips = {e.name: e for e in state.eips}
    found = []
    for rule in state.snat:
        if rule.port_block is None:
            continue
        address = eips[rule.eip].address(rule.family)
        assert address is not None  # validation: the EIP has an address of the rule's family
        block = rule.port_block
        found.append(Blocks(address_text(address), str(rule.internal_cidr), block.size, block.first_port, rule.name))
    return tuple(sorted(found))


def read(path: Path) -> list[Entry]:
    """The recorded layouts, oldest first; ValueError when the file is not a history."""
    try:
        document = json.loads(path.read_bytes())
        if document.get("version") != FORMAT:
            raise ValueError(f"version {document.get('version')!r}, not {FORMAT}")
        return [
            Entry(
                _aware(datetime.fromisoformat(item["appliedAt"])),
                tuple(Blocks.from_json(b) for b in item["blocks"]),
            )
            for item in document["layouts"]
        ]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"not a port-block history: {err}") from None


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def write(path: Path, entries: Sequence[Entry]) -> None:
    document = {
        "version": FORMAT,
        "layouts": [
            {"appliedAt": e.applied_at.isoformat(), "blocks": [b.to_json() for b in e.layout]} for e in entries
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


class History:
    """The daemon's side: the file at `path` (None: no history kept)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: list[Entry] | None = None  # read at the first apply

    def applied(self, state: DesiredState, at: float) -> None:
        """`state` is applied since `at` (seconds since the epoch): record its layout if
        it differs from the last one. A failure to write is logged, not raised: the state
        is applied all the same."""
        if self.path is None:
            return
        entries = self._load()
        layout = layout_of(state)
        last = entries[-1].layout if entries else ()
        if layout == last:
            return
        entries.append(Entry(datetime.fromtimestamp(at, UTC), layout))
        del entries[:-MAX_LAYOUTS]
        try:
            write(self.path, entries)
        except OSError as err:
            log.warning("cannot record the port-block layout", path=str(self.path), error=str(err))
            return
        log.info("port-block layout recorded", rules=[b.rule for b in layout], layouts=len(entries))

    def _load(self) -> list[Entry]:
        if self._entries is None:
            assert self.path is not None
            self._entries = []
            if self.path.exists():
                try:
                    self._entries = read(self.path)
                except (OSError, ValueError) as err:
                    # A damaged history would stop whois for good: start a new one (the
                    # old file is kept beside it for a person to read). Never an error of
                    # the apply: the state is applied all the same.
                    log.error("unreadable port-block history; starting a new one", path=str(self.path), error=str(err))
                    try:
                        os.replace(self.path, self.path.with_name(self.path.name + ".unreadable"))
                    except OSError as moved:
                        log.error("cannot set the unreadable history aside", path=str(self.path), error=str(moved))
        return self._entries


@dataclass(frozen=True)
class Answer:
    address: IPv4Address | IPv6Address | None  # the owner; None: no block held the port
    entry: Entry | None  # the layout in force; None: the time is before the history
    blocks: Blocks | None = None
    history_starts: datetime | None = None


def whois(entries: Sequence[Entry], eip: str, port: int, at: datetime) -> Answer:
    """Who held `eip`:`port` at `at`: the layout in force then is the last one applied at
    or before it."""
    eip = address_text(ip_address(eip))
    before = [e for e in entries if e.applied_at <= at]
    if not before:
        return Answer(None, None, history_starts=entries[0].applied_at if entries else None)
    entry = before[-1]
    for blocks in entry.layout:
        if blocks.eip == eip and (address := blocks.owner(port)) is not None:
            return Answer(address, entry, blocks)
    return Answer(None, entry)
