"""A synthetic mesh far larger than one machine, and the routing policies compared on it.

World (deterministic from a seed):

* **Geography**: regions (continents) scattered over a 200 x 200 ms plane, zones (networks:
  an ISP's city, a campus, a home LAN) around each region centre, peers around their zone
  centre. Ground-truth RTT is the Vivaldi form ``|pos_p - pos_q| + h_p + h_q`` with ``h`` the
  access-link latency (1-8 ms).
* **Devices**: laptops, desktops with GPUs, Jetsons and large unified-memory workstations, each
  with free memory and an effective decode speed (bytes of weights read per second), plus
  storage-only boxes that hold shards but do not compute; access up/down bandwidths.
* **Model**: a 70B-class model at 4 bits (80 layers, ~0.5 GiB each, embedding and head); its
  shards (8 layers each) sit on a few hundred peers clustered in a handful of zones per shard.
* **Churn**: in every instance each peer is offline with probability ``churn``.
* **Clients**: each instance has one client in a random zone asking for ``tokens`` tokens.

Metrics per instance, on the ground truth (not on the planner's estimate): per-token latency
(client -> stages -> client, compute + one-way hops with cut-through transfer time
``bytes / min(up, down)``) and **egress**: bytes that cross a zone boundary, i.e. shard bytes a
stage pulls from a holder in another zone (or from the hub when no holder is online; every
policy pulls from the cheapest online holder, in-zone first) plus activations and tokens that
cross zones, for the whole generation.

Policies: ``random`` (random peers until the model fits, layers proportional to memory),
``memory`` (as exo: largest free memory first, layers proportional to memory), ``latency``
(as Petals: the exact planner with no locality term) and ``ours`` (the planner with the
locality term). The planners see a :class:`ZoneNetwork` built from the peers' coordinates (an
upper bound of the true RTT) and the peers' declared bandwidths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .cost import CostParams, ModelSpec, Peer
from .errors import PlanningError, SchedulerError
from .network import ClientLink, ZoneNetwork
from .planner import plan_route

__all__ = ["SimConfig", "World", "make_world", "run_policies", "POLICIES"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
GIB = 1 << 30
MIB = 1 << 20
POLICIES = ("random", "memory", "latency", "ours", "ours+single-peer-rule")

# name, share, free memory GiB (lo, hi), decode speed GB/s (lo, hi), up MB/s, down MB/s
_DEVICES = (
    ("laptop", 0.42, (4, 12), (40, 90), (2, 12), (12, 60)),
    ("desktop-gpu", 0.25, (8, 24), (300, 900), (5, 40), (25, 120)),
    ("jetson", 0.18, (5, 28), (60, 200), (2, 12), (12, 60)),
    ("workstation", 0.05, (48, 160), (300, 700), (10, 100), (50, 120)),
    ("storage", 0.10, (0, 0), (0, 0), (5, 40), (25, 120)),
)


@dataclass(frozen=True)
class SimConfig:
    """Size and behaviour of the simulated mesh (see the module docstring)."""

    n_peers: int = 10_000
    n_regions: int = 8
    zones_per_region: int = 50
    n_layers: int = 80
    layer_bytes: int = 512 * MIB
    shard_layers: int = 8
    holders_per_shard: int = 40
    holder_zones_per_shard: int = 6
    churn: float = 0.1
    tokens: int = 256
    instances: int = 20
    egress_price_per_gib: float = 1.0
    locality_ms_per_price: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_peers < 10 or self.n_regions < 1 or self.zones_per_region < 1:
            raise SchedulerError("need >= 10 peers, >= 1 region and zone")
        if not (0 <= self.churn < 1) or self.tokens < 1 or self.instances < 1:
            raise SchedulerError("need 0 <= churn < 1, tokens >= 1, instances >= 1")
        if self.n_layers < 1 or self.shard_layers < 1 or self.holders_per_shard < 1:
            raise SchedulerError("need >= 1 layer, shard layer and holder")


@dataclass
class World:
    """Everything about the mesh that does not change between instances."""

    config: SimConfig
    model: ModelSpec
    peers: list[Peer]
    pos: Array  # (N, 2) ms
    height: Array  # access RTT share, ms
    zone: IntArray
    zone_center: Array  # (Z, 2)
    up: Array  # bytes/s
    down: Array
    device: list[str] = field(default_factory=list)


def make_world(config: SimConfig) -> World:
    """Generate the mesh (deterministic from ``config.seed``)."""
    rng = np.random.default_rng(config.seed)
    n = config.n_peers
    regions = rng.uniform(0, 200, (config.n_regions, 2))
    nz = config.n_regions * config.zones_per_region
    zone_center = np.repeat(regions, config.zones_per_region, axis=0) + rng.normal(0, 8, (nz, 2))
    # Zone sizes are skewed (a few large ISPs, many small networks).
    weights = rng.pareto(1.5, nz) + 1
    zone = rng.choice(nz, n, p=weights / weights.sum()).astype(np.int64)
    pos = zone_center[zone] + rng.normal(0, 0.5, (n, 2))
    height = rng.uniform(1, 8, n)
    shares = np.array([d[1] for d in _DEVICES])
    kind = rng.choice(len(_DEVICES), n, p=shares / shares.sum())
    L = config.n_layers
    model = ModelSpec.uniform(
        L,
        config.layer_bytes,
        float(config.layer_bytes),
        embed_bytes=config.layer_bytes,
        head_bytes=config.layer_bytes,
        head_cost=float(config.layer_bytes),
        layer_overhead_bytes=16 * MIB,
        activation_bytes=16384.0,
        io_bytes=16.0,
    )
    # Shards: each held by peers in a few zones (where someone seeded them).
    n_shards = -(-L // config.shard_layers)
    held: list[set[int]] = [set() for _ in range(n)]
    embed = np.zeros(n, dtype=bool)
    head = np.zeros(n, dtype=bool)
    for s in range(n_shards):
        zs = rng.choice(nz, config.holder_zones_per_shard, replace=False)
        pool = np.nonzero(np.isin(zone, zs))[0]
        holders = rng.choice(pool, min(len(pool), config.holders_per_shard), replace=False)
        layers = range(s * config.shard_layers, min(L, (s + 1) * config.shard_layers))
        for h in holders:
            held[h].update(layers)
            embed[h] |= s == 0
            head[h] |= s == n_shards - 1
    price = config.egress_price_per_gib / GIB
    peers, up, down, device = [], np.empty(n), np.empty(n), []
    for i in range(n):
        name, _, mem, spd, upr, dnr = _DEVICES[kind[i]]
        free = int(rng.uniform(*mem) * GIB)
        speed = float(rng.uniform(*spd) * 1e9)
        up[i] = rng.uniform(*upr) * 1e6
        down[i] = rng.uniform(*dnr) * 1e6
        device.append(name)
        peers.append(
            Peer(
                f"p{i}",
                f"z{zone[i]}",
                free,
                speed,
                frozenset(held[i]),
                bool(embed[i]),
                bool(head[i]),
                price * rng.uniform(0.5, 1.5),
            )
        )
    return World(config, model, peers, pos, height, zone, zone_center, up, down, device)


@dataclass(frozen=True)
class Instance:
    online: IntArray
    client_pos: Array
    client_zone: int
    client_height: float


def _instances(world: World) -> list[Instance]:
    rng = np.random.default_rng(world.config.seed + 1)
    out = []
    for _ in range(world.config.instances):
        online = np.nonzero(rng.uniform(size=len(world.peers)) >= world.config.churn)[0]
        z = int(rng.integers(0, len(world.zone_center)))
        cpos = world.zone_center[z] + rng.normal(0, 0.5, 2)
        out.append(Instance(online.astype(np.int64), cpos, z, float(rng.uniform(1, 8))))
    return out


Route = list[tuple[int, int, int]]  # (world peer index, start, end)


def _zone_network(world: World, inst: Instance) -> ZoneNetwork:
    idx = inst.online
    d = np.linalg.norm(world.pos[idx] - world.zone_center[world.zone[idx]], axis=1)
    zc = world.zone_center
    zrtt = np.linalg.norm(zc[:, None] - zc[None], axis=2)
    cdist = float(np.linalg.norm(inst.client_pos - zc[inst.client_zone]))
    return ZoneNetwork(
        world.zone[idx],
        world.height[idx] + d,
        world.up[idx],
        world.down[idx],
        zrtt,
        np.full(zrtt.shape, 1e9),
        ClientLink(inst.client_zone, inst.client_height + cdist, 12.5e6, 12.5e6),
    )


def _split_proportional(world: World, order: list[int]) -> Route | None:
    """Layers proportional to free memory over ``order`` (as exo does), each stage fitted to
    its peer's memory; None when they cannot hold the model."""
    model, L = world.model, world.model.n_layers
    mem = np.array([world.peers[p].free_memory for p in order], dtype=np.float64)
    target = np.floor(L * mem / mem.sum()).astype(int)
    target[: L - target.sum()] += 1
    route: Route = []
    start = 0
    for j, p in enumerate(order):
        want = int(target[j]) if j < len(order) - 1 else L - start
        end = min(L, start + max(want, 0))
        while end > start and model.stage_memory(start, end) > world.peers[p].free_memory:
            end -= 1
        if end > start:
            route.append((p, start, end))
            start = end
    return route if start == L else None


def _greedy_until_fits(world: World, candidates: list[int]) -> Route:
    need = world.model.total_memory
    chosen: list[int] = []
    total = 0
    for p in candidates:
        chosen.append(p)
        total += world.peers[p].free_memory
        if total >= 1.1 * need:
            route = _split_proportional(world, chosen)
            if route is not None:
                return route
    raise PlanningError("the online peers cannot hold the model")


def policy_random(world: World, inst: Instance, rng: np.random.Generator) -> Route:
    capable = [int(p) for p in inst.online if world.peers[p].speed > 0]
    rng.shuffle(capable)
    return _greedy_until_fits(world, capable)


def policy_memory(world: World, inst: Instance, rng: np.random.Generator) -> Route:
    capable = [int(p) for p in inst.online if world.peers[p].speed > 0]
    capable.sort(key=lambda p: -world.peers[p].free_memory)
    return _greedy_until_fits(world, capable)


def _planned(
    weight: float, refuse: bool = True
) -> Callable[[World, Instance, np.random.Generator], Route]:
    def policy(world: World, inst: Instance, rng: np.random.Generator) -> Route:
        peers = [world.peers[p] for p in inst.online]
        plan = plan_route(
            world.model,
            peers,
            _zone_network(world, inst),
            CostParams(locality_weight=weight),
            refuse_slower_split=refuse,
        )
        return [(int(inst.online[s.peer_index]), s.start, s.end) for s in plan.stages]

    return policy


def _rtt(world: World, p: int, q: int) -> float:
    return float(np.linalg.norm(world.pos[p] - world.pos[q]) + world.height[p] + world.height[q])


def evaluate(world: World, inst: Instance, route: Route) -> tuple[float, int]:
    """Ground-truth (per-token latency ms, egress bytes for the whole generation)."""
    model, L, cfg = world.model, world.model.n_layers, world.config
    online = np.zeros(len(world.peers), dtype=bool)
    online[inst.online] = True
    ubytes, ucost = model.unit_bytes(), model.unit_cost()
    latency, egress = 0.0, 0
    client_up = client_down = 12.5e6
    for p, a, b in route:
        units = list(range(a + 1, b + 1)) + ([0] if a == 0 else []) + ([L + 1] if b == L else [])
        peer = world.peers[p]
        latency += 1000.0 * float(sum(ucost[u] for u in units)) / peer.speed
        for u in units:
            if peer.holds_unit(u, L):
                continue
            holders = [h for h in _holders(world, u) if online[h]]
            local = [h for h in holders if world.zone[h] == world.zone[p]]
            if not local:  # pulled across a zone boundary (or from the hub)
                egress += int(ubytes[u])
    first, last = route[0][0], route[-1][0]
    cdist = float(np.linalg.norm(world.pos[first] - inst.client_pos))
    latency += (cdist + world.height[first] + inst.client_height) / 2 + model.io_bytes / min(
        client_up, world.down[first]
    ) * 1e3
    cdist = float(np.linalg.norm(world.pos[last] - inst.client_pos))
    latency += (cdist + world.height[last] + inst.client_height) / 2 + model.io_bytes / min(
        world.up[last], client_down
    ) * 1e3
    per_token_cross = 0.0
    per_token_cross += model.io_bytes * (world.zone[first] != inst.client_zone)
    per_token_cross += model.io_bytes * (world.zone[last] != inst.client_zone)
    for (q, _, _), (p, _, _) in zip(route, route[1:], strict=False):
        latency += (
            _rtt(world, q, p) / 2 + model.activation_bytes / min(world.up[q], world.down[p]) * 1e3
        )
        per_token_cross += model.activation_bytes * (world.zone[q] != world.zone[p])
    egress += int(per_token_cross * cfg.tokens)
    return latency, egress


def _holders(world: World, unit: int) -> list[int]:
    cache: dict[int, list[int]] = world.__dict__.setdefault("_holders_cache", {})
    if unit not in cache:
        L = world.model.n_layers
        cache[unit] = [i for i, p in enumerate(world.peers) if p.holds_unit(unit, L)]
    return cache[unit]


def run_policies(world: World) -> list[dict[str, float | int | str]]:
    """Every policy on the same instances; mean egress bytes per generation and mean
    per-token latency (ms), plus how many instances each policy could route."""
    cfg = world.config
    # Prices are per byte (egress_price_per_gib / GiB), so this weight is "ms of per-token
    # latency per price unit": 10 means pulling 1 GiB across zones weighs like 10 ms/token.
    weight = cfg.locality_ms_per_price
    policies: dict[str, Callable[[World, Instance, np.random.Generator], Route]] = {
        "random": policy_random,
        "memory": policy_memory,
        "latency": _planned(0.0),
        # The pure objective optimum: the single-peer rule would pick one big peer that pulls
        # the whole model across zones; shown separately as "ours+single-peer-rule".
        "ours": _planned(weight, refuse=False),
        "ours+single-peer-rule": _planned(weight, refuse=True),
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in policies}
    for k, inst in enumerate(_instances(world)):
        rng = np.random.default_rng(cfg.seed + 100 + k)
        for name, policy in policies.items():
            try:
                route = policy(world, inst, rng)
            except PlanningError as e:
                log.warning("instance %d: %s found no route: %s", k, name, e)
                continue
            results[name].append(evaluate(world, inst, route))
    out: list[dict[str, float | int | str]] = []
    for name, rows in results.items():
        out.append(
            {
                "policy": name,
                "egress_bytes": int(np.mean([e for _, e in rows])) if rows else 0,
                "token_latency_ms": float(np.mean([t for t, _ in rows])) if rows else float("nan"),
                "instances": len(rows),
            }
        )
    return out
