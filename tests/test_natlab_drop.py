"""Issue 15, network changes: a home's uplink drops for 5 s in the middle of a generation.

Two homes behind cone NATs (the lab of mesh/launch/natlab.py) run a generation split over
both; the stage's home router then drops everything to and from the wan for 5 s (NatLab.cut:
an ISP outage, a cable pulled upstream). Once the network is back: the link between the
homes must be back within 5 s, the mesh must serve the next split generation at once, and
the interrupted generation must fail over or finish, either way with the fault-free tokens.

Measured before the fix (issue 15, a home cut for 4 s): the links came back 41 s after the
network did, the first redial's offer having been built while the home was offline; in this
test, a 10 s outage: 19.5 s (dials and pending handshakes begun offline held both sides for
their timeouts), a 5 s one: 0.75 s (the links survive or are redialled at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.launch.localmesh import NodeProcess
from mesh.launch.natlab import NatLab
from runtimes.testmodels import write_test_model

pytestmark = [pytest.mark.network, pytest.mark.natlab, pytest.mark.faults]
log = logging.getLogger(__name__)

PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7]
RELINK_BOUND_S = 5.0  # the acceptance bound: link back this long after the network
# A 10 s outage (beyond the 5 s case): 2.7-3.9 s in 5 runs alone, but 8.1 s once in a
# full clean-clone run: the online side's dial, sent to the broker while the cut-off home's
# broker connection was down, waited out its 10 s signaling timeout. Now the offer goes again
# when the cut-off home's new broker session announces itself, and an answer the broken
# connection could not send goes on the next one: 0.44, 3.99 and 3.35 s in 3 runs. Before
# this work it took 19.5 s. The bound says "well before the old behaviour"; the 5 s case
# keeps the acceptance bound.
RELINK_BOUND_10S = 10.0
GENERATION_DEADLINE = 120.0


async def generate(
    node: NodeProcess,
    body: dict[str, Any],
    stamps: list[float] | None = None,
    route: list[str] | None = None,
    tokens_in: asyncio.Event | None = None,
) -> dict[str, Any]:
    """One streamed generation's summary; ``stamps`` gets each token's arrival time, ``route``
    the peers of its first route; ``tokens_in`` is set at the third token."""
    last: dict[str, Any] = {}
    async with asyncio.timeout(GENERATION_DEADLINE), node.session() as s:
        async with s.post(f"{node.api}/v1/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if not line.strip():
                    continue
                last = json.loads(line)
                if "token" in last and stamps is not None:
                    stamps.append(time.monotonic())
                    if tokens_in is not None and len(stamps) >= 3:
                        tokens_in.set()
                if "route" in last and route is not None and not route:
                    route.extend(s["peer_id"] for s in last["route"])
    assert "error" not in last, last
    return last


async def round_trip(node: NodeProcess, peer: str) -> bool:
    """Whether one echo RPC from ``node`` to ``peer`` comes back within a second."""
    body = {"peer": peer, "size": 64, "count": 1}
    try:
        async with node.session(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
            async with s.post(f"{node.api}/v1/bench/rtt", json=body) as resp:
                return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def relinked_after(pairs: list[tuple[NodeProcess, NodeProcess]], timeout: float) -> float:
    """Seconds from now until a round trip works again from each ``a`` to its ``b`` (polled,
    each try bounded)."""
    t0 = time.monotonic()
    for a, b in pairs:
        while not await round_trip(a, b.peer_id):
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"no link {a.data_dir.name} -> {b.data_dir.name} after {timeout} s"
                )
            await asyncio.sleep(0.1)  # polling period of a condition with a deadline
    return time.monotonic() - t0


@pytest.mark.parametrize("outage_s", [5.0, 10.0], ids=["5s", "10s"])
async def test_home_offline_mid_generation(natlab: NatLab, tmp_path: Path, outage_s: float) -> None:
    """Three homes (one a spare for the failover); the home of the generation's second
    stage goes offline for ``outage_s``. 5 s is the acceptance case (links may survive it:
    RPC declares a silent peer dead after 6 s); at 10 s every link of that home is declared
    dead and redialled while it is offline (before the fix: back 19.5 s after the network)."""
    model = write_test_model(tmp_path / "llama.gguf", "llama")
    homes = [await natlab.add_home("cone") for _ in range(3)]
    args = ["--mesh", "drop", "--stun", natlab.stun_url]
    hosts = [(n, h.hosts[0]) for n, h in zip("abc", homes, strict=True)]
    nodes = await natlab.start_nodes(hosts, args)
    await natlab.mesh.wait_connected(timeout=60, nodes=nodes)
    a = nodes[0]
    await natlab.mesh.post(a, "/v1/models", {"path": str(model), "name": "tiny"})
    body = {"model": "tiny", "tokens": PROMPT, "max_tokens": 200, "split": 2, "temperature": 0}
    clean = await generate(a, body)
    assert len(clean["tokens"]) > 20  # room for the cut to land mid-generation

    stamps: list[float] = []
    route: list[str] = []
    tokens_in = asyncio.Event()
    run = asyncio.ensure_future(generate(a, body, stamps, route, tokens_in))
    try:
        async with asyncio.timeout(GENERATION_DEADLINE):  # a few tokens in
            await asyncio.wait([run, asyncio.ensure_future(tokens_in.wait())],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        (victim,) = [n for n in nodes if n.peer_id in route and n is not a]
        home = homes[nodes.index(victim)]
        await natlab.cut(home)
        cut_at = time.monotonic()
        await asyncio.sleep(outage_s)  # the outage itself: its length is the fault
        await natlab.restore(home)
        back_at = time.monotonic()
        relink_s = await relinked_after([(n, victim) for n in nodes if n is not victim], 90)
        interrupted = await run
    finally:
        for h in homes:
            await natlab.restore(h)
        run.cancel()
    tokens_before_cut = sum(t < cut_at for t in stamps)
    assert tokens_before_cut < len(clean["tokens"]), "the generation ended before the cut"
    finished_s = stamps[-1] - back_at

    t0 = time.monotonic()
    after = await generate(a, body)
    next_s = time.monotonic() - t0
    log.warning(
        "LAB home offline %.0f s mid-generation (%d tokens in): links back %.2f s after the "
        "network; the interrupted generation's last token %.2f s after it (reroutes %s); "
        "the next split generation served in %.2f s",
        outage_s,
        tokens_before_cut,
        relink_s,
        finished_s,
        [r["failed"][:8] for r in interrupted["reroutes"]],
        next_s,
    )
    assert interrupted["tokens"] == clean["tokens"]
    assert after["tokens"] == clean["tokens"]
    bound = RELINK_BOUND_S if outage_s <= 5 else RELINK_BOUND_10S
    assert relink_s <= bound, f"links back {relink_s:.1f} s after the network"
    assert next_s < 5.0, f"the next generation took {next_s:.1f} s"
