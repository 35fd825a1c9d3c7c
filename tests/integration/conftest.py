"""Fixtures shared by the integration tests' modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.test_observability import Held


@pytest.fixture
def held() -> Iterator[list[Held]]:
    """Clients to close after the test, also when it fails."""
    clients: list[Held] = []
    try:
        yield clients
    finally:
        for client in clients:
            client.close()
            if client.process.poll() is None:
                client.process.kill()
