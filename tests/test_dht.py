import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.discovery.dht import (
    MAX_RECORD,
    MAX_RECORDS_PER_KEY,
    RecordStore,
    dht_key,
    encode_value,
    make_record,
    merge,
    parse_record,
    parse_value,
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
    assert [r.body["v"] for r in store.records(key)] == [5]


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
