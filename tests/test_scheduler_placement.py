"""Batch placement: tasks run where their data is, else on the nearest capable peer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from scheduler import (
    ClientLink,
    CostParams,
    Peer,
    PlanningError,
    SchedulerError,
    Task,
    ZoneNetwork,
    plan_placement,
)


def two_zone_mesh() -> tuple[list[Peer], ZoneNetwork]:
    # Zone 0: two storage-only holders and one compute peer; zone 1: three fast compute peers.
    peers = [
        Peer("s0", "a", 0, 0.0, egress_price=1.0),
        Peer("s1", "a", 0, 0.0, egress_price=1.0),
        Peer("c0", "a", 1 << 30, 1e9, egress_price=1.0),
    ]
    peers += [Peer(f"f{i}", "b", 1 << 30, 4e9, egress_price=1.0) for i in range(3)]
    zone = [0, 0, 0, 1, 1, 1]
    net = ZoneNetwork.build(
        zone,
        [1.0] * 6,
        [1e7] * 6,
        [1e7] * 6,
        [[0.2, 40.0], [40.0, 0.2]],
        [[1e9, 1e7], [1e7, 1e9]],
        ClientLink(0),
    )
    return peers, net


def test_holder_that_computes_runs_its_task() -> None:
    peers, net = two_zone_mesh()
    tasks = [Task(f"t{i}", 1 << 20, frozenset({"c0"}), cost=1e6) for i in range(4)]
    out = plan_placement(tasks, peers, net, replicas=2)
    assert [a.peer_id for a in out] == ["c0"] * 4
    assert all(a.source_id is None and a.cross_zone_bytes == 0 for a in out)
    assert all(len(a.standby) == 2 and "c0" not in a.standby for a in out)


def test_storage_only_holder_goes_to_nearest_capable_and_beats_random() -> None:
    peers, net = two_zone_mesh()
    tasks = [Task(f"t{i}", 4 << 20, frozenset({"s0", "s1"}), cost=1e6) for i in range(20)]
    out = plan_placement(tasks, peers, net, CostParams(locality_weight=1e-3))
    ours = sum(a.cross_zone_bytes for a in out)
    assert {a.peer_id for a in out} == {"c0"} and ours == 0
    assert all(a.source_id in {"s0", "s1"} for a in out)
    rng = random.Random(0)
    capable = [p for p in peers if p.speed > 0]
    rand = sum(t.nbytes for t in tasks if rng.choice(capable).zone != "a")
    assert rand > ours


def test_load_spreads_over_holders() -> None:
    peers, net = two_zone_mesh()
    tasks = [Task(f"t{i}", 1024, frozenset({"f0", "f1", "f2"}), cost=1e9) for i in range(6)]
    out = plan_placement(tasks, peers, net)
    counts = {pid: sum(a.peer_id == pid for a in out) for pid in ("f0", "f1", "f2")}
    assert counts == {"f0": 2, "f1": 2, "f2": 2}
    assert np.isfinite([a.finish_ms for a in out]).all()


def test_placement_errors() -> None:
    peers, net = two_zone_mesh()
    with pytest.raises(PlanningError):
        plan_placement([Task("t", 1, frozenset({"nobody"}))], peers, net)
    with pytest.raises(SchedulerError):
        Task("t", -1, frozenset({"s0"}))
    with pytest.raises(SchedulerError):
        plan_placement([], peers, net, replicas=-1)
