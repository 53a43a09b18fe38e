"""``edgemesh demo``: the main job, on one machine.

Starts N node processes on loopback (mDNS, WebRTC links), gives them memory limits that no
single one can fit the model (Gemma 3 270M by default) into, adds the model on the first node,
and generates: the peers that lack their shard pull it from the first node (a progress bar
shows it; a second run reuses what they stored). It prints the text, the stages, TTFT,
tokens/s, per-hop latency and bytes moved, then runs the same prompt on one peer holding the
whole model and prints the ratio. ``--model PATH`` runs it on any GGUF the runtimes accept,
with limits sized for that file; at temperature 0 the tokens are checked against llama.cpp's
greedy ones on the same file, token by token on the same history (exit status 1 if they
differ anywhere but at a near-tie, as tests/test_runtime_onnx.py rules).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import numpy as np

from mesh.inference.routes import SHARD_OVERHEAD, unit_memory
from mesh.launch.localmesh import LocalMesh, NodeProcess
from runtimes.gguf_io import open_gguf

__all__ = ["run_demo", "demo_memory_limit", "llamacpp_check"]


def demo_memory_limit(gguf: Path, peers: int) -> int:
    """A per-node limit that forces a split into about ``peers`` stages, sized from the file
    with the planner's own per-stage need (routes.unit_memory): a 1/peers share of the model
    plus half a layer, and never less than its largest unit (the embedding, say) alone needs."""
    f = open_gguf(gguf)
    units = [f.unit_nbytes(i) for i in range(f.config.n_units)]
    n = len(units)
    need = [unit_memory(units, i, i + 1) - SHARD_OVERHEAD for i in range(n)]
    layer = max(need[1:-1], default=0)
    share = SHARD_OVERHEAD + (unit_memory(units, 0, n) - SHARD_OVERHEAD) / peers + layer / 2
    return int(max(share, (max(need) + SHARD_OVERHEAD) * 1.05))


async def _progress(mesh: LocalMesh, done: asyncio.Event, out: TextIO) -> None:
    """One line of shard-pull progress across every node, until the first token."""
    shown = False
    while not done.is_set():
        moving = []
        for node in mesh.nodes:
            try:
                moving += [(node.ready["name"], t) for t in await mesh.get(node, "/v1/transfers")]
            except Exception:  # noqa: BLE001 - a progress bar must never break the demo
                continue
        if moving:
            size = sum(t["size"] for _, t in moving)
            got = sum(t["done"] for _, t in moving)
            width = 30
            bar = "#" * int(width * got / max(size, 1))
            who = ", ".join(sorted({n for n, _ in moving}))
            out.write(
                f"\r  pulling shards [{bar:<{width}}] {got / 1e6:6.1f}/{size / 1e6:.1f} MB"
                f" ({who})   "
            )
            out.flush()
            shown = True
        try:
            await asyncio.wait_for(done.wait(), 0.5)  # refresh period of the bar
        except TimeoutError:
            pass
    if shown:
        out.write("\n")


async def _generate(mesh: LocalMesh, node: NodeProcess, body: dict[str, Any]) -> dict[str, Any]:
    assert mesh._http is not None
    events: list[dict[str, Any]] = []
    # Shard pulls and loading can take minutes on a slow machine: no total deadline here.
    no_total = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with mesh._http.post(node.api + "/v1/generate", json=body, timeout=no_total) as resp:
        if resp.status != 200:
            raise RuntimeError(f"generate: HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.strip():
                events.append(json.loads(line))
    if not events or "error" in events[-1]:
        raise RuntimeError(f"generation failed: {events[-1] if events else 'no answer'}")
    return events[-1]


async def _bytes_sent(mesh: LocalMesh) -> int:
    total = 0
    for node in mesh.nodes:
        for p in await mesh.get(node, "/v1/peers"):
            total += int(p.get("bytes_sent", 0))
    return total


async def run_demo(
    n_peers: int,
    base_dir: Path,
    timeout: float,
    as_json: bool,
    prompt: str = "The capital of France is",
    max_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    runtime: str = "onnx",
    baseline: bool = True,
    model_path: Path | None = None,
    threads: int | None = None,
    mode: str = "push",
) -> int:
    if n_peers < 2:
        raise ValueError("a mesh needs at least 2 peers")
    out = sys.stderr if as_json else sys.stdout
    if model_path is None:
        from runtimes.models import gemma3_270m_path

        model_path = gemma3_270m_path()
    limit = demo_memory_limit(model_path, n_peers)
    body = {
        "model": "demo-model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "mode": mode,
    }
    extra = ["--threads", str(threads)] if threads else []
    args = ["--memory-limit", str(limit), "--runtime", runtime, *extra]
    async with LocalMesh(base_dir) as mesh:
        await _start_mesh(mesh, n_peers, args, limit, timeout, out)
        first = mesh.nodes[0]
        added = await mesh.post(
            first, "/v1/models", {"path": str(model_path), "name": "demo-model"}
        )
        print(
            f"added {added['name']} ({added['arch']}, {added['n_layers']} layers) on node-0",
            file=out,
        )
        warm, setup_s = await _warm_up(mesh, first, body, out)
        sent_before = await _bytes_sent(mesh)
        summary = await _generate(mesh, first, body)
        moved = await _bytes_sent(mesh) - sent_before
        names = {n.peer_id: n.ready["name"] for n in mesh.nodes}
        print(f"\n{prompt}{summary['text']}\n", file=out)
        _print_stages(summary, names, added["n_layers"], out)
        print(
            f"\nsetup (route, shard pulls, loading): {setup_s:.1f} s, "
            f"{warm['bytes_pulled'] / 1e6:.1f} MB pulled",
            file=out,
        )
        print(
            f"TTFT {summary['ttft_ms']:.0f} ms, {summary['tokens_per_s']:.1f} tokens/s, "
            f"per-hop {summary['hop_ms']:.2f} ms, {moved / 1e3:.0f} kB of activations and "
            f"control moved",
            file=out,
        )
        single: dict[str, Any] | None = None
        if baseline:
            single = await _single_peer(base_dir, model_path, [*extra, "--runtime", runtime], body)
            ratio = summary["tokens_per_s"] / max(single["tokens_per_s"], 1e-9)
            same = single["tokens"] == summary["tokens"]
            print(
                f"one peer, whole model: {single['tokens_per_s']:.1f} tokens/s -> mesh/single "
                f"= {ratio:.2f}x; same tokens: {'yes' if same else 'no'}",
                file=out,
            )
        oracle = await _oracle(model_path, prompt, summary["tokens"], temperature, threads, out)
        if as_json:
            result = _json_result(prompt, summary, single, setup_s, warm, moved, limit)
            result["llamacpp"] = oracle
            result["agrees_with_llamacpp"] = None if oracle is None else oracle["ok"]
            print(json.dumps(result))
    return 0 if oracle is None or oracle["ok"] else 1


NEAR_TIE = 0.25  # the oracle rule of tests/test_runtime_onnx.py: llama.cpp's top-2 margin


async def _oracle(
    model_path: Path,
    prompt: str,
    tokens: list[int],
    temperature: float,
    threads: int | None,
    out: TextIO,
) -> dict[str, Any] | None:
    if temperature != 0:
        return None
    check = await asyncio.to_thread(llamacpp_check, model_path, prompt, tokens, threads)
    _print_oracle(check, len(tokens), out)
    return check


def llamacpp_check(
    model_path: Path, prompt: str, tokens: list[int], threads: int | None = None
) -> dict[str, Any] | None:
    """llama.cpp on the same file, fed the same prompt tokens (the mesh's tokenizer) and then
    the mesh's tokens: at each step its greedy token, and whether the mesh's token is it.
    A step where llama.cpp's top-2 margin is <= NEAR_TIE is a near-tie, which a different
    rounding may turn either way, so only the others decide ``ok``. None where
    llama-cpp-python is not installed."""
    from runtimes.errors import RuntimeUnavailableError
    from runtimes.shards import ShardSpec
    from runtimes.tokenizer import Tokenizer

    try:
        from runtimes.llamacpp import LlamaCppRuntime
    except RuntimeUnavailableError:
        return None
    ids = Tokenizer(model_path).encode(prompt, True)
    n_ctx = len(ids) + len(tokens) + 8
    rt = LlamaCppRuntime(ShardSpec.open(model_path), n_ctx=n_ctx, threads=threads)
    greedy: list[int] = []
    near: list[int] = []
    try:
        s = rt.open_session(n_ctx)
        row = rt.forward(s, np.asarray(ids))[-1]
        for i, t in enumerate(tokens):
            greedy.append(int(row.argmax()))
            top = np.partition(row, -2)[-2:]
            if float(top[1] - top[0]) <= NEAR_TIE:
                near.append(i)
            if i + 1 < len(tokens):
                row = rt.forward(s, np.asarray([t]))[-1]
    finally:
        rt.close()
    wrong = [i for i, (a, b) in enumerate(zip(greedy, tokens, strict=True)) if a != b]
    return {
        "tokens": greedy,
        "same": not wrong,
        "near_ties": near,
        "mismatches": wrong,
        "ok": all(i in near for i in wrong),
    }


def _print_oracle(check: dict[str, Any] | None, n: int, out: TextIO) -> None:
    if check is None:
        print("llama.cpp check skipped: llama-cpp-python is not installed", file=out)
        return
    wrong, near = check["mismatches"], check["near_ties"]
    agreed = n - len(wrong)
    verdict = "yes" if check["ok"] else "NO"
    ties = [i for i in wrong if i in near]
    plural = "s" if len(ties) > 1 else ""
    note = f" ({len(ties)} near-tie{plural} within {NEAR_TIE}, at {ties})" if ties else ""
    print(
        f"llama.cpp on the same file, greedy on the same tokens: agrees: {verdict}, "
        f"{agreed}/{n} tokens{note}",
        file=out,
    )


async def _start_mesh(
    mesh: LocalMesh, n_peers: int, args: list[str], limit: int, timeout: float, out: TextIO
) -> None:
    t0 = time.perf_counter()
    nodes = await mesh.start_nodes([f"node-{i}" for i in range(n_peers)], args)
    for i, node in enumerate(nodes):
        print(f"started node-{i}: {node.peer_id[:16]}  (memory limit {limit >> 20} MiB)", file=out)
    await mesh.wait_connected(timeout)
    print(f"mesh of {n_peers} connected in {time.perf_counter() - t0:.1f} s", file=out)


async def _warm_up(
    mesh: LocalMesh, first: NodeProcess, body: dict[str, Any], out: TextIO
) -> tuple[dict[str, Any], float]:
    """Route, shard pulls (with a progress bar) and loading: measured apart from the run."""
    done = asyncio.Event()
    bar = asyncio.create_task(_progress(mesh, done, out))
    t_setup = time.perf_counter()
    try:
        warm = await _generate(mesh, first, dict(body, max_tokens=1))
    finally:
        done.set()
        await bar
    return warm, time.perf_counter() - t_setup


def _print_stages(
    summary: dict[str, Any], names: dict[str, str], n_layers: int, out: TextIO
) -> None:
    print(f"{'stage':<6} {'peer':<8} {'layers':<18} {'runtime':<8} {'ms/token':>8}", file=out)
    for i, st in enumerate(summary["stages"]):
        ms = summary["stage_ms"].get(st["peer_id"], 0.0)
        a, b = st["layers"]
        layers = f"{a}-{b - 1}" if b > a else "-"
        layers += " +embed" if st["units"][0] == 0 else ""
        layers += " +head" if st["units"][1] == n_layers + 2 else ""
        print(
            f"{i:<6} {names.get(st['peer_id'], '?'):<8} {layers:<10} {st['runtime']:<8} {ms:>8.2f}",
            file=out,
        )


def _json_result(
    prompt: str,
    summary: dict[str, Any],
    single: dict[str, Any] | None,
    setup_s: float,
    warm: dict[str, Any],
    moved: int,
    limit: int,
) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "prompt_tokens": summary["prompt_tokens"],
        "tokens": summary["tokens"],
        "text": summary["text"],
        "stages": [
            {"peer_id": s["peer_id"], "layers": s["layers"], "runtime": s["runtime"]}
            for s in summary["stages"]
        ],
        "ttft_ms": summary["ttft_ms"],
        "tokens_per_s": summary["tokens_per_s"],
        "single_peer_tokens_per_s": single["tokens_per_s"] if single else None,
        "single_peer_tokens": single["tokens"] if single else None,
        "ratio": (summary["tokens_per_s"] / single["tokens_per_s"]) if single else None,
        "hop_ms": summary["hop_ms"],
        "stage_ms": summary["stage_ms"],
        "setup_s": round(setup_s, 2),
        "bytes_pulled": warm["bytes_pulled"],
        "activation_bytes": moved,
        "memory_limit": limit,
    }


async def _single_peer(
    base_dir: Path, model_path: Path, args: list[str], body: dict[str, Any]
) -> dict[str, Any]:
    """The same prompt on one peer that holds and runs the whole model."""
    async with LocalMesh(base_dir / "single", mdns_interface=None) as mesh:
        node = await mesh.start_node("single", ["--no-mdns", *args])
        await mesh.post(node, "/v1/models", {"path": str(model_path), "name": "demo-model"})
        await _generate(mesh, node, dict(body, max_tokens=1))  # load, like the mesh's warm-up
        return await _generate(mesh, node, body)
