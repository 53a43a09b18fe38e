"""Finding the local node: the default data dir, the ``node.json`` a running node writes and
the API token it keeps beside it (``api.token``, mode 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mesh.errors import Error

__all__ = ["NoLocalNode", "default_data_dir", "resolve_api", "resolve_token"]


class NoLocalNode(Error):
    """No API address was given and no node runs from the default data dir."""


def default_data_dir() -> Path:
    env = os.environ.get("EDGEMESH_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "edgemesh"


def resolve_api(api: str | None, data_dir: Path | None = None) -> str:
    if api:
        return api.rstrip("/")
    info = (data_dir if data_dir is not None else default_data_dir()) / "node.json"
    try:
        return str(json.loads(info.read_text())["api"]).rstrip("/")
    except (OSError, ValueError, KeyError):
        raise NoLocalNode(
            f"no running node found ({info} missing); start one or pass --api URL"
        ) from None


def resolve_token(api: str, data_dir: Path | None = None) -> str | None:
    """The token to send to ``api``: ``EDGEMESH_API_TOKEN`` when set, else the one the node
    running from ``data_dir`` (default: the default data dir) wrote, but only when ``api`` is
    that node's address: a token is never handed to some other server named by ``--api``."""
    env = os.environ.get("EDGEMESH_API_TOKEN")
    if env:
        return env
    base = data_dir if data_dir is not None else default_data_dir()
    try:
        running = str(json.loads((base / "node.json").read_text())["api"]).rstrip("/")
        if running != api.rstrip("/"):
            return None
        token = (base / "api.token").read_text(encoding="ascii").strip()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return token or None
