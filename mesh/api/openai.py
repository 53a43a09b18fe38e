"""OpenAI's completions and chat completions, as the official SDK and its users expect them.

``POST /v1/completions``       prompt -> text (``stream``: server-sent events)
``POST /v1/chat/completions``  messages, rendered by the GGUF's chat template (Jinja, as
                               llama.cpp's binding applies it; ChatML where the GGUF has
                               none, said in ``chat_template`` of the reply)

Both take ``n`` (concurrent generations, seeds ``seed + i``), ``seed`` (random when absent),
``stop`` (removed from the text), ``logprobs`` (``top_logprobs`` for chat),
``stream_options.include_usage``, and our own fields through the SDK's ``extra_body``
(``split``, ``runtime``, ``verify``, ``speculative``, ...). Parameters out of range, and
features this node does not implement (tools, JSON mode, penalties, ``logit_bias``,
``echo``), are refused with OpenAI's error JSON rather than ignored. A request that fails
before its first token (no such model, a prompt over the context, no route) fails with an
HTTP status, also when streaming; a stream that fails later ends with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.api.bodies import json_body
from mesh.api.errors import ApiError, api_error
from mesh.api.generate import parse_generation, parse_messages
from mesh.errors import EXPECTED
from mesh.inference.run import GenerationRequest
from mesh.inference.sampling import MAX_LOGPROBS

if TYPE_CHECKING:
    from mesh.api.context import ApiNode

__all__ = ["add_openai_routes", "parse_openai"]

MAX_N = 8  # choices per request: each is a generation of its own
CHAT_MAX_TOKENS = 4096  # chat's default ceiling (what the context leaves, at most)
COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for completions
_REFUSED = {  # features we do not implement: refused, never silently ignored
    "tools": "tools (function calling) are not supported",
    "functions": "functions (function calling) are not supported",
    "tool_choice": "tool_choice is not supported",
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}

Events = AsyncGenerator[dict[str, Any], None]


@dataclass(frozen=True)
class OpenAIRequest:
    chat: bool
    req: GenerationRequest
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool


def add_openai_routes(app: web.Application, key: web.AppKey[ApiNode]) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        parsed = parse_openai(await json_body(request), chat=False)
        return await _respond(request, request.app[key], parsed)

    async def chat(request: web.Request) -> web.StreamResponse:
        parsed = parse_openai(await json_body(request), chat=True)
        return await _respond(request, request.app[key], parsed)

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)


# -- parsing ---------------------------------------------------------------------------------
def parse_openai(body: dict[str, Any], *, chat: bool) -> OpenAIRequest:
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, [], {}, ""):
            raise ApiError(400, why, param=name, code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    _check_response_format(body.get("response_format"))
    if body.get("echo") or body.get("best_of") not in (None, 1):
        raise ApiError(400, "echo and best_of are not supported", param="echo")
    n = body.get("n", 1)
    if type(n) is not int or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer in 1..{MAX_N}", param="n")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "stream must be a boolean, stream_options an object", param="stream")
    include_usage = options.get("include_usage", False) is True
    _check_ranges(body)
    fields = dict(body)
    logprobs, k = _logprobs(body, chat)
    if chat:
        fields["prompt"] = ""
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        fields["max_tokens"] = CHAT_MAX_TOKENS if limit is None else limit
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        fields["prompt"] = prompt
        if fields.get("max_tokens") is None:
            fields["max_tokens"] = COMPLETION_MAX_TOKENS
    req = parse_generation(fields)
    req = replace(req, logprobs=k if logprobs else None)
    if chat:
        messages = parse_messages(body.get("messages"))
        req = replace(req, messages=messages, clip_to_context=body.get("max_tokens") is None)
    return OpenAIRequest(chat, req, n, stream, include_usage, logprobs)


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    raise ApiError(
        400,
        f"response_format {kind!r} is not supported: only 'text' (JSON mode is not "
        "constrained here, and is refused rather than left to chance)",
        param="response_format",
        code="unsupported_parameter",
    )


def _check_ranges(body: dict[str, Any]) -> None:
    """OpenAI's ranges: a value outside them is an error, not clamped."""
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise ApiError(400, "temperature must be a number in [0, 2]", param="temperature")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ApiError(400, "top_p must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not -(2**63) <= seed < 2**63):
        raise ApiError(400, "seed must be an integer", param="seed")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ApiError(400, f"{name} must be a positive integer", param=name)


def _logprobs(body: dict[str, Any], chat: bool) -> tuple[bool, int]:
    """(logprobs wanted, alternatives per token)."""
    if chat:
        wanted, k = body.get("logprobs", False), body.get("top_logprobs")
        if not isinstance(wanted, bool):
            raise ApiError(400, "logprobs must be a boolean", param="logprobs")
        if k is not None and (type(k) is not int or not 0 <= k <= MAX_LOGPROBS):
            raise ApiError(400, f"top_logprobs must be in 0..{MAX_LOGPROBS}", param="top_logprobs")
        if k is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return wanted, k or 0
    k = body.get("logprobs")
    if k is None:
        return False, 0
    if type(k) is not int or not 0 <= k <= 5:
        raise ApiError(400, "logprobs must be an integer in 0..5", param="logprobs")
    return True, k


# -- answering -------------------------------------------------------------------------------
async def _respond(request: web.Request, node: ApiNode, o: OpenAIRequest) -> web.StreamResponse:
    reqs = [replace(o.req, sampling=_seeded(o.req, i)) for i in range(o.n)]
    streams = [node.coordinator.generate(r) for r in reqs]
    head = {
        "id": ("chatcmpl-" if o.chat else "cmpl-") + uuid.uuid4().hex[:24],
        "created": int(time.time()),
        "model": o.req.model,
    }
    try:
        firsts = await asyncio.gather(*(_first(s) for s in streams))
    except BaseException:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise
    if o.stream:
        return await _stream(request, o, head, streams, firsts)
    try:
        summaries = await asyncio.gather(
            *(_collect(s, f) for s, f in zip(streams, firsts, strict=True))
        )
    finally:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
    choices = [
        _final_choice(o, i, text, events, s) for i, (text, events, s) in enumerate(summaries)
    ]
    usage = _usage([s for _, _, s in summaries])
    kind = "chat.completion" if o.chat else "text_completion"
    out = dict(head, object=kind, choices=choices, usage=usage)
    template = summaries[0][2].get("chat_template")
    if template is not None:
        out["chat_template"] = template
    return web.json_response(out)


def _seeded(req: GenerationRequest, i: int) -> Any:
    return replace(req.sampling, seed=(req.sampling.seed + i) % (1 << 63))


async def _first(events: Events) -> dict[str, Any]:
    """The first event (the route: planning, tokenizing and opening all went well), or the
    failure as an HTTP error: nothing has been sent yet."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise ApiError(502, "the generation ended without a word") from None
    except EXPECTED + (ValueError,) as exc:
        raise api_error(exc) from None


async def _collect(
    events: Events, first: dict[str, Any]
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    tokens: list[dict[str, Any]] = []
    last = first
    try:
        async for event in events:
            if "token" in event:
                tokens.append(event)
            last = event
    except EXPECTED + (ValueError,) as exc:
        raise api_error(exc) from None
    if not last.get("done"):
        raise ApiError(502, "the generation ended without its summary")
    return str(last.get("text", "")), tokens, last


def _usage(summaries: list[dict[str, Any]]) -> dict[str, int]:
    prompt = int(summaries[0].get("prompt_tokens", 0)) if summaries else 0
    completion = sum(len(s.get("tokens", [])) for s in summaries)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _final_choice(
    o: OpenAIRequest, i: int, text: str, events: list[dict[str, Any]], summary: dict[str, Any]
) -> dict[str, Any]:
    finish = summary.get("finish_reason", "length")
    lps = _choice_logprobs(o, events) if o.logprobs else None
    if not o.chat:
        return {"index": i, "text": text, "logprobs": lps, "finish_reason": finish}
    return {
        "index": i,
        "message": {"role": "assistant", "content": text},
        "logprobs": lps,
        "finish_reason": finish,
    }


def _choice_logprobs(o: OpenAIRequest, events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """OpenAI's logprobs object for these token events (chat: ``content``; completions:
    the legacy parallel lists)."""
    entries = [(e["text"], e.get("logprobs")) for e in events]
    if o.chat:
        content = []
        for text, lp in entries:
            if lp is None:
                continue
            content.append(
                {
                    "token": text,
                    "logprob": lp["logprob"],
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": bytes(a["bytes"]).decode("utf-8", "replace"),
                            "logprob": a["logprob"],
                            "bytes": a["bytes"],
                        }
                        for a in lp["top"]
                    ],
                }
            )
        return {"content": content}
    offsets, pos = [], 0
    for text, _ in entries:
        offsets.append(pos)
        pos += len(text)
    return {
        "tokens": [t for t, _ in entries],
        "token_logprobs": [lp["logprob"] if lp else None for _, lp in entries],
        "top_logprobs": [
            {bytes(a["bytes"]).decode("utf-8", "replace"): a["logprob"] for a in lp["top"]}
            if lp
            else None
            for _, lp in entries
        ],
        "text_offset": offsets,
    }


# -- streaming ------------------------------------------------------------------------------
async def _stream(
    request: web.Request,
    o: OpenAIRequest,
    head: dict[str, Any],
    streams: list[Events],
    firsts: list[dict[str, Any]],
) -> web.StreamResponse:
    """Server-sent events: each choice's chunks as they come (chat: the role first), its
    finish, the usage chunk when asked for, then ``[DONE]``."""
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    kind = "chat.completion.chunk" if o.chat else "text_completion"
    base = dict(head, object=kind)
    if o.include_usage:
        base["usage"] = None
    lock = asyncio.Lock()

    async def send(data: dict[str, Any]) -> None:
        async with lock:
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

    summaries: list[dict[str, Any]] = []
    try:
        await asyncio.gather(
            *(_stream_choice(o, i, s, base, send, summaries) for i, s in enumerate(streams))
        )
        if o.include_usage:
            await send(dict(base, choices=[], usage=_usage(summaries)))
    except _StreamFailed as exc:
        await send({"error": exc.error})
    finally:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


class _StreamFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


async def _stream_choice(
    o: OpenAIRequest,
    i: int,
    events: Events,
    base: dict[str, Any],
    send: Callable[[dict[str, Any]], Awaitable[None]],
    summaries: list[dict[str, Any]],
) -> None:
    if o.chat:
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        await send(dict(base, choices=[dict(role, finish_reason=None)]))
    try:
        async for event in events:
            if event.get("restart"):
                # Streamed text cannot be taken back: say so and stop (non-streaming
                # requests and the NDJSON API carry the verified text).
                fate = "was banned" if event.get("banned") else "left the generation"
                msg = f"a stage failed a spot check and {fate} ({event['reason']})"
                raise _StreamFailed({"message": msg, "type": "server_error", "code": "restart"})
            if event.get("done"):
                summaries.append(event)
                end = _chunk_choice(o, i, "", None, event.get("finish_reason", "length"))
                await send(dict(base, choices=[end]))
                return
            if "token" in event and (event["text"] or event.get("logprobs")):
                lp = _choice_logprobs(o, [event]) if o.logprobs else None
                await send(dict(base, choices=[_chunk_choice(o, i, event["text"], lp, None)]))
    except EXPECTED + (ValueError,) as exc:
        raise _StreamFailed(api_error(exc).body()) from None


def _chunk_choice(
    o: OpenAIRequest, i: int, text: str, lps: dict[str, Any] | None, finish: str | None
) -> dict[str, Any]:
    if not o.chat:
        return {"index": i, "text": text, "logprobs": lps, "finish_reason": finish}
    delta = {"content": text} if text else {}
    return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
