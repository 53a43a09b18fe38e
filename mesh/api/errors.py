"""Errors of the HTTP API: one type carrying the status and OpenAI's error fields.

OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}`` and raise their
typed exceptions from the status (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, ...); a plain-text body would show the user only "Error code: 404". The
OpenAI paths answer every error this way, including the guard's 401 and 403; our own
endpoints keep plain text.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh.inference.coordinator import UnknownModel
from mesh.inference.routes import RouteError
from mesh.inference.run import ContextLengthExceeded
from mesh.inference.verify import VerificationFailed
from runtimes.chat_template import ChatTemplateError
from runtimes.errors import ModelError

__all__ = ["ApiError", "api_error", "openai_errors", "OPENAI_PATHS", "UnknownModel"]

log = logging.getLogger(__name__)

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings")
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "api_error")
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def response(self, openai: bool) -> web.Response:
        if openai:
            return web.json_response({"error": self.body()}, status=self.status)
        return web.Response(status=self.status, text=self.message)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error for a generation's failure."""
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ChatTemplateError | ValueError):
        return ApiError(400, str(exc))
    if isinstance(exc, RouteError | VerificationFailed):
        return ApiError(503, str(exc), code="no_route")
    if isinstance(exc, ModelError):
        return ApiError(400, str(exc))
    return ApiError(502, str(exc))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: ApiError as JSON (OpenAI paths) or text, and, on the OpenAI paths, every
    other HTTP error (the guard's too) as OpenAI's error JSON."""
    openai = request.path in OPENAI_PATHS
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response(openai)
    except web.HTTPException as exc:
        if not openai or exc.status < 400:
            raise
        text = exc.text or exc.reason
        code = "invalid_api_key" if exc.status == 401 else None
        return ApiError(exc.status, text, code=code).response(True)
