"""HTTP endpoints for objects, replication, network coordinates, accounting and batch jobs.

``POST /v1/objects?name=&format=raw|jsonl&replicas=R&chunk_size=N``
                                          body = the bytes (streamed) -> manifest
``GET  /v1/objects``                      objects in this node's store
``GET  /v1/objects/{id}``                 the bytes (fetched first when missing here)
``POST /v1/objects/{id}/fetch?pin=0|1``   pull into this store; NDJSON progress, then a summary
``GET  /v1/objects/{id}/holders``         live providers (durable = pinned replica), by cost
``POST /v1/objects/{id}/pin`` ``DELETE /v1/objects/{id}/pin``
``POST /v1/storage/gc``                   collect unpinned objects
``GET  /v1/storage``                      usage, quota, transfers, penalties, fast path
``GET  /v1/accounting``                   bytes moved per source, destination, zone pair
``GET  /v1/netcoords``                    our Vivaldi coordinate, peers' and estimated RTTs
``POST /v1/jobs``                         {model, input, policies, seed} -> job report
                                          (ONNX over float vectors), or {kind: "llm",
                                          model, prompts, policies, seed, max_tokens}:
                                          an LLM generation for every stored prompt

Model shards are objects of this store too (format ``gguf``): they are listed, fetched,
pinned and collected through these routes like any object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.errors import EXPECTED
from mesh.storage.fetch import FetchState
from mesh.storage.store import CHUNK_MAX, QuotaExceeded, is_id

if TYPE_CHECKING:
    from mesh.api.context import ApiNode

__all__ = ["add_storage_routes"]


def _oid(request: web.Request) -> str:
    oid = request.match_info["oid"]
    if not is_id(oid):
        raise web.HTTPBadRequest(text="object ids are 64 hex digits")
    return oid


def _query_int(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key, str(default))
    if not text.isdigit() or not low <= int(text) <= high:
        raise web.HTTPBadRequest(text=f"{key} must be an integer in [{low}, {high}]")
    return int(text)


async def _put(node: ApiNode, request: web.Request) -> web.Response:
    name = request.query.get("name", "")[:200]
    fmt = request.query.get("format", "raw")
    if fmt not in ("raw", "jsonl"):  # gguf objects (model shards) come from model add
        raise web.HTTPBadRequest(text="format must be raw or jsonl")
    replicas = _query_int(request, "replicas", 1, 1, 64)
    chunk_size = _query_int(request, "chunk_size", CHUNK_MAX, 64 << 10, CHUNK_MAX)
    try:
        m = await node.objects.put_stream(request.content, name, fmt, replicas, chunk_size)
    except QuotaExceeded as exc:
        raise web.HTTPInsufficientStorage(text=str(exc)) from None
    except EXPECTED as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return web.json_response({**m.as_dict(), "replicas": replicas})


async def _listing(node: ApiNode, request: web.Request) -> web.Response:
    return web.json_response(node.objects.store.objects())


async def _fetch(node: ApiNode, request: web.Request) -> web.StreamResponse:
    oid = _oid(request)
    pin = request.query.get("pin", "0") == "1"
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)

    def progress(state: FetchState) -> None:
        if queue.empty():
            queue.put_nowait({"progress": state.as_dict()})

    task = asyncio.ensure_future(node.objects.fetch(oid, pin=pin, on_progress=progress))
    while not task.done():
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            await resp.write(json.dumps(getter.result()).encode() + b"\n")
        else:
            getter.cancel()
    try:
        state = task.result()
        final: dict[str, Any] = {"done": state.as_dict()}
    except EXPECTED as exc:
        final = {"error": str(exc), "type": type(exc).__name__}
    await resp.write(json.dumps(final).encode() + b"\n")
    await resp.write_eof()
    return resp


async def _data(node: ApiNode, request: web.Request) -> web.StreamResponse:
    oid = _oid(request)
    store = node.objects.store
    try:
        if not store.complete(oid):
            await node.objects.fetch(oid)
        m = store.manifest(oid)
        if m is None:
            raise web.HTTPNotFound(text=f"no object {oid}")
        resp = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(m.size)}
        )
        await resp.prepare(request)
        with store.hold(oid):
            for sha, _ in m.chunks:
                await resp.write(await asyncio.to_thread(store.read_chunk, sha))
    except EXPECTED as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    await resp.write_eof()
    return resp


async def _holders(node: ApiNode, request: web.Request) -> web.Response:
    oid = _oid(request)
    return web.json_response(node.objects.holders_view(oid))


async def _pin(node: ApiNode, request: web.Request) -> web.Response:
    oid = _oid(request)
    try:
        node.objects.store.pin(oid, _query_int(request, "replicas", 1, 1, 64))
    except EXPECTED as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    await node.objects.providers.announce(oid, durable=True)
    return web.json_response({"id": oid, "pinned": True})


async def _unpin(node: ApiNode, request: web.Request) -> web.Response:
    oid = _oid(request)
    was = node.objects.store.unpin(oid)
    if node.objects.store.complete(oid):
        await node.objects.providers.announce(oid, durable=False)
    return web.json_response({"id": oid, "pinned": False, "was_pinned": was})


async def _gc(node: ApiNode, request: web.Request) -> web.Response:
    before = {o["id"] for o in node.objects.store.objects()}
    out = await asyncio.to_thread(node.objects.store.gc)
    after = {o["id"] for o in node.objects.store.objects()}
    for oid in before - after:
        await node.objects.providers.announce(oid, durable=False, gone=True)
    return web.json_response(out)


async def _status(node: ApiNode, request: web.Request) -> web.Response:
    return web.json_response(node.objects.status())


async def _accounting(node: ApiNode, request: web.Request) -> web.Response:
    net = node.objects.net
    return web.json_response({"zone": net.config.zone, **net.accounting.as_dict()})


async def _coords(node: ApiNode, request: web.Request) -> web.Response:
    return web.json_response(node.objects.net.as_dict())


async def _job(node: ApiNode, request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    policies = body.get("policies", ["ours"])
    seed = body.get("seed", 0)
    kind = body.get("kind", "onnx")
    if not isinstance(policies, list) or type(seed) is not int:
        raise web.HTTPBadRequest(text="policies must be a list, seed an integer")
    if kind not in ("onnx", "llm"):
        raise web.HTTPBadRequest(text="kind must be 'onnx' or 'llm'")
    try:
        if kind == "llm":
            max_tokens = body.get("max_tokens", 32)
            if type(max_tokens) is not int:
                raise web.HTTPBadRequest(text="max_tokens must be an integer")
            report = await node.llm_jobs.run_job(
                str(body.get("model", "")),
                str(body.get("prompts", "")),
                policies,
                seed,
                max_tokens,
            )
        else:
            report = await node.jobs.run_job(
                str(body.get("model", "")), str(body.get("input", "")), policies, seed
            )
    except EXPECTED as exc:
        raise web.HTTPBadRequest(text=f"{type(exc).__name__}: {exc}") from None
    return web.json_response(report)


_Handler = Callable[["ApiNode", web.Request], Awaitable[web.StreamResponse]]
ROUTES: list[tuple[str, str, _Handler]] = [
    ("POST", "/v1/objects", _put),
    ("GET", "/v1/objects", _listing),
    ("GET", "/v1/objects/{oid}", _data),
    ("POST", "/v1/objects/{oid}/fetch", _fetch),
    ("GET", "/v1/objects/{oid}/holders", _holders),
    ("POST", "/v1/objects/{oid}/pin", _pin),
    ("DELETE", "/v1/objects/{oid}/pin", _unpin),
    ("POST", "/v1/storage/gc", _gc),
    ("GET", "/v1/storage", _status),
    ("GET", "/v1/accounting", _accounting),
    ("GET", "/v1/netcoords", _coords),
    ("POST", "/v1/jobs", _job),
]


def add_storage_routes(app: web.Application, key: web.AppKey[ApiNode]) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, _bind(handler, key))


def _bind(handler: _Handler, key: web.AppKey[ApiNode]) -> Callable[[web.Request], Any]:
    async def route(request: web.Request) -> web.StreamResponse:
        return await handler(request.app[key], request)

    return route
