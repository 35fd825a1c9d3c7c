"""How long natgwd takes to apply a large desired state, and where the time goes.

    /tmp/venv/bin/python -m benchmarks.apply_scale            (as root, from the repository)

The state is 10,000 DNAT + 1,000 SNAT + 1,000 FIP rules over the seed topology (sizes are
options). Three parts, run one after the other:

- in-process: a Reconciler(KernelNft(), Netlink(), ensure_forwarding) in a fresh network
  namespace with net1/net2 (veth), its stages timed by wrapping the functions it calls
  (only in that worker process); then resync, the counter read of a scrape, and cProfile of
  the full apply, the one-rule change and the resync.
- end-to-end: the real daemon in a Lab; from the gateway namespace, write the file and poll
  /readyz until it reports that file's sha256 applied. This includes up to one period of
  file watcher polling (natgwd.runtime.daemon.POLL_SECONDS); the daemon's own "desired state applied"
  log line gives the time from reading the file to the kernel matching it.
- /metrics scrape time, plain and gzipped as Prometheus asks, with the daemon's CPU per
  scrape (less at the mercy of a shared machine's load than the time), and the daemon's
  RSS at this size. `--dnat 50000` for the larger size.

Results go to benchmarks/results/apply_scale-<UTC timestamp>.json; a compact table and the
profiles are printed. Every namespace it creates is deleted on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import http.client
import inspect
import io
import ipaddress
import json
import os
import platform
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.netns import bare_gateway
from benchmarks.stats import rss_of, summary, write_results
from natgwd.runtime.daemon import POLL_SECONDS

REPO = Path(__file__).resolve().parents[1]

PORTS_PER_DNAT_EIP = 100
SNAT_EIPS = 50
DNAT_TARGETS = "10.60.0.1"  # dnat[i] -> DNAT_TARGETS + i
FIP_TARGETS = "10.60.200.1"
CHANGED_TARGETS = "10.60.100.1"  # new internalIp of the one-rule changes
FIRST_EIP = "10.115.48.10"
LAST_USABLE_EIP = "10.115.55.250"  # 10.115.55.254 is the upstream gateway
POLL_READYZ_SECONDS = 0.01
KINDS = ("full", "change", "add", "delete", "noop")
PROFILED = {
    "full_apply": "StateTracker.check + Reconciler.apply from an empty kernel",
    "one_rule_change": "StateTracker.check + Reconciler.apply (the delta path), one DNAT internalIp changed",
    "resync": "Reconciler.resync, no drift",
    "scrape_counters": "the rule counters' exposition (read and format)",
}
CHANGE_KINDS = ("change", "add", "delete")


# --- the desired state ------------------------------------------------------------------


def _ip(base: str, offset: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(base)) + offset))


def build_state(dnat: int, snat: int, fip: int) -> dict[str, Any]:
    """A valid state over the seed topology: internal reach widened by 10.60.0.0/16, EIPs
    from the external /21 (DNATs share EIPs, 100 ports each; every FIP has its own EIP)."""
    dnat_eips = -(-dnat // PORTS_PER_DNAT_EIP)
    eip_count = dnat_eips + SNAT_EIPS + fip
    if int(ipaddress.IPv4Address(FIRST_EIP)) + eip_count > int(ipaddress.IPv4Address(LAST_USABLE_EIP)):
        raise SystemExit(f"{eip_count} EIPs do not fit in 10.115.48.0/21")
    if dnat > 65536 * 2 or fip > 50 * 256 or snat > 4 * 250:
        raise SystemExit("sizes beyond what the generator's address plan holds")
    eips = [{"name": f"dnat-eip-{k:04d}", "v4ip": _ip(FIRST_EIP, k)} for k in range(dnat_eips)]
    eips += [{"name": f"snat-eip-{k:02d}", "v4ip": _ip(FIRST_EIP, dnat_eips + k)} for k in range(SNAT_EIPS)]
    eips += [{"name": f"fip-eip-{k:05d}", "v4ip": _ip(FIRST_EIP, dnat_eips + SNAT_EIPS + k)} for k in range(fip)]
    dnat_rules = [
        {
            "name": f"dnat-{i:06d}",
            "eip": f"dnat-eip-{i // PORTS_PER_DNAT_EIP:04d}",
            "protocol": "tcp" if i % 2 == 0 else "udp",
            "externalPort": str(10000 + i % PORTS_PER_DNAT_EIP),
            "internalIp": _ip(DNAT_TARGETS, i),
            "internalPort": "80",
        }
        for i in range(dnat)
    ]
    snat_rules = []
    for i in range(snat):
        j, k = divmod(i, 4)  # per 10.60.j.0: a /24 and, inside it, a /26, a /28 and a /32
        cidr = (f"10.60.{j}.0/24", f"10.60.{j}.64/26", f"10.60.{j}.128/28", f"10.60.{j}.200/32")[k]
        snat_rules.append({"name": f"snat-{i:04d}", "eip": f"snat-eip-{i % SNAT_EIPS:02d}", "internalCIDR": cidr})
    fip_rules = [
        {"name": f"fip-{i:05d}", "eip": f"fip-eip-{i:05d}", "internalIp": _ip(FIP_TARGETS, i)} for i in range(fip)
    ]
    return {
        "version": 1,
        "internal": {
            "interface": "net1",
            "addresses": ["172.20.10.254/24"],
            "routes": [{"dst": "10.55.0.0/16", "via": "172.20.10.1"}, {"dst": "10.60.0.0/16", "via": "172.20.10.1"}],
        },
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": "10.115.55.254"},
        "eips": eips,
        "snat": snat_rules,
        "dnat": dnat_rules,
        "fip": fip_rules,
    }


def encode(state: dict[str, Any], indent: int = 1) -> bytes:
    return json.dumps(state, indent=indent).encode()


def scenario(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    """(kind, file bytes), in order: the full state, then rounds of change/add/delete of
    one DNAT rule, then no-op rewrites (same content, other bytes: parsed, planned, nothing
    to do). Deterministic, so both parts apply the same files."""
    state = build_state(args.dnat, args.snat, args.fip)
    yield "full", encode(state)
    rules = state["dnat"]
    n = len(rules)
    for it in range(args.repeats):
        changed = rules[(it * 1009 + 13) % len(rules)]
        changed["internalIp"] = _ip(CHANGED_TARGETS, it)
        yield "change", encode(state)
        rules.append(
            {
                "name": f"dnat-extra-{it:04d}",
                "eip": "dnat-eip-0000",
                "protocol": "tcp",
                "externalPort": str(20000 + it),
                "internalIp": _ip(DNAT_TARGETS, it),
                "internalPort": "8080",
            }
        )
        yield "add", encode(state)
        victim = f"dnat-{(it * 997 + 500) % n:06d}"
        rules[:] = [r for r in rules if r["name"] != victim or r is changed]
        yield "delete", encode(state)
    for it in range(args.repeats):
        yield "noop", encode(state) + b"\n" * (it + 1)  # unique bytes, same content


# --- measuring ---------------------------------------------------------------------------


def profile_text(profile: cProfile.Profile, sort: str, limit: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    text = out.getvalue()
    # Drop pstats' preamble up to the column header.
    start = text.find("   ncalls")
    return text[start:].rstrip() + "\n" if start >= 0 else text


def cpu_seconds(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- in-process worker (runs in a fresh namespace with veth net1/net2) -----------------


class Stages:
    """Times functions by replacing them (in this process only) with timing wrappers."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.missing: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time owner.attribute as `name`; skipped (and listed) when natgwd has no such
        attribute, since natgwd is being changed under this benchmark."""
        original = getattr(owner, attribute, None)
        if original is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)
        self._saved.append((owner, attribute, original))

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved.clear()

    def take(self) -> dict[str, float]:
        taken, self.current = self.current, {}
        return taken


# Stages of Reconciler.apply that do not nest in one another; the rest is "apply.other".
APPLY_STAGES = (
    "adopt",
    "plan.assign_ids",
    "plan.full",
    "plan.change",
    "plan_transaction",
    "nft.apply",
    "table.contents",
    "forget_counters",
    "links.plan",
    "links.apply",
    "announce",
    "conntrack.filters",
    "conntrack",
)


def inprocess_worker(args: argparse.Namespace) -> dict[str, Any]:
    import natgwd.runtime.reconciler as reconciler_module
    from natgwd.kernel.netlink import Netlink, ensure_forwarding
    from natgwd.kernel.nft import KernelNft
    from natgwd.planning.counters import CounterMemory
    from natgwd.planning.plan import TablePlan
    from natgwd.planning.table import DesiredTable, Transaction
    from natgwd.runtime.logs import configure
    from natgwd.runtime.metrics import RuleCounters
    from natgwd.runtime.reconciler import Reconciler
    from natgwd.runtime.record import AppliedRecord
    from natgwd.state import validation
    from natgwd.state.tracker import StateTracker

    configure("json", "info")  # as the daemon logs (to this worker's stderr, a file)
    stages = Stages()
    stages.wrap(reconciler_module, "assign_ids", "plan.assign_ids")  # natgwd before TablePlan.assigning
    if hasattr(TablePlan, "assigning"):
        stages.wrap(TablePlan, "assigning", "plan.full")  # (the ids assigned inside)
    else:
        stages.wrap(reconciler_module, "TablePlan", "plan.full")
    stages.wrap(TablePlan, "change", "plan.change")
    stages.wrap(reconciler_module, "plan_transaction", "plan_transaction")
    stages.wrap(reconciler_module, "link_plan", "links.plan")
    stages.wrap(KernelNft, "apply", "nft.apply")
    stages.wrap(KernelNft, "read_table", "nft.read_table")
    stages.wrap(KernelNft, "read_counters", "nft.read_counters")
    stages.wrap(Transaction, "script", "nft.render_script")
    stages.wrap(Netlink, "apply", "links.apply")
    stages.wrap(DesiredTable, "contents", "table.contents")
    stages.wrap(CounterMemory, "forget_except", "forget_counters")
    stages.wrap(Reconciler, "_adopt", "adopt")
    stages.wrap(Reconciler, "apply", "apply.total")
    stages.wrap(Reconciler, "resync", "resync.total")
    stages.wrap(Reconciler, "_announce_eips", "announce")
    stages.wrap(Reconciler, "_clean_conntrack", "conntrack")  # Translations + dumps + deletes
    stages.wrap(reconciler_module, "changed_filters", "conntrack.filters")
    stages.wrap(reconciler_module, "delta_filters", "conntrack.filters")

    # As `natgwd run` builds it (cli._run), where this natgwd has those parts: a conntrack
    # cleaner, and an announcer (here one that only counts; the daemon sends on a thread).
    announced: list[int] = []
    extra: dict[str, Any] = {}
    parameters = inspect.signature(Reconciler).parameters
    if "conntrack" in parameters:
        from natgwd.kernel.conntrack import ConntrackCleaner

        extra["conntrack"] = ConntrackCleaner()
    if "announce" in parameters:
        extra["announce"] = lambda _interface, addresses: announced.append(len(addresses))

    def fresh_reconciler() -> Reconciler:
        return Reconciler(KernelNft(), Netlink(), ensure_forwarding, **extra)

    # The daemon also records every applied file (--applied-state, which the Lab passes).
    scratch = Path(tempfile.mkdtemp(prefix="natgwd-bench-applied-"))
    applied_record = AppliedRecord(scratch / "applied.json")

    def daemon_record(raw: bytes) -> float | None:
        started = time.perf_counter()
        applied_record.write(raw, hashlib.sha256(raw).hexdigest(), time.time())
        return time.perf_counter() - started

    def teardown() -> None:
        KernelNft().delete_table()
        report = Netlink().remove_owned()
        if report.errors:
            raise RuntimeError(f"removing addresses/routes failed: {report.errors}")

    trackers: dict[int, StateTracker] = {}  # the daemon's StateTracker, per reconciler

    def measure(reconciler: Reconciler, kind: str, raw: bytes) -> tuple[dict[str, Any], Any]:
        tracker = trackers.setdefault(id(reconciler), StateTracker())
        record: dict[str, Any] = {"kind": kind, "bytes": len(raw)}
        started = time.perf_counter()
        hashlib.sha256(raw).hexdigest()
        record["sha256"] = time.perf_counter() - started
        # Decoding alone, then the tracker's check as the daemon calls it (the delta path
        # when only rules changed, else the full validation).
        started = time.perf_counter()
        validation.decode(raw)
        record["load.decode"] = time.perf_counter() - started
        started = time.perf_counter()
        change = tracker.check(raw)
        record["load"] = time.perf_counter() - started
        record["load.delta"] = change.delta is not None
        stages.take()
        outcome = reconciler.apply(change.state, change.delta, change.base)
        tracker.accept(change)
        record.update(stages.take())
        tracker.settle()  # as the daemon does after its record: not the next change's
        if not outcome.complete:
            raise RuntimeError(f"incomplete apply: {outcome}")
        record["apply.other"] = record["apply.total"] - sum(record.get(s, 0.0) for s in APPLY_STAGES)
        record["nft.cmd"] = record.get("nft.apply", 0.0) - record.get("nft.render_script", 0.0)
        record["plan"] = sum(record.get(key, 0.0) for key in ("plan.assign_ids", "plan.full", "plan.change"))
        record["daemon.record_applied"] = daemon_record(raw)
        record["conntrack.all"] = record.get("conntrack", 0.0) + record.get("conntrack.filters", 0.0)
        record["total"] = record["load"] + record["apply.total"] + (record["daemon.record_applied"] or 0.0)
        record["nft_operations"] = outcome.nft_operations
        record["changed_elements"] = outcome.changed_elements
        record["link_changes"] = len(outcome.link_changes)
        return record, change.state

    files = list(scenario(args))
    full_raw = files[0][1]
    events: list[dict[str, Any]] = []

    # Full apply from an empty kernel (the first one in a namespace never used).
    for attempt in range(args.full_repeats):
        if attempt:
            teardown()
        reconciler = fresh_reconciler()
        record, _ = measure(reconciler, "full", full_raw)
        events.append(record)
        print(f"in-process full apply {attempt + 1}: {record['total']:.3f}s", flush=True)
    # One-rule changes and no-op rewrites, in the scenario's order, on the last reconciler.
    for kind, raw in files[1:]:
        record, _ = measure(reconciler, kind, raw)
        events.append(record)
    last_raw = files[-1][1]

    # An identical rewrite: the daemon reads the file and compares digests, nothing more.
    identical = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        hashlib.sha256(last_raw).hexdigest()
        identical.append(time.perf_counter() - started)

    resyncs = []
    for _ in range(3):
        stages.take()
        repairs = reconciler.resync().repairs
        resyncs.append({**stages.take(), "repairs": repairs})

    rule_counters = RuleCounters(reconciler.counting_sets)
    scrapes = []
    for _ in range(3):
        stages.take()
        started = time.perf_counter()
        body = rule_counters.exposition()
        total = time.perf_counter() - started
        taken = stages.take()
        scrapes.append(
            {
                "total": total,
                "nft.read_counters": taken.get("nft.read_counters", 0.0),
                "format": total - taken.get("nft.read_counters", 0.0),
                "bytes": len(body),
                "samples": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
            }
        )
    element_count = reconciler.nft.read_table().element_count()  # type: ignore[union-attr]

    # Profiles, without the timing wrappers.
    stages.restore()
    profiles: dict[str, dict[str, str]] = {}

    def profiled(name: str, call: Callable[[], Any]) -> None:
        profile = cProfile.Profile()
        profile.enable()
        call()
        profile.disable()
        profiles[name] = {
            "cumulative": profile_text(profile, "cumulative", 15),
            "tottime": profile_text(profile, "tottime", 12),
        }

    one_rule = json.loads(last_raw)
    one_rule["dnat"][len(one_rule["dnat"]) // 2]["internalIp"] = _ip(CHANGED_TARGETS, 9999)
    one_rule_raw = encode(one_rule)
    tracker = trackers[id(reconciler)]

    def one_rule_change() -> None:
        change = tracker.check(one_rule_raw)
        reconciler.apply(change.state, change.delta, change.base)
        tracker.accept(change)

    profiled("one_rule_change", one_rule_change)
    profiled("resync", reconciler.resync)
    profiled("scrape_counters", rule_counters.exposition)
    teardown()
    cold = fresh_reconciler()
    profiled("full_apply", lambda: cold.apply(StateTracker().check(full_raw).state))
    teardown()
    shutil.rmtree(scratch, ignore_errors=True)

    return {
        "reconciler_parts": sorted(extra),
        "not_timed": stages.missing,
        "announced_addresses": sum(announced),
        "events": events,
        "identical_rewrite_sha256": identical,
        "resync": resyncs,
        "scrape": scrapes,
        "kernel_elements": element_count,
        "worker_rss_kb": rss_of("self"),
        "profiles": profiles,
    }


# --- end-to-end worker (runs in the Lab's gateway namespace, next to the daemon) --------


def http_get(port: int, path: str, timeout: float = 30, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def write_atomically(path: Path, data: bytes) -> None:
    """As natgwd.lab.topology.Natgwd.write_state: write a sibling, rename over."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def endtoend_worker(args: argparse.Namespace) -> dict[str, Any]:
    path, port, pid = Path(args.state_path), args.port, args.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "natgwd" not in cmdline:
        raise RuntimeError(f"pid {pid} is not natgwd: {cmdline}")
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            if http_get(port, "/healthz")[0] == 200:
                break
        if time.monotonic() > deadline:
            raise TimeoutError("natgwd did not answer /healthz")
        time.sleep(0.05)
    rss: dict[str, Any] = {"idle_before_state": rss_of(pid)}

    def wait_applied(digest: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        detail: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                status, body = http_get(port, "/readyz")
                detail = json.loads(body)
                if status == 200 and detail.get("applied_sha256") == digest:
                    return
            time.sleep(POLL_READYZ_SECONDS)
        raise TimeoutError(f"{digest[:12]} not applied within {timeout}s: {detail}")

    # Writing the next file right after the previous one was applied would always land
    # just after the daemon's step and wait a whole watcher period: pause a random
    # part of that period first, as an independent writer would be.
    jitter = random.Random(1)
    events = []
    for kind, raw in scenario(args):
        time.sleep(jitter.uniform(0.05, 0.05 + POLL_SECONDS))
        digest = hashlib.sha256(raw).hexdigest()
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        write_atomically(path, raw)
        wait_applied(digest, timeout=600 if kind == "full" else 120)
        seconds = time.perf_counter() - started
        events.append(
            {"kind": kind, "seconds": seconds, "sha256": digest, "daemon_cpu_seconds": cpu_seconds(pid) - cpu_before}
        )
        if kind == "full":
            rss["after_full_apply"] = rss_of(pid)
            print(f"end-to-end full apply: {seconds:.3f}s", flush=True)

    scrapes = []
    cpu_before = cpu_seconds(pid)
    for _ in range(args.scrapes):
        started = time.perf_counter()
        status, body = http_get(port, "/metrics", timeout=120)
        seconds = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        scrapes.append(
            {
                "seconds": seconds,
                "bytes": len(body),
                "samples": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
            }
        )
    # The daemon's CPU per scrape: wall time on a shared machine says less (clock ticks,
    # so averaged over the scrapes).
    scrape_cpu = (cpu_seconds(pid) - cpu_before) / max(args.scrapes, 1)
    # As Prometheus scrapes: it asks for gzip.
    gzipped = []
    cpu_before = cpu_seconds(pid)
    for _ in range(args.scrapes):
        started = time.perf_counter()
        status, body = http_get(port, "/metrics", timeout=120, headers={"Accept-Encoding": "gzip"})
        seconds = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        gzipped.append({"seconds": seconds, "bytes": len(body)})
    gzip_cpu = (cpu_seconds(pid) - cpu_before) / max(args.scrapes, 1)
    rss["after_scrapes"] = rss_of(pid)
    return {
        "events": events,
        "scrapes": scrapes,
        "scrape_cpu_seconds": scrape_cpu,
        "gzip_scrapes": gzipped,
        "gzip_scrape_cpu_seconds": gzip_cpu,
        "rss_kb": rss,
        "daemon_cmdline": cmdline,
    }


# --- orchestration (host namespace) -----------------------------------------------------


def run_worker(namespace: str, worker: str, args: argparse.Namespace, out: Path, log: Path, **extra: Any) -> Any:
    cmd = [
        "ip",
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-m",
        "benchmarks.apply_scale",
        "--worker",
        worker,
        "--out",
        str(out),
        "--dnat",
        str(args.dnat),
        "--snat",
        str(args.snat),
        "--fip",
        str(args.fip),
        "--repeats",
        str(args.repeats),
        "--full-repeats",
        str(args.full_repeats),
        "--scrapes",
        str(args.scrapes),
    ]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    # The worker prints progress on stdout (passed through); its stderr (natgwd's log
    # lines, tracebacks) goes to a file.
    with log.open("ab") as stderr:
        result = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=stderr, timeout=3600, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{worker} worker failed ({result.returncode}):\n{tail}")
    return json.loads(out.read_text())


def run_inprocess(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with bare_gateway("ngwbench") as namespace:
        print(f"in-process part in namespace {namespace} ...", file=sys.stderr, flush=True)
        result: dict[str, Any] = run_worker(
            namespace, "inprocess", args, workdir / "inprocess.json", workdir / "inprocess.log"
        )
        return result


def daemon_log_records(log_path: Path) -> dict[str, dict[str, Any]]:
    """sha256[:12] -> the daemon's "desired state applied" line, with the seconds of the
    nftables transaction logged just before it."""
    applied: dict[str, dict[str, Any]] = {}
    nft_seconds = None
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "nftables transaction applied":
            nft_seconds = record.get("seconds")
        elif record.get("event") == "desired state applied":
            applied[record["sha256"]] = {**record, "nft_seconds": nft_seconds}
            nft_seconds = None
    return applied


def run_endtoend(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from natgwd.lab.topology import Lab

    with Lab() as lab:
        print(f"end-to-end part in lab {lab.prefix} ...", file=sys.stderr, flush=True)
        daemon = lab.start_natgwd(None, "--resync-interval", str(args.resync_interval))
        result: dict[str, Any] = run_worker(
            lab.ns("gw"),
            "endtoend",
            args,
            workdir / "endtoend.json",
            workdir / "endtoend.log",
            state_path=daemon.state_path,
            port=daemon.metrics_port,
            pid=daemon.process.pid,
        )
        if daemon.process.poll() is not None:
            raise RuntimeError(f"natgwd exited:\n{daemon.log()[-4000:]}")
        logged = daemon_log_records(daemon.log_path)
        for event in result["events"]:
            line = logged.get(event["sha256"][:12], {})
            event["daemon_seconds"] = line.get("seconds")
            event["daemon_nft_seconds"] = line.get("nft_seconds")
            event["changed_elements"] = line.get("changed_elements")
            event["link_changes"] = line.get("link_changes")
        daemon.stop()
    shutil.rmtree(lab.workdir, ignore_errors=True)  # the state file and the daemon's log
    return result


# --- report -----------------------------------------------------------------------------


def by_kind(events: list[dict[str, Any]], key: str) -> dict[str, dict[str, float | int]]:
    return {kind: summary([e[key] for e in events if e["kind"] == kind and e.get(key) is not None]) for kind in KINDS}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    inprocess = results.get("inprocess")
    if inprocess:
        keys = sorted({k for e in inprocess["events"] for k, v in e.items() if isinstance(v, float)})
        out["inprocess"] = {key: by_kind(inprocess["events"], key) for key in keys}
        out["inprocess"]["resync"] = summary([r["resync.total"] for r in inprocess["resync"]])
        out["inprocess"]["resync.read_table"] = summary([r.get("nft.read_table", 0.0) for r in inprocess["resync"]])
        out["inprocess"]["scrape"] = summary([s["total"] for s in inprocess["scrape"]])
        out["inprocess"]["scrape.read_counters"] = summary([s["nft.read_counters"] for s in inprocess["scrape"]])
    endtoend = results.get("endtoend")
    if endtoend:
        out["endtoend"] = {
            key: by_kind(endtoend["events"], key) for key in ("seconds", "daemon_seconds", "daemon_cpu_seconds")
        }
        out["endtoend"]["scrape"] = summary([s["seconds"] for s in endtoend["scrapes"]])
        out["endtoend"]["scrape_gzip"] = summary([s["seconds"] for s in endtoend.get("gzip_scrapes", [])])
    return out


def _ms(stats: dict[str, float | int] | None, key: str = "median") -> str:
    if not stats or not stats.get("n"):
        return "-"
    return f"{stats[key] * 1000:.0f}"


def _span(stats: dict[str, float | int] | None) -> str:
    if not stats or not stats.get("n"):
        return "-"
    return f"{stats['min'] * 1000:.0f}-{stats['max'] * 1000:.0f}"


def report(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = []
    size = results["size"]
    lines.append(
        f"natgwd apply at scale: {size['dnat']} DNAT + {size['snat']} SNAT + {size['fip']} FIP, "
        f"{size['eips']} EIPs, {size['file_bytes'] / 1e6:.1f} MB file, "
        f"{results.get('inprocess', {}).get('kernel_elements', '?')} kernel set elements"
    )
    lines.append(
        f"natgwd {results['git']['head']}{' +local changes' if results['git']['natgwd_changes'] else ''} "
        f"(sources {results['natgwd_sources_sha256']}); load average {results['loadavg_start'][0]:.1f} at start, "
        f"{results['loadavg_end'][0]:.1f} at end on {results['host']['cpus']} CPUs"
    )
    if "warning" in results:
        lines.append(f"WARNING: {results['warning']}")
    if "endtoend" in s:
        e = s["endtoend"]
        lines.append("")
        lines.append(
            f"End to end (file written -> /readyz applied_sha256; includes <={POLL_SECONDS} s watcher poll), ms:"
        )
        lines.append(f"  {'':8} {'n':>3} {'median':>7} {'p95':>7} {'min-max':>13} {'daemon med':>10} {'cpu med':>8}")
        for kind in KINDS:
            w = e["seconds"][kind]
            lines.append(
                f"  {kind:8} {w.get('n', 0):>3} {_ms(w):>7} {_ms(w, 'p95'):>7} {_span(w):>13} "
                f"{_ms(e['daemon_seconds'][kind]):>10} {_ms(e['daemon_cpu_seconds'][kind]):>8}"
            )
        lines.append("  (daemon med: the daemon's own log, file read -> applied; cpu: daemon CPU during the event)")
    if "inprocess" in s:
        p = s["inprocess"]
        columns = (
            ("load", "load"),
            ("decode", "load.decode"),
            ("plan", "plan"),
            ("diff", "plan_transaction"),
            ("nft", "nft.apply"),
            ("links", "links.apply"),
            ("ct", "conntrack.all"),
            ("other", "apply.other"),
            ("record", "daemon.record_applied"),
            ("total", "total"),
        )
        lines.append("")
        lines.append(
            "In process (fresh netns; StateTracker.check, Reconciler.apply stages, applied-state record), median ms:"
        )
        lines.append("  " + f"{'':7}" + "".join(f"{title:>7}" for title, _ in columns) + f"{'p95':>7}{'min':>7}")
        for kind in KINDS:
            row = "".join(f"{_ms(p.get(key, {}).get(kind)):>7}" for _, key in columns)
            lines.append(f"  {kind:7}{row}{_ms(p['total'][kind], 'p95'):>7}{_ms(p['total'][kind], 'min'):>7}")
        lines.append(
            "  load = StateTracker.check (decode, then the changed rules' checks, or a full validation);"
            " plan = TablePlan (a change's, or in full); diff = plan_transaction;"
        )
        lines.append(
            "  nft = render + libnftables; links = Netlink.apply; ct = conntrack cleanup (changed_filters,"
            " Translations, dumps);"
        )
        lines.append(
            "  other = rest of Reconciler.apply (the generation, table contents, counters);"
            " record = AppliedRecord.write"
        )
        lines.append(
            f"  resync (no drift): median {_ms(p['resync'])} ms, of which nft list table + parse "
            f"{_ms(p['resync.read_table'])} ms"
        )
        lines.append(
            f"  scrape in process: median {_ms(p['scrape'])} ms, of which nft list sets + parse "
            f"{_ms(p['scrape.read_counters'])} ms"
        )
    if "endtoend" in results:
        e2e = results["endtoend"]
        sc = s["endtoend"]["scrape"]
        first = e2e["scrapes"][0] if e2e["scrapes"] else {}
        lines.append("")
        lines.append(
            f"/metrics scrape (HTTP, daemon): median {_ms(sc)} ms, p95 {_ms(sc, 'p95')} ms, "
            f"{first.get('bytes', 0) / 1e6:.1f} MB, {first.get('samples', 0)} samples"
            + (f", daemon CPU {e2e['scrape_cpu_seconds'] * 1000:.0f} ms each" if "scrape_cpu_seconds" in e2e else "")
        )
        gz = s["endtoend"]["scrape_gzip"]
        if gz.get("n"):
            lines.append(
                f"/metrics scrape with gzip (as Prometheus asks): median {_ms(gz)} ms, p95 {_ms(gz, 'p95')} ms, "
                f"{e2e['gzip_scrapes'][0]['bytes'] / 1e6:.2f} MB, "
                f"daemon CPU {e2e['gzip_scrape_cpu_seconds'] * 1000:.0f} ms each"
            )
        rss = e2e["rss_kb"]
        lines.append(
            "daemon RSS: idle {} MB, after full apply {} MB, after scrapes {} MB (peak VmHWM {} MB)".format(
                *(round(rss[k]["VmRSS"] / 1024) for k in ("idle_before_state", "after_full_apply", "after_scrapes")),
                round(rss["after_scrapes"]["VmHWM"] / 1024),
            )
        )
    return "\n".join(lines)


def natgwd_digest() -> str:
    """Of the natgwd sources measured (they are being edited while benchmarks run)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "natgwd").rglob("*")):
        if path.suffix in (".py", ".json"):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dnat", type=int, default=10000)
    parser.add_argument("--snat", type=int, default=1000)
    parser.add_argument("--fip", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=10, help="rounds of change/add/delete, and no-op rewrites")
    parser.add_argument("--full-repeats", type=int, default=3, help="in-process full applies from an empty kernel")
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument(
        "--resync-interval",
        type=float,
        default=3600,
        help="the daemon's; long so that resyncs do not land in the measurements (measured in process)",
    )
    parser.add_argument("--skip", choices=("inprocess", "endtoend"), action="append", default=[])
    parser.add_argument("--worker", choices=("inprocess", "endtoend"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--state-path", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker = inprocess_worker if args.worker == "inprocess" else endtoend_worker
        Path(args.out).write_text(json.dumps(worker(args)))
        return 0

    if os.geteuid() != 0:
        print("needs root: it creates network namespaces", file=sys.stderr)
        return 1
    state = build_state(args.dnat, args.snat, args.fip)
    results: dict[str, Any] = {
        "benchmark": "apply_scale",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "nft": subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "git": {
            "head": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
            "natgwd_changes": subprocess.run(
                ["git", "status", "--short", "natgwd"], cwd=REPO, capture_output=True, text=True
            ).stdout.splitlines(),
        },
        "natgwd_sources_sha256": natgwd_digest(),
        "loadavg_start": os.getloadavg(),
        "size": {
            "dnat": args.dnat,
            "snat": args.snat,
            "fip": args.fip,
            "eips": len(state["eips"]),
            "file_bytes": len(encode(state)),
        },
        "options": {
            "repeats": args.repeats,
            "full_repeats": args.full_repeats,
            "daemon_resync_interval": args.resync_interval,
            "readyz_poll_seconds": POLL_READYZ_SECONDS,
        },
    }
    with tempfile.TemporaryDirectory(prefix="natgwd-bench-") as tmp:
        workdir = Path(tmp)
        if "inprocess" not in args.skip:
            results["inprocess"] = run_inprocess(args, workdir)
        if "endtoend" not in args.skip:
            results["endtoend"] = run_endtoend(args, workdir)
    results["loadavg_end"] = os.getloadavg()
    if results["natgwd_sources_sha256"] != natgwd_digest():
        results["warning"] = "natgwd's sources changed during the run"
    results["summary"] = summarize(results)

    path = write_results("apply_scale", results)

    print(report(results))
    for name, what in PROFILED.items():
        profile = results.get("inprocess", {}).get("profiles", {}).get(name)
        if profile:
            print(f"\n--- cProfile: {name} ({what}), top 15 by cumulative time ---")
            print(profile["cumulative"], end="")
            if name in ("full_apply", "one_rule_change"):
                print(f"--- cProfile: {name}, top 12 by own time ---")
                print(profile["tottime"], end="")
    print(f"\nresults: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
