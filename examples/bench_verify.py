"""Spot checks: how soon a lying stage is caught, and what checking costs an honest route.

Node processes on loopback, a generated tiny llama model. (1) Split in three stages, one run
by a node that
perturbs every output it computes (tests/fixtures/evil_node.py) is put on the route; for each
of ``--trials`` generations with a fresh secret seed, the token at which it was banned. (2) An
honest route's decode tokens/s with spot checks off (the baseline, same run), at the given
rate and at rate 1.

Writes docs/bench/verify.json and the "Spot checks" section of docs/benchmarks.md
(``--no-docs``: neither).

    python examples/bench_verify.py [--rate 0.25] [--trials 8] [--max-tokens 32] [--gemma]
                                    [--no-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import docs_dir, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.launch.localmesh import LocalMesh  # noqa: E402
from runtimes.testmodels import write_test_model  # noqa: E402

PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7]


async def generate(mesh: LocalMesh, node: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    assert mesh._http is not None
    async with mesh._http.post(node.api + "/v1/generate", json=body) as resp:
        events = [json.loads(line) async for line in resp.content if line.strip()]
    if "error" in events[-1]:
        raise RuntimeError(events[-1]["error"])
    return events


async def catch_trials(model: Path, work: Path, rate: float, trials: int, n: int) -> list[int]:
    caught = []
    for t in range(trials):
        async with LocalMesh(work / f"evil{t}") as mesh:
            coord = await mesh.start_node("coord", ["--memory-limit", "1M"])
            for i in range(2):
                await mesh.start_node(f"h{i}")
            evil = await mesh.start_node("evil", module="tests.fixtures.evil_node")
            await mesh.wait_connected(timeout=60)
            await mesh.post(coord, "/v1/models", {"path": str(model), "name": "tiny"})
            # Three capable peers and three stages: the liar is always on the route.
            body = {"model": "tiny", "tokens": PROMPT, "max_tokens": n, "split": 3, "verify": rate}
            events = await generate(mesh, coord, body)
            v = events[-1]["verification"]
            on_route = evil.peer_id in {s["peer_id"] for s in events[0]["route"]}
            if on_route and v["first_failure_token"] is not None:
                caught.append(int(v["first_failure_token"]))
            elif on_route:
                caught.append(n)  # escaped all n tokens
    return caught


async def overhead(model: Path, work: Path, rate: float, n: int) -> dict[str, float]:
    out = {}
    async with LocalMesh(work / "honest") as mesh:
        nodes = await mesh.start_nodes([f"n{i}" for i in range(3)])
        await mesh.wait_connected(timeout=60)
        await mesh.post(nodes[0], "/v1/models", {"path": str(model), "name": "m"})
        body = {"model": "m", "tokens": PROMPT, "max_tokens": n, "split": 2}
        await generate(mesh, nodes[0], dict(body, max_tokens=2))  # warm-up: pulls, loads
        for r in (0.0, rate, 1.0):
            runs = [(await generate(mesh, nodes[0], dict(body, verify=r)))[-1] for _ in range(3)]
            # end to end (checks included), not the summary's decode rate (steps only)
            out[str(r)] = round(statistics.median(len(x["tokens"]) / x["total_s"] for x in runs), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument(
        "--gemma", action="store_true", help="measure the cost on Gemma 3 270M (the real model)"
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_test_model(work / "llama.gguf", "llama")
        caught = asyncio.run(catch_trials(model, work, args.rate, args.trials, args.max_tokens))
        if args.gemma:
            from runtimes.models import gemma3_270m_path

            model = gemma3_270m_path()
        speed = asyncio.run(overhead(model, work, args.rate, args.max_tokens))
    result = {
        "machine": machine(),
        "rate": args.rate,
        "cost_model": "gemma3-270m" if args.gemma else "tiny",
        "caught_at_token": caught,
        "escaped": sum(1 for c in caught if c >= args.max_tokens),
        "tokens_per_s": speed,
    }
    base = speed["0.0"]
    rows = [[f"{r}", tps, round(tps / base, 2)] for r, tps in speed.items()]
    table = markdown_table(["spot-check rate", "tokens/s end to end", "x no checks"], rows)
    text = (
        f"Tiny generated llama on loopback ({result['machine']}). A stage of a 3-stage route "
        "that lies on every output (30 % noise on activations; as the last stage, an arbitrary "
        f"token made the best) is banned at token {sorted(caught)} over {len(caught)} trials "
        f"at rate {args.rate} (expected 1/rate = {1 / args.rate:.0f} per stage; the chance to "
        "escape n tokens is (1-rate)^n; the liar also lies when asked to verify, which gets it "
        "caught sooner). "
        f"Honest 2-stage route ({'Gemma 3 270M' if args.gemma else 'the same tiny model'}), "
        "generation speed (checks included) against no checks, "
        "same run:\n\n" + table
    )
    if not args.no_docs:
        write_json(docs_dir() / "bench" / "verify.json", result)
        update_benchmarks_md("Spot checks (examples/bench_verify.py)", text)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
