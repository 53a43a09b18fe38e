"""Bounds of the connection manager, in one process (real aiortc for SDPs)."""

import asyncio
import os

from mesh.errors import SignalingError
from mesh.net import connections as conn_mod
from mesh.net.connections import ConnectionParams, Connections
from mesh.net.identity import Identity
from mesh.net.signaling import ReplayGuard, open_envelope, seal
from mesh.net.transport import TransportConfig, open_offer

from .memchannel import until

LOOPBACK = TransportConfig(candidate_addresses=("127.0.0.1",))


def make_conns(**params):
    me = Identity.generate()
    c = Connections(
        me,
        TransportConfig(connect_timeout=5, handshake_timeout=2, candidate_addresses=("127.0.0.1",)),
        {},
        ReplayGuard(),
        ConnectionParams(**params),
        my_endpoints=lambda: ["127.0.0.1:1"],
        my_name="me",
    )
    return me, c


async def test_concurrent_offers_cannot_overrun_the_handshake_cap():
    me, conns = make_conns(max_pending_inbound=4)
    offers = []
    pcs = []
    for _ in range(12):
        ident = Identity.generate()
        pending, sdp = await open_offer(ident, LOOPBACK, me.peer_id)
        pcs.append(pending.pc)
        raw = seal(ident, "offer", me.peer_id, {"sdp": sdp, "oid": os.urandom(16)})
        offers.append(open_envelope(raw, me=me.peer_id, kind="offer", guard=conns.guard))
    try:
        results = await asyncio.gather(*(conns.on_offer(e) for e in offers), return_exceptions=True)
        accepted = [r for r in results if isinstance(r, bytes)]
        refused = [r for r in results if isinstance(r, SignalingError)]
        assert len(accepted) == 4 and len(refused) == 8
        assert all("too many handshakes" in str(r) for r in refused)
        assert conns.counters["inbound_refused"] == 8
    finally:
        await conns.stop()
        for pc in pcs:
            await pc.close()


async def test_announcement_flood_is_bounded(monkeypatch):
    me, conns = make_conns(max_unproven=64, max_dials=8, tick=0.01, backoff_base=60.0)
    running = 0
    peak = 0
    release = asyncio.Event()

    async def slow_open_offer(*args):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
        raise SignalingError("test")

    monkeypatch.setattr(conn_mod, "open_offer", slow_open_offer)
    conns.start()
    try:
        for _ in range(500):
            pid = Identity.generate().peer_id
            conns.hint(pid, "mdns", ["10.9.9.9:1"], "flood")
        assert len(conns.peers) == 64
        await until(lambda: running == 8)
        await asyncio.sleep(0.1)  # give a wrongly unbounded dialer time to overshoot
        assert peak == 8
        release.set()
        await until(lambda: conns.counters["dial_failures"] >= 64)
        # failures back off: re-announcements do not reset them
        before = conns.counters["dial_failures"]
        for entry in conns.peers:
            conns.hint(entry.peer_id, "mdns", ["10.9.9.9:1"], "flood")
        await asyncio.sleep(0.1)
        assert conns.counters["dial_failures"] - before <= 8
    finally:
        await conns.stop()


async def test_untrusted_endpoints_are_filtered():
    me, conns = make_conns()
    pid = Identity.generate().peer_id
    conns.hint(pid, "mqtt", ["evil.example:80", "1.2.3.4:80/x", "1.2.3.4:80", "[::1]:9"], "x")
    assert conns.peers.get(pid).addresses == ["1.2.3.4:80", "[::1]:9"]
