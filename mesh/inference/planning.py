"""Where one generation's stages go, and the failover policy: which peers this run has
excluded, who is to blame for a failed step, and which peer takes over a failed stage's units.

The exact planner (:func:`~mesh.inference.routes.plan_with_scheduler`) places the first
route; a contiguous split by memory is its fallback and re-plans a single failed stage's range
on the peers left (so the rest of the route, and its caches, stay as they are). When no peer
off the route can take that range (a mesh of two), the whole route is planned again over the
peers left, the requested split given up if it must be.
"""

from __future__ import annotations

import logging
from typing import Any

from mesh.errors import EXPECTED, PeerUnavailable, RemoteError, RPCError
from mesh.inference.compute import StageUnavailable
from mesh.inference.host import PlanHost
from mesh.inference.routes import PeerView, RouteError, Stage, plan_route, plan_with_scheduler
from runtimes.shards import Manifest

__all__ = ["MAX_FAILOVERS", "RoutePlanner", "culprit", "stage_of"]

log = logging.getLogger(__name__)
# Re-routes one step may take (a fault during a re-route or its replay counts too), capacity
# re-plans while opening one route, and spot-check restarts of one generation.
MAX_FAILOVERS = 3


def culprit(exc: RPCError | StageUnavailable, stages: list[Stage]) -> str | None:
    """The peer a failed step blames, or None when no stage is known dead (then the step's
    error is the run's: re-routing would not help)."""
    if isinstance(exc, StageUnavailable):  # raised here: the first stage is this node
        return str(exc).strip()
    if isinstance(exc, RemoteError):
        if exc.code == "StageUnavailable":
            return exc.message.strip()
        return None  # the stage answered: a bug or bad input, not a dead peer
    if isinstance(exc, PeerUnavailable):  # the first stage could not even be reached
        return stages[0].peer_id
    return None


def stage_of(stages: list[Stage], peer: str) -> int:
    """The index of ``peer``'s stage on the route."""
    index = next((i for i, s in enumerate(stages) if s.peer_id == peer), None)
    if index is None:
        raise RouteError(f"failed peer {peer[:12]} is not on the route")
    return index


class RoutePlanner:
    """Plans the stages of one run, and remembers whom the run left out and why."""

    def __init__(
        self,
        host: PlanHost,
        mid: str,
        manifest: Manifest,
        *,
        split: int | None,
        runtime: str | None,
    ) -> None:
        self.host = host
        self.mid = mid
        self.manifest = manifest
        self.split = split
        self.runtime = runtime
        self.excluded: set[str] = set()  # never planned again in this run
        self.reroutes: list[dict[str, Any]] = []  # what the summary reports
        self.seen: dict[str, PeerView] = {}  # each peer's latest view (what planning used)
        # the route was planned from views kept from an earlier one (mesh.inference.viewcache)
        self.from_kept = False

    async def views(self) -> list[PeerView]:
        views, _ = await self.host.views(self.mid, self.excluded)
        self.seen.update((v.peer_id, v) for v in views)
        return views

    def plan(self, views: list[PeerView], relax: bool = False) -> list[Stage]:
        """``relax``: ignore the requested split (after a ban there may be too few peers)."""
        split = None if relax else self.split
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
                runtime=self.runtime,
                pair_rtt=self.host.pair_rtt,
            )
        except EXPECTED as exc:  # the scheduler's errors share the root
            log.info("exact planner found no route (%s); splitting by memory", exc)
            return plan_route(
                self.manifest, views, split=split, prefer=self.host.mesh.me, runtime=self.runtime
            )

    async def replan(self, relax: bool = False) -> list[Stage]:
        """A whole new route over the peers not excluded; ``relax``: if the requested split
        is no longer possible, any route will do."""
        views = await self.views()
        return self._plan_relaxing(views) if relax else self.plan(views)

    async def replace(
        self, stages: list[Stage], index: int, why: str, after_tokens: int
    ) -> list[Stage]:
        """The route with stage ``index`` re-planned on peers off the route; the other
        stages keep their places. Its peer must be excluded (and the route's sessions closed,
        so the peers report their memory free) before."""
        failed = stages[index].peer_id
        views = await self.views()
        on_route = {s.peer_id for i, s in enumerate(stages) if i != index}
        spare = [v for v in views if v.peer_id not in on_route]
        old = stages[index]
        try:
            replacement = plan_route(
                self.manifest,
                spare,
                split=None,
                prefer=self.host.mesh.me,
                runtime=old.runtime,
                units=old.units,
            )
        except RouteError as exc:
            # No peer off the route can take these units (a mesh of two, or spares short of
            # memory): the whole route is planned again over the peers left, the requested
            # split given up if it must be. The replay feeds every stage from the start
            # anyway, so stages that move lose nothing a replacement would have kept.
            log.info("no spare peer for units %s (%s): planning the route again", old.units, exc)
            route = self._plan_relaxing(views)
            self.record(failed, list(old.units), [s.peer_id for s in route], after_tokens, why)
            return route
        self.record(failed, list(old.units), [s.peer_id for s in replacement], after_tokens, why)
        return stages[:index] + replacement + stages[index + 1 :]

    def _plan_relaxing(self, views: list[PeerView]) -> list[Stage]:
        """The requested split if the peers allow it, else any route."""
        try:
            return self.plan(views)
        except RouteError:
            return self.plan(views, relax=True)

    def record(
        self, failed: str, units: list[int], replacement: list[str], after_tokens: int, why: str
    ) -> None:
        self.reroutes.append(
            {
                "failed": failed,
                "units": units,
                "replacement": replacement,
                "after_tokens": after_tokens,
                "reason": why[:200],
            }
        )
