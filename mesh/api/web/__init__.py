"""The topology page: static HTML, JS and CSS served by the node's HTTP API.

``GET /`` is the page; it polls ``/v1/info``, ``/v1/peers`` and ``/v1/mesh`` every second and
draws with DOM methods and ``textContent`` only (never ``innerHTML`` with data). Its chat box
(``chat.js``) streams from ``/v1/chat/completions`` with the token the user pastes. The files
are read once, when the API starts; a strict Content-Security-Policy allows only these
same-origin scripts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

__all__ = ["add_web_routes", "PAGE_FILES"]

PAGE_FILES = {
    "index.html": "text/html",
    "topology.js": "text/javascript",
    "topology.css": "text/css",
    "chat.js": "text/javascript",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _handler(body: bytes, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    return serve


def add_web_routes(app: web.Application) -> None:
    """``/`` and ``/web/{file}`` for the files of :data:`PAGE_FILES` (no other path is served)."""
    root = resources.files(__package__)
    for name, content_type in PAGE_FILES.items():
        handler = _handler(root.joinpath(name).read_bytes(), content_type)
        app.router.add_get("/" if name == "index.html" else f"/web/{name}", handler)
