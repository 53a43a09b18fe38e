"""Peers' model manifests this node fetched are a bounded cache: they cannot crowd this node's
own models out of its ``compute.models`` listing, nor stay pinned for good (in-process, real
stores)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.inference import models
from mesh.inference.models import ComputeConfig, ModelRegistry, models_of
from mesh.net.rpc import Reply
from runtimes.arch import unit_kind
from runtimes.shards import BlobInfo, Manifest, UnitInfo
from runtimes.testmodels import write_test_model


def _fake(n_layers: int, tag: str) -> Manifest:
    """A valid manifest of ``n_layers`` layers (its listing entry grows with them)."""
    blob = hashlib.sha256(tag.encode()).hexdigest()
    n = n_layers + 2
    units = tuple(UnitInfo(i, *unit_kind(i, n_layers), (), 1 << 30, blob) for i in range(n))
    return Manifest("llama", tag, n_layers, units, (BlobInfo(blob, 1, 0, n),))


class _Peer:
    """A source answering ``compute.manifest`` with the object it stored for each model."""

    me = "me"

    def __init__(self) -> None:
        self.objects: dict[str, str] = {}

    async def call(self, peer: str, method: str, params: Any, **kw: Any) -> Reply:
        return Reply({"object": self.objects[params["model_id"]]})


async def _feed(reg: ModelRegistry, peer: _Peer, manifests: list[Manifest]) -> None:
    """Make ``reg`` learn each manifest as a peer's stage_open would (the object arrives
    unpinned, as a pull leaves it)."""
    for m in manifests:
        obj = reg.objects.store.put_bytes(m.to_json(), f"model {m.name}")
        reg.objects.store.unpin(obj.id)
        peer.objects[m.model_id] = obj.id
        await reg._manifest(m.model_id, "peer")


async def _own(reg: ModelRegistry, tmp_path: Path) -> str:
    path = write_test_model(tmp_path / "own.gguf", "llama")
    return (await reg.add_model(str(path), "own")).model_id


async def test_foreign_manifests_cannot_hide_this_nodes_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "MAX_MODELS_REPLY", 64 << 10)  # 64 KiB: small manifests fill it
    peer = _Peer()
    reg = ModelRegistry(peer, "me", tmp_path / "node", ComputeConfig())  # type: ignore[arg-type]
    own = await _own(reg, tmp_path)
    await _feed(reg, peer, [_fake(2000, f"junk{i}") for i in range(10)])  # ~10 KiB entries
    reply = await reg.rpc_models(None, {}, b"")  # type: ignore[arg-type]
    # Before: a 100 KiB listing, over the cap: every peer read it as no models at all.
    assert len(reply.payload) <= models.MAX_MODELS_REPLY
    listed = [m["model_id"] for m in models_of(reply)]
    assert listed[0] == own and len(listed) > 1


async def test_foreign_manifests_are_a_bounded_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "MAX_FOREIGN", 4, raising=False)
    peer = _Peer()
    reg = ModelRegistry(peer, "me", tmp_path / "node", ComputeConfig())  # type: ignore[arg-type]
    own = await _own(reg, tmp_path)
    junk = [_fake(2, f"junk{i}") for i in range(8)]
    store = reg.objects.store
    await _feed(reg, peer, junk)
    # Before: all nine kept, pinned for good (never collectable) and saved to models.json.
    assert set(reg.manifests) == {own, *(m.model_id for m in junk[-4:])}
    gone = [peer.objects[m.model_id] for m in junk[:4]]
    assert not any(oid in store.pins for oid in gone)
    assert set(gone) <= set(store.collectable())
    assert all(peer.objects[m.model_id] in store.pins for m in junk[-4:])  # servable to peers
    # One in use (a stage being opened or loaded for it) stays, however old.
    more = [_fake(2, f"more{i}") for i in range(4)]
    oldest = junk[4].model_id
    with reg.using(oldest):
        await _feed(reg, peer, more)
    kept = set(reg.manifests)
    assert kept == {own, oldest, *(m.model_id for m in more[-3:])}
    # A restart keeps the same: its own model named, the cache as it was.
    again = ModelRegistry(peer, "me", tmp_path / "node", ComputeConfig())  # type: ignore[arg-type]
    assert set(again.manifests) == kept and again.names == {"own": own}


async def test_a_registry_from_before_the_cache_unpins_what_peers_made_it_keep(
    tmp_path: Path,
) -> None:
    """Older nodes saved every fetched manifest's object in models.json, pinned, however
    big (a peer could name someone's shard): a restart moves them to the cache, whose cap
    on a manifest's size unpins the big one."""
    peer = _Peer()
    root = tmp_path / "node"
    reg = ModelRegistry(peer, "me", root, ComputeConfig())  # type: ignore[arg-type]
    own = await _own(reg, tmp_path)
    store = reg.objects.store
    big = store.put_bytes(b"\0" * (models.MODEL_MANIFEST_MAX + 1), "someone's shard")
    junk = _fake(2, "junk")
    small = store.put_bytes(junk.to_json(), "model junk")
    registry = {own: reg.model_objects[own], "ab" * 32: big.id, junk.model_id: small.id}
    (root / "models.json").write_text(json.dumps(registry))
    (root / "foreign.json").unlink(missing_ok=True)  # as an older node left it
    again = ModelRegistry(peer, "me", root, ComputeConfig())  # type: ignore[arg-type]
    assert set(again.manifests) == {own, junk.model_id}
    assert big.id not in again.objects.store.pins and small.id in again.objects.store.pins
    assert list(again.foreign.objects) == [junk.model_id]
    assert again.model_objects == {own: reg.model_objects[own]}


async def test_a_running_generation_keeps_its_models_manifest(tmp_path: Path) -> None:
    """A coordinator that runs no stage of the route had nothing keeping the model's
    manifest in its cache: 32 new manifests from a peer mid-generation evicted it, and the
    failover re-opens and spot checks that fetch it from us failed. A run now holds it."""
    from mesh.inference.run import GenerationRun
    from tests.test_run_failover import Mesh

    mesh = await Mesh.start(tmp_path / "m", write_test_model(tmp_path / "t.gguf", "llama"))
    try:
        run = GenerationRun(mesh.coord, mesh.request(split=2, max_tokens=4))
        events = run.run()
        first = await events.__anext__()  # the route: planned and opened
        registry = mesh.coord.compute
        assert registry._in_use(first["model_id"])
        rest = [e async for e in events]
        assert rest[-1].get("done") and not registry._in_use(first["model_id"])
    finally:
        await mesh.stop()
