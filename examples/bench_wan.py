"""WAN benchmark in the NAT lab: decode and TTFT for 1, 2 and 3 stages over delay and loss.

Every node sits in a home of its own behind a cone NAT (``mesh.launch.natlab``); each home's
router delays what it forwards by half the one-way delay (the lab's NFQUEUE delayer: this
kernel has no netem) and drops a share of it (an iptables ``statistic`` rule), so any two
nodes are the whole delay apart one way and lose the given fraction of packets. One lab per
stage count; the conditions run one after another on the same mesh, lossless first.

Beside each figure, the floor measured in the same run: the stages' own compute per token
(their traces) plus the one-way delay times the ring's crossings (coordinator -> stages ->
coordinator, counting each move between nodes). Goals (the networks issue): per-token time
<= floor + 1 ms per crossing at every delay; at 1 % loss no token gap over 250 ms and a mean
<= 1.2x the lossless figure at the same delay.

Needs root and the lab's tools (ip, iptables with NFQUEUE, mosquitto, coturn). Writes
docs/bench/wan.json and the "WAN" section of docs/benchmarks.md (``--no-docs``: neither).

    sudo python examples/bench_wan.py [--stages 1,2,3] [--delays 0,5,20] [--loss 0.01]
                                      [--loss-delay 5] [--max-tokens 48] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_latency import generate  # noqa: E402  (the summary and the client's token gaps)
from benchlib import docs_dir, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from mesh.launch.localmesh import NodeProcess, wait_for  # noqa: E402
from mesh.launch.natlab import NatLab, lab_unavailable  # noqa: E402

SECTION = "WAN (examples/bench_wan.py)"
PROMPT = (
    "The history of the city begins with a small settlement on the river, where traders met "
    "to exchange salt, grain and cloth. Over the centuries the town grew into"
)
HOP_ALLOWANCE_MS = 1.0  # the goal's allowance per crossing above the floor
MAX_GAP_MS = 250.0  # the goal's longest token gap at 1 % loss
LOSS_RATIO = 1.2  # the goal's mean per-token time at 1 % loss over the lossless one
ECHO_SIZES = (2560, 21_000, 84_000, 330_000)  # a decode step's activation up to a long prompt's


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def crossings(coordinator: str, stages: list[dict[str, Any]]) -> int:
    """Moves between nodes around the ring: coordinator -> each stage -> coordinator."""
    ring = [coordinator, *(s["peer_id"] for s in stages), coordinator]
    return sum(1 for a, b in zip(ring, ring[1:], strict=False) if a != b)


def ring(coordinator: str, stages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The ring's crossings as (from, to) peer ids."""
    ids = [coordinator, *(s["peer_id"] for s in stages), coordinator]
    return [(a, b) for a, b in zip(ids, ids[1:], strict=False) if a != b]


async def path_ms(lab: NatLab, nodes: list[NodeProcess], hops: list[tuple[str, str]]) -> float:
    """The ring's one-way time as the links measure it now: half the median round trip of a
    2.5 KiB echo (one Gemma activation) on each crossing. The lab's delayer is a user-space
    process on every router, so a path takes somewhat longer than its nominal delay."""
    by_id = {n.peer_id: n for n in nodes}
    total = 0.0
    for a, b in hops:
        got = await lab.mesh.post(by_id[a], "/v1/bench/rtt", {"peer": b, "size": 2560, "count": 9})
        total += statistics.median(got["rtt_ms"]) / 2
    return total


def figures(
    run: dict[str, Any], coordinator: str, delay_ms: float, measured_ms: float
) -> dict[str, Any]:
    compute = sum(float(v) for v in run["stage_ms"].values())
    hops = crossings(coordinator, run["stages"])
    step = 1000.0 / run["tokens_per_s"] if run["tokens_per_s"] else float("inf")
    gaps = run["gaps_ms"]
    return {
        "tokens": len(run["tokens"]),
        "tokens_per_s": run["tokens_per_s"],
        "ttft_ms": run["ttft_ms"],
        "phases_ms": run.get("phases_ms", {}),
        "step_ms": round(step, 2),
        "compute_ms": round(compute, 2),
        "crossings": hops,
        "floor_ms": round(compute + hops * delay_ms, 2),
        "over_floor_ms": round(step - compute - hops * delay_ms, 2),
        "path_ms": round(measured_ms, 2),  # the ring's one-way time, measured on its links
        "over_path_ms": round(step - compute - measured_ms, 2),
        "max_gap_ms": round(max(gaps), 1) if gaps else None,
        "p99_gap_ms": round(sorted(gaps)[int(0.99 * (len(gaps) - 1))], 1) if gaps else None,
        "median_gap_ms": round(statistics.median(gaps), 2) if gaps else None,
    }


async def settled(lab: NatLab, nodes: list[NodeProcess], delay_ms: float) -> None:
    """Wait until every link reads the new delay as its path (``path_ms``: the fastest quiet
    ping of the last seconds), which sets its frame size (mesh.net.rpc.LinkParams): a lab
    path changes in an instant, where a real one would not."""

    async def every_link_knows() -> bool:
        for node in nodes:
            for peer in await lab.mesh.get(node, "/v1/peers"):
                path = peer.get("path_ms")
                if peer.get("state") == "connected" and (path is None or path < 1.8 * delay_ms):
                    return False
        return True

    if len(nodes) > 1:
        await wait_for(every_link_knows, 60, f"the links to read a {delay_ms:g} ms path", 0.5)


async def message_rtts(lab: NatLab, a: NodeProcess, b: NodeProcess) -> dict[int, float]:
    """Median round trip (ms) of an echo of each size on one crossing: one round trip is the
    floor, as long as the path's congestion window holds the message."""
    out = {}
    for size in ECHO_SIZES:
        got = await lab.mesh.post(a, "/v1/bench/rtt", {"peer": b.peer_id, "size": size, "count": 9})
        out[size] = round(statistics.median(got["rtt_ms"]), 2)
    return out


async def set_network(lab: NatLab, delay_ms: float, loss: float) -> None:
    """Every home's router: half the one-way delay, and a drop rate such that a path through
    two routers loses ``loss``."""
    per_router = 1 - (1 - loss) ** 0.5 if loss else 0.0
    for home in lab.homes:
        await lab.set_link(home, delay_ms / 2, per_router)


async def one_lab(
    n: int, model: Path, base: Path, conditions: list[tuple[float, float]], opts: argparse.Namespace
) -> list[dict[str, Any]]:
    """n nodes, each in its own home; every condition measured on the same mesh."""
    node_args = ["--runtime", "onnx", "--copies", opts.copies]
    if opts.threads:
        node_args += ["--threads", str(opts.threads)]
    body: dict[str, Any] = {
        "model": "bench-model",
        "prompt": PROMPT,
        "max_tokens": opts.max_tokens,
        "temperature": 0.0,
    }
    if n > 1:
        body["split"] = n
    out = []
    async with NatLab(base / f"stages{n}") as lab:
        hosts = [((await lab.add_home("cone")).hosts[0]) for _ in range(n)]
        args = ["--mesh", "wan", "--stun", lab.stun_url, *node_args]
        nodes = await lab.start_nodes([(f"w{n}-{i}", h) for i, h in enumerate(hosts)], args)
        if n > 1:
            await lab.mesh.wait_connected(opts.timeout)
        first = nodes[0]
        await lab.mesh.post(first, "/v1/models", {"path": str(model), "name": "bench-model"})
        reference: list[int] | None = None
        for delay_ms, loss in conditions:
            await set_network(lab, delay_ms, loss)
            await settled(lab, nodes, delay_ms)
            await generate(first, dict(body, max_tokens=2))  # route, pulls, loading
            runs = [await generate(first, body) for _ in range(opts.repeats)]
            run = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            measured = await path_ms(lab, nodes, ring(first.peer_id, run["stages"]))
            row = {"stages": n, "delay_ms": delay_ms, "loss": loss}
            row.update(figures(run, first.peer_id, delay_ms, measured))
            if n == 2:  # once a condition: the first crossing of the two-stage ring
                row["echo_ms"] = await message_rtts(lab, nodes[0], nodes[1])
            row["same_tokens"] = reference is None or run["tokens"] == reference
            reference = reference or run["tokens"]
            out.append(row)
            say(
                f"  {n} stage(s), {delay_ms:g} ms, loss {loss:g}: {row['tokens_per_s']} tok/s, "
                f"step {row['step_ms']} ms (floor {row['floor_ms']}), TTFT {row['ttft_ms']} ms, "
                f"max gap {row['max_gap_ms']} ms, phases {row['phases_ms']}"
            )
    return out


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["loss"] or not r["crossings"]:
            continue  # one peer holding every stage: the baseline, no hop to allow for
        allowed = r["crossings"] * HOP_ALLOWANCE_MS
        ok = r["over_floor_ms"] <= allowed
        ok_path = r["over_path_ms"] <= allowed
        lines.append(
            f"- {r['stages']} stage(s) at {r['delay_ms']:g} ms: {r['over_floor_ms']:+.2f} ms a "
            f"token over the nominal floor, {r['over_path_ms']:+.2f} ms over the measured ring; "
            f"allowance {allowed:.0f} ms: {'met' if ok else 'not met'} / "
            f"{'met' if ok_path else 'not met'}."
        )
    for r in rows:
        if not r["loss"]:
            continue
        base = next(
            (x for x in rows if x["stages"] == r["stages"] and x["delay_ms"] == r["delay_ms"]
             and not x["loss"]),
            None,
        )  # fmt: skip
        gap_ok = r["max_gap_ms"] is not None and r["max_gap_ms"] <= MAX_GAP_MS
        if base is None:
            mean = "no lossless run at that delay to compare the mean with"
        else:
            ratio = r["step_ms"] / base["step_ms"]
            met = "met" if ratio <= LOSS_RATIO else "not met"
            mean = f"mean {ratio:.2f}x the lossless step (goal <= {LOSS_RATIO}: {met})"
        lines.append(
            f"- {r['stages']} stage(s) at {r['delay_ms']:g} ms and {100 * r['loss']:g} % loss: "
            f"longest gap {r['max_gap_ms']} ms (goal <= {MAX_GAP_MS:g}: "
            f"{'met' if gap_ok else 'not met'}), {mean}."
        )
    return lines


def report(result: dict[str, Any]) -> str:
    head = ["stages", "one-way ms", "loss", "tok/s", "TTFT ms", "step ms", "floor ms",
            "over floor ms", "crossings", "ring one-way, measured ms", "over it ms",
            "max gap ms", "same tokens"]  # fmt: skip
    rows = [
        [r["stages"], r["delay_ms"], f"{100 * r['loss']:g} %", r["tokens_per_s"], r["ttft_ms"],
         r["step_ms"], r["floor_ms"], r["over_floor_ms"], r["crossings"], r["path_ms"],
         r["over_path_ms"], r["max_gap_ms"], "yes" if r["same_tokens"] else "NO"]
        for r in result["rows"]
    ]  # fmt: skip
    intro = (
        f"Measured {result['date']} on {result['machine']}; {result['model']} on onnx, "
        f"greedy, {result['max_tokens']} tokens, median of {result['repeats']} runs; every node "
        "in its own NAT lab home. floor = the stages' compute a token (same run) + one-way "
        "delay x crossings; the ring's measured one-way time is half the round trip of a "
        "2.5 KiB echo on each crossing, right after (the lab's user-space delayer adds to the "
        "nominal delay)."
    )
    echo = [r for r in result["rows"] if r.get("echo_ms")]
    lines = [intro, "", markdown_table(head, rows), "", *verdicts(result["rows"])]
    if echo:
        sizes = [int(k) for k in echo[0]["echo_ms"]]
        lines += [
            "",
            "Round trip of an echo RPC on one crossing, by message size (median of 9, ms; "
            "x: over the 2.5 KiB echo, one round trip):",
            "",
            markdown_table(
                ["one-way ms", "loss", *(f"{s / 1000:g} KB" for s in sizes)],
                [
                    [r["delay_ms"], f"{100 * r['loss']:g} %"]
                    + [echo_cell(r["echo_ms"], s, sizes[0]) for s in sizes]
                    for r in echo
                ],
            ),
        ]
    return "\n".join(lines)


def echo_cell(rtts: dict[Any, float], size: int, base: int) -> str:
    """``ms (ratio x)``; the keys are ints, or strs once read back from JSON."""
    ms, floor = rtts.get(size, rtts.get(str(size))), rtts.get(base, rtts.get(str(base)))
    return f"{ms} ({ms / floor:.1f}x)" if ms and floor else str(ms)


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    from runtimes.models import gemma3_270m_path

    model = Path(opts.model) if opts.model else gemma3_270m_path()
    conditions = [(d, 0.0) for d in opts.delays] + [(opts.loss_delay, opts.loss)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        for n in opts.stages:
            say(f"{n} stage(s)")
            rows += await one_lab(n, model, Path(tmp), conditions, opts)
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": model.name,
        "max_tokens": opts.max_tokens,
        "repeats": opts.repeats,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--delays", default="0,5,20", help="one-way delays (ms), lossless")
    ap.add_argument("--loss", type=float, default=0.01, help="packet loss between two nodes")
    ap.add_argument("--loss-delay", type=float, default=5.0, help="one-way delay with loss")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--copies", choices=("auto", "on", "off"), default="auto", help="nodes' --copies"
    )
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--no-docs", action="store_true")
    opts = ap.parse_args()
    opts.stages = [int(x) for x in opts.stages.split(",")]
    opts.delays = [float(x) for x in opts.delays.split(",")]
    why = lab_unavailable()
    if why:
        raise SystemExit(f"the NAT lab cannot run here: {why}")
    result = asyncio.run(main_async(opts))
    text = report(result)
    print(text)
    if not opts.no_docs:
        write_json(docs_dir() / "bench" / "wan.json", result)
        update_benchmarks_md(SECTION, text)


if __name__ == "__main__":
    main()
