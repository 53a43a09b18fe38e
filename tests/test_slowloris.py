"""Slowloris against a real node process (issue 8): connections held open that never finish
their handshake or request, on the fast path, the signaling endpoint and the HTTP API. The
node must keep serving a legitimate peer and client, and close the held fast-path connections
by its own deadlines. Measured figures are logged (``-o log_cli=true`` shows them)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest

from mesh.launch.localmesh import LocalMesh, wait_for
from mesh.net.signaling import HTTP_IDLE_DEADLINE
from mesh.storage.fastpath import FastLimits

pytestmark = [pytest.mark.network, pytest.mark.badinput]
log = logging.getLogger(__name__)

HELD_FAST = 200
HELD_HTTP = 64


async def _hold(host: str, port: int, first_bytes: bytes) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(first_bytes)  # a start, never the rest
    await writer.drain()
    return reader, writer


async def _closed_after(reader: asyncio.StreamReader, t0: float, limit: float) -> float | None:
    """Seconds until the node closed this connection (EOF or reset); None if still open."""
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def test_held_connections_do_not_stop_a_node_serving(local_mesh: LocalMesh) -> None:
    a = await local_mesh.start_node("a")
    b = await local_mesh.start_node("b")
    await local_mesh.wait_connected(timeout=30)
    http = aiohttp.ClientSession()
    try:
        data = bytes(range(256)) * 4096  # 1 MiB
        async with http.post(
            f"{a.api}/v1/objects?name=x", data=data, headers=a.auth_headers()
        ) as resp:
            assert resp.status == 200
            oid = (await resp.json())["id"]
        fast = (await local_mesh.get(a, "/v1/storage"))["fast_path"]
        assert fast, "node a offers no fast path"

        # The attack: half-open hellos on the fast path, half-sent requests on signaling/API.
        t_attack = time.monotonic()
        held_fast = [await _hold(*_split(fast), b"\x00" * 40) for _ in range(HELD_FAST)]
        sig = _split(a.signaling)
        api = _split(a.api.removeprefix("http://"))
        partial = b"GET /edgemesh/info HTTP/1.1\r\nHost: x\r\nX-Slow: "
        held_sig = [await _hold(*sig, partial) for _ in range(HELD_HTTP)]
        held_api = [await _hold(*api, partial) for _ in range(HELD_HTTP)]

        # A legitimate peer pulls the object from a; a client uses a's API and signaling.
        t0 = time.monotonic()
        async with http.post(f"{b.api}/v1/objects/{oid}/fetch", headers=b.auth_headers()) as resp:
            assert resp.status == 200
            lines = [line async for line in resp.content if line.strip()]
        pull_s = time.monotonic() - t0
        assert b'"error"' not in lines[-1], lines[-1]
        t0 = time.monotonic()
        info = await local_mesh.get(a, "/v1/info")
        api_s = time.monotonic() - t0
        assert info
        t0 = time.monotonic()
        async with http.get(
            f"http://{a.signaling}/edgemesh/info", params={"to": b.peer_id}
        ) as resp:
            assert resp.status == 200
        sig_s = time.monotonic() - t0
        assert pull_s < 10 and api_s < 2 and sig_s < 2
        assert await local_mesh.connected_ids(a) >= {b.peer_id}

        # The node closes every held fast-path connection: over the unauthenticated cap at
        # once, the rest at the handshake deadline.
        limits = FastLimits()
        closed = await asyncio.gather(
            *(_closed_after(r, t_attack, limits.handshake_timeout + 5) for r, _ in held_fast)
        )
        assert all(c is not None for c in closed), f"{closed.count(None)} fast conns left open"
        times = sorted(c for c in closed if c is not None)
        stats = (await local_mesh.get(a, "/v1/storage"))["fast_path_conns"]
        assert stats["refused"] >= HELD_FAST - limits.max_handshaking
        await wait_for(
            lambda: _open_fast(local_mesh, a), 5, "the node to drop the held fast connections"
        )

        # HTTP: a half-sent request is closed at the node's idle/header deadline.
        left = HTTP_IDLE_DEADLINE + 5 - (time.monotonic() - t_attack)
        http_closed = await asyncio.gather(
            *(_closed_after(r, t_attack, max(left, 1.0)) for r, _ in held_sig + held_api)
        )
        assert all(c is not None for c in http_closed), "half-sent HTTP requests left open"
        assert min(c for c in http_closed if c is not None) >= HTTP_IDLE_DEADLINE - 1
        log.warning(
            "slowloris: %d held fast-path conns -> legit 1 MiB pull %.2f s, API %.3f s, "
            "signaling %.3f s; fast conns closed after %.2f s (first) .. %.2f s (last), "
            "%d refused at once; held HTTP closed within %.1f s: %d of %d",
            HELD_FAST,
            pull_s,
            api_s,
            sig_s,
            times[0],
            times[-1],
            stats["refused"],
            time.monotonic() - t_attack,
            sum(c is not None for c in http_closed),
            len(http_closed),
        )
        for _, w in held_fast + held_sig + held_api:
            w.close()
    finally:
        await http.close()


async def _open_fast(mesh: LocalMesh, node: Any) -> bool:
    stats = (await mesh.get(node, "/v1/storage"))["fast_path_conns"]
    return bool(stats["open"] == 0 and stats["handshaking"] == 0)
