"""Model shards are packed objects of the one store: pinned when added here, held while
loaded, collected by GC otherwise; a runtime opens the store's own file (unit, no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh.inference.compute import ComputeConfig, ComputeService
from mesh.net.rpc import Reply
from runtimes.shards import sha256_file
from runtimes.testmodels import write_test_model


class _Caller:
    def connected_peer_ids(self) -> list[str]:
        return []

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        raise AssertionError("nothing is fetched in this test")


async def test_shards_are_pinned_held_and_collected_through_the_store(tmp_path: Path) -> None:
    model = write_test_model(tmp_path / "m.gguf", "llama")
    svc = ComputeService(_Caller(), "me", tmp_path / "node", ComputeConfig(runtime="fake"))  # type: ignore[arg-type]
    manifest = await svc.add_model(str(model), "m")
    store = svc.objects.store
    oids = [b.object for b in manifest.blobs]
    assert all(oids) and len(set(oids)) == len(oids)
    for b in manifest.blobs:  # each shard is one packed object: its data file is the shard
        path = store.data_path(b.object)
        assert path is not None and sha256_file(path) == b.sha256
        m = store.manifest(b.object)
        assert m is not None and m.format == "gguf" and m.size == b.size
    assert set(oids) <= set(store.pins)  # added here: pinned
    assert not list((tmp_path / "node").rglob("*.gguf"))  # no second copy anywhere

    store.gc()  # pinned: nothing goes
    assert all(store.complete(o) for o in oids)

    # Pulled, not added here (unpinned), but loaded: held, so GC leaves them alone.
    for o in oids:
        store.unpin(o)
    n = len(manifest.units)
    loaded = await svc._load(manifest.model_id, 0, n, "fake")
    assert set(loaded.objects) == set(oids)
    spec = svc.store.open_range(manifest, 0, n)
    assert {f.path for f in spec.files} == {store.data_path(o) for o in oids}
    assert store.gc()["objects"] == 0
    assert all(store.complete(o) for o in oids)

    # Unloaded: collected, data files and all; the pinned model manifest stays.
    svc._unload((manifest.model_id, 0, n, "fake"))
    out = store.gc()
    assert out["objects"] == len(oids)
    assert all(store.manifest(o) is None and store.data_path(o) is None for o in oids)
    assert not list(store.packed_dir.glob(f"{oids[0]}*"))
    assert store.complete(svc.model_objects[manifest.model_id])
    assert svc.held_blobs(manifest.model_id) == []


async def test_the_registry_comes_back_from_the_store_after_a_restart(tmp_path: Path) -> None:
    model = write_test_model(tmp_path / "m.gguf", "llama")
    root = tmp_path / "node"
    first = ComputeService(_Caller(), "me", root, ComputeConfig(runtime="fake"))  # type: ignore[arg-type]
    manifest = await first.add_model(str(model), "m")
    again = ComputeService(_Caller(), "me", root, ComputeConfig(runtime="fake"))  # type: ignore[arg-type]
    assert again.resolve("m") == manifest.model_id
    assert again.manifests[manifest.model_id] == manifest
    assert sorted(again.held_blobs(manifest.model_id)) == sorted(b.sha256 for b in manifest.blobs)
