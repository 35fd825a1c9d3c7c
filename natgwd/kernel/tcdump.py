"""A device's traffic control (links, qdiscs, classes, filters) straight from rtnetlink
dumps, decoded only as far as natgwd.kernel.tc reads them.

pyroute2 decodes every attribute of every message into objects, through its event loop:
at 1,000 EIPs limited both ways (4,000 classes and filters) a resync with nothing to
change spent 2.6 s there on this 2-core machine. Here a message is its tcmsg header and
the payloads of its attributes, by type, sliced from the datagram; and a resync that
finds a tree as it left it need not decode it at all: a message's signature (the message
without the counters that traffic moves) equals the one it had then.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

from natgwd.kernel.rtbatch import RtNetlink

RTM_GETLINK, RTM_GETQDISC, RTM_GETTCLASS, RTM_GETTFILTER = 18, 38, 42, 46
TCA_KIND, TCA_OPTIONS, TCA_STATS2 = 1, 2, 7
# linux/pkt_cls.h: a u32 filter's hit counters (CONFIG_CLS_U32_PERF) and their padding
TCA_U32_PCNT, TCA_U32_PAD = 9, 12
IFLA_IFNAME, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_INFO_KIND = 3, 18, 20, 1
IFF_UP = 0x1
NLA_TYPE_MASK = 0x3FFF

_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NLATTR = struct.Struct("=HH")
_U32_COUNTERS = frozenset({TCA_U32_PCNT, TCA_U32_PAD})


class TcDumpError(OSError):
    pass


class TcMessage(NamedTuple):
    handle: int
    parent: int
    info: int
    kind: str
    options: dict[int, bytes] | None  # TCA_OPTIONS' attributes by type (None: no options)
    stats: dict[int, bytes] | None  # TCA_STATS2's


class Link(NamedTuple):
    ifindex: int
    name: str
    up: bool
    kind: str  # IFLA_INFO_KIND ("" without one)
    alias: str


class Qdisc(NamedTuple):
    ifindex: int
    handle: int
    parent: int
    kind: str


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Type -> payload of the attributes in `data` from `offset` (the first of a type,
    as pyroute2's get_attr gives it)."""
    found: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < 4 or offset + length > len(data):
            raise TcDumpError(errno.EPROTO, f"attribute {kind & NLA_TYPE_MASK} of {length} bytes does not fit")
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return found


def tc_dump(rt: RtNetlink, message_type: int, index: int, parent: int = 0) -> list[bytes]:
    """The bodies of the classes (RTM_GETTCLASS) or filters (RTM_GETTFILTER, under
    `parent`) of device `index`, undecoded."""
    return list(rt.dump(message_type, _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)))


def dump(rt: RtNetlink, message_type: int, index: int, parent: int = 0) -> list[TcMessage]:
    """tc_dump, decoded."""
    return [decode(body) for body in tc_dump(rt, message_type, index, parent)]


def decode(body: bytes) -> TcMessage:
    _, _, handle, parent, info = _TCMSG.unpack_from(body)
    top = attributes(body, _TCMSG.size)
    options, stats = top.get(TCA_OPTIONS), top.get(TCA_STATS2)
    return TcMessage(
        handle,
        parent,
        info,
        top.get(TCA_KIND, b"").split(b"\0", 1)[0].decode(),
        attributes(options) if options is not None else None,
        attributes(stats) if stats is not None else None,
    )


def signature(body: bytes) -> bytes:
    """A tc message as far as decode() is read for a sync: its header, and its attributes
    up to the first TCA_KIND and TCA_OPTIONS (decode keeps the first of a type; the
    statistics come after them), a u32 filter's options without their hit counters. Two
    messages with one signature configure the same thing."""
    offset, end, kind_found = _TCMSG.size, len(body), None
    while offset + 4 <= end:
        length, kind = _NLATTR.unpack_from(body, offset)
        if length < 4 or offset + length > end:
            raise TcDumpError(errno.EPROTO, f"attribute {kind & NLA_TYPE_MASK} of {length} bytes does not fit")
        kind &= NLA_TYPE_MASK
        if kind == TCA_KIND and kind_found is None:
            kind_found = body[offset + 4 : offset + length]
        elif kind == TCA_OPTIONS and kind_found is not None:
            if kind_found == b"u32\0":
                return body[:offset] + _without_counters(body, offset, offset + length)
            return body[: offset + length]
        offset += (length + 3) & ~3
    return body


def _without_counters(body: bytes, start: int, end: int) -> bytes:
    """A u32 filter's TCA_OPTIONS without its hit counters (an attribute as decode reads it)."""
    kept = []
    offset = start + 4
    while offset + 4 <= end:
        length, kind = _NLATTR.unpack_from(body, offset)
        if length < 4 or offset + length > end:
            raise TcDumpError(errno.EPROTO, f"u32 option {kind & NLA_TYPE_MASK} of {length} bytes does not fit")
        if kind & NLA_TYPE_MASK not in _U32_COUNTERS:
            kept.append(body[offset : min(offset + ((length + 3) & ~3), end)])
        offset += (length + 3) & ~3
    options = b"".join(kept)
    return _NLATTR.pack(4 + len(options), _NLATTR.unpack_from(body, start)[1]) + options


def links(rt: RtNetlink) -> list[Link]:
    """Every link of the namespace."""
    found = []
    for body in rt.dump(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        _, _, index, flags, _ = _IFINFOMSG.unpack_from(body)
        top = attributes(body, _IFINFOMSG.size)
        info = top.get(IFLA_LINKINFO)
        kind = attributes(info).get(IFLA_INFO_KIND, b"") if info is not None else b""
        found.append(
            Link(index, _text(top.get(IFLA_IFNAME)), bool(flags & IFF_UP), _text(kind), _text(top.get(IFLA_IFALIAS)))
        )
    return found


def qdiscs(rt: RtNetlink) -> list[Qdisc]:
    """Every qdisc the kernel lists in the namespace (not the default leaves of classes)."""
    found = []
    for body in rt.dump(RTM_GETQDISC, _TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        _, index, handle, parent, _ = _TCMSG.unpack_from(body)
        found.append(Qdisc(index, handle, parent, _text(attributes(body, _TCMSG.size).get(TCA_KIND))))
    return found


def _text(data: bytes | None) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace") if data else ""
