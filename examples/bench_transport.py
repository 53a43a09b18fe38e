"""Transport benchmark: two node processes on loopback, per WebRTC engine, vs a TCP pair.

Measures, in the same run, for each engine (``--engines wrtc,aiortc``: libwebrtc and aiortc;
ICE/UDP, DTLS, SCTP): the one-way time of a 4 KiB request (send to arrival in the peer's
handler; one machine, one monotonic clock), its round trip (median, p99) and bulk throughput
for 64 MiB over an edgemesh link, the same over a TCP connection between two processes, and
the engine's own floor: a raw data channel echo between two processes (examples/engine_floor.py)
with no edgemesh framing, RPC or handshake.
Writes JSON and refreshes docs/benchmarks.md.

    python examples/bench_transport.py [--json] [--count 500] [--bulk-mib 64] [--engines ...]
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
from typing import Any

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
from engine_floor import engine_floor  # noqa: E402

from mesh.launch.localmesh import LocalMesh  # noqa: E402
from mesh.net.transport import wrtc_available  # noqa: E402


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


async def mesh_figures(
    engine: str, size: int, count: int, bulk: int, message: int
) -> dict[str, float]:
    """Two node processes on ``engine``: 4 KiB one-way time and round trip, bulk rate."""
    args = ["--no-mdns", "--webrtc-engine", engine]
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalMesh(Path(tmp), mdns_interface=None) as mesh:
            a = await mesh.start_node("a", args + ["--signaling", "127.0.0.1:0"])
            b = await mesh.start_node("b", args + ["--peer", a.signaling])
            t0 = time.perf_counter()
            await mesh.wait_connected(timeout=30)
            connect_s = time.perf_counter() - t0
            info = await mesh.get(b, "/v1/info")
            peer = {"peer": a.peer_id, "size": size, "count": count}
            one_way = await mesh.post(b, "/v1/bench/oneway", peer)
            rtt = await mesh.post(b, "/v1/bench/rtt", peer)
            bulk_res = await mesh.post(
                b, "/v1/bench/bulk", {"peer": a.peer_id, "bytes": bulk, "message_size": message}
            )
    s = summarize(rtt["rtt_ms"])
    w = summarize(one_way["one_way_ms"])
    return {
        "engine": info["webrtc_engine"],
        "event_loop": info["event_loop"],
        "one_way_median_ms": w["median"],
        "one_way_p99_ms": w["p99"],
        "rtt_median_ms": s["median"],
        "rtt_p99_ms": s["p99"],
        "bulk_mb_per_s": bulk_res["mb_per_s"],
        "connect_s": connect_s,
    }


GOALS = {"one_way_median_ms": 0.25, "rtt_median_ms": 0.35, "bulk_mb_per_s": 100.0}


def _met(key: str, value: float) -> str:
    goal = GOALS[key]
    ok = value >= goal if key == "bulk_mb_per_s" else value <= goal
    op = ">=" if key == "bulk_mb_per_s" else "<="
    return f"{op} {goal:g}: {'met' if ok else 'not met'}"


def _floor_note(engines: dict[str, dict[str, Any]]) -> str:
    """What the round-trip goal means beside the first engine's own floor."""
    name, first = next(iter(engines.items()))
    goal, floor = GOALS["rtt_median_ms"], first["floor_rtt_median_ms"]
    added = first["rtt_median_ms"] - floor
    if floor <= goal:
        return f"\n\n{name}: the link adds {added:.3f} ms to the engine's own round trip."
    return (
        f"\n\n{name} alone takes {floor:.3f} ms for the round trip, above the {goal:g} ms "
        f"goal before edgemesh does anything; the link adds {added:.3f} ms "
        f"({first['rtt_over_floor']:.2f}x the engine alone)."
    )


def engine_table(
    engines: dict[str, dict[str, Any]], tcp: dict[str, float], args: argparse.Namespace
) -> str:
    names = list(engines)
    rows = []
    for key, label in (
        ("one_way_median_ms", f"{args.size // 1024} KiB request, one way, median (ms)"),
        ("one_way_p99_ms", "same, p99 (ms)"),
        ("rtt_median_ms", f"{args.size // 1024} KiB RPC round trip, median (ms)"),
        ("rtt_p99_ms", "same, p99 (ms)"),
        ("floor_rtt_median_ms", "the engine alone: raw 4 KiB echo, median (ms)"),
        ("floor_rtt_p99_ms", "same, p99 (ms)"),
        ("rtt_over_floor", "RPC round trip / the engine alone"),
        ("bulk_mb_per_s", f"bulk {args.bulk_mib} MiB in {args.message_kib} KiB messages (MB/s)"),
    ):
        row: list[Any] = [label] + [engines[n][key] for n in names]
        row.append(tcp.get(key, "-"))
        if "aiortc" in engines and len(names) > 1:
            other = next(n for n in names if n != "aiortc")
            row.append(engines[other][key] / engines["aiortc"][key])
        row.append(_met(key, engines[names[0]][key]) if key in GOALS else "")
        rows.append(row)
    head = ["figure"] + [f"{n} link" for n in names] + ["TCP baseline"]
    if "aiortc" in engines and len(names) > 1:
        head.append(f"{next(n for n in names if n != 'aiortc')} / aiortc")
    head.append(f"goal ({names[0]})")
    return markdown_table(head, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--count", type=int, default=500, help="round trips to time")
    p.add_argument("--size", type=int, default=4096, help="request size in bytes")
    p.add_argument("--bulk-mib", type=int, default=64, help="bulk transfer size")
    p.add_argument("--message-kib", type=int, default=1024, help="bulk message size")
    p.add_argument(
        "--engines",
        default="wrtc,aiortc" if wrtc_available() else "aiortc",
        help="WebRTC engines to measure, in this run (the first is the one the goals are for; "
        "default wrtc,aiortc, or aiortc where wrtc is not installed)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args()
    bulk, message = args.bulk_mib << 20, args.message_kib << 10
    tcp = tcp_baseline(args.size, args.count, bulk, message)
    engines: dict[str, dict[str, Any]] = {}
    for engine in args.engines.split(","):
        engines[engine] = asyncio.run(mesh_figures(engine, args.size, args.count, bulk, message))
        floor = engine_floor(engine, args.size, args.count)  # the engine alone, same run
        engines[engine]["floor_rtt_median_ms"] = floor["rtt_median_ms"]
        engines[engine]["floor_rtt_p99_ms"] = floor["rtt_p99_ms"]
        rtt = engines[engine]["rtt_median_ms"]
        engines[engine]["rtt_over_floor"] = rtt / floor["rtt_median_ms"]
    first = next(iter(engines.values()))
    result = {
        "machine": machine(),
        "request_bytes": args.size,
        "count": args.count,
        "bulk_bytes": bulk,
        "mesh": first,  # the first engine's figures (examples/bench_latency.py reads these)
        "engines": engines,
        "tcp": tcp,
        "ratio": {
            "rtt_median": first["rtt_median_ms"] / tcp["rtt_median_ms"],
            "rtt_p99": first["rtt_p99_ms"] / tcp["rtt_p99_ms"],
            "bulk": first["bulk_mb_per_s"] / tcp["bulk_mb_per_s"],
        },
    }
    write_json(ROOT / "docs" / "bench" / "transport.json", result)
    table = engine_table(engines, tcp, args)
    setups = ", ".join(
        f"{n} {e['connect_s']:.2f} s (event loop: {e['event_loop']})" for n, e in engines.items()
    )
    if not args.no_docs:
        update_benchmarks_md(
            "Transport (examples/bench_transport.py)",
            (
                f"Two node processes on loopback ({result['machine']}), each WebRTC engine in "
                "the same run; baseline: a TCP socket pair between two processes, same run. "
                "One way: a request's send to its arrival in the peer's handler (both "
                "processes read one monotonic clock). The engine alone: a raw data channel "
                "between two processes echoing 4 KiB buffers (examples/engine_floor.py), no "
                "edgemesh framing, RPC or handshake. Link set-up: "
                + setups
                + ".\n\n"
                + table
                + _floor_note(engines)
            ),
        )
    print(json.dumps(result) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
