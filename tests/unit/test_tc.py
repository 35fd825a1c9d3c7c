"""natgwd.kernel.tc's HTB parameters: the quantum within the kernel's bounds, a burst in ticks."""

from __future__ import annotations

from natgwd.kernel.tc import _quantum, _ticks


def test_quantum_within_the_kernels_bounds_and_burst_ticks() -> None:
    assert _quantum(1_250) == 2_000
    assert _quantum(1_250_000) == 125_000
    assert _quantum(1_250_000_000) == 200_000
    # a burst of one second at the rate is a million microseconds of kernel ticks
    assert _ticks(1_250_000, 1_250_000) == _ticks(2_500_000, 2_500_000) > 0
