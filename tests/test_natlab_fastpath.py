"""The fast path across machines, in the NAT lab: a node's fast path listens where it is
announced (its LAN address, not loopback, with the default loopback API), so an object moves
over it between hosts of one home and from a public host with the port open; where it
cannot be reached (another home's private address, a host whose firewall drops inbound) the
fetch falls back to the data channel after one short probe, with no user step. Every
object is checked by hash."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import aiohttp
import pytest

from mesh.launch.localmesh import NodeProcess
from mesh.launch.natlab import NatLab

pytestmark = [pytest.mark.network, pytest.mark.natlab]
MiB = 1 << 20


async def put(node: NodeProcess, data: bytes) -> str:
    async with node.session() as s:
        async with s.post(f"{node.api}/v1/objects?replicas=1&name=lab", data=data) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["id"])


async def fetch(node: NodeProcess, oid: str) -> dict[str, Any]:
    """Fetch ``oid`` to ``node``; the fetch's final report."""
    done = None
    async with node.session(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(f"{node.api}/v1/objects/{oid}/fetch") as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                event = json.loads(line)
                assert "error" not in event, event
                done = event.get("done", done)
    assert done is not None
    return dict(done)


async def digest(node: NodeProcess, oid: str) -> bytes:
    async with node.session() as s:
        async with s.get(f"{node.api}/v1/objects/{oid}") as resp:
            assert resp.status == 200, await resp.text()
            return hashlib.sha256(await resp.read()).digest()


async def traffic(lab: NatLab, node: NodeProcess) -> dict[str, Any]:
    return dict((await lab.mesh.get(node, "/v1/storage"))["fast_path_traffic"])


async def moved(lab: NatLab, src: NodeProcess, dst: NodeProcess) -> tuple[int, dict[str, Any]]:
    """An object put on ``src`` and fetched by ``dst``, intact: (bytes ``dst`` read over
    the fast path meanwhile, ``dst``'s fast-path traffic after)."""
    data = os.urandom(3 * MiB)
    oid = await put(src, data)
    before = (await traffic(lab, dst))["fetched"]
    done = await fetch(dst, oid)
    assert done["sources"] == {src.peer_id: len(data)}
    assert await digest(dst, oid) == hashlib.sha256(data).digest()
    after = await traffic(lab, dst)
    return after["fetched"] - before, after


async def test_objects_move_over_the_fast_path_where_reachable_else_the_link(
    natlab: NatLab,
) -> None:
    home, other = await natlab.add_home("cone", hosts=2), await natlab.add_home("cone")
    open_host = await natlab.add_public_host()
    walled = await natlab.add_public_host(firewall=True)
    args = ["--mesh", "fast", "--stun", natlab.stun_url]
    hosts = [home.hosts[0], home.hosts[1], other.hosts[0], open_host, walled]
    # the defaults: a loopback API
    a, b, c, p, w = await natlab.start_nodes(list(zip("abcpw", hosts, strict=True)), args)
    await natlab.mesh.wait_connected(timeout=90, nodes=[a, b, c, p, w])
    fast = (await natlab.mesh.get(a, "/v1/storage"))["fast_path"]
    assert fast.startswith(home.hosts[0].ip + ":")  # announced at its LAN address

    # one home's LAN: over the fast path
    fetched, _ = await moved(natlab, a, b)
    assert fetched >= 3 * MiB
    # from another home: a's address is private there, so the data channel
    fetched, after = await moved(natlab, a, c)
    assert fetched == 0 and a.peer_id in after["unreachable"]
    # from a public host with the port open: over the fast path, out through c's NAT
    fetched, after = await moved(natlab, p, c)
    assert fetched >= 3 * MiB and p.peer_id not in after["unreachable"]
    # from a public host whose firewall drops inbound: the data channel
    fetched, after = await moved(natlab, w, c)
    assert fetched == 0 and w.peer_id in after["unreachable"]
    await c.wait_logged(f"no fast path to {w.peer_id[:12]}", f"no fast path to {a.peer_id[:12]}")
