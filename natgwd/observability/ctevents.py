"""Conntrack entries and events straight from ctnetlink: a raw NETLINK_NETFILTER socket
subscribed to the NEW and DESTROY groups, and a one-off dump of the table.

pyroute2 decodes a message into a tree of objects: 360 us for a NEW event here, so
10,000 new connections per second (20,000 events) would need seven cores. Only the
handful of attributes natgwd reads are decoded here, with struct, straight from the
buffer: 4.8 us per event (tests/unit/test_ctevents.py has a captured one). The gauges
alone read fewer still: EventSocket.receive_counted gives them eight raw fields per event.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import struct
from collections.abc import Callable, Iterator
from itertools import compress, repeat
from operator import add, and_, eq, itemgetter, not_
from socket import inet_ntoa
from typing import Any, Literal, NamedTuple, cast

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
# Multicast groups are bits (group - 1): NFNLGRP_CONNTRACK_NEW = 1, _DESTROY = 3.
GROUP_NEW, GROUP_DESTROY = 1 << 0, 1 << 2

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_MARK = 1, 2, 3, 8
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID, CTA_TIMESTAMP = 9, 10, 12, 20
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID = 1, 2, 3, 4
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_U8, _BE16, _BE32, _BE64 = struct.Struct("B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_ERROR_CODE = struct.Struct("=i")

Kind = Literal["new", "destroy", "entry"]  # "entry": from a dump, not an event


class CtTuple(NamedTuple):
    """One direction of a connection. For ICMP the echo id is the source port, 0 the other."""

    proto: int
    src: str
    sport: int
    dst: str
    dport: int


class Traffic(NamedTuple):
    packets: int
    octets: int


class CtEvent(NamedTuple):  # a NamedTuple: built several times faster than a frozen dataclass
    kind: Kind
    id: int
    mark: int
    orig: CtTuple
    reply: CtTuple
    status: int = 0
    counters_orig: Traffic | None = None  # present with net.netfilter.nf_conntrack_acct = 1
    counters_reply: Traffic | None = None
    start_ns: int | None = None  # present with net.netfilter.nf_conntrack_timestamp = 1
    stop_ns: int | None = None

    @property
    def source_translated(self) -> bool:
        return self.reply.dst != self.orig.src or self.reply.dport != self.orig.sport

    @property
    def destination_translated(self) -> bool:
        return self.reply.src != self.orig.dst or self.reply.sport != self.orig.dport


class EventsLostError(Exception):
    """Events were lost: the kernel dropped some because the socket's buffer was full
    (ENOBUFS), or a message could not be decoded. The counts must be rebuilt from a dump."""


class CtNetlinkError(OSError):
    pass


class MalformedMessageError(ValueError):
    """A message's attributes do not fit it (truncated, too short for their type)."""


def _attrs(data: bytes | memoryview, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) for the attributes in data[start:end]."""
    found: dict[int, tuple[int, int]] = {}
    while start + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, start)
        if length < 4 or start + length > end:
            raise MalformedMessageError(f"attribute {kind & NLA_TYPE_MASK} of {length} bytes does not fit")
        found[kind & NLA_TYPE_MASK] = (start + 4, start + length)
        start += (length + 3) & ~3
    return found


def _number(kind: struct.Struct, data: bytes | memoryview, span: tuple[int, int]) -> int:
    # A payload shorter than its type would be read on into the next attribute.
    if span[1] - span[0] < kind.size:
        raise MalformedMessageError(f"a {span[1] - span[0]}-byte payload for a {kind.size}-byte number")
    value: int = kind.unpack_from(data, span[0])[0]
    return value


def _address(data: bytes | memoryview, span: tuple[int, int] | None) -> str:
    if span is None:
        return ""
    raw = bytes(data[span[0] : span[1]])
    if len(raw) not in (4, 16):
        raise MalformedMessageError(f"a {len(raw)}-byte address")
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


# The layout the kernel gives an IPv4 TCP or UDP tuple (ctnetlink_dump_tuples): nested
# attribute headers (length, type) around source, destination, protocol and two ports.
# Decoded in one unpack when every header is where it should be; anything else (ICMP,
# IPv6) goes the general way.
_V4_TUPLE = struct.Struct("=HHHH4sHH4sHHHHB3xHH2s2xHH2s2x")
_V4_TUPLE_CODES = re.findall(r"\d*[A-Za-z]", _V4_TUPLE.format[1:])
_V4_TUPLE_OFFSETS = [  # of each value in the payload
    struct.calcsize("=" + "".join(_V4_TUPLE_CODES[:index]))
    for index, code in enumerate(_V4_TUPLE_CODES)
    if not code.endswith("x")
]
_V4_TUPLE_HEADERS = (20, 0x8001, 8, 1, 8, 2, 28, 0x8002, 5, 1, 6, 2, 6, 3)


def _v4_tuple(data: bytes | memoryview, start: int) -> CtTuple | None:
    """The tuple whose nest's payload starts at `start`, when it has the IPv4 TCP/UDP layout."""
    (ip_len, ip_type, sl, st, src, dl, dt, dst, pl, pt, nl, nt, proto, spl, spt, sport, dpl, dpt, dport) = (
        _V4_TUPLE.unpack_from(data, start)
    )
    if (ip_len, ip_type, sl, st, dl, dt, pl, pt, nl, nt, spl, spt, dpl, dpt) != _V4_TUPLE_HEADERS:
        return None
    return CtTuple(
        proto, socket.inet_ntoa(src), int.from_bytes(sport, "big"), socket.inet_ntoa(dst), int.from_bytes(dport, "big")
    )


def _tuple(data: bytes | memoryview, span: tuple[int, int] | None) -> CtTuple:
    if span is None:
        return CtTuple(0, "", 0, "", 0)
    if span[1] - span[0] == _V4_TUPLE.size and (fast := _v4_tuple(data, span[0])) is not None:
        return fast
    top = _attrs(data, *span)
    ip = _attrs(data, *top[CTA_TUPLE_IP]) if CTA_TUPLE_IP in top else {}
    proto = _attrs(data, *top[CTA_TUPLE_PROTO]) if CTA_TUPLE_PROTO in top else {}
    number = _number(_U8, data, proto[CTA_PROTO_NUM]) if CTA_PROTO_NUM in proto else 0

    def port(kind: int) -> int:
        return _number(_BE16, data, proto[kind]) if kind in proto else 0

    return CtTuple(
        number,
        _address(data, ip.get(CTA_IP_V4_SRC) or ip.get(CTA_IP_V6_SRC)),
        port(CTA_PROTO_SRC_PORT) or port(CTA_PROTO_ICMP_ID),
        _address(data, ip.get(CTA_IP_V4_DST) or ip.get(CTA_IP_V6_DST)),
        port(CTA_PROTO_DST_PORT),
    )


def _traffic(data: bytes | memoryview, span: tuple[int, int] | None) -> Traffic | None:
    if span is None:
        return None
    inner = _attrs(data, *span)
    if CTA_COUNTERS_PACKETS not in inner or CTA_COUNTERS_BYTES not in inner:
        return None
    return Traffic(_number(_BE64, data, inner[CTA_COUNTERS_PACKETS]), _number(_BE64, data, inner[CTA_COUNTERS_BYTES]))


def _timestamps(data: bytes | memoryview, span: tuple[int, int] | None) -> tuple[int | None, int | None]:
    if span is None:
        return None, None
    inner = _attrs(data, *span)
    start = _number(_BE64, data, inner[CTA_TIMESTAMP_START]) if CTA_TIMESTAMP_START in inner else None
    stop = _number(_BE64, data, inner[CTA_TIMESTAMP_STOP]) if CTA_TIMESTAMP_STOP in inner else None
    return start, stop


def _be32(data: bytes | memoryview, span: tuple[int, int] | None) -> int:
    return _number(_BE32, data, span) if span is not None else 0


# An event as the open-connection gauges read it (natgwd.observability.ctopen counts a
# batch of them in C loops and decodes each distinct value once): the original source,
# the protocol, the original source port, the reply's source, destination and their
# ports, and the ct mark, each as its bytes in network order (an address 4 or 16 bytes,
# b"" if absent). In the order the kernel lays them out, so that one unpack gives a Raw.
Raw = tuple[bytes, int, bytes, bytes, bytes, bytes, bytes, bytes]
RAW_MARK = 7
NO_MARK = bytes(4)


def _packed(address: str) -> bytes:
    if not address:
        return b""
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def raw(event: CtEvent) -> Raw:
    """The raw form of an event decoded the general way (IPv6, ICMP, a layout not learnt)."""
    orig, reply = event.orig, event.reply
    return (
        _packed(orig.src),
        orig.proto,
        orig.sport.to_bytes(2, "big"),
        _packed(reply.src),
        _packed(reply.dst),
        reply.sport.to_bytes(2, "big"),
        reply.dport.to_bytes(2, "big"),
        event.mark.to_bytes(4, "big"),
    )


def address_text(packed: bytes) -> str:
    """An address of a Raw as CtTuple has it."""
    if not packed:
        return ""
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


class Counted(NamedTuple):
    news: list[Raw]  # NEW events with a mark
    destroys: list[Raw]  # DESTROY events with a mark
    more: bool  # datagrams may still be queued (the limit was reached)


class Batch(NamedTuple):  # one per datagram, at every event: a NamedTuple is made faster
    events: list[CtEvent]
    done: bool  # a dump's NLMSG_DONE was among the messages
    malformed: int = 0  # messages that could not be decoded (their events are lost)


def parse(data: bytes | memoryview) -> Batch:
    """The conntrack messages in one netlink datagram. An NLMSG_ERROR with a non-zero code
    raises CtNetlinkError; messages of other subsystems are skipped; a message that cannot
    be decoded is counted as malformed, and one whose length does not fit the datagram ends
    it (nothing after it can be found)."""
    events: list[CtEvent] = []
    done = False
    malformed = 0
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            malformed += 1
            break
        body, end = offset + _NLMSGHDR.size, offset + length
        offset += (length + 3) & ~3
        if msg_type == NLMSG_DONE:
            done = True
            continue
        try:
            event = _message(data, msg_type, flags, body, end)
        except (MalformedMessageError, struct.error):
            malformed += 1
            continue
        if event is not None:
            events.append(event)
    return Batch(events, done, malformed)


def _message(data: bytes | memoryview, msg_type: int, flags: int, body: int, end: int) -> CtEvent | None:
    if msg_type == NLMSG_ERROR:
        code = -_number(_ERROR_CODE, data, (body, end))
        if code:
            raise CtNetlinkError(code, f"ctnetlink: {errno.errorcode.get(code, code)}")
        return None
    if msg_type >> 8 != NFNL_SUBSYS_CTNETLINK:
        return None
    command = msg_type & 0xFF
    if command == IPCTNL_MSG_CT_DELETE:
        kind: Kind = "destroy"
    elif command == IPCTNL_MSG_CT_NEW:
        kind = "entry" if flags & NLM_F_MULTI else "new"
    else:
        return None
    shape = (msg_type, end - body)
    layout = _LAYOUTS.get(shape, _UNLEARNT)
    if layout is _UNLEARNT:
        layout = _learn(shape, data, body, end)
    if (
        layout is not None
        and (values := layout.shape.unpack_from(data, body))
        and layout.headers(values) == layout.expected
    ):
        return layout.event(kind, values, data, body)
    attrs = _attrs(data, body + 4, end)  # after the 4-byte nfgenmsg
    start_ns, stop_ns = _timestamps(data, attrs.get(CTA_TIMESTAMP))
    return CtEvent(
        kind,
        _be32(data, attrs.get(CTA_ID)),
        _be32(data, attrs.get(CTA_MARK)),
        _tuple(data, attrs.get(CTA_TUPLE_ORIG)),
        _tuple(data, attrs.get(CTA_TUPLE_REPLY)),
        _be32(data, attrs.get(CTA_STATUS)),
        _traffic(data, attrs.get(CTA_COUNTERS_ORIG)),
        _traffic(data, attrs.get(CTA_COUNTERS_REPLY)),
        start_ns,
        stop_ns,
    )


# Events come in a few layouts (which attributes, how long, in which order: the protocol,
# the kind of event, the sysctls), each always the same. A message of a layout seen before
# (same type and length, every attribute header the same) is read with one unpack: a
# third of the time of walking its attributes. Anything else goes the general way.
_FIELDS = (CTA_ID, CTA_MARK, CTA_STATUS)  # 32-bit numbers, read when present
_SPANS = (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_TIMESTAMP)  # nests, decoded the general way
_V4_TUPLE_HEADER_SLOTS = (0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 13, 14, 16, 17)
_V4_TUPLE_VALUES = (12, 4, 15, 7, 18)  # proto, src, sport, dst, dport
_V4_TUPLE_LENGTH = len(_V4_TUPLE_HEADERS) + 5
# A Raw's fields from the tuples: value slots of _V4_TUPLE, struct codes.
_RAW_ORIG = ((4, "4s"), (12, "B"), (15, "2s"))  # src, proto, sport
_RAW_REPLY = ((4, "4s"), (7, "4s"), (15, "2s"), (18, "2s"))  # src, dst, sport, dport
_MAX_LAYOUTS = 256
_UNLEARNT: Any = object()


class _RawLayout(NamedTuple):
    """How the gauges' fields are read from a message of a layout (from its nfgenmsg on):
    its attribute headers checked by one masked comparison, the fields by one unpack."""

    mask: int  # the message as a little-endian number: 1 bits where its headers are
    headers: int  # the headers' bits, as learnt
    fields: struct.Struct | None  # the fields of a Raw, in the message's order; None without a mark
    order: Callable[[tuple[Any, ...]], Raw] | None  # ... put in a Raw's order; None: they are


class _Layout(NamedTuple):
    shape: struct.Struct  # the message from its nfgenmsg on: every attribute header, the fields read, pads
    headers: Callable[[tuple[Any, ...]], tuple[int, ...]]  # the header words of an unpacked message
    expected: tuple[int, ...]
    fields: tuple[int | None, ...]  # where id, mark and status are among the values
    tuples: tuple[int, int]  # where the original and the reply tuples start
    spans: tuple[tuple[int, int] | None, ...]  # counters (original, reply) and timestamps, from the nfgenmsg
    raw: _RawLayout

    def event(self, kind: Kind, values: tuple[Any, ...], data: bytes | memoryview, body: int) -> CtEvent:
        at_id, at_mark, at_status = self.fields
        at_orig, at_reply = self.tuples
        orig = values[at_orig : at_orig + _V4_TUPLE_LENGTH]
        reply = values[at_reply : at_reply + _V4_TUPLE_LENGTH]
        counters_orig, counters_reply, stamps = self.spans
        start_ns, stop_ns = _timestamps(data, stamps and (body + stamps[0], body + stamps[1]))
        # tuple.__new__: a NamedTuple's own __new__ is a Python function, a frame per call.
        return _new(
            CtEvent,
            (
                kind,
                0 if at_id is None else int.from_bytes(values[at_id], "big"),
                0 if at_mark is None else int.from_bytes(values[at_mark], "big"),
                _new(
                    CtTuple,
                    (
                        orig[12],
                        inet_ntoa(orig[4]),
                        int.from_bytes(orig[15], "big"),
                        inet_ntoa(orig[7]),
                        int.from_bytes(orig[18], "big"),
                    ),
                ),
                _new(
                    CtTuple,
                    (
                        reply[12],
                        inet_ntoa(reply[4]),
                        int.from_bytes(reply[15], "big"),
                        inet_ntoa(reply[7]),
                        int.from_bytes(reply[18], "big"),
                    ),
                ),
                0 if at_status is None else int.from_bytes(values[at_status], "big"),
                counters_orig and _traffic(data, (body + counters_orig[0], body + counters_orig[1])),
                counters_reply and _traffic(data, (body + counters_reply[0], body + counters_reply[1])),
                start_ns,
                stop_ns,
            ),
        )


_new: Callable[..., Any] = tuple.__new__


def _learn(shape: tuple[int, int], data: bytes | memoryview, body: int, end: int) -> _Layout | None:
    """The layout of a message, kept for those of its shape; None (kept too) when it has
    anything the one unpack does not read as the general way would."""
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[shape] = None
    formats, slot = ["=4x"], 0
    header_slots: list[int] = []
    expected: list[int] = []
    fields: dict[int, int] = {}
    tuples: dict[int, int] = {}
    spans: dict[int, tuple[int, int]] = {}
    mask = bytearray(end - body)
    raw_fields: dict[int, tuple[int, str]] = {}  # offset -> (index in a Raw, struct code)
    position = body + 4
    while position + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, position)
        attribute = kind & NLA_TYPE_MASK
        if length < 4 or position + length > end or attribute in fields.keys() | tuples.keys() | spans.keys():
            return None
        at = position - body
        mask[at : at + 4] = b"\xff" * 4
        formats.append("HH")
        header_slots += (slot, slot + 1)
        expected += (length, kind)
        slot += 2
        if attribute in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            if length - 4 != _V4_TUPLE.size or _v4_tuple(data, position + 4) is None:
                return None
            formats.append(_V4_TUPLE.format.lstrip("="))
            values = _V4_TUPLE.unpack_from(data, position + 4)
            header_slots += (slot + i for i in _V4_TUPLE_HEADER_SLOTS)
            expected += (values[i] for i in _V4_TUPLE_HEADER_SLOTS)
            tuples[attribute] = slot
            slot += _V4_TUPLE_LENGTH
            for header in _V4_TUPLE_HEADER_SLOTS:
                mask[at + 4 + _V4_TUPLE_OFFSETS[header] : at + 6 + _V4_TUPLE_OFFSETS[header]] = b"\xff\xff"
            for index, (value, code) in enumerate(_RAW_ORIG if attribute == CTA_TUPLE_ORIG else _RAW_REPLY):
                raw_fields[at + 4 + _V4_TUPLE_OFFSETS[value]] = (
                    index + (0 if attribute == CTA_TUPLE_ORIG else len(_RAW_ORIG)),
                    code,
                )
        elif attribute in _FIELDS:
            if length != 8:
                return None
            formats.append("4s")
            fields[attribute] = slot
            slot += 1
            if attribute == CTA_MARK:
                raw_fields[at + 4] = (RAW_MARK, "4s")
        else:
            if attribute in _SPANS:
                spans[attribute] = (position + 4 - body, position + length - body)
            formats.append(f"{length - 4}x")
        padded = (length + 3) & ~3
        if position + padded > end:
            return None
        formats.append(f"{padded - length}x")
        position += padded
    if position != end or len(tuples) != 2:
        return None
    layout = _Layout(
        struct.Struct("".join(formats)),
        itemgetter(*header_slots),
        tuple(expected),
        tuple(fields.get(attribute) for attribute in _FIELDS),
        (tuples[CTA_TUPLE_ORIG], tuples[CTA_TUPLE_REPLY]),
        tuple(spans.get(attribute) for attribute in _SPANS),
        _raw_layout(bytes(data[body:end]), bytes(mask), raw_fields),
    )
    _LAYOUTS[shape] = layout
    return layout


def _raw_layout(message: bytes, mask: bytes, fields: dict[int, tuple[int, str]]) -> _RawLayout:
    formats, at = ["="], 0
    for offset in sorted(fields):
        formats += (f"{offset - at}x", fields[offset][1])
        at = offset + struct.calcsize("=" + fields[offset][1])
    in_order = [fields[offset][0] for offset in sorted(fields)]
    number = int.from_bytes(mask, "little")
    if RAW_MARK not in in_order:
        return _RawLayout(number, int.from_bytes(message, "little") & number, None, None)
    return _RawLayout(
        number,
        int.from_bytes(message, "little") & number,
        struct.Struct("".join(formats)),
        None if in_order == sorted(in_order) else itemgetter(*(in_order.index(index) for index in range(len(fields)))),
    )


_LAYOUTS: dict[tuple[int, int], _Layout | None] = {}  # (message type, length) -> its layout


def _socket(groups: int, buffer_bytes: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        # FORCE (CAP_NET_ADMIN, which natgwd has) goes past net.core.rmem_max.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    sock.bind((0, groups))
    return sock


RECV_BYTES = 1 << 18  # a dump's datagram
SLOTS = 256  # datagrams taken by one recvmmsg
SLOT_BYTES = 4096  # per datagram: an event is one message of a few hundred bytes
MSG_WAITFORONE = 0x10000
_SLOT_HEAD = struct.Struct(f"=IHH{SLOT_BYTES - 8}x")  # each slot's netlink length, type and flags
_SLOT_STARTS = range(0, SLOTS * SLOT_BYTES, SLOT_BYTES)
_FIRST = itemgetter(0)
_RAW_MARK = itemgetter(RAW_MARK)
_FROM_BYTES = cast(Callable[[bytearray, str], int], int.from_bytes)  # mapped with repeat("little")


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("length", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_IoVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("header", _MsgHdr), ("length", ctypes.c_uint))


_recvmmsg = ctypes.CDLL(None, use_errno=True).recvmmsg
_recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
_recvmmsg.restype = ctypes.c_int


class _Datagrams:
    """Many datagrams per system call (recvmmsg), each into a slot of its own in one buffer:
    the kernel sends each event as a datagram of its own, and a recv per datagram was half
    of natgwd's CPU per event."""

    def __init__(self, sock: socket.socket) -> None:
        self.fd = sock.fileno()
        self.buffer = bytearray(SLOTS * SLOT_BYTES)
        self.view = memoryview(self.buffer)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        self._iovecs = (_IoVec * SLOTS)(*(_IoVec(base + start, SLOT_BYTES) for start in _SLOT_STARTS))
        self._headers = (_MMsgHdr * SLOTS)()
        for header, iovec in zip(self._headers, self._iovecs, strict=True):
            header.header.iov, header.header.iovlen = ctypes.pointer(iovec), 1
        words = memoryview(self._headers).cast("B").cast("I")
        # Each datagram's length, as the kernel wrote it: every SIZE/4th word of the headers.
        self.lengths = words[_MMsgHdr.length.offset // 4 :: ctypes.sizeof(_MMsgHdr) // 4]
        self._address = ctypes.addressof(self._headers)

    def receive(self, limit: int, block: bool) -> int:
        """How many datagrams (up to `limit`) were received into the first slots; 0 if none
        was waiting. ENOBUFS (events dropped by the kernel) is a loss."""
        received = _recvmmsg(self.fd, self._address, limit, MSG_WAITFORONE if block else socket.MSG_DONTWAIT, None)
        if received >= 0:
            return int(received)
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        if code == errno.ENOBUFS:
            raise EventsLostError("the socket's buffer was full")
        raise OSError(code, os.strerror(code))


class EventSocket:
    """NEW and DESTROY events of this network namespace's conntrack table."""

    _datagrams: _Datagrams | None = None  # made at the first receive

    def __init__(self, buffer_bytes: int = 64 << 20) -> None:
        self.sock = _socket(GROUP_NEW | GROUP_DESTROY, buffer_bytes)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _slots(self) -> _Datagrams:
        if self._datagrams is None:
            self._datagrams = _Datagrams(self.sock)
        return self._datagrams

    def receive(self, block: bool = True) -> list[CtEvent]:
        """The events of the datagrams queued now (up to SLOTS of them); [] when none is
        waiting and `block` is False."""
        slots = self._slots()
        events: list[CtEvent] = []
        malformed = 0
        for start, size in zip(_SLOT_STARTS, slots.lengths[: slots.receive(SLOTS, block)].tolist(), strict=False):
            batch = parse(slots.view[start : start + size])
            events += batch.events
            malformed += batch.malformed
        if malformed:
            # The datagrams' other events are dropped too: the recount supersedes them.
            raise EventsLostError(f"{malformed} malformed message(s)")
        return events

    def receive_counted(self, datagrams: int) -> Counted:
        """The events with a mark of up to `datagrams` datagrams queued now, in the raw form,
        without waiting."""
        slots = self._slots()
        news: list[Raw] = []
        destroys: list[Raw] = []
        while datagrams > 0:
            received = slots.receive(min(datagrams, SLOTS), block=False)
            if not received:
                return Counted(news, destroys, False)
            _count_slots(slots, received, news, destroys)
            datagrams -= received
        return Counted(news, destroys, True)

    def close(self) -> None:
        self.sock.close()


def _count_slots(slots: _Datagrams, received: int, news: list[Raw], destroys: list[Raw]) -> None:
    """The events with a mark of the first `received` slots, in the raw form, onto `news` and
    `destroys`. The slots are taken a layout at a time, in C loops (map, compress): the
    datagrams holding one message each of one learnt layout (nearly every event) have their
    attribute headers checked by one masked comparison each and the gauges' fields read by
    one unpack each. Anything else goes the general way."""
    buffer, view = slots.buffer, slots.view
    heads = list(_SLOT_HEAD.iter_unpack(view[: received * SLOT_BYTES]))  # (length, type, flags)
    general: list[int] = []  # starts of the slots taken the general way
    if list(map(_FIRST, heads)) != slots.lengths[:received].tolist():
        general += _SLOT_STARTS[:received]  # a datagram of several messages, or one cut short
        heads = []
    for head in set(heads):
        starts = list(compress(_SLOT_STARTS, map(head.__eq__, heads)))
        length, msg_type, flags = head
        layout = None if flags & NLM_F_MULTI else _layout(msg_type, view[starts[0] : starts[0] + length])
        if layout is None:
            general += starts
            continue
        fast = layout.raw
        bodies = list(map(add, starts, repeat(_NLMSGHDR.size)))
        checked = list(
            map(
                eq,
                map(
                    and_,
                    map(
                        _FROM_BYTES,
                        map(buffer.__getitem__, map(slice, bodies, map(add, starts, repeat(length)))),
                        repeat("little"),
                    ),
                    repeat(fast.mask),
                ),
                repeat(fast.headers),
            )
        )
        if not all(checked):
            general += compress(starts, map(not_, checked))
            bodies = list(compress(bodies, checked))
        if fast.fields is None:  # no mark: not natgwd's
            continue
        found = list(map(fast.fields.unpack_from, repeat(buffer), bodies))
        if fast.order is not None:
            found = list(map(fast.order, found))
        (news if msg_type & 0xFF == IPCTNL_MSG_CT_NEW else destroys).extend(
            compress(found, map(NO_MARK.__ne__, map(_RAW_MARK, found)))
        )
    for start in general:
        batch = parse(view[start : start + slots.lengths[start // SLOT_BYTES]])
        if batch.malformed:
            raise EventsLostError(f"{batch.malformed} malformed message(s)")
        for event in batch.events:
            if event.mark and event.kind != "entry":
                (news if event.kind == "new" else destroys).append(raw(event))


def _layout(msg_type: int, message: memoryview) -> _Layout | None:
    """The learnt layout of messages of this type and length, learnt from `message` if
    none is known yet; None for a message of another kind or a layout not read in one unpack."""
    layout = _LAYOUTS.get((msg_type, len(message) - _NLMSGHDR.size), _UNLEARNT)
    if layout is _UNLEARNT:
        parse(message)  # learns it, if it is a conntrack event
        layout = _LAYOUTS.get((msg_type, len(message) - _NLMSGHDR.size))
    return cast(_Layout | None, layout)


def dump() -> Iterator[CtEvent]:
    """Every entry of the table, IPv4 and IPv6, as "entry" events; a generator, so that a
    million entries are counted without being held at once."""
    # One dump per family, each named: a connection missing from the dump would have its
    # DESTROY subtracted later and its rule's gauge go negative.
    for family in (socket.AF_INET, socket.AF_INET6):
        yield from _dump(family)


def _dump(family: int) -> Iterator[CtEvent]:
    sock = _socket(0, 4 << 20)
    try:
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + 4, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        sock.send(header + struct.pack("=BBH", family, 0, 0))
        while True:
            batch = parse(sock.recv(RECV_BYTES))
            if batch.malformed:
                raise EventsLostError(f"{batch.malformed} malformed message(s) in a dump")
            yield from batch.events
            if batch.done:
                return
    finally:
        sock.close()
