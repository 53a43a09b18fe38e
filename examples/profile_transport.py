"""Where the time of an RPC goes: cProfile over a real aiortc link inside one process.

python examples/profile_transport.py [rtt|bulk] [--top 20] [--filter 'mesh/|aiortc']
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.net.identity import Identity  # noqa: E402
from mesh.net.rpc import CallContext, Reply  # noqa: E402
from mesh.net.transport import (  # noqa: E402
    TransportConfig,
    accept_offer,
    complete_offer,
    open_offer,
)


async def echo(ctx: CallContext, params: dict[str, object], payload: bytes) -> Reply:
    return Reply({}, payload)


async def sink(ctx: CallContext, params: dict[str, object], payload: bytes) -> dict[str, int]:
    return {"n": len(payload)}


async def run(mode: str, top: int, pattern: str) -> None:
    a, b = Identity.generate(), Identity.generate()
    cfg = TransportConfig(candidate_addresses=("127.0.0.1",))  # a loopback link
    pa, offer = await open_offer(a, cfg, b.peer_id)
    pb, answer = await accept_offer(b, cfg, offer, a.peer_id)
    await complete_offer(pa, answer)
    handlers = {"echo": echo, "sink": sink}
    la, lb = await asyncio.gather(pa.establish(handlers), pb.establish(handlers))
    block, small = os.urandom(1 << 20), os.urandom(4096)
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    if mode == "bulk":
        for _ in range(16):
            await la.call("sink", {}, block)
    else:
        for _ in range(1000):
            await la.call("echo", {}, small)
    elapsed = time.perf_counter() - t0
    prof.disable()
    print(f"{mode}: {elapsed:.2f} s under the profiler")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(pattern, top)
    la.close("done")
    lb.close("done")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="rtt", choices=["rtt", "bulk"])
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--filter", default="main/mesh/|aiortc|aioice|SSL", help="regex on file names")
    args = p.parse_args()
    asyncio.run(run(args.mode, args.top, args.filter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
