"""`ct timeout` objects that libnftables 1.0.6 cannot write, made over netlink: ICMP and
ICMPv6 (its `protocol` takes tcp or udp only, and its JSON input crashes on others).

They are made in one batch of their own, just before the transaction that names them
(natgwd.planning.table.Transaction.made_first): an object nothing names changes no
packet's fate, and the rules that name it, like its deletion, are in the transaction.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence

from natgwd.kernel.setdump import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
)

_HEADER = struct.Struct("=IHHII")
_ATTRIBUTE = struct.Struct("=HH")
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 16, 17
_NFT_MSG_NEWTABLE, _NFT_MSG_NEWOBJ = 0, 18
_NFTA_TABLE_NAME = 1
_NLM_F_CREATE = 0x400
_ANSWER_SECONDS = 10  # the kernel answers at once; a bound, not a wait
_NLA_F_NESTED = 0x8000
_NFTA_OBJ_TABLE, _NFTA_OBJ_NAME, _NFTA_OBJ_TYPE, _NFTA_OBJ_DATA = 1, 2, 3, 4
_NFT_OBJECT_CT_TIMEOUT = 7
_NFTA_CT_TIMEOUT_L4PROTO, _NFTA_CT_TIMEOUT_DATA = 2, 3
_CTA_TIMEOUT_ICMP_TIMEOUT = 1  # the same number for ICMPv6 (CTA_TIMEOUT_ICMPV6_TIMEOUT)
_ONE_STATE = (1, 58)  # the protocols whose policy is one timeout: ICMP, ICMPv6


def _attribute(kind: int, data: bytes) -> bytes:
    return _ATTRIBUTE.pack(4 + len(data), kind) + data + b"\0" * (-len(data) % 4)


def _message(kind: int, flags: int, sequence: int, family: int, body: bytes, resource: int = 0) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(resource)) + body
    return _HEADER.pack(_HEADER.size + len(payload), kind, flags, sequence, 0) + payload


def new_object_message(table: str, name: str, protocol: int, seconds: int, sequence: int) -> bytes:
    """NFT_MSG_NEWOBJ of a ct timeout of `protocol` (ICMP or ICMPv6) in table inet `table`;
    its l3proto is the table's family, as nftables gives it."""
    if protocol not in _ONE_STATE:
        raise ValueError(f"not a protocol with one timeout: {protocol}")
    policy = _attribute(_CTA_TIMEOUT_ICMP_TIMEOUT, struct.pack("!I", seconds))
    data = _attribute(_NFTA_CT_TIMEOUT_L4PROTO, bytes([protocol]))
    data += _attribute(_NFTA_CT_TIMEOUT_DATA | _NLA_F_NESTED, policy)
    body = _attribute(_NFTA_OBJ_TABLE, table.encode() + b"\0") + _attribute(_NFTA_OBJ_NAME, name.encode() + b"\0")
    body += _attribute(_NFTA_OBJ_TYPE, struct.pack("!I", _NFT_OBJECT_CT_TIMEOUT))
    body += _attribute(_NFTA_OBJ_DATA | _NLA_F_NESTED, data)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWOBJ
    return _message(kind, NLM_F_REQUEST | NLM_F_ACK | _NLM_F_CREATE, sequence, NFPROTO_INET, body)


def make_ct_timeouts(table: str, objects: Sequence[tuple[str, int, int]]) -> None:
    """Make the ct timeouts (name, IP protocol, seconds) in one batch: all or none. The
    table too when there is none yet (as `add table`: one already there is left alone),
    and so is an object of that name (its name says its content). OSError with the
    kernel's errno when refused."""
    kind = (NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWTABLE
    body = _attribute(_NFTA_TABLE_NAME, table.encode() + b"\0")
    messages = [_message(kind, NLM_F_REQUEST | NLM_F_ACK | _NLM_F_CREATE, 2, NFPROTO_INET, body)]
    messages += [
        new_object_message(table, name, protocol, seconds, sequence)
        for sequence, (name, protocol, seconds) in enumerate(objects, start=3)
    ]
    end = len(messages) + 2
    batch = _message(_NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, b"", NFNL_SUBSYS_NFTABLES)
    batch += b"".join(messages)
    batch += _message(_NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0, b"", NFNL_SUBSYS_NFTABLES)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.settimeout(_ANSWER_SECONDS)
        sock.bind((0, 0))
        sock.send(batch)
        answered: set[int] = set()
        while len(answered) < len(messages):
            data = sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, sequence, _ = _HEADER.unpack_from(data, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if code != 0 and -code != errno.EEXIST:
                        raise OSError(-code, f"making ct timeout objects: {os.strerror(-code)}")
                    answered.add(sequence)
                offset += (length + 3) & ~3
