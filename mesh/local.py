"""Finding the local node: the default data dir and the ``node.json`` a running node writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mesh.errors import Error

__all__ = ["NoLocalNode", "default_data_dir", "resolve_api"]


class NoLocalNode(Error):
    """No API address was given and no node runs from the default data dir."""


def default_data_dir() -> Path:
    env = os.environ.get("EDGEMESH_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "edgemesh"


def resolve_api(api: str | None) -> str:
    if api:
        return api.rstrip("/")
    info = default_data_dir() / "node.json"
    try:
        return str(json.loads(info.read_text())["api"]).rstrip("/")
    except (OSError, ValueError, KeyError):
        raise NoLocalNode(
            f"no running node found ({info} missing); start one or pass --api URL"
        ) from None
