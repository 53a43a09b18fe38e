from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.localmesh import LocalBroker as Broker
from mesh.localmesh import LocalMesh


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Process-based tests are the slow ones: run them last so unit failures show first.
    items.sort(key=lambda item: item.get_closest_marker("network") is not None)


@pytest.fixture
async def local_mesh(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    """Node processes on loopback mDNS; logs are kept in tmp_path on failure."""
    async with LocalMesh(tmp_path / "mesh") as mesh:
        yield mesh


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A real mosquitto on a free loopback port, stopped after the test."""
    b = Broker(tmp_path)
    await b.start()
    yield b
    await b.stop()
