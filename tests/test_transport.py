"""Real WebRTC connections in one process, with each engine and mixing them: the handshake
against a DTLS-terminating relay, candidate scoping."""

import asyncio
import dataclasses
import os

import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from mesh.errors import Error, HandshakeError, TransportError
from mesh.net.identity import Identity
from mesh.net.rpc import Reply
from mesh.net.transport import (
    CHANNEL_LABEL,
    TransportConfig,
    accept_offer,
    complete_offer,
    open_offer,
    peer_connection,
    wrtc_available,
)

LOOPBACK = ("127.0.0.1",)
CFG = TransportConfig(handshake_timeout=5, connect_timeout=10, candidate_addresses=LOOPBACK)
needs_wrtc = pytest.mark.skipif(not wrtc_available(), reason="wrtc not installed")
ENGINES = ["aiortc", pytest.param("wrtc", marks=needs_wrtc)]
PAIRS = [
    pytest.param(("aiortc", "aiortc"), id="aiortc-aiortc"),
    pytest.param(("wrtc", "wrtc"), id="wrtc-wrtc", marks=needs_wrtc),
    pytest.param(("wrtc", "aiortc"), id="wrtc-aiortc", marks=needs_wrtc),
    pytest.param(("aiortc", "wrtc"), id="aiortc-wrtc", marks=needs_wrtc),
]


def cfg(engine: str) -> TransportConfig:
    return dataclasses.replace(CFG, engine=engine)


async def echo(ctx, params, payload):
    return Reply({"n": len(payload)}, payload)


@pytest.mark.parametrize("engines", PAIRS)
async def test_direct_connection_and_rpc(engines):
    a, b = Identity.generate(), Identity.generate()
    pa, offer = await open_offer(a, cfg(engines[0]), b.peer_id)
    assert "127.0.0.1" in offer
    pb, answer = await accept_offer(b, cfg(engines[1]), offer, a.peer_id)
    await complete_offer(pa, answer)
    la, lb = await asyncio.gather(pa.establish({"echo": echo}), pb.establish({"echo": echo}))
    assert la.peer_id == b.peer_id and lb.peer_id == a.peer_id
    reply = await la.call("echo", {}, b"z" * 200_000)
    assert reply.payload == b"z" * 200_000
    la.close("done")
    await asyncio.wait_for(lb.closed.wait(), 10)


@pytest.mark.parametrize("engine", ENGINES)
async def test_dtls_relay_is_caught_by_the_handshake(engine):
    """A relay terminates DTLS on both sides and forwards every data channel message
    unchanged: both ends (on ``engine``) must refuse, and no RPC may pass."""
    a, b = Identity.generate(), Identity.generate()
    pa, offer_a = await open_offer(a, cfg(engine), b.peer_id)

    m1 = peer_connection(CFG)  # faces A, pretends to be B
    m2 = peer_connection(CFG)  # faces B, pretends to be A
    ch2 = m2.createDataChannel(CHANNEL_LABEL, ordered=True)
    ch1_ready: asyncio.Future = asyncio.get_running_loop().create_future()
    ch2_open = asyncio.Event()
    ch2.on("open", ch2_open.set)
    relayed = {"a->b": 0, "b->a": 0}

    # Each leg's messages wait until the other leg's channel is open: a fast engine (wrtc)
    # sends its hello before the relay's second leg has opened.
    @m1.on("datachannel")
    def _on_dc(ch1):
        ch1_ready.set_result(ch1)

        @ch1.on("message")
        async def _fwd(data):
            await ch2_open.wait()
            if ch2.readyState == "open":
                relayed["a->b"] += 1
                ch2.send(data)

    @ch2.on("message")
    async def _back(data):
        ch1 = await ch1_ready
        if ch1.readyState == "open":
            relayed["b->a"] += 1
            ch1.send(data)

    await m1.setRemoteDescription(RTCSessionDescription(offer_a, "offer"))
    await m1.setLocalDescription(await m1.createAnswer())
    await m2.setLocalDescription(await m2.createOffer())
    pb, answer_b = await accept_offer(b, cfg(engine), m2.localDescription.sdp, a.peer_id)
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


@pytest.mark.parametrize("engines", PAIRS)
async def test_connecting_to_the_wrong_peer_fails(engines):
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    pa, offer = await open_offer(a, cfg(engines[0]), c.peer_id)  # A thinks it dials C
    pb, answer = await accept_offer(b, cfg(engines[1]), offer, a.peer_id)
    await complete_offer(pa, answer)
    ra, rb = await asyncio.gather(pa.establish({}), pb.establish({}), return_exceptions=True)
    assert isinstance(ra, HandshakeError) and "expected peer" in str(ra)
    assert isinstance(rb, Error)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_connection_closed_before_its_handshake_is_not_a_failed_proof(engine):
    # The peer gave this dial up (a simultaneous dial, a superseding offer) just as the channel
    # opened: the certificates are gone with the connection, which must not count as a peer
    # failing our handshake (that counter is what flags intruders).
    a, b = Identity.generate(), Identity.generate()
    pa, offer = await open_offer(a, cfg(engine), b.peer_id)
    pb, answer = await accept_offer(b, cfg(engine), offer, a.peer_id)
    await complete_offer(pa, answer)
    served = asyncio.ensure_future(pb.establish({}))
    await asyncio.wait_for(asyncio.shield(pa._channel_ready), 10)
    await pa.pc.close()
    with pytest.raises(TransportError):
        await pa.establish({})
    with pytest.raises(Error):
        await asyncio.wait_for(served, 20)


def host_candidates(sdp: str) -> set[str]:
    """Host candidate addresses of an SDP (``a=candidate:F C udp P ADDRESS PORT typ host``)."""
    return {
        line.split()[4]
        for line in sdp.splitlines()
        if line.startswith("a=candidate:") and " typ host" in line
    }


async def test_candidate_addresses_belong_to_their_config():
    """aiortc: two configs in one process gather on their own addresses, even at the same
    time, and an aiortc connection that is not ours keeps aioice's default (which leaves
    loopback out)."""
    a, b = Identity.generate(), Identity.generate()
    CFG = cfg("aiortc")  # noqa: N806 - aioice's gathering is what this test is about
    other = TransportConfig(candidate_addresses=("127.0.0.2",), engine="aiortc")
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


@needs_wrtc
async def test_wrtc_offers_only_the_configs_addresses():
    """wrtc gathers on every interface (loopback too, for loopback meshes): our SDP offers
    host candidates on the config's addresses only, and none on loopback by default."""
    a, b = Identity.generate(), Identity.generate()
    (pa, offer_a), (pb, offer_b) = await asyncio.gather(
        open_offer(a, cfg("wrtc"), b.peer_id),
        open_offer(b, TransportConfig(engine="wrtc"), a.peer_id),
    )
    try:
        assert host_candidates(offer_a) == {"127.0.0.1"}
        assert not host_candidates(offer_b) & {"127.0.0.1", "::1"}
        assert "tcptype active" not in offer_a + offer_b
    finally:
        for p in (pa, pb):
            await p.pc.close()


@needs_wrtc
async def test_wrtc_send_queue_cap_is_never_reached():
    """wrtc refuses a send past 16 MiB queued: 32 concurrent 1 MiB calls (echoed back, so
    both directions queue 32 MiB) only pass because every frame waits on the link's water
    marks (with them lifted, about half of these calls fail with "send queue full")."""
    a, b = Identity.generate(), Identity.generate()
    pa, offer = await open_offer(a, cfg("wrtc"), b.peer_id)
    pb, answer = await accept_offer(b, cfg("wrtc"), offer, a.peer_id)
    await complete_offer(pa, answer)
    la, lb = await asyncio.gather(pa.establish({"echo": echo}), pb.establish({"echo": echo}))
    blocks = [os.urandom(1 << 20) for _ in range(32)]  # incompressible: lz4 cannot shrink
    replies = await asyncio.gather(*(la.call("echo", {}, blk, timeout=60) for blk in blocks))
    assert [r.payload for r in replies] == blocks
    assert la.is_open and lb.is_open
    la.close("done")


@needs_wrtc
def test_wrtc_candidate_filter_keeps_the_offer_within_the_remote_cap():
    from mesh.net.engine_wrtc import MAX_OFFERED, filter_candidates
    from mesh.net.transport import MAX_CANDIDATES, check_sdp

    lines = [f"a=candidate:{i} 1 udp 1 10.0.{i}.1 {5000 + i} typ host" for i in range(40)]
    lines += ["a=candidate:99 1 tcp 1 10.0.0.1 9 typ host tcptype active"]
    lines += ["a=candidate:98 1 udp 1 127.0.0.1 7000 typ host"]
    sdp = "\r\n".join(["v=0", *lines, ""])
    out = filter_candidates(sdp, None)
    kept = [line for line in out.split("\r\n") if line.startswith("a=candidate:")]
    assert len(kept) == MAX_OFFERED <= MAX_CANDIDATES
    assert "tcptype active" not in out and "127.0.0.1" not in out
    check_sdp(out)  # what the remote side checks: accepted
    assert filter_candidates(sdp, ("10.0.3.1",)).count("a=candidate:") == 1
