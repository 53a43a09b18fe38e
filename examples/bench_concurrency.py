"""Many users at once: aggregate decode tokens/s for 1, 4 and 16 concurrent streams.

One run measures, on this machine:
- llama.cpp's own batched throughput (llama-cpp-python's low-level API: one context with 16
  sequences, every stream's next token in one ``llama_decode``) on the same GGUF: the baseline;
- a one-peer mesh (the whole model on one node) with 1, 4 and 16 concurrent greedy
  generations through its API;
- a 3-peer mesh (memory limits that force a 3-stage route, as ``edgemesh demo`` sets them)
  with the same streams: the stages batch the steps queued together and work on different
  streams' steps at the same time (pipelining).

Aggregate tokens/s = all streams' generated tokens / wall time from the first request to the
last token (prompt prefill included, on both sides). Every stream's tokens are compared with
the same prompt generated alone on one peer.

Writes docs/bench/concurrency.json and the "Concurrent streams" section of docs/benchmarks.md.

    python examples/bench_concurrency.py [--model PATH] [--streams 1,4,16] [--max-tokens N]
                                         [--peers 1,3] [--no-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import docs_dir, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.cli.demo import demo_memory_limit  # noqa: E402
from mesh.client import MeshClient  # noqa: E402
from mesh.launch.localmesh import LocalMesh, NodeProcess  # noqa: E402

SECTION = "Concurrent streams (examples/bench_concurrency.py)"
TOPICS = [
    "the river and the old mill",
    "a recipe for bread with seeds",
    "how a bicycle gear works",
    "the first winter on the island",
    "why the sky looks blue",
    "a letter to a distant friend",
    "the rules of a card game",
    "a short history of maps",
    "what bees do in spring",
    "a train journey through mountains",
    "how to plant tomatoes",
    "the lighthouse keeper's night",
    "a market on a Saturday morning",
    "the sound of rain on a roof",
    "building a small wooden boat",
    "a walk through an old library",
]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def prompt_tokens(model: Path, n: int) -> list[list[int]]:
    from runtimes.tokenizer import Tokenizer

    tok = Tokenizer(model)
    return [tok.encode(f"Write a few sentences about {TOPICS[i % len(TOPICS)]}.") for i in range(n)]


async def _one(node: NodeProcess, tokens: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    async with MeshClient(node.api, token=node.token) as client:
        async for event in client.stream(
            "bench-model", tokens=tokens, max_tokens=max_tokens, temperature=0.0
        ):
            if "token" in event:
                out.append(int(event["token"]))
    return out


def _run(outputs: list[list[int]], streams: int, wall: float) -> dict[str, Any]:
    n = sum(len(t) for t in outputs)
    return {
        "streams": streams,
        "tokens": n,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(n / wall, 2),
        "outputs": outputs,
    }


async def mesh_runs(
    peers: int, model: Path, base: Path, prompts: list[list[int]], opts: argparse.Namespace
) -> dict[str, Any]:
    args = ["--runtime", "onnx", "--threads", str(opts.threads)]
    if peers > 1:
        args += ["--memory-limit", str(demo_memory_limit(model, peers))]
    mdns = "127.0.0.1" if peers > 1 else None
    runs: dict[str, Any] = {}
    async with LocalMesh(base / f"peers{peers}", mdns_interface=mdns) as mesh:
        for i in range(peers):
            await mesh.start_node(f"c{peers}-{i}", args if peers > 1 else ["--no-mdns", *args])
        if peers > 1:
            await mesh.wait_connected(opts.timeout)
        first = mesh.nodes[0]
        await mesh.post(first, "/v1/models", {"path": str(model), "name": "bench-model"})
        await _one(first, prompts[0], 2)  # route, pulls, loading
        alone = None
        if peers == 1:
            say("  each prompt alone (the tokens every run is checked against)")
            alone = [await _one(first, p, opts.max_tokens) for p in prompts[: max(opts.streams)]]
        for s in opts.streams:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(_one(first, p, opts.max_tokens) for p in prompts[:s]))
            runs[str(s)] = _run(list(got), s, time.perf_counter() - t0)
            say(f"  {peers} peer(s), {s} streams: {runs[str(s)]['tokens_per_s']} tok/s")
        info = [await mesh.get(nd, "/v1/info") for nd in mesh.nodes]
    shards = [dict(sh, node=i["name"]) for i in info for sh in i["compute"]["shards"]]
    shards.sort(key=lambda sh: sh["units"][0])  # route order
    return {
        "peers": peers,
        "runs": runs,
        "alone": alone,
        "stages": len(shards),
        # per stage, in route order: its node, its units, its engine calls and their steps
        "batching": [dict(sh["batching"], node=sh["node"], units=sh["units"]) for sh in shards],
    }


def _decode_all(
    lc: Any, ctx: Any, batch: Any, n_vocab: int, feed: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """Greedy tokens of every sequence, all sequences' next rows in one llama_decode."""
    toks: list[list[int]] = [[] for _ in feed]
    pos = [0] * len(feed)
    for _ in range(max_tokens):
        batch.n_tokens = 0
        last: list[int] = []
        for j, rows in enumerate(feed):
            for k, t in enumerate(rows):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos[j] + k, 1
                batch.seq_id[i][0] = j
                batch.logits[i] = k == len(rows) - 1
                batch.n_tokens += 1
            pos[j] += len(rows)
            last.append(batch.n_tokens - 1)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        for j, i in enumerate(last):
            ptr = ctypes.cast(lc.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float))
            toks[j].append(int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax()))
            feed[j] = [toks[j][-1]]
    return toks


def llamacpp_runs(
    model: Path, prompts: list[list[int]], streams: list[int], max_tokens: int, threads: int
) -> dict[str, Any]:
    """llama.cpp's batched decoding: every stream's next token in one llama_decode."""
    import llama_cpp as lc

    lc.llama_backend_init()
    model_p = lc.llama_model_load_from_file(str(model).encode(), lc.llama_model_default_params())
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model_p))
    out: dict[str, Any] = {}
    for s in streams:
        cp = lc.llama_context_default_params()
        cp.n_ctx = max(512, s * (max(len(p) for p in prompts[:s]) + max_tokens + 8))
        cp.n_batch = max(512, sum(len(p) for p in prompts[:s]))
        cp.n_ubatch = 512
        cp.n_seq_max = s
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        ctx = lc.llama_init_from_model(model_p, cp)
        batch = lc.llama_batch_init(cp.n_batch, 0, s)
        # warm-up (graph allocation, the weights' first page faults), as the mesh's is
        _decode_all(lc, ctx, batch, n_vocab, [list(p) for p in prompts[:s]], 4)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        toks = _decode_all(lc, ctx, batch, n_vocab, [list(p) for p in prompts[:s]], max_tokens)
        out[str(s)] = _run(toks, s, time.perf_counter() - t0)
        say(f"  llama.cpp, {s} streams: {out[str(s)]['tokens_per_s']} tok/s")
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    lc.llama_model_free(model_p)
    return out


def _same(outputs: list[list[int]], alone: list[list[int]]) -> int:
    return sum(1 for a, b in zip(outputs, alone, strict=False) if a == b)


def report(result: dict[str, Any]) -> str:
    streams = result["streams"]
    top = str(streams[-1])
    base = result["llamacpp"]
    one = result["mesh"].get("1")
    alone = one["alone"] if one else None
    head = ["streams", "llama.cpp tok/s"]
    for p in result["peers"]:
        head += [f"{p} peer{'s' if p > 1 else ''} tok/s", "x llama.cpp", "same tokens as alone"]
    rows = []
    for s in streams:
        row: list[Any] = [s, base[str(s)]["tokens_per_s"]]
        for p in result["peers"]:
            m = result["mesh"][str(p)]["runs"][str(s)]
            row.append(m["tokens_per_s"])
            row.append(round(m["tokens_per_s"] / base[str(s)]["tokens_per_s"], 2))
            row.append(f"{_same(m['outputs'], alone)}/{s}" if alone else "-")
        rows.append(row)
    lines = [
        f"Measured {result['date']} on {result['machine']}; Gemma 3 270M Q4_K_M, greedy, "
        f"{result['max_tokens']} tokens per stream, {result['threads']} threads per node and "
        "for llama.cpp. Aggregate tokens/s over all streams, prefill included."
    ]
    for p in result["peers"]:
        r = result["mesh"][str(p)]["runs"]
        if "1" in r:
            gain = r[top]["tokens_per_s"] / r["1"]["tokens_per_s"]
            lines.append(f"- {p} peer(s): {top} streams give {gain:.2f}x one stream's tokens/s.")
    llama_gain = base[top]["tokens_per_s"] / base["1"]["tokens_per_s"] if "1" in base else None
    if llama_gain:
        lines.append(f"- llama.cpp: {top} streams give {llama_gain:.2f}x one stream's tokens/s.")
    if "1" in result["mesh"] and "3" in result["mesh"]:
        a = result["mesh"]["3"]["runs"][top]["tokens_per_s"]
        b = result["mesh"]["1"]["runs"][top]["tokens_per_s"]
        lines.append(f"- The 3-peer pipeline at {top} streams: {a / b:.2f}x one peer's figure.")
    return markdown_table(head, rows) + "\n\n" + "\n".join(lines)


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    from runtimes.models import gemma3_270m_path

    model = Path(opts.model) if opts.model else gemma3_270m_path()
    prompts = prompt_tokens(model, max(opts.streams))
    result: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "streams": opts.streams,
        "peers": opts.peers,
        "max_tokens": opts.max_tokens,
        "threads": opts.threads,
        "mesh": {},
    }
    say("llama.cpp batched baseline")
    result["llamacpp"] = await asyncio.to_thread(
        llamacpp_runs, model, prompts, opts.streams, opts.max_tokens, opts.threads
    )
    with tempfile.TemporaryDirectory(prefix="bench-conc-") as tmp:
        for p in opts.peers:
            say(f"mesh of {p} peer(s)")
            result["mesh"][str(p)] = await mesh_runs(p, model, Path(tmp), prompts, opts)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--peers", default="1,3")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--no-docs", action="store_true")
    opts = ap.parse_args()
    opts.streams = [int(x) for x in opts.streams.split(",")]
    opts.peers = [int(x) for x in opts.peers.split(",")]
    result = asyncio.run(main_async(opts))
    text = report(result)
    print(text)
    if not opts.no_docs:
        write_json(docs_dir() / "bench" / "concurrency.json", result)
        update_benchmarks_md(SECTION, text)


if __name__ == "__main__":
    main()
