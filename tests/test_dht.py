import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node as KadNode

from mesh.discovery.dht import (
    MAX_RECORD,
    MAX_RECORDS_PER_KEY,
    MAX_VALUE,
    MeshDHT,
    RecordStore,
    dht_key,
    encode_value,
    make_record,
    merge,
    node_id_of,
    parse_record,
    parse_value,
)
from mesh.discovery.dhtwire import (
    REQUEST,
    RESPONSE,
    open_datagram,
    parse_answer,
    parse_request,
    seal_datagram,
)
from mesh.errors import DiscoveryError
from mesh.net.identity import Identity

A, B = Identity.generate(), Identity.generate()


def peer_rec(ident=A, ttl=600, seq=None, body=None, now=None):
    return make_record(
        ident,
        "peer",
        f"peer:{ident.peer_id}",
        body or {"addrs": ["1.2.3.4:5"]},
        ttl,
        seq=seq,
        now=now,
    )


def forged(raw, **changes):
    fields = msgpack.unpackb(raw)
    names = ["v", "kind", "key", "pid", "pk", "seq", "expires", "body", "sig"]
    for k, v in changes.items():
        fields[names.index(k)] = v
    return msgpack.packb(fields)


def test_valid_record():
    rec = parse_record(peer_rec())
    assert rec.peer_id == A.peer_id and rec.body == {"addrs": ["1.2.3.4:5"]}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"body": {"addrs": ["6.6.6.6:1"]}}, "bad signature"),
        ({"sig": b"\0" * 64}, "bad signature"),
        ({"pk": B.public_key}, "not the hash"),
        ({"key": f"peer:{B.peer_id}"}, "own id|bad signature"),
        ({"kind": "evil"}, "kind"),
        ({"expires": time.time() + 10 * 86400}, "future|bad signature"),
    ],
)
def test_forged_records_refused(change, match):
    with pytest.raises(DiscoveryError, match=match):
        parse_record(forged(peer_rec(), **change))


def test_expired_and_oversized_refused():
    with pytest.raises(DiscoveryError, match="expired"):
        parse_record(peer_rec(ttl=10, now=time.time() - 100))
    with pytest.raises(DiscoveryError, match="exceeds"):
        peer_rec(body={"x": "y" * MAX_RECORD})
    with pytest.raises(DiscoveryError, match="exceeds"):
        parse_record(b"\x90" * (MAX_RECORD + 1))


def test_peer_record_must_live_under_own_id():
    raw = make_record(A, "peer", f"peer:{B.peer_id}", {}, 60)
    with pytest.raises(DiscoveryError, match="own id"):
        parse_record(raw)


def test_store_refuses_bad_and_keeps_good():
    store = RecordStore()
    key = dht_key(f"peer:{A.peer_id}")
    good = peer_rec()
    bad = forged(peer_rec(), body={"addrs": ["6.6.6.6:1"]})
    assert not store.accept(key, msgpack.packb([bad]))
    assert store.get(key) is None
    assert store.accept(key, msgpack.packb([bad, good]))
    records, refused = parse_value(store.get(key), key)
    assert [r.raw for r in records] == [good] and refused == 0
    assert store.refused == 2
    # a valid record under the wrong DHT key is refused too
    assert not store.accept(dht_key("peer:someone-else"), msgpack.packb([good]))


@pytest.mark.badinput
def test_newer_seq_replaces_older():
    store = RecordStore()
    key = dht_key(f"peer:{A.peer_id}")
    store.accept(key, msgpack.packb([peer_rec(seq=1, body={"v": 1})]))
    store.accept(key, msgpack.packb([peer_rec(seq=5, body={"v": 5})]))
    store.accept(key, msgpack.packb([peer_rec(seq=3, body={"v": 3})]))
    assert [r.seq for r in store.records(key)] == [5]
    assert [r.body["v"] for r in parse_value(store.get(key), key)[0]] == [5]


def test_provider_records_merge_and_are_bounded():
    store = RecordStore()
    key = "prov:mesh:x"
    idents = [Identity.generate() for _ in range(MAX_RECORDS_PER_KEY + 5)]
    for ident in idents:
        store.accept(
            dht_key(key), encode_value([parse_record(make_record(ident, "prov", key, {}, 60))])
        )
    assert len(store.records(dht_key(key))) == MAX_RECORDS_PER_KEY


@pytest.mark.badinput
def test_quota_cuts_sender_off():
    store = RecordStore(quota=5)
    sender = ("127.0.0.1", 4000)
    key = dht_key(f"peer:{A.peer_id}")
    for i in range(5):
        assert store.accept(key, msgpack.packb([peer_rec(seq=i)]), sender)
    assert not store.accept(key, msgpack.packb([peer_rec(seq=99)]), sender)
    assert store.is_banned(sender)
    # keyed by address: another port of that host is the same sender, another host is not
    assert store.is_banned(("127.0.0.1", 4001))
    assert not store.is_banned(("127.0.0.2", 4000))


def test_merge_keeps_highest_seq_per_peer():
    recs = [parse_record(peer_rec(seq=s)) for s in (3, 9, 1)]
    assert [r.seq for r in merge(recs)] == [9]


@pytest.mark.badinput
@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=2000), st.lists(st.binary(max_size=300), max_size=40).map(msgpack.packb)
    )
)
def test_fuzz_values(data):
    store = RecordStore()
    store.accept(dht_key("peer:x"), data, ("1.1.1.1", 1))
    records, _ = parse_value(data)
    assert records == []


async def _listening(identity: Identity) -> MeshDHT:
    server = MeshDHT(identity)
    await server.listen(0, interface="127.0.0.1")
    return server


async def test_contacts_named_in_answers_must_answer_with_their_ids_key(monkeypatch):
    sybil = await _listening(Identity.generate())
    honest = await _listening(Identity.generate())
    host, port = sybil.transport.get_extra_info("sockname")[:2]
    target = dht_key("prov:eclipsed")
    chosen = (int.from_bytes(target, "big") ^ 1).to_bytes(20, "big")

    def fake_neighbors(sender, nodeid, key):  # every answer names the chosen id, at the sybil
        return [(chosen, host, port)]

    monkeypatch.setattr(sybil.protocol, "rpc_find_node", fake_neighbors)
    try:
        await honest.bootstrap([(host, port)])  # the crawl asks the chosen id at the sybil
        ids = {c.id for c in honest.protocol.router.find_neighbors(KadNode(target))}
        assert sybil.node.id in ids  # the sybil itself, under the id its key gives, is in
        assert chosen not in ids
    finally:
        sybil.stop()
        honest.stop()


_SIGNED = seal_datagram(A, REQUEST, b"m" * 20, ["find_node", [node_id_of(A.peer_id), b"k" * 20]])


@settings(max_examples=300)
@given(st.data())
def test_fuzz_datagrams_only_raise_discovery_error(data):
    """Mutated signed datagrams (and random bytes): only DiscoveryError, and nothing whose
    signature or id binding broke is taken."""
    raw = bytearray(_SIGNED)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    raw = bytes(raw) if data.draw(st.booleans()) else data.draw(st.binary(max_size=300))
    try:
        dg = open_datagram(raw, MAX_VALUE)
        if dg.kind == REQUEST:
            parse_request(dg)
        else:
            parse_answer("find_node", dg)
    except DiscoveryError:
        return
    assert raw == _SIGNED  # any change breaks the signature


def test_a_request_must_name_its_signers_id():
    other = node_id_of(B.peer_id)
    forged = seal_datagram(A, REQUEST, b"m" * 20, ["ping", [other]])
    with pytest.raises(DiscoveryError, match="does not give"):
        parse_request(open_datagram(forged, MAX_VALUE))
    ok = seal_datagram(A, REQUEST, b"m" * 20, ["ping", [node_id_of(A.peer_id)]])
    assert parse_request(open_datagram(ok, MAX_VALUE)) == ("ping", [node_id_of(A.peer_id)])
    answer = seal_datagram(A, RESPONSE, b"m" * 20, [[other, "127.0.0.1", 9], [other, "host", 9]])
    contacts = parse_answer("find_node", open_datagram(answer, MAX_VALUE))
    assert contacts == [(other, "127.0.0.1", 9)]  # a hostname is no contact
    with pytest.raises(DiscoveryError, match="does not give"):
        parse_answer("ping", open_datagram(seal_datagram(A, RESPONSE, b"m" * 20, other), MAX_VALUE))


def _widest_body(ident: Identity, key: str) -> dict:
    """The body that decodes to the most Python objects a record allows: lists of empty
    lists (one byte each on the wire, ~56 bytes each in memory)."""
    n = 1
    while True:
        body = {"x": [[[] for _ in range(63)] for _ in range(n + 1)]}
        try:
            make_record(ident, "prov", key, body, 3600)
        except DiscoveryError:
            return {"x": [[[] for _ in range(63)] for _ in range(n)]}
        n += 1


def test_a_store_holds_its_records_at_their_wire_size():
    """The store keeps what it serves (the signed bytes), not the decoded bodies: a value
    of 32 records whose bodies decode to ~50x their size held 1.5 MiB (the store's cap of
    4096 keys x 32 records: ~6 GiB); now about the wire size. Lookups still return bodies
    (re-read from the signed bytes)."""
    import tracemalloc

    key = "prov:mesh:wide"
    signers = [Identity.generate() for _ in range(MAX_RECORDS_PER_KEY)]
    raws = [make_record(s, "prov", key, _widest_body(s, key), 3600) for s in signers]
    value = encode_value([parse_record(r) for r in raws])
    store = RecordStore(quota=10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert store.accept(dht_key(key), value, ("10.0.0.9", 4000))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store.records(dht_key(key))) == MAX_RECORDS_PER_KEY
    assert held < 3 * len(value), f"{held} bytes held for a {len(value)}-byte value"


async def test_a_lookup_of_stored_records_gives_their_bodies():
    dht = MeshDHT(A)
    await dht.start("127.0.0.1", 0, [])
    try:
        raw = peer_rec(A, body={"addrs": ["1.2.3.4:5"], "mesh": "m"})
        dht.store.accept(dht_key(f"peer:{A.peer_id}"), encode_value([parse_record(raw)]))
        (rec,) = await dht.lookup(f"peer:{A.peer_id}")
        assert rec.body == {"addrs": ["1.2.3.4:5"], "mesh": "m"} and rec.raw == raw
    finally:
        dht.stop()
