"""Attacks through the broker and the DHT, against real node processes."""

import asyncio
from typing import Any

import aiomqtt
import msgpack
import pytest
from kademlia.node import Node as KadNode

from mesh.discovery.dht import MeshDHT, RecordStore, _Protocol, dht_key, make_record, node_id_of
from mesh.launch.localmesh import wait_for
from mesh.net.identity import Identity
from mesh.net.signaling import parse_envelope, seal
from mesh.net.transport import (
    TransportConfig,
    complete_offer,
    open_offer,
)
from mesh.trust.policy import load_policy

pytestmark = pytest.mark.network


async def counters(mesh, node):
    return (await mesh.get(node, "/v1/info"))["counters"]


async def test_broker_replay_foreign_key_and_altered_sdp_never_connect(local_mesh, broker):
    b = await local_mesh.start_node("b", ["--no-mdns", "--mqtt", broker.url, "--mesh", "m"])
    # v is a member (its offers and hello carry its certificate); x is any key.
    local_mesh.provision(local_mesh.base_dir / "v")
    v, x = Identity.load_or_create(local_mesh.base_dir / "v"), Identity.generate()
    v_policy = load_policy(local_mesh.base_dir / "v")
    cfg = TransportConfig(
        connect_timeout=10, handshake_timeout=5, candidate_addresses=("127.0.0.1",)
    )
    host, port = broker.url.removeprefix("mqtt://").split(":")
    inbox_b = f"edgemesh/v1/m/inbox/{b.peer_id}"

    async def make_offer():
        pending, sdp = await open_offer(v, cfg, b.peer_id, v_policy)
        oid = b"o" * 8 + bytes(8)
        body = {"sdp": sdp, "oid": oid, "addrs": [], "cert": v_policy.credential}
        return pending, seal(v, "offer", b.peer_id, body)

    async with aiomqtt.Client(host, int(port)) as client:
        await client.subscribe(f"edgemesh/v1/m/inbox/{v.peer_id}", qos=1)
        # 1) a genuine offer through the broker connects: the control
        pending, offer = await make_offer()
        await client.publish(inbox_b, offer, qos=1)
        async with asyncio.timeout(15):
            async for message in client.messages:
                answer = parse_envelope(message.payload)
                break
        await complete_offer(pending, answer.body["sdp"])
        link = await pending.establish({})
        assert link.peer_id == b.peer_id

        async def b_sees_v(state):
            peers = {p["peer_id"]: p["state"] for p in await local_mesh.get(b, "/v1/peers")}
            return (peers.get(v.peer_id) == "connected") == state

        await wait_for(lambda: b_sees_v(True), 10, "b to list v")
        link.close("test done")
        await wait_for(lambda: b_sees_v(False), 10, "b to drop v")
        before = (await counters(local_mesh, b))["mqtt_rejected"]

        # 2) the same offer replayed
        await client.publish(inbox_b, offer, qos=1)
        # 3) an offer re-signed by a different key, still claiming to come from v
        _, fresh = await make_offer()
        fields = msgpack.unpackb(fresh)
        fields[3] = x.public_key
        fields[8] = x.sign(b"edgemesh/signal/v1\x00" + msgpack.packb(fields[:8]))
        await client.publish(inbox_b, msgpack.packb(fields), qos=1)
        # 4) v's signed offer with the DTLS fingerprint altered in transit
        _, fresh = await make_offer()
        fields = msgpack.unpackb(fresh)
        sdp = fields[7]["sdp"]
        start = sdp.index("a=fingerprint:sha-256 ") + len("a=fingerprint:sha-256 ")
        fields[7]["sdp"] = (
            sdp[:start] + ("00" if sdp[start : start + 2] != "00" else "11") + sdp[start + 2 :]
        )
        await client.publish(inbox_b, msgpack.packb(fields), qos=1)

        async def all_refused():
            return (await counters(local_mesh, b))["mqtt_rejected"] >= before + 3

        await wait_for(all_refused, 15, "b to refuse the three forged offers")
        await b.wait_logged("replayed", "not the hash of its key", "bad signature")
        assert not await b_sees_v(True)
        assert (await counters(local_mesh, b))["handshake_failures"] == 0  # nothing got that far


class SpyStore(RecordStore):
    """Serves whatever the test put in ``raw``, unvalidated."""

    def __init__(self):
        super().__init__()
        self.raw = {}

    def get(self, key, default=None):
        return self.raw.get(key, default)


class SpyProtocol(_Protocol):
    """A malicious DHT node: answers every lookup with whatever it holds, unvalidated."""

    find_value_calls = 0

    def rpc_find_value(self, sender, nodeid, key):
        SpyProtocol.find_value_calls += 1
        return super().rpc_find_value(sender, nodeid, key)


class SpyServer(MeshDHT):
    protocol_class = SpyProtocol


async def test_dht_refuses_forged_expired_oversized_and_cuts_off_flooders(local_mesh):
    n = await local_mesh.start_node(
        "n", ["--no-mdns", "--dht-port", "0", "--dht-quota", "20", "--signaling", "127.0.0.1:0"]
    )
    host, port = n.ready["dht"].split(":")
    local_mesh.provision(local_mesh.base_dir / "spy")  # a member: DHT nodes answer members
    attacker = SpyServer(
        Identity.load_or_create(local_mesh.base_dir / "spy"),
        SpyStore(),
        gate=load_policy(local_mesh.base_dir / "spy"),
    )
    await attacker.listen(0, interface="127.0.0.1")
    try:
        await attacker.bootstrap([(host, int(port))])
        (target,) = attacker.protocol.router.find_neighbors(attacker.node)
        victim, mallory = Identity.generate(), Identity.generate()
        vkey = f"peer:{victim.peer_id}"

        genuine = make_record(victim, "peer", vkey, {"addrs": ["127.0.0.1:1"]}, 600)
        fields = msgpack.unpackb(genuine)
        fields[7] = {"addrs": ["6.6.6.6:666"]}  # valid shape, signature no longer matches
        forged = msgpack.packb(fields)
        expired = make_record(victim, "peer", vkey, {}, 10, now=1_000_000.0)
        oversized = make_record(mallory, "peer", f"peer:{mallory.peer_id}", {}, 600)
        fields = msgpack.unpackb(oversized)
        fields[7] = {"pad": "x" * 3000}
        oversized = msgpack.packb(fields)

        before = (await counters(local_mesh, n))["dht_refused"]
        for key, raw in ((vkey, forged), (vkey, expired), (f"peer:{mallory.peer_id}", oversized)):
            ok, answer = await attacker.protocol.call_store(
                target, dht_key(key), msgpack.packb([raw])
            )
            assert ok and answer is False  # the node answered, and refused
        assert (await counters(local_mesh, n))["dht_refused"] >= before + 3

        # ignored on get: the attacker serves the forged record for the victim's key
        attacker.store.raw[dht_key(vkey)] = msgpack.packb([forged])
        async with local_mesh._http.get(f"{n.api}/v1/dht/peer/{victim.peer_id}") as resp:
            assert resp.status == 404
        assert SpyProtocol.find_value_calls >= 1  # the node did ask the attacker

        # a flood beyond the quota (20 stores a minute, 3 used above) cuts the sender off
        answers = []
        for i in range(30):
            raw = make_record(mallory, "prov", f"prov:spam:{i}", {}, 600)
            ok, answer = await attacker.protocol.call_store(
                target, dht_key(f"prov:spam:{i}"), msgpack.packb([raw])
            )
            answers.append(answer if ok else "no reply")
            if not ok:
                break
        # The quota is per IP: the test mesh's own nodes on 127.0.0.1 share it (their
        # republished records count), so the cut may come a few stores before the 18th.
        assert False in answers, answers
        cut = answers.index(False)  # the store over quota is refused, and the sender banned
        assert 10 <= cut <= 17 and answers[:cut] == [True] * cut, answers
        assert answers[cut + 1] == "no reply"  # from then on the node ignores it entirely
        ok, _ = await attacker.protocol.ping((host, int(port)), attacker.node.id)
        assert ok is False
    finally:
        attacker.stop()


async def _dht_client(
    identity: Identity, node_id: bytes | None = None, gate: Any = None
) -> MeshDHT:
    client = MeshDHT(identity, gate=gate) if gate is not None else MeshDHT(identity)
    if node_id is not None:
        client.node = KadNode(node_id)  # an id of its choosing, not the one its key gives
    await client.listen(0, interface="127.0.0.1")
    return client


async def _member_client(local_mesh, name: str, node_id: bytes | None = None) -> MeshDHT:
    local_mesh.provision(local_mesh.base_dir / name)
    identity = Identity.load_or_create(local_mesh.base_dir / name)
    return await _dht_client(identity, node_id, gate=load_policy(local_mesh.base_dir / name))


async def test_dht_contact_ids_are_bound_to_their_keys(local_mesh):
    n = await local_mesh.start_node(
        "n", ["--no-mdns", "--dht-port", "0", "--signaling", "127.0.0.1:0"]
    )
    host, port = n.ready["dht"].split(":")
    address = (host, int(port))
    target = dht_key(f"peer:{Identity.generate().peer_id}")  # the key to eclipse
    chosen = (int.from_bytes(target, "big") ^ 1).to_bytes(20, "big")  # the closest id to it
    # All three are members: the sybil's datagrams fail on the id alone.
    sybil = await _member_client(local_mesh, "sybil", chosen)
    honest = await _member_client(local_mesh, "honest")
    observer = await _member_client(local_mesh, "observer")
    try:
        await sybil.bootstrap([address])  # n hears (and pings back) an id the sybil chose
        await honest.bootstrap([address])
        await observer.bootstrap([address])
        n_node = KadNode(node_id_of(n.peer_id), host, int(port))

        async def n_lists_the_honest_client() -> set[bytes] | None:
            ok, found = await observer.protocol.call_find_node(n_node, KadNode(target))
            ids = {bytes(t[0]) for t in found} if ok and isinstance(found, list) else set()
            return ids if honest.node.id in ids else None

        ids = await wait_for(n_lists_the_honest_client, 15, "n to list the honest contact")
        assert chosen not in ids  # the sybil never entered n's routing table
        assert (await counters(local_mesh, n))["dht_ignored"] >= 1  # its datagrams were ignored
    finally:
        for client in (sybil, honest, observer):
            client.stop()


async def test_non_members_get_no_answer_from_the_dht(local_mesh):
    n = await local_mesh.start_node(
        "n", ["--no-mdns", "--dht-port", "0", "--signaling", "127.0.0.1:0"]
    )
    host, port = n.ready["dht"].split(":")
    n_node = KadNode(node_id_of(n.peer_id), host, int(port))
    stranger = await _dht_client(Identity.generate())  # a valid key, no member certificate
    try:
        key = f"prov:obj:{'ab' * 32}"
        raw = make_record(stranger.identity, "prov", key, {"d": True}, 600)
        ok, _ = await stranger.protocol.call_store(n_node, dht_key(key), msgpack.packb([raw]))
        assert not ok  # no answer: its datagrams are ignored, nothing is stored
        ok, _ = await stranger.protocol.call_find_node(n_node, KadNode(dht_key(key)))
        assert not ok
        counted = await counters(local_mesh, n)
        assert counted["not_member_from_dht_datagram"] >= 2
        assert counted["not_member_missing"] >= 1
        # A member (same code, a certificate of the mesh) is answered.
        member = await _member_client(local_mesh, "m")
        try:
            raw = make_record(member.identity, "prov", key, {"d": True}, 600)
            value = msgpack.packb([raw])
            ok, stored = await member.protocol.call_store(n_node, dht_key(key), value)
            assert ok and stored is True
        finally:
            member.stop()
    finally:
        stranger.stop()
