"""No fail-closed caches (issue 13, scope 4): a flood evicts the flooder, never refuses everyone.

Each test runs the attack against real objects (ReplayGuard, Connections and its signaling
server on loopback, RecordStore, the DHT protocol) and checks that an honest peer still gets
through. Every one of them failed before its fix (the attack worked).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import msgpack
import pytest
from kademlia.node import Node as KadNode

from mesh.discovery import dht as dht_mod
from mesh.discovery.dht import (
    MAX_DATAGRAM,
    MAX_RECORDS_PER_KEY,
    RecordStore,
    _Protocol,
    dht_key,
    make_record,
    node_id_of,
)
from mesh.errors import SignalingError
from mesh.net import connections as conn_mod
from mesh.net.connections import ConnectionParams, Connections
from mesh.net.identity import Identity
from mesh.net.signaling import (
    Envelope,
    ReplayGuard,
    SignalingServer,
    open_envelope,
    parse_envelope,
    seal,
    send_offer,
)
from mesh.net.transport import TransportConfig, open_offer

from .memchannel import until

pytestmark = pytest.mark.badinput
ME, HONEST = Identity.generate(), Identity.generate()


def _env(sender: str, now: float) -> Envelope:
    # The guard reads only sender, nonce and time: a flood needs no signatures to test it.
    return Envelope("offer", sender, b"", ME.peer_id, os.urandom(16), now, {})


# -- the replay guard ---------------------------------------------------------------------------
def test_replay_flood_from_one_key_does_not_block_other_senders() -> None:
    guard = ReplayGuard()
    now = time.time()
    flooder = Identity.generate().peer_id
    refused = 0
    for _ in range(guard.capacity):  # ~34 offers/s for two windows, from one key
        try:
            guard.check(_env(flooder, now), now)
        except SignalingError:
            refused += 1
    assert refused > 0  # the flooder is refused once its own bucket is full
    raw = seal(HONEST, "offer", ME.peer_id, {}, now=now)
    assert open_envelope(raw, me=ME.peer_id, kind="offer", guard=guard, now=now)
    with pytest.raises(SignalingError, match="replayed"):
        open_envelope(raw, me=ME.peer_id, kind="offer", guard=guard, now=now)


def test_replay_flood_from_many_keys_evicts_the_oldest() -> None:
    guard = ReplayGuard()
    now = time.time()
    for _ in range(2 * guard.capacity):  # minted keys, one offer each
        guard.check(_env(os.urandom(8).hex(), now), now)
    assert len(guard) <= guard.capacity and guard.evicted >= guard.capacity
    raw = seal(HONEST, "offer", ME.peer_id, {}, now=now)
    assert open_envelope(raw, me=ME.peer_id, kind="offer", guard=guard, now=now)
    with pytest.raises(SignalingError, match="replayed"):
        open_envelope(raw, me=ME.peer_id, kind="offer", guard=guard, now=now)


# -- the unproven-peer table ---------------------------------------------------------------------
def _conns(**params: Any) -> Connections:
    return Connections(
        ME,
        TransportConfig(
            connect_timeout=60, handshake_timeout=60, candidate_addresses=("127.0.0.1",)
        ),
        {},
        ReplayGuard(),
        ConnectionParams(**params),
        my_endpoints=lambda: ["127.0.0.1:1"],
        my_name="me",
    )


async def test_unproven_table_flood_does_not_keep_a_real_peer_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dialed: list[str] = []

    async def failing_open_offer(identity: Any, transport: Any, pid: str, *_: Any) -> Any:
        dialed.append(pid)
        raise SignalingError("test")

    monkeypatch.setattr(conn_mod, "open_offer", failing_open_offer)
    conns = _conns(tick=0.01, backoff_base=60.0, backoff_max=60.0)
    for _ in range(conns.params.max_unproven):  # minted mDNS announcements
        conns.hint(Identity.generate().peer_id, "mdns", ["10.9.9.9:1"], "flood")
    real = HONEST.peer_id
    conns.hint(real, "mdns", ["192.168.1.5:4000"], "real")
    for _ in range(conns.params.max_unproven):  # the flood goes on
        conns.hint(Identity.generate().peer_id, "mdns", ["10.9.9.9:1"], "flood")
    assert conns.peers.get(real) is not None
    assert sum(not e.proven for e in conns.peers) <= conns.params.max_unproven
    conns.start()
    try:
        await until(lambda: real in dialed)
    finally:
        await conns.stop()


# -- handshake slots -----------------------------------------------------------------------------
async def _offer_from(
    local: str, conns: Connections, address: str, count: int, pcs: list[Any]
) -> list[bytes | BaseException]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        offers = []
        for _ in range(count):
            ident = Identity.generate()
            pending, sdp = await open_offer(ident, TransportConfig(), conns.me)
            pcs.append(pending.pc)
            offers.append(seal(ident, "offer", conns.me, {"sdp": sdp, "oid": os.urandom(16)}))
        return await asyncio.gather(
            *(send_offer(http, address, o) for o in offers), return_exceptions=True
        )


async def test_one_address_cannot_take_every_handshake_slot() -> None:
    conns = _conns(max_pending_inbound=6, max_pending_per_address=4)
    server = SignalingServer(ME, conns.on_offer, lambda: {}, conns.guard)
    await server.start("127.0.0.1")
    address = f"127.0.0.1:{server.port}"
    pcs: list[Any] = []
    try:
        flood = await _offer_from("127.0.0.1", conns, address, 6, pcs)
        assert any(isinstance(r, SignalingError) for r in flood)  # the address hit its cap
        # another address (loopback is all of 127/8) still finds a slot
        (honest,) = await _offer_from("127.0.0.2", conns, address, 1, pcs)
        assert isinstance(honest, bytes), honest
        assert parse_envelope(honest).kind == "answer"
    finally:
        await server.stop()
        await conns.stop()
        for pc in pcs:
            await pc.close()


# -- the DHT record store ----------------------------------------------------------------------
def _prov(ident: Identity, key: str, seq: int | None = None, ttl: float = 600) -> bytes:
    return msgpack.packb([make_record(ident, "prov", key, {}, ttl, seq=seq)])


def test_dht_seq_from_the_future_cannot_evict_honest_records() -> None:
    store = RecordStore()
    key = "prov:mesh:x"
    assert store.accept(dht_key(key), _prov(HONEST, key))
    for _ in range(MAX_RECORDS_PER_KEY):
        assert not store.accept(dht_key(key), _prov(Identity.generate(), key, seq=2**62))
    assert HONEST.peer_id in {r.peer_id for r in store.records(dht_key(key))}


def test_dht_key_flood_from_one_address_keeps_honest_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One address fills a key with fresh records of minted signers: it displaces its own."""
    store = RecordStore(quota=10_000)
    key = "prov:blob:y"
    assert store.accept(dht_key(key), _prov(HONEST, key), ("10.0.0.1", 4000))
    for _ in range(2 * MAX_RECORDS_PER_KEY):
        store.accept(dht_key(key), _prov(Identity.generate(), key), ("10.6.6.6", 4000))
    records = store.records(dht_key(key))
    assert len(records) == MAX_RECORDS_PER_KEY
    assert HONEST.peer_id in {r.peer_id for r in records}


def test_dht_table_fill_by_one_signer_leaves_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dht_mod, "MAX_KEYS", 128)
    store = RecordStore(quota=10_000)
    junk = Identity.generate()
    for i in range(128):  # 24 h junk under keys nobody asks for
        store.accept(dht_key(f"prov:junk{i}"), _prov(junk, f"prov:junk{i}", ttl=86000))
    assert store.accept(dht_key("prov:real"), _prov(HONEST, "prov:real"))


def test_dht_quota_is_keyed_by_address_not_port() -> None:
    store = RecordStore(quota=5)
    key = "prov:z"
    for port in range(6):  # a new source port per datagram
        store.accept(dht_key(key), _prov(Identity.generate(), key), ("10.6.6.6", 5000 + port))
    assert store.is_banned(("10.6.6.6", 1))
    assert not store.is_banned(("10.0.0.1", 5000))


def _protocol() -> _Protocol:
    return _Protocol(KadNode(node_id_of(ME.peer_id)), RecordStore(), 20, ME)


def test_spoofed_oversized_datagram_bans_nobody() -> None:
    proto = _protocol()
    proto.datagram_received(b"\0" * (MAX_DATAGRAM + 1), ("10.0.0.7", 4000))
    assert not proto.storage.is_banned(("10.0.0.7", 4000))


async def test_unverified_sender_gets_no_stores_reflected(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = _protocol()
    stored: list[Any] = []
    pinged: list[Any] = []

    async def call_store(node: Any, key: bytes, value: bytes) -> Any:
        stored.append(node)
        return (True, True)

    async def ping(address: Any, nodeid: bytes) -> Any:
        pinged.append(address)
        return (False, None)  # the claimed address never asked: it does not answer

    monkeypatch.setattr(proto, "call_store", call_store)
    monkeypatch.setattr(proto, "ping", ping)
    for i in range(4):
        key = f"prov:k{i}"
        proto.storage.accept(dht_key(key), _prov(HONEST, key))
    victim = ("10.0.0.9", 4000)
    key = "prov:spoof"
    value = _prov(Identity.generate(), key)
    assert proto.rpc_store(victim, node_id_of(HONEST.peer_id), dht_key(key), value)
    proto.rpc_find_node(victim, node_id_of(Identity.generate().peer_id), dht_key(key))
    await until(lambda: bool(stored or pinged))
    assert stored == []  # nothing was sent to an address that never answered
    assert not proto.router.find_neighbors(KadNode(dht_key(key)))


# -- MQTT absence --------------------------------------------------------------------------------
def _mqtt(ident: Identity, key: bytes | None, absent: list[str]) -> Any:
    from mesh.discovery.mqtt import MqttConfig, MqttSignaling

    async def on_offer(env: Any) -> bytes:
        return b""

    return MqttSignaling(
        ident,
        MqttConfig(url="mqtt://127.0.0.1:1", mesh="m", mesh_key=key),
        on_offer=on_offer,
        on_presence=lambda pid, body: None,
        on_absence=absent.append,
        presence_body=dict,
        guard=ReplayGuard(),
    )


@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_unsigned_mqtt_absence_marks_nobody_absent(key: bytes | None) -> None:
    absent: list[str] = []
    me = _mqtt(ME, key, absent)
    me._handle_presence(HONEST.peer_id, b"")  # anyone on the broker can publish this
    assert absent == []


def test_signed_mqtt_absence_of_the_current_session_only() -> None:
    key = b"k" * 32
    absent: list[str] = []
    me, peer = _mqtt(ME, key, absent), _mqtt(HONEST, key, [])
    peer.new_session()
    old_will = peer.absence_payload()  # captured from an earlier session
    peer.new_session()
    me._handle_presence(HONEST.peer_id, peer.presence_payload())
    with pytest.raises(SignalingError, match="session"):
        me._handle_presence(HONEST.peer_id, old_will)
    assert absent == []
    me._handle_presence(HONEST.peer_id, peer.absence_payload())  # its will, or its goodbye
    assert absent == [HONEST.peer_id]


def test_accounting_tables_stay_bounded_under_fresh_zones_and_peers() -> None:
    """A peer that names a new zone at every net_info (and serves one chunk read after each)
    grew ``by_zone_pair`` by a key each time, for good; free identities grew the per-peer
    tables. Past MAX_ACCOUNTED keys the rest is counted under OTHER: the totals still hold."""
    from mesh.net import view as view_mod

    acc = view_mod.Accounting()
    for i in range(3 * view_mod.MAX_ACCOUNTED):
        acc.record(f"peer{i}", "me", f"zone{i}", "home", 10, "fetch")
    out = acc.as_dict()
    for table in ("by_source", "by_zone_pair"):
        assert len(out[table]) == view_mod.MAX_ACCOUNTED, table
        assert sum(out[table].values()) == out["total_bytes"] == 30 * view_mod.MAX_ACCOUNTED
    assert out["by_source"][view_mod.OTHER] == 10 * (2 * view_mod.MAX_ACCOUNTED + 1)


def test_the_net_view_forgets_peers_no_longer_linked_past_its_bound() -> None:
    from mesh.net import view as view_mod

    net = object.__new__(view_mod.NetView)
    net.peers = {}
    for i in range(view_mod.MAX_VIEWED + 500):
        net.peers[f"p{i}"] = view_mod.PeerNet(updated=float(i))
    linked = {"p0", "p1", f"p{view_mod.MAX_VIEWED + 499}"}  # the oldest two still linked
    net._forget_gone(linked)
    assert len(net.peers) == view_mod.MAX_VIEWED
    assert linked <= set(net.peers)
    assert "p2" not in net.peers and f"p{view_mod.MAX_VIEWED + 498}" in net.peers


class _Sent:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def sendto(self, data: bytes, address: Any) -> None:
        self.sent.append(address)


async def _delivered(proto: _Protocol, honest: Identity, address: Any) -> bool:
    """Whether ``honest``'s answer to our ping, from ``address``, reaches us."""
    from mesh.discovery.dhtwire import RESPONSE, node_id_of_key, seal_datagram

    fut = proto.ping(address, proto.source_node.id)
    msg_id = list(proto._calls)[-1]
    answer = seal_datagram(honest, RESPONSE, msg_id, node_id_of_key(honest.public_key))
    proto.datagram_received(answer, address)
    return bool((await asyncio.wait_for(fut, 5))[0])


async def test_a_replayed_or_spoofed_store_flood_bans_no_honest_address() -> None:
    """Before: one captured store datagram, sent again 257 times with an honest contact's
    address as its UDP source, got that address banned for 5 minutes, and the honest
    contact's answers were dropped. Now a request is good once (its id carries its time):
    replays and stale requests are ignored; and a member's own fresh flood in another's
    name bans the member's key, not the address it claimed."""
    from mesh.discovery.dhtwire import REQUEST, node_id_of_key, request_id, seal_datagram

    member, honest = Identity.generate(), Identity.generate()
    proto = _protocol()
    proto.transport = _Sent()
    store = proto.storage
    assert isinstance(store, RecordStore)
    honest_ip = ("192.0.2.7", 4001)

    def store_datagram(msg_id: bytes) -> bytes:
        args = [node_id_of_key(member.public_key), os.urandom(20), b"junk"]
        return seal_datagram(member, REQUEST, msg_id, ["store", args])

    captured = store_datagram(request_id())
    for _ in range(store.quota + 1):
        proto.datagram_received(captured, honest_ip)
    stale = store_datagram(request_id(time.time() - 120))
    proto.datagram_received(stale, honest_ip)
    for _ in range(20):
        await asyncio.sleep(0)
    assert proto.replayed == store.quota + 1  # every copy after the first, and the stale one
    assert not store.is_banned(honest_ip)
    assert await _delivered(proto, honest, honest_ip)

    for _ in range(store.quota + 1):  # fresh, each a new request: the member's own flood
        proto.datagram_received(store_datagram(request_id()), honest_ip)
    for _ in range(50):
        await asyncio.sleep(0)
    assert store.is_banned(member.peer_id) and not store.is_banned(honest_ip)
    assert await _delivered(proto, honest, honest_ip)


async def test_per_object_locks_go_with_their_last_user() -> None:
    """ObjectService and the shard pulls kept an asyncio.Lock for every object id or shard
    hash any peer ever named, for good. A key's lock now lives only while used."""
    from mesh.storage.locks import KeyedLocks

    locks = KeyedLocks()
    order: list[str] = []
    gate = asyncio.Event()

    async def user(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(name)
            await gate.wait()

    tasks = [asyncio.create_task(user("a", "a1")), asyncio.create_task(user("a", "a2"))]
    tasks.append(asyncio.create_task(user("b", "b1")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["a1", "b1"] and len(locks) == 2  # a2 waits on a1's lock
    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "a2"] and len(locks) == 0
    for i in range(1000):  # a peer naming 1000 ids, one after another
        async with locks.hold(f"id{i}"):
            pass
    assert len(locks) == 0


async def test_one_address_rotating_keys_is_rate_limited_but_never_banned() -> None:
    """Where keys are free (no gate), a quota per key alone let one address store without
    limit under fresh keys: its stores past the quota are dropped, and the address (which
    may be spoofed) is not banned."""
    from mesh.discovery.dhtwire import REQUEST, node_id_of_key, request_id, seal_datagram

    proto = _protocol()
    proto.transport = _Sent()
    store = proto.storage
    assert isinstance(store, RecordStore)
    address = ("192.0.2.9", 4002)
    for i in range(store.quota + 50):
        minted = Identity.generate()
        key = f"prov:flood{i}"
        record = make_record(minted, "prov", key, {}, 60)
        args = [node_id_of_key(minted.public_key), dht_key(key), msgpack.packb([record])]
        proto.datagram_received(
            seal_datagram(minted, REQUEST, request_id(), ["store", args]), address
        )
    for _ in range(store.quota + 100):
        await asyncio.sleep(0)
    assert len(store._data) == store.quota and store.refused >= 50
    assert not store.is_banned(address) and not store.banned


async def test_the_replay_window_cannot_be_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of fresh pings used to push remembered ids out while still good for a
    replay; when the window is full of live ids, new requests are dropped instead."""
    from mesh.discovery import dhtwire
    from mesh.discovery.dhtwire import request_id

    monkeypatch.setattr(dhtwire, "MAX_SEEN", 8)
    proto = _protocol()
    first = request_id()
    assert proto._fresh(first)
    assert all(proto._fresh(request_id()) for _ in range(7))
    assert not proto._fresh(request_id())  # full of live ids: dropped, nothing evicted
    assert not proto._fresh(first)  # still remembered: a replay of it is refused


def test_a_datagram_of_the_previous_version_is_refused_as_such() -> None:
    from mesh.discovery.dhtwire import REQUEST, open_datagram, seal_datagram
    from mesh.errors import DiscoveryError

    raw = seal_datagram(ME, REQUEST, os.urandom(20), ["ping", [b"x" * 20]])
    with pytest.raises(DiscoveryError, match="not a signed DHT datagram"):
        open_datagram(b"\x02" + raw[1:], MAX_DATAGRAM)  # version 2: random, timeless ids
