"""Bounds of the connection manager, in one process (real aiortc for SDPs)."""

import asyncio
import os

import pytest

from mesh.errors import SignalingError
from mesh.net import connections as conn_mod
from mesh.net import signaling as sig_mod
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


async def test_copies_of_one_offer_by_two_routes_get_one_answer():
    """A dialer sends one sealed copy of its offer by each route (direct, broker): copies
    arriving together or later get the first copy's answer and start no second connection;
    a replayed copy is still a replay, and another offer while one is pending replaces it."""
    me, conns = make_conns()
    ident = Identity.generate()
    pending, sdp = await open_offer(ident, LOOPBACK, me.peer_id)
    oid = os.urandom(16)
    body = {"sdp": sdp, "oid": oid}
    copies = [seal(ident, "offer", me.peer_id, body) for _ in range(3)]
    try:
        envs = [open_envelope(c, me=me.peer_id, kind="offer", guard=conns.guard) for c in copies]
        first, second = await asyncio.gather(conns.on_offer(envs[0]), conns.on_offer(envs[1]))
        assert first == second
        assert await conns.on_offer(envs[2]) == first  # a late copy too
        assert conns.handshakes_in_progress == 1  # one connection for all three
        with pytest.raises(SignalingError, match="replayed"):
            open_envelope(copies[0], me=me.peer_id, kind="offer", guard=conns.guard)
        other = seal(ident, "offer", me.peer_id, {"sdp": sdp, "oid": os.urandom(16)})
        env = open_envelope(other, me=me.peer_id, kind="offer", guard=conns.guard)
        # a new offer (the peer gave the old dial up: e.g. sent while it was offline) takes
        # the pending connection's slot instead of being refused until it times out
        assert await conns.on_offer(env) != first
        assert conns.handshakes_in_progress == 1
    finally:
        await conns.stop()
        await pending.pc.close()


async def test_an_offer_goes_by_every_route_at_once_and_the_first_answer_wins(monkeypatch):
    """A direct address that never answers (a NATed peer's private one) does not hold the
    dial: the broker's answer is used as soon as it comes, and the direct attempt is
    cancelled; when every route fails, the errors of all are reported."""
    me, conns = make_conns()
    conns.start()
    stalled = asyncio.Event()
    cancelled = asyncio.Event()

    async def never(session, address, offer):
        stalled.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def broker(pid, offer, oid):
        await stalled.wait()  # the direct attempt is under way at the same time
        return b"answer"

    entry = conns.peers.ensure("p" * 32, "mqtt")
    entry.addresses = ["192.168.9.9:4000"]
    entry.via_mqtt = True
    conns.mqtt_exchange = broker
    monkeypatch.setattr(sig_mod, "send_offer", never)
    try:
        assert await asyncio.wait_for(conns._exchange(entry, {"oid": b"x"}, b"x"), 2) == b"answer"
        assert cancelled.is_set()

        async def refused(*args):
            raise SignalingError("no answer via the broker")

        async def unreachable(session, address, offer):
            raise SignalingError(f"cannot reach {address}")

        conns.mqtt_exchange = refused
        monkeypatch.setattr(sig_mod, "send_offer", unreachable)
        with pytest.raises(SignalingError) as failed:
            await conns._exchange(entry, {"oid": b"y"}, b"y")
        assert "cannot reach 192.168.9.9:4000" in str(failed.value)
        assert "no answer via the broker" in str(failed.value)
    finally:
        await conns.stop()
