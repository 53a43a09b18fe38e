"""Position-dependent inputs shared by the layer runtimes: RoPE tables and attention masks.

Both follow llama.cpp: RoPE frequencies ``base^(-2i/d)`` (divided by llama3's rope_freqs when
present, times the linear scaling factor), rotate-halves form; a key at p0 is visible from a
query at p1 when p0 <= p1 and, on sliding-window layers, p1 - p0 < window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rope_tables", "attention_masks"]


def rope_tables(
    positions: np.ndarray[Any, Any],
    head_dim: int,
    base: float,
    freq_scale: float = 1.0,
    freq_factors: np.ndarray[Any, Any] | None = None,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """cos and signed sin tables [S, 1, head_dim] for rotate-halves RoPE."""
    half = head_dim // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    theta = positions.astype(np.float64)[:, None] * freq_scale * inv[None, :]
    cos, sin = np.cos(theta), np.sin(theta)
    cos_t = np.concatenate([cos, cos], axis=1)[:, None, :].astype(np.float32)
    sin_t = np.concatenate([-sin, sin], axis=1)[:, None, :].astype(np.float32)
    return cos_t, sin_t


def attention_masks(n_past: int, n_new: int, window: int) -> np.ndarray[Any, Any]:
    """Additive mask [S, T]: causal, and (window > 0) keys at most window-1 positions back."""
    qpos = n_past + np.arange(n_new, dtype=np.int32)[:, None]  # int32: S x T temporaries
    kpos = np.arange(n_past + n_new, dtype=np.int32)[None, :]
    ok = kpos <= qpos
    if window > 0:
        ok &= (qpos - kpos) < window  # llama.cpp: masked when p1 - p0 >= n_swa
    return np.where(ok, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
