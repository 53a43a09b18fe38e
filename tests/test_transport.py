"""Real aiortc connections in one process: the handshake against a DTLS-terminating relay."""

import asyncio

import aioice.ice
from aiortc import RTCPeerConnection, RTCSessionDescription

from mesh.errors import Error, HandshakeError
from mesh.net.identity import Identity
from mesh.net.rpc import Reply
from mesh.net.transport import (
    CHANNEL_LABEL,
    TransportConfig,
    accept_offer,
    complete_offer,
    open_offer,
    peer_connection,
)

LOOPBACK = ("127.0.0.1",)
CFG = TransportConfig(handshake_timeout=5, connect_timeout=10, candidate_addresses=LOOPBACK)


async def echo(ctx, params, payload):
    return Reply({"n": len(payload)}, payload)


async def test_direct_connection_and_rpc():
    a, b = Identity.generate(), Identity.generate()
    pa, offer = await open_offer(a, CFG, b.peer_id)
    assert "127.0.0.1" in offer
    pb, answer = await accept_offer(b, CFG, offer, a.peer_id)
    await complete_offer(pa, answer)
    la, lb = await asyncio.gather(pa.establish({"echo": echo}), pb.establish({"echo": echo}))
    assert la.peer_id == b.peer_id and lb.peer_id == a.peer_id
    reply = await la.call("echo", {}, b"z" * 200_000)
    assert reply.payload == b"z" * 200_000
    la.close("done")
    await asyncio.wait_for(lb.closed.wait(), 10)


async def test_dtls_relay_is_caught_by_the_handshake():
    """A relay terminates DTLS on both sides and forwards every data channel message
    unchanged: both ends must refuse, and no RPC may pass."""
    a, b = Identity.generate(), Identity.generate()
    pa, offer_a = await open_offer(a, CFG, b.peer_id)

    m1 = peer_connection(CFG)  # faces A, pretends to be B
    m2 = peer_connection(CFG)  # faces B, pretends to be A
    ch2 = m2.createDataChannel(CHANNEL_LABEL, ordered=True)
    ch1_ready: asyncio.Future = asyncio.get_running_loop().create_future()
    relayed = {"a->b": 0, "b->a": 0}

    @m1.on("datachannel")
    def _on_dc(ch1):
        ch1_ready.set_result(ch1)

        @ch1.on("message")
        def _fwd(data):
            relayed["a->b"] += 1
            ch2.send(data)

    @ch2.on("message")
    async def _back(data):
        ch1 = await ch1_ready
        relayed["b->a"] += 1
        ch1.send(data)

    await m1.setRemoteDescription(RTCSessionDescription(offer_a, "offer"))
    await m1.setLocalDescription(await m1.createAnswer())
    await m2.setLocalDescription(await m2.createOffer())
    pb, answer_b = await accept_offer(b, CFG, m2.localDescription.sdp, a.peer_id)
    await m2.setRemoteDescription(RTCSessionDescription(answer_b, "answer"))
    await complete_offer(pa, m1.localDescription.sdp)

    served = []

    async def spy(ctx, params, payload):
        served.append(payload)
        return {}

    results = await asyncio.gather(
        pa.establish({"echo": spy}), pb.establish({"echo": spy}), return_exceptions=True
    )
    try:
        assert all(isinstance(r, Error) for r in results), results
        assert any(isinstance(r, HandshakeError) and "DTLS fingerprints" in str(r) for r in results)
        assert relayed["a->b"] >= 1 and relayed["b->a"] >= 1  # the relay really relayed
        assert served == []
    finally:
        await m1.close()
        await m2.close()


async def test_connecting_to_the_wrong_peer_fails():
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    pa, offer = await open_offer(a, CFG, c.peer_id)  # A thinks it dials C
    pb, answer = await accept_offer(b, CFG, offer, a.peer_id)
    await complete_offer(pa, answer)
    ra, rb = await asyncio.gather(pa.establish({}), pb.establish({}), return_exceptions=True)
    assert isinstance(ra, HandshakeError) and "expected peer" in str(ra)
    assert isinstance(rb, Error)


def host_candidates(sdp: str) -> set[str]:
    """Host candidate addresses of an SDP (``a=candidate:F C udp P ADDRESS PORT typ host``)."""
    return {
        line.split()[4]
        for line in sdp.splitlines()
        if line.startswith("a=candidate:") and " typ host" in line
    }


async def test_candidate_addresses_belong_to_their_config():
    """Two configs in one process gather on their own addresses, even at the same time, and an
    aiortc connection that is not ours keeps aioice's default (which leaves loopback out)."""
    a, b = Identity.generate(), Identity.generate()
    other = TransportConfig(candidate_addresses=("127.0.0.2",))
    (pa, offer_a), (pb, offer_b) = await asyncio.gather(
        open_offer(a, CFG, b.peer_id), open_offer(b, other, a.peer_id)
    )
    plain = RTCPeerConnection(TransportConfig().rtc_configuration())
    try:
        plain.createDataChannel(CHANNEL_LABEL)
        await plain.setLocalDescription(await plain.createOffer())
        assert host_candidates(offer_a) == {"127.0.0.1"}
        assert host_candidates(offer_b) == {"127.0.0.2"}
        assert not host_candidates(plain.localDescription.sdp) & {"127.0.0.1", "127.0.0.2"}
        assert aioice.ice.get_host_addresses.__module__ == "aioice.ice"  # nothing patched
    finally:
        for pc in (pa.pc, pb.pc, plain):
            await pc.close()
