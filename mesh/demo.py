"""``edgemesh demo``: the main job. Until sharded generation lands, it starts a local mesh of
node processes on loopback, waits until every node is connected to every other over WebRTC,
measures the links and prints the mesh as each node sees it."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from .cli import format_peers
from .localmesh import LocalMesh

__all__ = ["run_demo"]


async def run_demo(n_peers: int, base_dir: Path, timeout: float, as_json: bool) -> int:
    if n_peers < 2:
        raise ValueError("a mesh needs at least 2 peers")
    out = sys.stderr if as_json else sys.stdout
    t0 = time.perf_counter()
    async with LocalMesh(base_dir) as mesh:
        for i in range(n_peers):
            node = await mesh.start_node(f"node-{i}")
            print(f"started node-{i}: {node.peer_id} api {node.api}", file=out)
        await mesh.wait_connected(timeout)
        formed = time.perf_counter() - t0
        print(f"\nmesh of {n_peers} formed in {formed:.1f} s\n", file=out)
        first, second = mesh.nodes[0], mesh.nodes[1]
        rtt = await mesh.post(
            first, "/v1/bench/rtt", {"peer": second.peer_id, "size": 4096, "count": 100}
        )
        views = {}
        for node in mesh.nodes:
            peers = await mesh.get(node, "/v1/peers")
            views[node.ready["name"]] = peers
            print(f"{node.ready['name']} ({node.peer_id[:16]}) sees:", file=out)
            print(format_peers(peers), file=out)
            print(file=out)
        median = statistics.median(rtt["rtt_ms"])
        print(f"4 KiB RPC round trip node-0 -> node-1: median {median:.2f} ms", file=out)
        if as_json:
            print(
                json.dumps(
                    {
                        "peers": n_peers,
                        "formed_s": round(formed, 2),
                        "rtt_median_ms": round(median, 3),
                        "views": views,
                    }
                )
            )
    return 0
