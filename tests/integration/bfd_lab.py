"""FRR's bfdd in a lab namespace: one single-hop BFD peer, as Kube-OVN's `bfdd` sidecar
answers OVN in a gateway pod, and as OVN checks each replica's next hop. bfdd runs without
zebra (a static peer needs none), in the foreground under the lab (killed on close), with
its own configuration and vty directory; vtysh reads its state as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from natgwd.lab.topology import Lab
from tests.integration.bgp_lab import frr_run_dir
from tests.integration.helpers import wait_for

BFDD = "/usr/lib/frr/bfdd"
FRR_UID_NAME = "frr"
INTERVAL_MS = 100  # detection after 3 missed packets: 0.3 s


class Bfdd:
    _started = 0  # each its own directory (a revived member's bfdd is a new one)

    def __init__(self, lab: Lab, role: str, local: str, *peers: str) -> None:
        """A session from `local` to each of `peers`; `status` and `wait` ask about the
        first unless told."""
        import shutil

        self.lab, self.role, self.peer = lab, role, peers[0]
        Bfdd._started += 1
        self.directory = frr_run_dir(lab, f"bfdd-{role}-{Bfdd._started}")
        self.directory.mkdir(parents=True)
        conf = self.directory / "bfdd.conf"
        sessions = "".join(
            f" peer {peer} local-address {local}\n"
            f"  receive-interval {INTERVAL_MS}\n  transmit-interval {INTERVAL_MS}\n  detect-multiplier 3\n exit\n"
            for peer in peers
        )
        conf.write_text(f"log stdout informational\nbfd\n{sessions}exit\n")
        for path in (self.directory, conf):
            shutil.chown(path, FRR_UID_NAME, FRR_UID_NAME)
        self.process = lab.spawn(
            role,
            BFDD,
            *("-f", str(conf), "-i", str(self.directory / "bfdd.pid")),
            *("-z", str(self.directory / "zserv.api"), "--vty_socket", str(self.directory)),
            *("-P", "0", "--log", "stdout", "--bfdctl", str(self.directory / "bfdd.sock")),
            log_path=self.directory.parent / "bfdd.log",
        )
        wait_for(lambda: self.status() is not None or None, f"bfdd in {role} to answer", timeout=15)

    def status(self, peer: str | None = None) -> str | None:
        """The session's state as bfdd shows it (up, down, init), None before bfdd answers."""
        peer = peer or self.peer
        result = self.lab.exec(
            self.role, "vtysh", "--vty_socket", str(self.directory), "-c", "show bfd peers json", check=False
        )
        try:
            peers: list[dict[str, Any]] = json.loads(result.stdout) if result.returncode == 0 else []
        except json.JSONDecodeError:
            return None
        return next((str(p["status"]) for p in peers if p.get("peer") == peer), None)

    def wait(self, status: str, timeout: float = 15, peer: str | None = None) -> None:
        wait_for(lambda: self.status(peer) == status or None, f"BFD in {self.role} {status}", timeout=timeout)
