"""One step of a generation over its open route: token ids to the first stage, activations
stage to stage, the token back from the last one.

Two modes: ``push`` (one-way ``stage_push`` messages; the last stage sends ``stage_token`` to
the coordinator, which settles the step's :class:`~mesh.inference.host.AwaitedToken`) and
``chain`` (nested ``stage_forward`` calls, each stage awaiting the rest). While a pushed step
is awaited the route is probed, so a dead stage is found in seconds, not at the deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.errors import DeadlineExceeded, RPCError
from mesh.inference.compute import StageUnavailable
from mesh.inference.host import AwaitedToken, StepHost
from mesh.inference.sampling import SamplingParams
from mesh.inference.sessions import RouteSessions
from mesh.inference.stats import RunStats
from mesh.net.rpc import Reply

__all__ = ["PROBE_EVERY", "StepParams", "StepRunner"]

PROBE_EVERY = 3.0  # seconds between route probes while a step is awaited


@dataclass(frozen=True)
class StepParams:
    """What every step of one run sends the same way."""

    mode: str  # "push" or "chain"
    sampling: SamplingParams
    top: int  # return the top-k logits of every step
    prompt_len: int  # steps ending past it are decode steps
    logprobs: int | None = None  # the token's log-probability and this many alternatives


class StepRunner:
    """Runs steps on ``route`` and accounts each in ``stats``."""

    def __init__(
        self, host: StepHost, route: RouteSessions, params: StepParams, stats: RunStats
    ) -> None:
        self.host = host
        self.route = route
        self.params = params
        self.stats = stats
        self.replaying = False  # replayed steps do not count towards the decode rate

    async def forward(self, feed: list[int], pos: int, draft: int = 0) -> Reply:
        """The step feeding ``feed`` that ends at position ``pos``; ``draft`` > 0: a verify
        step (speculative decoding), its last ``draft`` tokens drafted, a token back for
        every row, and the next step may start inside it (the rejected drafts rolled back)."""
        if self.params.mode == "chain":
            return await self._forward_chain(feed, pos, draft)
        return await self._forward_push(feed, pos, draft)

    def _params(self, feed: list[int], pos: int, draft: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {
            "sid": self.route.sids[0],
            "n": len(feed),
            "pos": pos,
            "sample": self.params.sampling.to_wire(),
        }
        if draft:
            params["draft"] = draft
        if self.params.top:
            params["top"] = self.params.top
        if self.params.logprobs is not None:
            params["logprobs"] = self.params.logprobs
        return params

    async def _forward_chain(self, feed: list[int], pos: int, draft: int) -> Reply:
        """One step as nested calls: each stage awaits the rest and relays the reply."""
        body = np.asarray(feed, dtype="<i4").tobytes()
        t0 = time.perf_counter()
        reply = await self.host.mesh.call(
            self.route.stages[0].peer_id,
            "compute.stage_forward",
            self._params(feed, pos, draft),
            body,
            timeout=self.host.forward_timeout,
        )
        self._account(reply, (time.perf_counter() - t0) * 1000, pos)
        return reply

    async def _forward_push(self, feed: list[int], pos: int, draft: int) -> Reply:
        """One step: tokens go to the first stage, activations flow stage to stage, and the
        last stage sends the token straight back here (no reply travels the chain)."""
        body = np.asarray(feed, dtype="<i4").tobytes()
        stages = self.route.stages
        rid = self.route.sids[0]
        params = {"sid": rid, "rid": rid, **self._params(feed, pos, draft)}
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        route = tuple(s.peer_id for s in stages)
        waiting = self.host.waiting
        waiting[(rid, pos)] = AwaitedToken(fut, stages[-1].peer_id, route)
        t0 = time.perf_counter()
        try:
            await self.host.mesh.notify(
                stages[0].peer_id,
                "compute.stage_push",
                params,
                body,
                timeout=self.host.forward_timeout,
            )
            reply = await self._await_token(fut, pos)
        finally:
            waiting.pop((rid, pos), None)
        self._account(reply, (time.perf_counter() - t0) * 1000, pos)
        return reply

    async def _await_token(self, fut: asyncio.Future[Reply], pos: int) -> Reply:
        """The step's token. While the deadline is long (warm-up, a long prefill) the route is
        probed every PROBE_EVERY s: a dead stage is found in seconds, a slow live one (its
        event loop answers while its compute thread works) is waited for."""
        opening = self.route.opening  # sent with the opens: pulls may take long, no deadline
        if opening is not None and not opening.done():
            waits: list[asyncio.Future[Any]] = [fut, opening]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
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
        self.route.warm += 1
        decode = pos > self.params.prompt_len and not self.replaying
        self.stats.account(reply, ms, len(self.route.stages), decode)

    def _deadline(self) -> float:
        """Generous while warming up; then a multiple of the usual step, so a dead stage is
        noticed in seconds, not after the long RPC deadline."""
        timeout = self.host.forward_timeout
        if self.route.warm < 3:  # fresh sessions, loading shards, replays: no short deadline
            return timeout
        return min(timeout, max(3.0, 20 * self.stats.median_step_ms() / 1000))

    async def _probe(self) -> str | None:
        """The first stage on the route that does not answer, if any."""
        for st in self.route.stages:
            try:
                await self.host.mesh.call(st.peer_id, "compute.capacity", timeout=2.0)
            except RPCError:
                return st.peer_id
        return None
