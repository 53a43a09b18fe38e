"""Request bodies: JSON objects only, fields checked against their bounds."""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["json_body", "int_field"]


async def json_body(request: web.Request) -> dict[str, Any]:
    # aiohttp's request.json() parses any Content-Type; text/plain is what a cross-site page
    # can send without a preflight (the API guard refuses it first; this holds on its own).
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="the body must be application/json")
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def int_field(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{key} must be an integer in [{low}, {high}]")
    return value
