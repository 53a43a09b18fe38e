"""HTTP endpoints for models and generation, ours and OpenAI's.

``GET  /v1/models``            models known in the mesh (OpenAI list shape, plus our fields)
``POST /v1/models``            {path, name}: shard a local GGUF into this node's store
``DELETE /v1/models/{model}``  forget a model here (name, id or id prefix): unpin its objects,
                               delete those no loaded shard holds
``POST /v1/generate``          {model, prompt | tokens, max_tokens, temperature, top_k, top_p,
                               seed, stop, split, runtime, top, verify, verify_tolerance,
                               verify_seed, prefill_chunk}: NDJSON, one event per token,
                               ``restart`` events when a spot check fails, then a summary
                               (route, TTFT, tokens/s, hop latency, verification)
``POST /v1/completions``       OpenAI completions (``stream`` as server-sent events)
``POST /v1/chat/completions``  OpenAI chat completions (messages joined into a plain prompt:
                               the models are base models without a chat template)
``GET  /v1/transfers``         blob pulls in progress on this node
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.api.bodies import json_body as _body
from mesh.errors import EXPECTED
from mesh.inference.compute import MAX_STEP_ROWS, PREFILL_CHUNK
from mesh.inference.run import GenerationRequest
from mesh.inference.sampling import SamplingParams
from mesh.inference.verify import VerifyParams
from runtimes.errors import ModelError

if TYPE_CHECKING:
    from mesh.api.context import ApiNode

__all__ = ["add_routes"]

MAX_TOKENS = 4096


def add_routes(app: web.Application, key: web.AppKey[ApiNode]) -> None:
    async def models(request: web.Request) -> web.Response:
        node = request.app[key]
        found = await node.coordinator.list_models()
        data = [
            {"id": m["name"] or m["model_id"], "object": "model", "owned_by": "edgemesh", **m}
            for m in found
        ]
        return web.json_response({"object": "list", "data": data})

    async def add_model(request: web.Request) -> web.Response:
        return web.json_response(await _add_model(request.app[key], await _body(request)))

    async def remove_model(request: web.Request) -> web.Response:
        node = request.app[key]
        try:
            done = node.compute.remove_model(request.match_info["model"])
        except ModelError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        for oid in done["unpinned"]:
            gone = oid in done["deleted"]
            await node.objects.providers.announce(oid, durable=False, gone=gone)
        return web.json_response(done)

    async def transfers(request: web.Request) -> web.Response:
        node = request.app[key]
        return web.json_response([t.as_dict() for t in node.compute.transfers.values()])

    async def generate(request: web.Request) -> web.StreamResponse:
        node = request.app[key]
        req = _request(await _body(request))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        events = node.coordinator.generate(req)
        try:
            async for event in events:
                await resp.write(json.dumps(event).encode() + b"\n")
        except EXPECTED + (ValueError,) as exc:
            await resp.write(
                json.dumps({"error": str(exc), "type": type(exc).__name__}).encode() + b"\n"
            )
        finally:
            await events.aclose()  # a client that went away frees every stage's session
        await resp.write_eof()
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise web.HTTPBadRequest(text="prompt must be a string")
        return await _openai(request, key, body, prompt, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        return await _openai(request, key, body, _chat_prompt(body), chat=True)

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/models", add_model)
    app.router.add_delete("/v1/models/{model}", remove_model)
    app.router.add_get("/v1/transfers", transfers)
    app.router.add_post("/v1/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)


async def _add_model(node: ApiNode, body: dict[str, Any]) -> dict[str, Any]:
    """Shard a GGUF on this node's host into its store (POST /v1/models)."""
    path, name = body.get("path"), body.get("name")
    if not isinstance(path, str) or not await asyncio.to_thread(Path(path).is_file):
        raise web.HTTPBadRequest(text="path must name a GGUF file on this node's host")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 100):
        raise web.HTTPBadRequest(text="name must be a short string")
    try:
        manifest = await node.compute.add_model(path, name)
    except EXPECTED + (ValueError,) as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return {
        "model_id": manifest.model_id,
        "name": name or manifest.name,
        "arch": manifest.architecture,
        "n_layers": manifest.n_layers,
        "blobs": len(manifest.blobs),
    }


def _chat_prompt(body: dict[str, Any]) -> str:
    """A chat request's messages as one prompt: their contents, one per line."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise web.HTTPBadRequest(text="messages must be a non-empty list")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise web.HTTPBadRequest(text="each message needs a string content")
        parts.append(m["content"])
    return "\n".join(parts)


def _request(body: dict[str, Any]) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise web.HTTPBadRequest(text="model is required")
    prompt, tokens = body.get("prompt", ""), body.get("tokens")
    if not isinstance(prompt, str):
        raise web.HTTPBadRequest(text="prompt must be a string")
    if tokens is not None and (
        not isinstance(tokens, list)
        or not tokens
        or not all(type(t) is int and t >= 0 for t in tokens)
    ):
        raise web.HTTPBadRequest(text="tokens must be a non-empty list of token ids")
    max_tokens = body.get("max_tokens", 32)
    if type(max_tokens) is not int or not 0 < max_tokens <= MAX_TOKENS:
        raise web.HTTPBadRequest(text=f"max_tokens must be in 1..{MAX_TOKENS}")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise web.HTTPBadRequest(text="stop must be a string or a list of up to 8 strings")
    split, runtime, top = body.get("split"), body.get("runtime"), body.get("top", 0)
    if split is not None and (type(split) is not int or not 1 <= split <= 64):
        raise web.HTTPBadRequest(text="split must be an integer in 1..64")
    if runtime is not None and not isinstance(runtime, str):
        raise web.HTTPBadRequest(text="runtime must be a string")
    if type(top) is not int or not 0 <= top <= 64:
        raise web.HTTPBadRequest(text="top must be in 0..64")
    try:
        sampling = SamplingParams(
            float(body.get("temperature", 0.0) or 0.0),
            int(body.get("top_k", 0) or 0),
            float(body.get("top_p", 1.0) or 1.0),
            int(body.get("seed", 0) or 0),
        )
    except (TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text=f"bad sampling parameters: {exc}") from None
    mode = body.get("mode", "push")
    if mode not in ("push", "chain"):
        raise web.HTTPBadRequest(text="mode must be 'push' or 'chain'")
    try:
        verify = VerifyParams.from_json(body)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if verify.rate > 0 and mode != "push":
        raise web.HTTPBadRequest(text="verify (spot checks) needs mode 'push'")
    chunk = body.get("prefill_chunk", PREFILL_CHUNK)
    if type(chunk) is not int or not 1 <= chunk <= MAX_STEP_ROWS:
        raise web.HTTPBadRequest(text=f"prefill_chunk must be in 1..{MAX_STEP_ROWS}")
    return GenerationRequest(
        model, prompt, tokens, max_tokens, sampling, stop, split, runtime, top, mode, verify, chunk
    )


async def _openai(
    request: web.Request, key: web.AppKey[ApiNode], body: dict[str, Any], prompt: str, *, chat: bool
) -> web.StreamResponse:
    node = request.app[key]
    body = dict(body, prompt=prompt)
    body.setdefault("max_tokens", 16)
    req = _request(body)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    events = node.coordinator.generate(req)
    if body.get("stream"):
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": chunk_kind, "created": created}
        return await _openai_stream(request, events, dict(head, model=req.model), req, chat)
    summary = await _last(events)
    finish = "length" if len(summary["tokens"]) >= req.max_tokens else "stop"
    usage = {
        "prompt_tokens": summary["prompt_tokens"],
        "completion_tokens": len(summary["tokens"]),
        "total_tokens": summary["prompt_tokens"] + len(summary["tokens"]),
    }
    return web.json_response(
        {
            "id": rid,
            "object": kind,
            "created": created,
            "model": req.model,
            "usage": usage,
            "choices": [_choice(chat, summary["text"], finish, False)],
        }
    )


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
    """One OpenAI ``choices`` entry: a completion's text, a chat message or a chat delta."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
    }


async def _openai_stream(
    request: web.Request,
    events: AsyncGenerator[dict[str, Any], None],
    head: dict[str, Any],
    req: GenerationRequest,
    chat: bool,
) -> web.StreamResponse:
    """Server-sent events, one chunk (``head`` + choices) per token, then ``[DONE]``."""
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    count = 0
    try:
        async for event in events:
            if "route" in event and "restart" not in event:
                continue
            if event.get("restart"):
                # Streamed text cannot be taken back: say so and stop (the NDJSON API and
                # non-streaming requests carry the verified text).
                fate = "was banned" if event.get("banned") else "left the generation"
                msg = f"a stage failed a spot check and {fate} ({event['reason']})"
                await resp.write(f"data: {json.dumps({'error': {'message': msg}})}\n\n".encode())
                break
            if event.get("done"):
                finish = "length" if count >= req.max_tokens else "stop"
                data = dict(head, choices=[_choice(chat, "", finish, True)])
            else:
                count += 1
                data = dict(head, choices=[_choice(chat, event["text"], None, True)])
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
    except EXPECTED + (ValueError,) as exc:
        await resp.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
    finally:
        await events.aclose()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _last(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    last: dict[str, Any] = {}
    try:
        async for event in events:
            last = event
    except EXPECTED + (ValueError,) as exc:
        status = 404 if isinstance(exc, ModelError) else 502
        raise _http_error(status, str(exc)) from None
    return last


def _http_error(status: int, text: str) -> web.HTTPException:
    if status == 404:
        return web.HTTPNotFound(text=text)
    return web.HTTPBadGateway(text=text)
