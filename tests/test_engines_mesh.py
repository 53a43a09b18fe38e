"""Meshes that mix the two WebRTC engines, in real node processes on loopback: a wrtc node
and an aiortc node link (each one dialing), run RPC and move an object over the data channel
(hash-checked); and the identity binding on either engine refuses a node whose DTLS
certificate is not the one its handshake binds."""

from __future__ import annotations

import hashlib
import os

import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for
from mesh.net.transport import wrtc_available
from tests.test_storage_mesh import fetch_events, put, read_object

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not wrtc_available(), reason="wrtc not installed"),
]

MiB = 1 << 20
# Static peers only, no fast path: the dialer is the node given --peer, and bulk bytes can
# only move over the WebRTC data channel.
ALONE = ["--no-mdns", "--no-fast-path", "--signaling", "127.0.0.1:0"]


async def engine_of(mesh: LocalMesh, node: NodeProcess) -> str:
    return str((await mesh.get(node, "/v1/info"))["webrtc_engine"])


@pytest.mark.parametrize("dialer,answerer", [("wrtc", "aiortc"), ("aiortc", "wrtc")])
async def test_mixed_engines_link_call_and_move_an_object(local_mesh, dialer, answerer):
    a = await local_mesh.start_node("a", ALONE + ["--webrtc-engine", answerer])
    d = await local_mesh.start_node("d", ALONE + ["--webrtc-engine", dialer, "--peer", a.signaling])
    assert await engine_of(local_mesh, a) == answerer
    assert await engine_of(local_mesh, d) == dialer
    await local_mesh.wait_connected(timeout=20, nodes=[a, d])
    (seen_by_d,) = await local_mesh.get(d, "/v1/peers")
    (seen_by_a,) = await local_mesh.get(a, "/v1/peers")
    assert seen_by_d["offered"] is True and seen_by_a["offered"] is False  # d dialed
    assert seen_by_d["ice"]["protocol"] == "udp"

    # RPC both ways
    for me, other in ((d, a), (a, d)):
        rtt = await local_mesh.post(
            me, "/v1/bench/rtt", {"peer": other.peer_id, "size": 4096, "count": 20}
        )
        assert len(rtt["rtt_ms"]) == 20

    # an object put on one engine's node, pulled by the other's over the data channel
    data = os.urandom(12 * MiB)
    oid = await put(local_mesh, a, data, replicas=1)
    before = seen_by_d["bytes_received"]
    done = None
    async for event in fetch_events(d, oid):
        assert "error" not in event, event
        done = event.get("done", done)
    assert done is not None and done["size"] == len(data)
    assert done["sources"] == {a.peer_id: len(data)}
    got = await read_object(d, oid)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    (after,) = await local_mesh.get(d, "/v1/peers")
    assert after["bytes_received"] - before >= len(data)  # it came over the link


async def test_the_certswap_fixture_links_when_it_does_not_lie(tmp_path):
    """The control for the attack below: the same fixture, lying about nothing, links."""
    async with LocalMesh(
        tmp_path / "mesh", mdns_interface=None, env={"EDGEMESH_CERTSWAP": "honest"}
    ) as mesh:
        victim = await mesh.start_node("victim", ALONE + ["--webrtc-engine", "wrtc"])
        honest = await mesh.start_node(
            "honest",
            ALONE + ["--webrtc-engine", "wrtc", "--peer", victim.signaling],
            module="tests.fixtures.certswap_node",
        )
        await mesh.wait_connected(timeout=20, nodes=[victim, honest])


@pytest.mark.parametrize("victim_engine", ["wrtc", "aiortc"])
@pytest.mark.parametrize("mode", ["sign-other", "sdp-lies"])
async def test_a_node_whose_dtls_certificate_is_not_its_handshakes_is_refused(
    tmp_path, victim_engine, mode
):
    """The attacker (wrtc) presents one DTLS certificate and binds another in its signed
    handshake (``sign-other``), or declares another in its SDP too (``sdp-lies``): the victim
    reads the certificate from its live DTLS transport and refuses every attempt."""
    async with LocalMesh(
        tmp_path / "mesh", mdns_interface=None, env={"EDGEMESH_CERTSWAP": mode}
    ) as mesh:
        victim = await mesh.start_node("victim", ALONE + ["--webrtc-engine", victim_engine])
        evil = await mesh.start_node(
            "evil",
            ALONE + ["--webrtc-engine", "wrtc", "--peer", victim.signaling],
            module="tests.fixtures.certswap_node",
        )

        async def refused_twice() -> bool:
            counters = (await mesh.get(victim, "/v1/info"))["counters"]
            if mode == "sign-other":  # the proof does not verify: a handshake failure
                return bool(counters["handshake_failures"] >= 2)
            # a lying SDP: DTLS itself fails (the certificate is not the declared one)
            pid = evil.peer_id[:12]
            text = victim.log_text()
            failed = text.count(f"inbound connection from {pid} failed")
            return failed + text.count(f"dial {pid} failed") >= 2

        await wait_for(refused_twice, 60, "the victim to refuse the attacker twice")
        assert evil.peer_id not in await mesh.connected_ids(victim)
        assert victim.peer_id not in await mesh.connected_ids(evil)
        if mode == "sign-other":
            assert "did not sign this connection's DTLS fingerprints" in victim.log_text()
