"""Unit tests: the object store (quota, pins, GC, bounds), the multi-source fetch, and the
wiring of Vivaldi coordinates into links and the node's network view."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from mesh.discovery.dht import make_record
from mesh.errors import PeerUnavailable
from mesh.net.identity import Identity
from mesh.net.rpc import CallContext, Reply
from mesh.net.view import NetConfig, NetView, NetViewError, coord_to_list, parse_info
from mesh.storage.fetch import FetchState, fetch_chunks
from mesh.storage.providers import MAX_HOLDERS, PROVIDER_TTL, Providers, object_key
from mesh.storage.store import (
    CHUNK_MAX,
    MAX_MANIFEST,
    BlobStore,
    QuotaExceeded,
    StoreError,
    build_manifest,
    iter_chunks,
    parse_manifest,
    sha256,
)
from scheduler import VivaldiNode

from .memchannel import until
from .test_rpc import make_links

KiB = 1 << 10


# -- the store ---------------------------------------------------------------------------
def test_put_export_roundtrip_and_manifest_id(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    data = os.urandom(5 * (1 << 20) + 123)
    m = store.put_bytes(data, name="x")
    assert m.id == sha256(m.raw) and m.size == len(data)
    assert all(n <= CHUNK_MAX for _, n in m.chunks) and len(m.chunks) == 3
    store.export(m.id, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    again = BlobStore(tmp_path / "s")  # state survives a restart
    assert again.complete(m.id) and m.id in again.pins and again.used == len(data)


def test_chunks_are_verified_before_they_are_written(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"hello"
    with pytest.raises(StoreError, match="do not hash"):
        store.write_chunk(sha256(b"other"), data)
    with pytest.raises(StoreError, match="exceeds"):
        store.write_chunk(sha256(b"x" * (CHUNK_MAX + 1)), b"x" * (CHUNK_MAX + 1))
    with pytest.raises(StoreError, match="not a sha256"):
        store.chunk_path("../../etc/passwd")
    assert store.write_chunk(sha256(data), data) is True
    assert store.write_chunk(sha256(data), data) is False
    assert store.used == len(data)


def test_manifest_bounds() -> None:
    good = build_manifest([(sha256(b"a"), 1)])
    assert parse_manifest(good.raw, good.id).chunks == good.chunks
    with pytest.raises(StoreError, match="hashes to"):
        parse_manifest(good.raw, "0" * 64)
    with pytest.raises(StoreError, match="size cap"):
        parse_manifest(b" " * (MAX_MANIFEST + 1))
    bad_docs: list[Any] = [
        {"v": 2, "size": 0, "chunks": []},
        {"v": 1, "size": 2, "chunks": [[sha256(b"a"), 1]]},  # sizes disagree
        {"v": 1, "size": CHUNK_MAX + 1, "chunks": [[sha256(b"a"), CHUNK_MAX + 1]]},
        {"v": 1, "size": 1, "chunks": [["nothex", 1]]},
        {"v": 1, "size": 1, "chunks": [[sha256(b"a"), 1]], "format": "exe"},
        {"v": 1, "size": -1, "chunks": []},
        [],
    ]
    for doc in bad_docs:
        with pytest.raises(StoreError):
            parse_manifest(json.dumps(doc).encode())
    with pytest.raises(StoreError):
        parse_manifest(b"\xff not json")


def test_jsonl_chunks_end_at_records() -> None:
    lines = [json.dumps({"x": [i] * (i % 7 + 1)}).encode() + b"\n" for i in range(500)]
    data = b"".join(lines)
    chunks = list(iter_chunks(io.BytesIO(data), "jsonl", 1000))
    assert b"".join(chunks) == data
    assert all(c.endswith(b"\n") and len(c) <= 1000 for c in chunks)
    with pytest.raises(StoreError, match="longer than a chunk"):
        list(iter_chunks(io.BytesIO(b"x" * 3000 + b"\n"), "jsonl", 1000))


def test_quota_collects_unpinned_lru_and_refuses_when_all_pinned(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota=300 * KiB)
    old = store.put_bytes(os.urandom(100 * KiB))
    new = store.put_bytes(os.urandom(100 * KiB))
    store.unpin(old.id)
    store.unpin(new.id)
    os.utime(store.manifest_dir / old.id, (1, 1))  # the least recently used
    kept = store.put_bytes(os.urandom(150 * KiB))  # needs room: the oldest unpinned goes
    assert store.manifest(old.id) is None and store.complete(new.id)
    assert store.used <= store.quota
    with pytest.raises(QuotaExceeded):
        store.put_bytes(os.urandom(200 * KiB))  # only pinned `kept` and unpinned `new` left
    assert store.complete(kept.id)  # pinned objects are never collected


def test_manifests_peers_make_us_learn_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer asking for replicas of objects whose chunks it never serves (or naming them as
    shards) made us keep each one's manifest, on disk and parsed, for good: GC ran only when
    a quota needed room, and manifests count toward none. Past MAX_OBJECTS, unpinned and
    unused objects go, least recently used first; pinned and held ones stay."""
    from mesh.storage import store as store_mod

    monkeypatch.setattr(store_mod, "MAX_OBJECTS", 64)
    monkeypatch.setattr(store_mod, "MAX_OBJECTS_KEPT", 56)
    store = BlobStore(tmp_path)
    pinned = store.put_bytes(b"kept" * 100)
    held = store.put_bytes(b"used" * 100)
    store.unpin(held.id)
    with store.hold(held.id):
        for i in range(200):  # manifests of objects we hold no chunk of
            m = build_manifest([(sha256(b"%d" % i), 100)], f"junk {i}")
            store.add_manifest(m.raw, m.id)
            assert store.manifest(m.id) is not None  # the one just added stays
        assert len(store._manifests) <= 64
        assert len(list(store.manifest_dir.iterdir())) <= 64
        assert store.complete(pinned.id) and store.complete(held.id)


def test_gc_keeps_pinned_and_held_objects(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    pinned = store.put_bytes(b"a" * 1000)
    loose = store.put_bytes(b"b" * 1000)
    held = store.put_bytes(b"c" * 1000)
    shared = store.put_bytes(b"a" * 1000 + b"b" * 10)  # shares no chunk; distinct object
    for m in (loose, held, shared):
        store.unpin(m.id)
    with store.hold(held.id):
        out = store.gc()
    assert out["objects"] == 2
    assert store.complete(pinned.id) and store.complete(held.id)
    assert store.manifest(loose.id) is None and store.manifest(shared.id) is None
    assert store.used == 2000
    store.unpin(held.id)
    store.gc()
    assert store.used == 1000 and store.complete(pinned.id)


# -- the fetch ---------------------------------------------------------------------------
class FakeCaller:
    """Sources keyed by peer id: a dict of chunks, a corrupting one, or one that dies."""

    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks
        self.corrupt: dict[str, set[str]] = {}
        self.die_after: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    async def call(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        assert method == "storage.chunk_read" and params is not None
        n = self.calls[peer_id] = self.calls.get(peer_id, 0) + 1
        await asyncio.sleep(0)
        if peer_id in self.die_after and n > self.die_after[peer_id]:
            raise PeerUnavailable(f"{peer_id} died")
        data = self.chunks[params["sha"]]
        if params["sha"] in self.corrupt.get(peer_id, set()):
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # always differs (0x00 might not)
        return Reply({}, data)


async def test_fetch_prefers_near_sources_bypasses_corruption_and_survives_death() -> None:
    blobs = [os.urandom(1000 + i) for i in range(12)]
    chunks = [(sha256(b), len(b)) for b in blobs]
    caller = FakeCaller({sha256(b): b for b in blobs})
    caller.corrupt["near1"] = {sha for sha, _ in chunks}  # every chunk it serves is bad
    caller.die_after["near2"] = 2
    cost = {"near1": 10.0, "near2": 11.0, "far": 500.0}
    penalties: dict[str, float] = {}

    def cost_of(src: str, n: int) -> float:
        return cost[src] + penalties.get(src, 0.0)

    def penalize(src: str, why: str) -> None:
        penalties[src] = penalties.get(src, 0.0) + 1000

    got: dict[int, bytes] = {}

    async def sink(i: int, data: bytes, src: str) -> None:
        got[i] = data

    state = FetchState("obj", sum(n for _, n in chunks), chunks_total=len(chunks))
    need = [i for i in range(12) if i != 5]  # chunk 5 is already here (resume)
    await fetch_chunks(
        caller, chunks, need, ["far", "near1", "near2"], cost_of, sink, state, penalize=penalize
    )
    assert sorted(got) == need and all(got[i] == blobs[i] for i in need)
    # near1 was caught (at most once per worker in flight), penalized and then bypassed.
    assert 1 <= state.corrupt["near1"] <= 3 and penalties["near1"] > 0
    assert "near1" not in state.sources
    assert state.failed == ["near2"]
    assert state.sources["near2"] > 0  # the near holder served until it died
    assert state.sources["far"] > 0  # then the far one finished, from where it stopped
    assert sum(state.sources.values()) == sum(chunks[i][1] for i in need)
    assert caller.calls["near2"] >= 3  # two chunks, then the call(s) that found it dead


async def test_fetch_fails_cleanly_when_no_source_is_left() -> None:
    blob = os.urandom(100)
    caller = FakeCaller({sha256(blob): blob})
    caller.corrupt["only"] = {sha256(blob)}

    async def sink(i: int, data: bytes, src: str) -> None:
        raise AssertionError("nothing unverified reaches the sink")

    with pytest.raises(StoreError, match="no source left"):
        await fetch_chunks(
            caller,
            [(sha256(blob), 100)],
            [0],
            ["only"],
            lambda s, n: 1.0,
            sink,
            FetchState("o", 100),
        )


# -- Vivaldi wiring ----------------------------------------------------------------------
async def test_link_reports_every_ping_sample() -> None:
    from mesh.net.rpc import LinkParams

    la, lb, *_ = make_links(LinkParams(ping_interval=0.02, dead_after=1.0))
    samples: list[tuple[str, float]] = []
    la.on_rtt = lambda pid, ms: samples.append((pid, ms))
    la.start()
    await until(lambda: len(samples) >= 3)
    assert all(pid == "b" * 32 and ms >= 0 for pid, ms in samples)
    la.close()


def _view(me: str, zone: str = "a", price: float = 0.0) -> NetView:
    node = SimpleNamespace(me=me)
    return NetView(node, NetConfig(zone=zone, egress_price=price))  # type: ignore[arg-type]


async def test_net_info_teaches_both_sides_and_rtt_moves_coordinates() -> None:
    a, b = _view("pa", "home", 0.0), _view("pb", "cloud", 0.09)
    ctx = SimpleNamespace(peer_id="pa")
    reply = await b.rpc_net_info(ctx, a.my_info(), b"")  # type: ignore[arg-type]
    a._learn("pb", parse_info(reply))
    assert b.zone_of("pa") == "home" and a.zone_of("pb") == "cloud"
    assert a.price_of("pb", "pa") == pytest.approx(0.09) and a.price_of("pa", "pa") == 0.0
    # Feed samples as a link would (40 ms both ways) and exchange coordinates each time.
    remote = VivaldiNode(seed=2)
    for _ in range(60):
        a.peers["pb"].coord = remote.coordinate
        a.observe_rtt("pb", 40.0)
        remote.update(40.0, a.vivaldi.coordinate, "pa")
    assert a.peers["pb"].samples == 60
    assert abs(a.rtt_ms("pb") - 40.0) < 8.0
    # Cost: crossing into another zone pays the sender's egress price.
    assert a.cost_ms("pb", 1 << 20) > a.rtt_ms("pb") + 0.09 * 1e6 * (1 << 20) / 1e9 - 1


@pytest.mark.parametrize(
    "bad",
    [
        {"zone": "", "price": 0, "coord": [0, 0, 0.01, 1, 0]},
        {"zone": "z" * 100, "price": 0, "coord": [0, 0, 0.01, 1, 0]},
        {"zone": "a", "price": math.nan, "coord": [0, 0, 0.01, 1, 0]},
        {"zone": "a", "price": -1, "coord": [0, 0, 0.01, 1, 0]},
        {"zone": "a", "price": 0, "coord": [0, 0, -1, 1, 0]},
        {"zone": "a", "price": 0, "coord": [math.inf, 0, 0.01, 1, 0]},
        {"zone": "a", "price": 0, "coord": [0, 0]},
        {"zone": "a", "price": 0, "coord": [0, 0, 0.01, 1, 0], "fast": "x" * 100},
    ],
)
def test_malformed_peer_info_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(NetViewError):
        parse_info(bad)


def test_coordinate_roundtrip() -> None:
    v = VivaldiNode(seed=1)
    v.update(10.0, VivaldiNode(seed=3).coordinate, "x")
    info = parse_info({"zone": "a", "price": 0, "coord": coord_to_list(v.coordinate)})
    assert info.coord == v.coordinate


def test_penalties_decay_so_a_mended_holder_is_used_again() -> None:
    from mesh.net.view import Penalties

    now = [0.0]
    p = Penalties(half_life=600.0, clock=lambda: now[0])
    assert p.add("bad", 2000.0) == 2000.0
    assert p.add("bad", 2000.0) == 4000.0  # repeat offences add up
    now[0] = 600.0
    assert p.get("bad") == pytest.approx(2000.0)
    assert p.add("bad", 2000.0) == pytest.approx(4000.0)
    now[0] = 600.0 + 600.0 * 12  # 4000 ms / 2**12 < 1 ms: forgiven and forgotten
    assert p.get("bad") == 0.0 and len(p) == 0 and p.as_dict() == {}


def test_penalties_are_bounded_and_keep_the_worst_offenders() -> None:
    from mesh.net.view import Penalties

    p = Penalties(capacity=8, clock=lambda: 0.0)
    p.add("worst", 1e6)
    for i in range(1000):  # minted identities, each penalized once
        p.add(f"sybil{i}", 2000.0 + i)
    assert len(p) == 8
    assert p.get("worst") == 1e6  # the least penalized went first
    assert p.get("sybil999") == 2999.0 and p.get("sybil0") == 0.0


class _ProvNode:
    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.me = self.identity.peer_id
        self.banned: dict[str, str] = {}
        self.dht = None
        self.linked: list[str] = []

    def connected_peer_ids(self) -> list[str]:
        return list(self.linked)


def _holder_record(ident: Identity, oid: str) -> bytes:
    return make_record(ident, "prov", object_key(oid), {"d": True, "z": "z"}, PROVIDER_TTL)


def test_holders_per_object_are_bounded_and_linked_holders_stay() -> None:
    node = _ProvNode()
    provs = Providers(node, "z")  # type: ignore[arg-type]
    oid = "ab" * 32
    real = Identity.generate()
    node.linked.append(real.peer_id)
    assert provs.accept(_holder_record(real, oid)) is not None
    for _ in range(3 * MAX_HOLDERS):  # minted keys, e.g. from a DHT lookup
        provs.accept(_holder_record(Identity.generate(), oid))
    assert len(provs.table[oid]) == MAX_HOLDERS
    assert real.peer_id in provs.table[oid]  # a linked holder is never the one dropped
    assert [p.peer_id for p in provs.holders(oid)] == [real.peer_id]
    # A full list of linked holders refuses an unlinked newcomer.
    linked = [Identity.generate() for _ in range(MAX_HOLDERS)]
    node.linked = [i.peer_id for i in linked]
    other = "cd" * 32
    for ident in linked:
        assert provs.accept(_holder_record(ident, other)) is not None
    assert provs.accept(_holder_record(Identity.generate(), other)) is None


async def test_a_peer_sends_only_its_own_provider_records() -> None:
    node = _ProvNode()
    provs = Providers(node, "z")  # type: ignore[arg-type]
    sender = Identity.generate()
    ctx = CallContext(None, "obj_sync", 1e18, sender.peer_id)
    minted = [_holder_record(Identity.generate(), "ab" * 32) for _ in range(100)]
    own = _holder_record(sender, "ab" * 32)
    payload = msgpack.packb([*minted, own], use_bin_type=True)
    assert await provs.rpc_obj_sync(ctx, {}, payload) == {"accepted": 1}
    assert list(provs.table["ab" * 32]) == [sender.peer_id]
    assert provs.refused == 100
    assert (await provs.rpc_obj_announce(ctx, {}, minted[0]))["ok"] is False


def test_an_emptied_object_leaves_the_table() -> None:
    node = _ProvNode()
    provs = Providers(node, "z")  # type: ignore[arg-type]
    ident = Identity.generate()
    provs.accept(_holder_record(ident, "ab" * 32))
    gone = make_record(ident, "prov", object_key("ab" * 32), {"gone": True}, PROVIDER_TTL)
    provs.accept(gone)
    assert provs.table == {} and provs.status()["objects"] == 0


def test_our_own_provider_records_are_never_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.storage import providers as prov_mod

    monkeypatch.setattr(prov_mod, "MAX_OBJECTS_PER_SIGNER", 2)
    node = _ProvNode()
    provs = Providers(node, "z")  # type: ignore[arg-type]
    other = Identity.generate()
    oids = [f"{i:02x}" * 32 for i in range(4)]
    assert [provs.accept(_holder_record(other, o)) is not None for o in oids] == [
        True,
        True,
        False,
        False,
    ]
    assert all(provs.accept(_holder_record(node.identity, o)) is not None for o in oids)


def test_puts_pinning_from_several_threads_at_once_keep_every_pin(tmp_path: Path) -> None:
    """The API runs each put on a worker thread, and every put pins its object: the pin file
    was written through one shared temporary name, so two puts at once could each replace
    it and the second found it gone (HTTP 500 in test_llmjobs_mesh's side-by-side puts)."""
    import threading

    store = BlobStore(tmp_path)
    objects = [store.put_bytes(os.urandom(2 * KiB)) for _ in range(8)]
    for obj in objects:
        store.unpin(obj.id)
    errors: list[BaseException] = []
    start = threading.Barrier(len(objects))

    def pin_often(oid: str) -> None:
        start.wait()
        try:
            for k in range(200):
                store.pin(oid, replicas=1 + k % 3)
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever broke
            errors.append(exc)

    threads = [threading.Thread(target=pin_often, args=(o.id,)) for o in objects]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    saved = json.loads((tmp_path / "pins.json").read_text())
    assert set(saved) == {o.id for o in objects} == set(BlobStore(tmp_path).pins)


def test_a_store_of_pinned_objects_past_the_bound_trims_rarely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_OBJECTS with nothing to collect, every new manifest ran a full trim (a stat
    of every object, a listing of every chunk); now the next waits for 1/8 more objects."""
    from mesh.storage import store as store_mod

    monkeypatch.setattr(store_mod, "MAX_OBJECTS", 16)
    monkeypatch.setattr(store_mod, "MAX_OBJECTS_KEPT", 14)
    store = BlobStore(tmp_path)
    trims: list[int] = []
    real = store._trim

    def counted(keep: str) -> None:
        trims.append(len(store._manifests))
        real(keep)

    monkeypatch.setattr(store, "_trim", counted)
    for i in range(40):
        store.put_bytes(b"pinned %d" % i)  # put pins: nothing is collectable
    assert len(store._manifests) == 40
    assert len(trims) <= 40 // 2, trims  # each trim waits 2 more objects
