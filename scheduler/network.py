"""Link models: how long one message takes from peer to peer, and to/from the client.

A *hop* is one-way: ``hop(q, p, n) = rtt(q, p) / 2 + n / bandwidth(q, p)`` milliseconds for a
message of ``n`` bytes. Peers are addressed by their index in the planner's peer list; the
client is a separate endpoint.

Two models implement :class:`Network`:

* :class:`MatrixNetwork` — explicit RTT and bandwidth for every ordered pair (or built from
  Vivaldi coordinates). Exact for any link pattern; its ``relax`` costs O(N^2), so use it for up
  to a few hundred peers.
* :class:`ZoneNetwork` — hub and spoke: each peer sits behind an access link (RTT share,
  uplink, downlink) in a zone, and zones are joined by a backbone (RTT and bandwidth per zone
  pair). A message is stored and forwarded through sender uplink, backbone and receiver
  downlink, so ``hop(q, p) = out(q) + T(zone q, zone p) + in(p)``. That separable form lets
  ``relax`` (min over senders of value + hop) run in O(N + Z^2) instead of O(N^2), which is
  what makes exact planning over 10,000 peers fast.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .coords import Coordinate, estimate_rtt
from .errors import SchedulerError

__all__ = ["Network", "MatrixNetwork", "ZoneNetwork", "ClientLink"]

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Network(Protocol):
    """What the planner needs from a link model (all times in ms, sizes in bytes)."""

    @property
    def n_peers(self) -> int: ...

    def hop_ms(self, q: int, p: int, nbytes: float) -> float:
        """One-way time of an ``nbytes`` message from peer ``q`` to peer ``p`` (q != p)."""
        ...

    def hops_into_ms(self, p: int, nbytes: float) -> Array:
        """``out[q] = hop_ms(q, p)`` for every q; ``out[p]`` is +inf."""
        ...

    def hops_from_ms(self, q: int, nbytes: float) -> Array:
        """``out[p] = hop_ms(q, p)`` for every p; ``out[q]`` is +inf."""
        ...

    def from_client_ms(self, nbytes: float) -> Array:
        """One-way time from the client to every peer."""
        ...

    def to_client_ms(self, nbytes: float) -> Array:
        """One-way time from every peer to the client."""
        ...

    def relax(self, values: Array, nbytes: float) -> Array:
        """For ``values`` of shape (S, N): ``out[s, p] = min over q != p of values[s, q] +
        hop_ms(q, p)`` (+inf when no finite term exists)."""
        ...

    def subset(self, indices: npt.NDArray[np.int64]) -> Network:
        """The same model restricted to the given peers, re-indexed 0..len(indices)-1."""
        ...

    def reversed(self) -> Network:
        """The model with every message direction flipped: ``hop'(q, p) = hop(p, q)``, and
        the client's two directions swapped (used to compute costs-to-go)."""
        ...


def _as_array(
    x: Sequence[float] | Sequence[Sequence[float]] | Array, name: str, shape: tuple[int, ...]
) -> Array:
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != shape:
        raise SchedulerError(f"{name}: expected shape {shape}, got {arr.shape}")
    if np.isnan(arr).any():
        raise SchedulerError(f"{name}: contains NaN")
    return arr


@dataclass(frozen=True, eq=False)
class MatrixNetwork:
    """Explicit per-pair links. ``rtt_ms[q, p]`` and ``bandwidth_bps[q, p]`` (bytes/s) for
    messages from q to p; ``client_*`` for the client's link to each peer (same both ways)."""

    rtt_ms: Array
    bandwidth_bps: Array
    client_rtt_ms: Array
    client_bandwidth_bps: Array

    def __post_init__(self) -> None:
        n = len(self.client_rtt_ms)
        _as_array(self.rtt_ms, "rtt_ms", (n, n))
        _as_array(self.bandwidth_bps, "bandwidth_bps", (n, n))
        _as_array(self.client_bandwidth_bps, "client_bandwidth_bps", (n,))
        off = ~np.eye(n, dtype=bool)
        if (self.rtt_ms[off] < 0).any() or (self.client_rtt_ms < 0).any():
            raise SchedulerError("RTTs must be >= 0")
        if (self.bandwidth_bps[off] <= 0).any() or (self.client_bandwidth_bps <= 0).any():
            raise SchedulerError("bandwidths must be > 0 (bytes/s)")

    @classmethod
    def build(
        cls,
        rtt_ms: Sequence[Sequence[float]] | Array,
        bandwidth_bps: Sequence[Sequence[float]] | Array,
        client_rtt_ms: Sequence[float] | Array,
        client_bandwidth_bps: Sequence[float] | Array,
    ) -> MatrixNetwork:
        """Validate and convert plain sequences."""
        n = len(client_rtt_ms)
        return cls(
            _as_array(rtt_ms, "rtt_ms", (n, n)),
            _as_array(bandwidth_bps, "bandwidth_bps", (n, n)),
            _as_array(client_rtt_ms, "client_rtt_ms", (n,)),
            _as_array(client_bandwidth_bps, "client_bandwidth_bps", (n,)),
        )

    @classmethod
    def from_coordinates(
        cls,
        coords: Sequence[Coordinate],
        client: Coordinate,
        bandwidth_bps: float = 12.5e6,
    ) -> MatrixNetwork:
        """RTTs estimated from Vivaldi coordinates, one bandwidth for every link."""
        if bandwidth_bps <= 0:
            raise SchedulerError("bandwidth_bps must be > 0")
        n = len(coords)
        rtt = np.array([[estimate_rtt(a, b) for b in coords] for a in coords]).reshape(n, n)
        crtt = np.array([estimate_rtt(client, c) for c in coords], dtype=np.float64)
        bw = np.full((n, n), bandwidth_bps)
        return cls(rtt, bw, crtt, np.full(n, bandwidth_bps))

    @property
    def n_peers(self) -> int:
        return len(self.client_rtt_ms)

    def hop_ms(self, q: int, p: int, nbytes: float) -> float:
        return float(self.rtt_ms[q, p] / 2 + nbytes / self.bandwidth_bps[q, p] * 1e3)

    def _hop_matrix(self, nbytes: float) -> Array:
        with np.errstate(divide="ignore"):
            m = self.rtt_ms / 2 + nbytes / self.bandwidth_bps * 1e3
        np.fill_diagonal(m, np.inf)
        return m

    def hops_into_ms(self, p: int, nbytes: float) -> Array:
        with np.errstate(divide="ignore"):
            col = self.rtt_ms[:, p] / 2 + nbytes / self.bandwidth_bps[:, p] * 1e3
        col[p] = np.inf
        return col

    def hops_from_ms(self, q: int, nbytes: float) -> Array:
        with np.errstate(divide="ignore"):
            row = self.rtt_ms[q, :] / 2 + nbytes / self.bandwidth_bps[q, :] * 1e3
        row[q] = np.inf
        return row

    def from_client_ms(self, nbytes: float) -> Array:
        return self.client_rtt_ms / 2 + nbytes / self.client_bandwidth_bps * 1e3

    def to_client_ms(self, nbytes: float) -> Array:
        return self.from_client_ms(nbytes)

    def relax(self, values: Array, nbytes: float) -> Array:
        hop = self._hop_matrix(nbytes)
        out: Array = np.min(values[:, :, None] + hop[None, :, :], axis=1)
        return out

    def subset(self, indices: npt.NDArray[np.int64]) -> MatrixNetwork:
        ix = np.ix_(indices, indices)
        return MatrixNetwork(
            self.rtt_ms[ix],
            self.bandwidth_bps[ix],
            self.client_rtt_ms[indices],
            self.client_bandwidth_bps[indices],
        )

    def reversed(self) -> MatrixNetwork:
        # The client link is the same both ways in this model.
        return MatrixNetwork(
            self.rtt_ms.T.copy(),
            self.bandwidth_bps.T.copy(),
            self.client_rtt_ms,
            self.client_bandwidth_bps,
        )


@dataclass(frozen=True)
class ClientLink:
    """Where the client sits in a :class:`ZoneNetwork`."""

    zone: int
    access_rtt_ms: float = 1.0
    up_bps: float = 12.5e6
    down_bps: float = 12.5e6

    def __post_init__(self) -> None:
        if self.zone < 0 or self.access_rtt_ms < 0 or self.up_bps <= 0 or self.down_bps <= 0:
            raise SchedulerError(f"invalid client link {self!r}")


@dataclass(frozen=True, eq=False)
class ZoneNetwork:
    """Hub-and-spoke links (see the module docstring).

    ``zone[p]`` is peer p's zone index in ``[0, Z)``; ``access_rtt_ms[p]`` the RTT of its
    access link (a Vivaldi height, counted once per end); ``up_bps`` / ``down_bps`` its access
    bandwidths (bytes/s); ``zone_rtt_ms[z, y]`` and ``zone_bandwidth_bps[z, y]`` the backbone
    between zones (the diagonal is the LAN inside a zone).
    """

    zone: npt.NDArray[np.int64]
    access_rtt_ms: Array
    up_bps: Array
    down_bps: Array
    zone_rtt_ms: Array
    zone_bandwidth_bps: Array
    client: ClientLink

    def __post_init__(self) -> None:
        n = len(self.zone)
        z = self.zone_rtt_ms.shape[0]
        for name in ("access_rtt_ms", "up_bps", "down_bps"):
            _as_array(getattr(self, name), name, (n,))
        _as_array(self.zone_rtt_ms, "zone_rtt_ms", (z, z))
        _as_array(self.zone_bandwidth_bps, "zone_bandwidth_bps", (z, z))
        if n and (self.zone.min() < 0 or self.zone.max() >= z):
            raise SchedulerError("zone index out of range")
        if self.client.zone >= z:
            raise SchedulerError("client zone out of range")
        if (self.access_rtt_ms < 0).any() or (self.zone_rtt_ms < 0).any():
            raise SchedulerError("RTTs must be >= 0")
        if (
            (self.up_bps <= 0).any()
            or (self.down_bps <= 0).any()
            or (self.zone_bandwidth_bps <= 0).any()
        ):
            raise SchedulerError("bandwidths must be > 0 (bytes/s)")

    @classmethod
    def build(
        cls,
        zone: Sequence[int],
        access_rtt_ms: Sequence[float],
        up_bps: Sequence[float],
        down_bps: Sequence[float],
        zone_rtt_ms: Sequence[Sequence[float]],
        zone_bandwidth_bps: Sequence[Sequence[float]],
        client: ClientLink,
    ) -> ZoneNetwork:
        n, z = len(zone), len(zone_rtt_ms)
        return cls(
            np.asarray(zone, dtype=np.int64),
            _as_array(access_rtt_ms, "access_rtt_ms", (n,)),
            _as_array(up_bps, "up_bps", (n,)),
            _as_array(down_bps, "down_bps", (n,)),
            _as_array(zone_rtt_ms, "zone_rtt_ms", (z, z)),
            _as_array(zone_bandwidth_bps, "zone_bandwidth_bps", (z, z)),
            client,
        )

    @property
    def n_peers(self) -> int:
        return len(self.zone)

    @functools.cached_property
    def _groups(self) -> tuple[IntArray, IntArray, npt.NDArray[np.bool_]]:
        """Peers sorted by zone, each present zone's first position, which zones have peers."""
        order = np.argsort(self.zone, kind="stable")
        starts = np.searchsorted(self.zone[order], np.arange(self.n_zones))
        present = np.bincount(self.zone, minlength=self.n_zones) > 0
        return order, starts, present

    @property
    def n_zones(self) -> int:
        return int(self.zone_rtt_ms.shape[0])

    def _out(self, nbytes: float) -> Array:
        return self.access_rtt_ms / 2 + nbytes / self.up_bps * 1e3

    def _in(self, nbytes: float) -> Array:
        return self.access_rtt_ms / 2 + nbytes / self.down_bps * 1e3

    def _backbone(self, nbytes: float) -> Array:
        cache = self._backbone_cache
        if nbytes not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[nbytes] = self.zone_rtt_ms / 2 + nbytes / self.zone_bandwidth_bps * 1e3
        return cache[nbytes]

    @functools.cached_property
    def _backbone_cache(self) -> dict[float, Array]:
        return {}

    def hop_ms(self, q: int, p: int, nbytes: float) -> float:
        zq, zp = self.zone[q], self.zone[p]
        return float(
            self.access_rtt_ms[q] / 2
            + nbytes / self.up_bps[q] * 1e3
            + self.zone_rtt_ms[zq, zp] / 2
            + nbytes / self.zone_bandwidth_bps[zq, zp] * 1e3
            + self.access_rtt_ms[p] / 2
            + nbytes / self.down_bps[p] * 1e3
        )

    def hops_into_ms(self, p: int, nbytes: float) -> Array:
        t = self._backbone(nbytes)[:, self.zone[p]]
        col: Array = self._out(nbytes) + t[self.zone] + self._in(nbytes)[p]
        col[p] = np.inf
        return col

    def hops_from_ms(self, q: int, nbytes: float) -> Array:
        t = self._backbone(nbytes)[self.zone[q], :]
        row: Array = self._out(nbytes)[q] + t[self.zone] + self._in(nbytes)
        row[q] = np.inf
        return row

    def from_client_ms(self, nbytes: float) -> Array:
        c = self.client
        t = self._backbone(nbytes)[c.zone, :]
        first = c.access_rtt_ms / 2 + nbytes / c.up_bps * 1e3
        out: Array = first + t[self.zone] + self._in(nbytes)
        return out

    def to_client_ms(self, nbytes: float) -> Array:
        c = self.client
        t = self._backbone(nbytes)[:, c.zone]
        last = c.access_rtt_ms / 2 + nbytes / c.down_bps * 1e3
        out: Array = self._out(nbytes) + t[self.zone] + last
        return out

    def relax(self, values: Array, nbytes: float) -> Array:
        s, n = values.shape
        nz = self.n_zones
        w = values + self._out(nbytes)[None, :]
        # Best and second-best sender per zone: the second is what a peer sees when it is
        # itself its zone's best (a stage never sends to its own peer).
        order, starts, present = self._groups
        ws = w[:, order]
        m1 = np.full((s, nz), np.inf)
        m2 = np.full((s, nz), np.inf)
        arg1 = np.full((s, nz), -1, dtype=np.int64)
        if n:
            idx = starts[present]
            mins = np.minimum.reduceat(ws, idx, axis=1)
            m1[:, present] = mins
            # Position of each zone's minimum, then mask it to get the runner-up.
            seg = np.repeat(np.arange(len(idx)), np.diff(np.append(idx, n)))
            is_min = ws == mins[:, seg]
            # First occurrence of the minimum in each segment.
            pos = np.where(is_min, np.arange(n)[None, :], n)
            first = np.minimum.reduceat(pos, idx, axis=1)
            arg1[:, present] = order[np.minimum(first, n - 1)]
            ws2 = ws.copy()
            rows = np.arange(s)[:, None]
            ws2[rows, np.minimum(first, n - 1)] = np.inf
            m2[:, present] = np.minimum.reduceat(ws2, idx, axis=1)
        t = self._backbone(nbytes)
        t_off = t.copy()
        np.fill_diagonal(t_off, np.inf)
        cross = np.min(m1[:, :, None] + t_off[None, :, :], axis=1)  # (s, nz) by target zone
        diag = np.diag(t)
        zp = self.zone
        own_best = np.where(arg1[:, zp] == np.arange(n)[None, :], m2[:, zp], m1[:, zp])
        best = np.minimum(cross[:, zp], own_best + diag[zp][None, :])
        out: Array = best + self._in(nbytes)[None, :]
        return out

    def subset(self, indices: npt.NDArray[np.int64]) -> ZoneNetwork:
        # Keep only the zones still present (and the client's): relax costs O(Z^2).
        keep = np.union1d(np.unique(self.zone[indices]), [self.client.zone])
        remap = np.full(self.n_zones, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        ix = np.ix_(keep, keep)
        c = self.client
        return ZoneNetwork(
            remap[self.zone[indices]],
            self.access_rtt_ms[indices],
            self.up_bps[indices],
            self.down_bps[indices],
            self.zone_rtt_ms[ix],
            self.zone_bandwidth_bps[ix],
            ClientLink(int(remap[c.zone]), c.access_rtt_ms, c.up_bps, c.down_bps),
        )

    def reversed(self) -> ZoneNetwork:
        c = self.client
        return ZoneNetwork(
            self.zone,
            self.access_rtt_ms,
            self.down_bps,
            self.up_bps,
            self.zone_rtt_ms.T.copy(),
            self.zone_bandwidth_bps.T.copy(),
            ClientLink(c.zone, c.access_rtt_ms, c.down_bps, c.up_bps),
        )
