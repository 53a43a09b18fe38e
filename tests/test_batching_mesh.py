"""Continuous batching through a 3-stage route of real node processes.

Eight greedy generations at once through one route give exactly the tokens each gives alone,
while two more join half way and one is cancelled; the stages really batched (their
``batching`` counts show calls holding several sessions' steps).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.launch.localmesh import wait_for
from runtimes.testmodels import write_test_model

pytestmark = pytest.mark.network
N_TOKENS = 20
EOS = 2  # runtimes.testmodels' EOS token id for these models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("batch") / "llama.gguf", "llama")


def _body(i: int) -> dict[str, Any]:
    prompt = [1 + i, 5, 9 + 3 * i, 40, 77 - i, 100, 3, 8 + i]
    return {"model": "tiny", "tokens": prompt, "max_tokens": N_TOKENS, "split": 3, "temperature": 0}


async def _stream(
    mesh: Any,
    node: Any,
    body: dict[str, Any],
    *,
    started: asyncio.Event | None = None,
    stop_after: int | None = None,
) -> list[int]:
    """The token ids streamed; ``started`` is set at the second token; ``stop_after`` closes
    the stream after that many tokens (the app loses interest)."""
    toks: list[int] = []
    async with mesh._http.post(
        node.api + "/v1/generate", json=body, headers=node.auth_headers()
    ) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not line.strip():
                continue
            ev = json.loads(line)
            assert "error" not in ev, ev
            if "token" in ev:
                toks.append(ev["token"])
                if started is not None and len(toks) == 2:
                    started.set()
                if stop_after is not None and len(toks) >= stop_after:
                    break
            if "tokens" in ev:  # the summary
                assert ev["tokens"] == toks
    return toks


async def test_concurrent_generations_through_one_route_equal_each_alone(local_mesh, tiny):
    nodes = await local_mesh.start_nodes([f"b{i}" for i in range(3)])
    await local_mesh.wait_connected(timeout=20)
    await local_mesh.post(nodes[0], "/v1/models", {"path": str(tiny), "name": "tiny"})
    alone = [await _stream(local_mesh, nodes[0], _body(i)) for i in range(10)]
    # each runs to max_tokens unless the random model's greedy choice is its EOS (token 2)
    assert all(len(t) == N_TOKENS or (len(t) >= 6 and t[-1] == EOS) for t in alone), alone
    assert sum(len(t) == N_TOKENS for t in alone) >= 8
    assert len({tuple(t) for t in alone}) > 1  # the prompts differ in what they give

    before = await _batching(local_mesh, nodes)
    started = [asyncio.Event() for _ in range(8)]
    first = [
        asyncio.ensure_future(
            _stream(
                local_mesh, nodes[0], _body(i), started=started[i], stop_after=6 if i == 5 else None
            )
        )
        for i in range(8)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
    joiners = [asyncio.ensure_future(_stream(local_mesh, nodes[0], _body(i))) for i in (8, 9)]
    got = await asyncio.wait_for(asyncio.gather(*first, *joiners), 300)
    for i, toks in enumerate(got):
        if i == 5:  # cancelled after 6 tokens: those were its own
            assert toks == alone[5][:6]
        else:
            assert toks == alone[i], f"generation {i} changed when batched"

    after = await _batching(local_mesh, nodes)
    calls = after["batches"] - before["batches"]
    steps = after["steps"] - before["steps"]
    # every stage ran 10 prompts + ~190 decode steps, some of them several in one call (how
    # many depends on how often steps queue: on this tiny model the RPCs cost more than the
    # compute; bench_concurrency.py measures the gain on Gemma)
    assert steps >= 3 * (9 * N_TOKENS)
    assert calls < steps and after["largest"] >= 3, (calls, steps, after)

    async def all_free() -> bool:
        for n in nodes:
            if (await local_mesh.get(n, "/v1/info"))["compute"]["sessions"]:
                return False
        return True

    await wait_for(all_free, 15, "every stage to free its sessions")


async def _batching(mesh: Any, nodes: list[Any]) -> dict[str, int]:
    total = {"batches": 0, "steps": 0, "largest": 0}
    for n in nodes:
        for sh in (await mesh.get(n, "/v1/info"))["compute"]["shards"]:
            total["batches"] += sh["batching"]["batches"]
            total["steps"] += sh["batching"]["steps"]
            total["largest"] = max(total["largest"], sh["batching"]["largest"])
    return total
