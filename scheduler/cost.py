"""Cost model: what a model needs, what peers offer, and what a route costs.

Units are bytes, milliseconds and "compute units" (FLOPs, or weight bytes read per token for
memory-bound decode; a peer's ``speed`` is in the same unit per second).

**Objective of a route** (one token through the pipeline)::

    J = latency_ms + locality_weight * locality_cost

    latency_ms    = hop(client -> stage 1) + sum_j compute_j + sum_j hop(stage j -> j+1)
                    + hop(stage k -> client)
    compute_j     = 1000 * cost(units of stage j) / speed(peer j)
    locality_cost = sum_j sum_{unit u in stage j not held by peer j} bytes(u) * price(u -> peer j)

Model *units* are the embedding (always in the first stage), layers ``0..L-1`` and the output
head (always in the last stage). ``price(u -> p)`` is the price per byte of pulling unit u
from its cheapest holder: ``intra_zone_price`` from a holder in p's zone, the holder's
``egress_price`` from another zone (bytes that leave the holder's network), and
``origin_price`` when no peer holds u (a download from the model hub). ``locality_weight``
turns that price into milliseconds of per-token latency, i.e. it says how many tokens the
pulled bytes are amortised over; 0 gives latency-only routing.

A stage on peer p covering layers ``[a, b)`` needs ``memory(a, b) = sum of (layer bytes +
layer_overhead_bytes) + embed_bytes if a == 0 + head_bytes if b == L <= p.free_memory``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import PlanningError, SchedulerError
from .network import Network

__all__ = ["ModelSpec", "Peer", "CostParams", "RouteCost", "unit_prices", "evaluate_route"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ModelSpec:
    """A layered model. ``layer_bytes[i]`` weight bytes and ``layer_cost[i]`` compute units
    per token of layer i; ``activation_bytes`` crosses each inter-stage hop per token and
    ``io_bytes`` each client hop (token ids in, a sampled token or logits out)."""

    layer_bytes: tuple[int, ...]
    layer_cost: tuple[float, ...]
    embed_bytes: int = 0
    head_bytes: int = 0
    embed_cost: float = 0.0
    head_cost: float = 0.0
    layer_overhead_bytes: int = 0
    activation_bytes: float = 4096.0
    io_bytes: float = 16.0

    def __post_init__(self) -> None:
        if not self.layer_bytes or len(self.layer_bytes) != len(self.layer_cost):
            raise SchedulerError("need >= 1 layer and one cost per layer")
        ints = (*self.layer_bytes, self.embed_bytes, self.head_bytes, self.layer_overhead_bytes)
        if any(not isinstance(b, int | np.integer) or b < 0 for b in ints):
            raise SchedulerError("byte counts must be non-negative integers")
        floats = (
            *self.layer_cost,
            self.embed_cost,
            self.head_cost,
            self.activation_bytes,
            self.io_bytes,
        )
        if any(not math.isfinite(c) or c < 0 for c in floats):
            raise SchedulerError("costs and message sizes must be finite and >= 0")

    @classmethod
    def uniform(
        cls, n_layers: int, bytes_per_layer: int, cost_per_layer: float, **kwargs: int | float
    ) -> ModelSpec:
        """Every layer alike; other fields as keyword arguments."""
        if n_layers < 1:
            raise SchedulerError("n_layers must be >= 1")
        return cls((bytes_per_layer,) * n_layers, (float(cost_per_layer),) * n_layers, **kwargs)  # type: ignore[arg-type]

    @property
    def n_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_memory(self) -> int:
        """Memory one peer needs to run the whole model."""
        return (
            sum(self.layer_bytes)
            + self.layer_overhead_bytes * self.n_layers
            + self.embed_bytes
            + self.head_bytes
        )

    def unit_bytes(self) -> npt.NDArray[np.int64]:
        """Bytes of units ``[embed, layer 0..L-1, head]``."""
        return np.array([self.embed_bytes, *self.layer_bytes, self.head_bytes], dtype=np.int64)

    def unit_cost(self) -> Array:
        return np.array([self.embed_cost, *self.layer_cost, self.head_cost], dtype=np.float64)

    def stage_memory(self, start: int, end: int) -> int:
        """Memory a stage covering layers ``[start, end)`` needs."""
        mem = sum(self.layer_bytes[start:end]) + self.layer_overhead_bytes * (end - start)
        mem += self.embed_bytes if start == 0 else 0
        mem += self.head_bytes if end == self.n_layers else 0
        return mem


@dataclass(frozen=True)
class Peer:
    """A compute (and storage) peer. ``speed`` is compute units per second (0: storage only,
    never given a stage); ``held_layers`` the layer indices whose bytes it already stores."""

    id: str
    zone: str
    free_memory: int
    speed: float
    held_layers: frozenset[int] = frozenset()
    holds_embed: bool = False
    holds_head: bool = False
    egress_price: float = 0.0

    def __post_init__(self) -> None:
        if not self.id:
            raise SchedulerError("peer id must be non-empty")
        if self.free_memory < 0 or not math.isfinite(self.speed) or self.speed < 0:
            raise SchedulerError(f"peer {self.id}: free_memory and speed must be >= 0")
        if not math.isfinite(self.egress_price) or self.egress_price < 0:
            raise SchedulerError(f"peer {self.id}: egress_price must be finite and >= 0")
        if any(i < 0 for i in self.held_layers):
            raise SchedulerError(f"peer {self.id}: negative layer index held")

    def holds_unit(self, unit: int, n_layers: int) -> bool:
        """Unit 0 is the embedding, 1..L the layers, L+1 the head."""
        if unit == 0:
            return self.holds_embed
        if unit == n_layers + 1:
            return self.holds_head
        return (unit - 1) in self.held_layers


@dataclass(frozen=True)
class CostParams:
    """Weights of the objective (see the module docstring)."""

    locality_weight: float = 1.0
    intra_zone_price: float = 0.0
    origin_price: float = 0.0

    def __post_init__(self) -> None:
        for name in ("locality_weight", "intra_zone_price", "origin_price"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise SchedulerError(f"{name} must be finite and >= 0")


def unit_prices(model: ModelSpec, peers: Sequence[Peer], params: CostParams) -> Array:
    """``price[p, u]``: price per byte for peer p to obtain unit u (0 when it holds it)."""
    n, nu = len(peers), model.n_layers + 2
    zones = sorted({p.zone for p in peers})
    zindex = {z: i for i, z in enumerate(zones)}
    pz = np.array([zindex[p.zone] for p in peers], dtype=np.int64)
    held = np.zeros((n, nu), dtype=bool)
    for i, p in enumerate(peers):
        held[i, 0] = p.holds_embed
        held[i, nu - 1] = p.holds_head
        layers = [j + 1 for j in p.held_layers if j < model.n_layers]
        held[i, layers] = True
    egress = np.array([p.egress_price for p in peers], dtype=np.float64)
    # Cheapest holder's egress price per (zone, unit); then per unit the best zone and the best
    # *other* zone, since a holder in the puller's own zone costs the intra-zone price instead.
    zone_egress = np.full((len(zones), nu), np.inf)
    np.minimum.at(zone_egress, pz, np.where(held, egress[:, None], np.inf))
    cols = np.arange(nu)
    z1 = np.argmin(zone_egress, axis=0)
    m1 = zone_egress[z1, cols]
    rest = zone_egress.copy()
    rest[z1, cols] = np.inf
    m2 = rest.min(axis=0)
    cross = np.where(z1[None, :] == pz[:, None], m2[None, :], m1[None, :])
    intra = np.where(np.isfinite(zone_egress[pz]), params.intra_zone_price, np.inf)
    price = np.minimum(intra, cross)
    price = np.where(np.isinf(price), params.origin_price, price)
    out: Array = np.where(held, 0.0, price)
    return out


@dataclass(frozen=True)
class RouteCost:
    """Cost breakdown of one route, as :func:`evaluate_route` computes it."""

    latency_ms: float
    locality_cost: float
    objective: float
    compute_ms: tuple[float, ...]
    hop_ms: tuple[float, ...]  # client->first, between stages..., last->client
    pull_bytes: tuple[int, ...]
    pull_cost: tuple[float, ...]


def _pull_price_reference(
    peers: Sequence[Peer], params: CostParams, p: int, unit: int, n_layers: int
) -> float:
    """Scalar, loop-based price of unit for peer p (the reference for :func:`unit_prices`)."""
    if peers[p].holds_unit(unit, n_layers):
        return 0.0
    best = math.inf
    for h in peers:
        if h.holds_unit(unit, n_layers):
            cost = params.intra_zone_price if h.zone == peers[p].zone else h.egress_price
            best = min(best, cost)
    return params.origin_price if math.isinf(best) else best


def evaluate_route(
    model: ModelSpec,
    peers: Sequence[Peer],
    network: Network,
    stages: Sequence[tuple[int, int, int]],
    params: CostParams | None = None,
    prices: Array | None = None,
) -> RouteCost:
    """Cost of a route given as ``(peer index, start, end)`` per stage, computed directly
    (loops, no prefix sums), so it serves as the reference the planner is tested against.

    Raises :class:`PlanningError` when the route is invalid: not contiguous from 0 to L,
    a peer used twice, a stage over its peer's memory, or a storage-only peer. ``prices``
    (from :func:`unit_prices`, for all peers) skips the per-holder loops on large meshes.
    """
    params = params or CostParams()
    L = model.n_layers
    if not stages:
        raise PlanningError("empty route")
    pos = 0
    seen: set[int] = set()
    for p, a, b in stages:
        if a != pos or b <= a:
            raise PlanningError(f"stages must be contiguous and non-empty (got [{a}, {b}))")
        if p in seen:
            raise PlanningError(f"peer {peers[p].id} used twice")
        seen.add(p)
        if peers[p].speed <= 0:
            raise PlanningError(f"peer {peers[p].id} cannot compute")
        if model.stage_memory(a, b) > peers[p].free_memory:
            raise PlanningError(f"stage [{a}, {b}) does not fit peer {peers[p].id}")
        pos = b
    if pos != L:
        raise PlanningError("stages must cover all layers")
    ubytes, ucost = model.unit_bytes(), model.unit_cost()
    compute, pbytes, pcost = [], [], []
    for p, a, b in stages:
        units = list(range(a + 1, b + 1)) + ([0] if a == 0 else []) + ([L + 1] if b == L else [])
        compute.append(1000.0 * sum(float(ucost[u]) for u in units) / peers[p].speed)
        missing = [u for u in units if not peers[p].holds_unit(u, L)]
        pbytes.append(int(sum(int(ubytes[u]) for u in missing)))
        if prices is not None:
            pcost.append(sum(int(ubytes[u]) * float(prices[p, u]) for u in missing))
        else:
            pcost.append(
                sum(int(ubytes[u]) * _pull_price_reference(peers, params, p, u, L) for u in missing)
            )
    hops = [float(network.from_client_ms(model.io_bytes)[stages[0][0]])]
    for (q, _, _), (p, _, _) in zip(stages, stages[1:], strict=False):
        hops.append(network.hop_ms(q, p, model.activation_bytes))
    hops.append(float(network.to_client_ms(model.io_bytes)[stages[-1][0]]))
    latency = sum(compute) + sum(hops)
    locality = float(sum(pcost))
    return RouteCost(
        latency,
        locality,
        latency + params.locality_weight * locality,
        tuple(compute),
        tuple(hops),
        tuple(pbytes),
        tuple(pcost),
    )
