"""What routes were seen to do: memory bandwidth measured per peer, in place of its claim.

A peer's capacity reply claims its memory bandwidth (``gbps``), and the planner's per-token
cost of a stage is its weight bytes over that figure: a peer claiming 10 TB/s would be given
every stage of every route. After each generation the coordinator compares the route's
observed decode time (its own clock, minus the hops it measured) with what the stages'
figures predicted, and scales each stage peer's figure by the ratio: a one-stage route's
peer gets exactly its measured bandwidth; on a longer route the gap is shared by its stages
(the coordinator cannot time a stage it does not run). Planning then uses the measured
figure where one is known, and for peers not yet seen their claim capped at twice the best
figure measured.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from mesh.inference.routes import PairRtt, PeerView, Stage, hop_rtt

__all__ = ["Measured", "MAX_MEASURED", "MEASURED_TTL_S"]

MAX_MEASURED = 4096  # peers remembered (least recently measured dropped first)
MEASURED_TTL_S = 3600.0  # a peer's load changes: measure again after an hour
CLAIM_HEADROOM = 2.0  # an unmeasured claim may exceed the best measured figure this much
MIN_DECODE_STEPS = 4  # fewer one-token steps give no median worth keeping


class Measured:
    """Per-peer memory bandwidth (bytes/s) as the coordinator measured it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._bw: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (B/s, when)

    def __len__(self) -> int:
        return len(self._bw)

    def get(self, peer: str) -> float | None:
        entry = self._bw.get(peer)
        if entry is None:
            return None
        if self._clock() - entry[1] > MEASURED_TTL_S:
            del self._bw[peer]
            return None
        return entry[0]

    def apply(self, view: PeerView) -> PeerView:
        """``view`` with its measured bandwidth in place of the claimed one; a peer not yet
        measured keeps its claim, capped at twice the best figure measured (room for a
        truly faster peer to be tried, and then measured)."""
        bw = self.get(view.peer_id)
        if bw is None:
            now = self._clock()
            fresh = (b for b, t in self._bw.values() if now - t <= MEASURED_TTL_S)
            best = max(fresh, default=None)
            if best is None or view.mem_bytes_per_s <= CLAIM_HEADROOM * best:
                return view
            bw = CLAIM_HEADROOM * best
        return dataclasses.replace(view, mem_bytes_per_s=bw)

    def record(
        self,
        stages: list[Stage],
        unit_bytes: list[int],
        views: dict[str, PeerView],
        decode_ms: list[float],
        pair_rtt: PairRtt | None = None,
    ) -> None:
        """One generation's route and its one-token step times (the coordinator's clock)."""
        if len(decode_ms) < MIN_DECODE_STEPS or any(s.peer_id not in views for s in stages):
            return
        seen = [views[s.peer_id] for s in stages]
        observed = float(np.median(decode_ms))
        # The hops: coordinator -> first stage, stage to stage, last stage -> coordinator.
        hops = (seen[0].rtt_ms + seen[-1].rtt_ms) / 2
        hops += sum(hop_rtt(a, b, pair_rtt) / 2 for a, b in zip(seen, seen[1:], strict=False))
        compute = max(observed - hops, 0.05 * observed)
        work = [stage_cost(unit_bytes, *s.units) for s in stages]
        predicted = sum(
            1000 * w / max(v.mem_bytes_per_s, 1.0) for w, v in zip(work, seen, strict=True)
        )
        if predicted <= 0 or compute <= 0:
            return
        scale = predicted / compute
        now = self._clock()
        for v in seen:
            self._bw.pop(v.peer_id, None)
            self._bw[v.peer_id] = (max(v.mem_bytes_per_s * scale, 1.0), now)
        while len(self._bw) > MAX_MEASURED:
            self._bw.popitem(last=False)


def stage_cost(unit_bytes: list[int], a: int, b: int) -> float:
    """Bytes a stage of units [a, b) reads per token, as the planner counts them: every
    weight of its blocks and the head, and one row of the embedding (a lookup)."""
    cost = 0.0
    for i in range(a, b):
        cost += unit_bytes[i] / 16 if i == 0 else unit_bytes[i]
    return cost
