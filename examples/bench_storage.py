"""Shard distribution: time for 3 fresh peers to obtain ~250 MB (Gemma 3 270M's shards are
238 MB) from one seed, and from several holders; aggregate MB/s.

Each scenario runs with the direct encrypted TCP fast path (mesh/fastpath.py) and, as the
baseline in the same run, over WebRTC links only (``--no-fast-path``; a smaller object, since
it is slow: its MB/s is what to compare). Writes docs/bench/storage.json and the
"Shard distribution" section of docs/benchmarks.md.

    python examples/bench_storage.py [--mb 250] [--webrtc-mb 48] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.launch.localmesh import LocalMesh, NodeProcess  # noqa: E402

log = logging.getLogger("bench_storage")


async def put(node: NodeProcess, size: int) -> str:
    block = os.urandom(1 << 20)  # random: nothing compresses; distinct chunks per MiB

    async def body():  # type: ignore[no-untyped-def]
        for i in range(size >> 20):
            yield i.to_bytes(8, "big") + block[8:]

    async with node.session(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.post(f"{node.api}/v1/objects?name=shards", data=body()) as resp:
            resp.raise_for_status()
            return str((await resp.json())["id"])


async def fetch(node: NodeProcess, oid: str) -> dict[str, Any]:
    async with node.session(timeout=aiohttp.ClientTimeout(total=900)) as s:
        async with s.post(f"{node.api}/v1/objects/{oid}/fetch?pin=1") as resp:
            done: dict[str, Any] = {}
            async for line in resp.content:
                event = json.loads(line)
                if "error" in event:
                    raise RuntimeError(event["error"])
                done = event.get("done", done)
            return done


async def scenario(size: int, fast: bool, base: Path) -> dict[str, Any]:
    extra = [] if fast else ["--no-fast-path"]
    async with LocalMesh(base, extra_args=extra) as mesh:
        seed = await mesh.start_node("seed")
        first = await mesh.start_nodes([f"p{i}" for i in range(3)])
        await mesh.wait_connected(timeout=60)
        oid = await put(seed, size)
        t0 = time.perf_counter()
        await asyncio.gather(*(fetch(n, oid) for n in first))
        one_s = time.perf_counter() - t0
        fresh = await mesh.start_nodes([f"q{i}" for i in range(3)])
        await mesh.wait_connected(timeout=60)
        # Wait until the fresh peers know all 4 holders (provider records sync on connect).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            views = [await mesh.get(n, f"/v1/objects/{oid}/holders") for n in fresh]
            if all(len(v) >= 4 for v in views):
                break
            await asyncio.sleep(0.2)  # polling a condition with a deadline
        t0 = time.perf_counter()
        many = await asyncio.gather(*(fetch(n, oid) for n in fresh))
        many_s = time.perf_counter() - t0
    return {
        "path": "fast path (TCP + secretstream)" if fast else "WebRTC only",
        "bytes": size,
        "one_seed_s": one_s,
        "one_seed_mb_s": 3 * size / one_s / 1e6,
        "several_holders_s": many_s,
        "several_holders_mb_s": 3 * size / many_s / 1e6,
        "sources_several": [len(d["sources"]) for d in many],
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=250)
    ap.add_argument("--webrtc-mb", type=int, default=48)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-md", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        fast = await scenario(args.mb << 20, True, Path(tmp) / "fast")
        slow = await scenario(args.webrtc_mb << 20, False, Path(tmp) / "webrtc")
    doc = {"machine": machine(), "runs": [fast, slow]}
    write_json(ROOT / "docs" / "bench" / "storage.json", doc)
    rows = [
        [
            r["path"],
            f"{r['bytes'] / 1e6:.0f}",
            round(r["one_seed_s"], 2),
            round(r["one_seed_mb_s"], 1),
            round(r["several_holders_s"], 2),
            round(r["several_holders_mb_s"], 1),
        ]
        for r in (fast, slow)
    ]
    table = markdown_table(
        [
            "path",
            "MB per peer",
            "1 seed -> 3 peers (s)",
            "aggregate MB/s",
            "4 holders -> 3 fresh peers (s)",
            "aggregate MB/s",
        ],
        rows,
    )
    body = (
        f"Seven node processes on loopback ({machine()}), 2 shared cores. A seed holds one "
        f"object of {args.mb} MB (the size of Gemma 3 270M's shards); 3 fresh peers fetch it "
        "at once (each chunk verified by its hash), then 3 more fetch it from the 4 holders. "
        "Baseline in the same run: WebRTC links only, with a smaller object "
        f"({args.webrtc_mb} MB; compare MB/s). Bar: under 30 s for the shards to reach 3 "
        "peers.\n\n" + table
    )
    if not args.no_md:
        update_benchmarks_md("Shard distribution (examples/bench_storage.py)", body)
    print(json.dumps(doc) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
