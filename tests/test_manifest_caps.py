"""Objects a peer names for a model manifest or a job's model: their sizes are checked from
the object's storage manifest before a chunk is pulled or read (in-process, real stores).
The same attacks across node processes: tests/test_manifest_attacks.py."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh.errors import PeerUnavailable
from mesh.inference.models import ComputeConfig, ModelRegistry
from mesh.jobs.sandbox import ModelRefused
from mesh.jobs.service import JobService
from mesh.net.identity import Identity
from mesh.net.rpc import Reply
from mesh.storage.service import ObjectService, StorageConfig
from mesh.storage.store import BlobStore
from runtimes.errors import ModelError
from runtimes.testmodels import write_test_model


class _Source:
    """The manifest's source peer: ``compute.manifest`` names ``oid``."""

    me = "me"

    def __init__(self, oid: str) -> None:
        self.oid = oid

    async def call(self, peer: str, method: str, params: Any, **kw: Any) -> Reply:
        return Reply({"object": self.oid})


async def test_an_object_over_the_manifest_cap_is_refused_unread(tmp_path: Path) -> None:
    reg = ModelRegistry(_Source(""), "me", tmp_path, ComputeConfig())
    big = reg.objects.store.put_bytes(os.urandom(8 << 20), "someone's shard")
    reg.objects.store.unpin(big.id)
    reg.caller = _Source(big.id)  # type: ignore[assignment]
    mid = hashlib.sha256(b"any model").hexdigest()
    tracemalloc.start()
    try:
        # Before: the 8 MiB were read and joined (16 MiB at the peak), then refused.
        with pytest.raises(ModelError) as refused:
            await reg._manifest(mid, "liar")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert "bytes as the manifest of" in str(refused.value)
    assert big.id not in reg.objects.store.pins and mid not in reg.manifests


async def test_a_fetched_manifest_is_pinned_only_once_it_matches(tmp_path: Path) -> None:
    src = ModelRegistry(_Source(""), "src", tmp_path / "src", ComputeConfig())
    manifest = await src.add_model(str(write_test_model(tmp_path / "m.gguf", "llama")))
    oid = src.model_objects[manifest.model_id]
    reg = ModelRegistry(_Source(oid), "me", tmp_path / "me", ComputeConfig())
    store = reg.objects.store
    store.add_manifest(src.objects.store.manifest(oid).raw, oid)  # type: ignore[union-attr]
    for data in src.objects.store.iter_object(oid):
        store.write_chunk(hashlib.sha256(data).hexdigest(), data)
    other = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(ModelError, match="does not hash"):
        await reg._manifest(other, "liar")  # the right bytes under the wrong id
    assert oid not in store.pins and oid in store.collectable()
    assert (await reg._manifest(manifest.model_id, "src")).model_id == manifest.model_id
    assert oid in store.pins


class _Holder:
    """A peer holding ``remote``'s objects; counts the chunks it serves."""

    identity = Identity.generate()
    me = identity.peer_id
    dht = None
    banned: dict[str, str] = {}
    config = SimpleNamespace(signaling_host="127.0.0.1", api_host="127.0.0.1")

    def __init__(self, remote: BlobStore) -> None:
        self.remote = remote
        self.served = 0

    def connected_peer_ids(self) -> list[str]:
        return ["holder"]

    def link(self, peer: str) -> None:
        raise PeerUnavailable("no link measured")  # the cost estimate falls back to defaults

    async def call(self, peer: str, method: str, params: Any, *a: Any, **k: Any) -> Reply:
        if method == "storage.obj_manifest":
            m = self.remote.manifest(params["id"])
            assert m is not None
            return Reply({"n": len(m.raw)}, m.raw)
        if method == "storage.chunk_read":
            self.served += 1
            return Reply({}, self.remote.read_chunk(params["sha"]))
        raise PeerUnavailable("test")


async def test_a_job_model_over_the_cap_is_refused_before_its_pull(tmp_path: Path) -> None:
    remote = BlobStore(tmp_path / "remote")
    model = remote.put_stream(io.BytesIO(os.urandom(3 << 16)), "model", "raw", 1 << 16)
    holder = _Holder(remote)
    objects = ObjectService(holder, StorageConfig(fast_path=False), tmp_path / "o")  # type: ignore[arg-type]

    async def holders(oid: str) -> list[str]:
        return ["holder"]

    objects.find_holders = holders  # type: ignore[method-assign]
    jobs = JobService(holder, objects)  # type: ignore[arg-type]
    jobs.limits = dataclasses.replace(jobs.limits, max_model=1 << 16)
    # Before: all three chunks were pulled, then the size was refused.
    with pytest.raises(ModelRefused, match="over"):
        await jobs._model(model.id)
    assert holder.served == 0
    assert not objects.store.complete(model.id)
