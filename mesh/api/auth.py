"""Who may use the node's HTTP API: a bearer token, the node's own Host, its own Origin.

Threats (docs/security.md, "The local API"): any web page the user visits can send requests to
127.0.0.1 (a cross-site ``text/plain`` POST needs no CORS preflight), a page whose DNS name is
rebound to 127.0.0.1 can also read the answers, and any program on the machine can connect. So:

- The node always has a token: the operator's (``EDGEMESH_API_TOKEN``) or one generated at every
  start and written to ``DATA_DIR/api.token``, created 0600 (never readable by others, even
  briefly). Everything needs ``Authorization: Bearer <token>`` except, on a loopback bind with a
  generated token, the topology page and the status reads it polls (``/v1/info``,
  ``/v1/peers``, ``/v1/mesh``): a browser never attaches that header by itself, so no page can
  use the token.
- The Host header must name the node itself (127.0.0.1, localhost, [::1] or the configured API
  host, on the bound port): a rebound name is refused (403) before anything else runs.
- An Origin header, when present, must be the node's own origin (403 otherwise).
- A request with a body must say what it is: ``application/json`` (415 otherwise), or
  ``application/octet-stream`` for object uploads. Browsers cannot send either cross-site
  without a preflight, which this API never answers.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from mesh.errors import Error

__all__ = ["TOKEN_FILE", "ApiGuard", "is_loopback", "node_token"]

TOKEN_FILE = "api.token"
# The page and its assets hold no data: served without the token wherever the API listens.
PAGE = frozenset({"/", "/web/topology.js", "/web/topology.css", "/web/chat.js"})
# Readable without the token on a loopback bind with a generated token: the topology page and
# the status it polls. Nothing here reads local files, starts work or changes state
# (/v1/mesh asks the linked peers' node.info at most once per few seconds, however polled).
OPEN_READS = PAGE | {"/v1/info", "/v1/peers", "/v1/mesh"}
UPLOADS = frozenset({"/v1/objects"})  # raw bytes, not JSON
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def node_token(data_dir: Path, configured: str | None, host: str) -> str:
    """The token this node's API requires. Bound beyond loopback, the operator must choose it:
    a generated one would sit in a file that remote clients cannot read."""
    path = data_dir / TOKEN_FILE
    if configured:
        # Never written to disk; a generated token left by an earlier run is not valid now.
        path.unlink(missing_ok=True)
        return configured
    if not is_loopback(host):
        raise Error(
            f"the API on {host} would be reachable from the network: set EDGEMESH_API_TOKEN "
            "(or keep --api on 127.0.0.1)"
        )
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{TOKEN_FILE}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    # Created with mode 0600 in one call (O_EXCL: never an existing file or a planted link),
    # then renamed over the old one: no moment where the token is readable by others.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return token


class ApiGuard:
    """The aiohttp middleware; :meth:`bound` gives it the port once the socket is bound."""

    def __init__(self, token: str, host: str, *, open_reads: bool) -> None:
        self._expected = f"Bearer {token}".encode()
        self._host = host.lower()
        self._open = OPEN_READS if open_reads else PAGE
        self._hosts: frozenset[str] = frozenset()
        self._port = ""

    def bound(self, port: int) -> None:
        shown = f"[{self._host}]" if ":" in self._host else self._host
        names = ("127.0.0.1", "localhost", "[::1]", shown)
        self._port = str(port)
        self._hosts = frozenset(f"{name}:{port}" for name in names)

    def host_ok(self, value: str) -> bool:
        value = value.lower()
        if value in self._hosts:
            return True
        if not _is_wildcard(self._host):
            return False
        # Bound to every interface: any IP literal on our port is one of our addresses, and a
        # rebound DNS name is never an IP literal.
        name, _, port = value.rpartition(":")
        try:
            ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
        except ValueError:
            return False
        return port == self._port

    def refusal(self, request: web.Request) -> web.HTTPException | None:
        host = request.headers.get("Host", "")
        if not self.host_ok(host):
            return web.HTTPForbidden(text=f"Host {host[:100]!r} is not this node's API address")
        origin = request.headers.get("Origin")
        if origin is not None and not (
            origin.startswith("http://") and self.host_ok(origin.removeprefix("http://"))
        ):
            return web.HTTPForbidden(text="cross-origin requests are refused")
        public = request.method in ("GET", "HEAD") and request.path in self._open
        if request.match_info.http_exception is not None:
            return None  # no such route (404) or method (405): nothing to guard
        given = request.headers.get("Authorization", "").encode()
        # compare_digest always runs: its time does not depend on where the strings differ
        if not hmac.compare_digest(given, self._expected) and not public:
            return web.HTTPUnauthorized(
                text="this API needs 'Authorization: Bearer <token>' (the token is in the "
                "node's data dir, api.token, or EDGEMESH_API_TOKEN)"
            )
        if request.method in BODY_METHODS and request.body_exists:
            want = "application/octet-stream" if request.path in UPLOADS else "application/json"
            if request.content_type != want:
                return web.HTTPUnsupportedMediaType(text=f"the body must be {want}")
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        refused = self.refusal(request)
        if refused is not None:
            raise refused
        response: web.StreamResponse = await handler(request)
        return response
