"""Model shards are objects of the one store, across real node processes (issue 12, scope 1).

One mesh of four nodes: ``a`` (honest) and ``e`` (every chunk it serves has a byte flipped:
tests/fixtures/evil_store_node.py) both add model M1; ``a`` alone adds M2.

1. ``c`` pulls an M1 shard from both holders: it arrives intact, ``e`` is penalized.
2. ``edgemesh get <shard object id>`` on ``d`` fetches a shard like any object.
3. An M2 shard pinned with replicas=2 survives its first holder's exit: the replica serves it
   and the fetched file opens as a GGUF shard from the store's own path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for
from runtimes.shards import ShardSpec, sha256_file
from runtimes.testmodels import TestModelSpec, write_test_model

pytestmark = pytest.mark.network


async def shard_objects(mesh: LocalMesh, node: NodeProcess) -> dict[str, dict[str, Any]]:
    """The node's shard objects (format gguf) by object id."""
    return {o["id"]: o for o in await mesh.get(node, "/v1/objects") if o["format"] == "gguf"}


async def fetch(node: NodeProcess, oid: str) -> dict[str, Any]:
    done: dict[str, Any] | None = None
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120), headers=node.auth_headers()
    ) as s:
        async with s.post(f"{node.api}/v1/objects/{oid}/fetch") as resp:
            assert resp.status == 200
            async for line in resp.content:
                event = json.loads(line)
                assert "error" not in event, event
                done = event.get("done", done)
    assert done is not None
    return done


async def test_shards_are_objects_pulled_verified_replicated_and_got(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    mesh = local_mesh
    wide = TestModelSpec(arch="llama", d_model=768, n_heads=12, n_kv_heads=4, d_ff=3072, seed=3)
    m1 = write_test_model(tmp_path / "m1.gguf", wide)
    m2 = write_test_model(tmp_path / "m2.gguf", "llama")
    a, c, d = await mesh.start_nodes(["a", "c", "d"])
    e = await mesh.start_node("e", module="tests.fixtures.evil_store_node")
    await mesh.wait_connected(timeout=40)
    await mesh.post(a, "/v1/models", {"path": str(m1), "name": "m1"})
    await mesh.post(e, "/v1/models", {"path": str(m1), "name": "m1"})
    on_a = await shard_objects(mesh, a)
    on_e = await shard_objects(mesh, e)
    assert on_a and on_a.keys() == on_e.keys()  # the same bytes: the same object ids
    assert all(o["pinned"] and o["complete"] for o in on_a.values())  # added here: pinned
    # No second copy: the shards live only as the store's packed data files.
    assert not list((a.data_dir / "store").rglob("*.gguf"))

    # -- 1. a shard pulled from two holders, one corrupting every chunk it serves ----------
    big = max(on_a.values(), key=lambda o: o["size"])
    assert big["chunks"] >= 4  # enough chunks for both holders to serve some
    sha = big["name"].removesuffix(".gguf")
    done = await fetch(c, big["id"])
    assert done["corrupt"].get(e.peer_id, 0) > 0  # e served bad bytes, caught by the hash
    assert set(done["sources"]) == {a.peer_id}  # every byte kept came from the honest holder
    status = await mesh.get(c, "/v1/storage")
    assert status["penalties"].get(e.peer_id, 0) > 0
    packed = c.data_dir / "objects" / "packed" / f"{big['id']}.data"
    assert sha256_file(packed) == sha  # the shard file's own hash, as a runtime checks it

    # -- 2. edgemesh get <shard object id> ------------------------------------------------
    small = min(on_a.values(), key=lambda o: o["size"])
    out = tmp_path / "got.gguf"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        "get",
        small["id"],
        "-o",
        str(out),
        "--api",
        d.api,
        env=dict(os.environ, EDGEMESH_API_TOKEN=d.token),
    )
    assert await asyncio.wait_for(proc.wait(), 120) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == small["name"].removesuffix(".gguf")

    # -- 3. a replica survives its first holder's exit ------------------------------------
    await mesh.post(a, "/v1/models", {"path": str(m2), "name": "m2"})
    only_a = [o for oid, o in (await shard_objects(mesh, a)).items() if oid not in on_e]
    target = max(only_a, key=lambda o: o["size"])
    async with aiohttp.ClientSession(headers=a.auth_headers()) as s:
        async with s.post(f"{a.api}/v1/objects/{target['id']}/pin?replicas=2") as resp:
            assert resp.status == 200, await resp.text()

    async def replica() -> NodeProcess | None:
        for n in (c, d):
            o = (await shard_objects(mesh, n)).get(target["id"])
            if o is not None and o["pinned"] and o["complete"]:
                return n
        return None

    holder = await wait_for(replica, 40, "the shard to reach a second, pinned replica")
    other = d if holder is c else c
    mesh.kill(a, signal.SIGKILL)
    await wait_for(
        lambda: _gone(mesh, other, a.peer_id), 30, "the puller to see the first holder leave"
    )
    done = await fetch(other, target["id"])
    # From the replica; or nothing to pull: once the first holder is gone the replica is
    # below its factor and leads the repair, which may already have asked ``other`` for a copy.
    assert set(done["sources"]) <= {holder.peer_id}, done
    path = other.data_dir / "objects" / "packed" / f"{target['id']}.data"
    assert sha256_file(path) == target["name"].removesuffix(".gguf")
    spec = ShardSpec.open(path)  # a runtime opens the store's file as it is
    assert spec.tensors


async def _gone(mesh: LocalMesh, node: NodeProcess, peer: str) -> bool:
    return peer not in await mesh.connected_ids(node)
