"""Vivaldi coordinates: convergence on a synthetic geometric network, robustness."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from scheduler import Coordinate, SchedulerError, VivaldiNode, estimate_rtt


def test_converges_on_geometric_network() -> None:
    """60 peers in a 200 x 200 ms plane with 0.5-5 ms access links and +-5 % jitter:
    after 200 rounds of one sample per peer, the median relative error is under 10 %."""
    rng = random.Random(1)
    n = 60
    pos = [(rng.uniform(0, 200), rng.uniform(0, 200)) for _ in range(n)]
    height = [rng.uniform(0.5, 5) for _ in range(n)]

    def true_rtt(i: int, j: int) -> float:
        return math.dist(pos[i], pos[j]) + height[i] + height[j]

    nodes = [VivaldiNode(seed=i) for i in range(n)]
    for _ in range(200):
        for i in range(n):
            j = rng.randrange(n)
            if j != i:
                sample = true_rtt(i, j) * rng.uniform(0.95, 1.05)
                assert nodes[i].update(sample, nodes[j].coordinate, str(j))
    errors = [
        abs(estimate_rtt(nodes[i].coordinate, nodes[j].coordinate) - true_rtt(i, j))
        / true_rtt(i, j)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    assert statistics.median(errors) < 0.10
    # Each node's own error estimate has come down from the initial maximum.
    assert statistics.median(node.coordinate.error for node in nodes) < 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 0.0, 1e9])
def test_rejects_bad_samples(bad: float) -> None:
    node = VivaldiNode(seed=0)
    remote = Coordinate(vec=(10.0, 0.0), height=1.0, error=0.5)
    assert node.update(20.0, remote, "r")
    before = node.coordinate
    assert not node.update(bad, remote, "r")
    assert node.coordinate == before


def test_rejects_bad_remote_and_stays_bounded() -> None:
    with pytest.raises(SchedulerError):
        Coordinate(vec=(math.nan, 0.0))
    node = VivaldiNode(seed=0)
    # A remote whose fields are absurd (built around validation, as a forged record would be).
    forged = object.__new__(Coordinate)
    object.__setattr__(forged, "vec", (1e12, 0.0))
    object.__setattr__(forged, "height", 1.0)
    object.__setattr__(forged, "error", 0.1)
    object.__setattr__(forged, "adjustment", 0.0)
    assert not node.update(50.0, forged)
    # A stream of maximal (but valid) samples keeps every field finite and bounded.
    far = Coordinate(vec=(0.0, 0.0), height=0.01, error=0.01)
    for _ in range(2000):
        node.update(node.config.max_rtt_ms, far)
    c = node.coordinate
    assert c.is_valid(node.config.max_magnitude_ms)
    assert estimate_rtt(c, far) == pytest.approx(node.config.max_rtt_ms, rel=0.5)


def test_estimate_is_symmetric_and_nonnegative() -> None:
    a = Coordinate(vec=(3.0, 4.0), height=1.0, error=0.2, adjustment=-10.0)
    b = Coordinate(vec=(0.0, 0.0), height=2.0, error=0.2, adjustment=-10.0)
    assert estimate_rtt(a, b) == estimate_rtt(b, a) == pytest.approx(8.0)
