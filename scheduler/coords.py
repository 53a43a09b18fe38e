"""Vivaldi network coordinates (Dabek et al., SIGCOMM 2004) as Serf and Consul run them.

A coordinate is a point in a 2-D Euclidean plane plus a *height* (the access-link latency a
packet pays before it reaches the core, which a plane cannot express) plus an *adjustment*
(a per-node offset learned from the mean residual error). All values are milliseconds:
``estimate_rtt(a, b) = |a.vec - b.vec| + a.height + b.height (+ adjustments when positive)``.

Update rule (Serf's ``coordinate/client.go``): each RTT sample moves the local point along
the line to the remote point by ``cc * w * (rtt - estimate)``, with ``w = e_local / (e_local +
e_remote)`` so a confident node moves little towards an unsure one; the local error is an
exponentially weighted moving average of the relative error with weight ``ce * w``. A median
filter over the last few samples per remote peer removes one-off spikes (GC pauses, queues),
and a weak gravity towards the origin stops the whole system from drifting.

Robustness: samples that are NaN, infinite, non-positive or above ``max_rtt_ms`` are rejected
(``update`` returns False and nothing changes), as are remote coordinates whose fields are not
finite or exceed ``max_magnitude_ms``; the local coordinate is clipped to that magnitude so no
sequence of accepted samples can make it unbounded.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field

from .errors import SchedulerError

__all__ = ["Coordinate", "VivaldiConfig", "VivaldiNode", "estimate_rtt"]

log = logging.getLogger(__name__)

_ZERO = 1e-6  # below this a vector is treated as zero (ms)


@dataclass(frozen=True)
class Coordinate:
    """An immutable network coordinate; every field in milliseconds except ``error``
    (a relative error in [0, error_max])."""

    vec: tuple[float, float] = (0.0, 0.0)
    height: float = 0.01
    error: float = 1.5
    adjustment: float = 0.0

    def __post_init__(self) -> None:
        if len(self.vec) != 2:
            raise SchedulerError(f"coordinate vector must have 2 components, got {len(self.vec)}")
        if not self.is_valid():
            raise SchedulerError(f"invalid coordinate {self!r}")

    def is_valid(self, max_magnitude_ms: float = 1e6) -> bool:
        """True when every field is finite, height >= 0, error >= 0 and magnitudes are sane."""
        values = (*self.vec, self.height, self.error, self.adjustment)
        if not all(math.isfinite(v) for v in values):
            return False
        if self.height < 0 or self.error < 0:
            return False
        return all(abs(v) <= max_magnitude_ms for v in values)


def _distance(a: Coordinate, b: Coordinate) -> float:
    dx = a.vec[0] - b.vec[0]
    dy = a.vec[1] - b.vec[1]
    return math.hypot(dx, dy) + a.height + b.height


def estimate_rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated round-trip time between two coordinates, in ms (never negative).

    As in Serf, the adjustments are added only when their sum is positive: they correct a
    systematic under-estimate, and applying a negative sum could push the estimate below the
    geometric distance that the plane itself justifies.
    """
    dist = _distance(a, b)
    adjusted = dist + a.adjustment + b.adjustment
    return adjusted if adjusted > 0 else dist


@dataclass(frozen=True)
class VivaldiConfig:
    """Serf's defaults, converted to milliseconds (``HeightMin`` 10 us = 0.01 ms)."""

    cc: float = 0.25
    ce: float = 0.25
    error_max: float = 1.5
    height_min_ms: float = 0.01
    adjustment_window: int = 20
    latency_filter_size: int = 3
    # Serf sets GravityRho = 150 with coordinates in seconds; the same pull in ms is 150,000.
    gravity_rho_ms: float = 150_000.0
    max_rtt_ms: float = 10_000.0
    max_magnitude_ms: float = 100_000.0
    max_tracked_peers: int = 4096

    def __post_init__(self) -> None:
        if not (0 < self.cc <= 1 and 0 < self.ce <= 1):
            raise SchedulerError("cc and ce must lie in (0, 1]")
        if self.error_max <= 0 or self.height_min_ms <= 0 or self.gravity_rho_ms <= 0:
            raise SchedulerError("error_max, height_min_ms and gravity_rho_ms must be positive")
        if self.adjustment_window < 1 or self.latency_filter_size < 1:
            raise SchedulerError("adjustment_window and latency_filter_size must be >= 1")
        if not (0 < self.max_rtt_ms <= self.max_magnitude_ms) or self.max_tracked_peers < 1:
            raise SchedulerError("need 0 < max_rtt_ms <= max_magnitude_ms, max_tracked_peers>=1")


@dataclass
class VivaldiNode:
    """The local peer's coordinate, updated from RTT samples to other peers.

    Not thread-safe; one instance per local peer. ``seed`` makes the random direction used
    when two coordinates coincide reproducible.
    """

    config: VivaldiConfig = field(default_factory=VivaldiConfig)
    seed: int | None = None
    _coord: Coordinate = field(init=False)
    _samples: dict[str, deque[float]] = field(init=False, default_factory=dict)
    _residuals: deque[float] = field(init=False)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._coord = Coordinate(height=self.config.height_min_ms, error=self.config.error_max)
        self._residuals = deque(maxlen=self.config.adjustment_window)
        self._rng = random.Random(self.seed)

    @property
    def coordinate(self) -> Coordinate:
        """The current coordinate (immutable snapshot)."""
        return self._coord

    def _filtered(self, remote_id: str | None, rtt_ms: float) -> float:
        """Median of the last few samples from ``remote_id`` (raw sample when anonymous)."""
        if remote_id is None:
            return rtt_ms
        window = self._samples.get(remote_id)
        if window is None:
            if len(self._samples) >= self.config.max_tracked_peers:
                # Bounded memory: forget the oldest-inserted peer (dicts keep insertion order).
                self._samples.pop(next(iter(self._samples)))
            window = deque(maxlen=self.config.latency_filter_size)
            self._samples[remote_id] = window
        window.append(rtt_ms)
        ordered = sorted(window)
        return ordered[len(ordered) // 2]

    def forget(self, remote_id: str) -> None:
        """Drop the latency filter kept for a peer that left."""
        self._samples.pop(remote_id, None)

    def update(self, rtt_ms: float, remote: Coordinate, remote_id: str | None = None) -> bool:
        """Fold one RTT sample to ``remote`` into the local coordinate.

        Returns False (and changes nothing) when the sample or the remote coordinate is
        rejected: RTT not finite, <= 0 or above ``max_rtt_ms``; remote fields not finite or
        beyond ``max_magnitude_ms``.
        """
        cfg = self.config
        if not isinstance(rtt_ms, int | float) or not math.isfinite(rtt_ms):
            log.debug("vivaldi: rejected non-finite rtt %r", rtt_ms)
            return False
        if rtt_ms <= 0 or rtt_ms > cfg.max_rtt_ms:
            log.debug("vivaldi: rejected out-of-range rtt %r ms", rtt_ms)
            return False
        if not remote.is_valid(cfg.max_magnitude_ms):
            log.debug("vivaldi: rejected invalid remote coordinate %r", remote)
            return False
        rtt = self._filtered(remote_id, float(rtt_ms))
        local = self._coord
        remote_error = min(max(remote.error, 0.0), cfg.error_max)

        dist = _distance(local, remote)
        wrongness = abs(dist - rtt) / rtt
        total_error = max(local.error + remote_error, _ZERO)
        weight = local.error / total_error
        error = min(
            cfg.ce * weight * wrongness + local.error * (1 - cfg.ce * weight), cfg.error_max
        )
        force = cfg.cc * weight * (rtt - dist)
        vec, height = self._apply_force(local, remote, force)

        # Gravity: a small pull to the origin, growing with the square of the distance, so a
        # network whose peers all drift together stays anchored (Serf's GravityRho).
        mag = math.hypot(*vec)
        if mag > _ZERO:
            pull = -((mag / cfg.gravity_rho_ms) ** 2)
            vec = (vec[0] + vec[0] / mag * pull, vec[1] + vec[1] / mag * pull)
        vec = self._clip(vec)
        height = min(max(height, cfg.height_min_ms), cfg.max_magnitude_ms)

        # Adjustment: half the mean residual over a window (Serf's updateAdjustment).
        moved = Coordinate(vec=vec, height=height, error=error)
        self._residuals.append(rtt - _distance(moved, remote))
        adjustment = sum(self._residuals) / (2 * len(self._residuals))
        adjustment = max(-cfg.max_magnitude_ms, min(cfg.max_magnitude_ms, adjustment))
        self._coord = Coordinate(vec=vec, height=height, error=error, adjustment=adjustment)
        return True

    def _apply_force(
        self, local: Coordinate, remote: Coordinate, force: float
    ) -> tuple[tuple[float, float], float]:
        dx = local.vec[0] - remote.vec[0]
        dy = local.vec[1] - remote.vec[1]
        mag = math.hypot(dx, dy)
        if mag > _ZERO:
            ux, uy = dx / mag, dy / mag
        else:
            # Coincident points: push apart in a random direction (Serf does the same).
            angle = self._rng.uniform(0, 2 * math.pi)
            ux, uy = math.cos(angle), math.sin(angle)
        vec = (local.vec[0] + ux * force, local.vec[1] + uy * force)
        height = local.height
        if mag > _ZERO:
            height = (local.height + remote.height) * force / mag + local.height
        return vec, height

    def _clip(self, vec: tuple[float, float]) -> tuple[float, float]:
        mag = math.hypot(*vec)
        limit = self.config.max_magnitude_ms
        if mag > limit:
            return (vec[0] / mag * limit, vec[1] / mag * limit)
        return vec
