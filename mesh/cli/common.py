"""What every subcommand shares: the user-facing error, sizes, and calls to the node's API.

A client command names its node with ``--api HOST:PORT`` (or a URL) or ``--data-dir DIR``
(the node's data dir, whose ``node.json`` gives the address and ``api.token`` the token);
with neither, the node of ``EDGEMESH_HOME`` or the default data dir.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import Error

__all__ = [
    "CliError",
    "NodeApi",
    "add_api_args",
    "node_api",
    "parse_size",
    "api_get",
    "api_post",
    "api_delete",
    "auth_headers",
]


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


def add_api_args(c: argparse.ArgumentParser) -> None:
    """``--api`` and ``--data-dir``: which node a client command talks to."""
    c.add_argument(
        "--api",
        default=None,
        metavar="HOST:PORT|URL",
        help="the node's API address (default: the node running from --data-dir)",
    )
    c.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the node's data dir (default: $EDGEMESH_HOME or ~/.local/share/edgemesh)",
    )


@dataclass(frozen=True)
class NodeApi:
    """A node's API: its base URL and the data dir its token is read from."""

    url: str
    data_dir: Path | None = None

    def headers(self) -> dict[str, str]:
        """``Authorization`` for this node (mesh.local.resolve_token), or nothing."""
        from mesh.local import resolve_token

        token = resolve_token(self.url, self.data_dir)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def __str__(self) -> str:
        return self.url


def node_api(args: argparse.Namespace) -> NodeApi:
    """The node a client command's ``--api`` / ``--data-dir`` name."""
    from mesh.local import resolve_api

    data_dir = getattr(args, "data_dir", None)
    return NodeApi(resolve_api(getattr(args, "api", None), data_dir), data_dir)


def auth_headers(api: NodeApi | str) -> dict[str, str]:
    return (api if isinstance(api, NodeApi) else NodeApi(api)).headers()


def _refused(api: NodeApi | str, path: str, exc: urllib.error.HTTPError) -> CliError:
    text = exc.read(300).decode(errors="replace")
    hint = ""
    if exc.code == 401:
        hint = (
            " (no token for this address: set EDGEMESH_API_TOKEN, or pass --data-dir with the"
            " node's data dir)"
        )
    return CliError(f"{api}{path}: HTTP {exc.code}: {text}{hint}")


def _call(req: urllib.request.Request, api: NodeApi | str, path: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read(16 << 20))
    except urllib.error.HTTPError as exc:
        raise _refused(api, path, exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach node API at {api}: {exc}") from None


def api_get(api: NodeApi | str, path: str) -> Any:
    req = urllib.request.Request(f"{api}{path}", headers=auth_headers(api))
    return _call(req, api, path, 10)


def api_post(api: NodeApi | str, path: str, body: dict[str, Any], timeout: float = 60) -> Any:
    req = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **auth_headers(api)},
    )
    return _call(req, api, path, timeout)


def api_delete(api: NodeApi | str, path: str) -> Any:
    req = urllib.request.Request(f"{api}{path}", method="DELETE", headers=auth_headers(api))
    return _call(req, api, path, 60)
