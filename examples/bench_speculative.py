"""Speculative decoding: tokens/s with and without it, on 3 peers, repetitive prompts.

Three node processes on loopback, the model split over all three (``"split": 3``). For each
prompt (a code edit: the model rewrites a given function; a summary that quotes a given
text; a repeated list; all completion style, the model continues the text) the same greedy
request runs without speculation (the baseline, measured in the same run) and with
prompt-lookup drafts of each ``--drafts`` length; each configuration ``--repeats`` times
after a warm-up, the median by tokens/s kept. tokens/s is the client's: generated tokens
over the wall time from the first token to the last (the prompt's prefill is left out, it
is the same work either way). Every speculative run must
give the baseline's tokens; the script fails otherwise.

``--delay-ms D`` (the issue's 20 ms one-way delay between peers) needs peers in network
namespaces with delayed links, which the NAT lab provides: the script then imports
``delayed_mesh`` from ``--lab`` (default ``mesh.launch.natlab``), an async context manager
``delayed_mesh(workdir: Path, delay_ms: float) -> LocalMesh`` whose nodes run in namespaces
joined by links with that one-way delay, and runs the same measurements in it. Until that
module exists, ``--delay-ms`` fails with a message saying so (no delay is faked here).

Writes docs/bench/speculative.json and the "Speculative decoding" section of
docs/benchmarks.md (``--no-docs``: neither).

    python examples/bench_speculative.py [--model PATH] [--max-tokens N] [--repeats N]
                                         [--drafts 4,8] [--delay-ms D] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import docs_dir, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.client import MeshClient  # noqa: E402
from mesh.launch.localmesh import LocalMesh, NodeProcess  # noqa: E402

SECTION = "Speculative decoding (examples/bench_speculative.py)"
PEERS = 3

CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
"""
TEXT = (
    "The river town of Aldmere was founded by salt traders in the ninth century. Its market "
    "grew around the old stone bridge, and by the fourteenth century the town had a guild "
    "hall, two mills and a harbour for river barges. A fire in 1642 destroyed most of the "
    "wooden houses near the bridge, and the town was rebuilt in brick."
)
LIST = ", ".join(["apples", "pears", "plums", "cherries", "grapes", "lemons", "limes", "figs"])
Prompt = list[dict[str, str]] | str | list[int]  # chat messages, text or token ids
PROMPTS: dict[str, Prompt] = {
    # completion style: the model continues the text (no chat template needed)
    "code edit": "Original code:\n\n" + CODE + "\nThe same code with the variable subtotal "
    "renamed to net:\n\n",
    "summary quoting the text": f"Text: {TEXT}\n\nThe text again, word for word, followed "
    "by a one-sentence summary:\n\n",
    "repeated list": f"Repeat the list exactly.\n{LIST}\n{LIST}\n{LIST}\n{LIST.split(',')[0]},",
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def generate(node: NodeProcess, body: dict[str, Any]) -> dict[str, Any]:
    """The node's summary, plus the client's tokens/s from the first token to the last."""
    arrivals: list[float] = []
    async with MeshClient(node.api, token=node.token) as client:
        async for event in client.stream(**body):
            if "token" in event:
                arrivals.append(time.perf_counter())
        summary = dict(client.last_summary)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    summary["client_tok_s"] = round((len(arrivals) - 1) / span, 2) if span > 0 else 0.0
    return summary


@contextlib.asynccontextmanager
async def mesh_for(base: Path, opts: argparse.Namespace) -> AsyncIterator[LocalMesh]:
    """Loopback peers, or (``--delay-ms``) the NAT lab's delayed namespaces."""
    if not opts.delay_ms:
        async with LocalMesh(base / "loopback", mdns_interface="127.0.0.1") as mesh:
            yield mesh
        return
    try:
        lab = importlib.import_module(opts.lab)
        delayed = lab.delayed_mesh
    except (ImportError, AttributeError) as exc:
        raise SystemExit(
            f"--delay-ms needs {opts.lab}.delayed_mesh(workdir, delay_ms), the NAT lab's "
            f"delayed namespaces ({exc}); run without --delay-ms for loopback"
        ) from None
    async with delayed(base / f"delay{opts.delay_ms:g}", float(opts.delay_ms)) as mesh:
        yield mesh


def request(name: str, prompt: Prompt, opts: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "bench-model",
        "max_tokens": opts.max_tokens,
        "temperature": 0.0,
        "split": PEERS,
    }
    if isinstance(prompt, str):
        body["prompt"] = prompt
    elif all(isinstance(t, int) for t in prompt):
        body["tokens"] = prompt
    else:
        body["messages"] = prompt
    return body


async def measure(model: Path, base: Path, opts: argparse.Namespace) -> list[dict[str, Any]]:
    node_args = ["--runtime", opts.runtime]
    if opts.threads:
        node_args += ["--threads", str(opts.threads)]
    results = []
    async with mesh_for(base, opts) as mesh:
        for i in range(PEERS):
            await mesh.start_node(f"p{i}", node_args)
        await mesh.wait_connected(opts.timeout)
        first = mesh.nodes[0]
        await mesh.post(first, "/v1/models", {"path": str(model), "name": "bench-model"})
        for name, prompt in opts.prompts.items():
            body = request(name, prompt, opts)
            await generate(first, dict(body, max_tokens=2))  # route, pulls, loading
            configs = [0, *opts.drafts]
            runs: dict[int, list[dict[str, Any]]] = {k: [] for k in configs}
            for _ in range(opts.repeats):  # interleaved: drift on a shared machine hits all
                for k in configs:
                    b = dict(body, speculative=k) if k else body
                    runs[k].append(await generate(first, b))
            base_run = _median(runs[0])
            for k in configs:
                best = _median(runs[k])
                if best["tokens"] != base_run["tokens"]:
                    raise SystemExit(f"{name}: draft {k} changed the tokens: a bug")
                spec = best.get("speculative", {})
                results.append(
                    {
                        "prompt": name,
                        "draft": k,
                        "tokens": len(best["tokens"]),
                        "client_tok_s": best["client_tok_s"],
                        "ratio": round(best["client_tok_s"] / base_run["client_tok_s"], 3),
                        "decode_steps": best["decode_steps"],
                        "acceptance": spec.get("acceptance"),
                        "tokens_per_step": round(
                            (len(best["tokens"]) - 1) / max(best["decode_steps"], 1), 2
                        ),
                        "same_tokens": True,
                        "samples_tok_s": [r["client_tok_s"] for r in runs[k]],
                        "text": best["text"][:200],
                    }
                )
                say(f"{name:28s} draft {k}: {best['client_tok_s']:7.2f} tok/s ({spec})")
    return results


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["client_tok_s"])[len(runs) // 2]


def write_docs(result: dict[str, Any]) -> None:
    rows = [
        [
            r["prompt"],
            "off (baseline)" if not r["draft"] else r["draft"],
            r["tokens"],
            r["client_tok_s"],
            f"{r['ratio']:.2f}x",
            r["decode_steps"],
            r["tokens_per_step"],
            "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%",
            "yes" if r["same_tokens"] else "no",
        ]
        for r in result["runs"]
    ]
    table = markdown_table(
        [
            "prompt",
            "draft",
            "tokens",
            "tok/s",
            "x baseline",
            "steps",
            "tokens/step",
            "drafts kept",
            "same tokens",
        ],
        rows,
    )
    delay = result["delay_ms"]
    where = (
        f"{delay:g} ms one-way delay between peers (NAT lab namespaces)"
        if delay
        else "loopback (no added delay)"
    )
    body = (
        f"`python examples/bench_speculative.py` ({result['machine']}, {result['cores']} "
        f"cores): {Path(result['model']).name}, runtime `{result['runtime']}`, {PEERS} node "
        f"processes, the model split in {PEERS} stages, {where}; {result['max_tokens']} greedy "
        f"tokens per prompt, the median of {result['repeats']} generations per configuration, "
        "the baseline (no speculation) measured in the same run, interleaved with the others. "
        "tok/s: the client's, first token to last. Drafts: prompt lookup (n-gram match over "
        "the prompt and output, no draft model). Every speculative run gave the baseline's "
        f"tokens. Wall {result['seconds']:.0f} s.\n\n{table}\n\n"
        f"{why(result)}"
    )
    delayed = f"{SECTION[:-1]} --delay-ms {result['delay_ms']:g})" if result["delay_ms"] else ""
    update_benchmarks_md(delayed or SECTION, body)  # each delay keeps its own section


def why(result: dict[str, Any]) -> str:
    """Prose on what the table shows, from its own figures."""
    spec = [r for r in result["runs"] if r["draft"]]
    if not spec:
        return ""
    lo, hi = min(r["ratio"] for r in spec), max(r["ratio"] for r in spec)
    per_step = max(r["tokens_per_step"] for r in spec)
    text = (
        f"With speculation the same tokens came {lo:.2f}x to {hi:.2f}x as fast as without. "
        f"A verify step gave up to {per_step:.1f} tokens; it costs more than a one-token "
        "step (k + 1 rows through every stage, and the last stage's logits for each), but "
        "the figures fit a decode step dominated by costs that do not grow with the rows "
        "(each stage reading its weights once per step on a memory-bound CPU, the WebRTC "
        "hops between the processes, the coordinator's round trip): the speed-up follows "
        "the tokens per step, less the verify step's extra compute and the rejected drafts."
    )
    spread = max(max(r["samples_tok_s"]) / max(min(r["samples_tok_s"]), 1e-9) for r in spec)
    text += (
        f" Repeats of one configuration differed by up to {spread:.1f}x (a machine shared "
        "with other work; each sample is in docs/bench/speculative.json), so the ratios are "
        "rough; the steps column is exact."
    )
    if not result["delay_ms"]:
        text += (
            " The issue's goal (>= 2x at 20 ms one-way delay between peers) is for "
            "`--delay-ms 20`, where every step saved also saves the ring's network "
            "latency; that run needs the NAT lab's delayed namespaces (`--lab`) and has not "
            "been measured yet."
        )
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    p.add_argument("--runtime", default="onnx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--drafts", default="4,8", help="draft lengths to measure, comma-separated")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (NAT lab)")
    p.add_argument("--lab", default="mesh.launch.natlab", help="module with delayed_mesh()")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="a tiny test model, 1 repeat")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-docs", action="store_true")
    opts = p.parse_args(argv)
    opts.drafts = [int(k) for k in str(opts.drafts).split(",") if k.strip()]
    opts.prompts = PROMPTS
    if opts.quick:  # the tiny model's context is 256 tokens: one short repetitive prompt
        opts.repeats, opts.max_tokens = 1, min(opts.max_tokens, 16)
        opts.prompts = {"repeated tokens": [1, 5, 9, 40, 77, 100, 3, 8] * 3}
    return opts


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
        base = Path(tmp)
        model = opts.model
        if model is None and opts.quick:
            from runtimes.testmodels import write_test_model

            model = write_test_model(base / "llama.gguf", "llama")
        elif model is None:
            from runtimes.models import gemma3_270m_path

            model = gemma3_270m_path()
        runs = await measure(model, base, opts)
    result = {
        "machine": machine(),
        "cores": os.cpu_count(),
        "model": str(model),
        "runtime": opts.runtime,
        "max_tokens": opts.max_tokens,
        "repeats": opts.repeats,
        "delay_ms": opts.delay_ms,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if not opts.no_docs and not opts.quick:
        write_json(docs_dir() / "bench" / "speculative.json", result)
        write_docs(result)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        best = max((r for r in runs if r["draft"]), key=lambda r: r["ratio"], default=None)
        if best is not None:
            print(f"best: {best['prompt']} draft {best['draft']}: {best['ratio']:.2f}x")
        print(f"median ratio: {statistics.median(r['ratio'] for r in runs if r['draft']):.2f}x")
    return result


if __name__ == "__main__":
    asyncio.run(main())
