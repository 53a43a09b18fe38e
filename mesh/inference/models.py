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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack

from mesh.errors import Error
from mesh.inference.prompts import Tokenizers
from mesh.net.callers import MeshCaller as Caller
from mesh.net.rpc import CallContext, Reply
from mesh.net.wire import check_depth
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
MAX_FOREIGN = 32  # peers' model manifests kept (and pinned) here: at most 128 MiB of them
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def models_of(reply: Reply) -> list[dict[str, Any]]:
    """The listing of a ``models`` reply, size-capped and type-checked (it is untrusted)."""
    if len(reply.payload) > MAX_MODELS_REPLY:
        return []
    try:
        items = msgpack.unpackb(reply.payload, raw=False, max_ext_len=0)
        check_depth(items, what="models listing")  # the API shows peers' names as they are
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


class ForeignManifests:
    """The objects of peers' model manifests this node fetched (it added none of them), most
    recently used last. Any peer may make us learn new ones, so the registry keeps at most
    ``MAX_FOREIGN`` (evicting those no shard or stage uses); each object is pinned while kept
    (peers may fetch it from us) by this cache unless it was pinned already, and unpinned,
    so collectable, when evicted. ``path`` keeps the order and the pins this cache took."""

    def __init__(self, path: Path, store: BlobStore) -> None:
        self.path = path
        self.store = store
        self.objects: OrderedDict[str, str] = OrderedDict()  # model id -> manifest object
        self.pinned: set[str] = set()  # objects this cache pinned

    def __contains__(self, mid: object) -> bool:
        return mid in self.objects

    def get(self, mid: str) -> str | None:
        return self.objects.get(mid)

    def load(self) -> list[tuple[str, str]]:
        """The (model id, object) pairs saved, oldest first (malformed entries skipped)."""
        try:
            doc = json.loads(self.path.read_text())
        except (ValueError, OSError):
            return []
        out = []
        for entry in doc if isinstance(doc, list) else []:
            if isinstance(entry, list) and len(entry) == 3:
                mid, oid, ours = entry
                if isinstance(mid, str) and isinstance(oid, str) and ours is True:
                    self.pinned.add(oid)
                if isinstance(mid, str) and isinstance(oid, str):
                    out.append((mid, oid))
        return out

    def save(self) -> None:
        doc = [[mid, oid, oid in self.pinned] for mid, oid in self.objects.items()]
        self.path.write_text(json.dumps(doc))

    def add(self, mid: str, oid: str) -> None:
        if oid not in self.store.pins:
            self.store.pin(oid)
            self.pinned.add(oid)
        self.objects[mid] = oid
        self.objects.move_to_end(mid)

    def touch(self, mid: str) -> None:
        if mid in self.objects:
            self.objects.move_to_end(mid)

    def forget(self, mid: str) -> str | None:
        """Drop ``mid``; its object is unpinned if this cache pinned it. Returns the object."""
        oid = self.objects.pop(mid, None)
        if oid is not None and oid in self.pinned:
            self.pinned.discard(oid)
            self.store.unpin(oid)
        return oid

    def evict(self, cap: int, in_use: Callable[[str], bool]) -> list[str]:
        """Forget the least recently used over ``cap``, never one in use; returns their ids."""
        over = len(self.objects) - cap
        gone = []
        for mid in list(self.objects):
            if over <= 0:
                break
            if not in_use(mid):
                self.forget(mid)
                gone.append(mid)
                over -= 1
        return gone


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
        self.model_objects: dict[str, str] = {}  # model id -> object of its manifest (own)
        self.foreign = ForeignManifests(self.root / "foreign.json", self.objects.store)
        self._using: dict[str, int] = {}  # model id -> stages being opened for it
        self.tokenizers = Tokenizers(self.manifests, self._held_path)
        self._names_file = self.root / "names.json"
        self._models_file = self.root / "models.json"
        self._load_registry()

    def _load_registry(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            names = json.loads(self._names_file.read_text())
            self.names = {str(k): str(v) for k, v in names.items()}
        models: dict[str, str] = {}
        with contextlib.suppress(ValueError, OSError):
            doc = json.loads(self._models_file.read_text())
            models = {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}
        # Registries older than the cache kept every peer's manifest here, pinned: those
        # (never named, as every model added here is) join it, unpinned when they go.
        named = set(self.names.values())
        old = not self.foreign.path.exists()
        legacy = [(mid, oid) for mid, oid in models.items() if old and mid not in named]
        models = {mid: oid for mid, oid in models.items() if (mid, oid) not in legacy}
        self.foreign.pinned.update(oid for _, oid in legacy)
        for mid, oid in [*legacy, *self.foreign.load()]:
            self.foreign.objects[mid] = oid
            if (m := self._stored_manifest(mid, oid)) is not None:
                self.manifests[mid] = m
            else:
                self.foreign.forget(mid)
        for mid, oid in models.items():
            if (m := self._stored_manifest(mid, oid)) is not None:
                self.manifests[mid] = m
                self.model_objects[mid] = oid
        for mid in self.foreign.evict(MAX_FOREIGN, lambda mid: False):  # nothing in use yet
            self.manifests.pop(mid, None)
        if legacy:
            self._save_registry()

    def _stored_manifest(self, mid: str, oid: str) -> Manifest | None:
        with contextlib.suppress(ModelError, StoreError, OSError):
            raw = _read_capped(self.objects.store, oid, MODEL_MANIFEST_MAX)
            return Manifest.from_json(raw, expected_id=mid)
        return None

    def _save_registry(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._names_file.write_text(json.dumps(self.names))
        self._models_file.write_text(json.dumps(self.model_objects))
        self.foreign.save()

    @contextlib.contextmanager
    def using(self, mid: str) -> Iterator[None]:
        """Keep ``mid``'s manifest while a stage is opened for it (no eviction mid-open)."""
        self._using[mid] = self._using.get(mid, 0) + 1
        try:
            yield
        finally:
            n = self._using.pop(mid) - 1
            if n > 0:
                self._using[mid] = n

    def _in_use(self, mid: str) -> bool:
        """Whether a foreign manifest must stay (the shard layer adds its loaded shards)."""
        return mid in self._using

    def _evict_foreign(self) -> None:
        for mid in self.foreign.evict(MAX_FOREIGN, self._in_use):
            self.manifests.pop(mid, None)
            log.info("foreign manifest %s evicted", mid[:12])

    async def _keep_manifest(self, manifest: Manifest) -> str:
        """Store a model manifest as an object (pinned: manifests are small and say what the
        shards are) and remember it."""
        raw = manifest.to_json()
        mid = manifest.model_id
        self.foreign.forget(mid)  # a peer's manifest we now add ourselves: ours, pinned below
        obj = await self.objects.put_bytes(raw, f"model {manifest.name}"[:200], "raw")
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
        if (oid := self.model_objects.pop(mid, None) or self.foreign.forget(mid)) is not None:
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
        a few models with their held blobs outgrow it). Ours first, then peers' manifests
        most recently used first, as many as fit the cap a peer reads: peers' manifests
        cannot crowd ours out (a listing over the cap would be read as none at all)."""
        foreign = list(reversed(self.foreign.objects))
        order = [m for m in self.manifests if m not in self.foreign] + foreign
        listing, room = [], MAX_MODELS_REPLY - 5  # a msgpack list's header: at most 5 bytes
        for mid in order:
            m = self.manifests.get(mid)
            if m is None:
                continue
            entry = bytes(msgpack.packb(self._listing(mid, m), use_bin_type=True))
            if len(entry) > room:
                continue
            listing.append(entry)
            room -= len(entry)
        head = bytes(msgpack.Packer().pack_array_header(len(listing)))
        return Reply({"n": len(listing)}, head + b"".join(listing))

    def _listing(self, mid: str, m: Manifest) -> dict[str, Any]:
        names = [n for n, v in self.names.items() if v == mid]
        return {
            "model_id": mid,
            "name": names[-1] if names else m.name,
            "arch": m.architecture,
            "n_layers": m.n_layers,
            "n_units": len(m.units),
            "unit_bytes": [u.nbytes for u in m.units],
            "held": self.held_blobs(mid),
            "context_length": m.chat.context_length if m.chat is not None else None,
            "chat_template": bool(m.chat is not None and m.chat.template),
        }

    async def rpc_manifest(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        """A model manifest's bytes, and the store object carrying them (``object``)."""
        mid = params.get("model_id")
        if not isinstance(mid, str) or mid not in self.manifests:
            raise ModelError(f"no manifest for {str(mid)[:70]!r}")
        oid = self.model_objects.get(mid) or self.foreign.get(mid)
        return Reply({"object": oid}, self.manifests[mid].to_json())

    async def _manifest(self, mid: str, source: str) -> Manifest:
        """A model's manifest: known, or fetched as the object ``source`` names for it
        (verified twice: the object by its chunks' hashes, the manifest by the model id).
        The source may name any object of the mesh (someone's shard): its size is checked
        before a chunk is pulled, and it is pinned only once it proved to be this manifest."""
        if mid in self.manifests:
            self.foreign.touch(mid)
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
            self.foreign.add(mid, oid)  # pinned now that it proved to be this manifest
        self.manifests[mid] = manifest
        with self.using(mid):  # the one just asked for is not the one to go
            self._evict_foreign()
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
