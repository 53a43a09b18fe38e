"""Sharded generation, coordinated by the node an application talks to.

1. **Route** (:mod:`~mesh.inference.planning`): an ordered list of stages (peer, unit range,
   runtime) covering the model. A model that one peer can hold runs on that peer alone unless
   a split is asked for; otherwise the units are split contiguously by free memory, preferring
   peers that already hold the bytes.
2. **Sessions** (:mod:`~mesh.inference.sessions`): one per stage, opened last stage first so
   each knows where to push.
3. **Steps** (:mod:`~mesh.inference.steps`): the coordinator sends token ids to the first
   stage; activations flow stage to stage; the last stage samples and the token travels back
   with a per-stage compute trace (:mod:`~mesh.inference.stats` keeps the timings).
4. **Failover** (:mod:`~mesh.inference.failover`): the run keeps its token history. When a
   stage dies or misses its deadline its units are re-planned on another peer, the route
   reopened and the history replayed in the same chunks as the original run (prompt chunks,
   then token by token), so the continuation is exactly the fault-free one.

The node's :class:`~mesh.inference.coordinator.Coordinator` starts each generation as a
:class:`GenerationRun`, which sees it only as a :class:`~mesh.inference.host.RunHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.errors import Error
from mesh.inference.compute import MAX_SESSION_TOKENS, PREFILL_CHUNK
from mesh.inference.failover import Failover
from mesh.inference.host import AwaitedToken, RunHost
from mesh.inference.planning import MAX_FAILOVERS, RoutePlanner
from mesh.inference.prompts import Pieces, tokenize_prompt, tokenizer_blobs
from mesh.inference.routes import (
    KV_PER_BLOCK,
    SHARD_OVERHEAD,
    PeerView,
    RouteError,
    Stage,
    plan_route,
)
from mesh.inference.sampling import SamplingParams
from mesh.inference.sessions import RouteSessions
from mesh.inference.speculate import (
    PromptLookup,
    SpecParams,
    SpecStats,
    accepted_prefix,
    verified_tokens,
)
from mesh.inference.stats import RunStats
from mesh.inference.steps import StepParams, StepRunner
from mesh.inference.stops import StopFilter
from mesh.inference.verify import SpotChecker, Step, VerificationFailed, VerifyParams
from runtimes.chat_template import render_messages
from runtimes.errors import ModelError
from runtimes.shards import Manifest

__all__ = [
    "ContextLengthExceeded",
    "Stage",
    "GenerationRequest",
    "GenerationRun",
    "AwaitedToken",
    "RunHost",
    "RouteError",
    "plan_route",
    "KV_PER_BLOCK",
    "SHARD_OVERHEAD",
]

log = logging.getLogger(__name__)

# a generated token, its claimed text, eos, and its step's ``top`` and ``logprobs`` if asked
_Out = tuple[int, bytes, bool, dict[str, Any]]


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
    chat: bool = False  # ``prompt`` is a rendered chat template: special tokens, no BOS added
    messages: list[dict[str, Any]] | None = None  # chat messages: rendered by the model's template
    clip_to_context: bool = False  # max_tokens is a ceiling: what the context leaves, at most
    logprobs: int | None = None  # each token's log-probability, with this many alternatives
    local: bool = False  # a batch job's record: route on this node alone when it holds it all
    speculative: SpecParams = field(default_factory=SpecParams)  # drafting: off by default


@dataclass
class _Parts:
    """One run's pieces, built once the model, its manifest and the prompt are known."""

    mid: str
    manifest: Manifest
    prompt: list[int]
    planner: RoutePlanner
    route: RouteSessions
    failover: Failover
    checker: SpotChecker | None
    pieces: Pieces  # each token's text, never the last stage's word alone


class GenerationRun:
    """One generation: yields ``{"route"}``, ``{"token", "text"}`` per token (and a
    ``{"restart"}`` after a spot check's verdict), then the ``{"done"}`` summary."""

    def __init__(self, host: RunHost, req: GenerationRequest) -> None:
        self.host = host
        self.req = req
        self.stats = RunStats()
        self.parts: _Parts | None = None  # once the route is planned (tests look inside)
        self.generated: list[int] = []
        self.text = ""
        self.pending = b""  # a trailing partial UTF-8 sequence, held back
        self.finish = "length"  # or "stop": an end-of-sequence token or a stop string
        self.template: str | None = None  # chat: "model" or "chatml fallback"
        self.started = time.time()
        self.spec = SpecStats()

    def progress(self) -> dict[str, Any] | None:
        """Where the run is (the topology page draws its route): None before it is planned."""
        p = self.parts
        if p is None:
            return None
        n_layers = p.manifest.n_layers
        return {
            "model_id": p.mid,
            "model": self.req.model,
            "n_layers": n_layers,
            "stages": [s.as_dict(n_layers) for s in p.route.stages],
            "tokens": len(self.generated),
            "tokens_per_s": self.stats.recent_rate(),
            "rate_history": self.stats.rate.history(),  # tokens in each of the last 60 s
            "started": round(self.started, 3),
        }

    async def run(self) -> AsyncGenerator[dict[str, Any], None]:
        self.stats = RunStats()
        p = self.parts = await self._prepare()
        with self.host.using_model(p.mid):  # its manifest stays here while the run lasts
            async for event in self._run(p):
                yield event

    async def _run(self, p: _Parts) -> AsyncGenerator[dict[str, Any], None]:
        n_layers = p.manifest.n_layers
        chunks = self._chunks(p.prompt)
        # The first chunk goes with the opens (each stage holds it until its session is
        # open); not in a chain, whose call has its RPC deadline.
        push = chunks and self.req.mode == "push"
        await p.failover.open(p.route.stages, (chunks[0], len(chunks[0])) if push else None)
        self.stats.mark("opened")
        try:
            yield {"route": [s.as_dict(n_layers) for s in p.route.stages], "model_id": p.mid}
            for restarts in range(MAX_FAILOVERS + 1):
                try:
                    async for event in self._decode(p):
                        yield event
                    break
                except VerificationFailed as exc:
                    if restarts == MAX_FAILOVERS:
                        raise
                    # Tokens since the liar joined may be wrong: start over without it.
                    try:
                        await p.failover.restart(exc)
                    except RouteError as no_route:
                        raise RouteError(f"{exc}; no route is left: {no_route}") from None
                    yield {
                        "restart": True,
                        "banned": exc.peer if exc.banned else None,
                        "disputed": None if exc.banned else exc.peer,
                        "reason": exc.reason,
                        "route": [s.as_dict(n_layers) for s in p.route.stages],
                    }
            unit_bytes = [u.nbytes for u in p.manifest.units]
            host = self.host
            host.observe(p.route.stages, unit_bytes, p.planner.seen, self.stats.decode_ms)
            yield self._summary(p)
        finally:
            p.failover.drop_sent()
            await p.route.close()
            self.host.refresh_views(p.mid)  # its pulls and loads changed what peers hold

    def _chunks(self, prompt: list[int]) -> list[list[int]]:
        """The prompt in the steps that feed it (``prefill_chunk`` positions each)."""
        size = max(1, self.req.prefill_chunk)
        return [prompt[i : i + size] for i in range(0, len(prompt), size)]

    async def _prepare(self) -> _Parts:
        """Resolve the model, plan the route and tokenize the prompt, before any session
        opens: each reserves its KV cache for the prompt and the output."""
        req, host = self.req, self.host
        mid = await host.resolve(req.model)
        self.stats.mark("resolved")
        checker, verify = None, req.verify
        if req.verify.rate > 0 and req.mode != "push":
            raise ModelError("spot checks need push mode")
        if host.stranger_checks > verify.strangers and req.mode == "push":
            verify = replace(verify, strangers=host.stranger_checks)
        if verify.rate > 0 or verify.strangers > 0:
            checker = SpotChecker(host, mid, verify)
        views, manifest, kept = await host.route_views(mid)
        planner = RoutePlanner(host, mid, manifest, split=req.split, runtime=req.runtime)
        planner.from_kept = kept
        planner.seen.update((v.peer_id, v) for v in views)
        stages = self._first_route(planner, views, manifest)
        self.stats.mark("planned")
        tok = await host.tokenizer(mid)
        ends, first = tokenizer_blobs(manifest), stages[0].peer_id
        holders = sorted(
            (v.peer_id for v in views if ends & v.held and v.peer_id != host.mesh.me),
            key=lambda peer: peer != first,
        )
        pieces = Pieces(host.mesh, mid, tok, holders)
        prompt = await self._prompt(manifest, tok, holders, mid)
        self.stats.mark("tokenized")
        context = manifest.chat.context_length if manifest.chat is not None else 0
        if context and req.clip_to_context and len(prompt) < context:
            self.req = req = replace(req, max_tokens=min(req.max_tokens, context - len(prompt)))
        if context and len(prompt) + req.max_tokens > context:
            raise ContextLengthExceeded(len(prompt), req.max_tokens, context)
        # prompt + output; each stage caps it at the context
        max_tokens = min(len(prompt) + req.max_tokens, MAX_SESSION_TOKENS)
        route = RouteSessions(host, mid, max_tokens, audit=checker is not None)
        route.stages = stages
        params = StepParams(req.mode, req.sampling, req.top, len(prompt), req.logprobs)
        steps = StepRunner(host, route, params, self.stats)
        failover = Failover(planner, route, steps)
        return _Parts(mid, manifest, prompt, planner, route, failover, checker, pieces)

    def _first_route(
        self, planner: RoutePlanner, views: list[PeerView], manifest: Manifest
    ) -> list[Stage]:
        """The first route. A batch job's record (``local``) runs on this node alone when it
        holds every shard and has the memory (its task was placed here for that), however
        fast the planner deems another peer; a failover re-plans over every peer."""
        if self.req.local:
            blobs = {b.sha256 for b in manifest.blobs}
            me = self.host.mesh.me
            mine = [v for v in views if v.peer_id == me and blobs <= v.held]
            if mine:
                with contextlib.suppress(RouteError):
                    return planner.plan(mine)
        return planner.plan(views)

    async def _prompt(
        self, manifest: Manifest, tok: Any | None, holders: list[str], mid: str
    ) -> list[int]:
        """The prompt's tokens: given, or the text's, or the chat messages' under the
        model's template (rendered here, off the event loop; the template is the model's
        data, bounded by runtimes.chat_template)."""
        req, mesh = self.req, self.host.mesh
        if req.tokens is not None:
            return list(req.tokens)
        if req.messages is None:
            return await tokenize_prompt(mesh, mid, tok, holders, req.prompt, req.chat)
        text, self.template = await asyncio.to_thread(
            render_messages, manifest.chat, req.messages, manifest.architecture
        )
        return await tokenize_prompt(mesh, mid, tok, holders, text, chat=True)

    async def _decode(self, p: _Parts) -> AsyncGenerator[dict[str, Any], None]:
        """The token loop from the prompt; a checked step's token is released only after its
        check passed."""
        req, prompt, failover = self.req, p.prompt, p.failover
        self.generated, self.text, self.pending = [], "", b""
        stops = StopFilter(req.stop)
        failover.forget()
        self.spec = SpecStats()
        self.stats.decode_ms = []  # the rate of this run (a spot-check restart starts over)
        chunks = self._chunks(prompt)
        end = 0
        for chunk in chunks[:-1]:  # the tokens these give are not wanted
            end += len(chunk)
            reply = await failover.step(chunk, end)
            failover.fed_chunk(chunk, None)
            if p.checker is not None:  # a forged chunk would sit in the next KV cache for good
                route, claimed = p.route, int(reply.result["token"])
                await p.checker.after_step(
                    Step(
                        route.stages, route.sids, prompt, end, len(chunk), req.sampling, 0, claimed
                    )
                )
        feed = chunks[-1] if chunks else prompt
        spec = req.speculative
        lookup = PromptLookup(spec.ngram) if spec.on else None
        if lookup is not None:
            lookup.extend(prompt)
        i = 0
        while i < req.max_tokens:
            pos = len(prompt) + i
            # no draft for the prompt's last chunk: its rows' logits are not wanted
            k = min(spec.draft, req.max_tokens - i - 1)
            drafts = lookup.draft(k) if lookup is not None and i > 0 else []
            if drafts:
                new = await self._verify_step(p, feed, drafts, pos, i)
            else:
                new = [await self._plain_step(p, feed, pos, i)]
                self.spec.plain_steps += i > 0 and lookup is not None
            for token, said, eos_flag, extras in new:
                event, end = await self._emit(p, stops, token, said, eos_flag, extras)
                i += 1
                yield event
                if end:
                    return
            if lookup is not None:
                lookup.extend([t for t, *_ in new])
            feed = [new[-1][0]]

    async def _plain_step(self, p: _Parts, feed: list[int], pos: int, i: int) -> _Out:
        """One step giving one token (a prompt's last chunk, or a token without a draft)."""
        req = self.req
        reply = await p.failover.step(feed, pos)
        token = int(reply.result["token"])
        p.failover.fed_chunk(feed, token)
        if p.checker is not None:
            route, tokens = p.route, p.prompt + self.generated + [token]
            step = Step(route.stages, route.sids, tokens, pos, len(feed), req.sampling, i)
            await p.checker.after_step(step)
        return token, reply.payload, bool(reply.result.get("eos")), reply.result

    async def _verify_step(
        self, p: _Parts, feed: list[int], drafts: list[int], pos: int, i: int
    ) -> list[_Out]:
        """One verify step (speculative decoding): the last token and the drafts through the
        route; the tokens of the drafts that agree and the one after them."""
        chunk, end = feed + drafts, pos + len(drafts)
        reply = await p.failover.step(chunk, end, len(drafts))
        verified = verified_tokens(reply, len(chunk))
        tokens, pieces, eos = verified.tokens, verified.pieces, verified.eos
        m = accepted_prefix(drafts, tokens)
        p.failover.fed_chunk(chunk, tokens[m], m + 1)
        self.spec.record(len(drafts), m)
        self.stats.add_tokens(m)
        if p.checker is not None:  # every row is checkable: the chunk ran on every stage
            route, history = p.route, p.prompt + self.generated + drafts
            sampling = self.req.sampling
            step = Step(route.stages, route.sids, history, end, len(chunk), sampling, i, tokens[-1])
            step = replace(step, claimed_rows=tuple(tokens))
            await p.checker.after_step(step)
        extras = verified.extras
        return [(tokens[j], pieces[j], eos[j] if eos else False, extras[j]) for j in range(m + 1)]

    async def _emit(
        self,
        p: _Parts,
        stops: StopFilter,
        token: int,
        claimed: bytes,
        eos_flag: bool,
        extras: dict[str, Any],
    ) -> tuple[dict[str, Any], bool]:
        """A generated token's event, and whether the generation ends with it. ``extras``:
        its step's result, or a verify step's row (``top`` and ``logprobs``)."""
        req = self.req
        self.generated.append(token)
        self.stats.first_token()
        last = p.route.stages[-1].peer_id
        text = await p.pieces.piece(token, claimed, last)
        eos = p.pieces.is_eos(token, eos_flag)
        piece, self.pending = _utf8(self.pending + text)
        piece = stops.feed(piece)
        end = eos or stops.stopped or len(self.generated) == req.max_tokens
        if end:  # what was held back for a stop string that never came
            piece += stops.feed(self.pending.decode("utf-8", "replace")) + stops.flush()
            self.pending = b""
        self.text += piece
        self.finish = "stop" if eos or stops.stopped else "length"
        event: dict[str, Any] = {"token": token, "text": piece}
        if "top" in extras:
            event["top"] = extras["top"]
        if req.logprobs is not None:
            value = extras.get("logprobs")
            event["logprobs"] = await _logprobs(p.pieces, value, req.logprobs, last)
        return event, end

    def _summary(self, p: _Parts) -> dict[str, Any]:
        out = {
            "done": True,
            "model_id": p.mid,
            "prompt_tokens": len(p.prompt),
            "tokens": list(self.generated),
            "text": self.text,
            "finish_reason": self.finish,
            "seed": self.req.sampling.seed,
            "chat_template": self.template,
            "stages": [s.as_dict(p.manifest.n_layers) for s in p.route.stages],
            **self.stats.timings(),
            "reroutes": p.planner.reroutes,
            "bytes_pulled": p.route.bytes_pulled,
            "total_s": self.stats.total_s(),
        }
        if p.checker is not None:
            out["verification"] = p.checker.summary()
        if self.req.speculative.on:
            out["speculative"] = self.spec.summary(self.req.speculative)
        return out


class ContextLengthExceeded(Error, ValueError):
    """The prompt and the tokens asked for do not fit the model's context."""

    def __init__(self, prompt: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} in the "
            "completion). Please reduce the prompt or the completion length."
        )
        self.context = context


async def _logprobs(pieces: Pieces, value: Any, k: int, last: str) -> dict[str, Any] | None:
    """The event's ``logprobs`` from the last stage's ``value``: the token's log-probability
    and up to ``k`` alternatives, each with its text (UTF-8 bytes as a list, as OpenAI gives
    them)."""
    checked = checked_logprobs(value, k)
    if checked is None:
        return None
    lp, alts = checked
    top = []
    for token, value in alts:
        text = await pieces.text_of(token, last)
        top.append({"id": token, "logprob": value, "bytes": list(text)})
    return {"logprob": lp, "top": top}


def checked_logprobs(value: Any, k: int) -> list[Any] | None:
    """The last stage's ``[logprob, [[token, logprob], ...]]``, type-checked and capped (it
    is a peer's word), or None."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], list)):
        return None
    lp, alts = value
    if not isinstance(lp, int | float) or not lp <= 0.0:
        return None
    out = []
    for alt in alts[:k]:
        if (
            isinstance(alt, list | tuple)
            and len(alt) == 2
            and type(alt[0]) is int
            and isinstance(alt[1], int | float)
            and alt[1] <= 0.0
        ):
            out.append([alt[0], float(alt[1])])
    return [float(lp), out]


def _utf8(data: bytes) -> tuple[str, bytes]:
    """Decode what is complete; hold back a trailing partial UTF-8 sequence."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace"), b""
