"""Conntrack entries and events straight from ctnetlink: a raw NETLINK_NETFILTER socket
subscribed to the NEW and DESTROY groups, and a one-off dump of the table.

pyroute2 decodes a message into a tree of objects: 360 us for a NEW event here, so
10,000 new connections per second (20,000 events) would need seven cores. Only the
handful of attributes natgwd reads are decoded here, with struct, straight from the
buffer: 4.8 us per event (tests/unit/test_ctevents.py has a captured one). The gauges
alone read fewer still: EventSocket.receive_counted gives them eight raw fields per event.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from collections.abc import Callable, Iterator
from operator import itemgetter
from socket import inet_ntoa
from typing import Any, Literal, NamedTuple

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
_HEAD = struct.Struct("=IHH")  # a netlink header's length, type and flags
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
# batch of them in C loops and decodes each distinct value once): the ct mark, the
# protocol, the original source and port, the reply's source, destination and their
# ports, each as its bytes in network order (an address 4 or 16 bytes, b"" if absent).
Raw = tuple[bytes, int, bytes, bytes, bytes, bytes, bytes, bytes]
NO_MARK = bytes(4)


def _packed(address: str) -> bytes:
    if not address:
        return b""
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def raw(event: CtEvent) -> Raw:
    """The raw form of an event decoded the general way (IPv6, ICMP, a layout not learnt)."""
    orig, reply = event.orig, event.reply
    return (
        event.mark.to_bytes(4, "big"),
        orig.proto,
        _packed(orig.src),
        orig.sport.to_bytes(2, "big"),
        _packed(reply.src),
        reply.sport.to_bytes(2, "big"),
        _packed(reply.dst),
        reply.dport.to_bytes(2, "big"),
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
_RAW_ORIG = ((12, "B"), (4, "4s"), (15, "2s"))  # proto, src, sport
_RAW_REPLY = ((4, "4s"), (15, "2s"), (7, "4s"), (18, "2s"))  # src, sport, dst, dport
_MAX_LAYOUTS = 256
_UNLEARNT: Any = object()


class _RawLayout(NamedTuple):
    """How the gauges' fields are read from a message of a layout (from its nfgenmsg on):
    its attribute headers checked by one masked comparison, the fields by one unpack."""

    mask: int  # the message as a little-endian number: 1 bits where its headers are
    headers: int  # the headers' bits, as learnt
    fields: struct.Struct | None  # the fields of a Raw, in the message's order; None without a mark
    order: Callable[[tuple[Any, ...]], Raw] | None  # ... put in a Raw's order


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
                    index + (1 if attribute == CTA_TUPLE_ORIG else 1 + len(_RAW_ORIG)),
                    code,
                )
        elif attribute in _FIELDS:
            if length != 8:
                return None
            formats.append("4s")
            fields[attribute] = slot
            slot += 1
            if attribute == CTA_MARK:
                raw_fields[at + 4] = (0, "4s")
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
    if 0 not in in_order:  # a Raw's first field, the mark
        return _RawLayout(number, int.from_bytes(message, "little") & number, None, None)
    return _RawLayout(
        number,
        int.from_bytes(message, "little") & number,
        struct.Struct("".join(formats)),
        itemgetter(*(in_order.index(index) for index in range(len(fields)))),
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


RECV_BYTES = 1 << 18


class EventSocket:
    """NEW and DESTROY events of this network namespace's conntrack table."""

    _buffer: bytearray | None = None  # made at the first receive

    def __init__(self, buffer_bytes: int = 64 << 20) -> None:
        self.sock = _socket(GROUP_NEW | GROUP_DESTROY, buffer_bytes)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, block: bool = True) -> list[CtEvent]:
        """The events of one datagram; [] when none is waiting and `block` is False."""
        if self._buffer is None:
            self._buffer = bytearray(RECV_BYTES)
        try:
            # Into a buffer kept for the socket's life: recv() would allocate RECV_BYTES per
            # datagram, and the kernel sends one datagram per event. That allocation, and
            # giving it back, cost several times the decoding (38 against 7 us for a send
            # and a receive, measured here).
            size = self.sock.recv_into(self._buffer, RECV_BYTES, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise EventsLostError("the socket's buffer was full") from err
            raise
        with memoryview(self._buffer) as data:
            batch = parse(data[:size])
        if batch.malformed:
            # The datagram's other events are dropped too: the recount supersedes them.
            raise EventsLostError(f"{batch.malformed} malformed message(s)")
        return batch.events

    def receive_counted(self, datagrams: int) -> Counted:
        """The events with a mark of up to `datagrams` datagrams queued now, in the raw form,
        without waiting. A datagram of one message of a learnt layout (nearly every event)
        has its headers checked by one masked comparison and the few fields read by one
        unpack, in this one loop. Anything else goes the general way."""
        if self._buffer is None:
            self._buffer = bytearray(RECV_BYTES)
        buffer, receive, layouts, from_bytes = self._buffer, self.sock.recv_into, _LAYOUTS, int.from_bytes
        news: list[Raw] = []
        destroys: list[Raw] = []
        for _ in range(datagrams):
            try:
                size = receive(buffer, RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return Counted(news, destroys, False)
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    raise EventsLostError("the socket's buffer was full") from err
                raise
            length, msg_type, flags = _HEAD.unpack_from(buffer)
            if (
                length == size
                and not flags & NLM_F_MULTI
                and (layout := layouts.get((msg_type, length - _NLMSGHDR.size))) is not None
            ):
                fast = layout.raw
                if from_bytes(buffer[_NLMSGHDR.size : size], "little") & fast.mask == fast.headers:
                    if (
                        fast.order is not None  # else no mark: not natgwd's
                        and fast.fields is not None
                        and (found := fast.order(fast.fields.unpack_from(buffer, _NLMSGHDR.size)))[0] != NO_MARK
                    ):
                        (news if msg_type & 0xFF == IPCTNL_MSG_CT_NEW else destroys).append(found)
                    continue
            with memoryview(buffer) as data:
                batch = parse(data[:size])
            if batch.malformed:
                raise EventsLostError(f"{batch.malformed} malformed message(s)")
            for event in batch.events:
                if event.mark and event.kind != "entry":
                    (news if event.kind == "new" else destroys).append(raw(event))
        return Counted(news, destroys, True)

    def close(self) -> None:
        self.sock.close()


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
