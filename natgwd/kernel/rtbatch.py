"""rtnetlink at the kernel's pace: dumps the kernel filters, and requests sent many to a send.

pyroute2 parses every message of a dump into objects and awaits each acknowledgement on
its own event loop: about a millisecond per address, half a second for 1,000 EIPs where
`ip -batch` takes 20 ms. Its nlm_request_batch sends many requests at once but raises at
the first refusal (or, with noraise, drops every refusal), so it cannot say which address
failed and why. Here each acknowledgement is matched to its request by sequence number,
and a dump asks the kernel to filter (strict checking) instead of sending every address
of the namespace to be thrown away.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface, ip_network
from types import TracebackType

from natgwd.state.model import IPAddress, IPInterface, IPNetwork

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLM_F_ACK_TLVS = 0x200  # in an acknowledgement: extended-ack attributes follow
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGERR_ATTR_MSG = 1
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_GETROUTE = 26
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS, IFA_PROTO = 1, 2, 8, 11
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12
# Requests per send: their acknowledgements (an skb of about a kilobyte each, counted
# against the receive buffer) must fit in the default 208 KiB, or the kernel drops them.
CHUNK = 64
TIMEOUT_SECONDS = 10.0
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port


@dataclass(frozen=True)
class Address:
    """One address as a dump shows it."""

    interface: IPInterface  # IFA_ADDRESS (else IFA_LOCAL) with the prefix length, as `ip addr` shows it
    local: IPAddress  # IFA_LOCAL (else IFA_ADDRESS): what a socket binds
    index: int
    flags: int
    scope: int
    proto: int  # IFA_PROTO, 0 when unset


@dataclass(frozen=True)
class Route:
    """One route as a dump shows it."""

    family: int
    table: int
    dst: IPNetwork
    protocol: int
    type: int
    priority: int  # RTA_PRIORITY, 0 when unset
    oif: int | None
    gateway: str | None


@dataclass(frozen=True)
class Request:
    """One netlink request: its type, flags (NLM_F_REQUEST and NLM_F_ACK are added) and body."""

    kind: int
    flags: int
    body: bytes


@dataclass(frozen=True)
class Refusal:
    """A request the kernel refused: its errno and the kernel's own words, if it gave any."""

    code: int
    message: str = ""

    def __str__(self) -> str:
        return f"({self.code}, {self.message or os.strerror(self.code)!r})"


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (type, length, payload, padded to 4 bytes)."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def new_address(index: int, address: IPInterface, proto: int, flags: int = 0) -> Request:
    """RTM_NEWADDR as `ip addr add` sends it (refused with EEXIST when it is there)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    raw = address.ip.packed
    attributes = attribute(IFA_ADDRESS, raw) + attribute(IFA_PROTO, bytes([proto]))
    if family == socket.AF_INET:
        attributes += attribute(IFA_LOCAL, raw)
    body = struct.pack("=BBBBI", family, address.network.prefixlen, flags, 0, index) + attributes
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)


def delete_address(index: int, address: IPInterface) -> Request:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    raw = address.ip.packed
    attributes = attribute(IFA_ADDRESS, raw) + (attribute(IFA_LOCAL, raw) if family == socket.AF_INET else b"")
    body = struct.pack("=BBBBI", family, address.network.prefixlen, 0, 0, index) + attributes
    return Request(RTM_DELADDR, 0, body)


class RtNetlink:
    """A NETLINK_ROUTE socket with strict checking (dumps filtered by the kernel) and
    extended acknowledgements (the kernel's reason for a refusal)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)  # else the kernel ignores the filters
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # refusals do not echo the request
            self.sock.settimeout(TIMEOUT_SECONDS)
        except OSError:
            self.sock.close()
            raise
        self._sequence = 0

    def __enter__(self) -> RtNetlink:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> int:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF or 1
        return self._sequence

    # --- dumps ----------------------------------------------------------------------

    def addresses(self, index: int = 0) -> list[Address]:
        """The addresses of interface `index` (0: of every interface), both families."""
        request = struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, index)
        found = [_address(body) for body in self.dump(RTM_GETADDR, request)]
        # A kernel without strict checking sends every interface's.
        return [a for a in found if a is not None and (not index or a.index == index)]

    def routes(self, family: int, table: int = 0, protocol: int = 0) -> list[Route]:
        """The routes of `family` in `table` (0: every table) added by `protocol` (0: any)."""
        request = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, protocol, 0, 0, 0)
        if table:
            request += attribute(RTA_TABLE, struct.pack("=I", table))
        try:
            found = [_route(body) for body in self.dump(RTM_GETROUTE, request)]
        except OSError as err:
            if err.errno == errno.ENOENT:  # no such table (yet)
                return []
            raise
        return [r for r in found if (not table or r.table == table) and (not protocol or r.protocol == protocol)]

    def dump(self, kind: int, request: bytes) -> Iterator[bytes]:
        """The bodies of the messages a dump request of type `kind` answers with."""
        sequence = self._next()
        self.sock.send(_HEADER.pack(16 + len(request), kind, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + request)
        while True:
            data = self.sock.recv(1 << 16)
            for mtype, _flags, seq, body in _messages(data):
                if seq != sequence:
                    continue  # a late acknowledgement of an earlier request
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    # A dump ends with DONE, carrying an errno if it failed on the way; a
                    # request refused at once gets an ERROR.
                    refusal = _refusal(body, _flags, echoed=mtype == NLMSG_ERROR) if len(body) >= 4 else None
                    if refusal is not None:
                        raise OSError(refusal.code, refusal.message or os.strerror(refusal.code))
                    return
                yield body

    # --- requests -------------------------------------------------------------------

    def send_all(self, requests: Sequence[Request]) -> list[Refusal | None]:
        """Send every request, CHUNK to a send, and read their acknowledgements together;
        for each request in order, None if the kernel took it, else why not. The kernel
        handles each request of a send on its own: one refused does not stop the others."""
        outcomes: list[Refusal | None] = []
        for start in range(0, len(requests), CHUNK):
            outcomes += self._send_chunk(requests[start : start + CHUNK])
        return outcomes

    def _send_chunk(self, requests: Sequence[Request]) -> list[Refusal | None]:
        waiting: dict[int, int] = {}  # sequence -> position
        data = bytearray()
        for position, request in enumerate(requests):
            sequence = self._next()
            waiting[sequence] = position
            flags = NLM_F_REQUEST | NLM_F_ACK | request.flags
            data += _HEADER.pack(16 + len(request.body), request.kind, flags, sequence, 0) + request.body
        outcomes: list[Refusal | None] = [None] * len(requests)
        self.sock.send(data)
        while waiting:
            try:
                received = self.sock.recv(1 << 16)
            except OSError as err:  # ENOBUFS: acknowledgements were dropped; a timeout
                code = err.errno or errno.ETIMEDOUT
                for position in waiting.values():
                    outcomes[position] = Refusal(code, f"no acknowledgement: {os.strerror(code)}")
                break
            for mtype, flags, sequence, body in _messages(received):
                answered = waiting.pop(sequence, None) if mtype == NLMSG_ERROR else None
                if answered is not None:
                    outcomes[answered] = _refusal(body, flags)
        return outcomes


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence, body) of each message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, mtype, flags, sequence, _port = _HEADER.unpack_from(data, offset)
        if length < 16:
            return
        yield mtype, flags, sequence, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def _refusal(body: bytes, flags: int, echoed: bool = True) -> Refusal | None:
    """The errno of an NLMSG_ERROR or NLMSG_DONE (0: none) and the kernel's message.
    `echoed`: the request's header follows the errno (an ERROR; NETLINK_CAP_ACK: its
    body does not)."""
    code = -struct.unpack_from("=i", body)[0]
    if not code:
        return None
    message = ""
    if flags & NLM_F_ACK_TLVS:
        raw = _attributes(body, 4 + 16 if echoed else 4).get(NLMSGERR_ATTR_MSG, b"")
        message = raw.rstrip(b"\0").decode(errors="replace")
    return Refusal(code, message)


def _address(body: bytes) -> Address | None:
    family, prefixlen, flags, scope, index = struct.unpack_from("=BBBBI", body)
    attributes = _attributes(body, 8)
    if IFA_FLAGS in attributes:
        flags = struct.unpack("=I", attributes[IFA_FLAGS])[0]
    shown = attributes.get(IFA_ADDRESS) or attributes.get(IFA_LOCAL)
    local = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    if shown is None or local is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    proto = attributes.get(IFA_PROTO, b"\0")[0]
    return Address(
        interface=ip_interface(f"{socket.inet_ntop(family, shown)}/{prefixlen}"),
        local=ip_address(socket.inet_ntop(family, local)),
        index=index,
        flags=flags,
        scope=scope,
        proto=proto,
    )


def _route(body: bytes) -> Route:
    family, dst_len, _src_len, _tos, table, protocol, _scope, rtype, _flags = struct.unpack_from("=BBBBBBBBI", body)
    attributes = _attributes(body, 12)
    if RTA_TABLE in attributes:
        table = struct.unpack("=I", attributes[RTA_TABLE])[0]
    unspecified = bytes(16 if family == socket.AF_INET6 else 4)
    dst = socket.inet_ntop(family, attributes.get(RTA_DST, unspecified))
    gateway = attributes.get(RTA_GATEWAY)
    return Route(
        family=family,
        table=table,
        dst=ip_network(f"{dst}/{dst_len}"),
        protocol=protocol,
        type=rtype,
        priority=struct.unpack("=I", attributes[RTA_PRIORITY])[0] if RTA_PRIORITY in attributes else 0,
        oif=struct.unpack("=I", attributes[RTA_OIF])[0] if RTA_OIF in attributes else None,
        gateway=socket.inet_ntop(family, gateway) if gateway else None,
    )
