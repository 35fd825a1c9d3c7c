"""`init`, and what else a call asks of the kernel: the interfaces as the CNI configured
them (a first desired state), natgwd's rules still in the kernel after a container restart,
and the VPC routes that `subnet-route-del` removes whoever installed them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_network
from typing import TYPE_CHECKING, Protocol

from natgwd.kubeovn.shim import grammar
from natgwd.kubeovn.shim.edits import Context, Doc, parse_route_add
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.planning.links import DEFAULT_ROUTE
from natgwd.state.model import RULE_KINDS
from natgwd.state.validation import InvalidStateError, load_state

if TYPE_CHECKING:
    from natgwd.kernel.netlink import KernelLinks

# The script's defaults, for `init` without arguments: Kube-OVN's controller sends none
# where Kube-OVN is the primary CNI (the VPC side is the pod's eth0, the external network
# net1); elsewhere it sends `net1,net2` (natgwd.kubeovn.importer.sides).
PRIMARY_CNI_VPC_INTERFACE = "eth0"
PRIMARY_CNI_EXTERNAL_INTERFACE = "net1"


class Links(Protocol):
    """What a call asks of the kernel (a fake in the unit tests)."""

    def exists(self, name: str) -> bool: ...

    def addresses(self, name: str) -> list[IPv4Interface]:
        """Primary global IPv4 addresses (what the CNI configured)."""
        ...

    def routes(self, name: str) -> list[tuple[IPv4Network, IPv4Address]]:
        """IPv4 routes through a gateway out of the interface (the default one included)."""
        ...

    def delete_routes(self, name: str, dst: IPv4Network) -> int:
        """Delete the main table's routes to `dst` out of the interface, whoever added
        them; how many there were."""
        ...

    def nat_rules(self) -> Doc | None:
        """The rules natgwd's nftables table holds (natgwd.kubeovn.kernelrules); None without one."""
        ...


class KernelView:
    """The real kernel: natgwd.kernel.netlink's queries, and natgwd's table. Imported when a
    call asks (pyroute2 takes a tenth of a second to import, and most calls never ask)."""

    def _links(self) -> KernelLinks:
        from natgwd.kernel.netlink import KernelLinks

        return KernelLinks()

    def exists(self, name: str) -> bool:
        return self._links().exists(name)

    def addresses(self, name: str) -> list[IPv4Interface]:
        return self._links().addresses(name)

    def routes(self, name: str) -> list[tuple[IPv4Network, IPv4Address]]:
        return self._links().routes(name)

    def delete_routes(self, name: str, dst: IPv4Network) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return self._links().delete_routes(name, dst)
        except NetlinkError as err:
            raise ShimError(f"natgwd: ip route del {dst} dev {name}: {err}") from None

    def nat_rules(self) -> Doc | None:
        from natgwd.kubeovn.kernelrules import read_kernel_rules

        return read_kernel_rules()


@dataclass(frozen=True)
class InitArgs:
    interfaces: tuple[str, str] | None
    routes: tuple[str, ...] = ()  # v1.12: `init CIDR,NEXTHOP`, as subnet-route-add rules
    warnings: tuple[str, ...] = ()


def _is_address(text: str) -> bool:
    try:
        ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def parse_init(rules: Sequence[str]) -> InitArgs:
    """`init [vpcIf,extIf]`; spaces around the comma tolerated (also split into words).
    Controllers up to v1.12 send `init SERVICE_CIDR,GATEWAY` instead (routes via the VPC
    gateway, interfaces eth0 and net1); dual-stack ones send both families' CIDRs and
    gateways in one comma-separated list."""
    names = [n.strip() for n in ",".join(rules).split(",") if n.strip()]
    if not names:
        return InitArgs(None)
    if any(_is_address(name) for name in names):
        v4 = [n for n in names if ":" not in n]
        cidrs, gateways = [n for n in v4 if "/" in n], [n for n in v4 if "/" not in n]
        if not cidrs or len(gateways) != 1 or len(v4) != len(cidrs) + 1:
            raise ShimError(f"Error: init {','.join(names)}: expected vpcIf,extIf or (v1.12) CIDR,NEXTHOP")
        ignored = tuple(f"init: {n} ignored (natgwd is IPv4-only)" for n in names if ":" in n)
        return InitArgs(None, tuple(f"{cidr},{gateways[0]}" for cidr in cidrs), ignored)
    if len(names) > 2:
        raise ShimError(
            f"Error: init {','.join(names)}: natgwd manages one external interface; a gateway with several "
            "externalSubnets (one external interface each) is not supported"
        )
    if len(names) != 2:
        raise ShimError("Error: Expected two interfaces separated by a comma (e.g., net1,net2)")
    return InitArgs((names[0], names[1]))


def skeleton(vpc: str, ext: str, links: Links, gateway_v4: str | None, ctx: Context) -> Doc:
    """A first desired state: the interfaces with what the CNI configured on them."""
    internal_addresses = links.addresses(vpc)
    external_addresses = links.addresses(ext)
    external_networks = [a.network for a in external_addresses]
    routes: list[dict[str, str]] = []
    for dst, via in links.routes(vpc):
        if dst == DEFAULT_ROUTE or any(dst.subnet_of(n) for n in external_networks):
            continue
        if any(via in a.network for a in internal_addresses) and not any(
            dst.subnet_of(a.network) for a in internal_addresses
        ):
            routes.append({"dst": str(dst), "via": str(via)})
    if not internal_addresses:
        ctx.warnings.append(f"{vpc} has no IPv4 address: DNAT and FIP targets need one in the state")
    doc: Doc = {
        "version": 1,
        "internal": {"interface": vpc, "addresses": [str(a) for a in internal_addresses]},
        "external": {"interface": ext, "addresses": [str(a) for a in external_addresses]},
    }
    if routes:
        doc["internal"]["routes"] = routes
    gateway = gateway_v4 or next((str(via) for dst, via in links.routes(ext) if dst == DEFAULT_ROUTE), None)
    if gateway:
        doc["external"]["gateway"] = str(grammar.address(gateway, "GATEWAY_V4"))
    return doc


def _take_over_kernel_rules(doc: Doc, links: Links, ctx: Context) -> None:
    """No state file, but natgwd's table may be in the kernel: after a container restart in
    the same network namespace it still translates every connection. Start from its rules
    (natgwd.kubeovn.kernelrules), so that applying this state changes nothing, as the script's
    `init` changes nothing where its iptables chains exist; the controller's replay then
    finds every rule in place."""
    try:
        rules = links.nat_rules()
    except (OSError, ValueError, KeyError) as err:
        ctx.warnings.append(f"cannot read natgwd's table in the kernel, starting without its rules: {err}")
        return
    if not rules:
        return
    candidate = {**doc, **rules}
    try:
        load_state(json.dumps(candidate).encode())
    except InvalidStateError as err:
        problems = "; ".join(str(p) for p in err.problems)
        ctx.warnings.append(f"natgwd's rules in the kernel do not fit this gateway, not taken over: {problems}")
        return
    doc.update(rules)
    counts = ", ".join(f"{len(rules[s])} {s}" for s in ("eips", *RULE_KINDS) if rules.get(s))
    ctx.warnings.append(f"no state file: took over natgwd's rules from the kernel ({counts})")


def init_op(rules: Sequence[str], links: Links) -> Callable[[Doc | None, Context], Doc]:
    args = parse_init(rules)
    names = args.interfaces

    def op(doc: Doc | None, ctx: Context) -> Doc:
        ctx.warnings.extend(args.warnings)
        if doc is None:
            vpc, ext = names or (PRIMARY_CNI_VPC_INTERFACE, PRIMARY_CNI_EXTERNAL_INTERFACE)
        else:
            vpc = names[0] if names else str((doc.get("internal") or {}).get("interface"))
            ext = names[1] if names else str((doc.get("external") or {}).get("interface"))
        for side, name in (("VPC", vpc), ("External", ext)):
            if not links.exists(name):
                raise ShimError(f"Error: {side} interface '{name}' not found")
        if doc is None:
            doc = skeleton(vpc, ext, links, ctx.gateway_v4, ctx)
            _take_over_kernel_rules(doc, links, ctx)
        for section, name in (("internal", vpc), ("external", ext)):
            part = doc.setdefault(section, {})
            if part.get("interface") != name:
                ctx.warnings.append(f"{section} interface changed from {part.get('interface')} to {name}")
                part["interface"] = name
        for route in args.routes:
            parse_route_add(route)(doc, ctx)
        return doc

    return op


def delete_leftover_routes(ctx: Context, links: Links) -> None:
    """After natgwd applied a `subnet-route-del`: also delete the route when someone else
    installed it. The CNI installs a route to every VPC subnet when the pod is created
    (`proto boot`); natgwd leaves routes it did not add, but in the drop-in the controller
    owns the VPC routes on the internal interface and the script runs `ip route del CIDR dev
    VPC`, which removes them whoever added them. A route that was nowhere fails as `ip route
    del` does: exit 2."""
    interface = ctx.internal_interface
    missing = []
    for dst, in_state in ctx.route_dels:
        deleted = links.delete_routes(interface, dst) if interface else 0
        if not deleted and not in_state:
            missing.append(str(dst))
    if missing:
        where = f"no route to {', '.join(missing)} on {interface}"
        raise ShimError(f"natgwd: {where} (ip route del: No such process)", code=2)
