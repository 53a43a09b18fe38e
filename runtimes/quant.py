"""GGUF quantized blocks re-laid out, without loss, for onnxruntime's ``MatMulNBits``.

MatMulNBits computes ``(q - zero_point) * scale`` per block of ``block_size`` values along K,
with 4-bit (two values a byte, low nibble first) or 8-bit codes; where a format adds a float
per block (a min), the graph subtracts ``blocksum(x) @ offsets.T`` beside it (float zero points
would be exact too but onnxruntime's CPU kernel runs them about 40x slower). Every mapping
reproduces ``gguf.quants.dequantize`` bit for bit (tests/test_runtime_quant.py):

====== ===== ===== ======= ===========================================================
type   bits  block zero pt what the GGUF stores -> MatMulNBits
====== ===== ===== ======= ===========================================================
Q4_0   4     32    8       d*(q-8)
Q4_1   4     32    0       d*q + m: offset -m
Q5_0   8     32    16      d*(q-16), 5-bit q
Q5_1   8     32    0       d*q + m: offset -m
Q8_0   8     32    128     d*q, int8 q as q+128
Q2_K   4     16    0       d*sc*q - dmin*m per 16: offset dmin*m
Q3_K   4     16    4       d*(sc-32)*(q-4) per 16, q = 2 low bits + 4*high bit
Q4_K   4     32    0       d*sc*q - dmin*m per 32: offset dmin*m
Q5_K   8     32    0       d*sc*q - dmin*m per 32, 5-bit q
Q6_K   8     16    32      d*sc*(q-32) per 16
IQ4_NL 8     32    128     d*kv[q]: the codebook's values are integers in -127..113
IQ4_XS 8     32    128     d*(ls-32)*kv[q] per 32
IQ2_*  8     32/16 128     db*(+-grid), grid values 8, 25, 43 (XXS per 32; XS, S per 16)
IQ3_XXS 8    32    128     db*(+-grid), grid values 4..62 (not evenly spaced)
IQ3_S  4     32    8       db*v, v odd in -15..15 = 2c-15: scale 2db, offset -db
IQ1_S  4     32    1       dl*(g+delta), g in -1..1: scale dl, offset -dl*delta
IQ1_M  8     16    128     dl*(g+delta) with delta per 8 values: codes 8g+8delta, dl/8
TQ1_0  4     32    1       d*t, t ternary (TQ2_0: t in -1..2)
MXFP4  8     32    128     e8m0 scale * doubled e2m1 values (integers in -12..12)
====== ===== ===== ======= ===========================================================

The IQ types with 8-bit codes take more memory in onnxruntime than in the GGUF (8.5 bits a
weight against 2-4.5): their codebooks are not affine, so fewer bits would change the values.
F32, F16 and BF16 matrices run as float32 MatMul (the values convert exactly).
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from .errors import UnsupportedModelError
from .gguf_io import SUPPORTED_TYPES, TensorRef
from .nbits import CONVERTERS, NBitsWeight, pack_nibbles

__all__ = [
    "NBitsWeight",
    "to_nbits",
    "dequantize_nbits",
    "pack_nibbles",
    "FLOAT_TYPES",
    "Support",
    "type_support",
    "nbits_layout",
    "onnx_weight_bytes",
]

F32 = npt.NDArray[np.float32]
Support = Literal["exact", "requantized", "dequantized", "unsupported"]

FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})


def to_nbits(ref: TensorRef) -> NBitsWeight | None:
    """The MatMulNBits form of a quantized 2-D tensor; None for float types (kept as floats)."""
    if ref.qtype in FLOAT_TYPES:
        return None
    if len(ref.shape) != 2:
        raise UnsupportedModelError(f"{ref.name}: quantized tensors must be matrices")
    conv = CONVERTERS.get(ref.qtype)
    if conv is None:
        raise UnsupportedModelError(f"{ref.name}: no MatMulNBits mapping for {ref.qtype.name}")
    _, type_size = GGML_QUANT_SIZES[ref.qtype]
    raw = np.asarray(ref.data, dtype=np.uint8)
    w = conv(raw.reshape(ref.shape[0], -1, type_size))
    if (w.n, w.k) != ref.shape:
        raise UnsupportedModelError(f"{ref.name}: block layout does not match shape {ref.shape}")
    return w


def dequantize_nbits(w: NBitsWeight) -> F32:
    """Float values [N, K] of an NBitsWeight (what the graph computes with)."""
    codes = w.codes().astype(np.float32)
    vals = (codes - w.zero_points[..., None].astype(np.float32)) * w.scales[..., None]
    if w.offsets is not None:
        vals -= w.offsets[..., None]
    return vals.reshape(w.n, w.k).astype(np.float32)


@cache
def nbits_layout(qtype: Q) -> tuple[int, int, bool] | None:
    """(bits, block, has offsets) of the onnx runtime's layout for ``qtype``; None for floats
    and types without a mapping. Found by converting one zero block, so it cannot drift."""
    if qtype in FLOAT_TYPES or qtype not in CONVERTERS:
        return None
    _, type_size = GGML_QUANT_SIZES[qtype]
    w = CONVERTERS[qtype](np.zeros((1, 1, type_size), np.uint8))
    return w.bits, w.block, w.offsets is not None


def onnx_weight_bytes(ref: TensorRef) -> int:
    """Bytes the onnx runtime holds for ``ref`` once re-laid out (before onnxruntime's own
    prepacking): codes at their MatMulNBits width, a float32 scale, a zero point and maybe an
    offset per block; float32 for float types. IQ2 at 8-bit codes is ~4x its GGUF size."""
    count = int(np.prod(ref.shape, dtype=np.int64))
    layout = nbits_layout(ref.qtype) if len(ref.shape) == 2 else None
    if layout is None:
        return 4 * count
    bits, block, has_offsets = layout
    return count * bits // 8 + count // block * (4 + 1 + (4 if has_offsets else 0))


def type_support(qtype: Q | int | str) -> dict[str, Support]:
    """How each runtime runs tensors of ``qtype``, for ``edgemesh model inspect``.

    "exact": the GGUF's values, kept quantized (llama.cpp natively, onnx re-laid out for
    MatMulNBits); "dequantized": the exact values expanded to float32 at load (tinygrad always,
    onnx for F16/BF16); "requantized": values changed on load (no type needs it today);
    "unsupported": edgemesh's reader refuses the file.
    """
    q = _as_type(qtype)
    if q is None or q not in SUPPORTED_TYPES:
        return {"llamacpp": "unsupported", "onnx": "unsupported", "tinygrad": "unsupported"}
    onnx: Support
    if q == Q.F32:
        onnx = "exact"
    elif q in FLOAT_TYPES:
        onnx = "dequantized"
    else:
        onnx = "exact" if q in CONVERTERS else "unsupported"
    tinygrad: Support = "exact" if q == Q.F32 else "dequantized"
    return {"llamacpp": "exact", "onnx": onnx, "tinygrad": tinygrad}


def _as_type(qtype: Q | int | str) -> Q | None:
    try:
        if isinstance(qtype, str):
            return Q[qtype.upper()]
        return Q(qtype)
    except (KeyError, ValueError):
        return None
