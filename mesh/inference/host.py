"""What a generation run needs from the node's coordinator, as protocols, one per concern.

The coordinator (:class:`~mesh.inference.coordinator.Coordinator`) satisfies all of them;
each part of a run takes only the one it uses, so a test can drive a part with a small fake.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from mesh.inference.routes import PairRtt, PeerView, Stage
    from mesh.net.callers import MeshCaller
    from mesh.net.rpc import Reply
    from runtimes.shards import Manifest

__all__ = [
    "AwaitedToken",
    "Calls",
    "Views",
    "PlanHost",
    "SessionHost",
    "StepHost",
    "CheckHost",
    "RunHost",
]


@dataclass
class AwaitedToken:
    """A step awaiting its token; the coordinator's ``stage_token`` / ``stage_failed``
    handlers settle it."""

    future: asyncio.Future[Reply]
    last: str  # only the last stage may deliver the token
    route: tuple[str, ...]  # the stages in order: one may report only its own next hop


class Calls(Protocol):
    @property
    def mesh(self) -> MeshCaller: ...


class Views(Calls, Protocol):
    async def views(self, mid: str, exclude: set[str]) -> tuple[list[PeerView], Manifest]:
        """What every reachable peer not in ``exclude`` can hold, and the model's manifest."""
        ...


class PlanHost(Views, Protocol):
    """Route planning: who can hold what, how far apart peers are, and what routes did."""

    @property
    def pair_rtt(self) -> PairRtt | None: ...

    def observe(
        self,
        stages: list[Stage],
        unit_bytes: list[int],
        views: dict[str, PeerView],
        decode_ms: list[float],
    ) -> None:
        """A finished generation's route and step times: later plans use what it showed."""
        ...


class SessionHost(Calls, Protocol):
    """Opening a route's sessions: stages pull the manifest from us when we hold it."""

    def holds_manifest(self, mid: str) -> bool: ...


class StepHost(Calls, Protocol):
    """Steps: the RPC deadline, and where awaited tokens are registered for delivery."""

    @property
    def forward_timeout(self) -> float: ...

    @property
    def waiting(self) -> dict[tuple[str, int], AwaitedToken]:
        """Steps awaiting their token from the last stage, by (request id, position)."""
        ...


class CheckHost(Views, SessionHost, Protocol):
    """Spot checks: verifiers are found like stages and open sessions like them."""

    def object_path(self, oid: str) -> Path | None:
        """This node's data file of store object ``oid`` (to check a holder's proof)."""
        ...

    def is_stranger(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is a stranger of an open mesh (no member certificate)."""
        ...

    @property
    def stranger_checks(self) -> float:
        """The least spot-check rate for stages that strangers run (0: a private mesh)."""
        ...


class RunHost(PlanHost, CheckHost, StepHost, Protocol):
    """Everything one generation run needs from the node's coordinator, and nothing more."""

    async def resolve(self, model: str) -> str: ...

    async def route_views(self, mid: str) -> tuple[list[PeerView], Manifest, bool]:
        """The views a new route is planned from, and whether they were kept ones."""
        ...

    def refresh_views(self, mid: str) -> None:
        """Ask the peers' views again in the background: a generation ended."""

    def using_model(self, mid: str) -> AbstractContextManager[None]:
        """Keep ``mid``'s manifest here while the run lasts (stages, failovers and spot
        checks fetch it from us; peers' manifests are otherwise a bounded cache)."""
        ...

    async def tokenizer(self, mid: str) -> Any | None:
        """This node's tokenizer of ``mid`` (it holds an end blob), or None."""
        ...
