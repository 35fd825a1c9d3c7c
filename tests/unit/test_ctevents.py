"""ctnetlink messages -> CtEvent: a NEW event as the kernel sent it, and messages built to
the kernel's layout (dump entries, DESTROY with counters, DONE, errors)."""

from __future__ import annotations

import contextlib
import errno
import os
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


NETLINK_USERSOCK = 2


def require_root(what: str) -> None:
    """The socket tests stand a netlink socket in for the kernel's, which needs CAP_NET_ADMIN."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {what}")


def netlink_pair(groups: int = 0) -> tuple[socket.socket, socket.socket]:
    """A netlink socket standing in for the event socket, and one sending to it
    (NETLINK_USERSOCK): datagrams queue, and are received, as the kernel's events are."""
    require_root("a receive buffer that holds the test's datagrams (SO_RCVBUFFORCE)")
    ours = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    theirs = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    ours.bind((0, groups))
    ours.setsockopt(socket.SOL_SOCKET, ctevents.SO_RCVBUFFORCE, 16 << 20)
    theirs.bind((0, 0))
    theirs.connect((ours.getsockname()[0], 0))
    return ours, theirs


def event_socket(sock: socket.socket) -> EventSocket:
    made = EventSocket.__new__(EventSocket)
    made.sock = sock
    return made


def received_counted(datagrams: list[bytes], limit: int) -> Counted:
    ours, theirs = netlink_pair()
    try:
        for data in datagrams:
            theirs.send(data)
        return event_socket(ours).receive_counted(limit)
    finally:
        ours.close()
        theirs.close()


def general_way(datagrams: list[bytes], more: bool = False) -> Counted:
    """What receive_counted gives, from each datagram decoded the general way, sorted."""
    events = [event for data in datagrams for event in parse(data).events if event.mark and event.kind != "entry"]
    return Counted(
        sorted(raw(event) for event in events if event.kind == "new"),
        sorted(raw(event) for event in events if event.kind == "destroy"),
        more,
    )


def in_order(counted: Counted) -> Counted:
    # The slots are taken a layout at a time: the order of the events is not kept (only
    # their sums are ever read).
    return Counted(sorted(counted.news), sorted(counted.destroys), counted.more)


@pytest.mark.parametrize("shape", RAW_SHAPES)
def test_the_raw_form_holds_what_the_general_way_decodes(shape: str) -> None:
    messages = RAW_SHAPES[shape] * 2  # the second of a layout is read by its learnt masks
    ctevents._LAYOUTS.clear()
    assert in_order(received_counted(messages, len(messages) + 1)) == general_way(messages)


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


# --- events captured from the kernel -------------------------------------------------

# Events captured on this kernel (Linux 6.18) by natgwd's event socket, in a namespace whose
# nftables set the ct mark and translated connections as natgwd's rules do: TCP
# 10.77.0.1 -> 10.77.0.2:80, DNAT to :8080 and SNAT to another source port, ct mark 7; the
# same for UDP to :53 (DNAT to :5353), ct mark 9; TCP to :8080 untranslated, no mark. NEW
# and DESTROY each, then again with nf_conntrack_acct and nf_conntrack_timestamp on
# ("acct": counters and timestamps in the DESTROY events, an event time in each).
CAPTURED = {
    "new tcp dnat+snat mark 7": bytes.fromhex(
        "cc000000000100060000000000000000020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "050001000600000006000200eca4000006000300005000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f900000060003006b5f000008000c0050def56008000300000001b808000700"
        "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
        "000000000800080000000007"
    ),
    "new udp dnat+snat mark 9": bytes.fromhex(
        "9c000000000100060000000000000000020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "0500010011000000060002008e89000006000300003500003400028014000180080001000a4d0002080002000a4d0001"
        "1c00028005000100110000000600020014e900000600030067de000008000c00917ff67e08000300000001b808000700"
        "0000001e0800080000000009"
    ),
    "new tcp unmarked": bytes.fromhex(
        "c4000000000100060000000000000000020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "0500010006000000060002009a880000060003001f9000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f900000060003009a88000008000c00b848aae7080003000000018808000700"
        "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
        "00000000"
    ),
    "destroy tcp unmarked": bytes.fromhex(
        "a40000000201000000000000ff236cb2020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "0500010006000000060002009a880000060003001f9000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f900000060003009a88000008000c00b848aae7080003000000038e08000700"
        "00000077100004800c0001800500010007000000"
    ),
    "destroy udp mark 9": bytes.fromhex(
        "9c0000000201000000000000ff236cb2020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "0500010011000000060002008e89000006000300003500003400028014000180080001000a4d0002080002000a4d0001"
        "1c00028005000100110000000600020014e900000600030067de000008000c00917ff67e08000300000003ba08000700"
        "0000001d0800080000000009"
    ),
    "destroy tcp mark 7": bytes.fromhex(
        "ac0000000201000000000000ff236cb2020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "050001000600000006000200eca4000006000300005000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f900000060003006b5f000008000c0050def56008000300000003be08000700"
        "00000077100004800c00018005000100070000000800080000000007"
    ),
    "new tcp dnat+snat mark 7 acct": bytes.fromhex(
        "d8000000000100060000000000000000020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "050001000600000006000200ecaa000006000300005000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f90000006000300543b000008000c00b53abbc408000300000001b808000700"
        "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
        "0000000008000800000000070c001b0018ef29364d8e1226"
    ),
    "new udp dnat+snat mark 9 acct": bytes.fromhex(
        "a8000000000100060000000000000000020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "050001001100000006000200e016000006000300003500003400028014000180080001000a4d0002080002000a4d0001"
        "1c00028005000100110000000600020014e90000060003006a90000008000c00ef470d8708000300000001b808000700"
        "0000001e08000800000000090c001b0018ef29364de1b372"
    ),
    "new tcp unmarked acct": bytes.fromhex(
        "d0000000000100060000000000000000020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "0500010006000000060002009a8c0000060003001f9000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f900000060003009a8c000008000c00d2d63f26080003000000018808000700"
        "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
        "000000000c001b0018ef29364de3fca6"
    ),
    "destroy tcp mark 7 acct": bytes.fromhex(
        "0c0100000201000000000000ecb815ea020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "050001000600000006000200ecaa000006000300005000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f90000006000300543b000008000c00b53abbc408000300000003be08000700"
        "000000771c0009800c00010000000000000000060c00020000000000000001411c000a800c0001000000000000000004"
        "0c00020000000000000000d91c0014800c00010018ef29364d8e49f00c00020018ef29364e7afbb4100004800c000180"
        "050001000700000008000800000000070c001b0018ef29364e7afc0e"
    ),
    "destroy udp mark 9 acct": bytes.fromhex(
        "fc0000000201000000000000ecb815ea020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "050001001100000006000200e016000006000300003500003400028014000180080001000a4d0002080002000a4d0001"
        "1c00028005000100110000000600020014e90000060003006a90000008000c00ef470d8708000300000003ba08000700"
        "0000001d1c0009800c00010000000000000000010c000200000000000000001d1c000a800c0001000000000000000001"
        "0c000200000000000000001d1c0014800c00010018ef29364de1c4d00c00020018ef29364e7ba20b0800080000000009"
        "0c001b0018ef29364e7ba247"
    ),
    "destroy tcp unmarked acct": bytes.fromhex(
        "040100000201000000000000ecb815ea020000003400018014000180080001000a4d0001080002000a4d00021c000280"
        "0500010006000000060002009a8c0000060003001f9000003400028014000180080001000a4d0002080002000a4d0001"
        "1c0002800500010006000000060002001f900000060003009a8c000008000c00d2d63f26080003000000038e08000700"
        "000000771c0009800c00010000000000000000050c000200000000000000010d1c000a800c0001000000000000000005"
        "0c000200000000000000010d1c0014800c00010018ef29364de4063c0c00020018ef29364e7bcbdd100004800c000180"
        "05000100070000000c001b0018ef29364e7bcc0f"
    ),
}


def with_mark(data: bytes, mark: int) -> bytes:
    """A captured event of ct mark 7 or 9 given another mark."""
    for was in (7, 9):
        data = data.replace(
            struct.pack("=HH", 8, 8) + struct.pack(">I", was), struct.pack("=HH", 8, 8) + struct.pack(">I", mark)
        )
    return data


@pytest.mark.parametrize("name", CAPTURED)
def test_a_captured_event_decodes(name: str) -> None:
    (event,) = parse(CAPTURED[name]).events
    tcp = "tcp" in name
    assert event.kind == name.split()[0]
    assert event.mark == (0 if "unmarked" in name else 7 if tcp else 9)
    dport, to_port = (80, 8080) if "mark 7" in name else (53, 5353) if "udp" in name else (8080, 8080)
    assert (event.orig.proto, event.orig.src, event.orig.dst, event.orig.dport) == (
        6 if tcp else 17,
        "10.77.0.1",
        "10.77.0.2",
        dport,
    )
    assert (event.reply.src, event.reply.sport, event.reply.dst) == ("10.77.0.2", to_port, "10.77.0.1")
    assert event.source_translated == ("unmarked" not in name)
    assert (event.counters_orig is not None) == (name.startswith("destroy") and name.endswith("acct"))


def test_captured_events_in_bulk_read_what_the_general_way_reads() -> None:
    """Every captured layout interleaved, 600 datagrams (three recvmmsg calls): each is
    read in the raw form as the general way reads it, and by its learnt layout."""
    ctevents._LAYOUTS.clear()
    datagrams = [with_mark(data, 2 + index % 40) for index in range(50) for data in CAPTURED.values()]
    assert in_order(received_counted(datagrams, 1000)) == general_way(datagrams)
    for data in CAPTURED.values():
        length, msg_type = struct.unpack_from("=IH", data)
        assert ctevents._LAYOUTS[msg_type, length - 16] is not None
    # Up to the limit: the first datagrams, and more may be queued.
    assert in_order(received_counted(datagrams, 300)) == general_way(datagrams[:300], more=True)


def test_one_message_unlike_its_layout_among_many_goes_the_general_way() -> None:
    new = CAPTURED["new tcp dnat+snat mark 7"]
    # The same type and length, the mark's attribute header another type: not a mark.
    other = new.replace(struct.pack("=HH", 8, 8), struct.pack("=HH", 8, 11))
    datagrams = [other if index == 17 else with_mark(new, 3) for index in range(50)]
    counted = received_counted(datagrams, 100)
    assert in_order(counted) == general_way(datagrams)
    assert len(counted.news) == 49


def test_a_datagram_longer_than_its_slot_is_a_loss() -> None:
    long = message(0x100, 0, snat_attrs(5, 2) + attr(30, bytes(ctevents.SLOT_BYTES)))
    with pytest.raises(EventsLostError):
        received_counted([CAPTURED["new tcp dnat+snat mark 7"], long], 10)


def test_events_dropped_by_the_kernel_are_a_loss() -> None:
    """ENOBUFS from recvmmsg: a multicast group's datagrams overran the socket's buffer."""
    require_root("sending to a netlink multicast group")
    ours = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    theirs = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's least
        ours.bind((0, 1))
        theirs.bind((0, 0))
        for _ in range(50):
            with contextlib.suppress(ConnectionRefusedError):  # also sent to port 0, which is none
                theirs.sendto(CAPTURED["new tcp dnat+snat mark 7"], (0, 1))
        with pytest.raises(EventsLostError):
            event_socket(ours).receive_counted(100)
    finally:
        ours.close()
        theirs.close()
