"""natgwd against other NAT gateway data planes, on the same rule sets, in namespaces.

    python -m benchmarks [--sizes 100,1000,10000,50000] [--rounds 10] ...   (as root)

For each N and each method, in a gateway namespace of its own (natgwd.lab.topology.Lab: gw, lan,
ext, vm1), the same generated rule set (benchmarks.rulesets) is:

1. applied in full (repeated; between repeats the gateway goes back to no NAT rules);
2. changed one rule at a time: rounds of add one DNAT, change one's target, delete one;
3. crossed by new TCP connections (benchmarks/connrate.c, client in ext, server in vm1)
   through DNAT to the last rule, for a fixed time;
4. for natgwd: its RSS and the time of a /metrics scrape.

Then, at one size, every method's gateway at once (and a plain router), crossed by iperf3
through DNAT (ext -> EIP -> vm1) and SNAT (vm1 -> ext), the methods interleaved run by
run (A run 1, B run 1, ..., A run 2, ...) so that the machine's drifting load falls on
every method alike; natgwd is measured running and stopped by SIGTERM (its table left in
place) in turn, the fair measure of what the daemon costs the data plane.

The methods:

- natgwd: the daemon (python -m natgwd run) as deployed; the state file is replaced
  (rename) and the time runs until natgwd's applied-state record names that file's sha256
  (written once the kernel holds it), so it includes the file watcher's polling.
- floor: natgwd's own nftables script for the same change (rendered beforehand by
  natgwd's planning code), loaded with one `nft -f FILE`.
- iptables-restore: Kube-OVN's chain layout in iptables-legacy, applied as a careful
  implementation would (Neutron's iptables manager): iptables-save, render the whole nat
  table, one iptables-restore. A change does the same.
- per-rule exec: Kube-OVN's nat-gateway.sh pattern (benchmarks/kubeovn_model.sh): one bash
  process per rule, each running iptables-save dumps and one iptables-legacy command. A
  change is one call (change: dnat-del + dnat-add, as the controller updates a rule).
- naive nftables: the same rules as nftables rules, one per NAT entry with a counter, in
  a table of its own; every apply replaces the table in one transaction (nft -f).

Results: benchmarks/results/bench-<UTC timestamp>.json, then benchmarks/RESULTS.md and
the plots are rendered from it (python -m benchmarks.report FILE renders again).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import rulesets
from benchmarks.netns import Netns, bare_gateway
from benchmarks.rulesets import SERVER_PORT, Step, Workload
from benchmarks.stats import percentile, rss_of, summary, write_results
from natgwd.lab.topology import EXTERNAL_HOST, VM_ADDRESSES, Lab
from natgwd.planning.layout import RULE_CONNECTIONS, shards
from natgwd.runtime.daemon import POLL_SECONDS

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
MODEL = BENCH_DIR / "kubeovn_model.sh"
CONNRATE_SOURCE = BENCH_DIR / "connrate.c"
DEFAULT_SIZES = (100, 1000, 10000, 50000)
METHODS = ("natgwd", "floor", "iptables-restore", "per-rule-exec", "naive-nft")
COMPETITORS = ("natgwd", "iptables-restore", "per-rule-exec", "naive-nft")  # the floor is a reference
METHOD_TITLES = {
    "natgwd": "natgwd",
    "floor": "floor (nft -f of natgwd's script)",
    "iptables-restore": "iptables-restore (Kube-OVN layout)",
    "per-rule-exec": "per-rule exec (nat-gateway.sh model)",
    "naive-nft": "naive nftables",
}
METHOD_DESCRIPTIONS = {
    "natgwd": "the daemon as deployed (python -m natgwd run, --resync-interval 3600 so that no periodic "
    "resync lands in a measurement): the state file is replaced by a rename and the time runs from the rename "
    "until natgwd's "
    "applied-state record (written once the kernel holds the change) names the new file's sha256. Includes "
    f"noticing the new file (inotify, else a stat() poll every {POLL_SECONDS} s), reading, "
    "validating, planning, the nftables transaction, the links check and conntrack cleanup.",
    "floor": "the same content natgwd sends, straight to the kernel: natgwd's own nftables script, rendered "
    "beforehand with natgwd's planning code (the full table from scratch, or the incremental transaction of a "
    "change), loaded with one `nft -f FILE`. natgwd's overhead is its time divided by this.",
    "iptables-restore": "Kube-OVN's chain layout (DNAT_FILTER/SNAT_FILTER -> EXCLUSIVE_DNAT/SNAT for FIPs, "
    "SHARED_DNAT, SHARED_SNAT longest prefix first, one HAIRPIN_SNAT rule per EIP, mangle VPC_MARK) in "
    "iptables-legacy, applied as a careful implementation does (Neutron's iptables manager): iptables-save, "
    "render the whole nat table, load it with one iptables-restore. A one-rule change does the same.",
    "per-rule-exec": "the pattern of Kube-OVN's nat-gateway.sh, modelled in benchmarks/kubeovn_model.sh from its "
    "description (not copied): one bash process per rule, as the controller execs the script once per rule; "
    "each runs `iptables-save -t nat | grep` (check_inited), `iptables-save | grep` (the idempotency check) and "
    "one `iptables-legacy -t nat -A/-I/-D` (which rewrites the whole table in the legacy backend); EIPs "
    "`ip addr replace` + the hairpin rule, DNAT deletes `conntrack -D`. Same chain layout as iptables-restore. "
    "Left out: arping on eip-add (about 2 s each) and the controller's exec transport through the API server "
    "and kubelet, so this is a lower bound. A change is one call; changing a DNAT's target is dnat-del + "
    "dnat-add, as the controller does.",
    "naive-nft": "the same rules as nftables rules, one per NAT entry (FIP in and out, SNAT longest prefix first, "
    "DNAT, hairpin per EIP), each with a counter, in a table of its own (ip naive_nat) with nat chains; every "
    "apply, a change too, re-renders the table and replaces it in one transaction (nft -f -).",
}
CHANGE_KINDS = ("add", "change", "delete")
EXEC_ALWAYS_UP_TO = 1000  # per-rule exec runs up to this N (within --exec-budget); above, only if predicted to fit
APPLIED_POLL_SECONDS = 0.002
NATGWD_SETTLE_SECONDS = 2.5  # after the base state: natgwd's gratuitous ARPs (3 rounds, 1 s apart)


class OverBudgetError(Exception):
    pass


# --- the run's context ------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    connrate: Path
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def spawn(self, ns: Netns, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = ns.popen(argv, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = 5) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in list(self.processes):
            self.stop(process, timeout=2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the gateways -----------------------------------------------------------------------


class Gateway:
    """One method's gateway in a Lab: set up untimed, then timed applies and changes."""

    name = ""

    def __init__(self, lab: Lab, ctx: Context, work: Workload) -> None:
        self.lab, self.ctx, self.work = lab, ctx, work
        self.gw = Netns(lab.ns("gw"))
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=ctx.tmp))

    def close(self) -> None:
        self.gw.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # untimed
    def setup(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def verify(self, state: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # timed: seconds
    def full_apply(self) -> float:
        raise NotImplementedError

    def change(self, step: Step) -> float:
        raise NotImplementedError

    def extras(self) -> dict[str, Any]:
        return {}

    def preload(self) -> str:
        """Install the full rule set another way when this method's full apply is over
        budget, so that changes and connections can still be measured at this size."""
        raise OverBudgetError("no other way to install the rules")

    # helpers
    def _configure_links(self, state: dict[str, Any] | None = None) -> None:
        self.gw.run(["ip", "-batch", "-"], input=rulesets.gateway_ip_batch(state or self.work.state))
        self.gw.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])

    def _timed(self, argv: list[str], input: str | None = None) -> float:  # noqa: A002
        started = time.perf_counter()
        self.gw.run(argv, input=input, timeout=600)
        return time.perf_counter() - started


class NatgwdGateway(Gateway):
    name = "natgwd"

    def base_state(self) -> dict[str, Any]:
        """What the daemon starts from, untimed (the full state's EIPs: only the rules are timed)."""
        return self.work.base()

    def setup(self) -> None:
        self.base = rulesets.encode(self.base_state())
        self.full = rulesets.encode(self.work.state)
        self.daemon = self.lab.start_natgwd(self.base, "--resync-interval", "3600")
        self.pid = self.daemon.process.pid
        self.events: list[dict[str, Any]] = []
        self._wait(hashlib.sha256(self.base).hexdigest(), timeout=120)
        time.sleep(NATGWD_SETTLE_SECONDS)
        self.rss_idle = rss_of(self.pid)

    def _wait(self, digest: str, timeout: float) -> None:
        """Until natgwd's applied-state record names `digest` (the daemon writes it after
        the kernel holds the state, just before /readyz turns to it); /readyz is asked too,
        now and then, in case the record is not written."""
        path = self.lab.applied_state_path
        wanted = digest.encode()
        deadline = time.monotonic() + timeout
        next_readyz = time.monotonic() + 0.5
        while True:
            with contextlib.suppress(OSError), path.open("rb") as record:
                if wanted in record.read(160):
                    return
            now = time.monotonic()
            if now >= next_readyz:
                next_readyz = now + 0.5
                with contextlib.suppress(OSError, ValueError):
                    status, body = self.gw.http_get(self.daemon.metrics_port, "/readyz", timeout=5)
                    if status == 200 and json.loads(body).get("applied_sha256") == digest:
                        return
                if self.daemon.process.poll() is not None:
                    raise RuntimeError(f"natgwd exited:\n{self.daemon.log()[-3000:]}")
            if now > deadline:
                raise TimeoutError(f"natgwd did not apply {digest[:12]} in {timeout}s:\n{self.daemon.log()[-3000:]}")
            time.sleep(APPLIED_POLL_SECONDS)

    def _write_and_wait(self, raw: bytes, kind: str) -> float:
        from natgwd.runtime.daemon import POLL_SECONDS

        digest = hashlib.sha256(raw).hexdigest()
        # An independent writer lands at a random moment of the watcher's period.
        time.sleep(self.ctx.rng.uniform(0, POLL_SECONDS))
        # The clock starts at the rename that makes the new file the state file (as
        # Natgwd.write_state does it): writing the writer's copy is the writer's time.
        path = self.daemon.state_path
        path.with_suffix(".tmp").write_bytes(raw)
        started = time.perf_counter()
        os.replace(path.with_suffix(".tmp"), path)
        self._wait(digest, timeout=900)
        seconds = time.perf_counter() - started
        self.events.append({"kind": kind, "sha256": digest, "seconds": seconds})
        return seconds

    def stop_daemon(self) -> None:
        """SIGTERM: natgwd exits and leaves its table in the kernel."""
        self.daemon.stop()

    def start_daemon(self) -> None:
        """Again on the full state, when stopped; back once it has applied it."""
        if self.daemon.process.poll() is None:
            return
        self.lab.applied_state_path.unlink(missing_ok=True)  # the record of the run before names the same file
        self.daemon = self.lab.start_natgwd(self.full, "--resync-interval", "3600")
        self.pid = self.daemon.process.pid
        self._wait(hashlib.sha256(self.full).hexdigest(), timeout=120)
        time.sleep(NATGWD_SETTLE_SECONDS)

    def reset(self) -> None:
        self._write_and_wait(self.base, "reset")

    def full_apply(self) -> float:
        seconds = self._write_and_wait(self.full, "full")
        self.rss_full = rss_of(self.pid)
        return seconds

    def change(self, step: Step) -> float:
        return self._write_and_wait(rulesets.encode(step.state), step.kind)

    def verify(self, state: dict[str, Any]) -> dict[str, Any]:
        return verify_natgwd_table(self.gw, state)

    def extras(self) -> dict[str, Any]:
        scrapes = []
        size = 0
        for _ in range(self.ctx.args.scrapes):
            started = time.perf_counter()
            status, body = self.gw.http_get(self.daemon.metrics_port, "/metrics", timeout=300)
            scrapes.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
            size = len(body)
        rss_scraped = rss_of(self.pid)
        logged = daemon_log(self.daemon.log())
        for event in self.events:
            line = logged.get(event["sha256"][:12], {})
            event["daemon_seconds"] = line.get("seconds")
            event["daemon_nft_seconds"] = line.get("nft_seconds")
        return {
            "rss_kb": {"idle_no_rules": self.rss_idle, "after_full_apply": self.rss_full, "after_scrapes": rss_scraped},
            "scrape": summary(scrapes),
            "metrics_bytes": size,
            "events": self.events,
        }


def applied_records(text: str) -> Iterator[dict[str, Any]]:
    """natgwd's "desired state applied" lines in a log, in order: each its sha256[:12]
    (None for an edit's), its own seconds (from reading the file to the end of the apply)
    and the seconds of the nftables transaction before it (None if none ran)."""
    nft_seconds = None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("event") == "nftables transaction applied":
            nft_seconds = record.get("seconds")
        elif record.get("event") == "desired state applied":
            yield {"sha256": record.get("sha256"), "seconds": record.get("seconds"), "nft_seconds": nft_seconds}
            nft_seconds = None


def daemon_log(text: str) -> dict[str, dict[str, Any]]:
    """sha256[:12] -> natgwd's last "desired state applied" line for it (applied_records)."""
    return {r["sha256"]: r for r in applied_records(text) if r["sha256"] is not None}


def verify_natgwd_table(gw: Netns, state: dict[str, Any]) -> dict[str, Any]:
    rules = 0
    # A baseline tree from before the counting sets were split keeps one set.
    unsplit = gw.run(["nft", "-j", "list", "set", "inet", "natgwd", RULE_CONNECTIONS], check=False)
    for name in [RULE_CONNECTIONS] if unsplit.returncode == 0 else shards(RULE_CONNECTIONS):
        listing = json.loads(gw.run(["nft", "-j", "list", "set", "inet", "natgwd", name]).stdout)
        rules += sum(len(o["set"].get("elem", [])) for o in listing["nftables"] if "set" in o)
    wanted = sum(len(state[kind]) for kind in ("dnat", "snat", "fip"))
    if rules != wanted:
        raise RuntimeError(f"natgwd table holds {rules} rules, expected {wanted}")
    return {"rules": rules}


class FloorGateway(Gateway):
    name = "floor"

    def setup(self) -> None:
        self._configure_links()
        self._render_full()

    def _render_full(self) -> None:
        self.planner = rulesets.FloorPlanner(self.work.state)
        self.full_path = self.tmp / "full.nft"
        self.full_path.write_text(self.planner.full_script)
        self.script_bytes: dict[str, int] = {"full": len(self.planner.full_script)}

    def reset(self) -> None:
        self.gw.run(["nft", "-f", "-"], input=rulesets.floor_delete_script())

    def full_apply(self) -> float:
        return self._timed(["nft", "-f", str(self.full_path)])

    def change(self, step: Step) -> float:
        path = self.tmp / "change.nft"
        path.write_text(self.planner.next_script(step.state))
        return self._timed(["nft", "-f", str(path)])

    def verify(self, state: dict[str, Any]) -> dict[str, Any]:
        return verify_natgwd_table(self.gw, state)


class IptablesGateway(Gateway):
    """Shared by iptables-restore and per-rule exec: Kube-OVN's layout in iptables-legacy."""

    def setup(self) -> None:
        self._configure_links()
        self.gw.run(["bash", str(MODEL), "init"], timeout=60)

    def reset(self) -> None:
        self.gw.run(["iptables-legacy-restore", "-w"], input=rulesets.iptables_empty_nat_table())

    def verify(self, state: dict[str, Any]) -> dict[str, Any]:
        saved = self.gw.run(["iptables-legacy-save", "-t", "nat"]).stdout
        chains = {chain: 0 for chain in rulesets.KUBEOVN_CHAINS}
        for line in saved.splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[0] == "-A" and parts[1] in chains:
                chains[parts[1]] += 1
        expected = {
            "SHARED_DNAT": len(state["dnat"]),
            "SHARED_SNAT": len(state["snat"]),
            "EXCLUSIVE_DNAT": len(state["fip"]),
            "EXCLUSIVE_SNAT": len(state["fip"]),
            "HAIRPIN_SNAT": len(state["eips"]),
        }
        for chain, count in expected.items():
            if chains[chain] != count:
                raise RuntimeError(f"{self.name}: {chain} holds {chains[chain]} rules, expected {count}")
        return {"rules": sum(expected.values())}


class IptablesRestoreGateway(IptablesGateway):
    name = "iptables-restore"

    def _apply(self, state: dict[str, Any]) -> float:
        started = time.perf_counter()
        self.gw.run(["iptables-legacy-save", "-t", "nat"], timeout=600)  # what a manager reads first
        table = rulesets.iptables_nat_table(state)
        self.gw.run(["iptables-legacy-restore", "-w"], input=table, timeout=600)
        return time.perf_counter() - started

    def full_apply(self) -> float:
        return self._apply(self.work.state)

    def change(self, step: Step) -> float:
        return self._apply(step.state)


class PerRuleExecGateway(IptablesGateway):
    name = "per-rule-exec"

    def setup(self) -> None:
        super().setup()
        self.calls = rulesets.kubeovn_calls(self.work.state)
        self.calls_path = self.tmp / "calls"
        self.calls_path.write_text("".join(f"{sub} {arg}\n" for sub, arg in self.calls))
        self.env = {**os.environ, "GATEWAY_V4": self.work.state["external"]["gateway"]}

    def full_apply(self) -> float:
        progress = self.tmp / "progress"
        progress.write_text("")
        budget = self.ctx.args.exec_budget
        started = time.perf_counter()
        process = self.ctx.spawn(
            self.gw,
            ["bash", str(MODEL), "run", str(self.calls_path), str(progress)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = process.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            self.ctx.stop(process)
            done = len(progress.read_text().split())
            raise OverBudgetError(
                f"stopped after {budget:.0f} s with {done:,} of {len(self.calls):,} calls done"
            ) from None
        seconds = time.perf_counter() - started
        self.ctx.stop(process)
        if process.returncode != 0:
            raise RuntimeError(f"per-rule exec failed: {stderr.decode(errors='replace')[-2000:]}")
        return seconds

    def preload(self) -> str:
        self.gw.run(["iptables-legacy-restore", "-w"], input=rulesets.iptables_nat_table(self.work.state), timeout=600)
        return "the same rules loaded with iptables-restore"

    def change(self, step: Step) -> float:
        started = time.perf_counter()
        for sub, arg in step.calls:
            self.gw.run(["bash", str(MODEL), sub, arg])
        return time.perf_counter() - started


class NaiveNftGateway(Gateway):
    name = "naive-nft"

    def setup(self) -> None:
        self._configure_links()

    def reset(self) -> None:
        self.gw.run(["nft", "delete", "table", "ip", rulesets.NAIVE_TABLE])

    def _apply(self, state: dict[str, Any]) -> float:
        started = time.perf_counter()
        self.gw.run(["nft", "-f", "-"], input=rulesets.naive_nft_script(state), timeout=600)
        return time.perf_counter() - started

    def full_apply(self) -> float:
        return self._apply(self.work.state)

    def change(self, step: Step) -> float:
        return self._apply(step.state)

    def verify(self, state: dict[str, Any]) -> dict[str, Any]:
        listing = json.loads(self.gw.run(["nft", "-j", "list", "table", "ip", rulesets.NAIVE_TABLE]).stdout)
        rules = sum(1 for o in listing["nftables"] if "rule" in o)
        wanted = rulesets.naive_rule_count(state)
        if rules != wanted:
            raise RuntimeError(f"naive table holds {rules} rules, expected {wanted}")
        return {"rules": rules}


GATEWAYS: dict[str, type[Gateway]] = {
    "natgwd": NatgwdGateway,
    "floor": FloorGateway,
    "iptables-restore": IptablesRestoreGateway,
    "per-rule-exec": PerRuleExecGateway,
    "naive-nft": NaiveNftGateway,
}


# --- traffic ----------------------------------------------------------------------------


def wait_listening(ns: Netns, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} in {ns.name}")


def connection_rate(
    ctx: Context, client: Netns, server: Netns, gw: Netns, address: str, port: int, seconds: float, repeats: int
) -> dict[str, Any]:
    """Runs of connrate's client against its server in vm1 (port SERVER_PORT)."""
    client.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
    process = ctx.spawn(server, [str(ctx.connrate), "server", str(SERVER_PORT)], stdout=subprocess.DEVNULL)
    runs: list[dict[str, Any]] = []
    try:
        wait_listening(server, SERVER_PORT)
        argv = [str(ctx.connrate), "client", address, str(port)]
        probe = json.loads(client.run([*argv, "0.3", str(ctx.args.conn_concurrency)], timeout=30).stdout)
        if probe["connections"] == 0:
            raise RuntimeError(f"no connection reached {address}:{port}: {probe}")
        for _ in range(repeats):
            gw.run(["conntrack", "-F"], check=False)  # each run starts with an empty table
            out = client.run([*argv, str(seconds), str(ctx.args.conn_concurrency)], timeout=seconds + 30).stdout
            runs.append(json.loads(out))
    finally:
        ctx.stop(process)
    result = summary([r["rate"] for r in runs])
    result["runs"] = runs
    return result


def iperf(ctx: Context, client: Netns, server: Netns, address: str, port: int, listen_port: int) -> dict[str, Any]:
    """One iperf3 run (TCP, one stream): Gbit/s received, and the client address the
    server saw (tells whether the flow was source-NATed)."""
    seconds = ctx.args.iperf_seconds
    process = ctx.spawn(
        server,
        ["iperf3", "-s", "-1", "-J", "-p", str(listen_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(server, listen_port)
        out = client.run(
            ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"],
            timeout=seconds + 30,
        ).stdout
        report = json.loads(out)
        try:
            server_out, _ = process.communicate(timeout=10)
            seen = json.loads(server_out)["start"]["connected"][0]["remote_host"]
        except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
            seen = None
    finally:
        ctx.stop(process)
    return {"gbit_s": report["end"]["sum_received"]["bits_per_second"] / 1e9, "server_saw": seen}


IPERF_PATHS = ("dnat", "snat")
NATGWD_STOPPED = "natgwd-stopped"  # the natgwd gateway's table with the daemon stopped by SIGTERM
THROUGHPUT_TITLES = {
    "plain": "no NAT (plain routing)",
    NATGWD_STOPPED: "natgwd stopped (SIGTERM; its table left in place)",
}


def iperf_paths(ctx: Context, lab: Lab, dnat: tuple[str, int], snat_expect: str | None) -> dict[str, Any]:
    """One iperf3 run on each path: DNAT (ext -> dnat -> vm1) and SNAT (vm1 -> ext)."""
    ext, vm = Netns(lab.ns("ext")), Netns(lab.ns("vm1"))
    try:
        out = {
            "dnat": iperf(ctx, ext, vm, dnat[0], dnat[1], SERVER_PORT),
            "snat": iperf(ctx, vm, ext, EXTERNAL_HOST, 5201, 5201),
        }
        if snat_expect and out["snat"]["server_saw"] not in (None, snat_expect):
            raise RuntimeError(f"SNAT path: the server saw {out['snat']['server_saw']}, not the EIP {snat_expect}")
        return out
    finally:
        ext.close()
        vm.close()


def run_throughput(ctx: Context, work: Workload) -> dict[str, Any]:
    """Every method's gateway (and a plain router) built side by side, then iperf3 run
    by run in turn: row A run 1, row B run 1, ..., row A run 2, ... natgwd's row is
    followed by the same table with natgwd stopped (SIGTERM), and natgwd starts again
    before its next run."""
    args = ctx.args
    rows: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    loadavg_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        stack.callback(ctx.stop_all)
        targets: dict[str, tuple[Lab, tuple[str, int], str | None]] = {}
        plain = stack.enter_context(Lab(vms=(VM_ADDRESSES[0],)))
        plain_router(plain)
        targets["plain"] = (plain, (VM_ADDRESSES[0], SERVER_PORT), None)
        natgwd: NatgwdGateway | None = None
        for method in args.methods:
            lab = stack.enter_context(Lab(vms=(VM_ADDRESSES[0],)))
            gateway = GATEWAYS[method](lab, ctx, work)
            stack.callback(gateway.close)
            gateway.setup()
            if method == "per-rule-exec":
                gateway.preload()  # the same iptables rules; its full apply takes minutes
            else:
                gateway.full_apply()
            gateway.verify(work.state)
            targets[method] = (lab, (work.conn.eip, work.conn.port), work.snat_eip)
            if isinstance(gateway, NatgwdGateway):
                natgwd = gateway
                targets[NATGWD_STOPPED] = targets[method]
        order = list(targets)
        log(f"throughput N={work.n:,}: {args.iperf_repeats} runs of {args.iperf_seconds:g} s, in turn: {order}")
        for run in range(args.iperf_repeats):
            for row in order:
                lab, dnat, snat_expect = targets[row]
                if row == "natgwd" and natgwd is not None:
                    natgwd.start_daemon()
                elif row == NATGWD_STOPPED and natgwd is not None:
                    natgwd.stop_daemon()
                    natgwd.verify(work.state)  # SIGTERM left the table in place
                measured = iperf_paths(ctx, lab, dnat, snat_expect)
                rows.setdefault(row, []).append(measured)
                log(
                    f"  run {run + 1} {row}: DNAT {measured['dnat']['gbit_s']:.1f}, "
                    f"SNAT {measured['snat']['gbit_s']:.1f} Gbit/s"
                )
    result: dict[str, Any] = {
        "n": work.n,
        "seconds": args.iperf_seconds,
        "runs": args.iperf_repeats,
        "order": order,
        "titles": {row: THROUGHPUT_TITLES.get(row, METHOD_TITLES.get(row, row)) for row in order},
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "wall_seconds": time.monotonic() - started,
        "rows": {},
    }
    for row, runs in rows.items():
        result["rows"][row] = {
            path: summary([r[path]["gbit_s"] for r in runs]) | {"server_saw": runs[0][path]["server_saw"]}
            for path in IPERF_PATHS
        }
    return result


# --- one cell: a method at a size -------------------------------------------------------


def run_cell(
    ctx: Context, method: str, work: Workload, steps: list[Step], full_skip: str | None = None
) -> dict[str, Any]:
    """One method at one size. With `full_skip` (or when the full apply goes over
    budget) the full apply is reported as not run and the rules are installed another way
    (Gateway.preload) for the other measurements."""
    args = ctx.args
    cell: dict[str, Any] = {"status": "ok", "loadavg_start": os.getloadavg()}
    started = time.monotonic()
    with Lab(vms=(VM_ADDRESSES[0],)) as lab:
        gateway = GATEWAYS[method](lab, ctx, work)
        ext, vm = Netns(lab.ns("ext")), Netns(lab.ns("vm1"))
        try:
            gateway.setup()
            # 1. full apply
            full: list[float] = []
            skipped = full_skip
            try:
                for attempt in range(0 if skipped else args.full_repeats):
                    if attempt:
                        gateway.reset()
                    full.append(gateway.full_apply())
                    if sum(full) + full[-1] > args.cell_budget:
                        break
            except OverBudgetError as err:
                if full:
                    gateway.reset()
                    gateway.preload()
                else:
                    skipped = str(err)
            if skipped:
                cell["full"] = {"n": 0, "not_run": skipped}
                cell["preloaded"] = gateway.preload()
                log(f"  {method} N={work.n}: full apply not run (over budget): {skipped}; {cell['preloaded']}")
            else:
                cell["full"] = summary(full)
                log(f"  {method} N={work.n}: full apply {statistics_line(full)}")
            cell["verified"] = gateway.verify(work.state)
            # 2. one change at a time
            changes: dict[str, list[float]] = {kind: [] for kind in CHANGE_KINDS}
            phase = time.monotonic()
            for index, step in enumerate(steps):
                # Whole rounds; the budget counts wall time (natgwd's pauses, the floor's
                # untimed rendering) so that the run's length stays bounded.
                if index % 3 == 0 and index // 3 >= args.min_rounds and time.monotonic() - phase > args.cell_budget:
                    break
                changes[step.kind].append(gateway.change(step))
            cell["changes"] = {kind: summary(values) for kind, values in changes.items()}
            cell["changes"]["all"] = summary([v for values in changes.values() for v in values])
            done = sum(len(values) for values in changes.values())
            if done:
                cell["verified_after_changes"] = gateway.verify(steps[done - 1].state)
            log(f"  {method} N={work.n}: one change {statistics_line(cell['changes']['all'].get('values', []))}")
            # 3. new connections through DNAT to the last rule
            cell["conn"] = connection_rate(
                ctx, ext, vm, gateway.gw, work.conn.eip, work.conn.port, args.conn_seconds, args.conn_repeats
            )
            log(f"  {method} N={work.n}: {cell['conn']['median']:,.0f} connections/s")
            # 4. natgwd: memory, scrape
            extras = gateway.extras()
            if extras:
                cell["natgwd"] = extras
        finally:
            ctx.stop_all()
            ext.close()
            vm.close()
            gateway.close()
    cell["wall_seconds"] = time.monotonic() - started
    return cell


def statistics_line(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values) * 1000, max(values) * 1000
    return f"median {percentile(values, 50) * 1000:.1f} ms (n={len(values)}, {low:.1f}-{high:.1f})"


def plain_router(lab: Lab) -> None:
    """The gateway only routes, and ext reaches the VMs' network through it."""
    state = rulesets.plain_routing_state()
    gw, ext = Netns(lab.ns("gw")), Netns(lab.ns("ext"))
    try:
        gw.run(["ip", "-batch", "-"], input=rulesets.gateway_ip_batch(state))
        gw.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        gw_external = state["external"]["addresses"][0].split("/")[0]
        ext.run(["ip", "route", "add", rulesets.LAN_CIDR, "via", gw_external])
    finally:
        gw.close()
        ext.close()


def run_plain_routing(ctx: Context) -> dict[str, Any]:
    """No NAT: the gateway only routes; the clients reach vm1's own address."""
    with Lab(vms=(VM_ADDRESSES[0],)) as lab:
        gw, ext, vm = Netns(lab.ns("gw")), Netns(lab.ns("ext")), Netns(lab.ns("vm1"))
        try:
            plain_router(lab)
            result: dict[str, Any] = {
                "conn": connection_rate(
                    ctx, ext, vm, gw, VM_ADDRESSES[0], SERVER_PORT, ctx.args.conn_seconds, ctx.args.conn_repeats
                )
            }
            log(f"  no NAT: {result['conn']['median']:,.0f} connections/s")
            return result
        finally:
            ctx.stop_all()
            for ns in (gw, ext, vm):
                ns.close()


# --- profile ----------------------------------------------------------------------------


def needs_profile(results: dict[str, Any]) -> list[str]:
    """Where natgwd is not the fastest, or more than 1.5x the floor."""
    reasons = []
    for n in results["sizes"]:
        key = str(n)
        cells = {m: results["cells"].get(m, {}).get(key, {}) for m in METHODS}
        ok = {m: c for m, c in cells.items() if c.get("status") == "ok"}
        if "natgwd" not in ok:
            continue
        natgwd = ok["natgwd"]
        for metric, part, better in (
            ("full apply", ("full",), min),
            ("one change", ("changes", "all"), min),
            ("connections/s", ("conn",), max),
        ):

            def get(c: dict[str, Any], part: tuple[str, ...] = part) -> float | None:
                for key in part:
                    c = c.get(key, {})
                return c.get("median") if c.get("n") else None

            values = {m: v for m, c in ok.items() if m in COMPETITORS and (v := get(c)) is not None}
            mine = get(natgwd)
            if mine is None:
                continue
            best = better(values, key=values.__getitem__)
            if best != "natgwd":
                reasons.append(f"N={n:,}: {metric}: {best} beats natgwd")
            floor = get(ok["floor"]) if "floor" in ok else None
            if floor and metric != "connections/s" and mine / floor > 1.5:
                reasons.append(f"N={n:,}: {metric}: natgwd is {mine / floor:.1f}x the floor")
    return reasons


def run_profile(ctx: Context, n: int) -> dict[str, Any]:
    """cProfile of natgwd's daemon path (Daemon.reconcile_file: read, sha256, validate,
    plan, nftables, links, conntrack, applied record) in a fresh namespace: the full
    apply and one change."""
    work = rulesets.workload(n)
    steps = rulesets.change_steps(work, 1)
    directory = Path(tempfile.mkdtemp(prefix="profile-", dir=ctx.tmp))
    (directory / "base.json").write_bytes(rulesets.encode(work.base()))
    (directory / "full.json").write_bytes(rulesets.encode(work.state))
    (directory / "change.json").write_bytes(rulesets.encode(steps[1].state))
    try:
        with bare_gateway("ngwprof") as namespace, (directory / "worker.log").open("wb") as stderr:
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    namespace,
                    sys.executable,
                    "-m",
                    "benchmarks.profile_natgwd",
                    str(directory),
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                check=True,
                timeout=1200,
            )
        result: dict[str, Any] = json.loads((directory / "profile.json").read_text())
        result["n"] = n
        return result
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- the machine ------------------------------------------------------------------------


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    meminfo = Path("/proc/meminfo").read_text()
    memory = re.search(r"MemTotal:\s*(\d+)", meminfo)
    debian = Path("/etc/debian_version")
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cpus": os.cpu_count(),
        "memory_gb": round(int(memory.group(1)) / 1024 / 1024, 1) if memory else None,
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
    }


def versions() -> dict[str, Any]:
    try:
        import matplotlib

        mpl = matplotlib.__version__
    except ImportError:
        mpl = "missing"
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--short", "natgwd"], capture_output=True, text=True).stdout.strip()
    return {
        "natgwd": f"{head or 'unknown'}{' + uncommitted changes in natgwd/' if dirty else ''}",
        "python": platform.python_version(),
        "nft": first_line(["nft", "--version"]),
        "iptables": first_line(["iptables-legacy", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "gcc": first_line(["gcc", "--version"]),
        "conntrack": first_line(["conntrack", "--version"]),
        "matplotlib": mpl,
    }


REQUIRED_TOOLS = {
    "nft": "nftables",
    "iptables-legacy": "iptables",
    "iptables-legacy-save": "iptables",
    "iptables-legacy-restore": "iptables",
    "iperf3": "iperf3",
    "gcc": "gcc libc6-dev",
    "conntrack": "conntrack",
    "ss": "iproute2",
    "ip": "iproute2",
}


def check_prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (it creates network namespaces)")
    missing = sorted({package for tool, package in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        problems.append(f"missing tools; apt-get install {' '.join(missing)}")
    return problems


def compile_connrate(directory: Path) -> Path:
    binary = directory / "connrate"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(CONNRATE_SOURCE)], check=True)
    return binary


def wait_for_load(limit: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        log(f"load average {os.getloadavg()[0]:.2f} >= {limit}: waiting")
        time.sleep(20)


# --- main -------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    return [int(part.replace("_", "").replace(",", "")) for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="natgwd against per-rule exec (Kube-OVN), iptables-restore, naive nftables and the floor.",
    )
    p.add_argument("--sizes", type=lambda s: parse_sizes(s), default=list(DEFAULT_SIZES), help="N, comma-separated")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS), help="comma-separated")
    p.add_argument("--full-repeats", type=int, default=3, help="full applies per cell (within --cell-budget)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of add/change/delete per cell")
    p.add_argument("--min-rounds", type=int, default=3, help="rounds run even over --cell-budget")
    p.add_argument(
        "--cell-budget",
        type=float,
        default=20,
        help="seconds per cell for full-apply repeats (timed seconds) and for rounds of changes (wall time)",
    )
    p.add_argument(
        "--exec-budget",
        type=float,
        default=120,
        help=f"per-rule exec: stopped when a full apply takes longer; above N={EXEC_ALWAYS_UP_TO:,}, not run when "
        "predicted (quadratic growth from the size before) to take longer",
    )
    p.add_argument("--conn-seconds", type=float, default=2)
    p.add_argument("--conn-repeats", type=int, default=3)
    p.add_argument("--conn-concurrency", type=int, default=16, help="connections in flight")
    p.add_argument("--iperf-n", type=int, default=1000, help="the size at which iperf3 runs")
    p.add_argument("--iperf-seconds", type=float, default=5, help="length of one iperf3 run")
    p.add_argument("--iperf-repeats", type=int, default=5, help="iperf3 runs per method and path, interleaved")
    p.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the throughput section (iperf3, methods in turn) at --iperf-n",
    )
    p.add_argument("--scrapes", type=int, default=3)
    p.add_argument(
        "--cold-sizes",
        type=lambda s: parse_sizes(s),
        default="10000,50000",
        help="a cold start with the EIPs inside the clock (benchmarks.cold_start) at these N; '' for none",
    )
    p.add_argument("--cold-repeats", type=int, default=3, help="cold starts per method and size")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--profile-n", type=int, default=10000, help="profile at this size (or the largest below)")
    p.add_argument("--wait-load", type=float, default=0, help="first wait until the 1-minute load is below this")
    p.add_argument("--wait-load-timeout", type=float, default=1200)
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--markdown", type=Path, default=BENCH_DIR / "RESULTS.md")
    return p


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every namespace and process is removed."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        print(f"unknown methods: {sorted(unknown)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    problems = check_prerequisites()
    if problems:
        print("cannot run the benchmark: " + "; ".join(problems), file=sys.stderr)
        return 1
    if args.wait_load:
        wait_for_load(args.wait_load, args.wait_load_timeout)
    if not args.throughput_only and args.iperf_n not in args.sizes:
        args.iperf_n = min(args.sizes, key=lambda n: abs(n - args.iperf_n))
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {
        "benchmark": "natgwd comparative benchmark",
        "format": 1,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "loadavg_start": os.getloadavg(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": args.sizes,
        "methods": {m: {"title": METHOD_TITLES[m], "description": METHOD_DESCRIPTIONS[m]} for m in args.methods},
        "mix": {},
        "cells": {m: {} for m in args.methods},
    }
    started = time.monotonic()
    with terminated_as_exit(), tempfile.TemporaryDirectory(prefix="natgwd-compare-") as tmp:
        ctx = Context(args, Path(tmp), compile_connrate(Path(tmp)))
        try:
            if not args.throughput_only:
                run_cells(ctx, results)
            log(f"throughput N={args.iperf_n:,} ...")
            results["throughput"] = run_throughput(ctx, rulesets.workload(args.iperf_n))
        finally:
            ctx.stop_all()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["wall_seconds"] = time.monotonic() - started
    results["loadavg_end"] = os.getloadavg()

    path = write_results("throughput" if args.throughput_only else "bench", results, args.results_dir)
    log(f"results: {path}")
    if args.throughput_only:
        log("a section alone: RESULTS.md is rendered from a whole run (make bench)")
        return 0
    from benchmarks import report

    report.render(results, path, args.markdown)
    log(f"report: {args.markdown}; took {results['wall_seconds'] / 60:.1f} min")
    return 0


def run_cells(ctx: Context, results: dict[str, Any]) -> None:
    """Sections 1-3 and 5, method after method, size after size; then the profile."""
    args = ctx.args
    log("no NAT (plain routing) ...")
    results["plain_routing"] = run_plain_routing(ctx)
    exec_measured: tuple[int, float] | None = None  # per-rule exec's last full apply (N, seconds)
    exec_over: str | None = None  # why per-rule exec's full apply is not run from here on
    for n in args.sizes:
        work = rulesets.workload(n)
        steps = rulesets.change_steps(work, args.rounds)
        results["mix"][str(n)] = work.counts | {
            "iptables_rules": rulesets.iptables_rule_count(work.state),
            "state_file_bytes": len(rulesets.encode(work.state)),
        }
        for method in args.methods:
            full_skip = None
            if method == "per-rule-exec" and n > EXEC_ALWAYS_UP_TO:
                if exec_measured is not None:
                    last_n, last_seconds = exec_measured
                    predicted = last_seconds * (n / last_n) ** 2
                    if predicted > args.exec_budget:
                        full_skip = (
                            f"predicted {predicted:,.0f} s from {last_seconds:.1f} s at N={last_n:,} "
                            f"(quadratic growth), over the {args.exec_budget:.0f} s budget"
                        )
                full_skip = full_skip or exec_over
            log(f"{method} N={n:,} ...")
            try:
                cell = run_cell(ctx, method, work, steps, full_skip)
            except OverBudgetError as err:
                cell = {"status": "over budget", "reason": str(err)}
                log(f"  {method} N={n}: {err}")
            except (RuntimeError, TimeoutError, subprocess.SubprocessError, OSError) as err:
                cell = {"status": "error", "reason": f"{type(err).__name__}: {err}"[-4000:]}
                log(f"  {method} N={n}: ERROR {cell['reason'][:500]}")
            results["cells"][method][str(n)] = cell
            if method == "per-rule-exec":
                full = cell.get("full", {})
                if full.get("n"):
                    exec_measured = (n, full["median"])
                elif exec_over is None and not full_skip:
                    exec_over = f"over the {args.exec_budget:.0f} s budget already at N={n:,}"
    if args.cold_sizes:
        from benchmarks import cold_start

        results["cold_start"] = cold_start.run(ctx, args.cold_sizes, args.cold_repeats)
    reasons = needs_profile(results) if "natgwd" in args.methods else []
    results["natgwd_not_best"] = reasons
    if args.profile == "always" or (args.profile == "auto" and reasons):
        natgwd_cells = results["cells"].get("natgwd", {})
        ran = [n for n in args.sizes if natgwd_cells.get(str(n), {}).get("status") == "ok"]
        below = [n for n in ran if n <= args.profile_n] or ran
        if below:
            log(f"profiling natgwd at N={max(below):,} ...")
            try:
                results["profile"] = run_profile(ctx, max(below))
            except (subprocess.SubprocessError, OSError, ValueError) as err:
                results["profile"] = {"error": str(err)}
