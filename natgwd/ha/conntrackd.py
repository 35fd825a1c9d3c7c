"""conntrackd's commands, run as subprocesses against the running daemon: a takeover's and
a handover's, and the statistics a scrape reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import structlog

from natgwd.ha.metrics import parse_stats

log = structlog.get_logger("natgwd.ha.conntrackd")

# conntrackd injects the peer's entries into the kernel as they arrive (DisableExternalCache),
# so a new active has nothing to commit: it makes its own cache the kernel's table (-f
# internal, -R), from which it answers a returning member's resync request. Plain -f would
# flush the injected entries from the kernel. No bulk send (-B): the peer may be alive and
# forwarding (a split sync link, another member of a scaled-out group), and conntrackd
# injects an update of a NATed connection as a delete and a create, so a packet between
# the two found no connection and the peer's own stack reset the flow. A new standby asks
# the active for its table (-n).
MASTER_COMMANDS = (("-f", "internal"), ("-R",))
BACKUP_COMMANDS = (("-n",),)
COMMAND_TIMEOUT_SECONDS = 10.0
STATS_TIMEOUT_SECONDS = 5.0


class Conntrackd:
    def __init__(self, binary: str, conf: Path) -> None:
        self.binary = binary
        self.conf = conf

    def run(self, commands: tuple[tuple[str, ...], ...]) -> None:
        """Each command in turn; a failed one is logged, and the next still runs."""
        for args in commands:
            argv = [self.binary, "-C", str(self.conf), *args]
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
            except (OSError, subprocess.TimeoutExpired) as err:
                log.error("conntrackd command failed", argv=argv, error=str(err))
                continue
            output = (result.stdout + result.stderr).strip()
            if result.returncode:
                log.error("conntrackd command failed", argv=argv, code=result.returncode, output=output)
            else:
                log.info("conntrackd command", argv=argv, output=output)

    def stats(self) -> dict[str, int] | None:
        """The sync figures of `conntrackd -s` and `-s queue`; None when it cannot say."""
        texts = []
        for extra in ((), ("queue",)):
            argv = [self.binary, "-C", str(self.conf), "-s", *extra]
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=STATS_TIMEOUT_SECONDS)
            except (OSError, subprocess.TimeoutExpired) as err:
                log.warning("cannot read conntrackd statistics", error=str(err))
                return None
            if result.returncode:
                return None
            texts.append(result.stdout)
        return parse_stats(*texts)
