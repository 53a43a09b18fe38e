"""Pulling the shards a stage needs, through the object service's fetch, within a disk limit.

A shard is a packed store object: its fetch takes the nearest holders first, several in
parallel, verifies every chunk by its hash, penalizes a holder that serves bad bytes and
uses the fast path where it reaches a holder (the data channel otherwise). Room on disk is
made by the store's GC (:func:`mesh.storage.quota.disk_shortfall`): pins keep the models
added here, holds keep loaded shards and pulls under way, the rest may be collected.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from mesh.inference.models import CapacityError, ComputeConfig, ModelRegistry, ShardObjects
from mesh.net.callers import MeshCaller as Caller
from mesh.storage.fetch import FetchState
from mesh.storage.locks import KeyedLocks
from mesh.storage.quota import disk_shortfall
from mesh.storage.store import PACKED
from runtimes.errors import ModelError, ShardIntegrityError
from runtimes.shards import BlobInfo, Manifest

__all__ = ["ShardPulls"]

log = logging.getLogger(__name__)


class ShardPulls(ModelRegistry):
    """Pulls of the shards of unit ranges this node is asked to run."""

    def __init__(
        self,
        caller: Caller,
        me: str,
        root: Path,
        config: ComputeConfig,
        objects: ShardObjects | None = None,
    ) -> None:
        super().__init__(caller, me, root, config, objects)
        self._shard_locks = KeyedLocks()

    @property
    def transfers(self) -> dict[str, FetchState]:
        """Fetches under way (shards and every other object): one transfers view."""
        return self.objects.transfers

    def has_blob(self, blob: BlobInfo) -> bool:
        return bool(blob.object) and self.objects.store.data_path(blob.object) is not None

    async def ensure_blobs(
        self, manifest: Manifest, start: int, end: int, hint: dict[str, list[str]] | None = None
    ) -> int:
        """Pull the shards of units [start, end) we lack; returns the bytes pulled.
        ``hint``: holders by shard sha256 (the coordinator's view)."""
        pulled = 0
        for blob in manifest.blobs_for(start, end):
            async with self._shard_locks.hold(blob.sha256):  # one pull for two sessions
                if self.has_blob(blob):
                    continue
                self._disk_room(blob.size)  # the claim first: no peer is asked for less
                if not blob.object:
                    raise ModelError(f"the manifest names no store object for {blob.sha256[:12]}")
                holders = [h for h in (hint or {}).get(blob.sha256, []) if h != self.me]
                await self._check_object(blob, holders)
                self._disk_room(blob.size)  # again: the store changed while we asked
                await self.objects.fetch(blob.object, hint=holders)
                pulled += blob.size
        return pulled

    async def _check_object(self, blob: BlobInfo, holders: list[str]) -> None:
        """Refuse a shard whose object is not what its manifest claims, before a chunk is
        pulled: a self-consistent manifest may claim 1 byte for a huge object, and the disk
        limit was checked against the claim (the bytes' hash is checked after the pull)."""
        om = await self.objects.manifest_of(blob.object, hint=holders)
        if om.size != blob.size:
            raise ShardIntegrityError(
                f"blob {blob.sha256[:12]}: the manifest says {blob.size} bytes, its object "
                f"{blob.object[:12]} holds {om.size}"
            )
        if om.format != PACKED:  # a runtime opens only a packed object's one data file
            raise ShardIntegrityError(
                f"blob {blob.sha256[:12]}: its object {blob.object[:12]} is {om.format}, "
                f"not a {PACKED} shard"
            )

    @contextlib.contextmanager
    def holding(self, manifest: Manifest, start: int, end: int) -> Iterator[None]:
        """Hold the store objects of units [start, end) (GC and the disk limit leave them)."""
        oids = [b.object for b in manifest.blobs_for(start, end) if b.object]
        for oid in oids:
            self.objects.store.acquire(oid)
        try:
            yield
        finally:
            for oid in oids:
                self.objects.store.release(oid)

    def _disk_room(self, size: int) -> None:
        """Collect what the store may collect, or refuse the pull (a peer must not fill our
        disk); checked before a byte is fetched."""
        short = disk_shortfall(self.objects.store, size, self.config.disk_limit)
        if short > 0:
            raise CapacityError(
                f"no disk room for a {size >> 20} MiB shard ({short >> 20} MiB short)"
            )
