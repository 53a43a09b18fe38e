"""What a pipeline's waits cost a stage: each stage's decode step back to back, and with the
wait it has in a pipeline between its steps (the other stages' time), in one process.

In a route of three stages a stage works about a third of each token and waits the rest.
On this machine a stage's step after such a wait is slower than the same step run back to
back (caches and the cores' state after idle), and the 3-peer decode pays that on every
stage. This script measures it without any network: the split of ``make demo`` by default,
each stage loaded alone (as a node holds only its own), onnx with the threads a node uses,
single-token steps after a short prompt; and all the units as one stage, back to back (one
peer).

    python examples/bench_stage_idle.py [--model PATH] [--bounds 0,2,18,20] [--steps 60]
                                        [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtimes.base import Runtime, load_runtime  # noqa: E402
from runtimes.models import gemma3_270m_path  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402

PROMPT_ROWS = 8


def steps_ms(rt: Runtime, steps: int, gap_s: float, rng: np.random.Generator) -> float:
    """Median ms of ``steps`` single-row steps on a fresh session, ``gap_s`` asleep between."""
    spec = rt.shard
    session = rt.open_session(PROMPT_ROWS + steps + 1)

    def rows(n: int) -> Any:
        if spec.is_first:
            return rng.integers(1, spec.config.vocab_size, size=n, dtype=np.int64)
        return rng.standard_normal((n, spec.config.d_model)).astype(np.float32)

    rt.forward(session, rows(PROMPT_ROWS))
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rt.forward(session, rows(1))
        out.append((time.perf_counter() - t0) * 1000)
        if gap_s:
            time.sleep(gap_s)
    rt.close_session(session)
    return float(statistics.median(out[min(5, steps - 1) :]))


def _stage_ms(model: Path, units: tuple[int, int], threads: int, steps: int, gap_s: float) -> float:
    """One stage loaded alone (as a node holds only its own), timed, and closed."""
    rt = load_runtime("onnx", ShardSpec.open(model, *units), threads=threads, spin=False)
    try:
        return steps_ms(rt, steps, gap_s, np.random.default_rng(0))
    finally:
        rt.close()


def measure(model: Path, bounds: list[int], steps: int, threads: int) -> dict[str, Any]:
    ranges = list(zip(bounds, bounds[1:], strict=False))
    alone = [_stage_ms(model, r, threads, steps, 0.0) for r in ranges]
    waited = [
        _stage_ms(model, r, threads, steps, (sum(alone) - ms) / 1000)
        for r, ms in zip(ranges, alone, strict=True)
    ]
    whole = _stage_ms(model, (bounds[0], bounds[-1]), threads, steps, 0.0)
    stages = [
        {"units": [s, e], "back_to_back_ms": round(a, 3), "after_wait_ms": round(w, 3),
         "wait_ms": round(sum(alone) - a, 3), "ratio": round(w / a, 3)}
        for s, e, a, w in zip(bounds, bounds[1:], alone, waited, strict=False)
    ]  # fmt: skip
    return {
        "model": model.name,
        "threads": threads,
        "steps": steps,
        "stages": stages,
        "sum_back_to_back_ms": round(sum(alone), 3),
        "sum_after_wait_ms": round(sum(waited), 3),
        "whole_back_to_back_ms": round(whole, 3),  # the same units as one stage (one peer)
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| units | back to back (ms) | after the pipeline's wait (ms) | wait (ms) | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in result["stages"]:
        lines.append(
            f"| [{s['units'][0]}, {s['units'][1]}) | {s['back_to_back_ms']:.2f} | "
            f"{s['after_wait_ms']:.2f} | {s['wait_ms']:.1f} | {s['ratio']:.2f} |"
        )
    a, w = result["sum_back_to_back_ms"], result["sum_after_wait_ms"]
    lines.append(f"| sum | {a:.2f} | {w:.2f} | | {w / a:.2f} |")
    lines.append(f"| all units as one stage | {result['whole_back_to_back_ms']:.2f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: Gemma 3 270M)")
    ap.add_argument("--bounds", default="0,2,18,20", help="unit bounds of the stages")
    ap.add_argument("--steps", type=int, default=60, help="decode steps per stage and mode")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads per stage")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    bounds = [int(b) for b in args.bounds.split(",")]
    if len(bounds) < 2 or bounds != sorted(set(bounds)) or args.steps < 2:
        ap.error("--bounds needs two or more increasing units; --steps at least 2")
    result = measure(args.model or gemma3_270m_path(), bounds, args.steps, args.threads)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
