"""The models a node knows: its registry of names and model manifests, kept in the object store.

A model is a manifest (:class:`runtimes.shards.Manifest`, the per-unit-range description; the
model id is the hash of its canonical JSON) naming its shards by the sha256 of each shard file
and the id of the store object carrying it. The manifest itself is a store object too
(``models.json`` maps model ids to those objects), so it is fetched, pinned and collected like
any object; adding a model here pins it and its shards.

This module is the bottom of the compute service's layers (models -> shards -> memory ->
stages -> audit, each a class extending the one below, each in its own module); it also holds
what every layer shares: the configuration and the errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack

from mesh.errors import Error
from mesh.inference.prompts import Tokenizers
from mesh.net.callers import MeshCaller as Caller
from mesh.net.rpc import CallContext, Reply
from mesh.storage.fetch import FetchState
from mesh.storage.store import PACKED, BlobStore, StoreError
from mesh.storage.store import Manifest as ObjectManifest
from runtimes.errors import MalformedModelError, ModelError
from runtimes.shards import MODEL_MANIFEST_MAX, BlobInfo, Manifest, ShardStore

__all__ = [
    "ComputeConfig",
    "CapacityError",
    "StageUnavailable",
    "ModelRegistry",
    "ShardObjects",
    "LocalObjects",
    "models_of",
]

log = logging.getLogger(__name__)
MAX_MODELS_REPLY = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def models_of(reply: Reply) -> list[dict[str, Any]]:
    """The listing of a ``models`` reply, size-capped and type-checked (it is untrusted)."""
    if len(reply.payload) > MAX_MODELS_REPLY:
        return []
    try:
        items = msgpack.unpackb(reply.payload, raw=False, max_ext_len=0)
    except Exception:  # msgpack raises several types on bad input
        return []
    return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []


class CapacityError(Error):
    """The node's memory budget, disk limit or session cap cannot take this shard or session."""


class StageUnavailable(Error):
    """The next stage could not be reached; the message is its peer id."""


@dataclass(frozen=True)
class ComputeConfig:
    memory_limit: int | None = None  # bytes for loaded shards and their sessions
    disk_limit: int | None = None  # bytes of the object store on disk (always: 1 GiB left free)
    runtime: str = "onnx"
    threads: int | None = None
    session_ttl: float = 300.0
    # A session whose coordinator has had no link to this node for this long is freed: its
    # generation failed over (or died with it), and its memory is what the next route needs.
    owner_grace: float = 15.0
    max_sessions: int = 64
    max_sessions_per_peer: int = 16  # one peer cannot take every session slot
    spin: bool = False  # onnx worker threads busy-wait between runs (faster alone, not shared)
    forward_timeout: float = 20.0  # below the coordinator's, so the culprit is named
    runtime_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("delay_s", 0.01),) for fake


class ShardObjects(Protocol):
    """What the compute service needs of the object service (mesh.storage.service)."""

    @property
    def store(self) -> BlobStore: ...

    @property
    def transfers(self) -> dict[str, FetchState]: ...

    async def put_file(self, path: Path, name: str = "", replicas: int = 1) -> ObjectManifest: ...

    async def put_bytes(
        self, data: bytes, name: str = "", fmt: str = "raw", replicas: int = 1
    ) -> ObjectManifest: ...

    async def fetch(
        self, oid: str, *, pin: bool = False, hint: list[str] | None = None
    ) -> FetchState: ...

    async def manifest_of(self, oid: str, hint: list[str] | None = None) -> ObjectManifest: ...


class LocalObjects:
    """A store with no mesh behind it (a compute service built on its own, e.g. in tests):
    puts work, fetches succeed only for what is already here."""

    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root)
        self.transfers: dict[str, FetchState] = {}

    async def put_file(self, path: Path, name: str = "", replicas: int = 1) -> ObjectManifest:
        return await asyncio.to_thread(self.store.put_file, path, name, PACKED)

    async def put_bytes(
        self, data: bytes, name: str = "", fmt: str = "raw", replicas: int = 1
    ) -> ObjectManifest:
        return await asyncio.to_thread(self.store.put_bytes, data, name, fmt)

    async def fetch(
        self, oid: str, *, pin: bool = False, hint: list[str] | None = None
    ) -> FetchState:
        m = self.store.manifest(oid)
        if m is None or self.store.missing(m):
            raise StoreError(f"object {oid[:12]} is not here and this store has no peers")
        return FetchState(oid, m.size, m.size, len(m.chunks), len(m.chunks))

    async def manifest_of(self, oid: str, hint: list[str] | None = None) -> ObjectManifest:
        m = self.store.manifest(oid)
        if m is None:
            raise StoreError(f"object {oid[:12]} is not here and this store has no peers")
        return m


class ModelRegistry:
    """Model names and manifests; the manifests are store objects."""

    def __init__(
        self,
        caller: Caller,
        me: str,
        root: Path,
        config: ComputeConfig,
        objects: ShardObjects | None = None,
    ) -> None:
        self.caller = caller
        self.me = me
        self.config = config
        self.root = Path(root)
        self.objects: ShardObjects = objects or LocalObjects(self.root / "objects")
        self.store = ShardStore(self.root, locate=self._locate)
        self.names: dict[str, str] = {}
        self.manifests: dict[str, Manifest] = {}
        self.model_objects: dict[str, str] = {}  # model id -> object of its manifest
        self.tokenizers = Tokenizers(self.manifests, self._held_path)
        self._names_file = self.root / "names.json"
        self._models_file = self.root / "models.json"
        self._load_registry()

    def _load_registry(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            names = json.loads(self._names_file.read_text())
            self.names = {str(k): str(v) for k, v in names.items()}
        with contextlib.suppress(ValueError, OSError):
            models = json.loads(self._models_file.read_text())
            for mid, oid in models.items():
                with contextlib.suppress(ModelError, StoreError, OSError):
                    raw = b"".join(self.objects.store.iter_object(oid))
                    self.manifests[mid] = Manifest.from_json(raw, expected_id=mid)
                    self.model_objects[mid] = oid

    def _save_registry(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._names_file.write_text(json.dumps(self.names))
        self._models_file.write_text(json.dumps(self.model_objects))

    async def _keep_manifest(self, manifest: Manifest) -> str:
        """Store a model manifest as an object (pinned: manifests are small and say what the
        shards are) and remember it."""
        raw = manifest.to_json()
        obj = await self.objects.put_bytes(raw, f"model {manifest.name}"[:200], "raw")
        mid = manifest.model_id
        self.manifests[mid] = manifest
        self.model_objects[mid] = obj.id
        self._save_registry()
        return obj.id

    async def add_model(self, path: str, name: str | None = None) -> Manifest:
        """Split a whole-model GGUF into shards, store each as a packed object (moved into
        the store: no second copy), then the model manifest naming them; all pinned."""
        # Packed beside the store's files: moving each shard in is a rename, not a copy.
        with tempfile.TemporaryDirectory(dir=self.objects.store.root, prefix=".add-") as tmp:
            packed = await asyncio.to_thread(ShardStore(tmp).add_model, path)
            blobs = []
            for b in packed.blobs:
                obj = await self.objects.put_file(
                    Path(tmp) / "blobs" / f"{b.sha256}.gguf", f"{b.sha256}.gguf"
                )
                blobs.append(dataclasses.replace(b, object=obj.id))
        manifest = dataclasses.replace(packed, blobs=tuple(blobs))
        await self._keep_manifest(manifest)
        self.names[name or manifest.name or Path(path).stem] = manifest.model_id
        self._save_registry()
        log.info("model %s: %d shards stored as objects", manifest.model_id[:12], len(blobs))
        return manifest

    def resolve(self, model: str) -> str:
        """A model id from a name or an id this node knows."""
        if model in self.manifests:
            return model
        if model in self.names:
            return self.names[model]
        raise ModelError(f"unknown model {model!r}")

    def find(self, model: str) -> str:
        """A model id from a name, an id, or a unique prefix (8+ characters) of an id."""
        with contextlib.suppress(ModelError):
            return self.resolve(model)
        found = sorted(m for m in self.manifests if len(model) >= 8 and m.startswith(model))
        if len(found) > 1:
            raise ModelError(f"model {model!r} is ambiguous: {', '.join(m[:16] for m in found)}")
        if not found:
            raise ModelError(f"unknown model {model!r}")
        return found[0]

    def remove_model(self, model: str) -> dict[str, Any]:
        """Forget a model on this node: its names and manifest, and unpin its objects (the
        manifest's and the shards' no other model here shares). Those no loaded shard holds
        are deleted now; the rest go at a later GC. Returns what was done, object ids in
        ``unpinned`` and ``deleted``."""
        mid = self.find(model)
        manifest = self.manifests.pop(mid)
        own = {b.object for b in manifest.blobs if b.object}
        if (oid := self.model_objects.pop(mid, None)) is not None:
            own.add(oid)
        for other in self.manifests.values():
            own -= {b.object for b in other.blobs if b.object}
        names = sorted(n for n, m in self.names.items() if m == mid)
        for n in names:
            del self.names[n]
        self._save_registry()
        store = self.objects.store
        unpinned = sorted(o for o in own if store.unpin(o))
        free = set(store.collectable())
        deleted = sorted(o for o in own if o in free)
        freed = sum(store.drop(o) for o in deleted)
        log.info("model %s removed: %d objects deleted", mid[:12], len(deleted))
        return {
            "model_id": mid,
            "names": names,
            "unpinned": unpinned,
            "deleted": deleted,
            "freed": freed,
        }

    def _locate(self, blob: BlobInfo) -> Path:
        """The packed data file of a shard (what a runtime opens)."""
        path = self.objects.store.data_path(blob.object) if blob.object else None
        if path is None:
            raise ModelError(f"blob {blob.sha256} is not held here")
        return path

    def _held_path(self, sha: str) -> Path | None:
        for m in self.manifests.values():
            for b in m.blobs:
                if b.sha256 == sha and b.object:
                    path = self.objects.store.data_path(b.object)
                    if path is not None:
                        return path
        return None

    def held_blobs(self, mid: str) -> list[str]:
        m = self.manifests.get(mid)
        store = self.objects.store
        if m is None:
            return []
        return [b.sha256 for b in m.blobs if b.object and store.data_path(b.object) is not None]

    async def rpc_models(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        """The models we know, as a msgpack list in the payload (a header holds only 4 KiB;
        a few models with their held blobs outgrow it)."""
        by_id = {mid: n for n, mid in self.names.items()}
        listing = [
            {
                "model_id": mid,
                "name": by_id.get(mid, m.name),
                "arch": m.architecture,
                "n_layers": m.n_layers,
                "n_units": len(m.units),
                "unit_bytes": [u.nbytes for u in m.units],
                "held": self.held_blobs(mid),
                "context_length": m.chat.context_length if m.chat is not None else None,
                "chat_template": bool(m.chat is not None and m.chat.template),
            }
            for mid, m in self.manifests.items()
        ]
        return Reply({"n": len(listing)}, bytes(msgpack.packb(listing, use_bin_type=True)))

    async def rpc_manifest(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        """A model manifest's bytes, and the store object carrying them (``object``)."""
        mid = params.get("model_id")
        if not isinstance(mid, str) or mid not in self.manifests:
            raise ModelError(f"no manifest for {str(mid)[:70]!r}")
        return Reply({"object": self.model_objects.get(mid)}, self.manifests[mid].to_json())

    async def _manifest(self, mid: str, source: str) -> Manifest:
        """A model's manifest: known, or fetched as the object ``source`` names for it
        (verified twice: the object by its chunks' hashes, the manifest by the model id).
        The source may name any object of the mesh (someone's shard): its size is checked
        before a chunk is pulled, and it is pinned only once it proved to be this manifest."""
        if mid in self.manifests:
            return self.manifests[mid]
        if not _HEX64.match(mid):
            raise ModelError("malformed model id")
        reply = await self.caller.call(source, "compute.manifest", {"model_id": mid}, timeout=30)
        oid = reply.result.get("object")
        if not isinstance(oid, str) or not _HEX64.match(oid):
            raise ModelError(f"{source[:12]} names no object for the manifest of {mid[:12]}")
        store = self.objects.store
        with store.hold(oid):  # not collected between its pull and its read
            raw = await self._manifest_bytes(oid, mid, source)
            manifest = Manifest.from_json(raw, expected_id=mid)  # verified by its hash
            store.pin(oid)
        self.manifests[mid] = manifest
        self.model_objects[mid] = oid
        self._save_registry()
        return manifest

    async def _manifest_bytes(self, oid: str, mid: str, source: str) -> bytes:
        """The bytes of object ``oid``, pulled unpinned (a failure leaves it to GC) and only
        when its manifest says it fits the cap of a model manifest."""
        om = await self.objects.manifest_of(oid, hint=[source])
        if om.size > MODEL_MANIFEST_MAX:
            raise MalformedModelError(
                f"{source[:12]} names object {oid[:12]} of {om.size} bytes as the manifest of "
                f"{mid[:12]} (a manifest is at most {MODEL_MANIFEST_MAX})"
            )
        await self.objects.fetch(oid, hint=[source])
        return await asyncio.to_thread(_read_capped, self.objects.store, oid, MODEL_MANIFEST_MAX)


def _read_capped(store: BlobStore, oid: str, cap: int) -> bytes:
    """A complete object's bytes, refused once they pass ``cap`` (at most one chunk over)."""
    parts, total = [], 0
    for data in store.iter_object(oid):
        total += len(data)
        if total > cap:
            raise MalformedModelError(f"object {oid[:12]} is over {cap} bytes")
        parts.append(data)
    return b"".join(parts)
