"""The shell around the kernel's traffic control (pyroute2's tc API, and rtnetlink messages
built here for the u32 filters that API cannot express; never the `tc` program): makes the
kernel hold the trees natgwd.qos.plan describes, by difference.

What is natgwd's is recorded in the kernel itself, so a restart (or `natgwd cleanup`)
finds it again: the root HTB qdisc with handle 4e47:, the u32 filter at priority
MIRRED_PRIO in an ingress qdisc that redirects to natgwd's IFB device, and IFB devices
whose alias is IFB_ALIAS. Anything else (another root qdisc, an ingress qdisc with other
filters, a link of the IFB's name that is not natgwd's) is never changed: QoS that would
need it is reported as an error instead.

Each sync reads the trees back and touches only what differs: a changed rate is one
class change (its queue and the flows in it stay), a new EIP one class and one filter.
Everything is read by rtnetlink dumps decoded here (natgwd.kernel.tcdump); pyroute2 is
opened only to write. A tree found as the last sync verified it (the same messages, but
for their counters, and the same wants) is not decoded or planned again.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg.common import calc_xmittime

from natgwd.kernel.netlink import NLA_F_NESTED
from natgwd.kernel.rtbatch import Request, RtNetlink
from natgwd.kernel.rtbatch import attribute as nla
from natgwd.kernel.tcdump import (
    RTM_GETTCLASS,
    RTM_GETTFILTER,
    Link,
    Qdisc,
    TcDumpError,
    attributes,
    decode,
    dump,
    links,
    qdiscs,
    signature,
    tc_dump,
)
from natgwd.qos.plan import (
    DEFAULT_MINOR,
    DESTINATION_OFFSET,
    EIP_PRIO,
    ROOT_MAJOR,
    SOURCE_OFFSET,
    ClassKey,
    ClassStats,
    FilterSpec,
    HtbClass,
    QosWants,
    TcReport,
    Tree,
    Want,
    handle,
    ifb_name,
    key_of,
    tree,
)
from natgwd.state.qos import DIRECTIONS, Direction

log = structlog.get_logger("natgwd.kernel.tc")

ETH_P_IP = 0x0800
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
INGRESS_HANDLE = 0xFFFF0000
ROOT_HANDLE = ROOT_MAJOR << 16
MIRRED_PRIO = ROOT_MAJOR  # the redirect filter's priority in the ingress qdisc
IFB_ALIAS = "natgwd qos"
IFB_TXQUEUELEN = 1000
MAX_QUANTUM = 200_000  # the kernel's bounds for a sensible HTB quantum
MIN_QUANTUM = 2_000
# EIP filters sit in a u32 hash table of 256 buckets keyed by the address's last byte:
# a packet is compared with the EIPs of its bucket, not with every EIP.
EIP_TABLE = 0x4E4 << 20
HASH_BUCKETS = 256
HASH_MASK = 0xFF


@dataclass(frozen=True)
class _KernelFilter:
    spec: FilterSpec
    handle: int
    mirred_ifindex: int | None
    link: int = 0  # the hash table a link filter sends packets to
    hash_key: tuple[int, int] = (0, 0)  # a link filter's (offset, mask) of the hashed word
    divisor: int = 0  # > 0: the entry of a hash table, not a filter

    @property
    def table(self) -> int:
        return self.handle & 0xFFF00000

    @property
    def bucket(self) -> int:
        return (self.handle >> 12) & 0xFF


@dataclass(frozen=True)
class _Selector:
    keys: list[tuple[int, int, int]]  # (value, mask, offset)
    hash_offset: int
    hash_mask: int


def _selector(data: bytes | None) -> _Selector:
    """The u32 selector (TCA_U32_SEL's payload), with its hash key."""
    if data is None:
        return _Selector([], 0, 0)
    # struct tc_u32_sel: flags, offshift, nkeys, pad, offmask, off, offoff, hoff (host
    # order), hmask (network order); then the keys
    count = data[2]
    (hash_offset,) = struct.unpack_from("=h", data, 10)
    (hash_mask,) = struct.unpack_from(">I", data, 12)
    keys = []
    for i in range(count):
        # struct tc_u32_key: mask and value in network order, the offset in host order
        mask, value = struct.unpack_from(">II", data, 16 + 16 * i)
        (offset,) = struct.unpack_from("=i", data, 24 + 16 * i)
        keys.append((value, mask, offset))
    return _Selector(keys, hash_offset, hash_mask)


def _u32(data: bytes | None, default: int = 0) -> int:
    return int(_U32.unpack_from(data)[0]) if data is not None and len(data) >= 4 else default


_U32 = struct.Struct("=I")


# rtnetlink and u32 constants (linux/rtnetlink.h, linux/pkt_cls.h): pyroute2's tc API
# cannot set a u32 filter's hash table, link or divisor, so these messages are built here.
RTM_NEWTCLASS, RTM_DELTCLASS, RTM_NEWTFILTER, RTM_DELTFILTER = 40, 41, 44, 45
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_U32_CLASSID, TCA_U32_HASH, TCA_U32_LINK, TCA_U32_DIVISOR, TCA_U32_SEL = 1, 2, 3, 4, 5
TC_U32_TERMINAL = 1


def _u32_request(
    index: int,
    prio: int,
    *,
    keys: tuple[tuple[int, int, int], ...] = (),
    classid: int | None = None,
    into: int | None = None,
    link: int | None = None,
    hash_key: tuple[int, int] = (0, 0),
    divisor: int | None = None,
    handle_: int = 0,
) -> Request:
    """The request that adds one IPv4 u32 filter (or, with `divisor`, a hash table) to natgwd's tree: keys
    (value, mask, offset), to `classid`, in hash table bucket `into`, or linking to the
    hash table `link` by `hash_key` (offset, mask)."""
    options = b""
    if classid is not None:
        options += nla(TCA_U32_CLASSID, struct.pack("=I", classid))
    if into is not None:
        options += nla(TCA_U32_HASH, struct.pack("=I", into))
    if link is not None:
        options += nla(TCA_U32_LINK, struct.pack("=I", link))
    if divisor is not None:
        options += nla(TCA_U32_DIVISOR, struct.pack("=I", divisor))
    else:
        hash_offset, hash_mask = hash_key
        flags = TC_U32_TERMINAL if classid is not None else 0
        selector = struct.pack("=BBBxHHhh", flags, 0, len(keys), 0, 0, 0, hash_offset) + struct.pack(">I", hash_mask)
        selector += b"".join(
            struct.pack(">II", mask, value) + struct.pack("=ii", offset, 0) for value, mask, offset in keys
        )
        options += nla(TCA_U32_SEL, selector)
    info = (prio << 16) | socket.htons(ETH_P_IP)
    body = _TCMSG.pack(socket.AF_UNSPEC, index, handle_, ROOT_HANDLE, info)
    body += nla(TCA_KIND, b"u32\0") + nla(TCA_OPTIONS | NLA_F_NESTED, options)
    return Request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, body)


def _mirred_target(actions: bytes | None) -> int | None:
    """The device a u32 filter's mirred action sends to (TCA_U32_ACT's payload)."""
    if actions is None:
        return None
    for action in attributes(actions).values():
        found = attributes(action)
        if found.get(TCA_ACT_KIND, b"").split(b"\0", 1)[0] != b"mirred" or TCA_ACT_OPTIONS not in found:
            continue
        parms = attributes(found[TCA_ACT_OPTIONS]).get(TCA_MIRRED_PARMS)
        if parms is not None and len(parms) >= _MIRRED_PARMS.size:
            return int(_MIRRED_PARMS.unpack_from(parms)[-1])
    return None


# linux/tc_act/tc_mirred.h: struct tc_mirred (tc_gen: index, capab, action, refcnt, bindcnt; eaction, ifindex)
TCA_U32_ACT, TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_MIRRED_PARMS = 7, 1, 2, 2
_MIRRED_PARMS = struct.Struct("=IIiiiiI")
# linux/pkt_sched.h: struct tc_htb_opt (rate and ceil are struct tc_ratespec: cell_log,
# linklayer, overhead, cell_align, mpu, rate), then buffer, cbuffer, quantum, level, prio
TCA_HTB_PARMS, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 6, 7
_HTB_PARMS = struct.Struct("=BBHhHI BBHhHI IIIII")
# With the link layer named, HTB needs no rate table (as `tc` sends it when asked for one).
TC_LINKLAYER_ETHERNET = 1
_TCMSG = struct.Struct("=BxxxiIII")
# linux/gen_stats.h: TCA_STATS_BASIC (bytes u64, packets u32),
# TCA_STATS_QUEUE (qlen, backlog, drops, requeues, overlimits)
TCA_STATS_BASIC, TCA_STATS_QUEUE = 1, 3
_STATS_BASIC, _STATS_QUEUE = struct.Struct("=QI"), struct.Struct("=IIIII")


def _htb_parms(options: dict[int, bytes] | None) -> dict[str, int] | None:
    data = options.get(TCA_HTB_PARMS) if options is not None else None
    if data is None or len(data) < _HTB_PARMS.size:
        return None
    values = _HTB_PARMS.unpack_from(data)
    return {"rate": values[5], "ceil": values[11], "buffer": values[12], "cbuffer": values[13]}


_Rates = tuple[int, int, int, int]  # an HTB class's rate, ceil, buffer and cbuffer (ticks)


def _rates(spec: HtbClass) -> _Rates:
    """What a class of the plan reads back as."""
    ticks = _ticks(spec.rate_bytes, spec.burst_bytes)
    return spec.rate_bytes, spec.rate_bytes, ticks, ticks


def _class_request(index: int, minor: int, spec: HtbClass, *, add: bool) -> Request:
    """The request that adds (or changes) class `minor` of natgwd's tree."""
    rate, ticks = spec.rate_bytes, _ticks(spec.rate_bytes, spec.burst_bytes)
    low = min(rate, 0xFFFFFFFF)  # above: the 64-bit attributes carry it
    ratespec = (0, TC_LINKLAYER_ETHERNET, 0, 0, 0, low)  # cell_log, linklayer, overhead, cell_align, mpu, rate
    parms = _HTB_PARMS.pack(*ratespec, *ratespec, ticks, ticks, _quantum(rate), 0, 0)
    options = nla(TCA_HTB_PARMS, parms)
    if rate > 0xFFFFFFFF:
        options += nla(TCA_HTB_RATE64, struct.pack("=Q", rate)) + nla(TCA_HTB_CEIL64, struct.pack("=Q", rate))
    body = _TCMSG.pack(socket.AF_UNSPEC, index, handle(minor), ROOT_HANDLE, 0)
    body += nla(TCA_KIND, b"htb\0") + nla(TCA_OPTIONS | NLA_F_NESTED, options)
    return Request(RTM_NEWTCLASS, NLM_F_CREATE | NLM_F_EXCL if add else 0, body)


def _delete_class(index: int, minor: int) -> Request:
    return Request(RTM_DELTCLASS, 0, _TCMSG.pack(socket.AF_UNSPEC, index, handle(minor), 0, 0))


def _delete_filter(index: int, parent: int, kernel: _KernelFilter) -> Request:
    info = (kernel.spec.prio << 16) | socket.htons(ETH_P_IP)
    body = _TCMSG.pack(socket.AF_UNSPEC, index, kernel.handle, parent, info) + nla(TCA_KIND, b"u32\0")
    return Request(RTM_DELTFILTER, 0, body)


def _quantum(rate_bytes: int) -> int:
    return min(max(rate_bytes // 10, MIN_QUANTUM), MAX_QUANTUM)


def _ticks(rate_bytes: int, burst: int) -> int:
    return int(calc_xmittime(rate_bytes, burst))


class _Filter(NamedTuple):
    kernel: _KernelFilter
    key: ClassKey | None  # what it limits (key_of)


@dataclass
class _Memo:
    """What the last sync of a device's tree read and planned: its messages decoded, by
    signature (decoding reads nothing a signature leaves out), the plan and what it was
    made from, and the wants and signatures if that sync found nothing to change."""

    direction: Direction
    filters: dict[bytes, _Filter | None] = field(default_factory=dict)
    classes: dict[bytes, tuple[int, _Rates] | None] = field(default_factory=dict)
    plan: tuple[Mapping[ClassKey, Want], dict[ClassKey, int], Tree, dict[int, _Rates]] | None = None
    verified: tuple[Mapping[ClassKey, Want], tuple[list[bytes], list[bytes]]] | None = None

    def read_filters(self, signatures: list[bytes]) -> list[_Filter]:
        known, self.filters = self.filters, {}
        for found in signatures:
            if found in known:
                self.filters[found] = known[found]
            else:
                kernel = _read_filter(found)
                self.filters[found] = None if kernel is None else _Filter(kernel, key_of(self.direction, kernel.spec))
        return [entry for entry in map(self.filters.__getitem__, signatures) if entry is not None]

    def read_classes(self, signatures: list[bytes]) -> dict[int, _Rates]:
        known, self.classes = self.classes, {}
        for found in signatures:
            self.classes[found] = known[found] if found in known else _read_class(found)
        return dict(entry for entry in map(self.classes.__getitem__, signatures) if entry is not None)

    def tree(self, wanted: Mapping[ClassKey, Want], previous: dict[ClassKey, int]) -> tuple[Tree, dict[int, _Rates]]:
        """The plan, and what its classes read back as."""
        if self.plan is None or self.plan[:2] != (wanted, previous):
            planned = tree(self.direction, wanted, previous)
            self.plan = (wanted, previous, planned, {minor: _rates(c) for minor, c in planned.classes.items()})
        return self.plan[2], self.plan[3]


class _Netlink:
    """One sync's view of the kernel: an rtnetlink socket that reads (and sends natgwd's
    batches of class and filter requests), the namespace's links and qdiscs as last read,
    and pyroute2, opened only to write qdiscs and links. Every write makes what was read
    stale."""

    def __init__(self) -> None:
        self.rt = RtNetlink()
        self._ipr: IPRoute | None = None
        self._links: list[Link] | None = None
        self._qdiscs: list[Qdisc] | None = None
        self.writes = 0

    def __enter__(self) -> _Netlink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.rt.close()
        if self._ipr is not None:
            self._ipr.close()

    @property
    def ipr(self) -> IPRoute:
        self.written()
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def written(self) -> None:
        self.writes += 1
        self._links = self._qdiscs = None

    def links(self) -> list[Link]:
        if self._links is None:
            self._links = links(self.rt)
        return self._links

    def qdiscs(self) -> list[Qdisc]:
        if self._qdiscs is None:
            self._qdiscs = qdiscs(self.rt)
        return self._qdiscs

    def index(self, name: str) -> int | None:
        return next((link.ifindex for link in self.links() if link.name == name), None)


class KernelTc:
    """Traffic control in the current network namespace."""

    def __init__(self) -> None:
        self.fq_codel: bool | None = None  # unknown until a leaf is first added
        # What each class of a tree limits, as last synced, by device: a scrape then needs
        # the classes only (reading the filters back costs twice as much).
        self._keys: dict[str, dict[int, ClassKey]] = {}
        self._memos: dict[str, _Memo] = {}  # by device

    @property
    def leaf(self) -> str | None:
        """The leaf qdisc of the classes: fq_codel, the kernel's default, or None (unknown
        until a sync has had a class to put one under)."""
        return None if self.fq_codel is None else "fq_codel" if self.fq_codel else "default"

    # --- the whole -----------------------------------------------------------------

    def apply(self, wants: QosWants) -> TcReport:
        report = TcReport()
        with _Netlink() as net:
            external = net.index(wants.external)
            if external is None:
                return report  # the link report says it is missing; QoS follows it
            keep = {external}
            outside = _Device(net, external, wants.external, report)
            if wants.active("egress"):
                self._sync_tree(outside, "egress", wants)
            ifb = None
            if wants.active("ingress"):
                ifb = self._ensure_ifb(net, wants.ifb, report)
            if ifb is not None:
                keep.add(ifb)
                if outside.ensure_redirect(ifb):
                    self._sync_tree(_Device(net, ifb, wants.ifb, report), "ingress", wants)
            self._sweep(
                net,
                roots_on=keep if wants.active("egress") else keep - {external},
                redirects_on={external} if ifb is not None else set(),
                ifbs={ifb} if ifb is not None else set(),
                report=report,
            )
        return report

    def remove_all(self) -> TcReport:
        """Delete every qdisc, filter and IFB natgwd created, in every interface."""
        report = TcReport()
        with _Netlink() as net:
            self._sweep(net, roots_on=set(), redirects_on=set(), ifbs=set(), report=report)
        return report

    def stats(self, external: str) -> list[ClassStats]:
        """Per class of natgwd's trees for this external interface: the kernel's counters
        and what the class limits."""
        found: list[ClassStats] = []
        with _Netlink() as net:
            for direction, name, index in self._tree_devices(net, external):
                keys = self._keys.get(name)
                if keys is None:
                    filters = _Device(net, index, name, TcReport()).filters(ROOT_HANDLE)
                    keys = {f.spec.minor: key for f in filters if (key := key_of(direction, f.spec)) is not None}
                    keys[DEFAULT_MINOR] = ClassKey("default")
                for msg in dump(net.rt, RTM_GETTCLASS, index):
                    minor = msg.handle & 0xFFFF
                    parms = _htb_parms(msg.options)
                    if msg.handle >> 16 != ROOT_MAJOR or minor not in keys or parms is None:
                        continue
                    stats = msg.stats or {}
                    basic, queue = stats.get(TCA_STATS_BASIC), stats.get(TCA_STATS_QUEUE)
                    octets, packets = _STATS_BASIC.unpack_from(basic) if basic else (0, 0)
                    _, backlog, drops, _, overlimits = _STATS_QUEUE.unpack_from(queue) if queue else (0,) * 5
                    found.append(
                        ClassStats(direction, keys[minor], parms["rate"], octets, packets, drops, overlimits, backlog)
                    )
        return found

    def shaped_interfaces(self) -> list[str]:
        """The interfaces natgwd shapes now (for `natgwd status` without a state): those
        with its root qdisc, and those whose IFB it made."""
        with _Netlink() as net:
            names = {link.ifindex: link.name for link in net.links()}
            found = {names[q.ifindex] for q in net.qdiscs() if q.handle == ROOT_HANDLE and q.ifindex in names}
            ifbs = {link.name for link in net.links() if _is_our_ifb(link)}
            externals = {name for name in found if name not in ifbs}
            externals |= {n for n in names.values() if ifb_name(n) in ifbs}
        return sorted(externals)

    def _tree_devices(self, net: _Netlink, external: str) -> Iterable[tuple[Direction, str, int]]:
        devices: list[tuple[Direction, str, int]] = []
        for direction, name in zip(DIRECTIONS, (ifb_name(external), external), strict=True):
            index = net.index(name)
            if index is not None and _Device(net, index, name, TcReport()).root() == ("htb", ROOT_HANDLE):
                devices.append((direction, name, index))
        return devices

    # --- one HTB tree ----------------------------------------------------------------

    def _sync_tree(self, device: _Device, direction: Direction, wants: QosWants) -> None:
        name, report, net = device.name, device.report, device.net
        self._keys.pop(name, None)  # until this sync has finished
        memo = self._memos.get(name)
        if memo is None or memo.direction != direction:
            memo = self._memos[name] = _Memo(direction)
        kind, root = device.root()
        if root == ROOT_HANDLE and kind != "htb":
            net.ipr.tc("del", index=device.index, handle=ROOT_HANDLE, parent=TC_H_ROOT)
            report.changes.append(f"delete {kind} root qdisc {ROOT_MAJOR:x}: on {name} (not HTB)")
            kind, root = None, None
        if root not in (None, 0, ROOT_HANDLE):
            report.errors.append(
                f"{direction} QoS not applied: {name} has a root qdisc {kind} {root >> 16:x}: that natgwd did not "
                "create (natgwd never replaces it)"
            )
            return
        if root != ROOT_HANDLE:
            net.ipr.tc("add", "htb", device.index, ROOT_HANDLE, parent=TC_H_ROOT, default=DEFAULT_MINOR)
            report.changes.append(f"add htb root qdisc {ROOT_MAJOR:x}: on {name}")
        writes = net.writes
        filter_messages = tc_dump(net.rt, RTM_GETTFILTER, device.index, ROOT_HANDLE)
        class_messages = tc_dump(net.rt, RTM_GETTCLASS, device.index)
        filter_signatures = list(map(signature, filter_messages))
        class_signatures = list(map(signature, class_messages))
        # The same messages (but for their counters) and the same wants: the same outcome
        # as the sync that verified them, nothing to change. A class's message names its
        # leaf qdisc's handle, so a replaced leaf is a new message too.
        wanted_here = wants.by_direction[direction]
        found = (class_signatures, filter_signatures)
        if memo.verified is not None and memo.plan is not None and memo.verified == (wanted_here, found):
            self._keys[name] = dict(memo.plan[2].keys)
            return
        memo.verified = None
        read = memo.read_filters(filter_signatures)
        classes = memo.read_classes(class_signatures)
        filters = [f.kernel for f in read]
        # Class ids from the filters that lead to a class: a stray filter cannot move one.
        previous = {
            f.key: f.kernel.spec.minor
            for f in read
            if f.kernel.spec.minor in classes and _placed(f.kernel) and f.key is not None
        }
        wanted, rates = memo.tree(wanted_here, previous)
        # Filters go before their classes do, and come after them: a filter never points
        # to a class that is not there.
        rules = [f for f in filters if not f.divisor and not f.link]
        kept = device.remove_filters(rules, wanted)
        device.sync_table(direction, filters)
        device.sync_classes(classes, wanted, rates)
        device.flush()
        self._leaves(device, wanted)
        device.add_filters(kept, wanted)
        device.flush()
        self._keys[name] = dict(wanted.keys)
        if net.writes == writes:
            memo.verified = (wanted_here, found)

    def _leaves(self, device: _Device, wanted: Tree) -> None:
        """fq_codel under every class where the kernel has it (as upstream); else HTB's
        default leaf, said once in the log (and by the leaf metric)."""
        if self.fq_codel is False:
            return
        with_leaf = {q.parent for q in device.net.qdiscs() if q.ifindex == device.index and q.kind == "fq_codel"}
        for minor in wanted.classes:
            if handle(minor) in with_leaf:
                continue
            try:
                device.net.ipr.tc("replace", "fq_codel", device.index, 0, parent=handle(minor))
            except NetlinkError as err:
                if err.code not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.fq_codel = False
                log.warning("fq_codel is not available in this kernel; HTB classes keep the default leaf qdisc")
                return
            self.fq_codel = True

    # --- ingress: the IFB device and the redirect ------------------------------------

    def _ensure_ifb(self, net: _Netlink, name: str, report: TcReport) -> int | None:
        link = next((link for link in net.links() if link.name == name), None)
        if link is not None:
            if not _is_our_ifb(link):
                report.errors.append(f"ingress QoS not applied: a link named {name} exists that natgwd did not create")
                return None
            if not link.up:
                net.ipr.link("set", index=link.ifindex, state="up")
                report.changes.append(f"set {name} up")
            return link.ifindex
        try:
            net.ipr.link("add", ifname=name, kind="ifb")
        except NetlinkError as err:  # no ifb module in this kernel, or not allowed to load it
            report.errors.append(f"ingress QoS not applied: cannot create the IFB device {name}: {err}")
            return None
        index = net.index(name)
        assert index is not None
        net.ipr.link("set", index=index, ifalias=IFB_ALIAS, txqlen=IFB_TXQUEUELEN, state="up")
        report.changes.append(f"add ifb {name}")
        return index

    # --- removal -----------------------------------------------------------------------

    def _sweep(
        self, net: _Netlink, roots_on: set[int], redirects_on: set[int], ifbs: set[int], report: TcReport
    ) -> None:
        """Remove natgwd's trees, redirects and IFBs everywhere but where they are wanted."""
        names = {link.ifindex: link.name for link in net.links()}
        for link in net.links():
            if _is_our_ifb(link) and link.ifindex not in ifbs:
                self._forget(link.name)
                net.ipr.link("del", index=link.ifindex)
                report.changes.append(f"delete ifb {link.name}")
        for qdisc in net.qdiscs():
            if qdisc.ifindex not in names:
                continue  # an IFB deleted just now
            if qdisc.parent == TC_H_ROOT and qdisc.handle == ROOT_HANDLE and qdisc.ifindex not in roots_on:
                self._forget(names[qdisc.ifindex])
                net.ipr.tc("del", index=qdisc.ifindex, handle=ROOT_HANDLE, parent=TC_H_ROOT)
                report.changes.append(f"delete root qdisc {ROOT_MAJOR:x}: on {names[qdisc.ifindex]}")
            elif qdisc.kind == "ingress" and qdisc.ifindex not in redirects_on:
                _Device(net, qdisc.ifindex, names[qdisc.ifindex], report).remove_redirect()

    def _forget(self, name: str) -> None:
        self._keys.pop(name, None)
        self._memos.pop(name, None)


@dataclass(frozen=True)
class _Device:
    """One device's traffic control during a sync or a read: the kernel's sockets, the
    device's index and name, and the report its changes and errors go to."""

    net: _Netlink
    index: int
    name: str
    report: TcReport
    # Requests not sent yet: each with the change it makes ("": one reported otherwise) and
    # the errors that mean it is made.
    pending: list[tuple[Request, str, tuple[int, ...]]] = field(default_factory=list)

    def queue(self, request: Request, change: str, done_if: tuple[int, ...] = ()) -> None:
        self.pending.append((request, change, done_if))

    def flush(self) -> None:
        """Send the queued requests, many to a send, their acknowledgements read together:
        the kernel takes them one by one, in order. The changes made go to the report; a
        refusal raises once all were sent."""
        if not self.pending:
            return
        pending = list(self.pending)
        self.pending.clear()
        self.net.written()
        refused = []
        for (_, change, done_if), refusal in zip(pending, self.net.rt.send_all([p[0] for p in pending]), strict=True):
            if (refusal is None or refusal.code in done_if) and change:
                self.report.changes.append(change)
            elif refusal is not None and refusal.code not in done_if:
                refused.append((change, refusal))
        if refused:
            change, refusal = refused[0]
            raise OSError(refusal.code, f"{change}: {refusal} ({len(refused)} of {len(pending)} refused)")

    def root(self) -> tuple[str | None, int | None]:
        """The kind and handle of the device's root qdisc (None, None: none listed)."""
        for qdisc in self.net.qdiscs():
            if qdisc.parent == TC_H_ROOT and qdisc.ifindex == self.index:
                return qdisc.kind, qdisc.handle
        return None, None

    def filters(self, parent: int) -> list[_KernelFilter]:
        """The u32 filters under `parent`, and the entry of natgwd's EIP hash table."""
        found = map(_read_filter, tc_dump(self.net.rt, RTM_GETTFILTER, self.index, parent))
        return [f for f in found if f is not None]

    def remove_filters(self, present: list[_KernelFilter], wanted: Tree) -> set[FilterSpec]:
        """Delete the filters the tree does not have (and second copies); the ones kept."""
        kept: set[FilterSpec] = set()
        for kernel in present:
            wanted_here = kernel.spec in wanted.filters and kernel.mirred_ifindex is None and _placed(kernel)
            if wanted_here and kernel.spec not in kept:
                kept.add(kernel.spec)
            else:
                self.del_filter(ROOT_HANDLE, kernel, f"delete filter {_describe(kernel.spec)} on {self.name}")
        return kept

    def add_filters(self, kept: set[FilterSpec], wanted: Tree) -> None:
        if len(kept) == len(wanted.filters):  # kept holds wanted filters only
            return
        for spec in sorted(wanted.filters - kept, key=lambda s: (s.prio, s.minor)):
            bucket = EIP_TABLE | (spec.value & HASH_MASK) << 12 if spec.prio == EIP_PRIO else None
            request = _u32_request(
                self.index,
                spec.prio,
                keys=((spec.value, spec.mask, spec.offset),),
                classid=handle(spec.minor),
                into=bucket,
            )
            self.queue(request, f"add filter {_describe(spec)} on {self.name}")

    def sync_table(self, direction: Direction, present: list[_KernelFilter]) -> None:
        """The EIP hash table and the one filter that links to it. Every tree has them, also
        without EIP limits: the kernel releases a hash table only after the filters that
        linked to it are gone for good (RCU), so deleting one now would fail as busy."""
        hash_key = (SOURCE_OFFSET if direction == "egress" else DESTINATION_OFFSET, HASH_MASK)
        tables = [f for f in present if f.divisor == HASH_BUCKETS]
        links = [f for f in present if f.link]
        good = [f for f in links if (f.link, f.spec.prio, f.hash_key) == (EIP_TABLE, EIP_PRIO, hash_key)]
        for kernel in links:
            if kernel is not (good[0] if good else None):
                self.del_filter(ROOT_HANDLE, kernel, f"delete a wrong link to the EIP hash table on {self.name}")
        if not tables:
            table = _u32_request(self.index, EIP_PRIO, handle_=EIP_TABLE, divisor=HASH_BUCKETS)
            self.queue(table, f"add the EIP hash table on {self.name}")
        if not good:
            link = _u32_request(self.index, EIP_PRIO, keys=((0, 0, 0),), link=EIP_TABLE, hash_key=hash_key)
            self.queue(link, f"add the link to the EIP hash table on {self.name}")

    def del_filter(self, parent: int, kernel: _KernelFilter, change: str) -> None:
        self.queue(_delete_filter(self.index, parent, kernel), change, done_if=(errno.ENOENT,))

    def sync_classes(self, present: dict[int, _Rates], wanted: Tree, rates: dict[int, _Rates]) -> None:
        """Queue what makes the classes `rates` (what the plan's read back as)."""
        for minor in sorted(present.keys() - wanted.classes.keys()):
            self.queue(_delete_class(self.index, minor), f"delete class {ROOT_MAJOR:x}:{minor:x} on {self.name}")
        if present == rates:
            return
        for minor, spec in sorted(wanted.classes.items()):
            found = present.get(minor)
            if found == rates[minor]:
                continue
            verb = "change" if found is not None else "add"
            self.queue(
                _class_request(self.index, minor, spec, add=found is None),
                f"{verb} class {ROOT_MAJOR:x}:{minor:x} rate {spec.rate_bytes * 8} bit/s on {self.name}",
            )

    def ensure_redirect(self, ifb: int) -> bool:
        has_ingress = any(q.kind == "ingress" and q.ifindex == self.index for q in self.net.qdiscs())
        if not has_ingress:
            self.net.ipr.tc("add", "ingress", self.index, INGRESS_HANDLE)
            self.report.changes.append(f"add ingress qdisc on {self.name}")
        filters = self.filters(INGRESS_HANDLE)
        foreign = [f for f in filters if f.spec.prio != MIRRED_PRIO]
        if foreign:
            self.report.errors.append(
                f"ingress QoS not applied: the ingress qdisc of {self.name} has {len(foreign)} filters "
                "natgwd did not add"
            )
            return False
        redirect = FilterSpec(MIRRED_PRIO, 0, 0, 0, -1)
        ours = [f for f in filters if f.spec == redirect and f.mirred_ifindex == ifb]
        for kernel in filters:
            if kernel is not (ours[0] if ours else None):
                change = f"delete stray filter at priority {MIRRED_PRIO} on {self.name} ingress"
                self.del_filter(INGRESS_HANDLE, kernel, change)
        self.flush()
        if not ours:
            self.net.ipr.tc(
                "add-filter",
                "u32",
                self.index,
                parent=INGRESS_HANDLE,
                prio=MIRRED_PRIO,
                protocol=ETH_P_IP,
                target=0,
                keys=["0x0/0x0+0"],
                action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb},
            )
            self.report.changes.append(f"add redirect of {self.name} ingress to ifb {ifb}")
        return True

    def remove_redirect(self) -> None:
        filters = self.filters(INGRESS_HANDLE)
        ours = [f for f in filters if f.spec.prio == MIRRED_PRIO]
        if not ours:
            return  # not natgwd's
        for kernel in ours:
            self.del_filter(INGRESS_HANDLE, kernel, "")
        self.flush()
        self.report.changes.append(f"delete redirect of {self.name} ingress")
        if len(ours) == len(filters):
            self.net.ipr.tc("del", "ingress", self.index, INGRESS_HANDLE)
            self.report.changes.append(f"delete ingress qdisc on {self.name}")


def _read_filter(message: bytes) -> _KernelFilter | None:
    """A u32 filter, or the entry of natgwd's EIP hash table (None: anything else)."""
    msg = decode(message)
    options = msg.options
    if msg.kind != "u32" or options is None:
        return None
    prio, filter_handle = msg.info >> 16, msg.handle
    if not filter_handle & 0xFFF:  # a hash table: only natgwd's own is of interest
        if filter_handle != EIP_TABLE:
            return None
        divisor = _u32(options.get(TCA_U32_DIVISOR)) or 1
        return _KernelFilter(FilterSpec(prio, -1, 0, 0, -1), filter_handle, None, divisor=divisor)
    selector = _selector(options.get(TCA_U32_SEL))
    classid = _u32(options.get(TCA_U32_CLASSID))
    value, mask, offset = selector.keys[0] if len(selector.keys) == 1 else (0, 0, -1)  # -1: not one key
    # -1: a filter without a class, or to a class of another tree, which no wanted filter equals
    minor = classid & 0xFFFF if classid >> 16 == ROOT_MAJOR else -1
    spec = FilterSpec(prio, offset, value, mask, minor)
    hash_key = (selector.hash_offset, selector.hash_mask)
    link = _u32(options.get(TCA_U32_LINK))
    return _KernelFilter(spec, filter_handle, _mirred_target(options.get(TCA_U32_ACT)), link, hash_key)


def _read_class(message: bytes) -> tuple[int, _Rates] | None:
    """The minor and HTB parameters of a class of natgwd's tree (None: another class)."""
    msg = decode(message)
    # A class at the top of the tree lists the root (not the qdisc) as its parent.
    if msg.handle >> 16 != ROOT_MAJOR or msg.parent not in (TC_H_ROOT, ROOT_HANDLE):
        return None
    parms = _htb_parms(msg.options)
    if parms is None:
        raise TcDumpError(errno.EPROTO, f"class {msg.handle:x} of natgwd's tree without HTB parameters")
    return msg.handle & 0xFFFF, (parms["rate"], parms["ceil"], parms["buffer"], parms["cbuffer"])


def _placed(kernel: _KernelFilter) -> bool:
    """Whether a filter sits where natgwd puts its spec: an EIP's in its hash bucket,
    any other outside the hash table."""
    if kernel.spec.prio == EIP_PRIO:
        return kernel.table == EIP_TABLE and kernel.bucket == kernel.spec.value & HASH_MASK
    return kernel.table != EIP_TABLE


def _is_our_ifb(link: Link) -> bool:
    return link.kind == "ifb" and link.alias == IFB_ALIAS


def _describe(spec: FilterSpec) -> str:
    return f"prio {spec.prio} {spec.value:08x}/{spec.mask:08x}@{spec.offset} -> {ROOT_MAJOR:x}:{spec.minor:x}"
