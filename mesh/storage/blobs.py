"""Content-addressed blobs on peers: serving byte ranges, and pulling a blob from its holders.

A blob is named by the SHA-256 of its bytes. A pull splits it into ``CHUNK`` ranges fetched
in parallel from every holder that has it (a few ranges in flight per holder), moves on to
another holder when one fails or dies, and verifies the whole blob against its name before it
becomes visible in the store: nothing unverified is ever used. A holder whose bytes fail the
hash is penalized (tried last) and the blob is fetched again from the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import Error
from mesh.net.rpc import CallContext, Caller, Reply

__all__ = ["BlobError", "StorageService", "Transfer", "fetch_blob", "CHUNK"]

log = logging.getLogger(__name__)
CHUNK = 1 << 20
RANGE_DEADLINE_FACTOR = 4.0  # x the median range time, with another holder left
RANGE_DEADLINE_FLOOR = 1.5  # seconds
MAX_READ = 4 * CHUNK
PER_HOLDER = 3  # ranges in flight per holder: keeps each link busy without flooding it
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BlobError(Error):
    """A blob is missing, malformed, or no holder could deliver bytes that match its hash."""


@dataclass
class Transfer:
    """Progress of one pull, shown on the API and by the demo's progress bar."""

    sha256: str
    size: int
    done: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # bytes per holder
    started: float = field(default_factory=time.monotonic)
    failed_sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return {
            "sha256": self.sha256,
            "size": self.size,
            "done": self.done,
            "sources": dict(self.sources),
            "mb_per_s": round(self.done / elapsed / 1e6, 2),
        }


class StorageService:
    """Serves the blobs under ``blob_dir`` (files named ``<sha256><suffix>``)."""

    def __init__(self, blob_dir: Path, suffix: str = ".gguf") -> None:
        self.blob_dir = Path(blob_dir)
        self.suffix = suffix
        self.bytes_served: dict[str, int] = {}  # per peer
        # The node's serve-rate pacer (--serve-rate): model shards count against it as objects do.
        self.pace: Callable[[int], Awaitable[None]] | None = None

    def path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _HEX64.match(sha256):
            raise BlobError(f"not a sha256: {str(sha256)[:80]!r}")
        return self.blob_dir / f"{sha256}{self.suffix}"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def rpc_blob_has(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        shas = params.get("shas")
        if not isinstance(shas, list) or len(shas) > 1024:
            raise BlobError("shas must be a list of at most 1024 hashes")
        return {"has": [s for s in shas if isinstance(s, str) and _HEX64.match(s) and self.has(s)]}

    async def read_range(self, peer: str, sha256: Any, offset: Any, length: Any) -> bytes:
        """A byte range of a blob for ``peer`` (the RPC and the fast path both use this)."""
        path = self.path(sha256)
        if type(offset) is not int or type(length) is not int or offset < 0:
            raise BlobError("offset and length must be non-negative integers")
        if not 0 < length <= MAX_READ:
            raise BlobError(f"length must be in 1..{MAX_READ}")
        try:
            data = await asyncio.to_thread(_read_range, path, offset, length)
        except FileNotFoundError:
            raise BlobError(f"no blob {path.stem}") from None
        self.bytes_served[peer] = self.bytes_served.get(peer, 0) + len(data)
        if self.pace is not None:
            await self.pace(len(data))
        return data

    async def rpc_blob_read(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        data = await self.read_range(
            ctx.peer_id, params.get("sha256"), params.get("offset"), params.get("length")
        )
        return Reply({"n": len(data)}, data)


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def _write_range(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


async def fetch_blob(
    caller: Caller,
    sha256: str,
    size: int,
    holders: list[str],
    dest: Path,
    *,
    transfer: Transfer | None = None,
    penalized: set[str] | None = None,
    on_progress: Callable[[Transfer], Awaitable[None] | None] | None = None,
    timeout: float = 60.0,
    reader: RangeReader | None = None,
) -> Transfer:
    """Pull a blob from ``holders`` into ``dest`` (atomically, verified). Raises BlobError."""
    if not _HEX64.match(sha256) or size < 0:
        raise BlobError("bad blob name or size")
    if not holders:
        raise BlobError(f"no peer holds blob {sha256[:12]}")
    penalized = penalized if penalized is not None else set()
    transfer = transfer or Transfer(sha256, size)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    read = reader or _rpc_reader(caller, timeout)
    holders = list(dict.fromkeys(holders))
    # First every holder in parallel; if the bytes do not match, one holder at a time, so a
    # holder that serves wrong bytes is singled out and cannot spoil the others' transfers.
    rounds = [holders] + [[h] for h in sorted(holders, key=lambda h: h in penalized)]
    bad: set[str] = set()
    try:
        for group in rounds:
            live = [h for h in group if h not in bad]
            if not live:
                continue
            await asyncio.to_thread(_preallocate, tmp, size)
            transfer.done = 0
            transfer.sources.clear()
            try:
                await _pull_ranges(read, sha256, size, live, tmp, transfer, on_progress)
            except BlobError as exc:
                log.info("blob %s from %s: %s", sha256[:12], [h[:12] for h in live], exc)
                continue
            got = await asyncio.to_thread(_hash_file, tmp)
            if got == sha256:
                os.replace(tmp, dest)
                return transfer
            log.warning(
                "blob %s from %s hashed to %s: trying holders one by one",
                sha256[:12],
                [h[:12] for h in transfer.sources],
                got[:12],
            )
            if len(live) == 1:
                bad.add(live[0])
                penalized.add(live[0])
                transfer.failed_sources.append(live[0])
    finally:
        tmp.unlink(missing_ok=True)
    raise BlobError(f"no holder delivered blob {sha256[:12]} intact")


def _preallocate(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


RangeReader = Callable[[str, str, int, int], Awaitable[bytes]]


def _rpc_reader(caller: Caller, timeout: float) -> RangeReader:
    async def read(holder: str, sha256: str, offset: int, length: int) -> bytes:
        params = {"sha256": sha256, "offset": offset, "length": length}
        return (await caller.call(holder, "blob_read", params, timeout=timeout)).payload

    return read


async def _pull_ranges(
    read: RangeReader,
    sha256: str,
    size: int,
    holders: list[str],
    tmp: Path,
    transfer: Transfer,
    on_progress: Callable[[Transfer], Awaitable[None] | None] | None,
) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for offset in range(0, size, CHUNK):
        queue.put_nowait(offset)
    dead: set[str] = set()
    took: list[float] = []  # seconds per range served, any holder

    def deadline(holder: str) -> float | None:
        """A range far slower than the ones served so far means a dead or stalled holder:
        give its range to the others rather than wait out the RPC deadline. Only while
        another holder is left, and only once there is something to compare with."""
        if len(took) < 3 or not [h for h in holders if h not in dead and h != holder]:
            return None
        return max(RANGE_DEADLINE_FLOOR, RANGE_DEADLINE_FACTOR * statistics.median(took[-32:]))

    async def within_deadline(coro: Awaitable[bytes], holder: str, t0: float) -> bytes:
        # The deadline is looked at again while the read runs: reads started before any
        # sample existed are judged too.
        task = asyncio.ensure_future(coro)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=RANGE_DEADLINE_FLOOR / 3)
                if done:
                    return task.result()
                if holder in dead:  # its other ranges timed out: this one goes elsewhere too
                    raise TimeoutError("holder left behind")
                limit = deadline(holder)
                if limit is not None and time.monotonic() - t0 > limit:
                    raise TimeoutError(f"range not served in {limit:.1f} s")
        finally:
            task.cancel()

    async def worker(holder: str) -> None:
        while holder not in dead:
            try:
                offset = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            length = min(CHUNK, size - offset)
            t0 = time.monotonic()
            try:
                data = await within_deadline(read(holder, sha256, offset, length), holder, t0)
                if len(data) != length:
                    raise BlobError(f"{holder[:12]} sent {len(data)} of {length} bytes")
            except Exception as exc:  # any holder failure: the others take over its ranges
                log.info(
                    "blob %s: holder %s failed (%s); others take over",
                    sha256[:12],
                    holder[:12],
                    exc,
                )
                if holder not in dead:
                    dead.add(holder)
                    transfer.failed_sources.append(holder)
                queue.put_nowait(offset)  # resume this range elsewhere
                return
            took.append(time.monotonic() - t0)
            await asyncio.to_thread(_write_range, tmp, offset, data)
            transfer.done += length
            transfer.sources[holder] = transfer.sources.get(holder, 0) + length
            if on_progress is not None:
                maybe = on_progress(transfer)
                if maybe is not None:
                    await maybe

    while not queue.empty():
        alive = [h for h in holders if h not in dead]
        if not alive:
            raise BlobError(f"every holder of blob {sha256[:12]} failed")
        await asyncio.gather(*(worker(h) for h in alive for _ in range(PER_HOLDER)))
