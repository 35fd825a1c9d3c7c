"""natgwd.kubeovn.shim, the drop-in nat-gateway.sh, through its file protocol (natgwd without
an edit endpoint): every subcommand's argument format, Kube-OVN's
idempotence and conflict semantics and exit codes, atomic and validated edits of the state
file, and the wait for natgwd (a fake applier thread plays natgwd: it copies the state
file's sha256 into the applied-state record, skipping contents it did not get to see, as
natgwd's polling does). No root needed: everything lives in a temp dir."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from natgwd.kubeovn.shim import cli, filestate, waiting
from natgwd.kubeovn.shim.grammar import USAGE
from natgwd.state.validation import load_state
from tests.unit.fakes import UPSTREAM, FakeLinks

ROOT = Path(__file__).resolve().parents[2]
EIP1, EIP2, EIP3 = "10.115.55.200", "10.115.55.201", "10.115.55.202"
VM1, VM2, VM3 = "172.20.10.2", "172.20.10.3", "172.20.10.4"


# --- fakes ------------------------------------------------------------------------------


class Applier(threading.Thread):
    """Plays natgwd: polls the state file and records the sha256 of what it read, after
    `delay` (an apply takes time); intermediate contents it did not see are never applied."""

    def __init__(self, state: Path, record: Path, interval: float = 0.01, delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.state, self.record, self.interval, self.delay = state, record, interval, delay
        self.applied: list[str] = []
        self.running = threading.Event()
        self.running.set()
        self.stopping = threading.Event()
        self.passing = threading.Lock()  # held for one pass: pause() waits for it

    def run(self) -> None:
        while not self.stopping.is_set():
            self.running.wait()
            with self.passing:
                if self.running.is_set():
                    self.apply_once()
            time.sleep(self.interval)

    def apply_once(self) -> None:
        try:
            raw = self.state.read_bytes()
        except OSError:
            raw = None
        try:
            # Not JSON (a test's invalid file, or one caught mid-write): natgwd rejects it
            # and carries on; so does this stand-in, instead of its thread dying.
            state = json.loads(raw) if raw is not None else None
        except ValueError:
            raw = None
        if raw is not None:
            digest = hashlib.sha256(raw).hexdigest()
            if not self.applied or self.applied[-1] != digest:
                time.sleep(self.delay)
                # Listed before the record shows it: a call returns on the record, and its test
                # then reads `applied`.
                self.applied.append(digest)
                record = {"sha256": digest, "applied_at": datetime.now(UTC).isoformat(), "state": state}
                tmp = self.record.with_suffix(".tmp")
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.record)

    def pause(self) -> None:
        """Returns once no pass runs, and none starts until resume()."""
        self.running.clear()
        with self.passing:
            pass

    def resume(self) -> None:
        self.running.set()

    def stop(self) -> None:
        self.stopping.set()
        self.running.set()
        self.join(5)


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Gateway:
    """A temp dir with a state file, natgwd's record, and the environment for the shim."""

    dir: Path
    env: dict[str, str]
    applier: Applier
    links: FakeLinks

    @property
    def state_path(self) -> Path:
        return Path(self.env["NATGWD_STATE"])

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.state_path.read_bytes())
        return loaded

    def raw(self) -> bytes:
        return self.state_path.read_bytes()

    def call(self, *argv: str, **env: str) -> Result:
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(list(argv), {**self.env, **env}, stdout=out, stderr=err, links=self.links)
        return Result(code, out.getvalue(), err.getvalue())

    def ok(self, *argv: str, **env: str) -> Result:
        result = self.call(*argv, **env)
        assert result.code == 0, result
        assert all(line.startswith("Warning:") for line in result.err.splitlines()), result
        return result

    def fails(self, *argv: str, match: str = "") -> Result:
        before = self.raw() if self.state_path.exists() else None
        result = self.call(*argv)
        assert result.code == 1, result
        assert re.search(match, result.err), result
        after = self.raw() if self.state_path.exists() else None
        assert after == before, "a refused call changed the state file"
        return result

    def names(self, section: str) -> list[str]:
        return [item["name"] for item in self.state().get(section, [])]


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    env = {
        "NATGWD_STATE": str(tmp_path / "etc" / "state.json"),
        "NATGWD_APPLIED_STATE": str(tmp_path / "lib" / "applied.json"),
        "NATGWD_SHIM_TIMEOUT": "10",
        "NATGWD_EDIT_TOKEN": str(tmp_path / "lib" / "edit.token"),  # none: the file protocol
        "GATEWAY_V4": UPSTREAM,
    }
    (tmp_path / "lib").mkdir()
    applier = Applier(Path(env["NATGWD_STATE"]), Path(env["NATGWD_APPLIED_STATE"]))
    applier.start()
    gateway = Gateway(tmp_path, env, applier, FakeLinks())
    yield gateway
    applier.stop()


@pytest.fixture
def ready(gw: Gateway) -> Gateway:
    """An initialized gateway with the seed's EIPs."""
    gw.ok("init", "net1,net2")
    gw.ok("eip-add", f"{EIP1}/21")
    gw.ok("eip-add", f"{EIP2}/21")
    gw.ok("eip-add", f"{EIP3}/21")
    return gw


def dnat(name: str, eip: str, port: str, ip: str, internal: str, kind: str | None = None) -> dict[str, str]:
    entry = {"name": name, "eip": eip, "protocol": "tcp", "externalPort": port, "internalIp": ip}
    entry["internalPort"] = internal
    if kind:
        entry["type"] = kind
    return entry


# --- init -----------------------------------------------------------------------------


def test_init_makes_the_skeleton_from_the_interfaces(gw: Gateway) -> None:
    result = gw.ok("init", "net1,net2")
    assert result.out.splitlines()[0] == "init net1,net2"
    assert gw.state() == {
        "version": 1,
        # 10.115.48.0/21 via net1 is left out: the external subnet is reached directly.
        "internal": {
            "interface": "net1",
            "addresses": ["172.20.10.254/24"],
            "routes": [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}],
        },
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": UPSTREAM},
    }
    load_state(gw.raw())


def test_init_takes_spaces_around_the_comma_and_split_words(gw: Gateway) -> None:
    gw.ok("init", "net1,", "net2")
    assert (gw.state()["internal"]["interface"], gw.state()["external"]["interface"]) == ("net1", "net2")
    gw.state_path.unlink()
    gw.ok("init", " net1 , net2 ")
    assert gw.state()["external"]["interface"] == "net2"


def test_init_without_arguments_uses_the_scripts_defaults(gw: Gateway) -> None:
    gw.links.links["net1"] = (["10.115.48.1/21"], [("0.0.0.0/0", UPSTREAM)])
    gw.ok("init")
    assert (gw.state()["internal"]["interface"], gw.state()["external"]["interface"]) == ("eth0", "net1")


def test_init_gateway_from_the_default_route_without_gateway_v4(gw: Gateway) -> None:
    gw.ok("init", "net1,net2", GATEWAY_V4="")
    assert gw.state()["external"]["gateway"] == UPSTREAM


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["net1,net9"], "External interface 'net9' not found"),
        (["net7,net2"], "VPC interface 'net7' not found"),
        (["net1,net2,net3"], "natgwd manages one external interface"),
        (["10.96.0.0/12"], "CIDR,NEXTHOP$"),
        (["10.96.0.0/12,10.0.0.1,10.0.0.2"], "CIDR,NEXTHOP$"),
        (["net1"], "Expected two interfaces"),
    ],
)
def test_init_refuses_missing_or_malformed_interfaces(gw: Gateway, args: list[str], message: str) -> None:
    gw.fails("init", *args, match=message)
    assert not gw.state_path.exists()


def test_init_again_keeps_the_state_and_renames_interfaces_only_when_asked(ready: Gateway) -> None:
    before = ready.raw()
    assert "nothing to change" in ready.ok("init", "net1,net2").out
    assert "nothing to change" in ready.ok("init").out
    assert ready.raw() == before
    ready.links.links["vpc0"] = ready.links.links["net1"]
    result = ready.ok("init", "vpc0,net2")
    assert "internal interface changed from net1 to vpc0" in result.err
    assert ready.state()["internal"]["interface"] == "vpc0"
    assert ready.state()["eips"] == json.loads(before)["eips"]


KERNEL_RULES: dict[str, Any] = {
    "eips": [{"name": "eip-10-115-55-200", "v4ip": EIP1}, {"name": "eip-10-115-55-201", "v4ip": EIP2}],
    "snat": [{"name": "my-snat", "eip": "eip-10-115-55-200", "internalCIDR": "172.20.10.0/24"}],
    "fip": [{"name": "fip01", "eip": "eip-10-115-55-201", "internalIp": VM2}],
}


def test_init_without_a_state_file_takes_over_natgwds_rules_in_the_kernel(gw: Gateway) -> None:
    """A container restart in the same network namespace: the file is gone, the table is
    not; an empty rule set would make natgwd delete every rule until the replay."""
    gw.links.kernel_rules = KERNEL_RULES
    result = gw.ok("init", "net1,net2")
    assert "no state file: took over natgwd's rules from the kernel (2 eips, 1 snat, 1 fip)" in result.err
    state = gw.state()
    assert {k: state[k] for k in ("eips", "snat", "fip")} == KERNEL_RULES
    assert state["internal"]["routes"] == [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}]
    # The controller's replay then changes nothing.
    for args in (("eip-add", f"{EIP1}/21"), ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully")):
        assert "nothing to change" in gw.ok(*args).out
    assert "nothing to change" in gw.ok("floating-ip-add", f"{EIP2},{VM2}").out


def test_init_leaves_kernel_rules_that_do_not_fit_the_gateway(gw: Gateway) -> None:
    gw.links.kernel_rules = {
        **KERNEL_RULES,
        "fip": [{"name": "f", "eip": "eip-10-115-55-201", "internalIp": "192.0.2.9"}],
    }
    result = gw.ok("init", "net1,net2")
    assert "natgwd's rules in the kernel do not fit this gateway, not taken over" in result.err
    assert "eips" not in gw.state()


def test_init_goes_on_without_kernel_rules_it_cannot_read(gw: Gateway) -> None:
    gw.links.kernel_rules = OSError("nft list table inet natgwd: Operation not permitted")
    result = gw.ok("init", "net1,net2")
    assert "cannot read natgwd's table in the kernel, starting without its rules: nft list" in result.err
    assert "eips" not in gw.state()


def test_init_with_a_state_file_ignores_the_kernel(ready: Gateway) -> None:
    ready.links.kernel_rules = KERNEL_RULES
    assert "nothing to change" in ready.ok("init", "net1,net2").out


def test_init_of_v1_12_controllers_routes_the_service_cidr(gw: Gateway) -> None:
    """v1.12 sends `init SERVICE_CIDR,GATEWAY` (the pod's eth0 gateway); interfaces eth0, net1."""
    gw.links.links["eth0"] = (["172.20.10.254/24"], [])
    gw.links.links["net1"] = (["10.115.48.1/21"], [("0.0.0.0/0", UPSTREAM)])
    gw.ok("init", "10.96.0.0/12,172.20.10.1")
    state = gw.state()
    assert (state["internal"]["interface"], state["external"]["interface"]) == ("eth0", "net1")
    assert state["internal"]["routes"] == [{"dst": "10.96.0.0/12", "via": "172.20.10.1"}]
    assert "nothing to change" in gw.ok("init", "10.96.0.0/12,172.20.10.1").out
    # Dual-stack clusters: both families in one list; the IPv6 ones are left with a warning.
    result = gw.ok("init", "10.96.0.0/12,fd00:10:96::/112,172.20.10.1,fd00:10:16::1")
    assert "init: fd00:10:96::/112 ignored (natgwd is IPv4-only)" in result.err
    assert "nothing to change" in result.out


def test_ext_subnet_route_add_of_v1_12_sets_the_default_route(ready: Gateway) -> None:
    result = ready.ok("ext-subnet-route-add", "10.115.48.0/21,10.115.55.253", GATEWAY_V4="")
    assert "external gateway changed from 10.115.55.254 to 10.115.55.253" in result.err
    assert ready.state()["external"]["gateway"] == "10.115.55.253"
    ready.fails("ext-subnet-route-add", "10.115.48.0/21", match="expected EXTERNAL_CIDR,GATEWAY")


def test_eip_add_of_v1_12_carries_the_gateway(ready: Gateway) -> None:
    ready.ok("eip-add", "10.115.55.212/21,10.115.55.253", GATEWAY_V4="")
    assert ready.state()["external"]["gateway"] == "10.115.55.253"
    assert "10.115.55.212" in [e["v4ip"] for e in ready.state()["eips"]]


def test_a_named_token_that_is_absent_is_said(gw: Gateway) -> None:
    token = gw.env["NATGWD_EDIT_TOKEN"]
    result = gw.call("init", "net1,net2")
    assert result.code == 0
    assert result.err == (
        f"Warning: natgwd: no edit endpoint token at {token} (NATGWD_EDIT_TOKEN): edited {gw.state_path}\n"
    )


def test_rules_need_init_first(gw: Gateway) -> None:
    gw.fails(
        "snat-add",
        f"{EIP1},172.20.10.0/24",
        match=f"\nnat gateway not initialized: {re.escape(str(gw.state_path))} does not exist "
        r"\(`init` creates it\)\n$",
    )
    gw.fails("eip-add", f"{EIP1}/21", match="not initialized")


# --- routes ---------------------------------------------------------------------------


def test_subnet_routes_replace_and_delete(ready: Gateway) -> None:
    ready.ok("subnet-route-add", "10.66.0.0/16,172.20.10.1")
    ready.ok("subnet-route-add", "10.66.0.0/16,172.20.10.1")  # same again: nothing to do
    ready.ok("subnet-route-add", "10.66.0.0/16,172.20.10.9")  # `ip route replace`
    routes = ready.state()["internal"]["routes"]
    assert {"dst": "10.66.0.0/16", "via": "172.20.10.9"} in routes
    assert len(routes) == 2
    ready.ok("subnet-route-del", "10.66.0.0/16")
    assert ready.state()["internal"]["routes"] == [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}]
    # Missing everywhere: exit 2, as the script's `ip route del`.
    result = ready.call("subnet-route-del", "10.66.0.0/16")
    assert (result.code, result.err.splitlines(keepends=True)[-1]) == (
        2,
        "natgwd: no route to 10.66.0.0/16 on net1 (ip route del: No such process)\n",
    )


def test_subnet_route_del_removes_the_route_the_cni_installed(ready: Gateway) -> None:
    """The CNI's route to a VPC subnet (proto boot) is not natgwd's, so natgwd leaves it;
    the drop-in deletes it as the script's `ip route del CIDR dev VPC` does."""
    ready.ok("subnet-route-del", "10.55.0.0/16")
    assert "routes" not in ready.state()["internal"]
    assert ("10.55.0.0/16", "172.20.10.1") not in ready.links.links["net1"][1]
    ready.links.links["net1"][1].append(("10.77.0.0/16", "172.20.10.1"))  # in the kernel only
    ready.ok("subnet-route-del", "10.77.0.0/16")
    assert ("10.77.0.0/16", "172.20.10.1") not in ready.links.links["net1"][1]
    # Several in one call: each one that exists goes, then exit 2 names the missing ones.
    ready.links.links["net1"][1].append(("10.78.0.0/16", "172.20.10.1"))
    result = ready.call("subnet-route-del", "10.79.0.0/16", "10.78.0.0/16")
    assert result.code == 2 and "no route to 10.79.0.0/16 on net1" in result.err, result
    assert ("10.78.0.0/16", "172.20.10.1") not in ready.links.links["net1"][1]


def test_subnet_route_into_the_external_subnet_is_ignored_with_a_warning(ready: Gateway) -> None:
    before = ready.raw()
    result = ready.ok("subnet-route-add", "10.115.48.0/21,172.20.10.1")
    assert "lies in the external subnet 10.115.48.0/21" in result.err
    assert ready.raw() == before


def test_subnet_route_refusals(ready: Gateway) -> None:
    ready.fails("subnet-route-add", "10.66.0.0/16,192.168.9.1", match="not in the subnet of any internal address")
    ready.fails("subnet-route-add", "10.66.0.0/16", match="expected CIDR,NEXTHOP")
    ready.fails("subnet-route-add", "fd00::/64,172.20.10.1", match="IPv6 is not supported")
    ready.fails("subnet-route-add", "0.0.0.0/0,172.20.10.1", match="default route")


# --- EIPs -----------------------------------------------------------------------------


def test_eip_add_names_by_address_and_is_idempotent(gw: Gateway) -> None:
    gw.ok("init", "net1,net2")
    gw.ok("eip-add", f"{EIP1}/21")
    assert gw.state()["eips"] == [{"name": "eip-10-115-55-200", "v4ip": EIP1}]
    assert "nothing to change" in gw.ok("eip-add", f"{EIP1}/21").out
    assert "nothing to change" in gw.ok("eip-add", EIP1).out


def test_eip_add_warns_when_the_prefix_is_not_the_external_subnets(ready: Gateway) -> None:
    result = ready.ok("eip-add", "10.115.55.210/24")
    assert "10.115.55.210 gets the external subnet 10.115.48.0/21's prefix /21, not /24" in result.err
    result = ready.ok("eip-add", "192.0.2.7/24")
    assert "no external subnet contains it: the prefix /32, not /24" in result.err


def test_eip_add_sets_the_default_route_from_gateway_v4(ready: Gateway) -> None:
    result = ready.ok("eip-add", "10.115.55.211/21", GATEWAY_V4="10.115.55.253")
    assert "external gateway changed from 10.115.55.254 to 10.115.55.253" in result.err
    assert ready.state()["external"]["gateway"] == "10.115.55.253"


def test_eip_del_removes_the_eip_and_the_rules_still_using_it(ready: Gateway) -> None:
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24")
    ready.ok("dnat-add", f"{EIP1},8888,tcp,{VM1},80")
    ready.ok("snat-add", f"{EIP2},172.20.10.3")
    result = ready.ok("eip-del", f"{EIP1}/21")
    assert "EIP 10.115.55.200 was still used by snat snat-10-115-55-200-172-20-10-0-24" in result.err
    assert "dnat dnat-10-115-55-200-tcp-8888" in result.err
    state = ready.state()
    assert [e["v4ip"] for e in state["eips"]] == [EIP2, EIP3]
    assert [s["eip"] for s in state["snat"]] == ["eip-10-115-55-201"]
    assert "dnat" not in state
    ready.ok("eip-del", f"{EIP1}/21")  # already gone


def test_eip_refusals(ready: Gateway) -> None:
    ready.fails("eip-add", "10.115.55.999/21", match="not an IPv4 address")
    ready.fails("eip-add", "10.115.55.210/40", match="invalid prefix")
    ready.fails("eip-add", "fd00::10/64", match="IPv6 is not supported")


# --- floating IPs ---------------------------------------------------------------------


def test_floating_ip_add_same_again_other_target_and_delete(ready: Gateway) -> None:
    ready.ok("floating-ip-add", f"{EIP2},{VM2}")
    assert ready.state()["fip"] == [{"name": "fip-10-115-55-201", "eip": "eip-10-115-55-201", "internalIp": VM2}]
    assert "nothing to change" in ready.ok("floating-ip-add", f"{EIP2},{VM2}").out
    ready.fails("floating-ip-add", f"{EIP2},{VM3}", match=f"floating IP {EIP2} already maps to {VM2}")
    ready.ok("floating-ip-del", EIP2)
    assert "fip" not in ready.state()
    ready.ok("floating-ip-del", EIP2)  # missing: fine
    ready.ok("floating-ip-del", f"{EIP2},{VM2}")  # the internal IP field is accepted and not needed


def test_floating_ip_and_dnat_may_not_share_an_eip(ready: Gateway) -> None:
    ready.ok("dnat-add", f"{EIP1},8888,tcp,{VM1},80")
    ready.fails("floating-ip-add", f"{EIP1},{VM2}", match="also used by a dnat rule")


def test_floating_ip_target_must_be_reachable(ready: Gateway) -> None:
    ready.fails("floating-ip-add", f"{EIP2},192.168.1.1", match="in no internal address's subnet")


# --- SNAT -----------------------------------------------------------------------------


def test_snat_add_with_and_without_random_fully_is_one_rule(ready: Gateway) -> None:
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24,--random-fully")
    assert "nothing to change" in ready.ok("snat-add", f"{EIP1},172.20.10.0/24").out
    assert "nothing to change" in ready.ok("snat-add", f"{EIP1},172.20.10.0/24,").out  # empty option field
    assert ready.state()["snat"] == [
        {"name": "snat-10-115-55-200-172-20-10-0-24", "eip": "eip-10-115-55-200", "internalCIDR": "172.20.10.0/24"}
    ]
    ready.ok("snat-del", f"{EIP1},172.20.10.0/24")
    ready.ok("snat-del", f"{EIP1},172.20.10.0/24")
    assert "snat" not in ready.state()


def test_snat_bare_address_is_a_host_route_and_host_bits_are_cleared(ready: Gateway) -> None:
    ready.ok("snat-add", f"{EIP1},{VM1}")
    result = ready.ok("snat-add", f"{EIP2},172.20.10.77/24")
    assert "has host bits set; using 172.20.10.0/24" in result.err
    assert [s["internalCIDR"] for s in ready.state()["snat"]] == ["172.20.10.2/32", "172.20.10.0/24"]
    ready.ok("snat-del", f"{EIP1},{VM1}/32")
    assert [s["internalCIDR"] for s in ready.state()["snat"]] == ["172.20.10.0/24"]


def test_snat_one_eip_per_cidr(ready: Gateway) -> None:
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24")
    ready.fails("snat-add", f"{EIP2},172.20.10.0/24", match=f"already translated to {EIP1}")
    ready.fails("snat-add", f"{EIP2},172.20.10.0/24,--fully-random", match="can only be --random-fully")


def test_snat_order_of_calls_does_not_matter(gw: Gateway) -> None:
    """The controller replays SNATs in informer order; natgwd orders by prefix itself."""
    calls = [f"{EIP1},172.20.10.2/32", f"{EIP2},172.20.10.0/24", f"{EIP3},172.20.0.0/16"]
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        if gw.state_path.exists():
            gw.state_path.unlink()
        gw.ok("init", "net1,net2")
        for eip in (EIP1, EIP2, EIP3):
            gw.ok("eip-add", f"{eip}/21")
        for index in order:
            gw.ok("snat-add", calls[index])
        state = load_state(gw.raw())
        results.append({(r.eip, r.internal_cidr) for r in state.snat})
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 3


# --- DNAT -----------------------------------------------------------------------------


def test_dnat_add_same_again_other_target_and_delete(ready: Gateway) -> None:
    ready.ok("dnat-add", f"{EIP1},8888,tcp,{VM1},80")
    assert ready.state()["dnat"] == [dnat("dnat-10-115-55-200-tcp-8888", "eip-10-115-55-200", "8888", VM1, "80")]
    assert "nothing to change" in ready.ok("dnat-add", f"{EIP1},8888,TCP,{VM1},80").out
    ready.fails("dnat-add", f"{EIP1},8888,tcp,{VM2},80", match=f"tcp/8888 on {EIP1} already goes to {VM1}:80")
    ready.fails("dnat-add", f"{EIP1},8888,tcp,{VM1},81", match="already goes to")
    ready.ok("dnat-add", f"{EIP1},8888,udp,{VM2},53")  # another protocol: another identity
    ready.ok("dnat-del", f"{EIP1},8888,tcp")
    ready.ok("dnat-del", f"{EIP1},8888,tcp,{VM1},80")  # missing; target fields accepted
    assert [d["protocol"] for d in ready.state()["dnat"]] == ["udp"]


def test_dnat_port_ranges(ready: Gateway) -> None:
    ready.ok("dnat-add", f"{EIP1},8000-8010,tcp,{VM1},9000:9010")
    assert ready.state()["dnat"][0]["externalPort"] == "8000-8010"
    assert ready.state()["dnat"][0]["internalPort"] == "9000-9010"
    ready.fails("dnat-add", f"{EIP1},8005,tcp,{VM2},80", match="overlaps")
    ready.fails("dnat-add", f"{EIP1},7000-7010,tcp,{VM2},80", match="must be the same length")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (f"{EIP1},8888,tcp,{VM1}", "expected EIP,EXTERNAL_PORT,PROTOCOL,INTERNAL_IP,INTERNAL_PORT"),
        (f"{EIP1},8888,sctp,{VM1},80", "protocol 'sctp' is not tcp or udp"),
        (f"{EIP1},0,tcp,{VM1},80", "not a port 1-65535"),
        (f"{EIP1},70000,tcp,{VM1},80", "not a port 1-65535"),
        (f"{EIP1},http,tcp,{VM1},80", "not a port or a range"),
        (f"{EIP1},9000-8000,tcp,{VM1},80", "not a port 1-65535 or a range"),
        (f"{EIP1},8888,tcp,172.20.10.300,80", "not an IPv4 address"),
        (f"{EIP1},8888,tcp,fd00::2,80", "IPv6 is not supported"),
        (f"{EIP1},8888,tcp,192.168.7.7,80", "in no internal address's subnet"),
    ],
)
def test_dnat_refusals(ready: Gateway, rule: str, message: str) -> None:
    ready.fails("dnat-add", rule, match=message)


# --- share DNAT (nft-dnat-map) --------------------------------------------------------


def share(eip: str, port: str, ip: str, backend_port: str) -> dict[str, str]:
    name = f"dnat-{eip.replace('.', '-')}-tcp-{port}-{ip.replace('.', '-')}-{backend_port}"
    return dnat(name, "eip-" + eip.replace(".", "-"), port, ip, backend_port, "share")


def test_share_dnat_map_add_is_one_rule_per_backend(ready: Gateway) -> None:
    ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM2}:8080@{VM1}:80")
    assert ready.state()["dnat"] == [share(EIP3, "80", VM1, "80"), share(EIP3, "80", VM2, "8080")]
    assert "nothing to change" in ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM1}:80@{VM2}:8080").out
    assert "nothing to change" in ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM1}:80@{VM1}:80@{VM2}:8080").out


def test_share_dnat_map_add_replaces_the_backends_with_exactly_the_list(ready: Gateway) -> None:
    ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM1}:80@{VM2}:80")
    ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM2}:80@{VM3}:80")
    # vm2 keeps its rule (its name, so its counters), vm1 goes, vm3 is new.
    assert ready.state()["dnat"] == [share(EIP3, "80", VM2, "80"), share(EIP3, "80", VM3, "80")]
    ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM3}:80")
    assert ready.state()["dnat"] == [share(EIP3, "80", VM3, "80")]


def test_share_dnat_map_del_removes_the_group_only(ready: Gateway) -> None:
    ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM1}:80@{VM2}:80")
    ready.ok("dnat-add", f"{EIP3},443,tcp,{VM1},443")
    ready.ok("dnat-del", f"{EIP3},80,tcp")  # an exclusive delete does not touch the group
    assert len(ready.state()["dnat"]) == 3
    ready.ok("nft-dnat-map-del", f"{EIP3},80,tcp")
    ready.ok("nft-dnat-map-del", f"{EIP3},80,tcp")  # missing: fine
    assert ready.names("dnat") == ["dnat-10-115-55-202-tcp-443"]


def test_share_and_exclusive_may_not_share_an_identity(ready: Gateway) -> None:
    ready.ok("dnat-add", f"{EIP3},80,tcp,{VM1},80")
    ready.fails("nft-dnat-map-add", f"{EIP3},80,tcp,{VM2}:80", match="taken by exclusive DNAT")
    ready.ok("dnat-del", f"{EIP3},80,tcp")
    ready.ok("nft-dnat-map-add", f"{EIP3},80,tcp,{VM2}:80")
    ready.fails("dnat-add", f"{EIP3},80,tcp,{VM1},80", match="is a share DNAT group")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (f"{EIP3},80,tcp", "expected EIP,PORT,PROTOCOL,IP1:PORT1@IP2:PORT2"),
        (f"{EIP3},80,tcp,@", "no backends"),
        (f"{EIP3},80,tcp,{VM1}", "is not IP:PORT"),
        (f"{EIP3},80-90,tcp,{VM1}:80", "single port"),
        (f"{EIP3},80,tcp,{VM1}:80-90", "single ports"),
        (f"{EIP3},80,tcp,{VM1}:99999", "not a port 1-65535"),
    ],
)
def test_share_dnat_refusals(ready: Gateway, rule: str, message: str) -> None:
    ready.fails("nft-dnat-map-add", rule, match=message)


# --- the other subcommands --------------------------------------------------------------


def test_get_iptables_version_enables_random_fully(gw: Gateway) -> None:
    result = gw.ok("get-iptables-version")
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", result.out)
    assert match is not None
    assert tuple(int(g) for g in match.groups()) > (1, 6, 2)
    assert "iptables v1.8.9 (nf_tables)" in result.out.splitlines()


# --- QoS (Kube-OVN's QoSPolicy calls) ---------------------------------------------------------


def test_eip_qos_add_makes_a_policy_of_the_eips_own_then_replaces_and_deletes(ready: Gateway) -> None:
    ready.ok("eip-ingress-qos-add", f"{EIP1},1,10,1")
    ready.ok("eip-egress-qos-add", f"{EIP1}/21,2,2.50,0.5")
    state = ready.state()
    assert state["eips"][0] == {"name": "eip-10-115-55-200", "v4ip": EIP1, "qosPolicy": "qos-10-115-55-200"}
    assert state["qosPolicies"] == [
        {
            "name": "qos-10-115-55-200",
            "bindingType": "EIP",
            "bandwidthLimitRules": [
                {"name": "ingress", "direction": "ingress", "rateMax": "10", "burstMax": "1", "priority": 1},
                {"name": "egress", "direction": "egress", "rateMax": "2.5", "burstMax": "0.5", "priority": 2},
            ],
        }
    ]
    assert load_state(ready.raw()).qos_policies[0].rules[1].rate_bits == 2_500_000
    assert "nothing to change" in ready.ok("eip-egress-qos-add", f"{EIP1},2,2.5,0.5").out
    ready.ok("eip-egress-qos-add", f"{EIP1},2,5,0.5")  # a changed policy: the new rate replaces the old
    assert ready.state()["qosPolicies"][0]["bandwidthLimitRules"][1]["rateMax"] == "5"
    ready.ok("eip-ingress-qos-del", EIP1)
    assert [r["name"] for r in ready.state()["qosPolicies"][0]["bandwidthLimitRules"]] == ["egress"]
    ready.ok("eip-egress-qos-del", f"{EIP1}/21")
    assert "qosPolicies" not in ready.state() and "qosPolicy" not in ready.state()["eips"][0]
    assert "nothing to change" in ready.ok("eip-egress-qos-del", EIP1).out
    assert "nothing to change" in ready.ok("eip-egress-qos-del", "10.115.55.99").out


def test_eip_qos_on_a_shared_policy_copies_it_first(ready: Gateway) -> None:
    state = ready.state()
    state["qosPolicies"] = [
        {"name": "shared", "bandwidthLimitRules": [{"name": "in", "direction": "ingress", "rateMax": "10"}]}
    ]
    state["eips"][0]["qosPolicy"] = state["eips"][1]["qosPolicy"] = "shared"
    ready.state_path.write_text(json.dumps(state))
    ready.ok("eip-egress-qos-add", f"{EIP2},1,20,1")
    after = ready.state()
    assert [e.get("qosPolicy") for e in after["eips"]] == ["shared", "qos-10-115-55-201", None]
    assert after["qosPolicies"][0]["bandwidthLimitRules"] == [{"name": "in", "direction": "ingress", "rateMax": "10"}]
    assert [r["direction"] for r in after["qosPolicies"][1]["bandwidthLimitRules"]] == ["ingress", "egress"]


def test_eip_qos_before_its_eip_adds_the_eip(gw: Gateway) -> None:
    """A replay can bring the QoS call before the EIP's eip-add."""
    gw.ok("init", "net1,net2")
    result = gw.ok("eip-ingress-qos-add", f"{EIP1},1,10,1")
    assert f"EIP {EIP1} was not added (eip-add); added it" in result.err
    assert gw.state()["eips"][0]["qosPolicy"] == "qos-10-115-55-200"


def test_gateway_qos_add_and_del_in_upstreams_nine_fields(ready: Gateway) -> None:
    ready.ok("qos-add", "egress,net2,2,u32,ip,dst,10.0.0.0/24,20,1")
    ready.ok("qos-add", "ingress,net2,3,matchall,,,,40,1")
    result = ready.ok("qos-add", "egress,,4,u32,ip,src,10.0.0.5/24,5,1")  # upstream #6729: no interface
    assert "names no interface; using the external one (net2)" in result.err
    state = ready.state()
    assert state["qosPolicy"] == "gateway-qos"
    rules = state["qosPolicies"][0]["bandwidthLimitRules"]
    assert [(r["name"], r.get("matchValue")) for r in rules] == [
        ("egress-dst-10-0-0-0-24", "dst 10.0.0.0/24"),
        ("ingress-all", None),
        ("egress-src-10-0-0-0-24", "src 10.0.0.0/24"),
    ]
    ready.ok("qos-add", "egress,net2,2,u32,ip,dst,10.0.0.0/24,30,1")
    assert ready.state()["qosPolicies"][0]["bandwidthLimitRules"][0]["rateMax"] == "30"
    for rule in ("egress,net2,2,u32,ip,dst,10.0.0.0/24,30,1", "ingress,net2,3,matchall,,,,40,1"):
        ready.ok("qos-del", rule)
    ready.ok("qos-del", "egress,,2,u32,ip,src,10.0.0.0/24,5,1")
    assert "qosPolicy" not in ready.state() and "qosPolicies" not in ready.state()


@pytest.mark.parametrize(
    ("command", "rule", "match"),
    [
        ("eip-ingress-qos-add", f"{EIP1},1,10", "expected IP,PRIORITY,RATE,BURST"),
        ("eip-ingress-qos-add", f"{EIP1},high,10,1", "priority 'high' is not a whole number 0-1023"),
        ("eip-egress-qos-add", f"{EIP1},1,fast,1", "rate 'fast' is not a number"),
        ("eip-egress-qos-add", f"{EIP1},1,0,1", "rateMax: is 0"),
        ("eip-egress-qos-add", f"{EIP1},1,20000,1", "above the largest rate"),
        ("qos-add", "egress,net2,1,u32,ip,dst,10.0.0.0/24,20", "expected DIRECTION,IFACE"),
        ("qos-add", "sideways,net2,1,u32,ip,dst,10.0.0.0/24,20,1", "direction 'sideways'"),
        ("qos-add", "egress,net2,1,flower,ip,dst,10.0.0.0/24,20,1", "classifier 'flower'"),
        ("qos-add", "egress,net1,1,u32,ip,dst,10.0.0.0/24,20,1", "natgwd shapes the external interface"),
    ],
)
def test_bad_qos_calls_refused(ready: Gateway, command: str, rule: str, match: str) -> None:
    ready.fails(command, rule, match=match)


def test_help_unknown_and_nothing(gw: Gateway) -> None:
    assert "nft-dnat-map-add" in gw.ok("help").out
    unknown = gw.call("frobnicate", "x")
    assert (unknown.code, unknown.out) == (1, "")
    assert unknown.err == f"natgwd: unknown command 'frobnicate'\n{USAGE}\n"  # the controller logs stderr
    assert gw.call() == Result(1, "", f"{USAGE}\n")
    assert gw.call("dnat-add").code == 1  # a rule is needed


@pytest.mark.parametrize(
    ("command", "rule", "message"),
    [
        ("subnet-route-add", "10.66.0.0/16,172.20.10.1,x", "expected CIDR,NEXTHOP"),
        ("subnet-route-add", "10.66.0.0/16,gw", "not an IPv4 address"),
        ("subnet-route-del", "10.66.0.0/99", "not an IPv4 CIDR"),
        ("eip-add", "10.115.55.210/21,10.115.55.254,x", "expected IP/PREFIX"),
        ("eip-del", "eip1", "not an IPv4 address"),
        ("floating-ip-add", EIP1, "expected EIP,INTERNAL_IP"),
        ("floating-ip-add", f"{EIP1},vm", "not an IPv4 address"),
        ("floating-ip-del", "fd00::1", "IPv6 is not supported"),
        ("snat-add", EIP1, "expected EIP,INTERNAL_CIDR"),
        ("snat-add", f"{EIP1},172.20.10.0/33", "not an IPv4 CIDR"),
        ("snat-del", EIP1, "expected EIP,INTERNAL_CIDR"),
        ("dnat-del", f"{EIP1},80", "expected EIP,EXTERNAL_PORT,PROTOCOL"),
        ("dnat-del", f"{EIP1},80,icmp", "not tcp or udp"),
        ("nft-dnat-map-del", f"{EIP1},80", "expected EIP,PORT,PROTOCOL"),
        ("nft-dnat-map-del", f"{EIP1},x,tcp", "not a port"),
    ],
)
def test_malformed_rules_touch_nothing(ready: Gateway, command: str, rule: str, message: str) -> None:
    ready.fails(command, rule, match=message)


def test_several_rules_in_one_call_are_one_transaction(ready: Gateway) -> None:
    ready.ok("dnat-add", f"{EIP1},81,tcp,{VM1},81", f"{EIP1},82,tcp,{VM1},82")
    assert len(ready.state()["dnat"]) == 2
    ready.fails("dnat-add", f"{EIP1},83,tcp,{VM1},83", f"{EIP1},81,tcp,{VM2},81", match="already goes to")
    assert len(ready.state()["dnat"]) == 2  # 83 was not added either


def test_rules_for_an_eip_not_added_yet_add_it(ready: Gateway) -> None:
    result = ready.ok("snat-add", "10.115.55.230,172.20.10.0/24")
    assert "EIP 10.115.55.230 was not added (eip-add); added it" in result.err
    assert {"name": "eip-10-115-55-230", "v4ip": "10.115.55.230"} in ready.state()["eips"]


def test_a_state_from_natgwd_import_is_edited_by_identity(gw: Gateway) -> None:
    """Rules named after their Kubernetes objects (natgwd import) are found by identity."""
    state = json.loads((ROOT / "examples" / "seed.json").read_text())
    gw.state_path.parent.mkdir(parents=True)
    gw.state_path.write_text(json.dumps(state))
    assert "nothing to change" in gw.ok("dnat-add", f"{EIP1},8888,tcp,{VM1},80").out
    assert "nothing to change" in gw.ok("snat-add", f"{EIP1},172.20.10.0/24,--random-fully").out
    assert "nothing to change" in gw.ok("floating-ip-add", f"{EIP2},{VM2}").out
    gw.fails("floating-ip-add", f"{EIP2},{VM3}", match="rule fip01")
    gw.ok("dnat-del", f"{EIP1},8888,tcp")
    assert "dnat" not in gw.state()
    assert gw.names("eips") == ["my-eip", "my-eip2"]


def test_an_invalid_state_file_is_reported_not_built_upon(ready: Gateway) -> None:
    ready.state_path.write_text('{"version": 1}')
    ready.fails("snat-add", f"{EIP1},172.20.10.0/24", match="would be invalid")
    ready.state_path.write_text("{not json")
    ready.fails("snat-add", f"{EIP1},172.20.10.0/24", match="is not valid JSON")


# --- the file: atomic writes, generations, the wait for natgwd ------------------------


def test_every_write_has_its_own_generation_and_sha256(ready: Gateway) -> None:
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24")
    first = ready.raw()
    ready.ok("snat-del", f"{EIP1},172.20.10.0/24")
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24")
    again = ready.raw()
    assert json.loads(first) == json.loads(again)
    assert first != again, "the same state at another generation must have another sha256"
    g1, g2 = filestate.generation_of(first), filestate.generation_of(again)
    assert g1 is not None and g2 == g1 + 2
    journal = filestate.read_journal(Path(ready.env["NATGWD_STATE"] + ".journal"))
    assert journal[-1] == (g2, hashlib.sha256(again).hexdigest())
    load_state(again)  # the stamp is JSON whitespace
    assert again.endswith(b"}\n" + bin(g2)[2:].replace("0", " ").replace("1", "\t").encode() + b"\n")


def test_the_state_file_is_replaced_not_rewritten(ready: Gateway) -> None:
    inode = ready.state_path.stat().st_ino
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24")
    assert ready.state_path.stat().st_ino != inode
    assert oct(ready.state_path.stat().st_mode & 0o777) == "0o644"
    leftovers = [p.name for p in ready.state_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_call_returns_only_once_natgwd_applied_it(ready: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call is seen polling natgwd's record (natgwd paused) before it may return: a
    call that returned without waiting fails here however slow the machine is."""
    polls = 0
    real = waiting.applied_digest

    def counted(*args: Any) -> str | None:
        nonlocal polls
        polls += 1
        return real(*args)

    monkeypatch.setattr(waiting, "applied_digest", counted)
    ready.applier.pause()
    done: list[Result] = []
    thread = threading.Thread(target=lambda: done.append(ready.call("snat-add", f"{EIP1},172.20.10.0/24")))
    thread.start()
    deadline = time.monotonic() + 30
    while polls < 3 and not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert polls >= 3 and not done, "returned before natgwd applied the change"
    ready.applier.resume()
    thread.join(60)
    assert done and done[0].code == 0
    assert ready.applier.applied[-1] == hashlib.sha256(ready.raw()).hexdigest()


def test_not_applied_in_time_is_an_error(ready: Gateway) -> None:
    ready.applier.pause()
    started = time.monotonic()
    result = ready.call("snat-add", f"{EIP1},172.20.10.0/24", NATGWD_SHIM_TIMEOUT="0.5")
    assert result.code == 1
    assert re.search(r"^natgwd: not applied within 0\.5s", result.err, re.M)
    assert time.monotonic() - started >= 0.5  # it waited its timeout (how much longer: the machine's load)
    assert ready.state()["snat"], "the change stays in the file (natgwd applies it when it can)"


def test_timeout_zero_does_not_wait(ready: Gateway) -> None:
    ready.applier.pause()
    result = ready.call("snat-add", f"{EIP1},172.20.10.0/24", NATGWD_SHIM_TIMEOUT="0")
    assert result.code == 0


def test_an_unchanged_call_still_waits_for_the_current_state(ready: Gateway) -> None:
    """After a restart the controller replays every rule: 'already there' in the file must
    not answer before natgwd has applied the file."""
    ready.applier.pause()
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24", NATGWD_SHIM_TIMEOUT="0")
    result = ready.call("snat-add", f"{EIP1},172.20.10.0/24", NATGWD_SHIM_TIMEOUT="0.3")
    assert result.code == 1 and "not applied" in result.err
    ready.applier.resume()
    assert "nothing to change" in ready.ok("snat-add", f"{EIP1},172.20.10.0/24").out


def test_add_then_delete_does_not_answer_with_the_old_applied_state(ready: Gateway) -> None:
    """(add X, del X) gives back the JSON natgwd applied before; the `del` must still wait
    for natgwd to read the newer file (which it may do after applying the `add`)."""
    ready.applier.pause()
    ready.ok("snat-add", f"{EIP1},172.20.10.0/24", NATGWD_SHIM_TIMEOUT="0")
    result = ready.call("snat-del", f"{EIP1},172.20.10.0/24", NATGWD_SHIM_TIMEOUT="0.3")
    assert result.code == 1, "answered 'applied' from the record of an older generation"


def test_a_later_state_counts_as_applied(ready: Gateway) -> None:
    """natgwd may skip a content and apply a later one: the earlier caller is done too."""
    ready.applier.pause()
    done: list[Result] = []
    first = threading.Thread(target=lambda: done.append(ready.call("snat-add", f"{EIP1},172.20.10.0/24")))
    first.start()
    # The first call's edit is in the file (it waits for natgwd) before the later ones come.
    deadline = time.monotonic() + 60
    while (
        not any(s["internalCIDR"] == "172.20.10.0/24" for s in ready.state().get("snat", []))
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    ready.ok("snat-add", f"{EIP2},172.20.0.0/16", NATGWD_SHIM_TIMEOUT="0")
    ready.ok("snat-add", f"{EIP3},172.20.10.4/32", NATGWD_SHIM_TIMEOUT="0")
    latest = hashlib.sha256(ready.raw()).hexdigest()
    ready.applier.resume()
    first.join(60)
    assert done and done[0].code == 0
    assert ready.applier.applied[-1] == latest
    assert len(ready.applier.applied) == len(set(ready.applier.applied))


def test_a_record_from_before_the_boot_is_not_trusted(ready: Gateway) -> None:
    """After a node reboot a kept record speaks of a network namespace that is gone."""
    ready.applier.stop()
    record = Path(ready.env["NATGWD_APPLIED_STATE"])
    data = json.loads(record.read_text())
    data["applied_at"] = "2001-01-01T00:00:00+00:00"
    record.write_text(json.dumps(data))
    assert waiting.applied_digest(record) == data["sha256"]
    assert waiting.applied_digest(record, not_before=waiting.boot_time()) is None
    result = ready.call("eip-add", f"{EIP1}/21", NATGWD_SHIM_TIMEOUT="0.3")
    assert result.code == 1 and "not applied" in result.err


def test_50_concurrent_calls_in_threads_lose_nothing(ready: Gateway) -> None:
    ready.applier.delay = 0.02  # natgwd applies slower than the calls come: it skips contents
    ports = range(10000, 10050)
    # 50 calls in a row hold the lock in turn: on a loaded machine that takes longer than the
    # fixture's 10 s (as the processes' test below, give them 60).
    with ThreadPoolExecutor(50) as pool:
        results = list(
            pool.map(lambda p: ready.call("dnat-add", f"{EIP1},{p},tcp,{VM1},{p}", NATGWD_SHIM_TIMEOUT="60"), ports)
        )
    assert [r.code for r in results] == [0] * 50, [r.err for r in results if r.code]
    assert {int(d["externalPort"]) for d in ready.state()["dnat"]} == set(ports)
    generations = [g for g, _ in filestate.read_journal(Path(ready.env["NATGWD_STATE"] + ".journal"))]
    assert generations == sorted(set(generations))
    assert len(ready.applier.applied) < 50 + 4, "natgwd applied every content: the test proves less"


def test_50_concurrent_processes_lose_nothing(ready: Gateway) -> None:
    env = {**os.environ, **ready.env, "NATGWD_SHIM_TIMEOUT": "60"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "natgwd.kubeovn.shim", "snat-add", f"{EIP1},10.{i}.0.0/16"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(50)
    ]
    # Routes so that every CIDR is a VPC network (SNAT needs no route, but keep it realistic).
    outcomes = [(p.wait(90), p.stderr.read() if p.stderr else "") for p in processes]
    for process in processes:
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
    assert [code for code, _ in outcomes] == [0] * 50, [err for code, err in outcomes if code]
    cidrs = {s["internalCIDR"] for s in ready.state()["snat"]}
    assert cidrs == {f"10.{i}.0.0/16" for i in range(50)}
    load_state(ready.raw())


def test_the_executable_wrapper_runs_the_shim(ready: Gateway) -> None:
    wrapper = ROOT / "image" / "nat-gateway.sh"
    assert os.access(wrapper, os.X_OK)
    env = {**os.environ, **ready.env, "NATGWD_PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(wrapper), "dnat-add", f"{EIP1},8888,tcp,{VM1},80"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"dnat-add {EIP1},8888,tcp,{VM1},80"
    result = subprocess.run(
        ["bash", str(wrapper), "dnat-add", f"{EIP1},8888,tcp,{VM2},80"], env=env, text=True, capture_output=True
    )
    assert result.returncode == 1 and "already goes to" in result.stderr
    # QoS calls through the wrapper too: their errors are the shim's, not a traceback
    result = subprocess.run(
        ["bash", str(wrapper), "eip-egress-qos-add", f"{EIP1},1,fast,1"], env=env, text=True, capture_output=True
    )
    assert (result.returncode, result.stderr) == (1, "natgwd: rate 'fast' is not a number\n")
    result = subprocess.run(
        ["bash", str(wrapper), "eip-egress-qos-add", f"{EIP1},1,20,1"], env=env, text=True, capture_output=True
    )
    assert result.returncode == 0, result.stderr
