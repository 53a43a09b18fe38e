"""Failover: a step whose route broke is re-routed and replayed, so the generation goes on
with exactly the tokens of a fault-free run.

The run keeps its token history as the chunks it fed (prompt chunks, then one token per
step). When a stage dies or misses its deadline, its units are re-planned on another peer
(which pulls the shard if needed), the route is reopened and the history replayed in the
same chunks as the original run: the same computations give the same caches, so the
continuation is the fault-free one. A peer short of memory while a route opens is replaced
the same way, and a spot check's verdict restarts the generation on a route without the
peers it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

from mesh.errors import RemoteError, RPCError
from mesh.inference.compute import CapacityError, StageUnavailable
from mesh.inference.planning import MAX_FAILOVERS, RoutePlanner, culprit, stage_of
from mesh.inference.routes import RouteError, Stage
from mesh.inference.sessions import RouteSessions
from mesh.inference.steps import StepRunner
from mesh.inference.verify import VerificationFailed
from mesh.net.rpc import Reply

__all__ = ["Failover"]

log = logging.getLogger(__name__)


class Failover:
    """Steps that survive their route: ``step`` re-routes and replays on a stage's fault."""

    def __init__(self, planner: RoutePlanner, route: RouteSessions, steps: StepRunner) -> None:
        self.planner = planner
        self.route = route
        self.steps = steps
        # chunks fed so far, each with the token it gave (None: a prompt chunk before the
        # last) and, for a verify step, how many of its positions were kept (its tokens)
        self.fed: list[tuple[list[int], int | None, int | None]] = []
        # the route's first step, sent with its opens: (its end position, its reply to be)
        self._sent: tuple[int, asyncio.Future[Reply]] | None = None

    @property
    def tokens_out(self) -> int:
        """Tokens the generation has produced so far (what a re-route happened after)."""
        return sum(keep or 1 for _, token, keep in self.fed if token is not None)

    def fed_chunk(self, chunk: list[int], token: int | None, keep: int | None = None) -> None:
        """``keep``: a verify step's chunk (its last token + drafts), of which the first
        ``keep`` positions stayed; ``token`` is then the last token it gave."""
        self.fed.append((chunk, token, keep))

    def forget(self) -> None:
        """A generation starting over (after a spot check) has no history to replay."""
        self.fed = []

    async def open(self, stages: list[Stage], first: tuple[list[int], int] | None = None) -> None:
        """Open the route's sessions; a peer short of memory is replaced (re-planned).
        ``first``: the route's first step (feed, end position), sent with the opens; ``step``
        then takes its reply. The first token pays no round trip for the opens."""
        self.drop_sent()
        then: Callable[[], Awaitable[Reply]] | None = None
        if first is not None:
            then = functools.partial(self.steps.forward, first[0], first[1])
        for _ in range(MAX_FAILOVERS + 1):
            try:
                sent = await self.route.open(stages, then)
                if first is not None and sent is not None:
                    self._sent = (first[1], sent)
                return
            except (RPCError, CapacityError) as exc:
                if self.planner.from_kept:  # the views may be out of date: no peer is blamed
                    log.info("a route from kept views did not open (%s): asking again", exc)
                    self.planner.from_kept = False
                    stages = await self.planner.replan()
                    continue
                short_of_memory = isinstance(exc, CapacityError) or (
                    isinstance(exc, RemoteError) and exc.code == "CapacityError"
                )
                if not short_of_memory:
                    raise
                short = self.route.last_opened
                log.warning("%s lacked memory (%s): re-planning", short[:12], exc)
                self.planner.excluded.add(short)
                stages = await self.planner.replan()
        raise RouteError("no route whose peers have the memory for their stages")

    async def step(self, feed: list[int], pos: int, draft: int = 0) -> Reply:
        """The step's reply; a stage's fault (also during a re-route or its replay) is
        re-routed around, at most MAX_FAILOVERS times for this step."""
        failovers = 0
        sent, self._sent = self._sent, None
        if sent is not None and (sent[0] != pos or draft):
            sent[1].cancel()  # not this step's (a run never asks so)
            sent = None
        while True:
            try:
                if sent is not None:
                    reply, sent = sent[1], None
                    return await reply
                return await self.steps.forward(feed, pos, draft)
            except (RPCError, StageUnavailable) as exc:
                failure: RPCError | StageUnavailable = exc
            while True:  # until the route is reopened and replayed
                failed = culprit(failure, self.route.stages)
                if failed is None:
                    raise failure
                if failovers == MAX_FAILOVERS:
                    raise RouteError(
                        f"step at position {pos} failed after {MAX_FAILOVERS} failovers: {failure}"
                    ) from failure
                failovers += 1
                try:
                    await self.reroute(failed, str(failure))
                    break
                except (RPCError, StageUnavailable) as again:
                    failure = again

    def drop_sent(self) -> None:
        """A first step sent with the opens and never taken (the run ended before it)."""
        if self._sent is not None:
            self._sent[1].cancel()
            self._sent[1].add_done_callback(_retrieved)
            self._sent = None

    async def reroute(self, failed: str, why: str) -> None:
        """Move ``failed``'s units to another peer and replay the history on the new route."""
        log.warning("stage %s failed (%s): re-routing", failed[:12], why)
        index = stage_of(self.route.stages, failed)
        self.planner.excluded.add(failed)
        await self.route.close()  # before planning: the stages' memory shows free again
        stages = await self.planner.replace(self.route.stages, index, why, self.tokens_out)
        await self.open(stages)
        await self.replay()

    async def replay(self) -> None:
        """Every chunk fed before the one that failed (which ``step`` then sends again), in
        the original chunks: the same computations give the same caches. A verify step is
        replayed whole, drafts included, and the next step rolls it back as the original
        run did: the kept positions' caches are those the drafts' chunk computed."""
        self.steps.replaying = True
        try:
            start = 0
            for chunk, token, keep in list(self.fed):
                end = start + len(chunk)
                draft = len(chunk) - 1 if keep is not None else 0
                reply = await self.steps.forward(chunk, end, draft)
                tokens = reply.result.get("tokens")
                got = reply.result.get("token")
                if keep is not None:
                    ok = isinstance(tokens, list) and len(tokens) >= keep
                    got = tokens[keep - 1] if ok and isinstance(tokens, list) else None
                if token is not None and got != token:
                    log.warning("replay step at %d gave token %s, the original %s", end, got, token)
                start += len(chunk) if keep is None else keep
        finally:
            self.steps.replaying = False

    async def restart(self, exc: VerificationFailed) -> None:
        """Start over on a route without the peer a spot check named (and its accusers, in
        a dispute): tokens since it joined may be wrong."""
        log.warning("restarting the generation without %s: %s", exc.peer[:12], exc.reason)
        self.planner.excluded.update((exc.peer, *exc.accusers))
        await self.route.close()
        # the requested split may have needed the banned peer: then any route will do
        stages = await self.planner.replan(relax=True)
        replacement = [s.peer_id for s in stages]
        why = f"spot check: {exc.reason}"
        self.planner.record(exc.peer, [], replacement, self.tokens_out, why)
        await self.open(stages)


def _retrieved(fut: asyncio.Future[Reply]) -> None:
    """Its outcome is not wanted: read, so asyncio does not log it as never retrieved."""
    with contextlib.suppress(BaseException):
        fut.result()
