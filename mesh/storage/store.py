"""The embedded object store: content-addressed chunks under manifests, a quota, pins and GC.

It is the node's one store: data objects and model shards (GGUF files) alike. Layout under
``root``::

    chunks/<sha256>        chunk bytes (<= CHUNK_MAX), named by their own hash
    packed/<id>.data       a *packed* object: all its chunks, in order, as one file
    packed/<id>.part       a packed object being fetched (chunks written at their offsets)
    manifests/<id>         manifest bytes; the object id is the SHA-256 of these bytes
    pins.json              {object id: {"replicas": R}}: pinned objects are never collected

A **manifest** is canonical JSON ``{"v": 1, "size": N, "chunks": [[sha, size], ...], "name":
..., "format": "raw" | "jsonl" | "gguf"}``. ``gguf`` objects (model shards) are packed: a
runtime memory-maps a shard from one file path, so the store keeps such an object as one data
file and serves its chunks as ranges of it (an index maps chunk sha -> (object, offset, size))
rather than keeping chunk files and a second, assembled copy. A fetch writes each verified
chunk into ``<id>.part`` at its offset and renames it once every chunk is there, so a data
file is only ever complete. ``raw`` and ``jsonl`` objects stay chunk-per-file (a batch job's
task reads one chunk). Every chunk is verified against its own hash before it is
written (so a corrupted chunk is detectable and refetchable one by one) and the manifest
against the object id. ``format == "jsonl"`` objects are cut at line boundaries, so each chunk
holds whole records: a batch job's task is one chunk.

The **quota** bounds the bytes of chunks on disk. Writing a chunk that would exceed it first
collects unpinned objects (least recently used first); if that is not enough, it raises
:class:`QuotaExceeded`. Chunks referenced by a pinned manifest, or by an object being fetched
or written right now (``hold``), are never collected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mesh.storage.manifest import (
    CHUNK_MAX,
    CHUNK_SIZE,
    FORMATS,
    MAX_MANIFEST,
    PACKED,
    Manifest,
    QuotaExceeded,
    StoreError,
    build_manifest,
    is_id,
    iter_chunks,
    parse_manifest,
    sha256,
)

__all__ = [
    "BlobStore",
    "Manifest",
    "StoreError",
    "QuotaExceeded",
    "CHUNK_MAX",
    "CHUNK_SIZE",
    "MAX_MANIFEST",
    "parse_manifest",
    "is_id",
    "FORMATS",
    "PACKED",
    "build_manifest",
    "iter_chunks",
    "sha256",
]

log = logging.getLogger(__name__)
# Objects the store knows (a manifest each). Peers make us learn manifests (replicas asked
# for, objects named as shards or model manifests) whose pulls may never happen: past this,
# unpinned and unused objects go, least recently used first, down to MAX_OBJECTS_KEPT.
MAX_OBJECTS = 8192
MAX_OBJECTS_KEPT = MAX_OBJECTS * 7 // 8


class BlobStore:
    def __init__(self, root: Path, quota: int | None = None) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self.manifest_dir = self.root / "manifests"
        self.packed_dir = self.root / "packed"
        for d in (self.chunk_dir, self.manifest_dir, self.packed_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.quota = quota
        self._trim_at = 0  # objects known past which the next trim runs (past MAX_OBJECTS)
        self._pins_file = self.root / "pins.json"
        self.pins: dict[str, dict[str, Any]] = {}
        # Puts run on the API's worker threads and each pins its object: pins change and
        # reach pins.json one writer at a time.
        self._pins_lock = threading.Lock()
        self._holds: dict[str, int] = {}  # object or chunk ids protected from GC right now
        self._manifests: dict[str, Manifest] = {}
        self._packed: set[str] = set()  # packed objects whose data file is complete
        self._index: dict[str, tuple[str, int, int]] = {}  # chunk sha -> (oid, offset, size)
        self._parts: dict[str, set[int]] = {}  # packed objects being fetched: chunks written
        self.used = 0
        self._load()

    # -- state -----------------------------------------------------------------------------
    def _load(self) -> None:
        for leftover in self.root.glob("pins.*.tmp"):  # a pin write cut short by a crash
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError, ValueError):
            pins = json.loads(self._pins_file.read_text())
            if isinstance(pins, dict):
                self.pins = {k: v for k, v in pins.items() if is_id(k) and isinstance(v, dict)}
        for p in self.chunk_dir.iterdir():
            if is_id(p.name):
                self.used += p.stat().st_size
            elif p.name.endswith(".part"):
                p.unlink(missing_ok=True)  # a write cut short by a crash
        for p in self.manifest_dir.iterdir():
            if is_id(p.name):
                try:
                    self._manifests[p.name] = parse_manifest(p.read_bytes(), p.name, repeats=True)
                except (StoreError, OSError):
                    log.warning("dropping unreadable manifest %s", p.name[:12])
                    p.unlink(missing_ok=True)
        for p in self.packed_dir.iterdir():
            m = self._manifests.get(p.stem)
            if p.suffix == ".data" and m is not None and p.stat().st_size == m.size:
                self._index_packed(m)
                self.used += m.size
            else:  # a fetch cut short, or data without its manifest
                p.unlink(missing_ok=True)

    def _save_pins(self) -> None:
        """Write pins.json whole (a temporary file of its own, then a rename). Call with
        ``_pins_lock`` held."""
        fd, name = tempfile.mkstemp(dir=self.root, prefix="pins.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.pins))
            os.replace(name, self._pins_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise

    # -- chunks ----------------------------------------------------------------------------
    def chunk_path(self, sha: str) -> Path:
        if not is_id(sha):
            raise StoreError(f"not a sha256: {str(sha)[:80]!r}")
        return self.chunk_dir / sha

    def has_chunk(self, sha: str) -> bool:
        return sha in self._index or self.chunk_path(sha).is_file()

    def read_chunk(self, sha: str, offset: int = 0, length: int | None = None) -> bytes:
        """Chunk bytes as stored (not re-verified: the reader verifies what it receives)."""
        want = CHUNK_MAX if length is None else min(length, CHUNK_MAX)
        where = self._index.get(sha) if is_id(sha) else None
        if where is not None:  # a range of a packed object's data file
            oid, start, size = where
            path = self.packed_path(oid)
            try:
                with open(path, "rb") as fh:
                    fh.seek(start + offset)
                    data = fh.read(max(0, min(want, size - offset)))
            except FileNotFoundError:
                raise StoreError(f"no chunk {sha[:12]}") from None
            touch(path)
            return data
        try:
            with open(self.chunk_path(sha), "rb") as fh:
                fh.seek(offset)
                data = fh.read(want)
        except FileNotFoundError:
            raise StoreError(f"no chunk {sha[:12]}") from None
        touch(self.chunk_dir / sha)
        return data

    def write_chunk(self, sha: str, data: bytes) -> bool:
        """Store a chunk after checking its hash; False when it was already there."""
        path = self.chunk_path(sha)
        if len(data) > CHUNK_MAX:
            raise StoreError(f"chunk of {len(data)} bytes exceeds {CHUNK_MAX}")
        if sha256(data) != sha:
            raise StoreError(f"chunk bytes do not hash to {sha[:12]}")
        if path.is_file():
            return False
        self.reserve(len(data))
        tmp = path.with_name(f"{sha}.{os.getpid()}.{id(data)}.part")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        self.used += len(data)
        return True

    def reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` more (collecting unpinned objects) or raise."""
        if self.quota is None or self.used + nbytes <= self.quota:
            return
        self.gc(target=self.quota - nbytes)
        if self.used + nbytes > self.quota:
            raise QuotaExceeded(
                f"store quota {self.quota} bytes: {self.used} used, {nbytes} more needed"
            )

    # -- packed objects --------------------------------------------------------------------
    def packed_path(self, oid: str) -> Path:
        if not is_id(oid):
            raise StoreError(f"not an object id: {str(oid)[:80]!r}")
        return self.packed_dir / f"{oid}.data"

    def data_path(self, oid: str) -> Path | None:
        """The data file of a complete packed object (what a runtime opens), else None."""
        return self.packed_path(oid) if oid in self._packed else None

    def _index_packed(self, m: Manifest) -> None:
        for (sha, n), off in zip(m.chunks, m.offsets(), strict=True):
            self._index.setdefault(sha, (m.id, off, n))
        self._packed.add(m.id)

    def _unindex_packed(self, oid: str) -> None:
        self._packed.discard(oid)
        for sha in [s for s, (o, _, _) in self._index.items() if o == oid]:
            del self._index[sha]
        for m in self._manifests.values():  # a chunk two packed objects share stays served
            if m.id in self._packed:
                for (sha, n), off in zip(m.chunks, m.offsets(), strict=True):
                    self._index.setdefault(sha, (m.id, off, n))

    def begin_packed(self, m: Manifest) -> None:
        """Reserve room for a packed object's data and open its ``.part`` file."""
        if m.id in self._packed or m.id in self._parts:
            return
        with self.hold(m.id):
            self.reserve(m.size)
        part = self.packed_dir / f"{m.id}.part"
        with open(part, "wb") as fh:
            fh.truncate(m.size)
        self.used += m.size
        self._parts[m.id] = set()

    def write_packed(self, m: Manifest, i: int, data: bytes) -> None:
        """Write chunk ``i`` of packed object ``m`` (after checking its hash) at its offset;
        the data file appears, complete, with the last chunk."""
        sha, n = m.chunks[i]
        if len(data) != n or sha256(data) != sha:
            raise StoreError(f"chunk {i} of {m.id[:12]} does not hash to {sha[:12]}")
        done = self._parts.get(m.id)
        if done is None:
            raise StoreError(f"no fetch of {m.id[:12]} is under way")
        part = self.packed_dir / f"{m.id}.part"
        with open(part, "r+b") as fh:
            fh.seek(m.offsets()[i])
            fh.write(data)
        done.add(i)
        if len(done) == len(m.chunks):
            os.replace(part, self.packed_path(m.id))
            del self._parts[m.id]
            self._index_packed(m)

    def abort_packed(self, oid: str) -> None:
        """Drop the ``.part`` of a fetch that failed (its bytes leave the quota)."""
        if self._parts.pop(oid, None) is not None:
            (self.packed_dir / f"{oid}.part").unlink(missing_ok=True)
            m = self._manifests.get(oid)
            self.used -= m.size if m is not None else 0

    def put_file(self, path: Path, name: str = "", fmt: str = PACKED) -> Manifest:
        """Store the file at ``path`` as a packed object by *moving* it into the store (no
        second copy); the new object is pinned. ``path`` must be on the store's filesystem."""
        with open(path, "rb") as fh:
            chunks = [(sha256(d), len(d)) for d in iter_chunks(fh, "raw", CHUNK_SIZE)]
        m = build_manifest(chunks, name, fmt)
        with self.hold(m.id):
            self.add_manifest(m.raw, m.id)
            if m.id in self._packed:
                Path(path).unlink()
            else:
                self.reserve(m.size)
                _move(Path(path), self.packed_path(m.id))
                self.used += m.size
                self._index_packed(m)
            self.pin(m.id)
        return m

    # -- objects ---------------------------------------------------------------------------
    def manifest(self, oid: str) -> Manifest | None:
        return self._manifests.get(oid) if is_id(oid) else None

    def add_manifest(self, raw: bytes, oid: str) -> Manifest:
        # repeats: our own puts may repeat a chunk; a peer's manifest was parsed strictly
        # before it got here (ObjectService.get_manifest)
        m = parse_manifest(raw, oid, repeats=True)
        if oid not in self._manifests:
            path = self.manifest_dir / oid
            tmp = path.with_name(oid + ".part")
            tmp.write_bytes(raw)
            os.replace(tmp, path)
            self._manifests[oid] = m
            if len(self._manifests) > max(MAX_OBJECTS, self._trim_at):
                self._trim(keep=oid)
        return m

    def _trim(self, keep: str) -> None:
        """Drop unpinned, unused objects (least recently used first) down to the bound. If
        too few can go (pinned or in use), the next try waits for 1/8 more objects: each
        try stats every object and lists the chunks."""
        over = len(self._manifests) - MAX_OBJECTS_KEPT
        victims = [oid for oid in self.collectable() if oid != keep][:over]
        for oid in victims:
            self._forget(oid)
        if victims:
            self._sweep(self._protected_chunks())  # once for them all
        self._trim_at = len(self._manifests) + (MAX_OBJECTS - MAX_OBJECTS_KEPT)
        log.info("the store knew over %d objects: dropped %d unused", MAX_OBJECTS, len(victims))

    def missing(self, m: Manifest) -> list[int]:
        if m.format == PACKED:  # only its own data file counts: a runtime opens that
            if m.id in self._packed:
                return []
            done = self._parts.get(m.id, set())
            return [i for i in range(len(m.chunks)) if i not in done]
        return [i for i, (sha, _) in enumerate(m.chunks) if not self.has_chunk(sha)]

    def complete(self, oid: str) -> bool:
        m = self.manifest(oid)
        return m is not None and not self.missing(m)

    def objects(self) -> list[dict[str, Any]]:
        return [
            {**m.as_dict(), "pinned": oid in self.pins, "complete": not self.missing(m)}
            for oid, m in self._manifests.items()
        ]

    def put_stream(
        self, fh: BinaryIO, name: str = "", fmt: str = "raw", chunk_size: int = CHUNK_SIZE
    ) -> Manifest:
        """Chunk, hash and store a stream; the new object is pinned (held on purpose)."""
        if fmt == PACKED:
            raise StoreError(f"{PACKED} objects are stored from a file (put_file)")
        chunks: list[tuple[str, int]] = []
        with self.hold("put"):
            for data in iter_chunks(fh, fmt, chunk_size):
                sha = sha256(data)
                self._holds[sha] = self._holds.get(sha, 0) + 1  # not collected mid-put
                self.write_chunk(sha, data)
                chunks.append((sha, len(data)))
            m = build_manifest(chunks, name, fmt)
            self.add_manifest(m.raw, m.id)
            self.pin(m.id)
            for sha, _ in chunks:
                self._release(sha)
        return m

    def put_bytes(self, data: bytes, name: str = "", fmt: str = "raw") -> Manifest:
        import io

        return self.put_stream(io.BytesIO(data), name, fmt)

    def export(self, oid: str, dest: Path) -> int:
        """Write a complete object to ``dest`` (atomically); returns its size."""
        m = self.manifest(oid)
        if m is None or self.missing(m):
            raise StoreError(f"object {oid[:12]} is not complete here")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        with open(tmp, "wb") as out:
            for sha, _ in m.chunks:
                out.write(self.read_chunk(sha))
        os.replace(tmp, dest)
        return m.size

    def iter_object(self, oid: str) -> Iterator[bytes]:
        m = self.manifest(oid)
        if m is None or self.missing(m):
            raise StoreError(f"object {oid[:12]} is not complete here")
        for sha, _ in m.chunks:
            yield self.read_chunk(sha)

    # -- pins, holds, GC -------------------------------------------------------------------
    def pin(self, oid: str, replicas: int | None = None, for_peer: str | None = None) -> None:
        """Pin ``oid``; ``for_peer`` charges its bytes to the peer that asked us to keep it
        (a pin without it is this node's own and charges nobody)."""
        if self.manifest(oid) is None:
            raise StoreError(f"no object {oid[:12]} here")
        with self._pins_lock:
            fresh = oid not in self.pins
            entry = self.pins.setdefault(oid, {})
            if replicas is not None:
                entry["replicas"] = replicas
            if for_peer is None:
                entry.pop("for", None)
            elif fresh:
                entry["for"] = for_peer
            self._save_pins()

    def pinned_for(self, peer: str) -> int:
        """Bytes of the objects pinned here at ``peer``'s request."""
        total = 0
        with self._pins_lock:
            pins = list(self.pins.items())
        for oid, entry in pins:
            m = self._manifests.get(oid)
            if entry.get("for") == peer and m is not None:
                total += m.size
        return total

    def unpin(self, oid: str) -> bool:
        with self._pins_lock:
            if self.pins.pop(oid, None) is None:
                return False
            self._save_pins()
        return True

    @contextlib.contextmanager
    def hold(self, oid: str) -> Iterator[None]:
        """Protect ``oid`` (and its chunks) from GC while a fetch or put is running."""
        self.acquire(oid)
        try:
            yield
        finally:
            self._release(oid)

    def acquire(self, oid: str) -> None:
        """Protect ``oid`` from GC until :meth:`release` (a loaded shard holds its objects)."""
        self._holds[oid] = self._holds.get(oid, 0) + 1

    def release(self, oid: str) -> None:
        self._release(oid)

    def _release(self, key: str) -> None:
        n = self._holds.get(key, 0) - 1
        if n <= 0:
            self._holds.pop(key, None)
        else:
            self._holds[key] = n

    def _protected_chunks(self) -> set[str]:
        keep = {k for k in self._holds if is_id(k)}
        for oid in list(self.pins) + list(self._holds):
            m = self._manifests.get(oid)
            if m is not None:
                keep.update(m.shas)
        return keep

    def collectable(self) -> list[str]:
        """Objects GC may take (neither pinned nor held), least recently used first."""
        victims = [
            oid for oid in self._manifests if oid not in self.pins and oid not in self._holds
        ]

        def last_used(oid: str) -> float:
            seen = _mtime(self.manifest_dir / oid)
            return max(seen, _mtime(self.packed_path(oid))) if oid in self._packed else seen

        return sorted(victims, key=last_used)

    def drop(self, oid: str) -> int:
        """Remove an object and the chunks nothing else references; returns bytes freed."""
        return self._forget(oid) + self._sweep(self._protected_chunks())

    def _forget(self, oid: str) -> int:
        """Remove an object's manifest (and packed file); its chunks stay for a sweep."""
        m = self._manifests.pop(oid)
        (self.manifest_dir / oid).unlink(missing_ok=True)
        freed = 0
        if oid in self._packed:
            self._unindex_packed(oid)
            with contextlib.suppress(FileNotFoundError):
                self.packed_path(oid).unlink()
                self.used -= m.size
                freed += m.size
        return freed

    def gc(self, target: int | None = None) -> dict[str, int]:
        """Collect unpinned objects, least recently used first, until ``used <= target``
        (``None``: collect every unpinned object and every unreferenced chunk)."""
        removed_objects = removed_bytes = 0
        for oid in self.collectable():
            if target is not None and self.used <= target:
                break
            removed_bytes += self.drop(oid)
            removed_objects += 1
        if target is None or self.used > target:
            removed_bytes += self._sweep(self._protected_chunks())
        return {"objects": removed_objects, "bytes": removed_bytes, "used": self.used}

    def _sweep(self, keep: set[str]) -> int:
        referenced = set(keep)
        for m in self._manifests.values():
            referenced.update(m.shas)
        freed = 0
        for p in self.chunk_dir.iterdir():
            if is_id(p.name) and p.name not in referenced:
                with contextlib.suppress(FileNotFoundError):
                    size = p.stat().st_size
                    p.unlink()
                    self.used -= size
                    freed += size
        return freed

    def usage(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "quota": self.quota,
            "objects": len(self._manifests),
            "pinned": len(self.pins),
        }


def _move(src: Path, dest: Path) -> None:
    """A rename where possible (no second copy); a copy only across filesystems."""
    try:
        os.replace(src, dest)
    except OSError:
        tmp = dest.with_suffix(".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        src.unlink()


def touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path, (time.time(), time.time()))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
