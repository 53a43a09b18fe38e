"""LLM batch job over stored prompts: our placement against random placement, in one job.

Five node processes on loopback. A job node in zone ``a`` (``--no-jobs``) stores the prompts
dataset; three workers in zone ``a`` each hold the model's shards and two thirds of the
dataset's chunks (each chunk on two of them: the dataset is cut into three runs of chunks and
worker k stores runs k and k+1); a fourth worker in zone ``b`` holds neither. Every peer
prices egress at ``--egress-price`` per GB. One ``POST /v1/jobs`` (kind ``llm``) runs the
dataset with our placement and then with the random baseline; the report gives tokens/s,
bytes moved (chunk pulls, shards pulled by routes, results back to the job node), bytes that
crossed zones, their egress price, and which peer did which chunks. Writes
docs/bench/llmjobs.json and the "LLM batch jobs" section of docs/benchmarks.md.

    python examples/bench_llmjobs.py [--records 200] [--max-tokens 16] [--gguf PATH]

Without ``--gguf`` the model is the tiny chat test model (runtimes.testmodels).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_md, docs_dir, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.launch.localmesh import LocalMesh, NodeProcess  # noqa: E402
from mesh.storage.manifest import iter_chunks  # noqa: E402

log = logging.getLogger("bench_llmjobs")
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = "tiny chat test model (qwen2 arch)"
WORDS = "the a of river stone light north quiet seven paper garden window".split()


def dataset(n: int, pad: int) -> bytes:
    """``n`` prompt records (every third a chat), each padded by an ignored field."""
    out = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 5))
        rec: dict[str, Any] = (
            {"messages": [{"role": "user", "content": f"Continue: {text}"}]}
            if i % 3 == 0
            else {"prompt": f"Record {i}: {text}"}
        )
        rec["meta"] = "x" * pad
        out.append(json.dumps(rec) + "\n")
    return "".join(out).encode()


async def put(node: NodeProcess, data: bytes, chunk: int) -> str:
    async with node.session(timeout=aiohttp.ClientTimeout(total=600)) as s:
        url = f"{node.api}/v1/objects?format=jsonl&chunk_size={chunk}"
        async with s.post(url, data=data) as resp:
            resp.raise_for_status()
            return str((await resp.json())["id"])


async def one_job(
    job: NodeProcess, data_id: str, policies: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    body = {
        "kind": "llm",
        "model": "bench",
        "prompts": data_id,
        "policies": policies,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    async with job.session(timeout=aiohttp.ClientTimeout(total=7200)) as s:
        async with s.post(f"{job.api}/v1/jobs", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"job failed: {resp.status} {await resp.text()}")
            report: dict[str, Any] = await resp.json()
            return report


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's runs (one per order) as one: sums, and tokens/s over their total time;
    the placement is the first run's (the same seed: random places alike in both)."""
    out = dict(runs[0])
    summed = """tokens seconds bytes_moved input_bytes shard_bytes result_bytes cross_zone_bytes
        egress_cost records local_route_records holder_tasks model_holder_tasks retries"""
    for key in summed.split():
        out[key] = sum(r[key] for r in runs)
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["runs"] = len(runs)
    out["tokens_per_s_each"] = [round(r["tokens_per_s"], 1) for r in runs]
    return out


async def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    if args.gguf is None:
        from runtimes.testmodels import DEFAULT_SPECS, write_test_model

        spec = dataclasses.replace(DEFAULT_SPECS["qwen2"], chat_template=CHATML, context_length=512)
        model = write_test_model(base / "chat.gguf", spec)
    else:
        model = Path(args.gguf)
    price = ["--egress-price", str(args.egress_price)]
    async with LocalMesh(base / "mesh") as mesh:
        job = await mesh.start_node("job", ["--zone", "a", "--no-jobs", *price])
        workers = await mesh.start_nodes([f"a{k}" for k in range(3)], ["--zone", "a", *price])
        far = await mesh.start_node("b0", ["--zone", "b", *price])
        await mesh.wait_connected(timeout=60)
        names = {n.peer_id: n.data_dir.name for n in [job, *workers, far]}
        for w in workers:
            await mesh.post(w, "/v1/models", {"path": str(model), "name": "bench"})
        data = dataset(args.records, args.pad)
        data_id = await put(job, data, args.chunk_size)
        chunks = list(iter_chunks(io.BytesIO(data), "jsonl", args.chunk_size))
        third = max(1, len(chunks) // 3)
        runs = [chunks[:third], chunks[third : 2 * third], chunks[2 * third :]]
        for k, w in enumerate(workers):
            for r in (k, (k + 1) % 3):
                if runs[r]:
                    await put(w, b"".join(runs[r]), args.chunk_size)
        jobs = []
        # a first job (ours only: the model holders) loads their runtimes, its figures left
        # out; then both orders, so neither policy always runs on a colder or busier mesh.
        # b0 stays cold for random: the shards it pulls for its first task are what random
        # placement costs (cached, its later tasks find them).
        for order in (["ours"], ["ours", "random"], ["random", "ours"]):
            jobs.append(await one_job(job, data_id, order, args))
        report = jobs[1]
        report["policies"] = [
            merge([r for j in jobs[1:] for r in j["policies"] if r["policy"] == policy])
            for policy in ("ours", "random")
        ]
        report["same_results"] = (
            all(j["same_results"] for j in jobs) and len({j["id"] for j in jobs}) == 1
        )
    for r in report["policies"]:
        r["by_name"] = {names.get(p, p[:8]): cs for p, cs in r["placement"].items()}
    return {
        "machine": machine(),
        "model": TINY if args.gguf is None else model.name,
        "records": args.records,
        "chunks": len(chunks),
        "dataset_bytes": len(data),
        "max_tokens": args.max_tokens,
        "egress_price_per_gb": args.egress_price,
        "report": report,
    }


def table(doc: dict[str, Any]) -> str:
    ours, rand = doc["report"]["policies"]
    rows = []
    for r in (ours, rand):
        rows.append(
            [
                r["policy"],
                f"{r['tokens_per_s']:.1f} ({', '.join(map(str, r['tokens_per_s_each']))})",
                round(r["tokens_per_s"] / max(rand["tokens_per_s"], 1e-9), 2),
                r["tokens"],
                round(r["seconds"], 1),
                f"{r['holder_tasks']}/{doc['chunks'] * r['runs']}",
                f"{r['model_holder_tasks']}/{doc['chunks'] * r['runs']}",
                f"{r['local_route_records']}/{r['records']}",
                r["bytes_moved"],
                r["input_bytes"],
                r["shard_bytes"],
                r["cross_zone_bytes"],
                f"{r['egress_cost']:.6f}",
                ", ".join(f"{n}: {len(c)}" for n, c in sorted(r["by_name"].items())),
            ]
        )
    return markdown_table(
        [
            "policy",
            "tokens/s (each run)",
            "x random",
            "tokens",
            "s",
            "tasks on a chunk holder",
            "on a model holder",
            "records routed locally",
            "bytes moved",
            "chunk bytes pulled",
            "shard bytes pulled",
            "cross-zone bytes",
            "egress cost",
            "chunks per peer (each run)",
        ],
        rows,
    )


def render(doc: dict[str, Any]) -> str:
    ours, rand = doc["report"]["policies"]
    return (
        f"Five node processes on loopback ({doc['machine']}), 2 cores shared by every process "
        f"(and by other work on the machine); {doc['records']} prompt records "
        f"({doc['dataset_bytes'] / 1e6:.2f} MB, {doc['chunks']} chunks of "
        f"{doc['chunk_size'] >> 10} KiB), {doc['max_tokens']} tokens each, model: "
        f"{doc['model']}. A job node in zone a stores the dataset; three workers in zone a hold "
        "the model and two thirds of the chunks each (every chunk on two of them); a fourth "
        f"worker in zone b holds neither. Egress {doc['egress_price_per_gb']} per GB on every "
        "peer. Both policies run in each of two jobs, after a warm-up job (ours alone, so b0 "
        "has no shards yet) whose figures are left out: ours then random, then random then "
        "ours; the table sums the two runs of each policy (tokens/s over their total time). "
        "Results identical across policies and jobs: "
        f"{doc['report']['same_results']}. Bytes moved = chunk pulls + shard pulls by routes "
        "+ results back to the job node; activations between the stages of a route that leaves "
        "its task's peer are not in it (ours keeps every record's route on its peer: "
        f"{ours['local_route_records']} of {ours['records']}; random: "
        f"{rand['local_route_records']}).\n\n" + table(doc)
    )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pad", type=int, default=3000, help="bytes of ignored padding per record")
    ap.add_argument("--chunk-size", type=int, default=64 << 10)
    ap.add_argument("--egress-price", type=float, default=1.0)
    ap.add_argument("--gguf", default=None, help="a GGUF to use instead of the tiny test model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-md", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="render a saved run's figures (no run)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.from_json is not None:
        doc = json.loads(args.from_json.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            doc = await run(args, Path(tmp))
        doc["chunk_size"] = args.chunk_size
    gguf = doc["model"] != TINY
    name = "llmjobs-gguf.json" if gguf else "llmjobs.json"
    write_json(docs_dir() / "bench" / name, doc)
    section = "LLM batch jobs" + (f", {doc['model']}" if gguf else "")
    if not args.no_md:
        update_benchmarks_md(f"{section} (examples/bench_llmjobs.py)", render(doc))
        log.info("wrote %s", bench_md())
    print(json.dumps(doc) if args.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
