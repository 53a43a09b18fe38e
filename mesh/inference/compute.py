"""The compute service every node runs: models it stores, shards it loads, stage sessions.

A stage session is one generation's KV cache on one shard. ``stage_forward`` runs the shard
and pushes its output straight to the next stage (as Petals servers do); the last stage samples
the token and the reply travels back along the chain, each stage adding its compute time to a
trace so the coordinator can tell compute from network time. A stage that cannot reach the
next one answers ``StageUnavailable`` naming that peer, so the coordinator knows which layer
range to re-route.

Shards are loaded under a memory budget (``--memory-limit``): idle sessions are evicted after
``session_ttl`` and unused shards unloaded, least recently used first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from mesh.errors import EXPECTED, Error, IdentityError, RemoteError, RPCError
from mesh.inference.audit import MAX_AUDIT_BYTES, AuditEntry, AuditLog, pack_entries, step_message
from mesh.inference.prompts import Tokenizers
from mesh.inference.sampling import SamplingParams, sample, top_logits
from mesh.net.identity import verify
from mesh.net.rpc import CallContext, Reply
from mesh.net.rpc import MeshCaller as Caller
from mesh.storage.blobs import BlobError, StorageService, Transfer, fetch_blob
from mesh.storage.quota import disk_shortfall
from runtimes.base import AsyncShard, Session, get_runtime
from runtimes.errors import ModelError
from runtimes.shards import Manifest, ShardStore

__all__ = [
    "ComputeConfig",
    "ComputeService",
    "CapacityError",
    "StageUnavailable",
    "models_of",
]

MAX_MODELS_REPLY = 1 << 20


def models_of(reply: Reply) -> list[dict[str, Any]]:
    """The listing of a ``models`` reply, size-capped and type-checked (it is untrusted)."""
    if len(reply.payload) > MAX_MODELS_REPLY:
        return []
    try:
        items = msgpack.unpackb(reply.payload, raw=False, max_ext_len=0)
    except Exception:  # msgpack raises several types on bad input
        return []
    return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []


log = logging.getLogger(__name__)
_SID = re.compile(r"^[0-9a-f]{8,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_SESSION_TOKENS = 32768  # Gemma 3's context; memory is bounded by KV reservations
# Prompt positions per step: a stage's attention scores are chunk x context at most.
PREFILL_CHUNK = 512
# Rows one step may carry, from any peer: bounds a step's attention temporaries (scores and
# masks are rows x context) whatever the coordinator chose as its chunk.
MAX_STEP_ROWS = 2048


class CapacityError(Error):
    """The node's memory budget or session cap cannot take this shard or session."""


class StageUnavailable(Error):
    """The next stage could not be reached; the message is its peer id."""


@dataclass(frozen=True)
class ComputeConfig:
    memory_limit: int | None = None  # bytes for loaded shards and their sessions
    disk_limit: int | None = None  # bytes of shard blobs on disk (always: 1 GiB left free)
    runtime: str = "onnx"
    threads: int | None = None
    session_ttl: float = 300.0
    max_sessions: int = 64
    max_sessions_per_peer: int = 16  # one peer cannot take every session slot
    spin: bool = False  # onnx worker threads busy-wait between runs (faster alone, not shared)
    forward_timeout: float = 20.0  # below the coordinator's, so the culprit is named
    runtime_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("delay_s", 0.01),) for fake


@dataclass
class _Loaded:
    shard: AsyncShard
    memory: int
    last_used: float = field(default_factory=time.monotonic)
    sessions: int = 0


@dataclass
class _StageSession:
    key: tuple[str, int, int, str]
    session: Session
    next_peer: str | None
    next_sid: str | None
    owner: str
    prev: str = ""  # the only peer whose steps this stage accepts
    last_used: float = field(default_factory=time.monotonic)
    sid: str = ""
    pos: int = 0  # positions taken by steps accepted so far (set before each step runs)
    audit: AuditLog | None = None  # inputs kept (with signatures) for spot checks
    kv: int = 0  # bytes reserved against the memory limit for its KV cache


class ComputeService:
    def __init__(self, caller: Caller, me: str, root: Path, config: ComputeConfig) -> None:
        self.caller = caller
        self.me = me
        self.config = config
        self.store = ShardStore(root)
        self.storage = StorageService(self.store.blob_dir)
        self.names: dict[str, str] = {}
        self.manifests: dict[str, Manifest] = {}
        self.loaded: dict[tuple[str, int, int, str], _Loaded] = {}
        self.sessions: dict[str, _StageSession] = {}
        self.transfers: dict[str, Transfer] = {}
        self._opening: dict[str, str] = {}  # session ids being opened -> owner
        self.kv_reserved = 0  # bytes of KV cache reserved by open sessions
        self.penalized: set[str] = set()
        # Set by the node when a direct fast path exists (mesh/fastpath.py); else RPC.
        self.range_reader: Any = None
        self.mem_gbps: float | None = None  # measured memory bandwidth (the node sets it)
        self._load_lock = asyncio.Lock()
        self._blob_locks: dict[str, asyncio.Lock] = {}
        self.tokenizers = Tokenizers(self.manifests, self._held_path)
        self._janitor: asyncio.Task[None] | None = None
        self._names_file = Path(root) / "names.json"
        self._load_registry()

    # -- registry --------------------------------------------------------------------------
    def _load_registry(self) -> None:
        if self._names_file.is_file():
            with contextlib.suppress(ValueError, OSError):
                names = json.loads(self._names_file.read_text())
                self.names = {str(k): str(v) for k, v in names.items()}
        if self.store.manifest_dir.is_dir():
            for p in self.store.manifest_dir.glob("*.json"):
                with contextlib.suppress(ModelError, ValueError):
                    self.manifests[p.stem] = self.store.load_manifest(p.stem)

    async def add_model(self, path: str, name: str | None = None) -> Manifest:
        manifest = await asyncio.to_thread(self.store.add_model, path)
        mid = manifest.model_id
        self.manifests[mid] = manifest
        self.names[name or manifest.name or Path(path).stem] = mid
        self._names_file.parent.mkdir(parents=True, exist_ok=True)
        self._names_file.write_text(json.dumps(self.names))
        return manifest

    def resolve(self, model: str) -> str:
        """A model id from a name or an id this node knows."""
        if model in self.manifests:
            return model
        if model in self.names:
            return self.names[model]
        raise ModelError(f"unknown model {model!r}")

    def _held_path(self, sha: str) -> Path | None:
        return self.store.blob_path(sha) if self.storage.has(sha) else None

    def held_blobs(self, mid: str) -> list[str]:
        m = self.manifests.get(mid)
        return [b.sha256 for b in m.blobs if self.storage.has(b.sha256)] if m else []

    def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._evict_loop())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        for loaded in list(self.loaded.values()):
            await loaded.shard.aclose()
        self.loaded.clear()
        self.sessions.clear()
        self.kv_reserved = 0

    # -- RPCs: what we hold ----------------------------------------------------------------
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
            }
            for mid, m in self.manifests.items()
        ]
        return Reply({"n": len(listing)}, bytes(msgpack.packb(listing, use_bin_type=True)))

    async def rpc_manifest(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        mid = params.get("model_id")
        if not isinstance(mid, str) or mid not in self.manifests:
            raise ModelError(f"no manifest for {str(mid)[:70]!r}")
        return Reply({}, self.manifests[mid].to_json())

    async def rpc_capacity(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        # Idle shards do not count: they are unloaded on demand (or reused as they are).
        busy = sum(x.memory for x in self.loaded.values() if x.sessions > 0) + self.kv_reserved
        return {
            "memory_limit": self.config.memory_limit,
            "memory_used": busy,
            "runtime": self.config.runtime,
            "sessions": len(self.sessions),
            "gbps": self.mem_gbps,
        }

    def memory_used(self) -> int:
        return sum(x.memory for x in self.loaded.values()) + self.kv_reserved

    # -- shards ----------------------------------------------------------------------------
    async def _manifest(self, mid: str, source: str) -> Manifest:
        if mid in self.manifests:
            return self.manifests[mid]
        if not _HEX64.match(mid):
            raise ModelError("malformed model id")
        reply = await self.caller.call(source, "manifest", {"model_id": mid}, timeout=30)
        manifest = Manifest.from_json(reply.payload, expected_id=mid)  # verified by its hash
        self.store.save_manifest(manifest)
        self.manifests[mid] = manifest
        return manifest

    async def ensure_blobs(
        self, manifest: Manifest, start: int, end: int, hint: dict[str, list[str]] | None = None
    ) -> int:
        """Pull the blobs of units [start, end) we lack; returns the bytes pulled."""
        pulled = 0
        for blob in manifest.blobs_for(start, end):
            lock = self._blob_locks.setdefault(blob.sha256, asyncio.Lock())
            async with lock:  # two sessions wanting one blob pull it once
                if self.storage.has(blob.sha256):
                    continue
                self._disk_room(blob.size)
                holders = [h for h in (hint or {}).get(blob.sha256, []) if h != self.me]
                if not holders:
                    holders = await self._find_holders(blob.sha256)
                transfer = Transfer(blob.sha256, blob.size)
                self.transfers[blob.sha256] = transfer
                try:
                    await fetch_blob(
                        self.caller,
                        blob.sha256,
                        blob.size,
                        holders,
                        self.store.blob_path(blob.sha256),
                        transfer=transfer,
                        penalized=self.penalized,
                        reader=self.range_reader,
                    )
                finally:
                    self.transfers.pop(blob.sha256, None)
                pulled += blob.size
        return pulled

    def _disk_room(self, size: int) -> None:
        """Evict blobs we do not need, or refuse the pull (a peer must not fill our disk)."""
        keep = set(self.transfers)
        for mid in set(self.names.values()):  # models added here are never evicted
            if mid in self.manifests:
                keep.update(b.sha256 for b in self.manifests[mid].blobs)
        for mid, start, end, _ in self.loaded:
            if mid in self.manifests:
                keep.update(b.sha256 for b in self.manifests[mid].blobs_for(start, end))
        short = disk_shortfall(self.store.blob_dir, size, self.config.disk_limit, keep)
        if short > 0:
            raise CapacityError(
                f"no disk room for a {size >> 20} MiB shard ({short >> 20} MiB short)"
            )

    async def _find_holders(self, sha: str) -> list[str]:
        async def ask(peer: str) -> str | None:
            try:
                reply = await self.caller.call(peer, "blob_has", {"shas": [sha]}, timeout=5)
            except RPCError:
                return None
            return peer if sha in reply.result.get("has", []) else None

        found = await asyncio.gather(*(ask(p) for p in self.caller.connected_peer_ids()))
        holders = [p for p in found if p is not None]
        if not holders:
            raise BlobError(f"no connected peer holds blob {sha[:12]}")
        return holders

    async def _load(self, mid: str, start: int, end: int, runtime: str) -> _Loaded:
        key = (mid, start, end, runtime)
        async with self._load_lock:
            if key in self.loaded:
                self.loaded[key].sessions += 1  # pinned until the caller opens or gives up
                return self.loaded[key]
            spec = await asyncio.to_thread(self.store.open_range, self.manifests[mid], start, end)
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
            loaded = self.loaded[key] = _Loaded(shard, memory, sessions=1)
            return loaded

    def _make_room(self, memory: int, what: str) -> None:
        limit = self.config.memory_limit
        if limit is None:
            return
        if memory > limit:
            raise CapacityError(f"{what} needs {memory >> 20} MiB, the limit is {limit >> 20} MiB")
        idle = sorted((x.last_used, k) for k, x in self.loaded.items() if x.sessions == 0)
        while self.memory_used() + memory > limit and idle:
            _, key = idle.pop(0)
            loaded = self.loaded.pop(key)
            asyncio.get_running_loop().create_task(loaded.shard.aclose())
        if self.memory_used() + memory > limit:
            raise CapacityError(
                f"{what} needs {memory >> 20} MiB; {self.memory_used() >> 20} of "
                f"{limit >> 20} MiB are held by running sessions"
            )

    # -- RPCs: stage sessions --------------------------------------------------------------
    async def rpc_stage_open(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        sid, mid = params.get("sid"), params.get("model_id")
        units, runtime = params.get("units"), params.get("runtime") or self.config.runtime
        max_tokens = params.get("max_tokens", 2048)
        nxt, next_sid = params.get("next"), params.get("next_sid")
        if not isinstance(sid, str) or not _SID.match(sid) or not isinstance(mid, str):
            raise ModelError("stage_open needs a session id and a model id")
        if not (isinstance(units, list) and len(units) == 2 and all(type(u) is int for u in units)):
            raise ModelError("units must be [start, end]")
        if type(max_tokens) is not int or not 0 < max_tokens <= MAX_SESSION_TOKENS:
            raise ModelError(f"max_tokens must be in 1..{MAX_SESSION_TOKENS}")
        if not isinstance(runtime, str) or (nxt is not None and not isinstance(nxt, str)):
            raise ModelError("bad runtime or next stage")
        prev = params.get("prev")
        if prev is not None and not isinstance(prev, str):
            raise ModelError("bad previous stage")
        if sid in self.sessions or sid in self._opening:
            raise ModelError("session id in use")
        if len(self.sessions) + len(self._opening) >= self.config.max_sessions:
            raise CapacityError(f"more than {self.config.max_sessions} sessions")
        mine = sum(1 for st in self.sessions.values() if st.owner == ctx.peer_id)
        mine += sum(1 for owner in self._opening.values() if owner == ctx.peer_id)
        if mine >= self.config.max_sessions_per_peer:
            raise CapacityError(f"peer holds {mine} sessions here already")
        # The slot is taken before the first await: concurrent opens cannot overrun the caps.
        self._opening[sid] = ctx.peer_id
        try:
            return await self._open_stage(
                ctx, params, sid, mid, units, runtime, max_tokens, nxt, next_sid, prev
            )
        finally:
            self._opening.pop(sid, None)

    async def _open_stage(
        self,
        ctx: CallContext,
        params: dict[str, Any],
        sid: str,
        mid: str,
        units: list[int],
        runtime: str,
        max_tokens: int,
        nxt: str | None,
        next_sid: Any,
        prev: str | None,
    ) -> dict[str, Any]:
        hint = params.get("holders") if isinstance(params.get("holders"), dict) else None
        t0 = time.perf_counter()
        manifest = await self._manifest(mid, params.get("source") or ctx.peer_id)
        start, end = units
        if not 0 <= start < end <= len(manifest.units):
            raise ModelError(f"units [{start}, {end}) outside the model")
        pulled = await self.ensure_blobs(manifest, start, end, hint)
        loaded = await self._load(mid, start, end, runtime)  # pinned: sessions counted
        kv = 0
        try:
            if end == len(manifest.units) or start == 0:
                # The last stage returns each token's bytes; the first tokenizes prompts.
                with contextlib.suppress(ModelError):
                    await self.tokenizers.get(mid)
            # The model's context length is the ceiling; the KV cache of every position the
            # session may take is reserved now, so sessions cannot grow past the memory limit.
            rt = loaded.shard.runtime
            positions = min(max_tokens, rt.config.context_length or max_tokens)
            need = type(rt).kv_bytes(rt.shard, positions)
            self._make_room(need, f"a session of {positions} positions")
            self.kv_reserved += need
            kv = need
            session = await loaded.shard.open_session(positions)
            log.info("session %s: units [%d, %d), %d positions", sid[:8], start, end, positions)
        except BaseException:
            loaded.sessions -= 1
            self.kv_reserved -= kv
            raise
        self.sessions[sid] = _StageSession(
            (mid, start, end, runtime),
            session,
            nxt,
            next_sid if isinstance(next_sid, str) else None,
            ctx.peer_id,
            prev=prev or ctx.peer_id,
            sid=sid,
            audit=AuditLog(MAX_AUDIT_BYTES) if params.get("audit") is True else None,
            kv=kv,
        )
        return {"pulled": pulled, "open_ms": round((time.perf_counter() - t0) * 1000, 1)}

    async def rpc_stage_close(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        sid = params.get("sid")
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        if st is None or st.owner != ctx.peer_id:  # only who opened a session may close it
            return {"closed": False}
        self.sessions.pop(str(sid), None)
        await self._close(st)
        return {"closed": True}

    async def _close(self, st: _StageSession) -> None:
        self.kv_reserved -= st.kv
        st.kv = 0  # closing twice must not release twice
        loaded = self.loaded.get(st.key)
        if loaded is not None:
            loaded.sessions -= 1
            loaded.last_used = time.monotonic()
            with contextlib.suppress(Error):
                await loaded.shard.close_session(st.session)

    async def rpc_stage_push(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> None:
        """One step, one way: compute, push to the next stage; the last stage sends the token
        straight to the coordinator (the session's owner). Failures are reported to it too."""
        sid, rid = params.get("sid"), params.get("rid")
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        owner = st.owner if st is not None else ctx.peer_id
        trace = params.get("trace", [])
        trace = list(trace)[:64] if isinstance(trace, list) else []
        try:
            cur, spec, out, own = await self._compute(params, payload, ctx.peer_id)
            trace.append(own)
            if spec.is_last:
                reply = self._finish(cur.key[0], out, params, own)
                result = dict(reply.result, trace=trace, rid=rid, pos=params.get("pos"))
                await self.caller.notify(owner, "stage_token", result, reply.payload)
                return
            if cur.next_peer is None or cur.next_sid is None:
                raise ModelError("a middle stage without a next stage")
            body = np.ascontiguousarray(out, dtype="<f4").tobytes()
            fwd = {k: v for k, v in params.items() if k in ("n", "sample", "pos", "top", "rid")}
            fwd.update(sid=cur.next_sid, trace=trace)
            if cur.audit is not None:  # evidence the next stage keeps: we cannot deny it
                pos, n = int(params["pos"]), int(params["n"])
                fwd["sig"] = self.caller.sign(step_message(cur.next_sid, pos, n, body))
            try:
                await self.caller.notify(
                    cur.next_peer, "stage_push", fwd, body, timeout=self.config.forward_timeout
                )
            except RPCError as exc:
                raise StageUnavailable(cur.next_peer) from exc
        except Exception as exc:  # every failure is reported, or the coordinator just waits
            failed = str(exc) if isinstance(exc, StageUnavailable) else None
            report = {
                "rid": rid,
                "pos": params.get("pos"),
                "failed": failed,
                "error": f"{type(exc).__name__}: {exc}"[:300],
            }
            try:
                await self.caller.notify(owner, "stage_failed", report, timeout=5)
            except EXPECTED:
                log.warning("could not report a failed step to %s", owner[:12])

    async def _compute(
        self, params: dict[str, Any], payload: bytes, sender: str | None = None
    ) -> tuple[_StageSession, Any, Any, dict[str, Any]]:
        """Validate one step's input and run it on the session's shard."""
        sid, n = params.get("sid"), params.get("n")
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        if st is None:
            raise ModelError("no such stage session (expired or never opened)")
        if sender is not None and sender not in (st.prev, st.owner):
            raise ModelError("steps of this session come from its previous stage only")
        loaded = self.loaded.get(st.key)
        if loaded is None:
            raise ModelError("the session's shard was unloaded")
        st.last_used = loaded.last_used = time.monotonic()
        spec = loaded.shard.runtime.shard
        if type(n) is not int or not 0 < n <= MAX_STEP_ROWS:
            raise ModelError(f"n must be an integer in 1..{MAX_STEP_ROWS} (rows of one step)")
        if spec.is_first:
            if len(payload) != 4 * n:
                raise ModelError("token payload size does not match n")
            x: Any = np.frombuffer(payload, dtype="<i4").astype(np.int64)
        else:
            d = spec.config.d_model
            if len(payload) != 4 * n * d:
                raise ModelError("hidden-state payload size does not match n x d_model")
            x = np.frombuffer(payload, dtype="<f4").reshape(n, d)
        pos = params.get("pos")
        if type(pos) is not int or pos != st.pos + n:
            # A repeated, skipped or reordered step would corrupt the KV cache.
            raise ModelError(f"step ends at position {pos!r}; the session is at {st.pos}")
        if st.audit is not None:
            self._record(st.audit, st.sid, spec.is_first, params, payload, sender)
        st.pos = pos  # before the await: a concurrent duplicate is refused too
        t0 = time.perf_counter()
        out = await loaded.shard.forward(st.session, x)
        own = {"peer": self.me, "ms": round((time.perf_counter() - t0) * 1000, 3)}
        return st, spec, out, own

    def _record(
        self,
        audit: AuditLog,
        sid: str,
        first: bool,
        params: dict[str, Any],
        payload: bytes,
        sender: str | None,
    ) -> None:
        """Keep an audited step's input; from a previous stage only with its valid signature
        (an honest stage refuses what it could not later prove it received)."""
        pos, n, sig = params.get("pos"), int(params["n"]), params.get("sig", b"")
        if type(pos) is not int or not n <= pos < 1 << 40:
            raise ModelError("an audited step needs its position")
        if not first:
            if not isinstance(sig, bytes) or sender is None:
                raise ModelError("an audited step arrived without its sender's signature")
            try:
                verify(self.caller.peer_key(sender), step_message(sid, pos, n, payload), sig)
            except (IdentityError, RPCError) as exc:
                msg = f"step signature from {sender[:12]} does not verify: {exc}"
                raise ModelError(msg) from None
        audit.add(AuditEntry(pos, n, payload, sig if not first else b""))

    async def rpc_stage_audit(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """The inputs an audited session received at positions [since, upto] (its owner only)."""
        sid, upto, since = params.get("sid"), params.get("upto"), params.get("since", 0)
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        if st is None or st.owner != ctx.peer_id or st.audit is None:
            raise ModelError("no audited session of yours by that id")
        if type(upto) is not int or type(since) is not int:
            raise ModelError("upto and since must be positions")
        audit = st.audit
        entries = [e for e in audit.upto(upto) if e.pos >= since]
        # Incomplete only if the positions asked for go past what the full log kept.
        short = audit.overflowed and (not audit.entries or upto > audit.entries[-1].pos)
        return Reply({"n": len(entries)}, pack_entries(entries, short))

    async def rpc_stage_recompute(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """A verifier's step: run a whole input history as one chunk on a fresh session and
        return the last ``rows`` outputs (a last stage: its token under the same sampling,
        the top logits and the logit of the token to check)."""
        sid, rows = params.get("sid"), params.get("rows")
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        if st is None or st.owner != ctx.peer_id:
            raise ModelError("no session of yours by that id")
        if type(rows) is not int or rows <= 0:
            raise ModelError("rows must be a positive integer")
        n = params.get("n")
        if type(n) is not int or not 0 < n <= MAX_SESSION_TOKENS or len(payload) % n:
            raise ModelError("n must be a positive integer dividing the payload")
        row, outs, ms = len(payload) // n, [], 0.0
        for a in range(0, n, PREFILL_CHUNK):  # chunked as a prefill: bounded attention memory
            b = min(n, a + PREFILL_CHUNK)
            step = {"sid": sid, "n": b - a, "pos": b}
            cur, spec, chunk_out, own = await self._compute(step, payload[a * row : b * row])
            chunk_out = np.asarray(chunk_out, dtype=np.float32)
            outs.append(chunk_out.reshape(-1, chunk_out.shape[-1]))
            ms += own["ms"]
        own = dict(own, ms=round(ms, 3))
        out = np.concatenate(outs)
        if not spec.is_last:
            tail = np.ascontiguousarray(out[-rows:], dtype="<f4")
            return Reply({"rows": int(tail.shape[0]), "ms": own["ms"]}, tail.tobytes())
        logits = out[-1]
        try:
            sp = SamplingParams.from_wire(params.get("sample", {}))
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        pos, claimed = params.get("pos", 0), params.get("claimed")
        if type(claimed) is not int or not 0 <= claimed < logits.shape[-1]:
            raise ModelError("claimed must be a token id")
        token = sample(logits, sp, pos if type(pos) is int else 0)
        return Reply(
            {
                "token": token,
                "token_logit": float(logits[token]),
                "claimed_logit": float(logits[claimed]),
                "top": top_logits(logits, 8),
                "ms": own["ms"],
            }
        )

    async def rpc_stage_forward(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """One step as a chain of calls (each stage awaits the rest): simpler to debug than
        ``stage_push`` and one more traversal per step."""
        st, spec, out, own = await self._compute(params, payload, ctx.peer_id)
        if spec.is_last:
            return self._finish(st.key[0], out, params, own)
        if st.next_peer is None or st.next_sid is None:
            raise ModelError("a middle stage without a next stage")
        body = np.ascontiguousarray(out, dtype="<f4").tobytes()
        fwd = {k: v for k, v in params.items() if k in ("n", "sample", "pos", "top")}
        fwd["sid"] = st.next_sid
        try:
            reply = await self.caller.call(
                st.next_peer, "stage_forward", fwd, body, timeout=self.config.forward_timeout
            )
        except RemoteError:
            raise  # a further stage failed: its code names the culprit
        except RPCError as exc:
            raise StageUnavailable(st.next_peer) from exc
        reply.result["trace"] = [own] + list(reply.result.get("trace", []))
        return reply

    def _finish(self, mid: str, out: Any, params: dict[str, Any], own: dict[str, Any]) -> Reply:
        logits = np.asarray(out, dtype=np.float32)[-1]
        try:
            sp = SamplingParams.from_wire(params.get("sample", {}))
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        pos = params.get("pos", 0)
        token = sample(logits, sp, pos if type(pos) is int else 0)
        result: dict[str, Any] = {"token": token, "trace": [own]}
        top = params.get("top", 0)
        if type(top) is int and 0 < top <= 64:
            result["top"] = top_logits(logits, top)
        tok = self.tokenizers.cached(mid)
        if tok is not None:
            result["eos"] = token == tok.eos_id
            return Reply(result, tok.token_bytes(token))
        return Reply(result)

    # -- housekeeping ----------------------------------------------------------------------
    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.config.session_ttl / 2))  # eviction period
            cutoff = time.monotonic() - self.config.session_ttl
            for sid, st in list(self.sessions.items()):
                # Still ours: a stage_close during an await below may have closed it already.
                if st.last_used < cutoff and self.sessions.get(sid) is st:
                    log.info("evicting idle session %s", sid[:8])
                    del self.sessions[sid]
                    await self._close(st)
