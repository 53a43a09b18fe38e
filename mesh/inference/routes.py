"""Routes: which peers run which unit ranges of a model.

The exact planner of :mod:`scheduler` minimises per-token latency under every peer's memory
limit; when it finds nothing, a contiguous split by free memory (preferring peers that already
hold the bytes) is the fallback, and also re-plans a failed stage's range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import Error
from runtimes.shards import Manifest

__all__ = [
    "Stage",
    "PeerView",
    "RouteError",
    "plan_route",
    "plan_with_scheduler",
    "peer_view",
    "unit_memory",
    "SHARD_OVERHEAD",
    "KV_PER_BLOCK",
]

SHARD_OVERHEAD = 32 << 20  # per loaded shard, as the onnx runtime estimates it


class RouteError(Error):
    """No set of connected peers can hold and run the model (or the requested split)."""


@dataclass(frozen=True)
class Stage:
    peer_id: str
    units: tuple[int, int]
    runtime: str

    def as_dict(self, n_layers: int) -> dict[str, Any]:
        a, b = self.units
        layers = [max(a, 1) - 1, min(b, n_layers + 1) - 1]
        return {
            "peer_id": self.peer_id,
            "units": list(self.units),
            "layers": layers,
            "runtime": self.runtime,
        }


@dataclass
class PeerView:
    peer_id: str
    free: float  # bytes available for shards (inf without a limit)
    held: set[str]
    runtime: str
    rtt_ms: float = 0.0  # from the coordinator (0 for itself)
    mem_bytes_per_s: float = 10e9  # decode reads every weight once per token


PairRtt = Callable[[str, str], float | None]


def hop_rtt(a: PeerView, b: PeerView, pair_rtt: PairRtt | None) -> float:
    """The RTT (ms) planned for a hop from ``a`` to ``b``: ``pair_rtt``'s estimate where it
    has one, else the mean of their RTTs to the coordinator, which measures its own links."""
    known = pair_rtt(a.peer_id, b.peer_id) if pair_rtt is not None else None
    if known is None:
        known = (a.rtt_ms + b.rtt_ms) / 2
    # Coordinates are the peers' own claims: keep them within what the triangle through the
    # coordinator allows, so a peer cannot pose as everyone's neighbour.
    known = min(max(known, abs(a.rtt_ms - b.rtt_ms)), a.rtt_ms + b.rtt_ms)
    return max(0.2, known)


def plan_with_scheduler(
    manifest: Manifest,
    peers: list[PeerView],
    *,
    split: int | None,
    runtime: str | None,
    pair_rtt: PairRtt | None = None,
) -> list[Stage]:
    """The exact planner of :mod:`scheduler`: per-token latency (each stage's weight bytes
    over its memory bandwidth, plus the hops) under every peer's memory limit; a split only
    when one peer cannot do it faster (or when asked for exactly ``split`` stages).

    ``pair_rtt(a, b)``: the RTT between two peers in ms where known (network coordinates),
    else None; two peers on one LAN far from the coordinator are then seen as near."""
    from runtimes.shards import layer_units
    from scheduler import CostParams, MatrixNetwork, ModelSpec, Peer
    from scheduler import plan_route as exact_plan

    ub = [u.nbytes for u in manifest.units]
    n = manifest.n_layers
    blob_of = {u.index: u.blob for u in manifest.units}
    model = ModelSpec(
        layer_bytes=tuple(2 * b + KV_PER_BLOCK for b in ub[1 : n + 1]),
        layer_cost=tuple(float(b) for b in ub[1 : n + 1]),
        embed_bytes=2 * ub[0],
        head_bytes=2 * ub[n + 1],
        embed_cost=float(ub[0]) / 16,  # a row lookup, not a full read
        head_cost=float(ub[n + 1]),
        activation_bytes=4.0 * 1024,
        io_bytes=64.0,
    )
    cap = 1 << 50
    sched_peers = [
        Peer(
            v.peer_id,
            "local",
            int(min(max(v.free - SHARD_OVERHEAD, 0), cap)),
            max(v.mem_bytes_per_s, 1.0),
            frozenset(i - 1 for i in range(1, n + 1) if blob_of[i] in v.held),
            blob_of[0] in v.held,
            blob_of[n + 1] in v.held,
        )
        for v in peers
    ]
    rtt = [[0.0 if a is b else hop_rtt(a, b, pair_rtt) for b in peers] for a in peers]
    bw = [[WEBRTC_BYTES_PER_S] * len(peers) for _ in peers]
    net = MatrixNetwork.build(rtt, bw, [v.rtt_ms for v in peers], [WEBRTC_BYTES_PER_S] * len(peers))
    # A small price on bytes a stage must pull: among routes about as fast, the one whose
    # peers already hold their shards wins (a one-off pull of ~170 MB weighs ~7 ms/token).
    params = CostParams(locality_weight=1.0, intra_zone_price=PULL_PRICE_MS_PER_BYTE)
    plan = exact_plan(model, sched_peers, net, params, min_stages=split or 1, max_stages=split)
    by_id = {v.peer_id: v for v in peers}
    return [
        Stage(st.peer_id, layer_units(st.start, st.end, n), runtime or by_id[st.peer_id].runtime)
        for st in plan.stages
    ]


KV_PER_BLOCK = 8 << 20  # KV cache allowance per block unit (2048 positions of a small model)
WEBRTC_BYTES_PER_S = 12e6  # what one aiortc link moves (docs/benchmarks.md)
PULL_PRICE_MS_PER_BYTE = 2e-8  # planner tie-breaker for shard bytes a stage lacks


def unit_memory(unit_bytes: list[int], a: int, b: int) -> int:
    """Memory a stage of units [a, b) needs: the onnx runtime keeps quantized weights plus a
    prepacked copy (2x bytes), a fixed overhead, and each block's KV cache."""
    blocks = max(0, min(b, len(unit_bytes) - 1) - max(a, 1))
    return 2 * sum(unit_bytes[a:b]) + SHARD_OVERHEAD + KV_PER_BLOCK * blocks


def plan_route(
    manifest: Manifest,
    peers: list[PeerView],
    *,
    split: int | None,
    prefer: str,
    runtime: str | None = None,
    units: tuple[int, int] | None = None,
) -> list[Stage]:
    """Stages covering ``units`` (default: the whole model) on ``peers``."""
    ub = [u.nbytes for u in manifest.units]
    a0, b0 = units or (0, len(ub))
    blob_of = {u.index: u.blob for u in manifest.units}

    def held_bytes(p: PeerView, a: int, b: int) -> int:
        return sum(ub[i] for i in range(a, b) if blob_of[i] in p.held)

    def rank(p: PeerView, a: int, b: int) -> tuple[int, bool, float]:
        return (held_bytes(p, a, b), p.peer_id == prefer, p.free)

    if not peers:
        raise RouteError("no peers to run the model on")
    n = split or 1
    if n == 1:
        fits = [p for p in peers if p.free >= unit_memory(ub, a0, b0)]
        if fits:
            best = max(fits, key=lambda p: rank(p, a0, b0))
            return [Stage(best.peer_id, (a0, b0), runtime or best.runtime)]
        if split == 1:
            raise RouteError("no single peer has the memory for the whole model")
    if n > len(peers) or n > b0 - a0:
        raise RouteError(f"cannot split {b0 - a0} units over {len(peers)} peers {n} ways")
    if split is None:
        return _greedy_split(ub, peers, a0, b0, rank, runtime)
    return _even_split(ub, peers, a0, b0, n, rank, runtime)


def _greedy_split(
    ub: list[int], peers: list[PeerView], a0: int, b0: int, rank: Any, runtime: str | None
) -> list[Stage]:
    """Fewest stages: each peer in turn takes as many units as its memory holds."""
    stages: list[Stage] = []
    left = list(peers)
    a = a0
    while a < b0:
        usable = [p for p in left if p.free >= unit_memory(ub, a, a + 1)]
        if not usable:
            raise RouteError(f"no connected peer has memory for unit {a}")

        # the peer that gets furthest, preferring bytes already held
        reach = {p.peer_id: _reach(ub, a, b0, p.free) for p in usable}
        best = max(usable, key=lambda p: (reach[p.peer_id], rank(p, a, reach[p.peer_id])))
        b = reach[best.peer_id]
        stages.append(Stage(best.peer_id, (a, b), runtime or best.runtime))
        left.remove(best)
        a = b
    return stages


def _reach(ub: list[int], a: int, b0: int, free: float) -> int:
    """The end of the longest range starting at ``a`` that fits in ``free`` bytes."""
    b = a + 1
    while b < b0 and unit_memory(ub, a, b + 1) <= free:
        b += 1
    return b


def _even_split(
    ub: list[int], peers: list[PeerView], a0: int, b0: int, n: int, rank: Any, runtime: str | None
) -> list[Stage]:
    """Exactly n stages with about equal bytes each, each on a peer that can hold it."""
    total = sum(ub[a0:b0])
    cuts = [a0]
    acc = 0
    for i in range(a0, b0):
        acc += ub[i]
        if len(cuts) < n and acc >= total * len(cuts) / n and i + 1 < b0 - (n - len(cuts)) + 1:
            cuts.append(i + 1)
    while len(cuts) < n:  # tiny models: one unit each from the end
        cuts.append(cuts[-1] + 1)
    cuts.append(b0)
    stages: list[Stage] = []
    left = list(peers)
    for a, b in zip(cuts, cuts[1:], strict=False):
        fits = [p for p in left if p.free >= unit_memory(ub, a, b)]
        if not fits:
            raise RouteError(f"no peer left with memory for units [{a}, {b})")
        best = max(fits, key=lambda p: rank(p, a, b))
        stages.append(Stage(best.peer_id, (a, b), runtime or best.runtime))
        left.remove(best)
    return stages


MAX_GBPS = 10_000.0  # a self-reported bandwidth above this is a lie


def peer_view(
    pid: str, mid: str, cap: Any, models: Any, rtt: float
) -> tuple[PeerView | None, bool]:
    """A peer's capacity and models replies, type-checked (they are self-reported)."""
    if not isinstance(cap, dict):
        return None, False
    held: set[str] = set()
    knows = False
    for m in models if isinstance(models, list) else []:
        if isinstance(m, dict) and m.get("model_id") == mid:
            raw = m.get("held")
            held = {h for h in raw if isinstance(h, str)} if isinstance(raw, list) else set()
            knows = True
    limit, used = cap.get("memory_limit"), cap.get("memory_used", 0)
    used = used if type(used) is int and used >= 0 else 0
    free = float(limit - used) if type(limit) is int else float("inf")
    gbps = cap.get("gbps")
    bw = 10e9
    if isinstance(gbps, int | float) and math.isfinite(gbps) and 0 < gbps <= MAX_GBPS:
        bw = float(gbps) * 1e9
    runtime = cap.get("runtime")
    return PeerView(
        pid, free, held, runtime if isinstance(runtime, str) else "onnx", rtt, bw
    ), knows
