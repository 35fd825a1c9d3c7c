"""natgwd.tc's u32 keys as pyroute2 takes them (it strips leading zero bytes of a mask,
so an all-zero mask needs its own spelling), and how many ticks a burst is."""

from __future__ import annotations

from natgwd.qos_plan import FilterSpec
from natgwd.tc import _quantum, _ticks, _u32_key


def test_u32_keys() -> None:
    assert _u32_key(FilterSpec(100, 12, 0x0A7337C8, 0xFFFFFFFF, 5)) == "0x0a7337c8/0xffffffff+12"
    assert _u32_key(FilterSpec(1000, 16, 0x0A000000, 0xFF000000, 0x8001)) == "0x0a000000/0xff000000+16"
    assert _u32_key(FilterSpec(3000, 0, 0, 0, 0xFF00)) == "0x0/0x0+0"
    assert _u32_key(FilterSpec(1000, 16, 0, 0, 0x8002)) == "0x0/0x0+16"  # dst 0.0.0.0/0


def test_quantum_within_the_kernels_bounds_and_burst_ticks() -> None:
    assert _quantum(1_250) == 2_000
    assert _quantum(1_250_000) == 125_000
    assert _quantum(1_250_000_000) == 200_000
    # a burst of one second at the rate is a million microseconds of kernel ticks
    assert _ticks(1_250_000, 1_250_000) == _ticks(2_500_000, 2_500_000) > 0
