"""natgwd.runtime.memory: memory freed in the middle of the heap goes back to the system."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from natgwd.runtime.memory import release_freed_memory


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_memory_between_live_objects_is_returned() -> None:
    # 1 KiB objects come from malloc (not Python's small-object arenas); every tenth stays
    # alive, so the freed ones sit between live ones, where glibc keeps them.
    objects = [bytes(1024) + bytes([i % 256]) for i in range(100_000)]
    kept = objects[::10]
    del objects
    before = rss_kb()
    release_freed_memory()
    assert rss_kb() < before - 40_000  # of about 90 MB freed
    assert len(kept) == 10_000
