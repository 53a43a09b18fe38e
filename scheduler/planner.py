"""Exact route planning for layer ranges, and placement of batch tasks next to their data.

**Routes.** :func:`plan_route` minimises the objective of :mod:`scheduler.cost` over ordered,
contiguous stages covering ``[0, L)``, each peer used at most once, each stage within its
peer's memory, optionally with a bounded number of stages.

*Algorithm.* A dynamic programme over (layer boundary b, stage-count bucket, last peer p):
``F[b, p]`` is the cheapest prefix whose last stage runs on p and ends at b; ``G[a, p] =
min_{q != p} F[a, q] + hop(q, p)`` is the cheapest way to *start* a stage on p at a. With
``Y(x, p) = 1000 * cost[0:x] / speed_p + lambda * pull_price[p, 0:x]`` (prefix sums over units)
a stage costs ``Y(b, p) - Y(a, p)``, so ``F[b, p] = Y(b, p) + min_{a in [amin(p, b), b)} (G[a, p]
- Y(a, p))``; ``amin`` (the memory limit) never decreases in b, so a running suffix minimum
answers each query in O(1) per peer. ``G`` comes from the network's ``relax``, O(N + Z^2) for a
:class:`ZoneNetwork`. Total: O(L * N * w + L * (N + Z^2)) where w <= L is the widest memory
window (a few numpy passes, not Python loops over peers).

*Each peer at most once.* With arbitrary hop costs the problem contains the shortest
Hamiltonian path (one layer per peer, memory forcing L stages), so no polynomial exact method
is expected. The DP above forbids only *adjacent* repeats, which makes it a relaxation. We
solve it exactly by constraint generation: solve the relaxation; if its optimal route uses a
peer twice, add that peer to a tracked set R and re-solve with the used subset of R in the
state (2^|R| masks). A relaxation optimum that uses no peer twice is feasible, hence optimal
for the real problem. R grows by at least one peer per round; rounds are rare in practice
(counted in ``RoutePlan.rounds``). If R would exceed ``max_tracked`` the answer is the best
feasible plan seen and ``exact`` is False.

*Never slower than one peer.* Unless a split is asked for (``min_stages > 1``), a split whose
per-token latency exceeds that of the best single-peer plan (best by objective) is refused and
that single-peer plan is returned (``split_refused`` True).

*Exactness is with respect to the Network given*: ``MatrixNetwork`` (any per-pair links) and
``ZoneNetwork`` (hub and spoke) are both solved exactly; a ZoneNetwork built from coordinates
approximates the coordinate distances (see :mod:`scheduler.network`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .cost import CostParams, ModelSpec, Peer, evaluate_route, unit_prices
from .errors import PlanningError, SchedulerError
from .network import Network

__all__ = ["Stage", "RoutePlan", "plan_route", "Task", "Assignment", "plan_placement"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Stage:
    """One stage of a route: ``peer_id`` runs layers ``[start, end)``."""

    peer_id: str
    peer_index: int
    start: int
    end: int
    compute_ms: float
    pull_bytes: int


@dataclass(frozen=True)
class RoutePlan:
    """A planned route and its cost (per token; ``locality_cost`` in price units)."""

    stages: tuple[Stage, ...]
    latency_ms: float
    locality_cost: float
    objective: float
    hop_ms: tuple[float, ...]
    exact: bool
    split_refused: bool = False
    rounds: int = 1

    @property
    def peer_ids(self) -> list[str]:
        return [s.peer_id for s in self.stages]


@dataclass
class _Ctx:
    L: int
    net: Network
    Y: Array  # (L+1, N) stage prefix costs
    amin: IntArray  # (L+1, N) first feasible start per end boundary
    from_c: Array
    to_c: Array
    act: float
    K: int  # count buckets
    saturate: bool
    min_stages: int


def _next_bucket(ctx: _Ctx, k: int) -> int | None:
    if k + 1 < ctx.K:
        return k + 1
    return ctx.K - 1 if ctx.saturate else None


def _accepting(ctx: _Ctx) -> list[int]:
    if ctx.saturate:
        return [ctx.K - 1]
    return [k for k in range(ctx.K) if k + 1 >= ctx.min_stages]


def _forward_tables(ctx: _Ctx, tracked: Sequence[int] = ()) -> Array:
    """Only the F table of :func:`_tables`."""
    return _tables(ctx, list(tracked))[0]


def _tables(ctx: _Ctx, tracked: list[int]) -> tuple[Array, Array, dict[int, int], dict[int, Array]]:
    """The DP tables F and G, shape (L+1, K * 2^|tracked|, N) (see the module docstring)."""
    L, n = ctx.L, ctx.Y.shape[1]
    r = len(tracked)
    M = 1 << r
    S = ctx.K * M
    bit = {p: 1 << j for j, p in enumerate(tracked)}
    hin = {p: ctx.net.hops_into_ms(p, ctx.act) for p in tracked}
    F = np.full((L + 1, S, n), np.inf)
    G = np.full((L + 1, S, n), np.inf)
    G[0, 0, :] = ctx.from_c
    for p, bp in bit.items():
        G[0, 0, p] = np.inf
        G[0, bp, p] = ctx.from_c[p]
    suffix = np.full((L + 1, S, n), np.inf)
    cols = np.arange(n)
    for b in range(1, L + 1):
        h = G[b - 1] - ctx.Y[b - 1][None, :]
        lo = int(ctx.amin[b].min())
        if lo < b - 1:
            np.minimum(suffix[lo : b - 1], h[None], out=suffix[lo : b - 1])
        suffix[b - 1] = h
        F[b] = ctx.Y[b][None, :] + suffix[ctx.amin[b], :, cols].T
        if b == L:
            break
        fin = np.full((S, n), np.inf)
        for k in range(ctx.K):
            nk = _next_bucket(ctx, k)
            if nk is not None:
                np.minimum(
                    fin[nk * M : (nk + 1) * M],
                    F[b, k * M : (k + 1) * M],
                    out=fin[nk * M : (nk + 1) * M],
                )
        g = ctx.net.relax(fin, ctx.act)
        for p, bp in bit.items():
            g[:, p] = np.inf
            for k in range(ctx.K):
                for m in range(M):
                    if m & bp:
                        g[k * M + m, p] = np.min(fin[k * M + (m ^ bp)] + hin[p])
        G[b] = g
    return F, G, bit, hin


def _solve(ctx: _Ctx, tracked: list[int]) -> tuple[float, list[tuple[int, int, int]], Array]:
    """Relaxed DP with the peers in ``tracked`` used at most once; returns (objective, route
    as (index, start, end), G table) or (inf, [], G)."""
    F, G, bit, hin = _tables(ctx, tracked)
    L, n = ctx.L, ctx.Y.shape[1]
    M = 1 << len(tracked)
    total = F[L] + ctx.to_c[None, :]
    rows = [k * M + m for k in _accepting(ctx) for m in range(M)]
    sub = total[rows]
    if not np.isfinite(sub).any():
        return np.inf, [], G
    flat = int(np.argmin(sub))
    s, p = rows[flat // n], flat % n
    best = float(sub.flat[flat])
    route: list[tuple[int, int, int]] = []
    b = L
    while True:
        a_lo = int(ctx.amin[b, p])
        starts = np.arange(a_lo, b)
        vals = G[a_lo:b, s, p] - ctx.Y[a_lo:b, p]
        a = int(starts[int(np.argmin(vals))])
        route.append((p, a, b))
        if a == 0:
            break
        k, m = divmod(s, M)
        src_m = m ^ bit[p] if p in bit else m
        into = hin[p] if p in hin else ctx.net.hops_into_ms(p, ctx.act)
        best_v, best_s, best_q = np.inf, -1, -1
        for kk in range(ctx.K):
            if _next_bucket(ctx, kk) != k:
                continue
            row = F[a, kk * M + src_m] + into
            q = int(np.argmin(row))
            if row[q] < best_v:
                best_v, best_s, best_q = float(row[q]), kk * M + src_m, q
        if best_q < 0:  # cannot happen when G[a, s, p] is finite; guard against a loop
            raise PlanningError("internal: route reconstruction failed")
        s, p, b = best_s, best_q, a
    route.reverse()
    return best, route, G


def _make_ctx(
    mem_units: IntArray,
    cost_units: Array,
    pull_units: Array,
    free: IntArray,
    inv_ms: Array,
    locality_weight: float,
    net: Network,
    io_bytes: float,
    act: float,
    min_stages: int,
    max_stages: int | None,
) -> _Ctx:
    """Prefix tables for units in the given order (reverse them for costs-to-go)."""
    L = len(mem_units) - 2
    # Boundary x in 0..L maps to unit prefix index: 0 -> 0, 0<x<L -> x+1, L -> L+2 (the first
    # unit always joins the first stage and the last unit the last stage).
    ub = np.array([0, *range(2, L + 1), L + 2])
    mem_at = np.concatenate([[0], np.cumsum(mem_units)])[ub]
    cost_at = np.concatenate([[0.0], np.cumsum(cost_units)])[ub]
    pull_at = np.concatenate(
        [np.zeros((pull_units.shape[0], 1)), np.cumsum(pull_units, axis=1)], axis=1
    )[:, ub]
    Y = cost_at[:, None] * inv_ms[None, :] + locality_weight * pull_at.T
    thr = mem_at[:, None] - free[None, :]
    amin = np.searchsorted(mem_at, thr.ravel(), side="left").reshape(thr.shape)
    amin = np.minimum(amin, np.arange(L + 1)[:, None]).astype(np.int64)
    saturate = max_stages is None
    return _Ctx(
        L,
        net,
        Y,
        amin,
        net.from_client_ms(io_bytes),
        net.to_client_ms(io_bytes),
        act,
        min_stages if max_stages is None else max_stages,
        saturate,
        min_stages,
    )


def _sub(ctx: _Ctx, idx: IntArray) -> _Ctx:
    return _Ctx(
        ctx.L,
        ctx.net.subset(idx),
        ctx.Y[:, idx],
        ctx.amin[:, idx],
        ctx.from_c[idx],
        ctx.to_c[idx],
        ctx.act,
        ctx.K,
        ctx.saturate,
        ctx.min_stages,
    )


def _solve_simple(ctx: _Ctx, max_tracked: int) -> tuple[float, list[tuple[int, int, int]], int]:
    """Exact optimum over ctx's peers by constraint generation (tracked peers in the state);
    returns (objective, route, rounds), or (inf, [], rounds) when none exists."""
    tracked: list[int] = []
    rounds = 0
    while True:
        rounds += 1
        best, route, _ = _solve(ctx, tracked)
        used = [p for p, _, _ in route]
        repeated = sorted({p for p in used if used.count(p) > 1})
        if not repeated:
            return best, route, rounds
        if len(tracked) + len(repeated) > max_tracked:
            raise _TooManyConflicts
        log.debug("planner: round %d, peers %s repeated; tracking them", rounds, repeated)
        tracked.extend(repeated)


class _TooManyConflicts(Exception):
    pass


@dataclass(frozen=True)
class _Problem:
    """One planning problem restricted to its usable peers (``usable`` maps back)."""

    model: ModelSpec
    peers: Sequence[Peer]
    network: Network
    params: CostParams
    usable: IntArray
    all_prices: Array  # per peer (all of them) and unit
    mem_units: IntArray
    cost_units: Array
    pull_units: Array
    free: IntArray
    inv_ms: Array
    net: Network

    def ctx(self, min_stages: int, max_stages: int | None) -> _Ctx:
        return _make_ctx(
            self.mem_units,
            self.cost_units,
            self.pull_units,
            self.free,
            self.inv_ms,
            self.params.locality_weight,
            self.net,
            self.model.io_bytes,
            self.model.activation_bytes,
            min_stages,
            max_stages,
        )

    def reversed_ctx(self) -> _Ctx:
        """The problem with the units in reverse order: its tables are costs-to-go."""
        return _make_ctx(
            self.mem_units[::-1].copy(),
            self.cost_units[::-1].copy(),
            self.pull_units[:, ::-1].copy(),
            self.free,
            self.inv_ms,
            self.params.locality_weight,
            self.net.reversed(),
            self.model.io_bytes,
            self.model.activation_bytes,
            1,
            None,
        )

    def plan(
        self, route: list[tuple[int, int, int]], exact: bool, refused: bool, rounds: int
    ) -> RoutePlan:
        """The plan of a route over usable peers, evaluated on the whole network."""
        full = [(int(self.usable[p]), a, b) for p, a, b in route]
        rc = evaluate_route(
            self.model, self.peers, self.network, full, self.params, self.all_prices
        )
        stages = tuple(
            Stage(self.peers[p].id, p, a, b, c, pb)
            for (p, a, b), c, pb in zip(full, rc.compute_ms, rc.pull_bytes, strict=True)
        )
        return RoutePlan(
            stages, rc.latency_ms, rc.locality_cost, rc.objective, rc.hop_ms, exact, refused, rounds
        )


def _check_plan_args(
    peers: Sequence[Peer],
    network: Network,
    min_stages: int,
    max_stages: int | None,
    max_tracked: int,
    candidates: int,
) -> None:
    if len(peers) != network.n_peers:
        raise SchedulerError(f"{len(peers)} peers but the network has {network.n_peers}")
    if len({p.id for p in peers}) != len(peers):
        raise SchedulerError("peer ids must be unique")
    if min_stages < 1 or (max_stages is not None and max_stages < min_stages):
        raise SchedulerError("need 1 <= min_stages <= max_stages")
    if max_tracked < 0 or candidates < 1:
        raise SchedulerError("max_tracked must be >= 0 and candidates >= 1")


def _problem(
    model: ModelSpec, peers: Sequence[Peer], network: Network, params: CostParams
) -> _Problem:
    """Unit tables and the peers that can hold at least the narrowest stage any route has."""
    L = model.n_layers
    mem_units = model.unit_bytes().copy()
    mem_units[1 : L + 1] += model.layer_overhead_bytes
    free_all = np.array([p.free_memory for p in peers], dtype=np.int64)
    speed = np.array([p.speed for p in peers], dtype=np.float64)
    # The smallest stage any route must contain; peers below it are never usable.
    if L > 1:
        narrowest = int(
            min(mem_units[0] + mem_units[1], *mem_units[2:L], mem_units[L] + mem_units[L + 1])
        )
    else:
        narrowest = int(mem_units.sum())
    usable = np.nonzero((speed > 0) & (free_all >= narrowest))[0]
    if len(usable) == 0:
        raise PlanningError("no peer can compute and hold even one layer")
    all_prices = unit_prices(model, peers, params)  # holders may be storage-only peers
    return _Problem(
        model,
        peers,
        network,
        params,
        usable,
        all_prices,
        mem_units,
        model.unit_cost(),
        all_prices[usable] * model.unit_bytes()[None, :],
        free_all[usable],
        1000.0 / speed[usable],
        network.subset(usable),
    )


def plan_route(
    model: ModelSpec,
    peers: Sequence[Peer],
    network: Network,
    params: CostParams | None = None,
    *,
    min_stages: int = 1,
    max_stages: int | None = None,
    max_tracked: int = 10,
    candidates: int = 64,
    refuse_slower_split: bool = True,
) -> RoutePlan:
    """The optimal route (see the module docstring) for one client, whose links are part of
    ``network``; ``peers[i]`` is the network's peer i.

    ``min_stages``/``max_stages`` bound the number of stages (``min_stages = max_stages = N``
    asks for exactly N, as ``--split N``). ``candidates`` only tunes speed: how many peers
    (lowest lower bound first) the first exact pass over a pruned set considers. Raises
    :class:`PlanningError` when no route fits, :class:`SchedulerError` on invalid input.

    ``refuse_slower_split`` (default on) applies the single-peer rule of the module
    docstring. With a locality term it can pick a single peer that must pull the whole model
    over a split that pulls nothing; pass False to keep the pure objective optimum (the
    optimum is then never worse than any single peer *by objective*, by construction).
    """
    params = params or CostParams()
    _check_plan_args(peers, network, min_stages, max_stages, max_tracked, candidates)
    prob = _problem(model, peers, network, params)
    L = model.n_layers
    ctx = prob.ctx(min_stages, max_stages)

    # Best single-peer plan: the baseline a split must beat on latency.
    fits_alone = int(prob.mem_units.sum()) <= prob.free
    single_obj = np.where(fits_alone, ctx.from_c + ctx.Y[L] + ctx.to_c, np.inf)
    single = int(np.argmin(single_obj)) if np.isfinite(single_obj).any() else -1

    exact, rounds = True, 1
    relaxed, route, G = _solve(ctx, [])
    if not route:
        raise PlanningError("no route satisfies the memory and stage-count limits")
    used = [p for p, _, _ in route]
    if len(set(used)) < len(used):
        repaired, more = _without_repeats(prob, ctx, G, used, candidates, max_tracked)
        rounds += more
        if repaired is not None:
            route = repaired
        else:
            exact = False
            if single < 0 or min_stages > 1:
                raise PlanningError("too many conflicting peers for an exact plan")
            route = [(single, 0, L)]
        log.debug("planner: relaxed %.3f, %d rounds", relaxed, rounds)
    plan = prob.plan(route, exact, False, rounds)
    if refuse_slower_split and min_stages == 1 and len(plan.stages) > 1 and single >= 0:
        alone = prob.plan([(single, 0, L)], exact, True, rounds)
        if plan.latency_ms > alone.latency_ms:
            return alone
    return plan


def _without_repeats(
    prob: _Problem,
    ctx: _Ctx,
    G: Array,
    used: list[int],
    candidates: int,
    max_tracked: int,
) -> tuple[list[tuple[int, int, int]] | None, int]:
    """The exact route when the relaxation reused a peer, and the rounds it took.

    Every peer is bounded by the best relaxed route through it (cost to reach its stage +
    cost of its stage and all after, from the reversed problem); a peer whose bound exceeds a
    feasible route's cost is in no optimum. The route is None when more than ``max_tracked``
    peers conflict (the rounds spent until then still count).
    """
    L = prob.model.n_layers
    if not ctx.saturate or ctx.K > 1:
        _, _, G = _solve(prob.ctx(1, None), [])
    F_back = _forward_tables(prob.reversed_ctx())
    bound = np.min(G[:L, 0, :] + F_back[L - np.arange(L), 0, :], axis=0)
    order = np.argsort(bound, kind="stable")
    first = np.union1d(order[:candidates], used)
    try:
        ub, sub_route, rounds = _solve_simple(_sub(ctx, first), max_tracked)
    except _TooManyConflicts:
        return None, 0
    keep = np.nonzero(bound <= ub + 1e-9 * max(1.0, abs(ub)))[0]
    if np.isfinite(ub) and np.isin(keep, first).all():
        return [(int(first[p]), a, b) for p, a, b in sub_route], rounds
    cand = keep if np.isfinite(ub) else np.arange(len(prob.usable))
    try:
        _, sub_route, r2 = _solve_simple(_sub(ctx, cand), max_tracked)
    except _TooManyConflicts:
        return None, rounds
    if not sub_route:
        raise PlanningError("no route satisfies the memory and stage-count limits")
    return [(int(cand[p]), a, b) for p, a, b in sub_route], rounds + r2


@dataclass(frozen=True)
class Task:
    """A batch task: process data chunk ``id`` (``nbytes``, stored on ``holders``) costing
    ``cost`` compute units."""

    id: str
    nbytes: int
    holders: frozenset[str]
    cost: float = 0.0

    def __post_init__(self) -> None:
        if self.nbytes < 0 or self.cost < 0 or not self.holders:
            raise SchedulerError(f"task {self.id}: need nbytes, cost >= 0 and >= 1 holder")


@dataclass(frozen=True)
class Assignment:
    """Where a task runs; ``source_id`` is the holder it pulls from (None when local)."""

    task_id: str
    peer_id: str
    source_id: str | None
    standby: tuple[str, ...]
    finish_ms: float
    cross_zone_bytes: int


def plan_placement(
    tasks: Sequence[Task],
    peers: Sequence[Peer],
    network: Network,
    params: CostParams | None = None,
    *,
    replicas: int = 0,
) -> list[Assignment]:
    """Place each task on a capable peer (``speed > 0``) that holds its chunk, choosing the
    one that finishes first given the tasks already placed; when no holder can compute, on
    the capable peer minimising ``queue + compute + transfer from the best holder + lambda *
    bytes * price``. ``replicas`` standby peers (next best, distinct) are listed per task.
    Tasks are placed largest cost first (LPT); the result keeps the input order.
    """
    params = params or CostParams()
    if replicas < 0:
        raise SchedulerError("replicas must be >= 0")
    if len(peers) != network.n_peers:
        raise SchedulerError(f"{len(peers)} peers but the network has {network.n_peers}")
    index = {p.id: i for i, p in enumerate(peers)}
    n = len(peers)
    speed = np.array([p.speed for p in peers], dtype=np.float64)
    capable = speed > 0
    if not capable.any():
        raise PlanningError("no peer can compute")
    zones = [p.zone for p in peers]
    zone_arr = np.array(zones, dtype=object)
    load = np.zeros(n)
    out: dict[str, Assignment] = {}
    for t in sorted(tasks, key=lambda t: -t.cost):
        holders = [index[h] for h in sorted(t.holders) if h in index]
        if not holders:
            raise PlanningError(f"task {t.id}: no holder of its data is among the peers")
        with np.errstate(divide="ignore"):
            compute = np.where(capable, 1000.0 * t.cost / np.where(capable, speed, 1.0), np.inf)
        transfer = np.full(n, np.inf)
        source = np.full(n, -1, dtype=np.int64)
        for h in holders:
            move = network.hops_from_ms(h, float(t.nbytes))
            price = np.where(
                zone_arr == zone_arr[h], params.intra_zone_price, peers[h].egress_price
            )
            c = move + params.locality_weight * t.nbytes * price
            c[h] = 0.0
            better = c < transfer
            transfer[better], source[better] = c[better], h
        total = load + compute + transfer
        # Capable holders first (the task must run where its data is when it can), each
        # group ordered by its estimated finish; the rest are standby choices.
        is_local = np.zeros(n, dtype=bool)
        is_local[[h for h in holders if capable[h]]] = True
        ranked = np.lexsort((total, ~is_local))
        chosen = int(ranked[0])
        if not np.isfinite(total[chosen]):
            raise PlanningError(f"task {t.id}: no capable peer can reach its data")
        load[chosen] += compute[chosen]
        standby = tuple(
            peers[int(i)].id for i in ranked[1 : 1 + replicas] if np.isfinite(total[int(i)])
        )
        src = int(source[chosen])
        local_run = src == chosen
        cross = 0 if local_run or zones[src] == zones[chosen] else t.nbytes
        out[t.id] = Assignment(
            t.id,
            peers[chosen].id,
            None if local_run else peers[src].id,
            standby,
            float(load[chosen] + transfer[chosen]),
            cross,
        )
    return [out[t.id] for t in tasks]
