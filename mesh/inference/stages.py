"""Stage sessions: one generation's KV cache on one loaded shard, and the steps run on it.

A stage session is one generation's KV cache on one shard. ``stage_forward`` runs the shard
and pushes its output straight to the next stage (as Petals servers do); the last stage samples
the token and the reply travels back along the chain, each stage adding its compute time to a
trace so the coordinator can tell compute from network time. A stage that cannot reach the
next one answers ``StageUnavailable`` naming that peer, so the coordinator knows which layer
range to re-route. Idle sessions are evicted after ``session_ttl``. Opening a session pulls
the stage's shards (:mod:`mesh.inference.shards`) and loads them (:mod:`mesh.inference.memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import EXPECTED, Error, IdentityError, RemoteError, RPCError
from mesh.inference.audit import MAX_AUDIT_BYTES, AuditEntry, AuditLog, step_message
from mesh.inference.early import EarlySteps, State
from mesh.inference.memory import LoadedShards, ShardKey
from mesh.inference.models import CapacityError, ComputeConfig, ShardObjects, StageUnavailable
from mesh.inference.sampling import (
    MAX_DRAFT,
    MAX_LOGPROBS,
    MAX_TOP,
    SamplingParams,
    logprobs,
    sample,
    sample_rows,
    top_logits,
)
from mesh.inference.speculate import pack_row_extras
from mesh.inference.stats import Rate
from mesh.net.callers import MeshCaller as Caller
from mesh.net.identity import verify
from mesh.net.rpc import CallContext, Reply
from runtimes.base import Session
from runtimes.errors import ModelError

__all__ = ["StageSessions", "StageSession", "MAX_SESSION_TOKENS", "PREFILL_CHUNK", "MAX_STEP_ROWS"]

log = logging.getLogger(__name__)

_FORWARDED = ("n", "sample", "pos", "top", "logprobs", "draft")  # step params every stage passes on
_SID = re.compile(r"^[0-9a-f]{8,64}$")
MAX_SESSION_TOKENS = 32768  # Gemma 3's context; memory is bounded by KV reservations
# Prompt positions per step: a stage's attention scores are chunk x context at most.
PREFILL_CHUNK = 512
# Rows one step may carry, from any peer: bounds a step's attention temporaries (scores and
# masks are rows x context) whatever the coordinator chose as its chunk.
MAX_STEP_ROWS = 2048


@dataclass
class StageSession:
    key: ShardKey
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
    # After a verify step (speculative decoding, ``draft`` > 0): the earliest position the
    # next step may start at, rolling back the rejected drafts; None: no rollback allowed.
    spec_floor: int | None = None
    owner_lost: float | None = None  # when the eviction loop first saw no link to the owner


class StageSessions(LoadedShards):
    def __init__(
        self,
        caller: Caller,
        me: str,
        root: Path,
        config: ComputeConfig,
        objects: ShardObjects | None = None,
    ) -> None:
        super().__init__(caller, me, root, config, objects)
        self.sessions: dict[str, StageSession] = {}
        self._opening: dict[str, str] = {}  # session ids being opened -> owner
        # steps sent with their route's opens, held until open: as many as sessions may be
        # opening (a coordinator opens many routes at once, a stage forwards their steps)
        self.early = EarlySteps(
            max_waiting=config.max_sessions, per_peer=config.max_sessions_per_peer
        )
        self.throughput = Rate()  # rows (token positions) this node's stages ran
        self._janitor: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._evict_loop())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        await self._unload_all()
        self.sessions.clear()

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
            with self.using(mid):  # its manifest stays until the shard is loaded
                return await self._open_stage(
                    ctx, params, sid, mid, units, runtime, max_tokens, nxt, next_sid, prev
                )
        finally:
            self._opening.pop(sid, None)
            self.early.ended(sid)

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
        with self.holding(manifest, start, end):  # not collected between pull and load
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
        self.sessions[sid] = StageSession(
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

    async def _close(self, st: StageSession) -> None:
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
        await self._until_open(params, ctx.peer_id)
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        owner = st.owner if st is not None else ctx.peer_id
        trace = params.get("trace", [])
        trace = list(trace)[:64] if isinstance(trace, list) else []
        try:
            cur, spec, out, own = await self._compute(params, payload, ctx.peer_id)
            trace.append(own)
            if spec.is_last:
                reply = await self._finish(cur.key[0], out, params, own)
                result = dict(reply.result, trace=trace, rid=rid, pos=params.get("pos"))
                await self.caller.notify(owner, "coordinator.stage_token", result, reply.payload)
                return
            if cur.next_peer is None or cur.next_sid is None:
                raise ModelError("a middle stage without a next stage")
            body = np.ascontiguousarray(out, dtype="<f4").tobytes()
            fwd = {k: v for k, v in params.items() if k in _FORWARDED + ("rid",)}
            fwd.update(sid=cur.next_sid, trace=trace)
            if cur.audit is not None:  # evidence the next stage keeps: we cannot deny it
                pos, n = int(params["pos"]), int(params["n"])
                fwd["sig"] = self.caller.sign(step_message(cur.next_sid, pos, n, body))
            try:
                await self.caller.notify(
                    cur.next_peer,
                    "compute.stage_push",
                    fwd,
                    body,
                    timeout=self.config.forward_timeout,
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
                await self.caller.notify(owner, "coordinator.stage_failed", report, timeout=5)
            except EXPECTED:
                log.warning("could not report a failed step to %s", owner[:12])

    async def _until_open(self, params: dict[str, Any], sender: str) -> None:
        """A route's first step, sent with its opens, waits for its own (:mod:`.early`).
        Only a first step (from position 0): a later one of an unknown session fails at
        once, so a stage that lost its sessions is routed around without a wait."""
        sid, pos, n = params.get("sid"), params.get("pos"), params.get("n")
        if not isinstance(sid, str) or not _SID.match(sid) or type(pos) is not int or pos != n:
            return  # refused, or failed, as it was before

        def state() -> State:
            if sid in self.sessions:
                return "open"
            return "opening" if sid in self._opening else "unknown"

        await self.early.until_open(sid, sender, state)

    async def _compute(
        self,
        params: dict[str, Any],
        payload: bytes,
        sender: str | None = None,
        all_logits: bool = False,
    ) -> tuple[StageSession, Any, Any, dict[str, Any]]:
        """Validate one step's input and run it on the session's shard (``all_logits``: a
        last stage returns every row's logits, as for a verify step)."""
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
        pos, draft = params.get("pos"), params.get("draft", 0)
        if type(draft) is not int or not 0 <= draft <= MAX_DRAFT or (draft and n != draft + 1):
            raise ModelError(f"draft must be 0..{MAX_DRAFT}, and n = draft + 1 when it is not 0")
        start = pos - n if type(pos) is int else -1
        floor = st.spec_floor if st.spec_floor is not None else st.pos
        if type(pos) is not int or not floor <= start <= st.pos:
            # A repeated, skipped or reordered step would corrupt the KV cache; only a verify
            # step's rejected drafts may be rolled back, by the step after it.
            raise ModelError(f"step ends at position {pos!r}; the session is at {st.pos}")
        rollback = start < st.pos
        if st.audit is not None:
            if rollback:
                st.audit.rollback(start)
            self._record(st.audit, st.sid, spec.is_first, params, payload, sender)
        # before the awaits: a concurrent duplicate is refused too
        st.pos, st.spec_floor = pos, (start + 1 if draft else None)
        t0 = time.perf_counter()
        if rollback:
            await loaded.shard.truncate(st.session, start)
        every = (bool(draft) or all_logits) and spec.is_last
        out = await loaded.shard.forward(st.session, x, all_logits=every)
        self.throughput.add(n)
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

    async def rpc_stage_forward(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """One step as a chain of calls (each stage awaits the rest): simpler to debug than
        ``stage_push`` and one more traversal per step."""
        await self._until_open(params, ctx.peer_id)
        st, spec, out, own = await self._compute(params, payload, ctx.peer_id)
        if spec.is_last:
            return await self._finish(st.key[0], out, params, own)
        if st.next_peer is None or st.next_sid is None:
            raise ModelError("a middle stage without a next stage")
        body = np.ascontiguousarray(out, dtype="<f4").tobytes()
        fwd = {k: v for k, v in params.items() if k in _FORWARDED}
        fwd["sid"] = st.next_sid
        try:
            reply = await self.caller.call(
                st.next_peer,
                "compute.stage_forward",
                fwd,
                body,
                timeout=self.config.forward_timeout,
            )
        except RemoteError:
            raise  # a further stage failed: its code names the culprit
        except RPCError as exc:
            raise StageUnavailable(st.next_peer) from exc
        reply.result["trace"] = [own] + list(reply.result.get("trace", []))
        return reply

    async def _finish(
        self, mid: str, out: Any, params: dict[str, Any], own: dict[str, Any]
    ) -> Reply:
        try:
            sp = SamplingParams.from_wire(params.get("sample", {}))
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        if params.get("draft"):  # a verify step: a token after every position
            return await self._finish_verify(mid, out, params, sp, own)
        logits = np.asarray(out, dtype=np.float32)[-1]
        pos = params.get("pos", 0)
        token = sample(logits, sp, pos if type(pos) is int else 0)
        result: dict[str, Any] = {"token": token, "trace": [own]}
        top, k = _extras_asked(params)
        if top:
            result["top"] = top_logits(logits, top)
        if k is not None:
            result["logprobs"] = logprobs(logits, token, k)
        tok = self.tokenizers.cached(mid)
        if tok is not None:
            result["eos"] = token == tok.eos_id
            return Reply(result, tok.token_bytes(token))
        return Reply(result)

    async def _finish_verify(
        self, mid: str, out: Any, params: dict[str, Any], sp: SamplingParams, own: dict[str, Any]
    ) -> Reply:
        """A verify step's answer: the token each of its positions gives, each sampled with
        the stream of its own position (:func:`sample_rows`), so the coordinator keeps the
        drafts up to the first that differs; their text, concatenated (``lens`` splits it),
        then each row's top logits and logprobs where asked (:func:`pack_row_extras`)."""
        rows = np.asarray(out, dtype=np.float32)
        end = int(params["pos"])  # checked by _compute
        tokens = sample_rows(rows, sp, end - rows.shape[0] + 1)
        result: dict[str, Any] = {"token": tokens[-1], "tokens": tokens, "trace": [own]}
        text = b""
        tok = self.tokenizers.cached(mid)
        if tok is not None:
            pieces = [bytes(tok.token_bytes(t)) for t in tokens]
            result["lens"] = [len(b) for b in pieces]
            result["eos"] = [t == tok.eos_id for t in tokens]
            text = b"".join(pieces)
        top, k = _extras_asked(params)
        if not top and k is None:
            return Reply(result, text)
        # a log-softmax over the vocabulary per row: off the event loop
        block, result["row_top"], result["row_logprobs"] = await asyncio.to_thread(
            pack_row_extras, rows, tokens, top, k
        )
        return Reply(result, text + block)

    # -- housekeeping ----------------------------------------------------------------------
    async def _evict_loop(self) -> None:
        cfg = self.config
        period = max(0.5, min(10.0, cfg.session_ttl / 2, cfg.owner_grace / 3))
        while True:
            await asyncio.sleep(period)  # eviction period
            await self.evict_once(time.monotonic())

    async def evict_once(self, now: float) -> None:
        """Free sessions idle past ``session_ttl``, and those whose owner (the coordinator)
        has had no link to us for ``owner_grace``."""
        cutoff = now - self.config.session_ttl
        linked = set(self.caller.connected_peer_ids()) | {self.me}
        for sid, st in list(self.sessions.items()):
            if st.owner in linked:
                st.owner_lost = None
            elif st.owner_lost is None:
                st.owner_lost = now
            lost = st.owner_lost is not None and now - st.owner_lost >= self.config.owner_grace
            # Still ours: a stage_close during an await below may have closed it already.
            if (st.last_used < cutoff or lost) and self.sessions.get(sid) is st:
                why = "its coordinator's link is gone" if lost else "idle"
                log.info("evicting session %s: %s", sid[:8], why)
                del self.sessions[sid]
                await self._close(st)


def _extras_asked(params: dict[str, Any]) -> tuple[int, int | None]:
    """The step's ``top`` (0: none) and ``logprobs`` (None: none), each ignored when out of
    range (the coordinator's API refused those already)."""
    top, k = params.get("top", 0), params.get("logprobs")
    top = top if type(top) is int and 0 < top <= MAX_TOP else 0
    return top, (k if type(k) is int and 0 <= k <= MAX_LOGPROBS else None)
