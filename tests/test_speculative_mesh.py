"""Speculative decoding across real node processes (issue 16, scope 3): onnx stages in their
own processes on loopback, verify steps and rollbacks over real links, spot checks with real
signatures, a stage SIGKILLed mid-generation, and Gemma 3 270M.

Each test compares the speculative run with the plain run of the same request on the same
mesh (and the tiny model's with the onnx runtime run locally, like tests/test_verification).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess
from runtimes.onnx_rt import OnnxRuntime
from runtimes.oracle import Chain, greedy_continuation
from runtimes.shards import ShardStore
from runtimes.testmodels import write_test_model
from tests.test_faults import generate, sessions_freed, start_route_mesh

pytestmark = pytest.mark.network
ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

# Repetitive, as the prompts speculation is for: the lookups find earlier n-grams.
PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 1, 5, 9, 40, 77, 100, 3, 8, 1, 5, 9, 40]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("specmesh") / "llama.gguf", "llama")


def local_tokens(path: Path, store_dir: Path, stages: list[dict[str, Any]], n: int) -> list[int]:
    store = ShardStore(store_dir)
    manifest = store.add_model(path)
    runtimes = [OnnxRuntime(store.open_range(manifest, *s["units"])) for s in stages]
    return greedy_continuation(Chain(runtimes), PROMPT, n, max_tokens=64)[0]


def tokens_of(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["token"]) for e in events if "token" in e]


async def test_three_stage_route_gives_the_plain_tokens(
    local_mesh: LocalMesh, tiny: Path, tmp_path: Path
) -> None:
    """Greedy and sampled (one seed), with and without spot checks on every step: the
    speculative run's tokens are the plain run's, and greedy ones are the local chain's."""
    nodes = await local_mesh.start_nodes([f"s{i}" for i in range(3)])
    await local_mesh.wait_connected(timeout=30)
    await local_mesh.post(nodes[0], "/v1/models", {"path": str(tiny), "name": "tiny"})
    body: dict[str, Any] = {"model": "tiny", "tokens": PROMPT, "max_tokens": 24, "split": 3}
    plain = (await generate(local_mesh, nodes[0], body))[-1]
    events = await generate(local_mesh, nodes[0], dict(body, speculative=5))
    spec = events[-1]
    assert len({s["peer_id"] for s in spec["stages"]}) == 3
    assert spec["tokens"] == plain["tokens"] == tokens_of(events)
    assert spec["tokens"] == local_tokens(tiny, tmp_path / "store", spec["stages"], 24)
    s = spec["speculative"]
    assert s["verify_steps"] > 0 and s["accepted"] > 0, s
    assert spec["decode_steps"] < plain["decode_steps"]
    log.warning("SPEC tiny 3 stages: %s, %d steps vs %d", s, spec["steps"], plain["steps"])

    # top logits with speculation: each token's from its own row (the rounding note below)
    plain_events = await generate(local_mesh, nodes[0], dict(body, top=4))
    plain_top = [e["top"] for e in plain_events if "token" in e]
    events = await generate(local_mesh, nodes[0], dict(body, top=4, speculative=5))
    assert events[-1]["speculative"]["accepted"] > 0
    spec_top = [e["top"] for e in events[:-1] if "token" in e]
    assert len(spec_top) == len(plain_top) == 24
    gaps = [
        max(abs(x[1] - y[1]) for x, y in zip(p, q, strict=True))
        for p, q in zip(plain_top, spec_top, strict=True)
    ]
    assert max(gaps) < 0.25 and sum(g < 1e-4 for g in gaps) >= 12, gaps
    assert all(
        [x[0] for x in p] == [y[0] for y in q]
        for p, q, g in zip(plain_top, spec_top, gaps, strict=True)
        if g < 1e-4
    )

    sampled = dict(body, temperature=0.9, top_k=20, seed=77)
    plain_s = (await generate(local_mesh, nodes[0], sampled))[-1]
    spec_s = (await generate(local_mesh, nodes[0], dict(sampled, speculative=True)))[-1]
    again = (await generate(local_mesh, nodes[0], dict(sampled, speculative=True)))[-1]
    assert spec_s["text"] == again["text"] == plain_s["text"]
    assert spec_s["tokens"] == plain_s["tokens"]

    # the OpenAI API, speculative in the SDK's extra_body
    import openai

    client = openai.AsyncOpenAI(base_url=nodes[0].api + "/v1", api_key=nodes[0].token)
    kw: dict[str, Any] = {"model": "tiny", "prompt": "ab ab ab ab ab", "max_tokens": 16}
    kw["temperature"] = 0
    extra = {"split": 3}
    plain_c = await client.completions.create(**kw, extra_body=extra)
    spec_c = await client.completions.create(**kw, extra_body=dict(extra, speculative=True))
    assert spec_c.choices[0].text == plain_c.choices[0].text
    with pytest.raises(openai.BadRequestError, match="speculative"):
        await client.completions.create(**kw, extra_body=dict(extra, speculative="fast"))
    # logprobs with speculation: each token's from its own row of the verify step
    plain_lp = await client.completions.create(**kw, logprobs=2, extra_body=extra)
    spec_lp = await client.completions.create(
        **kw, logprobs=2, extra_body=dict(extra, speculative=4)
    )
    a, b = plain_lp.choices[0].logprobs, spec_lp.choices[0].logprobs
    assert a is not None and b is not None and a.token_logprobs and b.token_logprobs
    assert b.tokens == a.tokens and len(b.tokens) == 16
    # A verify step's rows run through attention as one chunk, a plain step's row alone:
    # they round differently in the last bits, which an int8 activation code can turn into
    # ~0.1 on a later logit (measured on this model, chunked or not, rollback or not). A row
    # off by one would be off by whole units.
    diff = np.abs(np.subtract(b.token_logprobs, a.token_logprobs))
    assert diff.max() < 0.25, diff
    same = diff < 1e-4
    assert same.sum() >= len(diff) // 2, diff
    assert b.top_logprobs is not None and a.top_logprobs is not None
    for i in np.flatnonzero(same):
        assert b.top_logprobs[i].keys() == a.top_logprobs[i].keys()
    await client.close()

    # every stage step recomputed elsewhere (verify steps, then the rollbacks' audit logs)
    checked = await generate(local_mesh, nodes[0], dict(body, speculative=5, verify=1.0))
    summary = checked[-1]
    v = summary["verification"]
    assert not [e for e in checked if e.get("restart")]
    assert v["checks"] > 0 and v["passed"] == v["checks"] and not v["banned"], v
    assert not v["unchecked"], v
    assert summary["tokens"] == plain["tokens"]
    assert summary["speculative"]["verify_steps"] > 0


async def test_a_lie_on_a_verify_steps_inner_row_is_caught(
    local_mesh: LocalMesh, tiny: Path, tmp_path: Path
) -> None:
    """A stage that lies only about a verify step's first row (as the last stage: the token
    after it; earlier: its activations), never about the last row: the check of every row
    catches it before the token is released, the two other stages (its verifiers) agree,
    it is banned, and the generation restarts to the honest tokens."""
    coord = await local_mesh.start_node("coord", ["--memory-limit", "1M"])  # runs no stage
    for i in range(2):
        await local_mesh.start_node(f"honest{i}")
    liar = await local_mesh.start_node("liar", module="tests.fixtures.spec_liar_node")
    await local_mesh.wait_connected(timeout=30)
    await local_mesh.post(coord, "/v1/models", {"path": str(tiny), "name": "tiny"})
    body: dict[str, Any] = {"model": "tiny", "tokens": PROMPT, "max_tokens": 16, "split": 3}
    body.update(speculative=5, verify=1.0, verify_seed=1)
    events = await generate(local_mesh, coord, body)
    assert liar.peer_id in {s["peer_id"] for s in events[0]["route"]}  # all three run stages
    restarts = [e for e in events if e.get("restart")]
    assert [r["banned"] for r in restarts] == [liar.peer_id], restarts
    summary = events[-1]
    assert liar.peer_id not in {s["peer_id"] for s in summary["stages"]}
    n = 16
    assert summary["tokens"] == local_tokens(tiny, tmp_path / "store", summary["stages"], n)


async def test_stage_killed_mid_speculation_same_tokens(tmp_path: Path, tiny: Path) -> None:
    """The middle stage SIGKILLed after 6 tokens of a speculative generation: its layers are
    re-routed, the history (verify steps with their rollbacks) replayed, and the tokens are
    the fault-free plain run's."""
    async with LocalMesh(tmp_path / "mesh", module="tests.fixtures.fault_node") as mesh:
        nodes = await start_route_mesh(mesh, tiny)
        body: dict[str, Any] = {"model": "tiny", "tokens": PROMPT, "max_tokens": 24, "split": 3}
        clean = (await generate(mesh, nodes[0], body))[-1]
        by_id = {n.peer_id: n for n in nodes}
        route: list[str] = []
        killed: list[NodeProcess] = []
        seen = [0]

        def fault(event: dict[str, Any]) -> None:
            if "route" in event and not route:
                route[:] = [s["peer_id"] for s in event["route"]]
                assert route[1] != nodes[0].peer_id, "the coordinator must not be the victim"
            seen[0] += "token" in event
            if seen[0] >= 6 and not killed:
                killed.append(by_id[route[1]])
                mesh.kill(killed[0], signal.SIGKILL)

        events = await generate(mesh, nodes[0], dict(body, speculative=5), fault)
        summary = events[-1]
        assert killed, "the fault was never injected"
        assert summary["tokens"] == clean["tokens"] == tokens_of(events)
        assert [r["failed"] for r in summary["reroutes"]] == [killed[0].peer_id]
        assert summary["reroutes"][0]["after_tokens"] >= 6
        assert summary["speculative"]["verify_steps"] > 0
        await sessions_freed(mesh, [n for n in nodes if n is not killed[0]])


GEMMA_PROMPT = (
    "Repeat the list exactly.\n"
    "apples, pears, plums, cherries, grapes, lemons, limes, figs, dates, melons\n"
    "apples, pears, plums, cherries, grapes, lemons, limes, figs, dates, melons\n"
    "apples, pears, plums,"
)


async def test_gemma_two_stages_gives_the_plain_tokens(local_mesh: LocalMesh) -> None:
    """Gemma 3 270M (Q4_K_M) split over two node processes: the speculative greedy run gives
    the plain run's tokens, and most drafts of the repeated list are kept."""
    from runtimes.models import gemma3_270m_path

    try:
        gemma = gemma3_270m_path()
    except Exception as exc:  # the package is an optional extra
        pytest.skip(f"no Gemma 3 270M: {exc}")
    nodes = await local_mesh.start_nodes([f"g{i}" for i in range(2)], ["--threads", "1"])
    await local_mesh.wait_connected(timeout=30)
    await local_mesh.post(nodes[0], "/v1/models", {"path": str(gemma), "name": "gemma"})
    body: dict[str, Any] = {"model": "gemma", "prompt": GEMMA_PROMPT, "max_tokens": 32}
    body["split"] = 2
    plain = (await generate(local_mesh, nodes[0], body))[-1]
    spec = (await generate(local_mesh, nodes[0], dict(body, speculative=6)))[-1]
    assert len({s["peer_id"] for s in spec["stages"]}) == 2
    assert spec["tokens"] == plain["tokens"]
    assert spec["text"] == plain["text"]
    s = spec["speculative"]
    assert s["accepted"] >= len(spec["tokens"]) // 3, s  # the repeated list is drafted
    log.warning("SPEC gemma: %s; %s", s, spec["text"][:80])


async def test_gemma_stage_killed_mid_speculation_same_tokens(tmp_path: Path) -> None:
    """Gemma 3 270M over 3 stages of 4 node processes, speculative: the middle stage
    SIGKILLed after 8 tokens; the replay (verify steps whole, with their rollbacks) gives
    the fault-free plain run's tokens."""
    from runtimes.models import gemma3_270m_path

    try:
        gemma = gemma3_270m_path()
    except Exception as exc:  # the package is an optional extra
        pytest.skip(f"no Gemma 3 270M: {exc}")
    async with LocalMesh(tmp_path / "mesh", module="tests.fixtures.fault_node") as mesh:
        nodes = await mesh.start_nodes([f"f{i}" for i in range(4)], ["--threads", "1"])
        await mesh.wait_connected(timeout=30)
        await mesh.post(nodes[0], "/v1/models", {"path": str(gemma), "name": "gemma"})
        body: dict[str, Any] = {"model": "gemma", "prompt": GEMMA_PROMPT, "max_tokens": 32}
        body["split"] = 3
        clean = (await generate(mesh, nodes[0], body))[-1]
        by_id = {n.peer_id: n for n in nodes}
        route: list[str] = []
        killed: list[NodeProcess] = []
        seen = [0]

        def fault(event: dict[str, Any]) -> None:
            if "route" in event and not route:
                route[:] = [s["peer_id"] for s in event["route"]]
            seen[0] += "token" in event
            if seen[0] >= 8 and not killed and route[1] != nodes[0].peer_id:
                killed.append(by_id[route[1]])
                mesh.kill(killed[0], signal.SIGKILL)

        summary = (await generate(mesh, nodes[0], dict(body, speculative=6), fault))[-1]
        assert killed, "the middle stage was the coordinator: nothing to kill"
        assert summary["tokens"] == clean["tokens"]
        assert [r["failed"] for r in summary["reroutes"]] == [killed[0].peer_id]
        assert summary["speculative"]["accepted"] > 0


async def test_bench_speculative_quick_runs() -> None:
    """examples/bench_speculative.py as a user runs it (--quick: the tiny model, 3 peers):
    it exits 0 only when every speculative run gave the baseline's tokens."""
    import asyncio
    import json
    import sys

    root = ROOT
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(root / "examples" / "bench_speculative.py"),
        "--quick",
        "--json",
        "--drafts",
        "4",
        cwd=root,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out)
    assert [r["draft"] for r in result["runs"]] == [0, 4]
    assert all(r["same_tokens"] and r["tokens"] == 16 for r in result["runs"])
