"""natgwd.kernel.rtbatch: requests many to a send, each acknowledgement matched to its
request by sequence number, whatever order the acknowledgements come in; a refusal carries
the kernel's errno and words; acknowledgements that never come are named, not waited for
forever. A fake socket plays the kernel."""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import ip_interface

from natgwd.kernel import rtbatch
from natgwd.kernel.rtbatch import (
    NLM_F_ACK_TLVS,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    RTM_NEWADDR,
    Refusal,
    RtNetlink,
    _address,
    _messages,
    attribute,
    new_address,
)


def ack(sequence: int, code: int = 0, message: str = "") -> bytes:
    body = struct.pack("=i", -code) + struct.pack("=IHHII", 16, RTM_NEWADDR, 0, sequence, 0)
    flags = 0
    if message:
        body += attribute(NLMSGERR_ATTR_MSG, message.encode() + b"\0")
        flags = NLM_F_ACK_TLVS
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, flags, sequence, 0) + body


class FakeKernel:
    """Refuses the requests whose address is in `refuse` (errno, message); answers each
    send's acknowledgements in reverse order, split over two datagrams; drops them all
    once `drop_after` sends were answered."""

    def __init__(self, refuse: dict[str, tuple[int, str]], drop_after: int | None = None) -> None:
        self.refuse, self.drop_after = refuse, drop_after
        self.sends: list[int] = []  # requests per send
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        answers = []
        for _kind, _flags, sequence, body in _messages(data):
            address = _address(body)
            assert address is not None
            code, message = self.refuse.get(str(address.interface), (0, ""))
            answers.append(ack(sequence, code, message))
        self.sends.append(len(answers))
        if self.drop_after is None or len(self.sends) <= self.drop_after:
            answers.reverse()
            half = len(answers) // 2
            self.pending += [b"".join(answers[:half]), b"".join(answers[half:])]
        return len(data)

    def recv(self, _size: int) -> bytes:
        if not self.pending:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return self.pending.pop(0)

    def close(self) -> None:
        pass


def batch(kernel: FakeKernel) -> RtNetlink:
    rt = RtNetlink()
    rt.sock.close()
    rt.sock = kernel  # type: ignore[assignment]
    return rt


ADDRESSES = [ip_interface(f"10.115.{48 + i // 250}.{i % 250 + 1}/21") for i in range(150)]


def test_each_refusal_is_matched_to_its_request_across_sends() -> None:
    kernel = FakeKernel({"10.115.48.100/21": (errno.EACCES, "ipv4: refused by the test"), "10.115.48.3/21": (17, "")})
    outcomes = batch(kernel).send_all([new_address(5, a, 249) for a in ADDRESSES])
    assert kernel.sends == [rtbatch.CHUNK, rtbatch.CHUNK, 150 - 2 * rtbatch.CHUNK]
    refused = {str(ADDRESSES[i].ip): outcome for i, outcome in enumerate(outcomes) if outcome is not None}
    assert refused == {
        "10.115.48.100": Refusal(errno.EACCES, "ipv4: refused by the test"),
        "10.115.48.3": Refusal(errno.EEXIST),
    }
    assert str(refused["10.115.48.100"]) == "(13, 'ipv4: refused by the test')"
    assert str(refused["10.115.48.3"]) == "(17, 'File exists')"


def test_acknowledgements_that_never_come_are_named() -> None:
    kernel = FakeKernel({}, drop_after=1)
    outcomes = batch(kernel).send_all([new_address(5, a, 249) for a in ADDRESSES])
    assert outcomes[: rtbatch.CHUNK] == [None] * rtbatch.CHUNK
    unanswered = outcomes[rtbatch.CHUNK :]
    assert unanswered and all(o is not None and o.code == errno.ENOBUFS for o in unanswered)


def test_an_address_request_reads_back_as_sent() -> None:
    for text, flags in (("10.115.55.200/21", 0), ("fd00:115::200/64", 0x02)):
        request = new_address(7, ip_interface(text), 249, flags)
        address = _address(request.body)
        assert address is not None
        assert (str(address.interface), address.index, address.proto, address.flags) == (text, 7, 249, flags)
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        assert request.body[0] == family
