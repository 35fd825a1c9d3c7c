"""natgwd.kernel.netlink.bindable: which RTM_NEWADDR messages (as natgwd.kernel.rtbatch
reads them) name a bindable address of the pod interface (a kernel without strict checking
sends every interface's)."""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address

import pytest

from natgwd.kernel.netlink import IFA_F_DADFAILED, IFA_F_TENTATIVE, bindable
from natgwd.kernel.rtbatch import IFA_ADDRESS, IFA_FLAGS, IFA_LOCAL, _address
from natgwd.state.model import IPAddress


def _usable(body: bytes, index: int) -> IPAddress | None:
    address = _address(body)
    assert address is not None
    return address.local if bindable(address, index) else None


def message(address: str, index: int = 2, scope: int = 0, flags: int = 0, extended: int | None = None) -> bytes:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    raw = socket.inet_pton(family, address)
    body = struct.pack("=BBBBI", family, 24, flags & 0xFF, scope, index)
    kinds = [IFA_ADDRESS] if family == socket.AF_INET6 else [IFA_ADDRESS, IFA_LOCAL]
    for kind in kinds:
        body += struct.pack("=HH", 4 + len(raw), kind) + raw
    if extended is not None:
        body += struct.pack("=HHI", 8, IFA_FLAGS, extended)
    return body


def test_a_global_address_of_the_interface() -> None:
    assert _usable(message("10.244.7.5"), 2) == ip_address("10.244.7.5")
    assert _usable(message("fd00:244::5", extended=0x80), 2) == ip_address("fd00:244::5")


@pytest.mark.parametrize(
    "skipped",
    [
        message("10.115.55.200", index=3),  # another interface's (an EIP on net2)
        message("fe80::1", scope=253),  # link scope
        message("fd00:244::5", flags=IFA_F_TENTATIVE),  # duplicate address detection running
        message("fd00:244::5", extended=IFA_F_DADFAILED | 0x80),
    ],
)
def test_not_bindable_or_not_the_interfaces(skipped: bytes) -> None:
    assert _usable(skipped, 2) is None
