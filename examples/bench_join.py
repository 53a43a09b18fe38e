"""Join benchmark: how long a fresh node takes to connect to every member of a 5-node mesh,
through the MQTT broker, through the DHT, and (the LAN baseline, same run) through mDNS.

Time runs from spawning the node process to the moment it lists all five as connected; the
process start itself (imports, about a second) is included, as a user would see it. Median
of 5 joins per method. Writes JSON and refreshes docs/benchmarks.md.

    python examples/bench_join.py [--json] [--members 5] [--joins 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import ROOT, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.launch.localmesh import LocalBroker, LocalMesh, wait_for  # noqa: E402


async def join_times(method: str, members: int, joins: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp))
        if method == "mqtt":
            await broker.start()
        mdns = "127.0.0.1" if method == "mdns" else None
        async with LocalMesh(Path(tmp) / "mesh", mdns_interface=mdns) as mesh:
            loop_args = ["--signaling", "127.0.0.1:0"]
            if method == "mqtt":
                args = ["--no-mdns", "--mqtt", broker.url, "--mesh", "bench"]
            elif method == "dht":
                args = ["--no-mdns", "--dht-port", "0"]
            else:
                args = []
            first = await mesh.start_node("m0", args + loop_args)
            if method == "dht":
                args = ["--no-mdns", "--bootstrap", first.ready["dht"]]
            group = [first] + [
                await mesh.start_node(f"m{i}", args + loop_args) for i in range(1, members)
            ]
            await mesh.wait_connected(60, nodes=group)
            want = {n.peer_id for n in group}
            samples = []
            for j in range(joins):
                t0 = time.perf_counter()
                node = await mesh.start_node(f"join{j}", args + loop_args)

                async def joined() -> bool:
                    return want <= await mesh.connected_ids(node)  # noqa: B023

                await wait_for(joined, 60, f"join {j} via {method}", interval=0.02)
                samples.append(time.perf_counter() - t0)
                mesh.kill(node, signal.SIGTERM)
                await node.proc.wait()
        await broker.stop()
    return samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--joins", type=int, default=5)
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args()
    result: dict[str, object] = {"machine": machine(), "members": args.members}
    rows = []
    for method in ("mdns", "mqtt", "dht"):
        samples = asyncio.run(join_times(method, args.members, args.joins))
        med = statistics.median(samples)
        result[method] = {"median_s": med, "samples_s": samples}
        rows.append([method, med, min(samples), max(samples)])
    base = result["mdns"]["median_s"]  # type: ignore[index]
    for row in rows:
        row.append(row[1] / base)
    write_json(ROOT / "docs" / "bench" / "join.json", result)
    table = markdown_table(["join via", "median (s)", "min (s)", "max (s)", "ratio to mDNS"], rows)
    if not args.no_docs:
        update_benchmarks_md(
            "Joining a mesh (examples/bench_join.py)",
            (
                f"A fresh node process joins a {args.members}-node mesh on loopback "
                f"({result['machine']}); time from spawning it until it lists all members as "
                f"connected, median of {args.joins}, process start-up included. mDNS is the LAN "
                "baseline measured in the same run.\n\n" + table
            ),
        )
    print(json.dumps(result) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
