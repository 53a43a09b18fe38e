"""Transport benchmark: two node processes on loopback vs a plain TCP socket pair.

Measures, in the same run: the round trip of a 4 KiB request (median, p99) and bulk
throughput for 64 MiB, over an edgemesh WebRTC link (aiortc: ICE/UDP, DTLS, SCTP) and over a
TCP connection between two processes. Writes JSON and refreshes docs/benchmarks.md.

    python examples/bench_transport.py [--json] [--count 500] [--bulk-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import (  # noqa: E402
    ROOT,
    machine,
    markdown_table,
    summarize,
    update_benchmarks_md,
    write_json,
)

from mesh.launch.localmesh import LocalMesh  # noqa: E402


def tcp_baseline(size: int, count: int, bulk: int, message: int) -> dict[str, float]:
    from tcp_echo import recv_exact

    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "tcp_echo.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = b"E" + os.urandom(size - 1)
        samples = []
        for i in range(count + 1):
            t0 = time.perf_counter()
            sock.sendall(struct.pack(">I", len(body)) + body)
            (n,) = struct.unpack(">I", recv_exact(sock, 4))
            recv_exact(sock, n)
            if i:  # first one is warm-up
                samples.append((time.perf_counter() - t0) * 1000)
        block = b"S" + os.urandom(message - 1)
        t0 = time.perf_counter()
        for _ in range(bulk // message):
            sock.sendall(struct.pack(">I", len(block)) + block)
            recv_exact(sock, 4)
        seconds = time.perf_counter() - t0
        sock.close()
    finally:
        server.wait(timeout=10)
    s = summarize(samples)
    return {
        "rtt_median_ms": s["median"],
        "rtt_p99_ms": s["p99"],
        "bulk_mb_per_s": bulk / seconds / 1e6,
    }


async def mesh_figures(size: int, count: int, bulk: int, message: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalMesh(Path(tmp), mdns_interface=None) as mesh:
            a = await mesh.start_node("a", ["--no-mdns", "--signaling", "127.0.0.1:0"])
            b = await mesh.start_node("b", ["--no-mdns", "--peer", a.signaling])
            t0 = time.perf_counter()
            await mesh.wait_connected(timeout=30)
            connect_s = time.perf_counter() - t0
            rtt = await mesh.post(
                b, "/v1/bench/rtt", {"peer": a.peer_id, "size": size, "count": count}
            )
            bulk_res = await mesh.post(
                b, "/v1/bench/bulk", {"peer": a.peer_id, "bytes": bulk, "message_size": message}
            )
    s = summarize(rtt["rtt_ms"])
    return {
        "rtt_median_ms": s["median"],
        "rtt_p99_ms": s["p99"],
        "bulk_mb_per_s": bulk_res["mb_per_s"],
        "connect_s": connect_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--count", type=int, default=500, help="round trips to time")
    p.add_argument("--size", type=int, default=4096, help="request size in bytes")
    p.add_argument("--bulk-mib", type=int, default=64, help="bulk transfer size")
    p.add_argument("--message-kib", type=int, default=1024, help="bulk message size")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args()
    bulk, message = args.bulk_mib << 20, args.message_kib << 10
    tcp = tcp_baseline(args.size, args.count, bulk, message)
    mesh = asyncio.run(mesh_figures(args.size, args.count, bulk, message))
    result = {
        "machine": machine(),
        "request_bytes": args.size,
        "count": args.count,
        "bulk_bytes": bulk,
        "mesh": mesh,
        "tcp": tcp,
        "ratio": {
            "rtt_median": mesh["rtt_median_ms"] / tcp["rtt_median_ms"],
            "rtt_p99": mesh["rtt_p99_ms"] / tcp["rtt_p99_ms"],
            "bulk": mesh["bulk_mb_per_s"] / tcp["bulk_mb_per_s"],
        },
    }
    write_json(ROOT / "docs" / "bench" / "transport.json", result)
    rows = [
        [
            f"{args.size // 1024} KiB RPC round trip, median (ms)",
            mesh["rtt_median_ms"],
            tcp["rtt_median_ms"],
            result["ratio"]["rtt_median"],
        ],
        ["same, p99 (ms)", mesh["rtt_p99_ms"], tcp["rtt_p99_ms"], result["ratio"]["rtt_p99"]],
        [
            f"bulk {args.bulk_mib} MiB in {args.message_kib} KiB messages (MB/s)",
            mesh["bulk_mb_per_s"],
            tcp["bulk_mb_per_s"],
            result["ratio"]["bulk"],
        ],
    ]
    table = markdown_table(["figure", "edgemesh link", "TCP baseline", "ratio"], rows)
    if not args.no_docs:
        update_benchmarks_md(
            "Transport (examples/bench_transport.py)",
            (
                f"Two node processes on loopback ({result['machine']}); baseline: a TCP socket "
                f"pair between two processes, same run. Link set-up {mesh['connect_s']:.2f} s.\n\n"
                + table
            ),
        )
    print(json.dumps(result) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
