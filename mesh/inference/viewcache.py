"""Peers' views kept for the next route.

Asking every peer what it can hold costs a generation one round trip before its first
token. A route is planned instead from the views asked at most ``fresh_s`` ago of the same
set of connected peers; the coordinator asks them again in the background when a
generation ends (its pulls and loads changed what peers hold), and a route planned from
kept views that fails to open is planned again from views asked then
(:meth:`mesh.inference.failover.Failover.open`), before any peer is blamed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mesh.inference.routes import PeerView
from runtimes.shards import Manifest

__all__ = ["ViewCache", "VIEWS_FRESH_S", "MAX_MODELS"]

VIEWS_FRESH_S = 30.0  # views older than this are asked again
MAX_MODELS = 16  # models whose views are kept (the least recently used go)


@dataclass(frozen=True)
class _Entry:
    at: float
    peers: frozenset[str]  # the peers asked (those that did not answer were left out)
    views: tuple[PeerView, ...]
    manifest: Manifest


class ViewCache:
    """The remote peers' views of each model, as last asked (see the module's docstring)."""

    def __init__(
        self,
        fresh_s: float = VIEWS_FRESH_S,
        max_models: int = MAX_MODELS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fresh_s < 0 or max_models < 1:
            raise ValueError("fresh_s must be >= 0 and max_models >= 1")
        self.fresh_s = fresh_s
        self.max_models = max_models
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self, mid: str, peers: Iterable[str], views: Iterable[PeerView], manifest: Manifest
    ) -> None:
        """The views of ``mid`` that asking ``peers`` gave, now."""
        self._entries[mid] = _Entry(self._clock(), frozenset(peers), tuple(views), manifest)
        self._entries.move_to_end(mid)
        while len(self._entries) > self.max_models:
            self._entries.popitem(last=False)

    def get(self, mid: str, peers: Iterable[str]) -> tuple[list[PeerView], Manifest] | None:
        """The kept views of ``mid`` if they are fresh and of exactly ``peers``, else None."""
        entry = self._entries.get(mid)
        fresh = entry is not None and self._clock() - entry.at <= self.fresh_s
        if entry is None or not fresh or entry.peers != frozenset(peers):
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(mid)
        return list(entry.views), entry.manifest

    def drop(self, mid: str) -> None:
        self._entries.pop(mid, None)
