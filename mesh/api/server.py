"""The node's HTTP API (aiohttp), bound to loopback by default; who may call it: mesh/api/auth.py.

``GET /``           the topology page (mesh/web): peers, links, shards, traffic, polled live
``GET /v1/peers``   proven peers: peer_id, name, state, rtt_ms, path_ms, frame_size, source,
                    addresses, bytes, last_error, handshake_failures (``?all=1``: every peer
                    heard of)
``GET /v1/info``    this node: id, name, endpoints, counters of refused input
``GET /v1/mesh``    every member's summary (hardware, memory, shards, stages, tokens/s,
                    generations and routes) and the links each reports (mesh/meshview.py)
``GET /v1/dht/peer/{id}``  a peer's verified DHT record
``POST /v1/bench/rtt``   {peer, size, count, gap_ms}: round trips of an echo RPC, in ms
``POST /v1/bench/bulk``  {peer, bytes, message_size}: one-way transfer rate to a sink RPC
``POST /v1/bench/oneway``  {peer, size, count}: one-way latency of a request, in ms (a peer
                    on the same machine only: both ends read one monotonic clock)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from mesh.api.auth import TOKEN_FILE, ApiGuard, is_loopback, node_token
from mesh.api.bodies import int_field, json_body
from mesh.api.errors import openai_errors
from mesh.api.generate import add_routes
from mesh.api.openai import add_openai_routes
from mesh.api.storage import add_storage_routes  # objects, accounting, coordinates, jobs
from mesh.api.web import add_web_routes
from mesh.errors import EXPECTED
from mesh.net.signaling import HTTP_IDLE_DEADLINE

if TYPE_CHECKING:
    from mesh.api.context import ApiNode

__all__ = ["start_api"]

MAX_REQUEST = 1024 * 1024  # prompts and token lists
MAX_BENCH_BYTES = 1 << 30
log = logging.getLogger(__name__)
NODE_KEY: web.AppKey[ApiNode] = web.AppKey("node")


async def start_api(
    node: ApiNode,
    host: str,
    port: int,
    token: str | None,
    data_dir: Path,
    fallback: bool = False,
) -> tuple[web.AppRunner, str]:
    """Serve the API. It always needs a token (mesh/api/auth.py: the operator's, or one written
    to ``data_dir``); beyond loopback only the operator's: the API can read local files (model
    add) and drive the node. ``fallback``: ``port`` taken, bind a free one (with a warning)."""
    token_value = await asyncio.to_thread(node_token, data_dir, token, host)
    # With a generated token on loopback, the topology page's status reads stay open (after the
    # Host and Origin checks); an operator who set a token locks everything.
    guard = ApiGuard(token_value, host, open_reads=token is None and is_loopback(host))
    # OpenAI's error JSON outermost: its clients read the guard's 401 and 403 that way too.
    middlewares = [openai_errors, guard.middleware]
    app = web.Application(client_max_size=MAX_REQUEST, middlewares=middlewares)
    app[NODE_KEY] = node
    app.router.add_get("/v1/peers", _peers)
    app.router.add_get("/v1/info", _info)
    app.router.add_get("/v1/mesh", _mesh)
    app.router.add_get("/v1/dht/peer/{peer_id}", _dht_peer)
    app.router.add_post("/v1/bench/rtt", _bench_rtt)
    app.router.add_post("/v1/bench/oneway", _bench_oneway)
    add_routes(app, NODE_KEY)
    add_openai_routes(app, NODE_KEY)
    add_storage_routes(app, NODE_KEY)
    app.router.add_post("/v1/bench/bulk", _bench_bulk)
    add_web_routes(app)
    if token is None:

        async def forget_token(_: web.Application) -> None:
            # A stopped node's token opens nothing; do not leave it lying around.
            (data_dir / TOKEN_FILE).unlink(missing_ok=True)

        app.on_cleanup.append(forget_token)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=HTTP_IDLE_DEADLINE
    )
    await runner.setup()
    site = await _bind(runner, host, port, fallback)
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1]
    guard.bound(bound)
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"


async def _bind(runner: web.AppRunner, host: str, port: int, fallback: bool) -> web.TCPSite:
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        if not fallback or port == 0:
            await runner.cleanup()
            raise
        log.warning("API port %s:%d is taken (%s): using a free port instead", host, port, exc)
        site = web.TCPSite(runner, host, 0)
        await site.start()
    return site


async def _peers(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    everyone = request.query.get("all") in ("1", "true")  # also those never linked
    return web.json_response([e.as_dict() for e in node.peers.listed(everyone=everyone)])


async def _info(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].info())


async def _mesh(request: web.Request) -> web.Response:
    return web.json_response(await request.app[NODE_KEY].mesh_view())


async def _dht_peer(request: web.Request) -> web.Response:
    """A peer's record from the DHT, verified (signature, id, expiry) before it is shown."""
    node = request.app[NODE_KEY]
    if node.dht is None:
        raise web.HTTPNotFound(text="this node runs no DHT")
    peer_id = request.match_info["peer_id"]
    if len(peer_id) != 32 or not peer_id.isalnum():
        raise web.HTTPBadRequest(text="malformed peer id")
    rec = await node.dht.peer_record(peer_id)
    if rec is None:
        raise web.HTTPNotFound(text=f"no valid record for {peer_id}")
    return web.json_response(
        {
            "peer_id": rec.peer_id,
            "seq": rec.seq,
            "expires": rec.expires,
            "body": rec.body,
            "verified": True,
        }
    )


async def _bench_rtt(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body = await json_body(request)
    size = int_field(body, "size", 4096, 0, 1 << 20)
    count = int_field(body, "count", 200, 1, 100_000)
    gap = int_field(body, "gap_ms", 0, 0, 10_000) / 1000  # idle before each: a token's wait
    payload = os.urandom(size)  # random: lz4 must not make the figure look better
    try:
        link = node.link(str(body.get("peer", "")))
        if body.get("warm", True) is not False:
            await link.call("node.echo", {}, payload)  # warm-up
        samples = []
        for _ in range(count):
            if gap:
                await asyncio.sleep(gap)  # the path idle, as between a user's requests
            t0 = time.perf_counter()
            await link.call("node.echo", {}, payload)
            samples.append((time.perf_counter() - t0) * 1000)
    except EXPECTED as exc:
        raise web.HTTPBadGateway(text=str(exc)) from None
    return web.json_response({"size": size, "count": count, "rtt_ms": samples})


async def _bench_oneway(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body = await json_body(request)
    size = int_field(body, "size", 4096, 0, 1 << 20)
    count = int_field(body, "count", 200, 1, 100_000)
    payload = os.urandom(size)
    try:
        link = node.link(str(body.get("peer", "")))
        await link.call("node.clock", {}, payload)  # warm-up
        samples = []
        for _ in range(count):
            t0 = time.monotonic()
            reply = await link.call("node.clock", {}, payload)
            arrived = reply.result.get("t")
            if not isinstance(arrived, float):
                raise web.HTTPBadGateway(text="node.clock answered without a time")
            samples.append((arrived - t0) * 1000)
    except EXPECTED as exc:
        raise web.HTTPBadGateway(text=str(exc)) from None
    return web.json_response({"size": size, "count": count, "one_way_ms": samples})


async def _bench_bulk(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body = await json_body(request)
    total = int_field(body, "bytes", 64 << 20, 1, MAX_BENCH_BYTES)
    msg = int_field(body, "message_size", 1 << 20, 1024, node.max_message)
    window = int_field(body, "window", 4, 1, 64)
    block = os.urandom(msg)
    try:
        link = node.link(str(body.get("peer", "")))
        sem = asyncio.Semaphore(window)  # several messages in flight keep the pipe full

        async def one(n: int) -> None:
            async with sem:
                await link.call("node.sink", {}, block[:n], timeout=120)

        t0 = time.perf_counter()
        sizes = [msg] * (total // msg) + ([total % msg] if total % msg else [])
        await asyncio.gather(*(one(n) for n in sizes))
        seconds = time.perf_counter() - t0
    except EXPECTED as exc:
        raise web.HTTPBadGateway(text=str(exc)) from None
    return web.json_response(
        {"bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6}
    )
