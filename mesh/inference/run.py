"""Sharded generation, coordinated by the node an application talks to.

1. **Route**: an ordered list of stages (peer, unit range, runtime) covering the model. A model
   that one peer can hold runs on that peer alone unless a split is asked for; otherwise the
   units are split contiguously by free memory, preferring peers that already hold the bytes.
2. **Sessions**: one per stage, opened last stage first so each knows where to push.
3. **Steps**: the coordinator sends token ids to the first stage; activations flow stage to
   stage; the last stage samples and the token travels back with a per-stage compute trace.
4. **Failover**: the coordinator keeps the token history. When a stage dies or misses its
   deadline it re-plans that stage's units on another peer (which pulls the shard if needed),
   reopens the route and replays the history in the same chunks as the original run (prompt
   chunks, then token by token), so the continuation is exactly the fault-free one.

The node's :class:`~mesh.inference.coordinator.Coordinator` starts each generation as a
:class:`GenerationRun`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mesh.errors import EXPECTED, DeadlineExceeded, PeerUnavailable, RemoteError, RPCError
from mesh.inference.compute import (
    MAX_SESSION_TOKENS,
    PREFILL_CHUNK,
    CapacityError,
    StageUnavailable,
)
from mesh.inference.prompts import tokenizer_blobs, tokens_of
from mesh.inference.routes import (
    KV_PER_BLOCK,
    SHARD_OVERHEAD,
    PeerView,
    RouteError,
    Stage,
    plan_route,
    plan_with_scheduler,
)
from mesh.inference.sampling import SamplingParams
from mesh.inference.verify import SpotChecker, Step, VerificationFailed, VerifyParams
from mesh.net.rpc import Reply
from runtimes.errors import ModelError
from runtimes.shards import Manifest

if TYPE_CHECKING:
    from mesh.inference.routes import PairRtt
    from mesh.net.rpc import MeshCaller
    from runtimes.shards import Manifest


class RunHost(Protocol):
    """What one generation run needs from the node's coordinator, and nothing more."""

    @property
    def mesh(self) -> MeshCaller: ...

    @property
    def forward_timeout(self) -> float: ...

    @property
    def pair_rtt(self) -> PairRtt | None: ...

    @property
    def waiting(self) -> dict[tuple[str, int], AwaitedToken]:
        """Steps awaiting their token from the last stage, by (request id, position)."""
        ...

    def holds_manifest(self, mid: str) -> bool: ...

    async def resolve(self, model: str) -> str: ...

    async def views(self, mid: str, exclude: set[str]) -> tuple[list[PeerView], Manifest]: ...


__all__ = [
    "Stage",
    "GenerationRequest",
    "GenerationRun",
    "AwaitedToken",
    "RouteError",
    "plan_route",
    "KV_PER_BLOCK",
    "SHARD_OVERHEAD",
]

log = logging.getLogger(__name__)
MAX_FAILOVERS = 3
PROBE_EVERY = 3.0  # seconds between route probes while a step is awaited


@dataclass
class GenerationRequest:
    model: str
    prompt: str = ""
    tokens: list[int] | None = None
    max_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    split: int | None = None
    runtime: str | None = None
    top: int = 0  # return the top-k logits of every step (tests check margins)
    mode: str = "push"  # "push": one-way stage to stage; "chain": nested calls
    verify: VerifyParams = field(default_factory=VerifyParams)  # spot checks (push mode)
    # Prompt positions per step: each stage's attention scores for a step are chunk x context,
    # not prompt x prompt (an 8192-token prompt of Gemma: 1 GiB of scores per layer at once).
    prefill_chunk: int = PREFILL_CHUNK


@dataclass
class AwaitedToken:
    future: asyncio.Future[Reply]
    last: str  # only the last stage may deliver the token
    route: frozenset[str]  # only stages on the route may report a failure


class GenerationRun:
    """One generation: its route, sessions, history and statistics."""

    def __init__(self, coord: RunHost, req: GenerationRequest) -> None:
        self.c = coord
        self.req = req
        self.mid = ""
        self.manifest: Manifest | None = None
        self.stages: list[Stage] = []
        self.sids: list[str] = []
        self.prompt: list[int] = []
        self.generated: list[int] = []
        # chunks fed so far, each with the token it gave (None: a prompt chunk before the last)
        self.fed: list[tuple[list[int], int | None]] = []
        self.excluded: set[str] = set()
        self.reroutes: list[dict[str, Any]] = []
        self.step_ms: list[float] = []
        self.decode_ms: list[float] = []  # one-token steps of the generation itself
        self._replaying = False
        self.hop_ms: list[float] = []
        self.compute_ms: dict[str, list[float]] = {}
        self.bytes_pulled = 0
        self._last_opened = ""
        self._warm = 0  # steps since the route was (re)opened
        self.checker: SpotChecker | None = None
        self.text = ""
        self.pending = b""
        self.ttft: float | None = None
        self.t_start = time.perf_counter()

    async def run(self) -> AsyncGenerator[dict[str, Any], None]:
        req = self.req
        self.t_start = time.perf_counter()
        self.mid = await self.c.resolve(req.model)
        if req.verify.rate > 0:
            if req.mode != "push":
                raise ModelError("spot checks need push mode")
            self.checker = SpotChecker(self.c, self.mid, req.verify)
        views, self.manifest = await self.c.views(self.mid, self.excluded)
        self.stages = self._plan(views)
        # Before any session opens: each reserves its KV cache for the prompt and the output.
        self.prompt = list(req.tokens) if req.tokens is not None else await self._tokenize(views)
        await self._open()
        try:
            yield {
                "route": [s.as_dict(self.manifest.n_layers) for s in self.stages],
                "model_id": self.mid,
            }
            for restarts in range(MAX_FAILOVERS + 1):
                try:
                    async for event in self._decode():
                        yield event
                    break
                except VerificationFailed as exc:
                    if restarts == MAX_FAILOVERS:
                        raise
                    # Tokens since the liar joined may be wrong: start over without it.
                    try:
                        await self._restart(exc)
                    except RouteError as no_route:
                        raise RouteError(f"{exc}; no route is left: {no_route}") from None
                    yield {
                        "restart": True,
                        "banned": exc.peer if exc.banned else None,
                        "disputed": None if exc.banned else exc.peer,
                        "reason": exc.reason,
                        "route": [s.as_dict(self.manifest.n_layers) for s in self.stages],
                    }
            yield self._summary()
        finally:
            await self._close()

    async def _decode(self) -> AsyncGenerator[dict[str, Any], None]:
        """The token loop from the prompt; a checked step's token is released only after its
        check passed."""
        req = self.req
        self.generated, self.text, self.pending, self.fed = [], "", b"", []
        self.decode_ms = []  # the rate of this run (a spot-check restart starts over)
        size = max(1, req.prefill_chunk)
        chunks = [self.prompt[i : i + size] for i in range(0, len(self.prompt), size)]
        end = 0
        for chunk in chunks[:-1]:  # the tokens these give are not wanted
            end += len(chunk)
            await self._step(chunk, end)
            self.fed.append((chunk, None))
        feed = chunks[-1] if chunks else self.prompt
        for i in range(req.max_tokens):
            pos = len(self.prompt) + i
            reply = await self._step(feed, pos)
            token = int(reply.result["token"])
            self.generated.append(token)
            self.fed.append((feed, token))
            if self.checker is not None:
                tokens = self.prompt + self.generated
                await self.checker.after_step(
                    Step(self.stages, self.sids, tokens, pos, len(feed), req.sampling, i)
                )
            if self.ttft is None:
                self.ttft = (time.perf_counter() - self.t_start) * 1000
            piece, self.pending = _utf8(self.pending + reply.payload)
            self.text += piece
            event: dict[str, Any] = {"token": token, "text": piece}
            if "top" in reply.result:
                event["top"] = reply.result["top"]
            yield event
            if reply.result.get("eos") or any(s and s in self.text for s in req.stop):
                break
            feed = [token]

    async def _restart(self, exc: VerificationFailed) -> None:
        log.warning("restarting the generation without %s: %s", exc.peer[:12], exc.reason)
        self.excluded.add(exc.peer)
        if exc.accuser is not None:
            self.excluded.add(exc.accuser)
        await self._close()
        views, _ = await self.c.views(self.mid, self.excluded)
        try:
            self.stages = self._plan(views)
        except RouteError:  # the requested split needed the banned peer: any route will do
            self.stages = self._plan(views, relax=True)
        self.reroutes.append(
            {
                "failed": exc.peer,
                "units": [],
                "replacement": [s.peer_id for s in self.stages],
                "after_tokens": len(self.generated),
                "reason": f"spot check: {exc.reason}"[:200],
            }
        )
        await self._open()

    def _summary(self) -> dict[str, Any]:
        assert self.manifest is not None
        decode = self.decode_ms
        out = {
            "done": True,
            "model_id": self.mid,
            "prompt_tokens": len(self.prompt),
            "tokens": list(self.generated),
            "text": self.text + self.pending.decode("utf-8", "replace"),
            "stages": [s.as_dict(self.manifest.n_layers) for s in self.stages],
            "ttft_ms": round(self.ttft or 0.0, 2),
            "tokens_per_s": round(len(decode) / (sum(decode) / 1000), 2) if decode else 0.0,
            "decode_steps": len(decode),
            "steps": len(self.step_ms),  # prompt chunks, decode steps and replays
            "hop_ms": round(float(np.median(self.hop_ms)), 3) if self.hop_ms else 0.0,
            "stage_ms": {p: round(float(np.median(v)), 3) for p, v in self.compute_ms.items()},
            "reroutes": self.reroutes,
            "bytes_pulled": self.bytes_pulled,
            "total_s": round(time.perf_counter() - self.t_start, 3),
        }
        if self.checker is not None:
            out["verification"] = self.checker.summary()
        return out

    def _plan(self, views: list[PeerView], relax: bool = False) -> list[Stage]:
        """``relax``: ignore the requested split (after a ban there may be too few peers)."""
        split = None if relax else self.req.split
        assert self.manifest is not None
        log.info(
            "planning over %s",
            ", ".join(
                f"{v.peer_id[:8]}(free {v.free / 2**20:.0f} MiB, "
                f"{v.mem_bytes_per_s / 1e9:.1f} GB/s, rtt {v.rtt_ms:.2f})"
                for v in views
            ),
        )
        try:
            return plan_with_scheduler(
                self.manifest,
                views,
                split=split,
                runtime=self.req.runtime,
                pair_rtt=self.c.pair_rtt,
            )
        except EXPECTED as exc:  # the scheduler's errors share the root
            log.info("exact planner found no route (%s); splitting by memory", exc)
            return plan_route(
                self.manifest,
                views,
                split=split,
                prefer=self.c.mesh.me,
                runtime=self.req.runtime,
            )

    async def _tokenize(self, views: list[PeerView]) -> list[int]:
        """The prompt's tokens from a peer holding the model's embedding or head blob (the
        tokenizer travels with them): this node first, then the route's first stage."""
        assert self.manifest is not None
        ends = tokenizer_blobs(self.manifest)
        first = self.stages[0].peer_id
        holders = sorted(
            (v.peer_id for v in views if ends & v.held),
            key=lambda p: (p != self.c.mesh.me, p != first),
        )
        failure: Exception | None = None
        for peer in holders[:3]:
            try:
                params = {"model_id": self.mid}
                reply = await self.c.mesh.call(peer, "tokenize", params, self.req.prompt.encode())
                return tokens_of(reply)
            except (RPCError, ModelError) as exc:
                failure = exc
                log.info("tokenizing on %s failed: %s", peer[:12], exc)
        raise RouteError(f"no peer could tokenize the prompt ({failure or 'no tokenizer held'})")

    # -- sessions --------------------------------------------------------------------------
    async def _open(self) -> None:
        """Open the route's sessions; a peer short of memory is replaced (re-planned)."""
        for _ in range(MAX_FAILOVERS + 1):
            try:
                await self._open_once()
                return
            except (RemoteError, CapacityError) as exc:
                if isinstance(exc, RemoteError) and exc.code != "CapacityError":
                    raise
                log.warning("%s lacked memory (%s): re-planning", self._last_opened[:12], exc)
                await self._close()
                self.excluded.add(self._last_opened)
                assert self.manifest is not None
                views, _ = await self.c.views(self.mid, self.excluded)
                self.stages = self._plan(views)
        raise RouteError("no route whose peers have the memory for their stages")

    async def _open_once(self) -> None:
        # Independent random ids: a stage cannot derive the other stages' sessions.
        self.sids = [os.urandom(12).hex() for _ in self.stages]
        self._warm = 0
        try:
            await self._open_stages()
        except BaseException:
            await self._close()  # the stages already opened must not wait for their TTL
            raise

    async def _open_stages(self) -> None:
        for i in reversed(range(len(self.stages))):
            st = self.stages[i]
            nxt = self.stages[i + 1].peer_id if i + 1 < len(self.stages) else None
            params = {
                "sid": self.sids[i],
                "model_id": self.mid,
                "units": list(st.units),
                "runtime": st.runtime,
                "next": nxt,
                "next_sid": self.sids[i + 1] if nxt else None,
                "prev": self.stages[i - 1].peer_id if i > 0 else None,
                # prompt + output; each stage caps it at the context
                "max_tokens": min(len(self.prompt) + self.req.max_tokens, MAX_SESSION_TOKENS),
                "source": self.c.mesh.me if self.c.holds_manifest(self.mid) else None,
                "audit": self.checker is not None,
            }
            self._last_opened = st.peer_id
            reply = await self.c.mesh.call(st.peer_id, "stage_open", params, timeout=600)
            self.bytes_pulled += int(reply.result.get("pulled", 0))

    async def _close(self) -> None:
        for st, sid in zip(self.stages, self.sids, strict=False):
            try:
                await self.c.mesh.call(st.peer_id, "stage_close", {"sid": sid}, timeout=5)
            except RPCError:
                pass  # a dead stage has nothing left to free

    # -- steps -----------------------------------------------------------------------------
    async def _step(self, feed: list[int], pos: int) -> Reply:
        for attempt in range(MAX_FAILOVERS + 1):
            try:
                return await self._forward(feed, pos)
            except (RPCError, StageUnavailable) as exc:
                failed = self._culprit(exc)
                if failed is None or attempt == MAX_FAILOVERS:
                    raise
                # A second fault during the re-route (or its replay) is handled the same way.
                while True:
                    try:
                        await self._reroute(failed, str(exc))
                        break
                    except (RPCError, StageUnavailable) as again:
                        failed = self._culprit(again)
                        attempt += 1
                        if failed is None or attempt >= MAX_FAILOVERS:
                            raise
                        exc = again
        raise RouteError("unreachable")  # the loop either returns or raises

    async def _forward(self, feed: list[int], pos: int) -> Reply:
        if self.req.mode == "chain":
            return await self._forward_chain(feed, pos)
        return await self._forward_push(feed, pos)

    async def _forward_chain(self, feed: list[int], pos: int) -> Reply:
        """One step as nested calls: each stage awaits the rest and relays the reply."""
        body = np.asarray(feed, dtype="<i4").tobytes()
        params = {
            "sid": self.sids[0],
            "n": len(feed),
            "pos": pos,
            "sample": self.req.sampling.to_wire(),
        }
        if self.req.top:
            params["top"] = self.req.top
        t0 = time.perf_counter()
        reply = await self.c.mesh.call(
            self.stages[0].peer_id, "stage_forward", params, body, timeout=self.c.forward_timeout
        )
        self._account(reply, (time.perf_counter() - t0) * 1000, pos)
        return reply

    async def _forward_push(self, feed: list[int], pos: int) -> Reply:
        """One step: tokens go to the first stage, activations flow stage to stage, and the
        last stage sends the token straight back here (no reply travels the chain)."""
        body = np.asarray(feed, dtype="<i4").tobytes()
        rid = self.sids[0]
        params = {
            "sid": rid,
            "rid": rid,
            "n": len(feed),
            "pos": pos,
            "sample": self.req.sampling.to_wire(),
        }
        if self.req.top:
            params["top"] = self.req.top
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        route = frozenset(s.peer_id for s in self.stages)
        self.c.waiting[(rid, pos)] = AwaitedToken(fut, self.stages[-1].peer_id, route)
        t0 = time.perf_counter()
        try:
            await self.c.mesh.notify(
                self.stages[0].peer_id, "stage_push", params, body, timeout=self.c.forward_timeout
            )
            reply = await self._await_token(fut, pos)
        finally:
            self.c.waiting.pop((rid, pos), None)
        self._account(reply, (time.perf_counter() - t0) * 1000, pos)
        return reply

    async def _await_token(self, fut: asyncio.Future[Reply], pos: int) -> Reply:
        """The step's token. While the deadline is long (warm-up, a long prefill) the route is
        probed every PROBE_EVERY s: a dead stage is found in seconds, a slow live one (its
        event loop answers while its compute thread works) is waited for."""
        end = time.monotonic() + self._deadline()
        while True:
            try:
                wait = max(0.0, min(end - time.monotonic(), PROBE_EVERY))
                return await asyncio.wait_for(asyncio.shield(fut), wait)
            except TimeoutError:
                culprit = await self._probe()
                if culprit is not None:
                    raise StageUnavailable(culprit) from None
                if fut.done():
                    return fut.result()
                if time.monotonic() >= end:
                    raise DeadlineExceeded(f"step {pos} got no token in time") from None

    def _account(self, reply: Reply, ms: float, pos: int) -> None:
        self._warm += 1
        if pos > len(self.prompt) and not self._replaying:  # decode: no prompt, no replays
            self.decode_ms.append(ms)
        trace = reply.result.get("trace", [])
        compute = 0.0
        for t in trace if isinstance(trace, list) else []:
            if isinstance(t, dict) and isinstance(t.get("ms"), float | int):
                compute += float(t["ms"])
                self.compute_ms.setdefault(str(t.get("peer")), []).append(float(t["ms"]))
        self.step_ms.append(ms)
        # hops: coordinator -> first, between stages, last -> coordinator
        self.hop_ms.append(max(ms - compute, 0.0) / len(self.stages))

    def _deadline(self) -> float:
        """Generous while warming up; then a multiple of the usual step, so a dead stage is
        noticed in seconds, not after the long RPC deadline."""
        if self._warm < 3:  # fresh sessions, loading shards, replays: no short deadline
            return self.c.forward_timeout
        return min(self.c.forward_timeout, max(3.0, 20 * float(np.median(self.step_ms)) / 1000))

    async def _probe(self) -> str | None:
        """The first stage on the route that does not answer, if any."""
        for st in self.stages:
            try:
                await self.c.mesh.call(st.peer_id, "capacity", timeout=2.0)
            except RPCError:
                return st.peer_id
        return None

    def _culprit(self, exc: RPCError | StageUnavailable) -> str | None:
        if isinstance(exc, StageUnavailable):  # raised here: the first stage is this node
            return str(exc).strip()
        if isinstance(exc, RemoteError):
            if exc.code == "StageUnavailable":
                return exc.message.strip()
            return None  # the stage answered: a bug or bad input, not a dead peer
        if isinstance(exc, PeerUnavailable):  # the first stage could not even be reached
            return self.stages[0].peer_id
        return None

    async def _reroute(self, failed: str, why: str) -> None:
        assert self.manifest is not None
        log.warning("stage %s failed (%s): re-routing", failed[:12], why)
        index = next((i for i, s in enumerate(self.stages) if s.peer_id == failed), None)
        if index is None:
            raise RouteError(f"failed peer {failed[:12]} is not on the route")
        self.excluded.add(failed)
        await self._close()
        views, _ = await self.c.views(self.mid, self.excluded)
        on_route = {s.peer_id for i, s in enumerate(self.stages) if i != index}
        spare = [v for v in views if v.peer_id not in on_route]
        old = self.stages[index]
        replacement = plan_route(
            self.manifest,
            spare,
            split=None,
            prefer=self.c.mesh.me,
            runtime=old.runtime,
            units=old.units,
        )
        self.stages = self.stages[:index] + replacement + self.stages[index + 1 :]
        self.reroutes.append(
            {
                "failed": failed,
                "units": list(old.units),
                "replacement": [s.peer_id for s in replacement],
                "after_tokens": len(self.generated),
                "reason": why[:200],
            }
        )
        await self._open()
        # Replay in the original chunks: the same computations give the same cache.
        # Every chunk fed before the one that failed (which _step then sends again).
        self._replaying = True
        try:
            end = 0
            for chunk, token in list(self.fed):
                end += len(chunk)
                reply = await self._forward(chunk, end)
                if token is not None and int(reply.result["token"]) != token:
                    log.warning(
                        "replay step at %d gave token %s, the original run %s",
                        end,
                        reply.result["token"],
                        token,
                    )
        finally:
            self._replaying = False


def _utf8(data: bytes) -> tuple[str, bytes]:
    """Decode what is complete; hold back a trailing partial UTF-8 sequence."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace"), b""
