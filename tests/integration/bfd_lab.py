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
    def __init__(self, lab: Lab, role: str, local: str, peer: str) -> None:
        import shutil

        self.lab, self.role, self.peer = lab, role, peer
        self.directory = frr_run_dir(lab, f"bfdd-{role}")
        self.directory.mkdir(parents=True)
        conf = self.directory / "bfdd.conf"
        conf.write_text(
            "log stdout informational\nbfd\n"
            f" peer {peer} local-address {local}\n"
            f"  receive-interval {INTERVAL_MS}\n  transmit-interval {INTERVAL_MS}\n  detect-multiplier 3\n"
            " exit\nexit\n"
        )
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

    def status(self) -> str | None:
        """The session's state as bfdd shows it (up, down, init), None before bfdd answers."""
        result = self.lab.exec(
            self.role, "vtysh", "--vty_socket", str(self.directory), "-c", "show bfd peers json", check=False
        )
        try:
            peers: list[dict[str, Any]] = json.loads(result.stdout) if result.returncode == 0 else []
        except json.JSONDecodeError:
            return None
        return next((str(p["status"]) for p in peers if p.get("peer") == self.peer), None)

    def wait(self, status: str, timeout: float = 15) -> None:
        wait_for(lambda: self.status() == status or None, f"BFD in {self.role} {status}", timeout=timeout)
