"""natgwd.kernel.tcdump's signatures (a tc message without its counters), its link and
qdisc decoding, and the requests natgwd.kernel.tc batches: HTB classes it writes without
pyroute2, and how a batch's refusals are reported."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

import pytest

from natgwd.kernel.rtbatch import Refusal, Request
from natgwd.kernel.tc import (
    ROOT_HANDLE,
    TCA_HTB_RATE64,
    TCA_U32_CLASSID,
    TCA_U32_SEL,
    _class_request,
    _Device,
    _htb_parms,
    _rates,
)
from natgwd.kernel.tcdump import (
    TCA_KIND,
    TCA_OPTIONS,
    TCA_STATS2,
    TCA_U32_PAD,
    TCA_U32_PCNT,
    attributes,
    decode,
    links,
    qdiscs,
    signature,
)
from natgwd.qos.plan import ClassKey, HtbClass, TcReport, Want, handle

TCA_STATS, TCA_XSTATS, TCA_CHAIN = 3, 4, 11


def attribute(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def tcmsg(index: int, handle_: int, parent: int, info: int = 0) -> bytes:
    return struct.pack("=BxxxiIII", socket.AF_UNSPEC, index, handle_, parent, info)


def htb_class(rate: int, packets: int) -> bytes:
    parms = struct.pack("=BBHhHI", 0, 1, 0, 0, 0, rate) * 2 + struct.pack("=IIIII", 8000, 8000, 12_500, 0, 0)
    stats = attribute(1, struct.pack("=QI", packets * 1500, packets))
    return (
        tcmsg(3, 0x4E470005, 0xFFFFFFFF, 0x80010000)
        + attribute(TCA_KIND, b"htb\0")
        + attribute(TCA_OPTIONS, attribute(1, parms))
        + attribute(TCA_STATS2, stats)
        + attribute(TCA_STATS, struct.pack("=QIIIIIII", packets * 1500, packets, 0, 0, 0, 0, 0, 0))
        + attribute(TCA_XSTATS, struct.pack("=IIIII", 0, 0, packets, 0, 0))
    )


def u32_filter(classid: int, hits: int | None) -> bytes:
    selector = struct.pack("=BBBxHHhh", 1, 0, 1, 0, 0, 0, 0) + struct.pack(">I", 0)
    selector += struct.pack(">II", 0xFFFFFFFF, 0x0A733201) + struct.pack("=ii", 12, 0)
    options = attribute(TCA_U32_SEL, selector) + attribute(2, struct.pack("=I", 0x4E401000))
    options += attribute(TCA_U32_CLASSID, struct.pack("=I", classid))
    if hits is not None:  # a kernel with CONFIG_CLS_U32_PERF
        options += attribute(TCA_U32_PAD, b"") + attribute(TCA_U32_PCNT, struct.pack("=QQQ", hits, hits, hits))
    top = attribute(TCA_KIND, b"u32\0") + attribute(TCA_CHAIN, struct.pack("=I", 0)) + attribute(TCA_OPTIONS, options)
    return tcmsg(3, 0x4E401800, ROOT_HANDLE, (100 << 16) | 0x0008) + top


def test_a_class_signature_leaves_out_the_statistics_only() -> None:
    assert signature(htb_class(125_000, 10)) == signature(htb_class(125_000, 99_999))
    assert signature(htb_class(125_000, 10)) != signature(htb_class(250_000, 10))
    found = decode(signature(htb_class(125_000, 10)))
    assert (found.handle, found.kind, found.stats) == (0x4E470005, "htb", None)
    assert _htb_parms(found.options) == _htb_parms(decode(htb_class(125_000, 10)).options)


def test_a_u32_signature_leaves_out_the_hit_counters_and_still_decodes() -> None:
    counted, uncounted = u32_filter(0x4E470005, 7), u32_filter(0x4E470005, None)
    assert signature(counted) == signature(u32_filter(0x4E470005, 123_456)) == signature(uncounted)
    assert signature(counted) != signature(u32_filter(0x4E47FFFE, 7))  # sent to another class
    options = decode(signature(counted)).options
    assert options is not None and TCA_U32_PCNT not in options and TCA_U32_PAD not in options
    assert options == decode(uncounted).options


def test_a_message_without_options_is_its_own_signature_and_a_short_attribute_is_refused() -> None:
    header = tcmsg(3, 0, ROOT_HANDLE, 100 << 16) + attribute(TCA_KIND, b"u32\0")
    assert signature(header) == header
    with pytest.raises(OSError, match="does not fit"):
        signature(header + struct.pack("=HH", 40, TCA_OPTIONS))


class FakeRt:
    def __init__(self, bodies: list[bytes], refusals: list[Refusal | None] | None = None) -> None:
        self.bodies, self.refusals, self.sent = bodies, refusals, []  # type: ignore[var-annotated]

    def dump(self, kind: int, request: bytes) -> list[bytes]:
        return self.bodies

    def send_all(self, requests: list[Request]) -> list[Refusal | None]:
        self.sent += requests
        return self.refusals or [None] * len(requests)


def test_links_and_qdiscs_from_their_messages() -> None:
    info = attribute(1, b"ifb\0")
    ifb = struct.pack("=BxHiII", 0, 1, 7, 0x1043, 0) + attribute(3, b"ifb-net2\0") + attribute(18, info)
    ifb += attribute(20, b"natgwd qos\0")
    down = struct.pack("=BxHiII", 0, 1, 2, 0x1002, 0) + attribute(3, b"net2\0")
    assert [tuple(link) for link in links(FakeRt([ifb, down]))] == [  # type: ignore[arg-type]
        (7, "ifb-net2", True, "ifb", "natgwd qos"),
        (2, "net2", False, "", ""),
    ]
    root = tcmsg(2, ROOT_HANDLE, 0xFFFFFFFF) + attribute(TCA_KIND, b"htb\0") + attribute(TCA_OPTIONS, b"")
    assert [tuple(q) for q in qdiscs(FakeRt([root]))] == [(2, ROOT_HANDLE, 0xFFFFFFFF, "htb")]  # type: ignore[arg-type]


def test_a_class_written_without_pyroute2_reads_back_as_the_plan_says() -> None:
    for spec in (HtbClass(1_250_000, 131_072), HtbClass(5_000_000_000, 50_000_000)):
        request = _class_request(4, 0x1234, spec, add=True)
        found = decode(request.body)
        assert (found.handle, found.parent, found.kind) == (handle(0x1234), ROOT_HANDLE, "htb")
        parms = _htb_parms(found.options)
        assert parms is not None and found.options is not None
        rates = (parms["rate"], parms["ceil"], parms["buffer"], parms["cbuffer"])
        if spec.rate_bytes < 1 << 32:
            assert rates == _rates(spec)
        else:  # the 32-bit fields saturate; the 64-bit attributes carry the rate
            assert struct.unpack("=Q", found.options[TCA_HTB_RATE64]) == (spec.rate_bytes,)
    assert attributes(b"") == {}


def test_a_batch_reports_what_was_made_and_raises_on_a_refusal() -> None:
    def device(refusals: list[Refusal | None]) -> tuple[_Device, Any]:
        net: Any = type("Net", (), {"rt": FakeRt([], refusals), "written": lambda self: None})()
        return _Device(net, 4, "net2", TcReport()), net

    sent, net = device([None, Refusal(errno.ENOENT), None])
    sent.queue(Request(40, 0, b"a"), "add a")
    sent.queue(Request(45, 0, b"b"), "delete b", done_if=(errno.ENOENT,))  # gone already: done
    sent.queue(Request(45, 0, b"c"), "")  # said otherwise
    sent.flush()
    assert sent.report.changes == ["add a", "delete b"] and sent.pending == [] and len(net.rt.sent) == 3
    refused, _ = device([Refusal(errno.EINVAL, "bad rate"), None])
    refused.queue(Request(40, 0, b"a"), "add a")
    refused.queue(Request(40, 0, b"b"), "add b")
    with pytest.raises(OSError, match=r"add a: \(22, 'bad rate'\) \(1 of 2 refused\)"):
        refused.flush()
    assert refused.report.changes == ["add b"]


def test_a_tree_s_messages_are_decoded_and_planned_once_by_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    import natgwd.kernel.tc as tc

    decoded: list[bytes] = []
    read = tc._read_filter

    def counting(message: bytes) -> tc._KernelFilter | None:
        decoded.append(message)
        return read(message)

    monkeypatch.setattr(tc, "_read_filter", counting)
    memo = tc._Memo("egress")
    first, second, moved = (signature(u32_filter(c, None)) for c in (0x4E470005, 0x4E470006, 0x4E47FFFE))
    found = memo.read_filters([first, second])
    assert len(decoded) == 2 and [f.kernel.spec.minor for f in found] == [5, 6]
    assert found[0].key == ClassKey("eip", "10.115.50.1")
    assert memo.read_filters([first, second]) == found and len(decoded) == 2
    assert [f.kernel.spec.minor for f in memo.read_filters([first, moved])] == [5, 0xFFFE]
    assert decoded[2:] == [moved] and set(memo.filters) == {first, moved}  # only what the kernel holds now
    wanted = {ClassKey("eip", "10.115.50.1"): Want(8_000_000, 131_072, 100, "e1")}
    planned, rates = memo.tree(wanted, {})
    assert memo.tree(dict(wanted), {})[0] is planned and rates == {m: _rates(c) for m, c in planned.classes.items()}
    assert memo.tree(wanted, {ClassKey("eip", "10.115.50.1"): 7})[0].keys[7] == ClassKey("eip", "10.115.50.1")
