"""A device's traffic control classes and filters straight from rtnetlink dumps, decoded
only as far as natgwd.kernel.tc reads them.

pyroute2 decodes every attribute of every message into objects, through its event loop:
at 1,000 EIPs limited both ways (4,000 classes and filters) a resync with nothing to
change spent 2.6 s there on this 2-core machine. Here a message is its tcmsg header and
the payloads of its attributes, by type, sliced from the datagram.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

RTM_GETTCLASS, RTM_GETTFILTER = 42, 46
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCA_KIND, TCA_OPTIONS, TCA_STATS2 = 1, 2, 7
NLA_TYPE_MASK = 0x3FFF

_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_NLATTR = struct.Struct("=HH")
_RECEIVE_BYTES = 1 << 16


class TcDumpError(OSError):
    pass


class TcMessage(NamedTuple):
    handle: int
    parent: int
    info: int
    kind: str
    options: dict[int, bytes] | None  # TCA_OPTIONS' attributes by type (None: no options)
    stats: dict[int, bytes] | None  # TCA_STATS2's


def attributes(data: bytes) -> dict[int, bytes]:
    """Type -> payload of the attributes in `data` (the first of a type, as pyroute2's
    get_attr gives it)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < 4 or offset + length > len(data):
            raise TcDumpError(errno.EPROTO, f"attribute {kind & NLA_TYPE_MASK} of {length} bytes does not fit")
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return found


def dump(message_type: int, index: int, parent: int = 0) -> list[TcMessage]:
    """The classes (RTM_GETTCLASS) or filters (RTM_GETTFILTER, under `parent`) of device
    `index`, in the current network namespace."""
    request = _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), message_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(header + request)
        found: list[TcMessage] = []
        while True:
            data = sock.recv(_RECEIVE_BYTES)
            for kind, body in _messages(data):
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code:
                        raise TcDumpError(-code, f"tc dump: {os.strerror(-code)}")
                    return found
                if kind == message_type - 2:  # the dump answers with RTM_NEW*
                    found.append(_message(body))


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise TcDumpError(errno.EPROTO, f"a netlink message of {length} bytes does not fit its datagram")
        yield kind, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def _message(body: bytes) -> TcMessage:
    _, _, handle, parent, info = _TCMSG.unpack_from(body)
    top = attributes(body[_TCMSG.size :])
    options, stats = top.get(TCA_OPTIONS), top.get(TCA_STATS2)
    return TcMessage(
        handle,
        parent,
        info,
        top.get(TCA_KIND, b"").split(b"\0", 1)[0].decode(),
        attributes(options) if options is not None else None,
        attributes(stats) if stats is not None else None,
    )
