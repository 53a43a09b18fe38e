"""HTTP endpoints for models and generation (OpenAI's: mesh/api/openai.py).

``GET  /v1/models``            models known in the mesh (OpenAI list shape, plus our fields)
``POST /v1/models``            {path, name}: shard a local GGUF into this node's store
``DELETE /v1/models/{model}``  forget a model here (name, id or id prefix): unpin its objects,
                               delete those no loaded shard holds
``POST /v1/generate``          {model, prompt | tokens, max_tokens, temperature, top_k, top_p,
                               seed, stop, split, runtime, top, verify, verify_tolerance,
                               verify_seed, prefill_chunk, speculative}: NDJSON, one event
                               per token, ``restart`` events when a spot check fails, then a summary
                               (route, TTFT, tokens/s, hop latency, verification)
``POST /v1/completions``, ``POST /v1/chat/completions``: mesh/api/openai.py
``GET  /v1/transfers``         blob pulls in progress on this node
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.api.bodies import json_body as _body
from mesh.api.errors import ApiError
from mesh.errors import EXPECTED
from mesh.inference.compute import MAX_STEP_ROWS, PREFILL_CHUNK
from mesh.inference.run import GenerationRequest
from mesh.inference.sampling import MAX_TOP, SamplingParams
from mesh.inference.speculate import SpecParams
from mesh.inference.verify import VerifyParams
from runtimes.chat_template import MAX_MESSAGES
from runtimes.errors import ModelError

if TYPE_CHECKING:
    from mesh.api.context import ApiNode

__all__ = ["add_routes", "parse_generation", "parse_messages"]

MAX_TOKENS = 4096
_ROLES = ("system", "developer", "user", "assistant", "tool")


def add_routes(app: web.Application, key: web.AppKey[ApiNode]) -> None:
    async def models(request: web.Request) -> web.Response:
        node = request.app[key]
        found = await node.coordinator.list_models()
        data = [
            {
                "id": m["name"] or m["model_id"],
                "object": "model",
                "created": 0,
                "owned_by": "edgemesh",
                # llama-server's and vLLM's names for it: clients size prompts by either
                "max_model_len": m.get("context_length"),
                **m,
            }
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
        req = parse_generation(await _body(request))
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

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/models", add_model)
    app.router.add_delete("/v1/models/{model}", remove_model)
    app.router.add_get("/v1/transfers", transfers)
    app.router.add_post("/v1/generate", generate)


async def _add_model(node: ApiNode, body: dict[str, Any]) -> dict[str, Any]:
    """Shard a GGUF on this node's host into its store (POST /v1/models)."""
    path, name = body.get("path"), body.get("name")
    if not isinstance(path, str) or not await asyncio.to_thread(Path(path).is_file):
        raise ApiError(400, "path must name a GGUF file on this node's host")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 100):
        raise ApiError(400, "name must be a short string")
    try:
        manifest = await node.compute.add_model(path, name)
    except EXPECTED + (ValueError,) as exc:
        raise ApiError(400, str(exc)) from None
    return {
        "model_id": manifest.model_id,
        "name": name or manifest.name,
        "arch": manifest.architecture,
        "n_layers": manifest.n_layers,
        "blobs": len(manifest.blobs),
    }


def parse_generation(body: dict[str, Any]) -> GenerationRequest:
    """A generation request from an API body (ours, or OpenAI's after its own fields),
    type- and range-checked: :class:`ApiError` (400) names the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    prompt, tokens = body.get("prompt", ""), body.get("tokens")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string")
    if tokens is not None and (
        not isinstance(tokens, list)
        or not tokens
        or not all(type(t) is int and 0 <= t < 1 << 31 for t in tokens)
    ):
        raise ApiError(400, "tokens must be a non-empty list of token ids")
    max_tokens = body.get("max_tokens", 32)
    if type(max_tokens) is not int or not 0 < max_tokens <= MAX_TOKENS:
        raise ApiError(400, f"max_tokens must be in 1..{MAX_TOKENS}")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise ApiError(400, "stop must be a string or a list of up to 8 strings")
    split, runtime, top = body.get("split"), body.get("runtime"), body.get("top", 0)
    if split is not None and (type(split) is not int or not 1 <= split <= 64):
        raise ApiError(400, "split must be an integer in 1..64")
    if runtime is not None and not isinstance(runtime, str):
        raise ApiError(400, "runtime must be a string")
    if type(top) is not int or not 0 <= top <= MAX_TOP:
        raise ApiError(400, f"top must be in 0..{MAX_TOP}")
    seed = body.get("seed")
    if seed is None:  # a random one: the summary gives it, so a run can be repeated
        seed = secrets.randbits(31)
    if type(seed) is not int:
        raise ApiError(400, "seed must be an integer", param="seed")
    try:
        sampling = SamplingParams(
            float(body.get("temperature", 0.0) or 0.0),
            int(body.get("top_k", 0) or 0),
            float(body.get("top_p", 1.0) or 1.0),
            seed,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # int(Infinity): OverflowError
        raise ApiError(400, f"bad sampling parameters: {exc}") from None
    mode = body.get("mode", "push")
    if mode not in ("push", "chain"):
        raise ApiError(400, "mode must be 'push' or 'chain'")
    try:
        verify = VerifyParams.from_json(body)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    if verify.rate > 0 and mode != "push":
        raise ApiError(400, "verify (spot checks) needs mode 'push'")
    chunk = body.get("prefill_chunk", PREFILL_CHUNK)
    if type(chunk) is not int or not 1 <= chunk <= MAX_STEP_ROWS:
        raise ApiError(400, f"prefill_chunk must be in 1..{MAX_STEP_ROWS}")
    try:
        speculative = SpecParams.from_json(body.get("speculative"))
    except ValueError as exc:
        raise ApiError(400, str(exc), param="speculative") from None
    req = GenerationRequest(
        model, prompt, tokens, max_tokens, sampling, stop, split, runtime, top, mode, verify, chunk
    )
    req = replace(req, speculative=speculative)
    if body.get("messages") is not None and tokens is None:  # ours too: a chat, by template
        req = replace(req, messages=parse_messages(body["messages"]))
    return req


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Chat messages: role and text content (text parts joined), checked."""
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MESSAGES:
        raise ApiError(400, f"messages must be a list of 1..{MAX_MESSAGES}", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}] needs a role of {_ROLES}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(t, str)
                for p, t in zip(content, texts, strict=True)
            ):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported")
            content = "".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] needs a string content", param="messages")
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"][:64]
        out.append(msg)
    return out
