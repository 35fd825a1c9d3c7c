"""The shell around rtnetlink (pyroute2) and the forwarding sysctl.

Ownership is recorded in the kernel, not in a file that a container restart would lose:
addresses natgwd adds carry IFA_PROTO and routes carry a route protocol, both NATGWD_PROTO.
Only those are ever removed; an address or route that was there before (from the CNI, or
an operator) is left alone even when natgwd also declares it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from natgwd.kernel.rtbatch import Address, Route, RtNetlink, attribute, delete_address, new_address
from natgwd.planning.links import LinkPlan, RouteSpec
from natgwd.planning.policy import FORWARDED_TABLE, PolicyRule
from natgwd.state.model import IPAddress, IPInterface

NATGWD_PROTO = 249  # unassigned in iproute2's rt_protos; marks what natgwd added
RTNH_F_ONLINK = 4
MAIN_TABLE = 254
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# IPv6 routes by the namespace-wide "all" setting alone (ip6_forward reads devconf_all), and
# the kernel refuses IPv6 devconf over RTM_SETLINK: only the sysctl file can turn it on.
IP6_CONF = Path("/proc/sys/net/ipv6/conf")
IP6_FORWARD = IP6_CONF / "all" / "forwarding"
# Addresses natgwd adds skip duplicate address detection: an IPv6 EIP would otherwise stay
# "tentative" (unusable as a source, not answered for) for a second or more after each add.
IFA_F_NODAD = 0x02
FAMILIES = (socket.AF_INET, socket.AF_INET6)
_DEFAULT_METRIC = {socket.AF_INET: 0, socket.AF_INET6: 1024}


@dataclass
class LinkReport:
    missing: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    added_addresses: list[tuple[str, IPInterface]] = field(default_factory=list)


@dataclass
class AddressChange:
    """What change_addresses did on one interface: the addresses it added (not those that
    were there already) and those of natgwd's it deleted."""

    interface: str
    index: int
    removed: list[IPInterface] = field(default_factory=list)
    added: list[IPInterface] = field(default_factory=list)


class AddressChangeError(OSError):
    """The kernel refused an address change; nothing of it stayed applied."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errno.EINVAL, "; ".join(errors))
        self.errors = errors


def ensure_forwarding(paths: tuple[Path, ...] = (IP_FORWARD, IP6_FORWARD)) -> bool:
    """Turn IPv4 and IPv6 forwarding on for the whole namespace; True when one was off.
    Where /proc/sys is read-only (an unprivileged container) IPv4 is left to the
    per-interface settings that Netlink.apply makes over netlink; a kernel without IPv6
    has no IPv6 file."""
    changed = False
    for path in paths:
        try:
            if path.read_text().strip() == "1":
                continue
            path.write_text("1\n")
        except OSError:
            continue
        changed = True
    return changed


def ipv4_addresses(interface: str) -> list[IPv4Address]:
    """The IPv4 addresses on `interface` ([] when there is no such link)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return []
        return [IPv4Address(m.get("IFA_ADDRESS")) for m in ipr.get_addr(family=socket.AF_INET, index=found[0])]


# Both HA members translate every synced connection the same way; with liberal TCP window
# tracking either one forwards any packet of it, whatever the other saw of the stream. That
# makes a split brain harmless for established connections, and a takeover too when the
# stream moved on while the entry was on its way.
TCP_BE_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def ensure_tcp_liberal(path: Path = TCP_BE_LIBERAL) -> bool:
    """Set liberal TCP window tracking; True when it was not. OSError where /proc/sys is
    read-only."""
    if path.read_text().strip() == "1":
        return False
    path.write_text("1\n")
    return True


def ensure_no_redirects(scope: str) -> bool:
    """Turn ICMP redirects off for `scope` ("all" or an interface); True when they were on.
    OSError where /proc/sys is read-only."""
    path = Path(f"/proc/sys/net/ipv4/conf/{scope}/send_redirects")
    if path.read_text().strip() == "0":
        return False
    path.write_text("0\n")
    return True


# IPv4 per-interface settings (include/uapi/linux/ip.h IPV4_DEVCONF_*), set over rtnetlink
# so that CAP_NET_ADMIN suffices where /proc/sys is mounted read-only.
DEVCONF_FORWARDING = 1
DEVCONF_PROMOTE_SECONDARIES = 20
_WANTED_DEVCONF = {"forwarding": DEVCONF_FORWARDING, "promote_secondaries": DEVCONF_PROMOTE_SECONDARIES}
RTM_SETLINK = 19
IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
NLA_F_NESTED = 0x8000


def _set_devconf(index: int, settings: dict[int, int]) -> None:
    """RTM_SETLINK with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF; pyroute2 only decodes these."""
    conf = b"".join(attribute(key, struct.pack("=I", value)) for key, value in settings.items())
    spec = attribute(
        IFLA_AF_SPEC | NLA_F_NESTED,
        attribute(socket.AF_INET | NLA_F_NESTED, attribute(IFLA_INET_CONF | NLA_F_NESTED, conf)),
    )
    body = struct.pack("=BxHiII", 0, 0, index, 0, 0) + spec
    header = struct.pack("=IHHII", 16 + len(body), RTM_SETLINK, 0x1 | 0x4, 1, 0)  # NLM_F_REQUEST|NLM_F_ACK
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(header + body)
        reply = sock.recv(65536)
    error = struct.unpack_from("=i", reply, 16)[0]
    if error:
        raise OSError(-error, os.strerror(-error))


class Netlink:
    def apply(self, plan: LinkPlan) -> LinkReport:
        report = LinkReport()
        with IPRoute() as ipr, RtNetlink() as rt:
            index: dict[str, int] = {}
            for spec in plan.interfaces:
                found = ipr.link_lookup(ifname=spec.name)
                if not found:
                    report.missing.append(spec.name)
                    continue
                index[spec.name] = found[0]
                self._up(ipr, spec.name, found[0], report)
                self._addresses(rt, found[0], spec.name, spec.addresses, report)
            self._routes(ipr, rt, plan.routes, index, report)
            self._rules(ipr, plan.rules, report)
        return report

    def add(self, before: LinkPlan, after: LinkPlan) -> LinkReport | None:
        """What `after` adds to `before`, which the kernel holds (the last apply verified
        it, and each resync verifies it again): an EIP's address costs one request, not
        dumps of every address and route. None when `after` removes or changes anything
        but routes: only a full apply knows what in the kernel is natgwd's to remove."""
        if before.interface_names != after.interface_names or before.rules != after.rules:
            return None
        gone_routes = {(r.table, r.dst) for r in before.routes} - {(r.table, r.dst) for r in after.routes}
        if gone_routes or any(
            not old.addresses <= new.addresses for old, new in zip(before.interfaces, after.interfaces, strict=True)
        ):
            return None
        report = LinkReport()
        index: dict[str, int] = {}
        for new in after.interfaces:
            try:
                index[new.name] = socket.if_nametoindex(new.name)
            except OSError:
                return None
        with RtNetlink() as rt:
            self._add_addrs(
                rt,
                [
                    (index[new.name], new.name, address)
                    for old, new in zip(before.interfaces, after.interfaces, strict=True)
                    for address in _in_order(new.addresses - old.addresses)
                ],
                report,
            )
        kept = set(before.routes)
        added_routes = [spec for spec in after.routes if spec not in kept]
        if added_routes:
            with IPRoute() as ipr:
                for spec in added_routes:
                    self._replace_route(ipr, spec, index, report)
        return report

    def change_addresses(
        self, interface: str, removed: Sequence[IPInterface], added: Sequence[IPInterface]
    ) -> AddressChange:
        """Delete natgwd's own `removed` (another's stays) and add `added` on `interface`,
        in one batch and all or nothing: when the kernel refuses one, what the others did
        is undone and AddressChangeError names each refusal with the kernel's reason."""
        index = socket.if_nametoindex(interface)  # OSError when it is gone
        done = AddressChange(interface, index)
        report = LinkReport()
        with RtNetlink() as rt:
            if removed:
                present = {a.interface: a.proto for a in rt.addresses(index)}
                doomed = [(index, a) for a in removed if present.get(a) == NATGWD_PROTO]
                for (_, address), refusal in zip(
                    doomed, rt.send_all([delete_address(*d) for d in doomed]), strict=True
                ):
                    if refusal is None or refusal.code in (errno.EADDRNOTAVAIL, errno.ENOENT):
                        done.removed.append(address)
                    else:
                        report.errors.append(f"delete address {address} dev {interface}: {refusal}")
            adds = [(index, interface, address) for address in added]
            self._add_addrs(rt, adds, report)
            done.added = [address for _, address in report.added_addresses]
            if report.errors:
                self._undo(rt, done)
                raise AddressChangeError(report.errors)
        return done

    def undo(self, change: AddressChange) -> None:
        """Take back a change_addresses (the transaction that was to follow it failed)."""
        with RtNetlink() as rt:
            self._undo(rt, change)

    def _undo(self, rt: RtNetlink, change: AddressChange) -> None:
        report = LinkReport()
        self._del_addrs(rt, [(change.index, address) for address in change.added], report)
        self._add_addrs(rt, [(change.index, change.interface, address) for address in change.removed], report)
        if report.errors:
            raise AddressChangeError([f"undoing an address change: {error}" for error in report.errors])

    def remove_owned(self) -> LinkReport:
        """Delete every address and route natgwd added (for a decommissioned gateway)."""
        report = LinkReport()
        with IPRoute() as ipr, RtNetlink() as rt:
            owned = [(a.index, a.interface) for a in rt.addresses() if a.proto == NATGWD_PROTO]
            self._del_addrs(rt, owned, report)
            for route in self._owned_routes(rt):
                self._del_route(ipr, route, report)
            self._rules(ipr, (), report)
        return report

    # --- pieces ---------------------------------------------------------------------

    def _up(self, ipr: IPRoute, name: str, idx: int, report: LinkReport) -> None:
        link = ipr.get_links(idx)[0]
        if not link["flags"] & 1:  # IFF_UP
            self._skip_link_local_dad(name, report)
            ipr.link("set", index=idx, state="up")
            report.changes.append(f"set {name} up")
        # forwarding: packets from this interface are routed. promote_secondaries: without
        # it, deleting the interface's primary address (a changed external.addresses) makes
        # the kernel delete every secondary of that subnet: all EIPs, and others' addresses.
        inet = link.get_attr("IFLA_AF_SPEC").get_attr("AF_INET")
        off = {key: 1 for name_, key in _WANTED_DEVCONF.items() if inet[name_] != 1}
        if off:
            try:
                _set_devconf(idx, off)
                report.changes.append(f"set {name} " + ", ".join(n for n, k in _WANTED_DEVCONF.items() if k in off))
            except OSError as err:
                report.errors.append(f"set {name} forwarding/promote_secondaries: {err}")

    def _skip_link_local_dad(self, name: str, report: LinkReport) -> None:
        """Before natgwd brings an interface up: no duplicate address detection for the
        link-local address the kernel then gives it. While that address is tentative (a
        second or more) the kernel sends no neighbour solicitation for forwarded packets,
        so IPv6 DNAT and FIP traffic to the VPC would wait for it. Where /proc/sys is
        read-only this is skipped: the wait is all it costs."""
        path = IP6_CONF / name / "accept_dad"
        try:
            if path.read_text().strip() != "0":
                path.write_text("0\n")
                report.changes.append(f"set {name} accept_dad 0")
        except OSError:
            pass

    def _addresses(
        self, rt: RtNetlink, idx: int, name: str, wanted: frozenset[IPInterface], report: LinkReport
    ) -> None:
        present = {a.interface: a for a in rt.addresses(idx)}
        self._add_addrs(rt, [(idx, name, address) for address in _in_order(wanted - present.keys())], report)
        doomed = [(idx, a) for a, found in present.items() if a not in wanted and found.proto == NATGWD_PROTO]
        self._del_addrs(rt, doomed, report)

    def _add_addrs(self, rt: RtNetlink, adds: list[tuple[int, str, IPInterface]], report: LinkReport) -> None:
        """Add (interface index, name, address) in order, many to a send; each refusal
        is named with its reason, the others are added all the same (as one by one)."""
        requests = [
            new_address(idx, address, NATGWD_PROTO, IFA_F_NODAD if address.version == 6 else 0)
            for idx, _name, address in adds
        ]
        for (_idx, name, address), refusal in zip(adds, rt.send_all(requests), strict=True):
            if refusal is None:
                report.changes.append(f"add address {address} dev {name}")
                report.added_addresses.append((name, address))
            elif refusal.code != errno.EEXIST:
                report.errors.append(f"add address {address} dev {name}: {refusal}")

    def _del_addrs(self, rt: RtNetlink, doomed: list[tuple[int, IPInterface]], report: LinkReport) -> None:
        requests = [delete_address(idx, address) for idx, address in doomed]
        for (_idx, address), refusal in zip(doomed, rt.send_all(requests), strict=True):
            if refusal is None:
                report.changes.append(f"delete address {address}")
            elif refusal.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                report.errors.append(f"delete address {address}: {refusal}")

    def _owned_routes(self, rt: RtNetlink) -> list[Route]:
        # Every table: with several external networks natgwd has a table per network.
        return [r for family in FAMILIES for r in rt.routes(family, protocol=NATGWD_PROTO)]

    def _routes(
        self,
        ipr: IPRoute,
        rt: RtNetlink,
        wanted: tuple[RouteSpec, ...],
        index: dict[str, int],
        report: LinkReport,
    ) -> None:
        tables = {MAIN_TABLE} | {spec.table for spec in wanted}
        existing = {
            (r.table, r.dst): r
            for family in FAMILIES
            for table in sorted(tables)
            for r in rt.routes(family, table=table)
            # unicast, with the metric a route added without one gets (0; 1024 for IPv6)
            if r.priority == _DEFAULT_METRIC[family] and r.type == 1
        }
        wanted_dsts = set()
        for spec in wanted:
            wanted_dsts.add((spec.table, spec.dst))
            if spec.interface not in index:
                continue  # follows the interface when it appears
            current = existing.get((spec.table, spec.dst))
            if current is not None and current.gateway == str(spec.via) and current.oif == index[spec.interface]:
                continue
            self._replace_route(ipr, spec, index, report)
        for route in self._owned_routes(rt):
            if (route.table, route.dst) not in wanted_dsts:
                self._del_route(ipr, route, report)

    def _replace_route(self, ipr: IPRoute, spec: RouteSpec, index: dict[str, int], report: LinkReport) -> None:
        try:
            ipr.route(
                "replace",
                dst=str(spec.dst),
                family=socket.AF_INET6 if spec.dst.version == 6 else socket.AF_INET,
                gateway=str(spec.via),
                oif=index[spec.interface],
                proto=NATGWD_PROTO,
                flags=RTNH_F_ONLINK if spec.onlink else 0,
                table=spec.table,
            )
            report.changes.append(f"route {spec.dst} via {spec.via} dev {spec.interface}{_in_table(spec.table)}")
        except NetlinkError as err:
            report.errors.append(f"route {spec.dst} via {spec.via} dev {spec.interface}: {err}")

    def _del_route(self, ipr: IPRoute, route: Route, report: LinkReport) -> None:
        dst = str(route.dst)
        try:
            ipr.route("del", dst=dst, family=route.family, table=route.table, proto=NATGWD_PROTO, oif=route.oif)
            report.changes.append(f"delete route {dst}{_in_table(route.table)}")
        except NetlinkError as err:
            if err.code != errno.ESRCH:
                report.errors.append(f"delete route {dst}: {err}")

    def _rules(self, ipr: IPRoute, wanted: tuple[PolicyRule, ...], report: LinkReport) -> None:
        """Make natgwd's policy rules (FRA_PROTOCOL NATGWD_PROTO) exactly `wanted`."""
        owned = {
            _rule_of(msg): msg
            for family in FAMILIES
            for msg in ipr.get_rules(family=family)
            if msg.get_attr("FRA_PROTOCOL") == NATGWD_PROTO
        }
        for rule in wanted:
            if rule in owned:
                continue
            try:
                ipr.rule("add", protocol=NATGWD_PROTO, **_rule_fields(rule))
                report.changes.append(f"add {rule}")
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    report.errors.append(f"add {rule}: {err}")
        for rule in owned.keys() - set(wanted):
            try:
                ipr.rule("del", protocol=NATGWD_PROTO, **_rule_fields(rule))
                report.changes.append(f"delete {rule}")
            except NetlinkError as err:
                if err.code not in (errno.ENOENT, errno.ESRCH):
                    report.errors.append(f"delete {rule}: {err}")


HANDOVER_PROTO = 250  # the hand-over routes (natgwd.ha.scale), kept apart from the link plan's


def set_handover_route(table: int, via: IPv4Address | None, interface: str) -> None:
    """Table `table` holds one default route, via `via` out of `interface`, or none at all
    (None: this member owns the group, so the lookup falls through to the main table)."""
    with IPRoute() as ipr:
        if via is None:
            try:
                ipr.route("del", dst="0.0.0.0/0", family=socket.AF_INET, table=table)
            except NetlinkError as err:
                if err.code != errno.ESRCH:
                    raise
            return
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise OSError(errno.ENODEV, f"no interface {interface}")
        ipr.route(
            "replace",
            dst="0.0.0.0/0",
            family=socket.AF_INET,
            gateway=str(via),
            oif=found[0],
            proto=HANDOVER_PROTO,
            flags=RTNH_F_ONLINK,
            table=table,
        )


def _rule_fields(rule: PolicyRule) -> dict[str, object]:
    fields: dict[str, object] = {
        "family": socket.AF_INET6 if rule.family == 6 else socket.AF_INET,
        "priority": rule.priority,
        "table": rule.table,
    }
    if rule.fwmark:
        fields["fwmark"] = rule.fwmark
    if rule.src:
        fields.update(src=rule.src, src_len=128 if rule.family == 6 else 32)
    if rule.suppress_prefixlength >= 0:
        fields["suppress_prefixlen"] = rule.suppress_prefixlength
    if rule.iif:
        fields["iifname"] = rule.iif
    return fields


_NO_SUPPRESSION = 0xFFFFFFFF


def _rule_of(msg: dict) -> PolicyRule:
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")  # type: ignore[attr-defined]
    return PolicyRule(
        family=6 if msg["family"] == socket.AF_INET6 else 4,
        priority=msg.get_attr("FRA_PRIORITY") or 0,  # type: ignore[attr-defined]
        table=msg.get_attr("FRA_TABLE") or msg["table"],  # type: ignore[attr-defined]
        fwmark=msg.get_attr("FRA_FWMARK") or 0,  # type: ignore[attr-defined]
        src=msg.get_attr("FRA_SRC") or "",  # type: ignore[attr-defined]
        suppress_prefixlength=-1 if suppress in (None, _NO_SUPPRESSION) else suppress,
        iif=msg.get_attr("FRA_IIFNAME") or "",  # type: ignore[attr-defined]
    )


def _in_table(table: int) -> str:
    return "" if table == MAIN_TABLE else f" table {table}"


def _in_order(addresses: frozenset[IPInterface]) -> list[IPInterface]:
    """IPv4 first, then by subnet, then by address: the first of a subnet becomes its
    primary. (The order of (version, address), with integer keys: comparing ipaddress
    objects costs tens of milliseconds at 1,000 EIPs.)"""
    return sorted(
        addresses,
        key=lambda a: (a.version, int(a.network.network_address), a.network.prefixlen, int(a.ip)),
    )


class KernelLinks:
    """What the drop-in nat-gateway.sh asks of the interfaces (natgwd.kubeovn.shim.init):
    what the CNI configured on them, and `ip route del` of the VPC routes the controller
    removes, whoever installed them."""

    IFA_F_SECONDARY = 0x01

    def exists(self, name: str) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=name))

    def addresses(self, name: str) -> list[IPv4Interface]:
        """Primary global IPv4 addresses that natgwd did not add (the CNI's)."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return []
            addresses = []
            for msg in ipr.get_addr(family=socket.AF_INET, index=found[0]):
                if msg["scope"] != 0 or msg["flags"] & self.IFA_F_SECONDARY or msg.get("IFA_PROTO") == NATGWD_PROTO:
                    continue
                local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                addresses.append(IPv4Interface(f"{local}/{msg['prefixlen']}"))
            return addresses

    def routes(self, name: str) -> list[tuple[IPv4Network, IPv4Address]]:
        """The IPv4 routes through a gateway out of the interface: the main table's, and
        the default route natgwd keeps for forwarded packets (external.defaultRoute
        "forwarded"), which a new state after a container restart takes over."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return []
            routes = []
            for msg in ipr.get_routes(family=socket.AF_INET):
                if msg.get("RTA_TABLE") not in (MAIN_TABLE, FORWARDED_TABLE):
                    continue
                gateway = msg.get("RTA_GATEWAY")
                if msg.get("RTA_OIF") != found[0] or not gateway:
                    continue
                routes.append(
                    (IPv4Network(f"{msg.get('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}"), IPv4Address(gateway))
                )
            return routes

    def delete_routes(self, name: str, dst: IPv4Network) -> int:
        """Delete the main table's routes to `dst` out of the interface, whoever added them
        (`ip route del`); how many there were. Raises NetlinkError when one cannot go."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return 0
            doomed = [
                msg
                for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
                if msg.get("RTA_OIF") == found[0]
                and msg["dst_len"] == dst.prefixlen
                and msg.get("RTA_DST") == str(dst.network_address)
            ]
            deleted = 0
            for msg in doomed:
                try:
                    ipr.route("del", dst=str(dst), table=MAIN_TABLE, oif=found[0], proto=msg["proto"])
                except NetlinkError as err:
                    if err.code == errno.ESRCH:  # gone meanwhile: not ours to count
                        continue
                    raise
                deleted += 1
            return deleted


IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


def usable_addresses(name: str) -> list[IPAddress]:
    """The interface's global-scope addresses, both families, that a socket can bind now
    (not tentative, not failed duplicate address detection); none if it does not exist.
    Raises OSError when netlink cannot answer. Asked at every resync: a dump the kernel
    filters by interface (pyroute2's get_addr dumps every address of the namespace, half
    a second with 5,000 EIPs)."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return []
    with RtNetlink() as rt:
        return [a.local for a in rt.addresses(index) if bindable(a, index)]


def bindable(address: Address, index: int) -> bool:
    """Whether a socket can bind `address` on interface `index` now: global scope, not
    tentative, duplicate address detection not failed."""
    return address.index == index and address.scope == 0 and not address.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
