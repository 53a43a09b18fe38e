"""A member that sends values nested deeper than Python can print, as a real node process.

The attacker runs tests/fixtures/deepwire_node.py: the real node, whose hello in every
handshake is ``{"t": [[[...]]]}``, or which answers ``net.net_info`` with an ``err`` whose
code is 1020 nested lists. Such a hello used to raise RecursionError in the victim, which then
left the connection open (every inbound attempt leaked one); such a reply killed the victim's
NetView loop. Now the victim refuses both as wire errors: it closes the connection or that
link, and links with honest peers as before. The same attacks in one process:
tests/test_wire_depth.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for

pytestmark = pytest.mark.network
DEEP = "tests.fixtures.deepwire_node"
SOLO = ["--no-mdns"]  # who dials whom is the test's choice


async def _counters(mesh: LocalMesh, node: NodeProcess) -> dict[str, Any]:
    return dict((await mesh.get(node, "/v1/info"))["counters"])


@pytest.mark.parametrize("victim_dials", [False, True], ids=["inbound", "outbound"])
async def test_a_deep_hello_is_refused_and_its_connection_closed(
    local_mesh: LocalMesh, victim_dials: bool
) -> None:
    mesh = local_mesh
    mesh.env = {"DEEPWIRE": "hello"}  # (read by the attacker only)
    if victim_dials:
        x = await mesh.start_node("x", SOLO, module=DEEP)
        v = await mesh.start_node("v", [*SOLO, "--peer", x.signaling])
    else:
        v = await mesh.start_node("v", SOLO)
        x = await mesh.start_node("x", [*SOLO, "--peer", v.signaling], module=DEEP)
    role = "answerer" if victim_dials else "offerer"
    await wait_for(lambda: f"deep hello ({role}):" in x.log_text(), 40, "the deep hello")
    # the attacker saw the victim close the connection (not left open past 6 s)
    assert f"deep hello ({role}): the peer closed the connection" in x.log_text()
    await v.wait_logged("malformed handshake message", timeout=10)

    async def settled() -> dict[str, Any] | None:
        counters = await _counters(mesh, v)
        done = counters["handshakes_in_progress"] == 0 and counters["handshake_failures"] >= 1
        return counters if done else None

    await wait_for(settled, 20, "the victim to count the failure and free its slot")
    assert "RecursionError" not in v.log_text() and "unexpectedly" not in v.log_text()
    h = await mesh.start_node("h", [*SOLO, "--peer", v.signaling])
    await mesh.wait_connected(30, nodes=[v, h])
    assert x.peer_id not in await mesh.connected_ids(v)


async def test_a_deep_error_reply_closes_that_link_and_the_view_runs_on(
    local_mesh: LocalMesh,
) -> None:
    mesh = local_mesh
    v = await mesh.start_node("v", SOLO)
    mesh.env = {"DEEPWIRE": "err"}
    x = await mesh.start_node("x", [*SOLO, "--peer", v.signaling], module=DEEP)
    mesh.env = None
    await x.wait_logged("deep err sent to", timeout=40)
    await v.wait_logged(f"link to {x.peer_id[:12]} closed: protocol error", timeout=10)
    peers = await mesh.get(v, "/v1/peers?all=1")
    entry = next(p for p in peers if p["peer_id"] == x.peer_id)
    assert entry["protocol_errors"] >= 1, entry
    # The victim's NetView loop still runs: it learns the coordinate of a peer that linked
    # after the attack, from its own net_info calls and link pings (samples; the peer's
    # calls to us teach its zone only).
    h = await mesh.start_node("h", [*SOLO, "--peer", v.signaling])
    await mesh.wait_connected(30, nodes=[v, h])

    async def sampled() -> bool:
        known = (await mesh.get(v, "/v1/netcoords"))["peers"].get(h.peer_id)
        return known is not None and known["samples"] > 0

    await wait_for(sampled, 20, "the victim's view to sample the honest peer")
    assert "RecursionError" not in v.log_text()
