"""vtysh, the one way into FRR's daemons: commands in, JSON out (for the speaker and for
`natgwd status`)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import structlog

from natgwd.bgp.status import NeighborStatus, bfd_peers, decode_all, neighbors, originated
from natgwd.state.model import IPNetwork

log = structlog.get_logger("natgwd.bgp.vtysh")

TIMEOUT_SECONDS = 10.0


class Vtysh:
    def __init__(self, directory: Path, binary: str = "vtysh") -> None:
        self.directory = directory
        self.binary = binary

    def run(self, commands: list[str]) -> str | None:
        """vtysh's output, or None (logged) when it failed."""
        argv = [self.binary, "--vty_socket", str(self.directory)]
        for command in commands:
            argv += ["-c", command]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("vtysh failed", commands=commands, error=str(err))
            return None
        if result.returncode:
            output = (result.stdout + result.stderr).strip()[-500:]
            log.warning("vtysh failed", commands=commands, code=result.returncode, output=output)
            return None
        return result.stdout

    def originated(self) -> set[IPNetwork] | None:
        """The prefixes bgpd originates, or None when it cannot be asked."""
        text = self.run(["show bgp ipv4 unicast json", "show bgp ipv6 unicast json"])
        if text is None:
            return None
        try:
            return set().union(*(originated(d) for d in decode_all(text) if isinstance(d, dict)))
        except ValueError as err:
            log.warning("cannot read bgpd's routes", error=str(err))
            return None

    def neighbors(self, bfd: set[str] | None, ask_bfdd: bool = True) -> dict[str, NeighborStatus]:
        """The sessions; `bfd`: the neighbours with BFD configured (their state is read from
        bfdd when `ask_bfdd`, else down); None: whichever bfdd has a session with."""
        try:
            documents = decode_all(self.run(["show bgp neighbors json"]) or "")
        except ValueError as err:
            log.warning("cannot read bgpd's neighbours", error=str(err))
            return {}
        found = neighbors(documents[0], time.time()) if documents and isinstance(documents[0], dict) else {}
        peers: dict[str, str] = {}
        if (ask_bfdd and bfd is None) or bfd:
            with contextlib.suppress(ValueError, IndexError, TypeError):
                peers = bfd_peers(decode_all(self.run(["show bfd peers json"]) or "[]")[0])
        wanted = set(peers) if bfd is None else bfd
        return {
            address: NeighborStatus(
                **{**vars(status), "bfd": peers.get(address, "down") if address in wanted else None}
            )
            for address, status in found.items()
        }
