"""Nearest-holder fetch of chunks: lowest cost first, several sources in parallel, resumable.

Each missing chunk is taken by the sources in its *near tier*: the sources it may still come
from (alive, not caught serving it corrupted) whose estimated cost is within ``near_factor``
(plus ``near_slack_ms``) of the cheapest one. Each source in a tier runs ``per_source``
requests at once, so equal holders share the work. A chunk is verified against its own hash
on arrival: bytes that fail make the source a bad one *for that chunk*, penalize it (its cost
rises for every later choice) and leave the chunk to the other sources. A source whose call
fails (it died, timed out, or refused) is dropped; the round ends, the tiers are recomputed
over the sources left, and the fetch goes on from the chunks already held: nothing verified
is fetched twice. A source that stops answering without closing its link (a stalled or
killed peer) is given up on after a few times the median chunk time, while another source
is left, rather than after the RPC deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import RPCError
from mesh.net.callers import Caller
from mesh.storage.store import CHUNK_MAX, StoreError

__all__ = ["FetchState", "fetch_chunks", "Caller"]

log = logging.getLogger(__name__)
STALL_FACTOR = 4.0  # x the median chunk time, with another source left
STALL_FLOOR = 1.5  # seconds


@dataclass
class FetchState:
    """Progress of one fetch (shown on the API and by ``edgemesh get``)."""

    oid: str
    total: int
    done: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    corrupt: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        elapsed = max((self.finished or time.monotonic()) - self.started, 1e-6)
        return {
            "id": self.oid,
            "size": self.total,
            "done": self.done,
            "chunks": self.chunks_total,
            "chunks_done": self.chunks_done,
            "sources": dict(self.sources),
            "failed_sources": list(self.failed),
            "corrupt": dict(self.corrupt),
            "seconds": round(elapsed, 3),
            "mb_per_s": round(self.done / elapsed / 1e6, 2),
        }


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Reader = Callable[[str, str, int], Awaitable[bytes]]


async def fetch_chunks(
    caller: Caller,
    chunks: list[tuple[str, int]],
    need: list[int],
    sources: list[str],
    cost: Callable[[str, int], float],
    sink: Callable[[int, bytes, str], Awaitable[None]],
    state: FetchState,
    *,
    penalize: Callable[[str, str], None] | None = None,
    per_source: int = 3,
    timeout: float = 60.0,
    near_factor: float = 1.5,
    near_slack_ms: float = 20.0,
    read: Reader | None = None,
) -> None:
    """Fetch chunks ``need`` (indices into ``chunks``) and hand each verified one to ``sink``.
    Raises StoreError when some chunk has no source left."""

    async def default_read(src: str, sha: str, size: int) -> bytes:
        reply = await caller.call(src, "storage.chunk_read", {"sha": sha}, timeout=timeout)
        return reply.payload

    run = _Fetch(chunks, need, sources, sink, state, penalize, read or default_read)
    size_hint = max((n for _, n in chunks), default=1)
    while run.pending:
        tiers = run.tiers({s: cost(s, size_hint) for s in run.live()}, near_factor, near_slack_ms)
        order = sorted(run.pending)
        workers = {s for t in tiers.values() for s in t}
        await asyncio.gather(
            *(run.worker(s, order, tiers) for s in workers for _ in range(per_source))
        )
    state.finished = time.monotonic()


class _Fetch:
    """One fetch's bookkeeping: what is pending, in flight, and which sources failed whom."""

    def __init__(
        self,
        chunks: list[tuple[str, int]],
        need: list[int],
        sources: list[str],
        sink: Callable[[int, bytes, str], Awaitable[None]],
        state: FetchState,
        penalize: Callable[[str, str], None] | None,
        reader: Reader,
    ) -> None:
        self.chunks, self.sources, self.sink, self.state = chunks, sources, sink, state
        self.penalize, self.reader = penalize, reader
        self.bad: dict[int, set[str]] = {i: set() for i in need}  # sources caught per chunk
        self.pending = set(need)
        self.inflight: set[int] = set()
        self.dead: set[str] = set()
        self.took: list[float] = []  # seconds per chunk served, any source

    def live(self) -> list[str]:
        return [s for s in dict.fromkeys(self.sources) if s not in self.dead]

    def tiers(self, costs: dict[str, float], factor: float, slack: float) -> dict[int, set[str]]:
        """Each pending chunk's near tier over the live sources (raises when one has none)."""
        tiers: dict[int, set[str]] = {}
        for i in self.pending:
            eligible = [s for s in costs if s not in self.bad[i]]
            if not eligible:
                st = self.state
                raise StoreError(
                    f"chunk {i} of {st.oid[:12]}: no source left that delivered it intact "
                    f"(failed: {[s[:12] for s in st.failed]}, corrupt: {list(st.corrupt)})"
                )
            best = min(costs[s] for s in eligible)
            tiers[i] = {s for s in eligible if costs[s] <= best * factor + slack}
        return tiers

    def stall_limit(self, src: str) -> float | None:
        """Only once there is something to compare with, and only while another source
        is left: a lone source is waited for up to the RPC deadline."""
        if len(self.took) < 3 or not [s for s in self.live() if s != src]:
            return None
        return max(STALL_FLOOR, STALL_FACTOR * statistics.median(self.took[-32:]))

    async def read(self, src: str, sha: str, size: int) -> bytes:
        # The limit is looked at again while the read runs: reads started before any
        # sample existed are judged too.
        t0 = time.monotonic()
        task = asyncio.ensure_future(self.reader(src, sha, size))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STALL_FLOOR / 3)
                if done:
                    self.took.append(time.monotonic() - t0)
                    return task.result()
                if src in self.dead:  # another read from it failed: this one goes elsewhere
                    raise TimeoutError("source left behind")
                limit = self.stall_limit(src)
                if limit is not None and time.monotonic() - t0 > limit:
                    raise TimeoutError(f"chunk not served in {limit:.1f} s")
        finally:
            task.cancel()

    def pick(self, src: str, order: list[int], tiers: dict[int, set[str]]) -> int | None:
        for i in order:
            if i in self.pending and i not in self.inflight and src in tiers[i]:
                if src not in self.bad[i]:
                    return i
        return None

    async def worker(self, src: str, order: list[int], tiers: dict[int, set[str]]) -> None:
        st = self.state
        while src not in self.dead and (i := self.pick(src, order, tiers)) is not None:
            sha, size = self.chunks[i]
            self.inflight.add(i)
            try:
                try:
                    data = await self.read(src, sha, size)
                except (RPCError, StoreError, OSError) as exc:
                    log.info("fetch %s: %s failed (%s); others take over", st.oid, src, exc)
                    if src not in self.dead:
                        self.dead.add(src)
                        st.failed.append(src)
                    return
                ok = len(data) == size and size <= CHUNK_MAX
                if not ok or await asyncio.to_thread(_sha, data) != sha:
                    self.bad[i].add(src)
                    st.corrupt[src] = st.corrupt.get(src, 0) + 1
                    if self.penalize is not None:
                        self.penalize(src, f"chunk {sha[:12]} failed its hash")
                    return  # the tiers change: recompute them
                await self.sink(i, data, src)
                self.pending.discard(i)
                st.done += size
                st.chunks_done += 1
                st.sources[src] = st.sources.get(src, 0) + size
            finally:
                self.inflight.discard(i)
