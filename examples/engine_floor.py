"""The WebRTC engine's own round trip: a raw data channel between two processes, no edgemesh.

The floor under an edgemesh link's RPC round trip: the same engine, the same loopback ICE
path, DTLS and SCTP, but the message is a bare 4 KiB buffer the other process echoes from its
channel's message callback (no framing, no RPC, no handshake). examples/bench_transport.py
reports it beside the link's figures, so "link / floor" is what edgemesh adds.

    python examples/engine_floor.py [--engine wrtc] [--size 4096] [--count 500]
    python examples/engine_floor.py --echo --engine wrtc   # the child: SDP on stdin/stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import summarize  # noqa: E402

from mesh.cli.node import loop_factory  # noqa: E402
from mesh.net.engine import RtcChannel  # noqa: E402
from mesh.net.transport import TransportConfig  # noqa: E402

LOOPBACK = ("127.0.0.1",)


def _run(coro: Any) -> Any:
    """On the event loop the node processes run (uvloop when installed)."""
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        return runner.run(coro)


def _bind(channel: RtcChannel, on_message: Any, opened: asyncio.Event) -> None:
    channel.bind(
        on_message=on_message,
        on_open=opened.set,
        on_close=lambda: None,
        on_low=lambda: None,
        low_water=0,
    )


async def _echo(engine: str) -> None:
    """Answer the offer on stdin, echo every message until stdin closes."""
    pc = TransportConfig(engine=engine, candidate_addresses=LOOPBACK).new_peer()
    opened = asyncio.Event()

    def on_channel(channel: RtcChannel) -> None:
        _bind(channel, channel.send, opened)

    pc.on_channel = on_channel
    offer = json.loads(await asyncio.to_thread(sys.stdin.readline))["sdp"]
    answer = await pc.answer(offer)
    print(json.dumps({"sdp": answer}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin when it is done
    await pc.close()


async def _measure(engine: str, size: int, count: int) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        *[sys.executable, __file__, "--echo", "--engine", engine],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    pc = TransportConfig(engine=engine, candidate_addresses=LOOPBACK).new_peer()
    try:
        channel, offer = await pc.offer("floor")
        replies: asyncio.Queue[bytes] = asyncio.Queue()
        opened = asyncio.Event()
        _bind(channel, replies.put_nowait, opened)
        child.stdin.write((json.dumps({"sdp": offer}) + "\n").encode())
        await child.stdin.drain()
        answer = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))["sdp"]
        await pc.complete(answer)
        await asyncio.wait_for(opened.wait(), 30)
        block = os.urandom(size)
        samples = []
        for i in range(count + 50):  # the first 50 warm up
            t0 = time.perf_counter()
            channel.send(block)
            reply = await asyncio.wait_for(replies.get(), 10)
            if i >= 50:
                samples.append((time.perf_counter() - t0) * 1000)
            if reply != block:
                raise RuntimeError("the echo differs from what was sent")
        s = summarize(samples)
        return {"rtt_median_ms": s["median"], "rtt_p99_ms": s["p99"], "count": count}
    finally:
        await pc.close()
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 30)


def engine_floor(engine: str, size: int = 4096, count: int = 500) -> dict[str, Any]:
    """The raw data channel round trip of ``engine`` between two processes (median, p99)."""
    result: dict[str, Any] = _run(_measure(engine, size, count))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="wrtc")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo:
        _run(_echo(args.engine))
        return 0
    print(json.dumps(engine_floor(args.engine, args.size, args.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
