"""Command line: run, check, render, status, whois, import, top, cleanup."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
from datetime import UTC, datetime
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natgwd import __version__
from natgwd.bgp.status import NeighborStatus
from natgwd.io import applied, paths
from natgwd.io.files import UnreadableStateError, read_state_file
from natgwd.kubeovn.importer import cli as kubeovn_import
from natgwd.state.model import DesiredState, IPNetwork
from natgwd.state.validation import InvalidStateError, load_state

if TYPE_CHECKING:
    from natgwd.ha.scale_status import GroupStatus
    from natgwd.planning.table import TableContents

# Loopback and the pod's own address (natgwd.runtime.listeners): the drop-in's pod spec (the
# controller's) cannot pass an address, and 0.0.0.0 would serve every rule name and counter
# on the EIPs and the external network.
METRICS_ADDRESS = "auto:9469"
GC_THRESHOLDS = (50_000, 20, 10)  # young, middle, old; Python defaults to (700, 10, 10)


def _load(file: str, allow_writable: bool) -> DesiredState | None:
    """The state in the file ('-': standard input), or None once every problem is printed as
    `check` prints them. The file is read as `run` reads it (the same permission checks)."""
    try:
        return load_state(sys.stdin.buffer.read() if file == "-" else read_state_file(Path(file), allow_writable))
    except UnreadableStateError as err:
        print(f"{file}: cannot read: {err.reason}", file=sys.stderr)
    except InvalidStateError as err:
        count = len(err.problems)
        print(f"{file}: invalid desired state ({count} problem{'' if count == 1 else 's'}):", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        if err.skipped:
            print(f"  ({err.skipped})", file=sys.stderr)
    return None


def _check(args: argparse.Namespace) -> int:
    state = _load(args.file, args.allow_writable_state)
    if state is None:
        return 1
    print(
        f"{args.file}: valid: {len(state.eips)} eips, {len(state.snat)} snat, "
        f"{len(state.dnat)} dnat, {len(state.fip)} fip"
    )
    return 0


def _render(args: argparse.Namespace) -> int:
    from natgwd.planning.plan import assign_ids, desired_table
    from natgwd.planning.table import plan_transaction

    # Printing a script changes nothing: whoever may write the file may see what it makes.
    state = _load(args.file, allow_writable=True)
    if state is None:
        return 1
    table = desired_table(state, assign_ids(state, {}))
    sys.stdout.write(plan_transaction(None, table).script())
    return 0


def _status(args: argparse.Namespace) -> int:
    from natgwd.kernel.nft import KernelNft, NftError
    from natgwd.kernel.tc import KernelTc
    from natgwd.qos.status import format_table as format_qos_table
    from natgwd.qos.status import kernel_statuses
    from natgwd.runtime.status import format_table, record_mismatch, rule_statuses

    try:
        table = KernelNft().read_table()
    except NftError as err:
        print(f"cannot read nftables: {err}", file=sys.stderr)
        return 1
    if table is None:
        print("no natgwd table in this network namespace", file=sys.stderr)
        return 1
    rules = rule_statuses(table)
    record = _applied_record(Path(args.applied_state)) if args.applied_state else None
    recorded = applied.read_state(Path(args.applied_state)) if record else None
    mismatch = record_mismatch(recorded, rules) if record else None
    if record and mismatch:
        record["mismatch"] = mismatch
        recorded = None  # another table's record: its QoS policies are not this table's either
    shaping = kernel_statuses(KernelTc(), recorded)
    recorded, members = _discovered_members(recorded, Path(args.ha_run_dir))
    groups = _group_statuses(recorded, table)
    bgp = _bgp_status(Path(args.bgp_run_dir))
    if args.json:
        output: dict[str, object] = {
            "applied": record,
            "rules": [r.as_dict() for r in rules],
            "qos": [q.as_dict() for q in shaping],
        }
        if members is not None:
            output["members"] = members
        if groups:
            output["groups"] = [g.as_dict() for g in groups]
        if bgp is not None:
            found, announced = bgp
            output["bgp"] = {
                "neighbors": [n.as_dict() for n in found.values()],
                "originated": sorted(str(p) for p in announced),
            }
        print(json.dumps(output, indent=1))
        return 0
    if record and mismatch:
        print(
            f"the applied-state record {args.applied_state} does not match this network namespace's table: "
            f"{mismatch}; it may be another daemon's (--applied-state names the record to read)",
            file=sys.stderr,
        )
    elif record:
        print(f"applied state sha256 {record['sha256']} at {record['applied_at']}")
    sys.stdout.write(format_table(rules))
    if shaping:
        sys.stdout.write("\n" + format_qos_table(shaping))
    if members is not None:
        print(f"members (from {members['from']}, scope {members['scope']}): {', '.join(members['addresses'])}")
    if groups:
        from natgwd.ha.scale_status import format_groups

        sys.stdout.write("\n" + format_groups(groups))
    if bgp is not None:
        import time

        from natgwd.bgp.status import format_neighbors

        sys.stdout.write("\n" + format_neighbors(*bgp, now=time.time()))
    return 0


def _bgp_status(directory: Path) -> tuple[dict[str, NeighborStatus], set[IPNetwork]] | None:
    """The BGP speaker's sessions and announcements, when natgwd runs one (its bgpd
    answers in `directory`)."""
    from natgwd.bgp.vtysh import Vtysh

    if not (directory / "bgpd.vty").exists():
        return None
    vtysh = Vtysh(directory)
    return vtysh.neighbors(None), vtysh.originated() or set()


def _discovered_members(state: DesiredState | None, run_dir: Path) -> tuple[DesiredState | None, dict[str, Any] | None]:
    """A replica of kube-ovn-controller's Deployment: the members its natgwd discovered
    (natgwd.ha.discovery records them), and the state with the settings it derives from
    them, as natgwd applies it."""
    from dataclasses import replace

    from natgwd.ha.autoscale import auto_scale_out
    from natgwd.ha.discovery import MEMBERS_FILE

    path = run_dir / MEMBERS_FILE
    if state is None or state.scale_out is not None or state.ha is not None or not path.exists():
        return state, None
    try:
        record = json.loads(path.read_text())
        scope, addresses = str(record["scope"]), [IPv4Address(a) for a in record["members"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"{path}: cannot read the discovered members: {err}", file=sys.stderr)
        return state, None
    members = {"from": "discovery", "scope": scope, "addresses": [str(a) for a in addresses]}
    return replace(state, scale_out=auto_scale_out(state, addresses, scope)), members


def _group_statuses(state: DesiredState | None, table: TableContents) -> list[GroupStatus]:
    """Scaled out: who owns each EIP group, from this member's kernel."""
    if state is None or state.scale_out is None:
        return []
    from natgwd.ha.scale_status import group_statuses, kernel_view
    from natgwd.planning.handover import HANDED_OVER

    local, routes = kernel_view(state)
    handed = {
        int(key): element.counter.packets if element.counter else 0
        for key, element in table.elements.get(HANDED_OVER, {}).items()
    }
    return group_statuses(state, local, routes, handed)


def _applied_record(path: Path) -> dict[str, str] | None:
    head = applied.read_head(path)
    return {"sha256": head.sha256, "applied_at": head.applied_at.isoformat()} if head else None


def _run(args: argparse.Namespace) -> int:
    from collections.abc import Callable

    import structlog
    from prometheus_client import CollectorRegistry

    from natgwd.bgp.ownership import Ownership
    from natgwd.bgp.speaker import BgpSpeaker
    from natgwd.ha.controller import HaController, HaKernel
    from natgwd.ha.hello import deployment_scope
    from natgwd.kernel.conntrack import ConntrackCleaner
    from natgwd.kernel.garp import announce
    from natgwd.kernel.netlink import (
        Netlink,
        ensure_forwarding,
        ensure_no_redirects,
        ensure_tcp_liberal,
        ipv4_addresses,
        set_handover_route,
    )
    from natgwd.kernel.nft import KernelNft
    from natgwd.kernel.tc import KernelTc
    from natgwd.observability.endings import Endings
    from natgwd.observability.options import watch_factory
    from natgwd.planning.bfdgate import gate_transaction
    from natgwd.runtime.daemon import Daemon, DaemonConfig
    from natgwd.runtime.logs import configure
    from natgwd.runtime.reconciler import Announce, Reconciler
    from natgwd.runtime.startup import Exit, StartupError, parse_address, report

    configure(args.log_format, args.log_level)
    endings = Endings()
    # A 10,000-rule state is a million objects, and each change builds a new one: with the
    # default thresholds the cycle collector walks the whole heap several times per change
    # (a third of its time). Collecting less often still frees every cycle, a little later.
    gc.set_threshold(*GC_THRESHOLDS)

    def reconciler(announce: Announce) -> Reconciler:
        try:
            nft = KernelNft()
        except (ImportError, OSError) as err:
            raise StartupError(Exit.KERNEL, f"cannot open libnftables (python3-nftables): {err}", "nftables") from None
        cleaner = ConntrackCleaner(endings=endings if args.translation_log else None)
        return Reconciler(nft, Netlink(), ensure_forwarding, cleaner, announce, KernelTc())

    def garp(interface: str, addresses: list[IPv4Address]) -> int:
        return announce(interface, list(addresses), count=1)

    scope = deployment_scope(args.discover_members) if args.discover_members else None
    if args.discover_members:
        log = structlog.get_logger("natgwd.cli")
        if scope is None:
            log.info("not a Deployment's replica: no member discovery", pod=args.discover_members)
        else:
            log.info("a Deployment's replica: scaling out over the members found on the LAN", scope=scope)

    def ha(count_garp: Callable[[str, int], None], registry: CollectorRegistry) -> HaController:
        gate_nft: list[KernelNft] = []  # its own libnftables context (the gate's thread), made on first use

        def bfd_gate(interface: str, open_: bool | None) -> bool:
            if not gate_nft:
                gate_nft.append(KernelNft())
            if open_ is None:
                return gate_nft[0].gate_open(interface)
            gate_nft[0].apply(gate_transaction(interface, open_))
            return open_

        kernel = HaKernel(ipv4_addresses, ensure_tcp_liberal, garp, set_handover_route, ensure_no_redirects, bfd_gate)
        return HaController(Path(args.ha_run_dir), count_garp, registry, kernel, discovery_scope=scope)

    def bgp(ownership: Ownership) -> BgpSpeaker:
        return BgpSpeaker(Path(args.bgp_run_dir), ownership)

    try:
        try:
            make_watch = watch_factory(args, endings)
        except ValueError as err:
            raise StartupError(Exit.OBSERVE_OPTION, str(err), str(err).partition(" ")[0]) from None
        config = DaemonConfig(
            state_path=Path(args.state),
            metrics_address=parse_address(args.metrics_address),
            resync_interval=args.resync_interval,
            applied_state_path=Path(args.applied_state) if args.applied_state else None,
            allow_writable_state=args.allow_writable_state,
            edit_port=args.edit_port,
            edit_token_path=Path(args.edit_token),
            edit_fold_after=args.edit_fold_after,
            port_block_history_path=_history_path(args),
        )
        return Daemon(config, reconciler, make_ha=ha, make_watch=make_watch, make_bgp=bgp).run()
    except StartupError as err:
        return report(err)


def _history_path(args: argparse.Namespace) -> Path | None:
    """--port-block-history, by default beside the applied-state record ('' for nowhere)."""
    if args.port_block_history is not None:
        return Path(args.port_block_history) if args.port_block_history else None
    if not args.applied_state:
        return None
    return Path(args.applied_state).with_name(paths.PORT_BLOCK_HISTORY.name)


def _whois(args: argparse.Namespace) -> int:
    from natgwd.io import portblock_history

    eip, port = args.endpoint
    path = Path(args.history)
    try:
        entries = portblock_history.read(path) if path.exists() else []
    except (OSError, ValueError) as err:
        print(f"{path}: cannot read: {err}", file=sys.stderr)
        return 2
    at = args.at or datetime.now(UTC)
    answer = portblock_history.whois(entries, eip, port, at)
    when = at.isoformat()
    if answer.entry is None:
        since = f"it starts at {answer.history_starts.isoformat()}" if answer.history_starts else "it is empty"
        print(f"{eip}:{port} at {when}: unknown: no port-block layout recorded then in {path} ({since})")
        return 2
    applied_at = answer.entry.applied_at.isoformat()
    if answer.address is None or answer.blocks is None:
        print(f"{eip}:{port} at {when}: in no port block (layout applied at {applied_at})")
        return 1
    first, last = answer.blocks.block_of(answer.address)
    print(
        f"{eip}:{port} at {when}: {answer.address} (snat rule {answer.blocks.rule}, "
        f"block {first}-{last}, layout applied at {applied_at})"
    )
    return 0


def _endpoint(text: str) -> tuple[str, int]:
    """EIP:PORT ([EIP]:PORT for IPv6)."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not EIP:PORT (an address, then a port)") from None
    return host, _port(port)


def _time(text: str) -> datetime:
    """ISO 8601 (UTC unless it names a zone) or seconds since the epoch."""
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: ISO 8601 such as 2026-12-07T14:02:00Z, or seconds since the epoch"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _cleanup(args: argparse.Namespace) -> int:
    from natgwd.kernel.netlink import Netlink
    from natgwd.kernel.nft import KernelNft
    from natgwd.kernel.tc import KernelTc

    if KernelNft().delete_table():
        print("deleted nftables table inet natgwd")
    else:
        print("no nftables table inet natgwd: nothing to delete")
    shaping = KernelTc().remove_all()
    report = Netlink().remove_owned()
    for change in shaping.changes + report.changes:
        print(change)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    if args.applied_state:
        applied.remove(Path(args.applied_state))
    return 1 if report.errors else 0


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port 0-65535")
    return int(text)


class _WithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, when it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "%(default)" in text
            or action.default in (None, False, "", [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_allow_writable(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--allow-writable-state",
        action="store_true",
        help="accept a state file that users other than root (or natgwd's own) can write",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="natgwd", description="VPC NAT gateway data plane", allow_abbrev=False)
    top.add_argument("--version", action="version", version=f"natgwd {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # type: ignore[method-assign]

    run = sub.add_parser(
        "run", help="run the daemon: keep the kernel equal to the desired state", formatter_class=_WithDefaults
    )
    run.add_argument("--state", required=True, help="desired-state JSON file")
    run.add_argument(
        "--metrics-address",
        default=os.environ.get("NATGWD_METRICS_ADDRESS") or METRICS_ADDRESS,
        help=(
            "host:port for /metrics, /healthz, /readyz; auto:PORT: 127.0.0.1 and, once a state is applied, "
            "eth0's addresses unless eth0 is external, holds an EIP or the address is in an external network "
            f"(default: $NATGWD_METRICS_ADDRESS, else {METRICS_ADDRESS})"
        ),
    )
    run.add_argument("--resync-interval", type=_positive, default=10.0, help="seconds between drift checks")
    run.add_argument(
        "--log-format",
        choices=("json", "console"),
        default="json",
        help="the log on stderr: json, one object per line for a log collector; console, aligned text for a person",
    )
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe lines logged; debug adds each HTTP request and the HA peers' hellos",
    )
    run.add_argument(
        "--applied-state",
        default=str(paths.APPLIED_STATE),
        help="where to record the last applied state ('' for nowhere)",
    )
    add_allow_writable(run)
    run.add_argument(
        "--port-block-history",
        default=None,
        help=f"where to keep the applied port-block layouts for `natgwd whois` ('' for nowhere; default: "
        f"{paths.PORT_BLOCK_HISTORY.name} beside --applied-state)",
    )
    run.add_argument(
        "--ha-run-dir", default=str(paths.HA_RUN_DIR), help="with an ha section: keepalived's and conntrackd's files"
    )
    run.add_argument(
        "--discover-members",
        default="",
        metavar="POD_NAME",
        help="the pod's name ($HOSTNAME, as the image's `sleep infinity` passes it): when it is a replica of "
        "kube-ovn-controller's Deployment (vpc-nat-gw-GATEWAY-HASH-XXXXX), a state without scaleOut or ha is "
        "scaled out over the replicas found by a hello on the LAN (docs/scaling-out.md); else nothing",
    )
    run.add_argument(
        "--bgp-run-dir",
        default=str(paths.BGP_RUN_DIR),
        help="with a bgp section: FRR's files (configuration, sockets; owned by user frr)",
    )
    run.add_argument(
        "--edit-port",
        type=_port,
        default=None,
        help="take nat-gateway.sh calls on 127.94.69.1:PORT, a loopback address (0: any free port; default: off)",
    )
    run.add_argument(
        "--edit-token",
        default=str(paths.EDIT_TOKEN),
        help="with --edit-port: the file (mode 0600) natgwd writes the port and the callers' secret to",
    )
    from natgwd.kubeovn.shim.service import COMPACT_IDLE_SECONDS

    run.add_argument(
        "--edit-fold-after",
        type=_positive,
        default=COMPACT_IDLE_SECONDS,
        help="with --edit-port: seconds without a call before the calls' log is folded into the state file",
    )
    from natgwd.observability.options import add_arguments as add_observe_arguments

    add_observe_arguments(run)
    run.set_defaults(func=_run)

    check = sub.add_parser(
        "check", help="validate a desired-state file as `run` would read it; exit 1 listing every problem"
    )
    check.add_argument("file", help="the desired-state JSON file ('-': standard input)")
    add_allow_writable(check)
    check.set_defaults(func=_check)

    render = sub.add_parser("render", help="print the nftables script that would create the table")
    render.add_argument("file", help="the desired-state JSON file ('-': standard input)")
    render.set_defaults(func=_render)

    status = sub.add_parser("status", help="the rules and QoS classes in the kernel with their live counters")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--applied-state", default=str(paths.APPLIED_STATE), help="the daemon's record of the applied state"
    )
    status.add_argument(
        "--bgp-run-dir", default=str(paths.BGP_RUN_DIR), help="the BGP speaker's FRR directory (natgwd run's)"
    )
    status.add_argument(
        "--ha-run-dir", default=str(paths.HA_RUN_DIR), help="natgwd run's: the members it discovered, if any"
    )
    status.set_defaults(func=_status)

    whois = sub.add_parser(
        "whois", help="which internal address held an EIP's port (port blocks), now or at a past time"
    )
    whois.add_argument("endpoint", type=_endpoint, metavar="EIP:PORT", help="the EIP and the port seen outside")
    whois.add_argument(
        "--at",
        type=_time,
        default=None,
        help="the time (ISO 8601, UTC unless it names a zone, or seconds since the epoch; default: now)",
    )
    whois.add_argument(
        "--history", default=str(paths.PORT_BLOCK_HISTORY), help="the daemon's history of port-block layouts"
    )
    whois.set_defaults(func=_whois)

    imported = sub.add_parser(
        "import", help="write the desired state of a Kube-OVN VPC NAT gateway from its objects (kubectl get -o yaml)"
    )
    kubeovn_import.add_arguments(imported)
    imported.set_defaults(func=kubeovn_import.run)

    from natgwd.observability import top as top_view

    live = sub.add_parser("top", help="live view of the rules by connections, packets and bytes per second")
    top_view.add_arguments(live)
    live.set_defaults(func=top_view.run)

    cleanup = sub.add_parser(
        "cleanup",
        help="remove everything natgwd created (table, QoS qdiscs and IFB, addresses and routes): decommissioning",
    )
    cleanup.add_argument("--applied-state", default=str(paths.APPLIED_STATE))
    cleanup.set_defaults(func=_cleanup)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code
