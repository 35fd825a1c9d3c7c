"""natgwd.kernel.setdump: counting-set elements decoded from netlink messages as nf_tables
builds them (single counter expression or a list of expressions, with and without the
64-bit pad attribute, flags and comments), then canonicalised by
natgwd.planning.counters.counted_elements; any other shape is an error, never a missing sample."""

from __future__ import annotations

import struct
import sys

import pytest

from natgwd.kernel.setdump import SetDumpError, _decode, _decode_plain, key_layout, patterns
from natgwd.planning.counters import counted_elements
from natgwd.planning.layout import RULE_CONNECTIONS, RULE_TRAFFIC
from natgwd.planning.plan import set_key_type
from natgwd.planning.table import Counter, Element


def attribute(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def counter(octets: int, packets: int, pad: bool) -> bytes:
    padding = attribute(3, b"") if pad else b""
    data = padding + attribute(1, struct.pack(">Q", octets)) + padding + attribute(2, struct.pack(">Q", packets))
    return attribute(1, b"counter\0") + attribute(2, data)


def element(
    key: bytes, octets: int, packets: int, comment: str | None = None, *, listed: bool = False, pad: bool = False
) -> bytes:
    expression = counter(octets, packets, pad)
    expression = attribute(11, attribute(1, expression)) if listed else attribute(7, expression)
    body = attribute(1, attribute(1, key)) + expression
    if listed:
        body += attribute(3, struct.pack(">I", 0))  # flags
    if comment is not None:
        text = comment.encode() + b"\0"
        body += attribute(6, bytes((0, len(text))) + text)
    return attribute(1, body)


def message(*elements: bytes) -> tuple[bytes, int]:
    """A NEWSETELEM message's payload, and where its element list's contents start."""
    head = struct.pack("=BBH", 1, 0, 0) + attribute(1, b"natgwd\0") + attribute(2, b"rule_traffic\0")
    return head + attribute(3, b"".join(elements)), len(head) + 4


def mark(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)


def decode(key_type: str, *elements: bytes) -> list[tuple[str, str, str, str]]:
    layout = key_layout(key_type)
    payload, start = message(*elements)
    return _decode(payload, start, patterns(layout.size), layout)


def test_marks_with_comments_and_both_expression_forms() -> None:
    listing = decode(
        set_key_type(RULE_CONNECTIONS),
        element(mark(7), 300, 5, "dnat/dnat01/10.115.55.200"),
        element(mark(12), 0, 0, "snat/s/10.115.55.200", listed=True, pad=True),
        element(mark(65536), 1, 2**64 - 1, "fip/a,b {c}/10.115.55.201", pad=True),
    )
    assert listing == [
        ("7", "5", "300", "dnat/dnat01/10.115.55.200"),
        ("12", "0", "0", "snat/s/10.115.55.200"),
        ("65536", "18446744073709551615", "1", "fip/a,b {c}/10.115.55.201"),
    ]
    elements = counted_elements(listing)
    assert elements["7"] == Element(comment="dnat/dnat01/10.115.55.200")
    assert elements["65536"].counter == Counter(2**64 - 1, 1)


def test_direction_and_mark_concatenation() -> None:
    original, reply = b"\0\0\0\0" + mark(7), b"\x01\0\0\0" + mark(7)
    listing = decode(set_key_type(RULE_TRAFFIC), element(original, 100, 3), element(reply, 80, 2))
    assert listing == [("original . 7", "3", "100", ""), ("reply . 7", "2", "80", "")]
    assert counted_elements(listing)["reply . 7"] == Element()


def test_plain_elements_are_read_by_strides_with_counts_past_32_bits() -> None:
    """rule_traffic's elements (a key and a counter, nothing else) are read as words by
    strides: the same listing as the pattern's, counts of 64 bits in network order."""
    keys = [bytes((direction, 0, 0, 0)) + mark(value) for value in (7, 2**32 - 1) for direction in (0, 1)]
    counts = [(0, 0), (2**32, 1), (2**64 - 1, 2**32 + 5), (80, 2)]
    elements = [element(key, octets, packets) for key, (octets, packets) in zip(keys, counts, strict=True)]
    expected = [
        ("original . 7", "0", "0", ""),
        ("reply . 7", "1", "4294967296", ""),
        ("original . 4294967295", "4294967301", "18446744073709551615", ""),
        ("reply . 4294967295", "2", "80", ""),
    ]
    layout = key_layout(set_key_type(RULE_TRAFFIC))
    payload, start = message(*elements)
    assert _decode_plain(payload[start:], layout) == expected
    assert decode(set_key_type(RULE_TRAFFIC), *elements) == expected
    assert decode("mark", element(mark(9), 2**40, 3)) == [("9", "3", str(2**40), "")]


def test_elements_of_other_layouts_among_plain_ones_are_read_by_the_pattern() -> None:
    """A message that is not all plain elements (here one with flags, one with the pad
    attribute, one with the nested flag on its attributes) is read by the pattern."""
    traffic = set_key_type(RULE_TRAFFIC)
    original, reply = b"\0\0\0\0" + mark(7), b"\x01\0\0\0" + mark(7)
    nested = bytearray(element(reply, 6, 1))
    nested[2:4] = struct.pack("=H", 0x8001)  # NLA_F_NESTED on the element
    for other in (element(reply, 6, 1, listed=True), element(reply, 6, 1, pad=True), bytes(nested)):
        payload, start = message(element(original, 5, 1), other)
        assert _decode_plain(payload[start:], key_layout(traffic)) is None
        assert decode(traffic, element(original, 5, 1), other) == [
            ("original . 7", "1", "5", ""),
            ("reply . 7", "1", "6", ""),
        ]


def test_interface_names_keep_their_quotes() -> None:
    assert decode("ifname", element(b"net2".ljust(16, b"\0"), 160, 4)) == [('"net2"', "4", "160", "")]


def test_an_element_of_another_shape_is_an_error() -> None:
    without_counter = attribute(1, attribute(1, attribute(1, mark(9))))
    with pytest.raises(SetDumpError, match="unexpected shape"):
        decode("mark", element(mark(7), 1, 1, "a/b/c"), without_counter)
    with pytest.raises(SetDumpError, match="unexpected shape.*: " + without_counter.hex()):
        decode("mark", element(mark(7), 1, 1, "a/b/c"), without_counter, element(mark(8), 1, 1, "a/b/d"))
    # As long as a plain element, with another expression's name: not read by strides either.
    other_expression = element(mark(7), 1, 1).replace(b"counter\0", b"limit\0\0\0")
    with pytest.raises(SetDumpError, match="unexpected shape"):
        decode("mark", element(mark(8), 1, 1), other_expression)


def test_a_key_type_without_a_layout_is_an_error() -> None:
    with pytest.raises(SetDumpError, match="no netlink layout"):
        key_layout("ipv4_addr . inet_service")
