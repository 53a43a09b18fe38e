"""Where a decode step's time goes: the onnx runtime's layers and head against the bytes they
read and the machine's memory bandwidth, with llama.cpp's whole-model step in the same run.

Issue 14 asks the onnx runtime for 1.2x llama.cpp's decode tokens/s. Whether that is a
matter of bytes (a memory-bound step can only go faster by reading less) or of work per
byte decides what could get there, so this script measures both on the same machine:

- the memory read bandwidth: a float64 sum over 512 MiB, one thread and ``--threads``
  threads (numpy releases the GIL), best of three;
- the onnx runtime's step for its parts, each loaded alone as a node holds it: the
  transformer blocks (every unit between the embedding and the head) and the head unit
  (final norm and the vocabulary projection); the bytes each holds (``onnx_weight_bytes``)
  over its step time is the rate it reads its weights at;
- the whole model's step on onnx and on llama.cpp (llama-cpp-python), same threads.

    python examples/bench_decode_parts.py [--model PATH] [--threads 2] [--steps 60]
                                          [--bandwidth-mib 512] [--json] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.bench_stage_idle import PROMPT_ROWS, steps_ms  # noqa: E402
from examples.benchlib import machine, markdown_table, update_benchmarks_md  # noqa: E402
from runtimes.base import load_runtime  # noqa: E402
from runtimes.models import gemma3_270m_path  # noqa: E402
from runtimes.quant import onnx_weight_bytes  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402

SECTION = "Where a decode step's time goes (examples/bench_decode_parts.py)"


def read_bandwidth(threads: int, mib: int = 512) -> float:
    """GB/s of a float64 sum over ``mib`` MiB split over ``threads`` threads, best of 3."""
    parts = [np.ones((mib << 20) // 8 // threads) for _ in range(threads)]
    for p in parts:
        p.sum()  # every page resident before timing

    def once() -> float:
        workers = [threading.Thread(target=p.sum) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    best = min(once() for _ in range(3))
    return sum(p.nbytes for p in parts) / best / 1e9


def held_bytes(shard: ShardSpec) -> int:
    """The weight bytes the onnx runtime reads a step for this shard: its matrices as
    re-laid out; the embedding table only where it is the (tied) head."""
    c = shard.config
    head = "token_embd.weight" if c.tied_embeddings else "output.weight"
    return sum(
        onnx_weight_bytes(t)
        for name, t in shard.tensors.items()
        if name != "token_embd.weight" or (shard.is_last and name == head)
    )


def _part(model: Path, units: tuple[int, int], runtime: str, threads: int, steps: int) -> float:
    shard = ShardSpec.open(model, *units)
    rt = load_runtime(runtime, shard, threads=threads)
    try:
        return steps_ms(rt, steps, 0.0, np.random.default_rng(0))
    finally:
        rt.close()


def measure(model: Path, threads: int, steps: int, mib: int = 512) -> dict[str, Any]:
    n = ShardSpec.open(model).end
    if n < 3:
        raise ValueError("the model needs an embedding, a block and a head unit")
    parts: list[dict[str, Any]] = []
    for label, units in (("blocks", (1, n - 1)), ("head", (n - 1, n))):
        ms = _part(model, units, "onnx", threads, steps)
        nbytes = held_bytes(ShardSpec.open(model, *units))
        parts.append(
            {"part": label, "units": list(units), "ms": round(ms, 3),
             "mb": round(nbytes / 1e6, 3), "gb_s": round(nbytes / ms / 1e6, 3)}
        )  # fmt: skip
    onnx_ms = _part(model, (0, n), "onnx", threads, steps)
    llama_ms = _part(model, (0, n), "llamacpp", threads, steps)
    return {
        "model": model.name,
        "threads": threads,
        "steps": steps,
        "bandwidth_mib": mib,
        "bandwidth_gb_s": {
            "1": round(read_bandwidth(1, mib), 1),
            str(threads): round(read_bandwidth(threads, mib), 1),
        },
        "parts": parts,
        "onnx_ms": round(onnx_ms, 3),
        "llamacpp_ms": round(llama_ms, 3),
        "onnx_vs_llamacpp": round(llama_ms / onnx_ms, 3),  # tokens/s ratio
        "llamacpp_file_mb": round(model.stat().st_size / 1e6, 1),
    }


def report(r: dict[str, Any]) -> str:
    bw = r["bandwidth_gb_s"][str(r["threads"])]
    rows = [
        [f"onnx {p['part']} [{p['units'][0]}, {p['units'][1]})", p["ms"], p["mb"], p["gb_s"],
         round(p["gb_s"] / bw, 2)]
        for p in r["parts"]
    ]  # fmt: skip
    rows.append(["onnx whole model", r["onnx_ms"], "", "", ""])
    rows.append(["llama.cpp whole model", r["llamacpp_ms"], "", "", ""])
    table = markdown_table(
        ["step", "ms", "weights read (MB)", "GB/s", "of the machine's bandwidth"], rows
    )
    return (
        f"Measured {machine()}; {r['model']}, {r['threads']} threads, median of "
        f"{r['steps']} single-token steps after an {PROMPT_ROWS}-token prompt. Memory read "
        f"bandwidth in the same run (float64 sum over {r['bandwidth_mib']} MiB): "
        f"{r['bandwidth_gb_s']['1']} GB/s on one thread, {bw} GB/s on {r['threads']}."
        f"\n\n{table}\n\n"
        f"onnx / llama.cpp tokens/s: **{r['onnx_vs_llamacpp']}** (the file is "
        f"{r['llamacpp_file_mb']} MB, which llama.cpp reads a step)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2, help="threads per runtime")
    ap.add_argument("--steps", type=int, default=60, help="decode steps per measurement")
    ap.add_argument("--bandwidth-mib", type=int, default=512, help="MiB the bandwidth sum reads")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.threads < 1 or args.bandwidth_mib < 8:
        ap.error("--steps at least 2, --threads at least 1, --bandwidth-mib at least 8")
    try:
        result = measure(
            args.model or gemma3_270m_path(), args.threads, args.steps, args.bandwidth_mib
        )
    except ValueError as exc:
        ap.error(str(exc))
    text = report(result)
    print(json.dumps(result) if args.json else text)
    if not args.no_docs:
        update_benchmarks_md(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
