"""Shared fixtures. Integration tests (tests/integration) need root and build their own
network namespaces through natgwd.lab.topology; they are skipped, with the reason, elsewhere."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from natgwd.lab.topology import SEED_STATE, Lab

INTEGRATION = Path(__file__).parent / "integration"
# Every wait in the lab ends on its condition; its bound only matters on a slow moment of a
# loaded machine (natgwd.lab.topology.patience). xdist's workers inherit the environment.
os.environ.setdefault("NATGWD_LAB_PATIENCE", "3")
# Property tests check what comes out, never how fast: hypothesis's default deadline (200 ms
# an example) failed them on a loaded machine.
settings.register_profile("natgwd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("natgwd")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.root)


def _integration_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft", "curl", "ss"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "needs python3-nftables (create the venv with --system-site-packages)"
    return None


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The seed topology in fresh namespaces with unique names; removed after the test."""
    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab() as built:
        yield built


@pytest.fixture
def dual_lab() -> Iterator[Lab]:
    """The seed topology made dual-stack (Lab(ipv6=True)); removed after the test."""
    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(ipv6=True) as built:
        yield built


@pytest.fixture
def two_externals_lab() -> Iterator[Lab]:
    """The dual-stack seed with a second external network (net3 to "ext2")."""
    reason = _integration_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(ipv6=True, second_external=True) as built:
        yield built


@pytest.fixture
def seed_state() -> dict[str, Any]:
    """A deep copy of the seed's desired state, free to modify."""
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied
