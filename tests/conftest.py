from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import settings

from mesh.launch.localmesh import LocalBroker as Broker
from mesh.launch.localmesh import LocalMesh
from mesh.launch.natlab import NatLab, lab_unavailable

# `make test` (and CI) fuzz with the same examples every run: a landing must not hang on a
# random draw. `pytest -m badinput --hypothesis-profile=explore` draws new ones; a failure it
# finds goes into tests/corpus/ and gets fixed.
settings.register_profile("default", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("default")


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


@pytest.fixture
async def natlab(tmp_path: Path) -> AsyncIterator[NatLab]:
    """The NAT lab (mesh/launch/natlab.py): a wan with mosquitto and coturn; the test adds
    homes behind NAT routers and starts nodes in them. Torn down after the test, failed or
    not. Skipped, with the reason, where it cannot run (not root, no iptables, no coturn)."""
    reason = lab_unavailable()
    if reason is None and shutil.which("turnserver") is None:
        reason = "the NAT lab needs coturn (make apt)"
    if reason is not None:
        pytest.skip(reason)
    async with NatLab(tmp_path / "lab") as lab:
        yield lab
