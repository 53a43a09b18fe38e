"""A member flooding a peer's storage tables and background pulls (real node processes).

The flooder runs tests/fixtures/flood_node.py: on its new link it sends provider records for
one object signed by 2,048 minted keys, then announces itself as the holder of 48 made-up
objects and asks for a replica of each, never answering for their manifests (each pull waits
on it). The victim must bound what that costs it.
"""

from __future__ import annotations

import pytest

from mesh.storage.providers import MAX_HOLDERS
from mesh.storage.service import MAX_PULLS_PER_PEER

pytestmark = pytest.mark.network

FLOOD = "tests.fixtures.flood_node"


async def test_a_member_cannot_grow_replica_pulls_or_holder_tables(local_mesh):
    a = await local_mesh.start_node("a", ["--no-mdns"])
    x = await local_mesh.start_node("x", ["--no-mdns", "--peer", a.signaling], module=FLOOD)
    await local_mesh.wait_connected(30, [a, x])
    await x.wait_logged("flood sent to", timeout=60)
    info = await local_mesh.get(a, "/v1/info")
    storage, providers = info["storage"], info["providers"]
    # The pulls x asked for (all stalled on x) and x's minted records are bounded.
    assert storage["replica_pulls"] <= MAX_PULLS_PER_PEER, storage
    assert storage["replicas_refused"] >= 48 - MAX_PULLS_PER_PEER
    assert providers["most_holders"] <= MAX_HOLDERS, providers
    assert providers["holders"] <= 48 + MAX_HOLDERS  # x's own records: one per object
    # a still serves: its API answers and the link stays up
    assert x.peer_id in await local_mesh.connected_ids(a)
