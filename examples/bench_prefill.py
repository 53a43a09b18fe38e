"""Chunked prefill: time to first token and peak memory of a long prompt, by chunk size.

Two node processes on loopback, Gemma 3 270M Q4_K_M split in two stages (``split`` 2), one
long prompt (``--tokens`` positions), one generated token. For each chunk size the median TTFT
of ``--repeats`` generations and the stages' peak resident memory (VmHWM, fresh nodes per chunk
size) are reported; the baseline is the whole prompt in one step, measured in the same run.

Writes docs/bench/prefill.json and the "Chunked prefill" section of docs/benchmarks.md
(``--no-docs``: neither).

    python examples/bench_prefill.py [--tokens 2048] [--chunks 128,512] [--repeats 3]
                                     [--long 12000] [--no-docs]
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

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import docs_dir, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.launch.localmesh import LocalMesh, NodeProcess  # noqa: E402


def peak_rss_mb(node: NodeProcess) -> float:
    """The process's peak resident set (Linux VmHWM), in MB."""
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def generate(mesh: LocalMesh, node: NodeProcess, body: dict[str, Any]) -> dict[str, Any]:
    assert mesh._http is not None
    timeout = aiohttp.ClientTimeout(total=900)  # long prompts on a slow CPU
    async with mesh._http.post(node.api + "/v1/generate", json=body, timeout=timeout) as resp:
        events = [json.loads(line) async for line in resp.content if line.strip()]
    if "error" in events[-1]:
        raise RuntimeError(events[-1]["error"])
    return events[-1]


async def measure(model: Path, work: Path, prompt: list[int], chunk: int, repeats: int) -> dict:
    async with LocalMesh(work / f"c{chunk}") as mesh:
        nodes = await mesh.start_nodes([f"n{i}" for i in range(2)])
        await mesh.wait_connected(timeout=60)
        await mesh.post(nodes[0], "/v1/models", {"path": str(model), "name": "gemma"})
        body = {"model": "gemma", "tokens": prompt, "max_tokens": 1, "split": 2}
        await generate(mesh, nodes[0], dict(body, tokens=prompt[:8]))  # pulls and loads
        runs = [
            await generate(mesh, nodes[0], dict(body, prefill_chunk=chunk)) for _ in range(repeats)
        ]
        return {
            "chunk": chunk,
            "steps": runs[0]["steps"],
            "ttft_ms": int(statistics.median(r["ttft_ms"] for r in runs)),
            "peak_rss_mb": [round(peak_rss_mb(n)) for n in nodes],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunks", default="128,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", type=int, default=0, help="also one prompt this long, chunk 512")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    from runtimes.models import gemma3_270m_path

    model = gemma3_270m_path()
    prompt = [2] + [(37 * i + 11) % 200_000 + 100 for i in range(args.tokens - 1)]
    sizes = [args.tokens] + [int(c) for c in args.chunks.split(",")]  # baseline first
    long: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        rows = [asyncio.run(measure(model, Path(tmp), prompt, c, args.repeats)) for c in sizes]
        if args.long:
            many = [2] + [(37 * i + 11) % 200_000 + 100 for i in range(args.long - 1)]
            long = asyncio.run(measure(model, Path(tmp), many, 512, 1))
    base = rows[0]
    for r in rows:
        r["ttft_x_one_step"] = round(r["ttft_ms"] / base["ttft_ms"], 2)
        r["peak_rss_x_one_step"] = round(max(r["peak_rss_mb"]) / max(base["peak_rss_mb"]), 2)
    result = {"machine": machine(), "prompt_tokens": args.tokens, "rows": rows, "long": long}
    table = markdown_table(
        ["chunk", "steps", "TTFT ms", "x one step", "peak RSS MB (2 stages)", "x one step"],
        [
            [
                r["chunk"],
                r["steps"],
                r["ttft_ms"],
                r["ttft_x_one_step"],
                " / ".join(map(str, r["peak_rss_mb"])),
                r["peak_rss_x_one_step"],
            ]
            for r in rows
        ],
    )
    text = (
        f"`python examples/bench_prefill.py` ({result['machine']}): Gemma 3 270M Q4_K_M in 2 "
        f"stages on 2 local node processes, a {args.tokens}-token prompt, 1 generated token, "
        f"median TTFT of {args.repeats}; peak RSS (VmHWM) of each node, fresh nodes per row. "
        "The first row is the whole prompt in one step (the baseline, same run).\n\n" + table
    )
    if long is not None:
        text += (
            f"\n\nA {args.long}-token prompt in chunks of 512 ({long['steps']} steps): TTFT "
            f"{long['ttft_ms'] / 1000:.1f} s, peak RSS {' / '.join(map(str, long['peak_rss_mb']))}"
            " MB. The stages' float32 KV caches grow with every position and are held twice "
            "while a step's cache is rebuilt (a float16 cache would halve this; not done)."
        )
    print(text)
    if not args.no_docs:
        write_json(docs_dir() / "bench" / "prefill.json", result)
        update_benchmarks_md("Chunked prefill", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
