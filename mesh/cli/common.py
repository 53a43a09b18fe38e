"""What every subcommand shares: the user-facing error, sizes, and calls to the node's API."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from mesh.errors import Error

__all__ = ["CliError", "parse_size", "api_get", "api_post", "auth_headers"]


class CliError(Error):
    """A user-facing command failure."""


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "KMG" else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def auth_headers(api: str) -> dict[str, str]:
    """``Authorization`` for the node at ``api`` (mesh.local.resolve_token), or nothing."""
    from mesh.local import resolve_token

    token = resolve_token(api)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _refused(api: str, path: str, exc: urllib.error.HTTPError) -> CliError:
    text = exc.read(300).decode(errors="replace")
    hint = ""
    if exc.code == 401:
        hint = (
            " (no token for this address: set EDGEMESH_API_TOKEN, or EDGEMESH_HOME to the"
            " node's data dir)"
        )
    return CliError(f"{api}{path}: HTTP {exc.code}: {text}{hint}")


def api_get(api: str, path: str) -> Any:
    req = urllib.request.Request(f"{api}{path}", headers=auth_headers(api))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read(16 << 20))
    except urllib.error.HTTPError as exc:
        raise _refused(api, path, exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach node API at {api}: {exc}") from None


def api_post(api: str, path: str, body: dict[str, Any], timeout: float = 60) -> Any:
    req = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **auth_headers(api)},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read(16 << 20))
    except urllib.error.HTTPError as exc:
        raise _refused(api, path, exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach node API at {api}: {exc}") from None
