"""Disk room for pulled model shards, made through the object store's GC.

A peer that opens a stage session makes this node pull the shards of that stage; without a
bound, a peer serving a made-up huge model could fill the disk. Room is made by collecting
objects the store may collect (least recently used first): neither pinned (what was added
here, replicas kept for others) nor held (loaded shards, pulls under way). What is left must
fit under the limit and leave a reserve free on the filesystem.
"""

from __future__ import annotations

import logging
import shutil

from mesh.storage.store import BlobStore

__all__ = ["disk_shortfall", "DISK_RESERVE"]

log = logging.getLogger(__name__)
DISK_RESERVE = 1 << 30  # always left free on the filesystem


def disk_shortfall(
    store: BlobStore, need: int, limit: int | None, reserve: int = DISK_RESERVE
) -> int:
    """Make room for ``need`` more bytes in ``store``; returns the bytes still missing
    (0: it fits). Pinned and held objects are never collected."""

    def missing() -> int:
        over_limit = store.used + need - limit if limit is not None else 0
        free = shutil.disk_usage(store.root).free
        return max(over_limit, need + reserve - free, 0)

    for oid in store.collectable():
        if missing() <= 0:
            break
        freed = store.drop(oid)
        log.info("collected object %s (%d MiB) to make room", oid[:12], freed >> 20)
    return missing()
