"""The node's object service: the blob store on the wire, fetches, providers and replication.

RPCs (all size-capped before allocation; every byte received is verified by hash):

``obj_manifest {id}``           -> manifest bytes (the receiver checks they hash to ``id``)
``chunk_read {sha}``            -> chunk bytes (at most ``CHUNK_MAX``; paced by ``serve_rate``)
``chunk_has {shas}``            -> {"has": [...]} which of these chunks this node holds
``obj_replicate {id, replicas}`` -> accepted: pull the object and pin it as a replica
``obj_announce`` / ``obj_sync``  provider records (:mod:`mesh.storage.providers`)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import RPCError
from mesh.net.rpc import CallContext, Reply, Service
from mesh.net.view import NetConfig, NetView
from mesh.storage.fastpath import FastPath
from mesh.storage.fetch import FetchState, fetch_chunks
from mesh.storage.locks import KeyedLocks
from mesh.storage.providers import Providers
from mesh.storage.replication import Replicator
from mesh.storage.store import (
    CHUNK_SIZE,
    PACKED,
    BlobStore,
    Manifest,
    StoreError,
    is_id,
    parse_manifest,
)

if TYPE_CHECKING:
    from mesh.storage.providers import ProviderContext

__all__ = ["StorageConfig", "ObjectService", "PeerQuotaExceeded", "ReplicationBusy"]

log = logging.getLogger(__name__)
MAX_HAS = 4096
MAX_PULLS_PER_PEER = 4  # background replica pulls one peer may have us run at once
MAX_PULLS = 16  # background replica pulls in all


@dataclass
class StorageConfig:
    zone: str = "default"
    egress_price: float = 0.0  # per GB leaving this peer's zone
    quota: int | None = None  # bytes of chunks on disk (None: no limit)
    serve_rate: float | None = None  # bytes/s this node serves (None: unlimited)
    jobs: bool = True  # whether this node runs batch tasks
    job_speed: float = 1e8  # record bytes per second it claims for the planner
    repair_interval: float = 2.0
    fast_path: bool = True  # direct encrypted TCP for bulk chunks where peers can reach it
    # Bytes of objects one peer may make us pin through ``obj_replicate`` (None: only the
    # store's quota bounds it). One peer cannot fill the disk this node offers the mesh.
    peer_quota: int | None = 4 << 30
    # Background pulls that ``obj_replicate`` requests start: per requesting peer, in all.
    max_pulls_per_peer: int = MAX_PULLS_PER_PEER
    max_pulls: int = MAX_PULLS


class _Pacer:
    """A token bucket: ``await take(n)`` keeps the long-run rate at ``rate`` bytes/s."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.rate
            if start > now:
                await asyncio.sleep(start - now)  # pacing, not synchronization


class PeerQuotaExceeded(StoreError):
    """A peer asked us to keep more bytes than its per-peer quota."""


class ReplicationBusy(StoreError):
    """Too many replica pulls running already (for the requesting peer, or in all)."""


class ObjectService:
    name = "storage"  # RPC namespace: peers call "storage.<method>"

    def __init__(self, node: ProviderContext, config: StorageConfig, root: Path) -> None:
        self.node = node
        self.config = config
        self.store = BlobStore(root, config.quota)
        self.net = NetView(
            node,
            NetConfig(
                zone=config.zone,
                egress_price=config.egress_price,
                compute=config.jobs,
                speed=config.job_speed,
            ),
        )
        self.providers = Providers(node, config.zone)
        self.transfers: dict[str, FetchState] = {}
        self.pacer = _Pacer(config.serve_rate)
        self._locks = KeyedLocks()  # one fetch of an object at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.fast: FastPath | None = None  # when enabled
        self._reserved: dict[str, tuple[str, int]] = {}  # oid -> (peer, bytes) being pulled
        self.quota_refused = 0  # replica requests refused by the per-peer quota
        self._pulls: dict[str, str] = {}  # oid -> peer whose obj_replicate pulls it now
        self.replicas_refused = 0  # obj_replicate requests refused: too many pulls running
        self.replicator = Replicator(self)

    def services(self) -> list[Service]:
        """The services this one is made of (the node serves their RPCs and status)."""
        return [self, self.net, self.providers]

    @property
    def me(self) -> str:
        return self.node.me

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, fast_bind: str, fast_announce: str) -> None:
        """Start serving; the fast path (when enabled) listens on ``fast_bind`` and is
        announced to peers at ``fast_announce``."""
        self.net.start()
        if self.config.fast_path:
            self.fast = FastPath(self)
            await self.fast.start(fast_bind, fast_announce)
        self._loop_task = asyncio.get_running_loop().create_task(self._maintain())
        for obj in self.store.objects():  # what we held before a restart
            if obj["complete"]:
                self.spawn(self.providers.announce(obj["id"], obj["pinned"]))

    async def stop(self) -> None:
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()
        await self.net.stop()
        if self.fast is not None:
            await self.fast.stop()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _maintain(self) -> None:
        while True:
            try:
                await self.providers.sync_new_peers()
                await self.replicator.repair_once()
            except Exception:  # the loop must survive one bad round
                log.exception("storage maintenance round failed")
            await asyncio.sleep(self.config.repair_interval)  # maintenance period

    # -- local operations ------------------------------------------------------------------
    async def put_stream(
        self, reader: Any, name: str, fmt: str, replicas: int, chunk_size: int = CHUNK_SIZE
    ) -> Manifest:
        """Store an object from an async ``reader`` (aiohttp StreamReader-like) and pin it."""
        # Spool through a bounded queue into the store's chunker in a thread.
        r = _Pipe()

        def run() -> Manifest:
            try:
                return self.store.put_stream(r, name, fmt, chunk_size)  # type: ignore[arg-type]
            finally:
                r.reader_done = True

        fut = asyncio.get_running_loop().run_in_executor(None, run)
        try:
            while True:
                block = await reader.read(1 << 20)
                if not block:
                    break
                await r.write(block)
        finally:
            await r.close()
        manifest = await fut
        self.store.pin(manifest.id, replicas)
        await self.providers.announce(manifest.id, durable=True)
        if replicas > 1:
            self.spawn(self.replicator.repair_object(manifest.id))
        return manifest

    async def put_bytes(
        self, data: bytes, name: str = "", fmt: str = "raw", replicas: int = 1
    ) -> Manifest:
        manifest = await asyncio.to_thread(self.store.put_bytes, data, name, fmt)
        self.store.pin(manifest.id, replicas)
        await self.providers.announce(manifest.id, durable=True)
        if replicas > 1:
            self.spawn(self.replicator.repair_object(manifest.id))
        return manifest

    async def put_file(self, path: Path, name: str = "", replicas: int = 1) -> Manifest:
        """Store a file as a packed object (moved into the store, not copied), pin it and
        announce this node as its holder. Model shards are stored this way."""
        manifest = await asyncio.to_thread(self.store.put_file, path, name, PACKED)
        self.store.pin(manifest.id, replicas)
        await self.providers.announce(manifest.id, durable=True)
        if replicas > 1:
            self.spawn(self.replicator.repair_object(manifest.id))
        return manifest

    async def find_holders(self, oid: str) -> list[str]:
        """Live holders of an object (not us): provider records, the DHT, then asking."""
        found = [p.peer_id for p in self.providers.holders(oid) if p.peer_id != self.me]
        if not found:
            found = [
                p.peer_id for p in await self.providers.lookup_dht(oid) if p.peer_id != self.me
            ]
        return found

    async def _sources(self, oid: str, hint: list[str] | None) -> list[str]:
        """Peers to ask for ``oid``: those said to hold it (``hint``) and those found."""
        found = await self.find_holders(oid)
        return [h for h in dict.fromkeys([*(hint or []), *found]) if h != self.me]

    async def manifest_of(self, oid: str, hint: list[str] | None = None) -> Manifest:
        """An object's manifest (size, chunks, format), ours or a holder's, verified by its
        hash; no chunk is pulled. A peer's claims about an object (a model manifest's size,
        a shard's) are checked against it before a fetch commits disk and memory to them."""
        m = self.store.manifest(oid)
        if m is not None:
            return m
        holders = await self._sources(oid, hint)
        if not holders:
            raise StoreError(f"no live holder of object {oid[:12]} is known")
        return await self.get_manifest(oid, holders)

    async def get_manifest(self, oid: str, holders: list[str]) -> Manifest:
        m = self.store.manifest(oid)
        if m is not None:
            return m
        if not is_id(oid):
            raise StoreError("malformed object id")
        errors = []
        for h in sorted(holders, key=lambda h: self.net.cost_ms(h, 0)):
            try:
                reply = await self.node.call(h, "storage.obj_manifest", {"id": oid}, timeout=15)
                m = parse_manifest(reply.payload, oid)  # verified: its hash is the id
            except (RPCError, StoreError) as exc:
                errors.append(f"{h[:12]}: {exc}")
                continue
            return self.store.add_manifest(m.raw, oid)
        raise StoreError(f"no holder gave the manifest of {oid[:12]}: {'; '.join(errors)}")

    async def fetch(
        self,
        oid: str,
        *,
        pin: bool = False,
        replicas: int | None = None,
        on_progress: Callable[[FetchState], None] | None = None,
        for_peer: str | None = None,
        hint: list[str] | None = None,
    ) -> FetchState:
        """Make object ``oid`` complete here, pulling what is missing from its holders
        (``hint``: peers said to hold it, tried along with those the records name)."""
        async with self._locks.hold(oid):
            holders = await self._sources(oid, hint)
            if self.store.manifest(oid) is None and not holders:
                raise StoreError(f"no live holder of object {oid[:12]} is known")
            await self.net.ensure(holders)  # zones and prices before choosing sources
            m = await self.get_manifest(oid, holders)
            state = FetchState(oid, m.size, chunks_total=len(m.chunks))
            with self.store.hold(oid):
                need = self.store.missing(m)
                state.done = m.size - sum(m.chunks[i][1] for i in need)
                state.chunks_done = len(m.chunks) - len(need)
                if need:
                    self.transfers[oid] = state
                    try:
                        await self._pull(m, need, holders, state, on_progress)
                    finally:
                        self.transfers.pop(oid, None)
                state.finished = time.monotonic()
                if pin:
                    self.store.pin(oid, replicas, for_peer=for_peer)
            await self.providers.announce(oid, durable=oid in self.store.pins)
            return state

    async def _pull(
        self,
        m: Manifest,
        need: list[int],
        holders: list[str],
        state: FetchState,
        on_progress: Callable[[FetchState], None] | None,
    ) -> None:
        packed = m.format == PACKED

        async def sink(i: int, data: bytes, src: str) -> None:
            if packed:  # into the object's one data file, at the chunk's offset
                await asyncio.to_thread(self.store.write_packed, m, i, data)
            else:
                await asyncio.to_thread(self.store.write_chunk, m.chunks[i][0], data)
            self.net.account(src, self.me, len(data), "fetch")
            if on_progress is not None:
                on_progress(state)

        if packed:
            await asyncio.to_thread(self.store.begin_packed, m)
        try:
            await fetch_chunks(
                self.node,
                list(m.chunks),
                need,
                holders,
                self.net.cost_ms,
                sink,
                state,
                penalize=self.net.penalize,
                read=self.fast.read_chunk if self.fast is not None else None,
            )
        except BaseException:
            if packed:
                self.store.abort_packed(m.id)
            raise

    async def read_chunk_from(self, src: str, sha: str, size: int) -> bytes:
        if self.fast is not None:
            return bytes(await self.fast.read_chunk(src, sha, size))
        reply = await self.node.call(src, "storage.chunk_read", {"sha": sha}, timeout=60)
        return reply.payload

    async def serve_chunk(self, peer: str, sha: str) -> bytes:
        if not is_id(sha):
            raise StoreError("malformed chunk id")
        data = await asyncio.to_thread(self.store.read_chunk, sha)
        await self.pacer.take(len(data))
        self.net.account(self.me, peer, len(data), "serve")
        return data

    # -- RPCs ------------------------------------------------------------------------------
    async def rpc_obj_manifest(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        oid = params.get("id")
        m = self.store.manifest(oid) if is_id(oid) else None
        if m is None:
            raise StoreError(f"no object {str(oid)[:12]}")
        return Reply({"n": len(m.raw)}, m.raw)

    async def rpc_chunk_read(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        data = await self.serve_chunk(ctx.peer_id, params.get("sha"))  # type: ignore[arg-type]
        return Reply({"n": len(data)}, data)

    async def rpc_chunk_has(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        shas = params.get("shas")
        if not isinstance(shas, list) or len(shas) > MAX_HAS:
            raise StoreError(f"shas must be a list of at most {MAX_HAS} hashes")
        return {"has": [s for s in shas if is_id(s) and self.store.has_chunk(s)]}

    def peer_bytes(self, peer: str) -> int:
        """Bytes ``peer`` makes us keep: objects pinned at its request and pulls under way."""
        pending = sum(n for p, n in self._reserved.values() if p == peer)
        return self.store.pinned_for(peer) + pending

    def _charge(self, peer: str, oid: str, size: int) -> None:
        """Refuse (PeerQuotaExceeded) if keeping ``size`` more bytes puts ``peer`` over its
        quota. Synchronous: concurrent requests cannot overrun it together."""
        quota = self.config.peer_quota
        used = self.peer_bytes(peer)
        if quota is not None and used + size > quota:
            self.quota_refused += 1
            raise PeerQuotaExceeded(
                f"peer quota: {peer[:12]} keeps {used} bytes here, {size} more for "
                f"{oid[:12]} would exceed {quota}"
            )

    async def rpc_obj_replicate(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        oid, replicas = params.get("id"), params.get("replicas")
        if not is_id(oid) or type(replicas) is not int or not 1 <= replicas <= 64:
            raise StoreError("replicate needs an object id and replicas in 1..64")
        if oid in self.store.pins:
            return {"accepted": True, "held": True}
        known = self.store.manifest(oid)
        if known is not None:  # the size is known now: refuse over quota with a clear error
            self._charge(ctx.peer_id, oid, known.size)
        elif (quota := self.config.peer_quota) is not None and self.peer_bytes(
            ctx.peer_id
        ) >= quota:
            self.quota_refused += 1
            raise PeerQuotaExceeded(f"peer quota: {ctx.peer_id[:12]} is at its {quota} bytes")
        if self.store.complete(oid):
            self.store.pin(oid, replicas, for_peer=ctx.peer_id)
            await self.providers.announce(oid, durable=True)
            return {"accepted": True, "held": True}
        if oid not in self._pulls:  # a second request for a pull under way starts nothing
            self._claim_pull(oid, ctx.peer_id)
            self.spawn(self._replicate(oid, replicas, ctx.peer_id))
        return {"accepted": True, "held": False}

    def _claim_pull(self, oid: str, peer: str) -> None:
        """Take a pull slot for ``peer`` (ReplicationBusy when it, or the node, has none)."""
        cfg = self.config
        mine = sum(1 for p in self._pulls.values() if p == peer)
        if mine >= cfg.max_pulls_per_peer or len(self._pulls) >= cfg.max_pulls:
            self.replicas_refused += 1
            raise ReplicationBusy(
                f"{len(self._pulls)} replica pulls running ({mine} for {peer[:12]}): "
                f"at most {cfg.max_pulls_per_peer} per peer, {cfg.max_pulls} in all"
            )
        self._pulls[oid] = peer

    async def _replicate(self, oid: str, replicas: int, peer: str | None = None) -> None:
        try:
            if peer is not None:  # the manifest first: its size is charged before any pull
                m = await self.get_manifest(oid, await self.find_holders(oid))
                if oid in self._reserved:
                    raise StoreError("a replica pull of this object is under way")
                self._charge(peer, oid, m.size)
                self._reserved[oid] = (peer, m.size)
            try:
                await self.fetch(oid, pin=True, replicas=replicas, for_peer=peer)
            finally:
                if peer is not None:
                    self._reserved.pop(oid, None)
            log.info("now a replica of %s", oid[:12])
        except (StoreError, RPCError) as exc:
            log.warning("replicating %s failed: %s", oid[:12], exc)
        finally:
            self._pulls.pop(oid, None)

    # -- views -----------------------------------------------------------------------------
    def holders_view(self, oid: str) -> list[dict[str, Any]]:
        out = []
        for p in self.providers.holders(oid):
            out.append(
                {
                    "peer_id": p.peer_id,
                    "durable": p.durable,
                    "zone": p.zone,
                    "cost_ms": round(self.net.cost_ms(p.peer_id, 2 << 20), 3),
                    "me": p.peer_id == self.me,
                }
            )
        return sorted(out, key=lambda d: d["cost_ms"])

    def status(self) -> dict[str, Any]:
        return {
            **self.store.usage(),
            "zone": self.config.zone,
            "egress_price": self.config.egress_price,
            "transfers": [t.as_dict() for t in self.transfers.values()],
            "penalties": self.net.penalties.as_dict(),
            "fast_path": self.fast.address if self.fast is not None else None,
            "fast_path_conns": self.fast.stats() if self.fast is not None else None,
            "fast_path_traffic": self.fast.as_dict() if self.fast is not None else None,
            "peer_quota": self.config.peer_quota,
            "quota_refused": self.quota_refused,
            "replica_pulls": len(self._pulls),
            "replicas_refused": self.replicas_refused,
        }


class _Pipe:
    """Bytes from the event loop to a thread that reads them like a file (bounded)."""

    def __init__(self, depth: int = 8) -> None:
        import queue

        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._buf = b""
        self._eof = False
        self.reader_done = False

    def _put(self, item: bytes | None) -> None:
        import queue

        while not self.reader_done:  # a reader that failed stops taking: do not block on it
            with contextlib.suppress(queue.Full):
                self._q.put(item, timeout=0.2)
                return

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._put, data)

    async def close(self) -> None:
        await asyncio.to_thread(self._put, None)

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
            else:
                self._buf += item
        out, self._buf = self._buf[:n], self._buf[n:]
        return out
