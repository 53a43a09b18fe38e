"""A member that abuses the copies channel (mesh/net/copies.py), as a real node process.

The flooder runs tests/fixtures/copyflood_node.py: the real node, which on each of its links
also writes to the spare channel what no honest sender does. The victim holds at most
``MAX_AHEAD`` copies for that link and counts the rest as dropped; garbage numbered as the
next frames is that peer's bad frame: its link closes with a protocol error, and no other
link notices.
"""

from __future__ import annotations

import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for
from mesh.net.copies import MAX_AHEAD
from tests.fixtures.copyflood_node import BIG, FAR, NEAR, TINY

pytestmark = pytest.mark.network
FLOOD = "tests.fixtures.copyflood_node"


async def _copies_of(mesh: LocalMesh, node: NodeProcess, peer: str) -> dict | None:
    for p in await mesh.get(node, "/v1/peers"):
        if p["peer_id"] == peer and p["state"] == "connected":
            return p.get("copies")
    return None


async def test_a_flood_of_copies_is_dropped_and_held_within_the_bound(local_mesh):
    v = await local_mesh.start_node("v")
    h = await local_mesh.start_node("h")
    x = await local_mesh.start_node("x", module=FLOOD)
    await local_mesh.wait_connected(40)
    await x.wait_logged("copy flood sent to", timeout=30)
    flood = FAR + (NEAR - MAX_AHEAD) + TINY + BIG  # every copy but the 64 it may hold

    async def counted() -> dict | None:
        c = await _copies_of(local_mesh, v, x.peer_id)
        # (the spare channel never retransmits: a copy lost on loopback is not counted)
        return c if c is not None and c["dropped"] >= 0.9 * flood else None

    copies = await wait_for(counted, 30, "the flood to be counted")
    assert copies["held"] == MAX_AHEAD, copies
    assert copies["dropped"] <= flood
    # The links carry on: the flooder's own frames, and the honest peer's link untouched.
    assert {h.peer_id, x.peer_id} <= await local_mesh.connected_ids(v)
    honest = await _copies_of(local_mesh, v, h.peer_id)
    assert honest is not None and honest["dropped"] == 0 and honest["held"] == 0
    await local_mesh.get(v, "/v1/info")


async def test_garbage_copied_as_the_next_frames_closes_only_that_link(local_mesh):
    v = await local_mesh.start_node("v")
    h = await local_mesh.start_node("h")
    await local_mesh.wait_connected(40)
    local_mesh.env = {"COPYFLOOD": "inject"}
    x = await local_mesh.start_node("x", module=FLOOD)
    await x.wait_logged("copy flood: injected garbage", timeout=40)
    await v.wait_logged(f"link to {x.peer_id[:12]} closed: protocol error", timeout=30)
    assert "failed on a message" not in v.log_text()  # refused as bad input, not a crash
    assert h.peer_id in await local_mesh.connected_ids(v)

    # The flooder redials at once; for the penalty (5 s, doubling) it is refused before any
    # WebRTC work, rather than relinked and broken four times a second.
    async def refused() -> dict | None:
        info = await local_mesh.get(v, "/v1/info")
        return info if info["counters"].get("shunned_refused", 0) >= 1 else None

    info = await wait_for(refused, 30, "the flooder's redial to be refused")
    assert info["peer_id"] == v.peer_id
    entry = next(p for p in await local_mesh.get(v, "/v1/peers?all=1") if p["peer_id"] == x.peer_id)
    assert entry["protocol_errors"] >= 1 and entry["refused_for_s"] > 0, entry
    links = v.log_text().count(f"connected to {x.peer_id[:12]}")
    assert links <= entry["protocol_errors"] + 1, (links, entry)
