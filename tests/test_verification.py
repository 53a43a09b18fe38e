"""Spot checks across real node processes: a lying stage is caught, banned and routed around;
honest routes pass every check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.launch.localmesh import LocalMesh, wait_for
from runtimes.onnx_rt import OnnxRuntime
from runtimes.oracle import Chain, greedy_continuation
from runtimes.shards import ShardStore
from runtimes.testmodels import write_test_model

pytestmark = pytest.mark.network
PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7]
RATE = 0.25  # each stage step is recomputed with this probability
BOUND = 16  # P(a stage lying on every step survives 16 steps at 0.25) = 0.75**16 = 1.0 %
SEED = 11  # fixes which steps are checked, so the test is repeatable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("verify") / "llama.gguf", "llama")


async def collect(mesh: LocalMesh, node: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    assert mesh._http is not None
    events = []
    async with mesh._http.post(node.api + "/v1/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.strip():
                events.append(json.loads(line))
    assert "error" not in events[-1], events[-1]
    return events


def local_tokens(path: Path, store_dir: Path, stages: list[dict[str, Any]], n: int) -> list[int]:
    store = ShardStore(store_dir)
    manifest = store.add_model(path)
    runtimes = [OnnxRuntime(store.open_range(manifest, *s["units"])) for s in stages]
    return greedy_continuation(Chain(runtimes), PROMPT, n, max_tokens=64)[0]


async def test_perturbing_stage_is_caught_banned_and_routed_around(
    local_mesh: LocalMesh, tiny: Path, tmp_path: Path
) -> None:
    # The coordinator cannot run a stage itself (1 MiB): the route is h0, h1 and the liar.
    coord = await local_mesh.start_node("coord", ["--memory-limit", "1M"])
    honest = await local_mesh.start_nodes([f"h{i}" for i in range(2)])
    evil = await local_mesh.start_node("evil", module="tests.fixtures.evil_node")
    await local_mesh.wait_connected(timeout=30)
    await local_mesh.post(coord, "/v1/models", {"path": str(tiny), "name": "tiny"})
    body = {
        "model": "tiny",
        "tokens": PROMPT,
        "max_tokens": BOUND + 8,
        "split": 3,  # three peers can run stages: the liar is one of them
        "verify": RATE,
        "verify_seed": SEED,
    }
    events = await collect(local_mesh, coord, body)
    route = events[0]["route"]
    assert evil.peer_id in {s["peer_id"] for s in route}, "the liar was not on the route"
    restarts = [e for e in events if e.get("restart")]
    summary = events[-1]
    v = summary["verification"]
    assert [r["banned"] for r in restarts] == [evil.peer_id], (restarts, v)
    assert evil.peer_id in {b["peer"] for b in v["banned"]}
    assert v["first_failure_token"] is not None and v["first_failure_token"] < BOUND, v
    # The final tokens are the honest computation's, on the final route.
    assert evil.peer_id not in {s["peer_id"] for s in summary["stages"]}
    expected = local_tokens(tiny, tmp_path / "store", summary["stages"], BOUND + 8)
    assert summary["tokens"] == expected

    # Banned: the link is gone and stays gone; its reconnection attempts are refused.
    info = await local_mesh.get(coord, "/v1/info")
    assert evil.peer_id in info["banned"]

    async def refused() -> bool:
        i = await local_mesh.get(coord, "/v1/info")
        return i["counters"]["banned_refused"] > 0

    await wait_for(refused, timeout=30, what="the banned peer's records to be refused")
    assert evil.peer_id not in await local_mesh.connected_ids(coord)
    # A later generation, without spot checks, never routes through it.
    later = {k: v for k, v in body.items() if k != "split"}  # two peers are left
    again = (await collect(local_mesh, coord, dict(later, verify=0, max_tokens=4)))[-1]
    assert evil.peer_id not in {s["peer_id"] for s in again["stages"]}
    assert {h.peer_id for h in honest} >= {s["peer_id"] for s in again["stages"]}


async def test_honest_route_passes_every_check(
    local_mesh: LocalMesh, tiny: Path, tmp_path: Path
) -> None:
    nodes = await local_mesh.start_nodes([f"n{i}" for i in range(3)])
    await local_mesh.wait_connected(timeout=30)
    await local_mesh.post(nodes[0], "/v1/models", {"path": str(tiny), "name": "tiny"})
    body = {"model": "tiny", "tokens": PROMPT, "max_tokens": 8, "split": 3, "verify": 1.0}
    events = await collect(local_mesh, nodes[0], body)
    summary = events[-1]
    v = summary["verification"]
    assert not [e for e in events if e.get("restart")]
    # Every stage step not run by the coordinator itself was recomputed elsewhere and agreed.
    remote = sum(1 for s in summary["stages"] if s["peer_id"] != nodes[0].peer_id)
    assert v["checks"] == 8 * remote and v["passed"] == v["checks"], v
    assert v["failed"] == 0 and not v["banned"] and not v["unchecked"], v
    assert v["max_error"] < 0.01, v
    assert summary["tokens"] == local_tokens(tiny, tmp_path / "store", summary["stages"], 8)


async def test_a_lone_verifier_cannot_get_a_peer_banned(local_mesh: LocalMesh, tiny: Path) -> None:
    """Two peers can run stages and the coordinator cannot check them itself: when they
    disagree, there is no second opinion. Neither is banned; both leave the generation, which
    then has no route and fails cleanly instead of returning unchecked tokens."""
    coord = await local_mesh.start_node("coord", ["--memory-limit", "1M"])
    honest = await local_mesh.start_node("h0")
    evil = await local_mesh.start_node("evil", module="tests.fixtures.evil_node")
    await local_mesh.wait_connected(timeout=30)
    await local_mesh.post(coord, "/v1/models", {"path": str(tiny), "name": "tiny"})
    body = {"model": "tiny", "tokens": PROMPT, "max_tokens": 4, "split": 2, "verify": 1.0}
    assert local_mesh._http is not None
    events = []
    async with local_mesh._http.post(coord.api + "/v1/generate", json=body) as resp:
        async for line in resp.content:
            if line.strip():
                events.append(json.loads(line))
    assert {s["peer_id"] for s in events[0]["route"]} == {honest.peer_id, evil.peer_id}
    assert not [e for e in events if "token" in e]  # the disputed step's token never went out
    error = events[-1].get("error", "")
    assert "disputed by" in error and "no route is left" in error, events[-1]
    info = await local_mesh.get(coord, "/v1/info")
    assert not info["banned"], info["banned"]
    assert {honest.peer_id, evil.peer_id} <= set(await local_mesh.connected_ids(coord))
