"""Shard-graph pieces for weights that are not one matrix per linear: row slices of a fused
matrix (Phi 3's attn_qkv and gate|up ffn_up)."""

from __future__ import annotations

from .gguf_io import TensorRef

__all__ = ["row_slice"]


def row_slice(ref: TensorRef, start: int, stop: int, name: str) -> TensorRef:
    """Rows [start, stop) of a matrix, as its own tensor (no copy: a view of the bytes)."""
    return TensorRef(name, ref.qtype, (stop - start,) + ref.shape[1:], ref.data[start:stop])
