"""The coordinator service of a node: it resolves model names across the mesh, gathers what
each reachable peer can hold (its views), starts generations (:mod:`mesh.inference.run`) and
receives the tokens that last stages push back (``stage_token``) and their failure reports
(``stage_failed``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.errors import EXPECTED, RemoteError, RPCError
from mesh.inference.compute import StageUnavailable, models_of
from mesh.inference.host import AwaitedToken
from mesh.inference.measured import Measured
from mesh.inference.prompts import MAX_PIECE_BYTES
from mesh.inference.routes import PairRtt, PeerView, RouteError, Stage, peer_view
from mesh.inference.run import GenerationRequest, GenerationRun
from mesh.inference.sampling import MAX_DRAFT
from mesh.inference.speculate import MAX_ROW_RECORDS, ROW_RECORD
from mesh.inference.viewcache import ViewCache
from mesh.net.callers import MeshCaller as Mesh
from mesh.net.rpc import CallContext, Reply
from runtimes.errors import ModelError
from runtimes.shards import Manifest

__all__ = ["Coordinator", "UnknownModel"]

log = logging.getLogger(__name__)

STRANGER_CHECKS = 0.25  # strangers' stage steps recomputed: a liar lasts 4 steps on average
MAX_SHOWN = 16  # running generations listed in the status


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int and 0 < value <= 1 << 24 else None


class UnknownModel(ModelError):
    """No peer (and not this node) knows a model by that name or id."""


class Coordinator:
    """Runs generations. Also a service: the last stage delivers each step's token here."""

    name = "coordinator"  # RPC namespace: peers call "coordinator.<method>"

    def status(self) -> dict[str, Any]:
        running = [g for run in list(self.running.values()) if (g := run.progress())]
        return {
            "steps_awaited": len(self.waiting),
            "peers_measured": len(self.measured),
            "views_kept": {"hits": self.kept.hits, "misses": self.kept.misses},
            "generations": running[:MAX_SHOWN],  # running now, each with its route
            "recent": list(self.recent),  # finished: model, tokens, decode rate
        }

    def __init__(
        self,
        mesh: Mesh,
        compute: Any,
        forward_timeout: float = 45.0,
        pair_rtt: PairRtt | None = None,
        stranger: Callable[[str], bool] | None = None,
    ) -> None:
        self.mesh = mesh
        # An open mesh's test of strangers: their stages are spot-checked by default.
        self._stranger = stranger
        self.compute = compute
        self.forward_timeout = forward_timeout
        self.pair_rtt = pair_rtt  # RTT between two peers where known (network coordinates)
        self.waiting: dict[tuple[str, int], AwaitedToken] = {}
        self.measured = Measured()  # peers' bandwidth as routes showed it, over their claims
        self.running: dict[int, GenerationRun] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=MAX_SHOWN)
        self.kept = ViewCache()  # peers' views for the next route (a round trip less)
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def rpc_stage_token(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> None:
        w = self._waiter(params)
        if w is None or ctx.peer_id != w.last:
            log.info("ignored a token from %s for no step of ours", ctx.peer_id[:12])
            return
        token = params.get("token")
        if not w.future.done() and type(token) is int and 0 <= token < 1 << 31:
            # Only a token's worth of text is kept (the run detokenizes it itself anyway),
            # a verify step's: one per row with its logits' records, if asked
            # (speculate.verified_tokens checks the rest).
            rows = len(params["tokens"]) if isinstance(params.get("tokens"), list) else 1
            per_row = MAX_PIECE_BYTES + 1
            if rows > 1:
                per_row += MAX_ROW_RECORDS * ROW_RECORD.itemsize
            cap = per_row * min(rows, MAX_DRAFT + 1)
            w.future.set_result(Reply(params, payload[:cap]))

    async def rpc_stage_failed(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> None:
        """A stage's report that its step failed. It may name only its own next hop as the
        peer it could not reach: a stage naming any other (off the route, or a stage before
        it) would get an honest peer left out. Such a report is the reporter's own error."""
        w = self._waiter(params)
        if w is None or ctx.peer_id not in w.route or w.future.done():
            return
        failed, error = params.get("failed"), str(params.get("error", "stage failed"))
        at = w.route.index(ctx.peer_id)
        next_hop = w.route[at + 1] if at + 1 < len(w.route) else None
        if failed is not None and failed == next_hop:
            w.future.set_exception(StageUnavailable(failed))
            return
        if failed is not None:
            log.warning("%s blamed %s, not its next hop", ctx.peer_id[:12], str(failed)[:12])
        w.future.set_exception(RemoteError("StageError", f"{ctx.peer_id[:12]}: {error}"[:400]))

    def _waiter(self, params: dict[str, Any]) -> AwaitedToken | None:
        rid, pos = params.get("rid"), params.get("pos")
        if not isinstance(rid, str) or type(pos) is not int:
            return None
        return self.waiting.get((rid, pos))

    async def tokenizer(self, mid: str) -> Any | None:
        if mid not in self.compute.manifests:
            return None
        try:
            return await self.compute.tokenizers.get(mid)
        except ModelError as exc:  # no end blob here, or no llama.cpp
            log.debug("no local tokenizer for %s: %s", mid[:12], exc)
            return None

    def observe(
        self,
        stages: list[Stage],
        unit_bytes: list[int],
        views: dict[str, PeerView],
        decode_ms: list[float],
    ) -> None:
        self.measured.record(stages, unit_bytes, views, decode_ms, self.pair_rtt)

    def is_stranger(self, peer_id: str) -> bool:
        return self._stranger is not None and peer_id != self.mesh.me and self._stranger(peer_id)

    @property
    def stranger_checks(self) -> float:
        return STRANGER_CHECKS if self._stranger is not None else 0.0

    def object_path(self, oid: str) -> Path | None:
        path: Path | None = self.compute.objects.store.data_path(oid)
        return path

    def holds_manifest(self, mid: str) -> bool:
        return mid in self.compute.manifests

    def using_model(self, mid: str) -> AbstractContextManager[None]:
        using: AbstractContextManager[None] = self.compute.using(mid)
        return using

    async def views(self, mid: str, exclude: set[str]) -> tuple[list[PeerView], Manifest]:
        """What every reachable peer (and this node) can hold, and the model's manifest."""
        views: list[PeerView] = []
        manifest: Manifest | None = self.compute.manifests.get(mid)
        source = None
        me = self.mesh.me
        asked = [p for p in [me, *self.mesh.connected_peer_ids()] if p not in exclude]
        remote: list[PeerView] = []  # as the peers claim (kept: measurements change)
        for pid, view, knows in await asyncio.gather(*(self._ask(p, mid) for p in asked)):
            if view is not None:
                views.append(self.measured.apply(view))
                if pid != me:
                    remote.append(view)
                if knows and source is None:
                    source = pid
        if manifest is None:
            if source is None:
                raise RouteError(f"no reachable peer knows model {mid[:12]}")
            manifest = await self.compute._manifest(mid, source)
        if not exclude:  # every peer's: what the next route may be planned from
            self.kept.put(mid, [p for p in asked if p != me], remote, manifest)
        return views, manifest

    async def route_views(self, mid: str) -> tuple[list[PeerView], Manifest, bool]:
        """The views a new route is planned from: the remote peers' as kept (fresh, of the
        same connected peers) with this node's own asked now, or all asked now. Third:
        whether kept ones were used (see :mod:`mesh.inference.viewcache`)."""
        kept = self.kept.get(mid, self.mesh.connected_peer_ids())
        if kept is None:
            return *await self.views(mid, set()), False
        remote, manifest = kept
        pid, mine, _ = await self._ask(self.mesh.me, mid)
        views = [self.measured.apply(mine)] if mine is not None else []
        views += [self.measured.apply(replace(v, rtt_ms=self._rtt(v.peer_id))) for v in remote]
        return views, manifest, True

    def refresh_views(self, mid: str) -> None:
        """Ask the peers' views of ``mid`` again, in the background (a generation ended)."""
        if mid in self._refreshing:
            return

        async def refresh() -> None:
            try:
                await self.views(mid, set())
            except Exception as exc:  # the next route asks again itself
                self.kept.drop(mid)
                log.info("views of %s not refreshed: %s", mid[:12], exc)
            finally:
                self._refreshing.pop(mid, None)

        self._refreshing[mid] = asyncio.get_running_loop().create_task(refresh())

    async def stop(self) -> None:
        """Cancel the background refreshes (a node stopping: its links are about to go)."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, pid: str, mid: str) -> tuple[str, PeerView | None, bool]:
        """``pid``'s view of ``mid`` (None: left out of the route), and whether it knows it."""
        try:
            # side by side: a route's first token waits for the slowest peer's answers
            cap_reply, models_reply = await asyncio.gather(
                self.mesh.call(pid, "compute.capacity", timeout=5),
                self.mesh.call(pid, "compute.models", timeout=5),
            )
            models = models_of(models_reply)
            return pid, *peer_view(pid, mid, cap_reply.result, models, self._rtt(pid))
        except RPCError as exc:
            log.info("peer %s left out of the route: %s", pid[:12], exc)
        except Exception as exc:  # a peer's malformed answer must not stop the route
            log.warning("peer %s sent a malformed capacity/models reply: %r", pid[:12], exc)
        return pid, None, False

    def _rtt(self, pid: str) -> float:
        if pid == self.mesh.me:
            return 0.0
        link_of = getattr(self.mesh, "link", None)
        try:
            rtt = link_of(pid).rtt_ms if link_of is not None else None
        except EXPECTED:
            rtt = None
        return float(rtt) if rtt is not None else 1.0

    async def resolve(self, model: str) -> str:
        """A model id from a name or id: ours first; else the one id the peers give for it.
        Names are self-reported: when peers claim one name for different models, the name
        is refused as ambiguous (a peer must not hijack a popular name)."""
        try:
            return str(self.compute.resolve(model))
        except ModelError:
            pass

        async def ask(pid: str) -> set[str]:
            try:
                models = models_of(await self.mesh.call(pid, "compute.models", timeout=5))
            except RPCError:
                return set()
            return {
                m["model_id"]
                for m in models
                if isinstance(m.get("model_id"), str) and model in (m.get("name"), m["model_id"])
            }

        found = set().union(*await asyncio.gather(*map(ask, self.mesh.connected_peer_ids())))
        if model in found:  # asked by id: ids are hashes of the manifest, nothing to hijack
            return model
        if len(found) > 1:
            ids = ", ".join(sorted(f[:12] for f in found))
            raise ModelError(
                f"peers give the name {model!r} to different models ({ids}): ask by id"
            )
        if found:
            return found.pop()
        raise UnknownModel(f"no peer knows a model named {model!r}")

    async def list_models(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for pid in [self.mesh.me] + self.mesh.connected_peer_ids():
            try:
                models = models_of(await self.mesh.call(pid, "compute.models", timeout=5))
            except RPCError:
                continue
            for m in models:
                if isinstance(m, dict) and isinstance(m.get("model_id"), str):
                    entry = seen.setdefault(
                        m["model_id"],
                        {
                            "model_id": m["model_id"],
                            "name": m.get("name"),
                            "arch": m.get("arch"),
                            "n_layers": m.get("n_layers"),
                            "context_length": _int_or_none(m.get("context_length")),
                            "chat_template": m.get("chat_template") is True,
                            "holders": [],
                        },
                    )
                    if m.get("held"):
                        entry["holders"].append(pid)
        return list(seen.values())

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Yields ``{"route"}`` first, ``{"token", "text"}`` per token, then one
        ``{"done": True, ...}`` summary (route, timings, re-routes)."""
        run = GenerationRun(self, req)
        self.running[id(run)] = run
        try:
            # aclosing: a client that leaves frees every stage now, not when the GC gets to it
            async with contextlib.aclosing(run.run()) as events:
                async for event in events:
                    yield event
        finally:
            del self.running[id(run)]
            done = run.progress()
            if done is not None:
                done["ended"] = round(time.time(), 3)
                self.recent.append(
                    {k: v for k, v in done.items() if k not in ("stages", "rate_history")}
                )
