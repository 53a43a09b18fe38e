"""Storage peers, acceptance: 5 node processes in two zones (issue 6, items 1-4).

One mesh for the whole story (starting 5 processes is the slow part): a corrupted chunk is
detected, its holder penalized and bypassed; an object put with 2 replicas is fetched by a
third peer from the nearer holder; killing that holder mid-transfer still completes; the
replica count is repaired after it left. Holders serve at a capped rate (``--serve-rate``) so
that "mid-transfer" is a window of seconds, not milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for

pytestmark = pytest.mark.network

MiB = 1 << 20
ZONE_ARGS = ["--egress-price", "0.1", "--serve-rate", "4M"]


async def put(mesh: LocalMesh, node: NodeProcess, data: bytes, replicas: int) -> str:
    async with node.session() as s:
        url = f"{node.api}/v1/objects?replicas={replicas}&name=t"
        async with s.post(url, data=data) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["id"])


async def durable(mesh: LocalMesh, node: NodeProcess, oid: str) -> list[dict[str, Any]]:
    return [h for h in await mesh.get(node, f"/v1/objects/{oid}/holders") if h["durable"]]


async def fetch_events(node: NodeProcess, oid: str):  # type: ignore[no-untyped-def]
    async with node.session(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(f"{node.api}/v1/objects/{oid}/fetch") as resp:
            assert resp.status == 200
            async for line in resp.content:
                yield json.loads(line)


async def read_object(node: NodeProcess, oid: str) -> bytes:
    async with node.session() as s:
        async with s.get(f"{node.api}/v1/objects/{oid}") as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()


def manifest_chunks(node: NodeProcess, oid: str) -> list[str]:
    doc = json.loads((node.data_dir / "objects" / "manifests" / oid).read_bytes())
    return [c[0] for c in doc["chunks"]]


def corrupt_chunk(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))  # the same length: only the hash can tell


async def test_two_zones_nearest_fetch_corruption_failover_and_repair(local_mesh: LocalMesh):
    mesh = local_mesh
    a = await mesh.start_nodes([f"a{i}" for i in range(3)], ["--zone", "a", *ZONE_ARGS])
    b = await mesh.start_nodes([f"b{i}" for i in range(2)], ["--zone", "b", *ZONE_ARGS])
    await mesh.wait_connected(timeout=40)
    zone = {n.peer_id: z for z, group in (("a", a), ("b", b)) for n in group}

    # -- a corrupted chunk: detected, its holder penalized and bypassed --------------------
    small = os.urandom(6 * MiB)
    y = await put(mesh, b[0], small, replicas=2)
    holders = await wait_for(
        lambda: _at_least(mesh, b[0], y, 2), 30, "object Y to reach 2 replicas"
    )
    other = next(h["peer_id"] for h in holders if h["peer_id"] != b[0].peer_id)
    assert zone[other] == "a"  # replicas spread over zones
    corrupt_chunk(b[0].data_dir / "objects" / "chunks" / manifest_chunks(b[0], y)[0])

    done = None
    async for event in fetch_events(b[1], y):
        assert "error" not in event, event
        done = event.get("done", done)
    assert done is not None
    assert done["corrupt"] == {b[0].peer_id: 1}
    assert done["sources"][other] == 2 * MiB  # only the bad chunk crossed zones
    assert done["sources"][b[0].peer_id] == 4 * MiB  # the rest came from the nearer holder
    status = await mesh.get(b[1], "/v1/storage")
    assert status["penalties"].get(b[0].peer_id, 0) > 0
    assert hashlib.sha256(await read_object(b[1], y)).digest() == hashlib.sha256(small).digest()

    # -- nearest holder, then it dies mid-transfer -----------------------------------------
    big = os.urandom(16 * MiB)
    x = await put(mesh, a[0], big, replicas=2)
    holders = await wait_for(
        lambda: _at_least(mesh, a[0], x, 2), 40, "object X to reach 2 replicas"
    )
    far = next(h["peer_id"] for h in holders if h["peer_id"] != a[0].peer_id)
    assert zone[far] == "b"
    killed_at = None
    done = None
    async for event in fetch_events(a[1], x):
        assert "error" not in event, event
        if "progress" in event and killed_at is None and event["progress"]["done"] > 0:
            # So far every byte came from the holder in the fetcher's own zone.
            assert set(event["progress"]["sources"]) == {a[0].peer_id}
            killed_at = event["progress"]["done"]
            mesh.kill(a[0], signal.SIGKILL)
        done = event.get("done", done)
    assert killed_at is not None and killed_at < len(big)
    assert done is not None and done["size"] == len(big)
    assert done["sources"].get(a[0].peer_id, 0) > 0 and done["sources"].get(far, 0) > 0
    assert a[0].peer_id in done["failed_sources"]
    assert await read_object(a[1], x) == big

    accounting = await mesh.get(a[1], "/v1/accounting")
    assert accounting["by_source"][a[0].peer_id] >= killed_at
    assert accounting["by_zone_pair"].get("b->a", 0) >= done["sources"][far]

    # -- repair: a0 left, the surviving replica brings the count back to 2 -----------------
    live = [n for n in a[1:] + b]

    async def repaired() -> bool:
        view = await durable(mesh, b[0], x)
        ids = {h["peer_id"] for h in view}
        return a[0].peer_id not in ids and len(ids) >= 2

    await wait_for(repaired, 40, "X to be repaired to 2 live replicas")
    pinned = []
    for n in live:
        objs = {o["id"]: o for o in await mesh.get(n, "/v1/objects")}
        if x in objs and objs[x]["pinned"] and objs[x]["complete"]:
            pinned.append(n.peer_id)
    assert len(pinned) >= 2


async def _at_least(mesh: LocalMesh, node: NodeProcess, oid: str, n: int) -> Any:
    view = await durable(mesh, node, oid)
    return view if len(view) >= n else None
