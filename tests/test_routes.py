"""Route planning inputs: RTTs between peers the coordinator does not measure itself."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from mesh.errors import Error
from mesh.inference.routes import PeerView, hop_rtt, plan_with_scheduler
from mesh.net.view import NetConfig, NetView, PeerNet
from runtimes.shards import ShardStore
from runtimes.testmodels import write_test_model
from scheduler import Coordinate

# The coordinator (not a candidate) sees A and B 40 ms away and D 30 ms away; A and B share
# a LAN (1 ms), D is 80 ms from both.
TO_COORD = {"A": 40.0, "B": 40.0, "D": 30.0}
BETWEEN = {frozenset("AB"): 1.0, frozenset("AD"): 80.0, frozenset("BD"): 80.0}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("routes")
    path = write_test_model(root / "tiny.gguf", "llama")
    return ShardStore(root / "store").add_model(path)


def views() -> list[PeerView]:
    return [PeerView(p, math.inf, set(), "onnx", rtt_ms=r) for p, r in TO_COORD.items()]


def test_pair_rtts_pick_the_two_peers_that_are_near_each_other(manifest) -> None:
    def pair_rtt(a: str, b: str) -> float | None:
        return BETWEEN.get(frozenset((a, b)))

    stages = plan_with_scheduler(manifest, views(), split=2, runtime=None, pair_rtt=pair_rtt)
    assert {s.peer_id for s in stages} == {"A", "B"}  # 40 + 1 + 40 ms, not 30 + 80 + 40


def test_without_pair_rtts_the_mean_to_the_coordinator_is_the_estimate(manifest) -> None:
    # A-D is guessed at (40 + 30) / 2 = 35 ms < A-B at 40 ms: D looks best, wrongly.
    stages = plan_with_scheduler(manifest, views(), split=2, runtime=None)
    assert "D" in {s.peer_id for s in stages}
    unknown = plan_with_scheduler(
        manifest, views(), split=2, runtime=None, pair_rtt=lambda a, b: None
    )
    assert [s.peer_id for s in unknown] == [s.peer_id for s in stages]


class _Node:
    me = "C"

    def link(self, pid: str):
        if pid == "A":
            return SimpleNamespace(rtt_ms=12.5)
        raise Error("no link")


def test_netview_pair_rtt_uses_own_links_and_only_confident_coordinates() -> None:
    net = NetView(_Node(), NetConfig())  # type: ignore[arg-type]
    assert net.pair_rtt("C", "A") == 12.5  # measured on our own link
    assert net.pair_rtt("B", "C") is None  # no link, no measurement
    assert net.pair_rtt("A", "B") is None  # coordinates unknown
    net.peers["A"] = PeerNet(coord=Coordinate(vec=(0.0, 0.0), height=0.5, error=0.2))
    net.peers["B"] = PeerNet(coord=Coordinate(vec=(3.0, 4.0), height=0.5, error=1.2))
    assert net.pair_rtt("A", "B") is None  # B's coordinate is not settled yet
    net.peers["B"] = PeerNet(coord=Coordinate(vec=(3.0, 4.0), height=0.5, error=0.3))
    assert net.pair_rtt("A", "B") == pytest.approx(6.0)  # 5 in the plane + both heights


def test_pair_rtts_are_held_to_the_triangle_through_the_coordinator() -> None:
    """Peers report their own coordinates: a claimed 0 ms between D (30 ms from us) and A
    (40 ms) is planned as 10 ms, a claimed 500 ms as 70 ms; a claimed 1 ms between A and B
    (both 40 ms away) stands."""
    a, b, d = views()

    def claims(ms: float):
        return lambda x, y: ms

    assert hop_rtt(a, d, claims(0.0)) == 10.0
    assert hop_rtt(a, d, claims(500.0)) == 70.0
    assert hop_rtt(a, b, claims(1.0)) == 1.0
    assert hop_rtt(a, d, None) == 35.0  # no estimate: the mean
