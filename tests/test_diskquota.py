"""Disk room for pulled shards, through the object store: least recently used objects go,
pinned and held ones never; a pull that
cannot fit is refused before a byte is fetched."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mesh.inference.compute import CapacityError, ComputeConfig, ComputeService
from mesh.net.rpc import Reply
from mesh.storage.quota import disk_shortfall
from mesh.storage.store import BlobStore
from runtimes.shards import ShardStore
from runtimes.testmodels import write_test_model


def _blobs(root: Path, names: str, keep: str = "", size: int = 1000) -> BlobStore:
    """A store of packed objects named a, b, ... (a is the least recently used); the ones in
    ``keep`` stay pinned (as a model added here is), the others are unpinned (pulled)."""
    store = BlobStore(root / "objects")
    for i, n in enumerate(names):
        src = root / f"{n}.src"
        src.write_bytes(n.encode() * size)
        m = store.put_file(src, n)
        if n not in keep:
            store.unpin(m.id)
        for p in (store.manifest_dir / m.id, store.packed_path(m.id)):
            os.utime(p, (1000 + i, 1000 + i))
    return store


def _left(store: BlobStore) -> list[str]:
    return sorted(o["name"] for o in store.objects())


def test_evicts_least_recently_used_and_never_kept(tmp_path: Path) -> None:
    store = _blobs(tmp_path, "abcd", keep="a")
    assert disk_shortfall(store, 1500, 3000) == 0
    assert _left(store) == ["a"]  # b, c, d went, oldest first


def test_stops_evicting_once_it_fits(tmp_path: Path) -> None:
    store = _blobs(tmp_path, "abcd")
    assert disk_shortfall(store, 500, 4000) == 0
    assert _left(store) == ["b", "c", "d"]


def test_shortfall_when_everything_is_kept(tmp_path: Path) -> None:
    store = _blobs(tmp_path, "ab", keep="ab")
    assert disk_shortfall(store, 1500, 2500) == 1000
    assert len(store.objects()) == 2


def test_a_held_object_is_never_evicted(tmp_path: Path) -> None:
    """A loaded shard or a pull under way holds its object: not collected, not pinned."""
    store = _blobs(tmp_path, "ab")
    oid = next(o["id"] for o in store.objects() if o["name"] == "a")
    store.acquire(oid)
    assert disk_shortfall(store, 1500, 2500) == 0
    assert _left(store) == ["a"]
    store.release(oid)
    assert disk_shortfall(store, 2000, 2500) == 0
    assert _left(store) == []


class _Caller:
    me = "me"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connected_peer_ids(self) -> list[str]:
        return ["holder"]

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        self.calls.append(method)
        raise AssertionError("nothing may be fetched")


async def test_a_peer_cannot_make_us_pull_past_the_disk_limit(tmp_path: Path) -> None:
    model = write_test_model(tmp_path / "m.gguf", "llama")
    manifest = ShardStore(tmp_path / "elsewhere").add_model(model)
    caller = _Caller()
    svc = ComputeService(
        caller,  # type: ignore[arg-type]
        "me",
        tmp_path / "store",
        ComputeConfig(runtime="fake", disk_limit=1000),
    )
    svc.manifests[manifest.model_id] = manifest  # as a peer's stage_open would make us learn it
    with pytest.raises(CapacityError, match="no disk room"):
        await svc.ensure_blobs(manifest, 0, len(manifest.units), {"x" * 64: ["holder"]})
    assert caller.calls == []
