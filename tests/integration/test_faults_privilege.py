"""natgwd under faults: run with only the capabilities it needs (CAP_NET_ADMIN and CAP_NET_RAW,
as root and as an unprivileged uid) and with a read-only /proc/sys.

Every test builds its own lab (network namespaces with unique names, removed afterwards,
with every process started in them); traffic never leaves the lab. Measured figures are
printed (run with -s to see them); only generous bounds are asserted.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from natgwd.lab.topology import Lab
from tests.integration.fault_helpers import (
    errors_logged,
    forwarding,
    proc_status,
    seed,
    serve_all,
)
from tests.integration.helpers import (
    DNAT_EIP,
    FIP_EIP,
    UPSTREAM,
    assert_dnat_works,
    assert_fip_works,
    assert_snat_works,
    encode,
    fetch,
    sha256,
    start_natgwd_with,
    wait_for,
)

ONLY_NET_CAPS = "-all,+net_admin,+net_raw"
CAP_NET_ADMIN_AND_RAW = 0x3000


def setpriv(uid: int | None) -> list[str]:
    """As uid 0 (or another uid) with NET_ADMIN and NET_RAW only: inheritable, ambient and
    bounding sets all reduced, so nothing can gain any other capability."""
    ids = ["--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid else []
    return [
        "setpriv",
        *ids,
        f"--inh-caps={ONLY_NET_CAPS}",
        f"--ambient-caps={ONLY_NET_CAPS}",
        f"--bounding-set={ONLY_NET_CAPS}",
        "--",
    ]


def readable_runtime(into: Path) -> Path:
    """natgwd and the distributions it needs at run time, copied into `into` (readable by
    every user) for PYTHONPATH: the checkout and its .venv may sit in a folder only root can
    enter (root's home, mkdtemp), which another uid cannot import from."""
    import natgwd

    shutil.copytree(Path(natgwd.__file__).parent, into / "natgwd", ignore=shutil.ignore_patterns("__pycache__"))
    todo, seen = ["natgwd"], set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            found = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency not installed
        todo += [re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0] for r in found.requires or () if "extra ==" not in r]
        if name == "natgwd":
            continue  # its files are the editable install's hook into the checkout
        for file in found.files or ():
            source = Path(str(found.locate_file(file)))
            if not file.parts[0].startswith("..") and source.is_file():
                (into / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, into / file)
    return into


@pytest.mark.parametrize("uid", [0, 65534], ids=["uid0", "uid65534"])
def test_runs_with_only_net_admin_and_net_raw(lab: Lab, uid: int) -> None:
    """Prevents: natgwd needing more than CAP_NET_ADMIN and CAP_NET_RAW (as the README
    says): nftables, addresses, routes, conntrack, gratuitous ARP and turning on
    ip_forward must all work with just those two."""
    from tests.integration.lifecycle_helpers import capture_arp

    serve_all(lab)
    os.chmod(lab.workdir, 0o755)  # mkdtemp's 0700 would keep a non-root uid from its file
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")  # natgwd must turn it on itself
    capture = capture_arp(lab, "ext", "eth0")
    applied = None if uid == 0 else ""  # nowhere to write the record as another uid
    wrapper, env = setpriv(uid), {}
    if uid:
        # The system's interpreter (the venv's is a link inside the checkout) on a copy of
        # natgwd that any uid can read; -P: not the working directory (the checkout) either.
        env = {"PYTHONPATH": str(readable_runtime(lab.workdir / "runtime"))}
        wrapper += ["sh", "-c", 'shift; exec "$INTERPRETER" -P "$@"', "sh"]
        env["INTERPRETER"] = os.path.realpath(sys.executable)
    daemon = start_natgwd_with(
        lab, seed(), "--resync-interval", "1", wrapper=wrapper, env=env, applied_state=applied, name="caps"
    )
    daemon.wait_applied(timeout=20)

    status = proc_status(daemon.process.pid)
    assert "python" in status["Name"], status["Name"]
    assert status["Uid"].split() == [str(uid)] * 4
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[key], 16) == CAP_NET_ADMIN_AND_RAW, (key, status[key])
    decoded = lab.exec("gw", "capsh", f"--decode={status['CapEff']}").stdout.strip()
    print(f"least privilege (uid {uid}): CapEff {status['CapEff']} = {decoded}")

    assert forwarding(lab) == "1", "natgwd did not turn ip_forward on"
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)

    def announced() -> bool:
        frames = {(f.psrc, f.eth_src) for f in capture.gratuitous()}
        return {DNAT_EIP, FIP_EIP} <= {address for address, _ in frames}

    wait_for(announced, "gratuitous ARP for both EIPs", timeout=10)
    garp_metric = 'natgwd_gratuitous_arp_packets_total{interface="net2"}'
    garp = wait_for(lambda: daemon.metrics().get(garp_metric) == 6 and 6, "6 GARP frames counted", timeout=10)

    # Forwarding turned off at run time is repaired too, and rules follow a change.
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")
    wait_for(lambda: forwarding(lab) == "1", "forwarding repaired with reduced capabilities", timeout=10)
    changed = seed()
    changed["dnat"][0]["externalPort"] = "8889"
    daemon.write_state(changed)
    daemon.wait_applied(sha256(encode(changed)))
    assert fetch(lab, "ext", DNAT_EIP, 8889).startswith(f"{UPSTREAM}:")
    assert not errors_logged(daemon), errors_logged(daemon)
    print(f"least privilege (uid {uid}): ip_forward 0 -> 1 written at start and repaired at run time; GARP {garp:.0f}")


def test_read_only_proc_sys_still_forwards(lab: Lab) -> None:
    """Prevents: natgwd depending on a writable /proc/sys (unprivileged Kubernetes pods
    mount it read-only): with forwarding off and /proc/sys read-only it must still turn
    forwarding on for its interfaces (over netlink), pass traffic, and repair forwarding
    turned off by hand."""
    serve_all(lab)
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")  # every interface's forwarding off too
    read_only = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind -o ro /proc/sys /proc/sys && exec "$@"',
        "sh",
    ]
    daemon = start_natgwd_with(lab, seed(), "--resync-interval", "1", wrapper=[*read_only, *setpriv(0)], name="ro")
    daemon.wait_applied(timeout=20)
    mounts = Path(f"/proc/{daemon.process.pid}/mountinfo").read_text()
    assert any(" /proc/sys " in line and " ro," in line for line in mounts.splitlines()), "not read-only"
    assert int(proc_status(daemon.process.pid)["CapEff"], 16) == CAP_NET_ADMIN_AND_RAW

    def interface_forwarding() -> dict[str, str]:
        return {
            name: lab.exec("gw", "cat", f"/proc/sys/net/ipv4/conf/{name}/forwarding").stdout.strip()
            for name in ("net1", "net2")
        }

    print(f"read-only /proc/sys: ip_forward {forwarding(lab)}, per interface {interface_forwarding()}")
    assert interface_forwarding() == {"net1": "1", "net2": "1"}
    assert_dnat_works(lab)
    assert_snat_works(lab)
    assert_fip_works(lab)
    lab.exec("gw", "sysctl", "-qw", "net.ipv4.conf.net2.forwarding=0")
    wait_for(lambda: interface_forwarding()["net2"] == "1", "net2 forwarding repaired over netlink", timeout=10)
    assert_snat_works(lab)
    assert not errors_logged(daemon), errors_logged(daemon)
    assert daemon.process.poll() is None
