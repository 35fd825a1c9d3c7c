"""natgwd.kernel.tc's HTB parameters (the quantum within the kernel's bounds, a burst in
ticks), and what it reads from the kernel's tc messages: u32 selectors, mirred targets,
HTB parameters."""

from __future__ import annotations

import struct

from natgwd.kernel.tc import (
    TCA_U32_CLASSID,
    TCA_U32_LINK,
    TCA_U32_SEL,
    _htb_parms,
    _mirred_target,
    _quantum,
    _Selector,
    _selector,
    _ticks,
    _u32,
)
from natgwd.kernel.tcdump import attributes


def test_quantum_within_the_kernels_bounds_and_burst_ticks() -> None:
    assert _quantum(1_250) == 2_000
    assert _quantum(1_250_000) == 125_000
    assert _quantum(1_250_000_000) == 200_000
    # a burst of one second at the rate is a million microseconds of kernel ticks
    assert _ticks(1_250_000, 1_250_000) == _ticks(2_500_000, 2_500_000) > 0


def attribute(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def test_a_u32_selector_its_keys_and_hash_key_read_from_the_attributes_bytes() -> None:
    # As _add_u32 writes it: one key (value 10.115.55.200 at offset 16), hashed on the last byte.
    selector = struct.pack("=BBBxHHhh", 1, 0, 1, 0, 0, 0, 12) + struct.pack(">I", 0xFF)
    selector += struct.pack(">II", 0xFFFFFFFF, 0x0A7337C8) + struct.pack("=ii", 16, 0)
    options = attributes(attribute(TCA_U32_CLASSID, struct.pack("=I", 0x4E470005)) + attribute(TCA_U32_SEL, selector))
    assert _selector(options[TCA_U32_SEL]) == _Selector([(0x0A7337C8, 0xFFFFFFFF, 16)], 12, 0xFF)
    assert _u32(options[TCA_U32_CLASSID]) == 0x4E470005
    assert _u32(options.get(TCA_U32_LINK)) == 0
    assert _selector(None) == _Selector([], 0, 0)


def test_the_mirred_target_and_the_htb_parameters() -> None:
    parms = struct.pack("=IIiiiiI", 1, 0, 4, 1, 1, 1, 7)  # tc_gen, eaction (redirect), ifindex 7
    mirred = attribute(1, b"mirred\0") + attribute(2, attribute(2, parms))
    other = attribute(1, b"gact\0") + attribute(2, attribute(2, b"\0" * 20))
    assert _mirred_target(attribute(1, other) + attribute(2, mirred)) == 7
    assert _mirred_target(attribute(1, other)) is None
    assert _mirred_target(None) is None
    rate, ceil = struct.pack("=BBHhHI", 0, 1, 0, 0, 0, 125_000), struct.pack("=BBHhHI", 0, 1, 0, 0, 0, 250_000)
    htb = rate + ceil + struct.pack("=IIIII", 8000, 9000, 12_500, 0, 0)
    assert _htb_parms({1: htb}) == {"rate": 125_000, "ceil": 250_000, "buffer": 8000, "cbuffer": 9000}
    assert _htb_parms({}) is None and _htb_parms(None) is None
