"""Loaded shards under the node's memory budget (``--memory-limit``).

A shard is opened from its packed store objects' data files (memory-mapped by the runtime,
never copied) after its sha256 is verified, and each of those objects is held in the store
while the shard is loaded, so GC and the disk limit leave it alone. Idle shards are unloaded,
least recently used first, when a new shard or a session's KV cache needs the room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.inference.models import CapacityError, ComputeConfig, ShardObjects
from mesh.inference.shards import ShardPulls
from mesh.net.callers import MeshCaller as Caller
from runtimes.base import get_runtime
from runtimes.batching import AsyncShard

__all__ = ["LoadedShards", "Loaded", "ShardKey"]

log = logging.getLogger(__name__)
ShardKey = tuple[str, int, int, str]  # model id, unit start, unit end, runtime


@dataclass
class Loaded:
    shard: AsyncShard
    memory: int
    objects: tuple[str, ...] = ()  # store objects held while loaded
    last_used: float = field(default_factory=time.monotonic)
    sessions: int = 0


class LoadedShards(ShardPulls):
    def __init__(
        self,
        caller: Caller,
        me: str,
        root: Path,
        config: ComputeConfig,
        objects: ShardObjects | None = None,
    ) -> None:
        super().__init__(caller, me, root, config, objects)
        self.loaded: dict[ShardKey, Loaded] = {}
        self.kv_reserved = 0  # bytes of KV cache reserved by open sessions
        self.mem_gbps: float | None = None  # measured memory bandwidth (the node sets it)
        self._load_lock = asyncio.Lock()

    def _in_use(self, mid: str) -> bool:
        # A loaded shard (and so every session on it) keeps its model's manifest.
        return super()._in_use(mid) or any(key[0] == mid for key in self.loaded)

    def memory_used(self) -> int:
        return sum(x.memory for x in self.loaded.values()) + self.kv_reserved

    async def _load(self, mid: str, start: int, end: int, runtime: str) -> Loaded:
        key = (mid, start, end, runtime)
        async with self._load_lock:
            if key in self.loaded:
                self.loaded[key].sessions += 1  # pinned until the caller opens or gives up
                return self.loaded[key]
            manifest = self.manifests[mid]
            spec = await asyncio.to_thread(self.store.open_range, manifest, start, end)
            memory = get_runtime(runtime).estimate_memory(spec, 0)  # sessions reserve KV
            self._make_room(memory, "shard")
            options = dict(self.config.runtime_options)
            if runtime == "onnx":
                if self.config.threads:
                    options["threads"] = self.config.threads
                options.setdefault("spin", self.config.spin)
            t0 = time.perf_counter()
            shard = await AsyncShard.load(runtime, spec, **options)
            log.info(
                "loaded %s units [%d, %d) on %s in %.2f s",
                mid[:12],
                start,
                end,
                runtime,
                time.perf_counter() - t0,
            )
            held = tuple(b.object for b in manifest.blobs_for(start, end) if b.object)
            for oid in held:
                self.objects.store.acquire(oid)
            loaded = self.loaded[key] = Loaded(shard, memory, held, sessions=1)
            return loaded

    def _unload(self, key: ShardKey) -> None:
        loaded = self.loaded.pop(key)
        for oid in loaded.objects:
            self.objects.store.release(oid)
        asyncio.get_running_loop().create_task(loaded.shard.aclose())

    def _make_room(self, memory: int, what: str) -> None:
        limit = self.config.memory_limit
        if limit is None:
            return
        if memory > limit:
            raise CapacityError(f"{what} needs {memory >> 20} MiB, the limit is {limit >> 20} MiB")
        idle = sorted((x.last_used, k) for k, x in self.loaded.items() if x.sessions == 0)
        while self.memory_used() + memory > limit and idle:
            _, key = idle.pop(0)
            self._unload(key)
        if self.memory_used() + memory > limit:
            raise CapacityError(
                f"{what} needs {memory >> 20} MiB; {self.memory_used() >> 20} of "
                f"{limit >> 20} MiB are held by running sessions"
            )

    async def _unload_all(self) -> None:
        for key in list(self.loaded):
            loaded = self.loaded.pop(key)
            for oid in loaded.objects:
                self.objects.store.release(oid)
            await loaded.shard.aclose()
        self.kv_reserved = 0
