"""The open route of one generation: a stage session per stage, all opened at once (each is
told its next stage's session id up front, and a stage pushes only once a step comes, so no
open waits for another: a route's set-up costs one round trip, and its stages pull their
shards side by side), and closed together (a dead stage has nothing left to free). The
route's first step may go out with the opens (``then``): each stage holds it until its own
session is open (:mod:`mesh.inference.early`), so the set-up's round trip overlaps it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mesh.errors import RPCError
from mesh.inference.host import SessionHost
from mesh.inference.routes import Stage

__all__ = ["RouteSessions"]

T = TypeVar("T")


async def _after(own: asyncio.Future[Any], then: Callable[[], Awaitable[T]]) -> T:
    """``then`` once this node's own open is done (its failure fails the opening anyway)."""
    await asyncio.wait([own])
    own.result()
    return await then()


class RouteSessions:
    """The route's stages and their session ids. ``max_tokens``: the prompt and the output,
    which each stage reserves KV cache for (capped at its context)."""

    def __init__(self, host: SessionHost, mid: str, max_tokens: int, audit: bool) -> None:
        self.host = host
        self.mid = mid
        self.max_tokens = max_tokens
        self.audit = audit  # stages keep their signed inputs for spot checks
        self.stages: list[Stage] = []
        self.sids: list[str] = []
        self.warm = 0  # steps since the route was (re)opened
        # the opens under way (a step sent with them waits for them before its deadline runs)
        self.opening: asyncio.Future[list[Any]] | None = None
        self.bytes_pulled = 0  # shard bytes the stages pulled to open
        self.last_opened = ""  # the first stage (in route order) whose open failed

    async def open(
        self, stages: list[Stage], then: Callable[[], Awaitable[T]] | None = None
    ) -> asyncio.Future[T] | None:
        """Open sessions on ``stages``; on any failure those already opened are closed.
        ``then``: started once the opens are sent, not awaited here (its future is returned,
        cancelled if an open fails). When the first stage is this node, ``then`` starts once
        this node's own open is done: a call to itself runs in place, and would otherwise
        run through the open's pulls; the remote opens are still under way."""
        self.stages = list(stages)
        # Independent random ids: a stage cannot derive the other stages' sessions.
        self.sids = [os.urandom(12).hex() for _ in self.stages]
        self.warm = 0
        after: asyncio.Future[T] | None = None
        try:
            calls = self._open_stages()  # tasks already: they go out first
            opens = self.opening = asyncio.gather(*calls, return_exceptions=True)
            if then is not None:
                mine = self.stages[0].peer_id == self.host.mesh.me
                after = asyncio.ensure_future(_after(calls[0], then) if mine else then())
            self._check(await opens)
        except BaseException:
            if after is not None:
                after.cancel()
                with contextlib.suppress(BaseException):
                    await after
            await self.close()  # the stages already opened must not wait for their TTL
            raise
        return after

    def _open_stages(self) -> list[asyncio.Future[Any]]:
        mesh = self.host.mesh
        return [
            asyncio.ensure_future(
                mesh.call(st.peer_id, "compute.stage_open", self._params(i), timeout=600)
            )
            for i, st in enumerate(self.stages)
        ]

    def _check(self, replies: list[Any]) -> None:
        for st, reply in zip(self.stages, replies, strict=True):
            if isinstance(reply, BaseException):
                self.last_opened = st.peer_id  # the first stage, in route order, that failed
                raise reply
            self.bytes_pulled += int(reply.result.get("pulled", 0))
        self.last_opened = self.stages[-1].peer_id if self.stages else ""

    def _params(self, i: int) -> dict[str, Any]:
        st = self.stages[i]
        nxt = self.stages[i + 1].peer_id if i + 1 < len(self.stages) else None
        return {
            "sid": self.sids[i],
            "model_id": self.mid,
            "units": list(st.units),
            "runtime": st.runtime,
            "next": nxt,
            "next_sid": self.sids[i + 1] if nxt else None,
            "prev": self.stages[i - 1].peer_id if i > 0 else None,
            "max_tokens": self.max_tokens,
            "source": self.host.mesh.me if self.host.holds_manifest(self.mid) else None,
            "audit": self.audit,
        }

    async def close(self) -> None:
        async def one(peer: str, sid: str) -> None:
            try:
                await self.host.mesh.call(peer, "compute.stage_close", {"sid": sid}, timeout=5)
            except RPCError:
                pass  # a dead stage has nothing left to free

        pairs = zip(self.stages, self.sids, strict=False)
        await asyncio.gather(*(one(st.peer_id, sid) for st, sid in pairs))
