"""Read natgwd's counting sets straight from nf_tables over netlink, for scrapes.

libnftables renders 36,000 counting elements as text in about 250 ms at 10,000 rules;
the kernel hands the same elements over netlink in about 40 ms. Decoding them attribute
by attribute in Python would cost more than it saves, so each set's elements are matched
by one compiled pattern over the whole dump: our sets' elements have a fixed layout (key,
counter, optional flags and comment). The matches must tile every message's element list
exactly, so an element of any other shape fails the read loudly instead of being skipped.
A message of plain elements only (a key and a counter: rule_traffic's, two thirds of the
elements) is not matched at all: one comparison checks its layout, and keys and counts are
read as 32-bit words by strides.
"""

from __future__ import annotations

import errno
import operator
import os
import re
import socket
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Literal, NamedTuple

from natgwd.planning.counters import CountedElement
from natgwd.planning.layout import DIRECTIONS, traffic_key

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETSETELEM = 13
NFPROTO_INET = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
_HEADER = struct.Struct("=IHHII")
_ATTRIBUTE = struct.Struct("=HH")
_RECEIVE_BYTES = 1 << 20
_BIG: Literal["big"] = "big"  # counters are in network order


class SetDumpError(Exception):
    pass


@dataclass(frozen=True)
class KeyLayout:
    """How a set's key is laid out in the kernel, and how to write keys as the plan does
    (all of a message's at once: in C loops, no Python frame per element). `columns`,
    where the key is made of 32-bit registers: the same texts from a message of elements
    of one size (the element list's bytes, the same as native 32-bit words, the words per
    element; each key starts at word 3)."""

    size: int
    texts: Callable[[list[bytes]], Iterable[str]]
    columns: Callable[[bytes | bytearray, array[int], int], Iterable[str]] | None = None


def _marks(keys: list[bytes]) -> Iterable[str]:
    return map(str, map(int.from_bytes, keys, repeat(sys.byteorder)))


def _directions_and_marks(keys: list[bytes]) -> Iterable[str]:
    # Concatenated keys give every part a 32-bit register: ct_dir's byte, then padding.
    directions = map(_DIRECTION_PREFIXES.__getitem__, map(operator.getitem, keys, repeat(0)))
    marks = map(int.from_bytes, map(operator.getitem, keys, repeat(slice(4, 8))), repeat(sys.byteorder))
    return map(operator.add, directions, map(str, marks))


def _mark_columns(listed: bytes | bytearray, words: array[int], step: int) -> Iterable[str]:
    return map(str, words[3::step])


def _direction_and_mark_columns(listed: bytes | bytearray, words: array[int], step: int) -> Iterable[str]:
    # ct_dir is the first byte of its register (whatever the byte order), the mark the next register.
    directions = map(_DIRECTION_PREFIXES.__getitem__, listed[12 :: step * 4])
    return map(operator.add, directions, map(str, words[4::step]))


def _interfaces(keys: list[bytes]) -> Iterable[str]:
    return ('"' + key.split(b"\0", 1)[0].decode() + '"' for key in keys)


# traffic_key(direction, mark) is the direction's prefix and the mark: made once, not per element.
_DIRECTION_PREFIXES = tuple(traffic_key(direction, "") for direction in DIRECTIONS)


def _marks_and_addresses(keys: list[bytes]) -> Iterable[str]:
    # port_block_attempts: the mark's register, then the address in network order.
    marks = map(str, map(int.from_bytes, map(operator.getitem, keys, repeat(slice(0, 4))), repeat(sys.byteorder)))
    addresses = (socket.inet_ntoa(key[4:8]) for key in keys)
    return map(" . ".join, zip(marks, addresses, strict=True))


_LAYOUTS = {
    "mark . ipv4_addr": KeyLayout(8, _marks_and_addresses),
    "mark": KeyLayout(4, _marks, _mark_columns),
    "ct_dir . mark": KeyLayout(8, _directions_and_marks, _direction_and_mark_columns),
    "ifname": KeyLayout(16, _interfaces),
}


def key_layout(key_type: str) -> KeyLayout:
    """The layout of an nftables key type (as a set declares it: "ct_dir . mark")."""
    try:
        return _LAYOUTS[key_type]
    except KeyError:
        raise SetDumpError(f"no netlink layout for key type {key_type!r}") from None


def _element_pattern(key_size: int) -> bytes:
    # Nested attributes may carry the NLA_F_NESTED flag (0x8000) in their type.
    return (
        rb"..\x01[\x00\x80]"  # the list element
        + re.escape(struct.pack("=H", 8 + key_size))
        + rb"\x01[\x00\x80]"
        + re.escape(struct.pack("=HH", 4 + key_size, 1))
        + rb"(.{%d})" % key_size
        # The counter: a single expression (7) or a list of them (11) with one item.
        + rb"(?:..\x07[\x00\x80]|..\x0b[\x00\x80]..\x01[\x00\x80])\x0c\x00\x01\x00counter\x00..\x02[\x00\x80]"
        + rb"(?:\x04\x00\x03\x00)?\x0c\x00\x01\x00(.{8})"  # bytes (a pad attribute where u64 needs aligning)
        + rb"(?:\x04\x00\x03\x00)?\x0c\x00\x02\x00(.{8})"  # packets
        + rb"(?:\x08\x00\x03\x00.{4})?"  # flags
        + rb"(?:..\x06\x00\x00.([^\x00]*)\x00\x00{0,3})?"  # user data: the comment
    )


class Patterns(NamedTuple):
    element: re.Pattern[bytes]  # one element, whole and its fields as groups


def patterns(key_size: int) -> Patterns:
    return Patterns(re.compile(rb"(%s)" % _element_pattern(key_size), re.DOTALL))


_PATTERNS: dict[int, Patterns] = {}


class SetDumper:
    """Dumps of one table's counting sets; one netlink socket per read, so concurrent
    scrapes need no lock and a read never sees another's replies."""

    def __init__(self, family: int, table: str) -> None:
        self._family = family
        self._table = table

    def read(self, name: str, layout: KeyLayout) -> list[CountedElement] | None:
        """The set's elements as (key, packets, bytes, comment); None if it does not exist."""
        pattern = _PATTERNS.get(layout.size) or _PATTERNS.setdefault(layout.size, patterns(layout.size))
        elements: list[CountedElement] = []
        try:
            for payload, start in self._dump(name):
                elements.extend(_decode(payload, start, pattern, layout))
        except FileNotFoundError:
            return None
        return elements

    def _dump(self, name: str) -> Iterator[tuple[bytearray, int]]:
        """(buffer, offset of a message's element list's contents in it) for every reply
        message, each decoded before the next read overwrites the buffer: a dump is never
        held whole (a set's is megabytes)."""
        request = struct.pack("=BBH", self._family, 0, 0) + _string(NFTA_SET_ELEM_LIST_TABLE, self._table)
        request += _string(NFTA_SET_ELEM_LIST_SET, name)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
        buffer = bytearray(_RECEIVE_BYTES)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
            sock.bind((0, 0))
            flags = NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK
            sock.send(_HEADER.pack(_HEADER.size + len(request), kind, flags, 1, 0) + request)
            while True:
                received = sock.recv_into(buffer)
                offset = 0
                while offset < received:
                    length, kind_seen, _, _, _ = _HEADER.unpack_from(buffer, offset)
                    if kind_seen == NLMSG_DONE:
                        return
                    if kind_seen == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", buffer, offset + _HEADER.size)
                        if code == 0:
                            return
                        if -code == errno.ENOENT:
                            raise FileNotFoundError(name)
                        raise SetDumpError(f"listing set {name}: {os.strerror(-code)}")
                    found = _find_attribute(
                        buffer, offset + _HEADER.size + 4, NFTA_SET_ELEM_LIST_ELEMENTS, offset + length
                    )
                    if found is not None:
                        yield buffer, found
                    offset += (length + 3) & ~3


def _decode(message: bytes | bytearray, start: int, pattern: Patterns, layout: KeyLayout) -> list[CountedElement]:
    length = _ATTRIBUTE.unpack_from(message, start - 4)[0] - 4
    end = start + length
    if layout.columns is not None and (found := _decode_plain(message[start:end], layout)) is not None:
        return found
    # Elements, and nothing else, must tile the list exactly: the matches (which never
    # overlap) add up to the whole list. (52,000 elements with comments at 50,000 rules:
    # found, checked and converted in C loops, no Python frame per element.)
    found = pattern.element.findall(message, start, end)
    if not found:
        if length:
            raise SetDumpError(f"an element of unexpected shape in a set dump: {message[start : start + 96].hex()}")
        return []
    whole, keys, octets, packets, comments = zip(*found, strict=True)
    if sum(map(len, whole)) != length:
        raise SetDumpError(f"an element of unexpected shape in a set dump: {_unmatched(message, start, whole)}")
    return list(
        zip(
            layout.texts(list(keys)),
            map(str, map(int.from_bytes, packets, repeat(_BIG))),
            map(str, map(int.from_bytes, octets, repeat(_BIG))),
            map(bytes.decode, comments),
            strict=True,
        )
    )


def _unmatched(message: bytes | bytearray, start: int, matched: Iterable[bytes]) -> str:
    """The first bytes, in hex, that no element matched (for the error)."""
    offset = start
    for element in matched:
        if message[offset : offset + len(element)] != element:
            break
        offset += len(element)
    return message[offset : offset + 96].hex()


def _plain_element(key_size: int) -> bytes:
    """An element with a key and a counter and nothing else (no comment, flags or pad),
    its key and counts zero: rule_traffic's elements, as nf_tables lists them."""
    counts = _nested(1, b"\0" * 8) + _nested(2, b"\0" * 8)
    expression = _nested(7, _nested(1, b"counter\0") + _nested(2, counts))
    return _nested(1, _nested(1, _nested(1, b"\0" * key_size)) + expression)


def _nested(kind: int, payload: bytes) -> bytes:
    return _ATTRIBUTE.pack(4 + len(payload), kind) + payload


_PLAIN: dict[int, bytes] = {}


def _decode_plain(listed: bytes | bytearray, layout: KeyLayout) -> list[CountedElement] | None:
    """The elements of a list made of plain elements only (_plain_element), None if it
    is not: checked by one comparison with the key and counts blanked, and read as 32-bit
    words by strides (156,000 elements at 50,000 rules: no match object per element)."""
    assert layout.columns is not None
    plain = _PLAIN.get(layout.size) or _PLAIN.setdefault(layout.size, _plain_element(layout.size))
    size = len(plain)
    count, rest = divmod(len(listed), size)
    if rest or not count:
        return None
    blanked = bytearray(listed)
    zeros = bytes(count)
    octets_at, packets_at = size - 20, size - 8
    for offset in (*range(12, 12 + layout.size), *range(octets_at, octets_at + 8), *range(packets_at, packets_at + 8)):
        blanked[offset::size] = zeros
    if blanked != plain * count:
        return None
    words = array("I", listed)
    step = size // 4
    counts = array("I", listed)
    if sys.byteorder == "little":
        counts.byteswap()  # counters are in network order
    return list(
        zip(
            layout.columns(listed, words, step),
            _counts(counts, packets_at // 4, step),
            _counts(counts, octets_at // 4, step),
            repeat(""),
            strict=False,  # repeat
        )
    )


def _counts(words: array[int], at: int, step: int) -> Iterable[str]:
    """The 64-bit counts whose high word is words[at] in every element, as text."""
    high, low = words[at::step], words[at + 1 :: step]
    if not any(high):
        return map(str, low)
    return map(str, map(operator.or_, map(operator.lshift, high, repeat(32)), low))


def _find_attribute(message: bytes | bytearray, offset: int, wanted: int, end: int) -> int | None:
    """Where the contents of the top-level attribute `wanted` (of those from `offset` to
    `end`) start."""
    while offset + 4 <= end:
        length, kind = _ATTRIBUTE.unpack_from(message, offset)
        if length < 4:
            break
        if kind & 0x3FFF == wanted:
            return offset + 4
        offset += (length + 3) & ~3
    return None


def _string(kind: int, value: str) -> bytes:
    data = value.encode() + b"\0"
    return _ATTRIBUTE.pack(4 + len(data), kind) + data + b"\0" * (-len(data) % 4)
