#!/usr/bin/env python3
"""The NAT lab from the command line (Linux, as root): homes behind NAT routers, a wan with
mosquitto and coturn, delay and loss per home; torn down on exit.

    sudo python examples/natlab.py --homes cone,symmetric --delay-ms 20 --loss 0.01
        builds the lab, prints what it built (namespaces, addresses, broker, STUN/TURN) as
        one JSON object, and holds it until Ctrl-C; run anything inside with
        `ip netns exec NS ...`.
    sudo python examples/natlab.py --homes cone,cone --link-setup 3
        measures link set-up: two nodes behind the two homes' NATs (STUN), beside the
        baseline of two nodes on one home's LAN, N times each; prints a table (or --json).
    sudo python examples/natlab.py --homes cone,cone --bulk 64
        moves a 64 MiB object to a LAN neighbour (the fast path) and to another home (the
        data channel through both NATs), hash-checked; prints MB/s of each.
    sudo python examples/natlab.py --homes cone --delay-ms 10 --delay-precision 300
        round trips of STUN bindings from a home's host to the lab's coturn, through its
        router's delayer twice: with the machine idle, then with three busy processes a
        core (as when the lab's nodes compute); median and p90 against the nominal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.launch.natlab import Host, NatLab, lab_unavailable  # noqa: E402
from mesh.launch.stunprobe import stun_bindings  # noqa: E402

BUSY = "while True: pass"


async def stun_rtts(host: Host, count: int) -> list[float]:
    """Round trips (ms) of ``count`` STUN bindings from ``host``, 4 ms apart (unanswered
    ones, after 1 s, left out)."""
    return [rtt * 1000 for rtt, _ in await stun_bindings(host, count, gap=0.004)]


async def _realtime(pids: list[int]) -> None:
    """SCHED_FIFO for every thread of ``pids`` (0: this thread), so that under load the
    probe and the STUN server answer at once and only the router's delayer is measured."""
    for pid in pids:
        if pid == 0:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(40))
            continue
        proc = await asyncio.create_subprocess_exec("chrt", "-f", "-a", "-p", "40", str(pid))
        await proc.wait()


async def delay_precision(lab: NatLab, count: int) -> dict[str, Any]:
    """STUN round trips through the first home's router, idle and under load (three busy
    processes a core); each beside the nominal round trip (2 x its delay)."""
    home = lab.homes[0]

    def summary(rtts: list[float]) -> dict[str, float]:
        rtts = sorted(rtts)
        return {
            "median_ms": round(statistics.median(rtts), 3),
            "p90_ms": round(rtts[int(0.9 * (len(rtts) - 1))], 3),
            "p99_ms": round(rtts[int(0.99 * (len(rtts) - 1))], 3),
            "answered": len(rtts),
        }

    out: dict[str, Any] = {"nominal_ms": 2 * home.delay_ms, "probes": count}
    out["idle"] = summary(await stun_rtts(home.hosts[0], count))
    ps = await asyncio.create_subprocess_exec(
        "ip", "netns", "pids", lab.wan, stdout=asyncio.subprocess.PIPE
    )
    wan_pids = [int(x) for x in (await ps.communicate())[0].split()]  # coturn, mosquitto
    n = 3 * (os.cpu_count() or 1)  # as three nodes computing on every core
    # started before this thread turns real-time: a child inherits its parent's policy
    busy = [await asyncio.create_subprocess_exec(sys.executable, "-c", BUSY) for _ in range(n)]
    try:
        await _realtime([0, *wan_pids])
        out["loaded"] = summary(await stun_rtts(home.hosts[0], count))
    finally:
        for proc in busy:
            proc.kill()
            await proc.wait()
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    out["busy_processes"] = n
    return out


async def link_setup(lab: NatLab, a_host: Any, b_host: Any, args: list[str], tag: str) -> float:
    """Seconds from both nodes ready to linked both ways."""
    a = await lab.start_node(f"{tag}-a", a_host, args)
    b = await lab.start_node(f"{tag}-b", b_host, args)
    t0 = time.monotonic()
    await lab.mesh.wait_connected(timeout=120, nodes=[a, b])
    took = time.monotonic() - t0
    for node in (a, b):
        lab.mesh.kill(node, signal.SIGTERM)
        await node.proc.wait()
    return took


async def measure(lab: NatLab, runs: int, ice: list[str]) -> dict[str, Any]:
    homes = lab.homes
    lan: list[float] = []
    nat: list[float] = []
    for i in range(runs):
        mesh = ["--mesh", f"setup{i}", *ice]
        lan.append(await link_setup(lab, homes[0].hosts[0], homes[0].hosts[1], mesh, f"l{i}"))
        mesh = ["--mesh", f"setupn{i}", *ice]
        nat.append(await link_setup(lab, homes[0].hosts[0], homes[1].hosts[0], mesh, f"n{i}"))
    lan_s, nat_s = statistics.median(lan), statistics.median(nat)
    return {
        "runs": runs,
        "same_lan_s": round(lan_s, 3),
        "across_nats_s": round(nat_s, 3),
        "ratio": round(nat_s / lan_s, 2),
        "same_lan_all": [round(x, 3) for x in lan],
        "across_nats_all": [round(x, 3) for x in nat],
        "nat": [h.nat for h in homes[:2]],
        "delay_ms": homes[0].delay_ms,
    }


async def move(src: Any, dst: Any, data: bytes) -> tuple[float, int]:
    """Put ``data`` on ``src``, fetch it to ``dst``: (seconds, bytes over the fast path)."""
    import hashlib

    import aiohttp

    async with src.session() as s:
        async with s.post(f"{src.api}/v1/objects?replicas=1&name=bench", data=data) as resp:
            oid = (await resp.json())["id"]
    async with dst.session(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.get(f"{dst.api}/v1/storage") as resp:
            before = (await resp.json())["fast_path_traffic"]["fetched"]
        t0 = time.monotonic()
        async with s.post(f"{dst.api}/v1/objects/{oid}/fetch") as resp:
            async for line in resp.content:
                if "error" in json.loads(line):
                    raise SystemExit(f"fetch failed: {line.decode()}")
        took = time.monotonic() - t0
        async with s.get(f"{dst.api}/v1/objects/{oid}") as resp:
            if hashlib.sha256(await resp.read()).digest() != hashlib.sha256(data).digest():
                raise SystemExit("the object arrived corrupted")
        async with s.get(f"{dst.api}/v1/storage") as resp:
            fast = (await resp.json())["fast_path_traffic"]["fetched"] - before
    return took, fast


async def bulk(lab: NatLab, mib: int, ice: list[str]) -> dict[str, Any]:
    """An object of ``mib`` MiB from a home's host to its LAN neighbour (the fast path) and
    to another home (the data channel through both NATs)."""
    import os

    args = ["--mesh", "bulk", *ice]
    homes = lab.homes
    a = await lab.start_node("bulk-a", homes[0].hosts[0], args)
    b = await lab.start_node("bulk-b", homes[0].hosts[1], args)
    c = await lab.start_node("bulk-c", homes[1].hosts[0], args)
    await lab.mesh.wait_connected(timeout=120, nodes=[a, b, c])
    data = os.urandom(mib << 20)
    lan_s, lan_fast = await move(a, b, data)
    nat_s, nat_fast = await move(a, c, data)
    return {
        "mib": mib,
        "lan_fast_path_mb_s": round(len(data) / lan_s / 1e6, 1),
        "across_nats_data_channel_mb_s": round(len(data) / nat_s / 1e6, 1),
        "ratio": round(lan_s / nat_s, 3),
        "fast_path_bytes": {"lan": lan_fast, "across_nats": nat_fast},
        "delay_ms": homes[0].delay_ms,
        "loss": homes[0].loss,
    }


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--homes", default="cone,cone", help="NAT of each home: cone or symmetric")
    p.add_argument("--hosts", type=int, default=2, help="hosts behind each home's router")
    p.add_argument("--public", type=int, default=0, help="hosts on the wan itself (no NAT)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per home uplink")
    p.add_argument("--loss", type=float, default=0.0, help="loss per home uplink (0..1)")
    p.add_argument("--link-setup", type=int, default=0, metavar="N", help="measure N times")
    p.add_argument("--turn", action="store_true", help="nodes get the TURN server too")
    p.add_argument(
        "--bulk", type=int, default=0, metavar="MIB",
        help="move an object of MIB MiB over the fast path (one LAN) and the data channel "
        "(across NATs); prints MB/s of each",
    )  # fmt: skip
    p.add_argument(
        "--delay-precision", type=int, default=0, metavar="N",
        help="N STUN round trips through the first home's router, idle and under CPU load",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--workdir", type=Path, default=None, help="logs and node data (default tmp)")
    args = p.parse_args()
    reason = lab_unavailable()
    if reason is not None:
        print(f"natlab: {reason}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="natlab-"))
    async with NatLab(workdir) as lab:
        for nat in args.homes.split(","):
            await lab.add_home(nat.strip(), args.hosts, args.delay_ms, args.loss)
        for _ in range(args.public):
            await lab.add_public_host()
        if args.delay_precision:
            result = await delay_precision(lab, args.delay_precision)
            print(json.dumps(result) if args.json else json.dumps(result, indent=2))
            return 0
        if args.bulk:
            ice = ["--ice-config", str(lab.ice_file(workdir / "ice.json", turn=args.turn))]
            result = await bulk(lab, args.bulk, ice)
            print(json.dumps(result) if args.json else json.dumps(result, indent=2))
            return 0
        if args.link_setup:
            ice = ["--ice-config", str(lab.ice_file(workdir / "ice.json", turn=args.turn))]
            result = await measure(lab, args.link_setup, ice)
            if args.json:
                print(json.dumps(result))
            else:
                print(f"link set-up, median of {result['runs']} (both nodes ready -> linked)")
                print(f"  same LAN (baseline)   {result['same_lan_s']:7.3f} s")
                print(f"  across {'/'.join(result['nat'])} NATs {result['across_nats_s']:7.3f} s"
                      f"  ({result['ratio']:.2f}x)")  # fmt: skip
            return 0
        print(json.dumps(lab.describe(), indent=None if args.json else 2), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print("lab up; Ctrl-C tears it down", file=sys.stderr)
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
