"""Disk room for pulled model shards.

A peer that opens a stage session makes this node pull the blobs of that stage; without a
bound, a peer serving a made-up huge model could fill the disk. Blobs this node does not need
(not of a model added here, not of a loaded shard, not being pulled) are evicted least
recently used first; what is left must fit under the limit and leave a reserve free.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["disk_shortfall", "DISK_RESERVE"]

log = logging.getLogger(__name__)
DISK_RESERVE = 1 << 30  # always left free on the filesystem


def disk_shortfall(
    blob_dir: Path, need: int, limit: int | None, keep: set[str], reserve: int = DISK_RESERVE
) -> int:
    """Make room for ``need`` more bytes in ``blob_dir``; returns the bytes still missing
    (0: it fits). ``keep``: sha256s never evicted."""
    entries = []
    used = 0
    if blob_dir.is_dir():
        for e in os.scandir(blob_dir):
            if not e.is_file() or not e.name.endswith(".gguf") or e.name.startswith("."):
                continue
            st = e.stat()
            used += st.st_size
            entries.append((st.st_mtime, e.name.removesuffix(".gguf"), st.st_size, e.path))

    where = blob_dir
    while not where.exists() and where != where.parent:  # a store not made yet: its disk
        where = where.parent

    def missing() -> int:
        over_limit = used + need - limit if limit is not None else 0
        free = shutil.disk_usage(where).free
        return max(over_limit, need + reserve - free, 0)

    for _, sha, size, path in sorted(entries):  # oldest first
        if missing() <= 0:
            break
        if sha in keep:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        used -= size
        log.info("evicted pulled blob %s (%d MiB) to make room", sha[:12], size >> 20)
    return missing()
