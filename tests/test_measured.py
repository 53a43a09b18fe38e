"""Route planning on measured figures (issue 13, scope 3): a peer's claimed memory bandwidth
is replaced by what its routes showed, and claims of peers not yet seen are capped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mesh.inference.measured import MAX_MEASURED, MEASURED_TTL_S, Measured, stage_cost
from mesh.inference.routes import MAX_GBPS, PeerView, Stage
from mesh.inference.run import GenerationRun
from mesh.net.rpc import CallContext, Handler
from tests.test_run_failover import Mesh
from tests.test_run_failover import fast_probes as fast_probes  # noqa: F401 (fixture)
from tests.test_run_failover import tiny as tiny  # noqa: F401 (fixture)

UNITS = [1 << 20, 4 << 20, 4 << 20, 2 << 20]  # embed, two blocks, head


def view(peer: str, gbps: float, rtt: float = 0.0) -> PeerView:
    return PeerView(peer, float("inf"), set(), "onnx", rtt, gbps * 1e9)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_one_stage_route_measures_its_peer_exactly() -> None:
    m = Measured()
    a = view("a" * 64, 10_000.0, rtt=2.0)  # claims 10 TB/s
    stages = [Stage(a.peer_id, (0, 4), "onnx")]
    # 50 ms a token on the coordinator's clock, 2 ms of it the hop there and back
    m.record(stages, UNITS, {a.peer_id: a}, [50.0] * 8)
    measured = m.apply(a).mem_bytes_per_s
    assert abs(measured / (stage_cost(UNITS, 0, 4) / 0.048) - 1) < 1e-6


def test_a_longer_route_shares_the_gap_and_unseen_claims_are_capped() -> None:
    m = Measured()
    a, b = view("a" * 64, 10.0), view("b" * 64, 10.0)
    stages = [Stage(a.peer_id, (0, 2), "onnx"), Stage(b.peer_id, (2, 4), "onnx")]
    m.record(stages, UNITS, {a.peer_id: a, b.peer_id: b}, [100.0] * 8)
    work = stage_cost(UNITS, 0, 2) + stage_cost(UNITS, 2, 4)
    ratio = m.apply(a).mem_bytes_per_s / (work / 0.1)
    assert 1.0 <= ratio < 1.01  # both scaled by one ratio (the hop: at least 0.2 ms)
    liar = view("c" * 64, MAX_GBPS)
    assert m.apply(liar).mem_bytes_per_s == 2 * m.apply(a).mem_bytes_per_s
    modest = view("d" * 64, 0.001)
    assert m.apply(modest) == modest  # under the cap: the claim stands


def test_measurements_expire_and_the_table_is_bounded() -> None:
    clock = Clock()
    m = Measured(clock)
    a = view("a" * 64, 10.0)
    m.record([Stage(a.peer_id, (0, 4), "onnx")], UNITS, {a.peer_id: a}, [10.0] * 8)
    assert m.get(a.peer_id) is not None
    clock.t = MEASURED_TTL_S + 1
    assert m.get(a.peer_id) is None and m.apply(a) == a
    for i in range(MAX_MEASURED + 10):
        v = view(f"{i:064x}", 10.0)
        m.record([Stage(v.peer_id, (0, 4), "onnx")], UNITS, {v.peer_id: v}, [10.0] * 8)
    assert len(m) == MAX_MEASURED
    few = view("e" * 64, 10.0)
    m.record([Stage(few.peer_id, (0, 4), "onnx")], UNITS, {few.peer_id: few}, [10.0] * 3)
    assert m.get(few.peer_id) is None  # three steps: no median worth keeping


def slow(real: Handler, delay: float) -> Handler:
    """A stage that takes ``delay`` seconds a step (a peer far slower than it claims)."""

    async def stage_push(ctx: CallContext, params: dict[str, Any], payload: bytes) -> None:
        await asyncio.sleep(delay)  # the peer's real speed, not a synchronization
        await real(ctx, params, payload)

    return stage_push


async def test_a_peer_claiming_10_tb_s_loses_the_route_once_measured(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """One peer claims 10 TB/s of memory bandwidth but takes 40 ms a step. Before, every
    plan gave it the whole model, every time; now the first generation measures it, and the
    next one is planned on an honest peer."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    liar = mesh.peers[0]
    mesh.computes[liar].mem_gbps = MAX_GBPS
    handlers = mesh.net.handlers[liar]
    handlers["compute.stage_push"] = slow(handlers["compute.stage_push"], 0.04)
    try:
        first = (await mesh.generate(GenerationRun(mesh.coord, mesh.request(max_tokens=6))))[-1]
        second = (await mesh.generate(GenerationRun(mesh.coord, mesh.request(max_tokens=6))))[-1]
    finally:
        await mesh.stop()
    assert [s["peer_id"] for s in first["stages"]] == [liar]
    assert liar not in {s["peer_id"] for s in second["stages"]}, second["stages"]
    assert second["tokens"] == first["tokens"]
