"""ctnetlink messages -> CtEvent: a NEW event as the kernel sent it, and messages built to
the kernel's layout (dump entries, DESTROY with counters, DONE, errors)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from natgwd.observability import ctevents
from natgwd.observability.ctevents import (
    RAW_MARK,
    Counted,
    CtEvent,
    CtNetlinkError,
    CtTuple,
    EventsLostError,
    EventSocket,
    Traffic,
    parse,
    raw,
)

# A NEW event captured on this kernel: TCP 127.0.0.1:38074 -> 127.0.0.1:5555, ct mark 7.
CAPTURED_NEW = bytes.fromhex(
    "cc000000000100060000000000000000020000003400018014000180080001007f000001080002007f000001"
    "1c00028005000100060000000600020094ba00000600030015b300003400028014000180080001007f000001"
    "080002007f0000011c00028005000100060000000600020015b300000600030094ba000008000c00f4690057"
    "08000300000000080800070000000078300004802c0001800500010001000000050002000a00000005000300"
    "00000000060004000300000006000500000000000800080000000007"
)

NESTED = 0x8000


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind | (NESTED if nested else 0))
    return header + payload + b"\0" * (-len(payload) % 4)


def tuple_attr(kind: int, proto: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    ip = attr(1, socket.inet_aton(src)) + attr(2, socket.inet_aton(dst))
    l4 = attr(1, bytes([proto])) + attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport))
    return attr(kind, attr(1, ip, True) + attr(2, l4, True), True)


def message(msg_type: int, flags: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, 0, 0) + body


def counters(kind: int, packets: int, octets: int) -> bytes:
    return attr(kind, attr(1, struct.pack(">Q", packets)) + attr(2, struct.pack(">Q", octets)), True)


SNAT_ORIG = (17, "172.20.10.2", 40001, "10.115.55.254", 53)
SNAT_REPLY = (17, "10.115.55.254", 53, "10.115.55.200", 61234)


def snat_attrs(conntrack_id: int, mark: int) -> bytes:
    return (
        tuple_attr(1, *SNAT_ORIG)
        + tuple_attr(2, *SNAT_REPLY)
        + attr(3, struct.pack(">I", 0x1A8))
        + attr(8, struct.pack(">I", mark))
        + attr(12, struct.pack(">I", conntrack_id))
    )


def test_captured_new_event() -> None:
    (event,) = parse(CAPTURED_NEW).events
    assert event == CtEvent(
        "new",
        0xF4690057,
        7,
        CtTuple(6, "127.0.0.1", 38074, "127.0.0.1", 5555),
        CtTuple(6, "127.0.0.1", 5555, "127.0.0.1", 38074),
        status=8,
    )
    assert not event.source_translated and not event.destination_translated


def test_destroy_with_counters_and_a_dump_entry_in_one_datagram() -> None:
    destroy = message(0x102, 0, snat_attrs(11, 3) + counters(9, 2, 62) + counters(10, 1, 40))
    entry = message(0x100, 0x2, snat_attrs(12, 4))  # NLM_F_MULTI: part of a dump
    batch = parse(destroy + entry + struct.pack("=IHHII", 20, 3, 2, 0, 0) + b"\0" * 4)
    first, second = batch.events
    assert batch.done
    assert (first.kind, first.id, first.mark) == ("destroy", 11, 3)
    assert first.counters_orig == Traffic(2, 62) and first.counters_reply == Traffic(1, 40)
    assert first.orig == CtTuple(*SNAT_ORIG) and first.reply == CtTuple(*SNAT_REPLY)
    assert first.source_translated and not first.destination_translated
    assert (second.kind, second.id, second.mark, second.counters_orig) == ("entry", 12, 4, None)


def test_other_subsystems_are_skipped() -> None:
    assert parse(message(0x200, 0, snat_attrs(1, 1))).events == []


def test_netlink_error_raises_with_its_code() -> None:
    error = struct.pack("=IHHII", 36, 2, 0, 0, 0) + struct.pack("=i", -errno.EPERM) + b"\0" * 16
    with pytest.raises(CtNetlinkError) as raised:
        parse(error)
    assert raised.value.errno == errno.EPERM
    ack = struct.pack("=IHHII", 36, 2, 0, 0, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert parse(ack).events == []


# --- malformed messages: counted, never raised; the messages around them still decoded ---

GOOD = message(0x100, 0, snat_attrs(5, 2))


def cut_attribute() -> bytes:
    """A CTA_ID attribute that says it is longer than what is left of its message."""
    attrs = snat_attrs(6, 2) + struct.pack("=HH", 12, 12) + b"\0" * 4
    return message(0x100, 0, attrs)


def odd_address() -> bytes:
    ip = attr(1, b"\x0a\x00\x00\x01\x02") + attr(2, socket.inet_aton("10.0.0.2"))
    l4 = attr(1, bytes([17])) + attr(2, struct.pack(">H", 1)) + attr(3, struct.pack(">H", 2))
    return message(0x100, 0, attr(1, attr(1, ip, True) + attr(2, l4, True), True) + attr(8, struct.pack(">I", 2)))


def short_number() -> bytes:
    return message(0x102, 0, snat_attrs(7, 2) + attr(9, attr(1, b"\0\0") + attr(2, b"\0" * 8), True))


SHORT_ERROR = struct.pack("=IHHII", 18, 2, 0, 0, 0) + b"\0\0" + b"\0\0"  # 2 of the error code's 4 bytes


@pytest.mark.parametrize(
    "bad", [cut_attribute(), odd_address(), short_number(), SHORT_ERROR], ids=["cut", "odd", "short", "error"]
)
def test_a_malformed_message_is_counted_and_the_others_are_decoded(bad: bytes) -> None:
    batch = parse(GOOD + bad + GOOD)
    assert batch.malformed == 1
    assert [(e.kind, e.id) for e in batch.events] == [("new", 5), ("new", 5)]


def test_a_message_longer_than_its_datagram_ends_it() -> None:
    batch = parse(GOOD + GOOD[:40])
    assert batch.malformed == 1
    assert [e.id for e in batch.events] == [5]


# --- layouts learnt: a message of a shape seen before is read with one unpack ----------


def timestamps(start: int, stop: int) -> bytes:
    return attr(20, attr(1, struct.pack(">Q", start)) + attr(2, struct.pack(">Q", stop)), True)


def reordered(conntrack_id: int, mark: int) -> bytes:
    """snat_attrs' attributes in another order: the same type and length of message."""
    return (
        tuple_attr(2, *SNAT_REPLY)
        + tuple_attr(1, *SNAT_ORIG)
        + attr(12, struct.pack(">I", conntrack_id))
        + attr(3, struct.pack(">I", 0x1A8))
        + attr(8, struct.pack(">I", mark))
    )


SHAPES = {
    "captured": [CAPTURED_NEW],
    "new": [message(0x100, 0, snat_attrs(5, 2)), message(0x100, 0, snat_attrs(6, 9))],
    "reordered": [message(0x100, 0, snat_attrs(5, 2)), message(0x100, 0, reordered(7, 3))],
    "destroy": [
        message(0x102, 0, snat_attrs(11, 3) + counters(9, 2, 62) + counters(10, 1, 40) + timestamps(5, 9)),
        message(0x102, 0, snat_attrs(12, 4) + counters(9, 7, 700) + counters(10, 6, 600) + timestamps(6, 8)),
    ],
    "entry": [message(0x100, 0x2, snat_attrs(12, 4)), message(0x100, 0x2, snat_attrs(13, 5))],
    "short number": [
        message(0x102, 0, snat_attrs(7, 2) + attr(9, attr(1, b"\0" * 4) + attr(2, b"\0" * 8), True)),
        message(0x102, 0, snat_attrs(7, 2) + attr(9, attr(2, b"\0" * 4) + attr(1, b"\0" * 8), True)),
    ],
    "icmp": [message(0x100, 0, tuple_attr(1, 1, "10.0.0.1", 0, "10.0.0.2", 0) + attr(8, struct.pack(">I", 1)))],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_learnt_layout_reads_what_the_attributes_read(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    messages = SHAPES[shape] * 2
    ctevents._LAYOUTS.clear()
    fast = [parse(data) for data in messages]
    monkeypatch.setattr(ctevents, "_learn", lambda *_: None)
    ctevents._LAYOUTS.clear()
    assert fast == [parse(data) for data in messages]


def test_messages_of_one_layout_take_the_one_unpack() -> None:
    ctevents._LAYOUTS.clear()
    parse(message(0x100, 0, snat_attrs(5, 2)))
    assert [layout is not None for layout in ctevents._LAYOUTS.values()] == [True]
    parse(CAPTURED_NEW)
    assert len(ctevents._LAYOUTS) == 2


# --- the raw form: what the gauges read, from the same messages ------------------------


def v6_tuple(kind: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    ip = attr(3, socket.inet_pton(socket.AF_INET6, src)) + attr(4, socket.inet_pton(socket.AF_INET6, dst))
    l4 = attr(1, bytes([6])) + attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport))
    return attr(kind, attr(1, ip, True) + attr(2, l4, True), True)


RAW_SHAPES = {
    # "short number": malformed in counters, which the gauges do not read (and the first
    # message of a layout, read the general way, is a loss).
    **{name: messages for name, messages in SHAPES.items() if name != "short number"},
    "no mark": [message(0x100, 0, tuple_attr(1, *SNAT_ORIG) + tuple_attr(2, *SNAT_REPLY))],
    "mark 0": [message(0x100, 0, snat_attrs(5, 0))],
    "ipv6": [
        message(
            0x100,
            0,
            v6_tuple(1, "fd00::2", 4000, "2001:db8::9", 443)
            + v6_tuple(2, "2001:db8::9", 443, "2001:db8::1", 61000)
            + attr(8, struct.pack(">I", 4)),
        )
    ],
    "two in a datagram": [message(0x100, 0, snat_attrs(5, 2)) + message(0x102, 0, snat_attrs(5, 2))],
}


def received_counted(datagrams: list[bytes], limit: int) -> Counted:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    made = EventSocket.__new__(EventSocket)
    made.sock = ours
    try:
        for data in datagrams:
            theirs.send(data)
        return made.receive_counted(limit)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("shape", RAW_SHAPES)
def test_the_raw_form_holds_what_the_general_way_decodes(shape: str) -> None:
    messages = RAW_SHAPES[shape] * 2  # the second of a layout is read by its learnt masks
    ctevents._LAYOUTS.clear()
    counted = received_counted(messages, len(messages) + 1)
    events = [event for data in messages for event in parse(data).events if event.mark and event.kind != "entry"]
    # The slots are taken a layout at a time: the order of the events is not kept (only
    # their sums are ever read).
    assert Counted(sorted(counted.news), sorted(counted.destroys), counted.more) == Counted(
        sorted(raw(event) for event in events if event.kind == "new"),
        sorted(raw(event) for event in events if event.kind == "destroy"),
        False,
    )


def test_the_raw_form_is_read_in_bulk_only_for_messages_of_a_learnt_layout() -> None:
    ctevents._LAYOUTS.clear()
    learnt = message(0x100, 0, snat_attrs(5, 2))
    # The same type and length, the mark's attribute header another type: not a mark.
    other = learnt.replace(struct.pack("=HH", 8, 8), struct.pack("=HH", 8, 11))
    counted = received_counted([learnt, other, learnt], 2)
    assert [event[RAW_MARK] for event in counted.news] == [struct.pack(">I", 2)]
    assert counted.more
    assert [e.mark for e in parse(other).events] == [0]
    # A layout without a mark, then its length with one: the mark is read.
    unmarked = message(0x100, 0, tuple_attr(1, *SNAT_ORIG) + tuple_attr(2, *SNAT_REPLY) + attr(11, bytes(4)))
    marked = unmarked.replace(struct.pack("=HH", 8, 11), struct.pack("=HH", 8, 8))
    marked = marked[:-4] + struct.pack(">I", 6)
    assert received_counted([unmarked, marked], 3).news == [raw(parse(marked).events[0])]


def test_a_malformed_datagram_in_the_raw_form_is_a_loss() -> None:
    with pytest.raises(EventsLostError):
        received_counted([GOOD, cut_attribute()], 4)
