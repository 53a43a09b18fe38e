"""GGUF quantized blocks re-laid out, without loss, for onnxruntime's ``MatMulNBits``.

MatMulNBits computes ``(q - zero_point) * scale`` per block of ``block_size`` values along K,
with 4-bit (two values a byte, low nibble first) or 8-bit codes. Mapping, all exact:

- Q4_0: ``d*(q-8)``, 4-bit, block 32, zero point 8.
- Q5_0: ``d*(q-16)`` with 5-bit q: 8-bit codes, block 32, zero point 16.
- Q8_0: ``d*q`` with int8 q: 8-bit codes ``q+128``, zero point 128.
- Q6_K: ``d*sc*(q-32)`` per 16 values: 8-bit codes, block 16, zero point 32.
- Q4_K: ``d*sc*q - dmin*m`` per 32 values: 4-bit, zero point 0, and the ``dmin*m`` offsets
  kept apart (the graph subtracts ``blocksum(x) @ offsets.T``): float zero points would be exact
  too but onnxruntime's CPU kernel runs them about 40x slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q

from .errors import UnsupportedModelError
from .gguf_io import TensorRef

__all__ = ["NBitsWeight", "to_nbits", "dequantize_nbits", "pack_nibbles"]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass
class NBitsWeight:
    """A [N, K] weight in MatMulNBits form (N outputs, K inputs, nb = K / block blocks)."""

    bits: int
    block: int
    n: int
    k: int
    b: U8  # [N, nb, block * bits / 8]
    scales: F32  # [N, nb]
    zero_points: U8  # [N, nb], unpacked
    offsets: F32 | None  # [N, nb] subtracted per block (Q4_K mins), or None

    @property
    def n_blocks(self) -> int:
        return self.k // self.block

    def codes(self) -> U8:
        """Unpacked codes [N, nb, block] (one byte each)."""
        if self.bits == 8:
            return self.b
        out = np.empty((self.n, self.n_blocks, self.block), np.uint8)
        out[..., 0::2] = self.b & 0x0F
        out[..., 1::2] = self.b >> 4
        return out

    def packed_zero_points(self) -> U8:
        """Zero points in MatMulNBits' input layout."""
        if self.bits == 8:
            return np.ascontiguousarray(self.zero_points.reshape(-1))
        nb = self.n_blocks
        zp = self.zero_points
        if nb % 2:
            zp = np.concatenate([zp, np.zeros((self.n, 1), np.uint8)], axis=1)
        return np.ascontiguousarray((zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1))


def pack_nibbles(codes: U8) -> U8:
    """[..., 2m] codes 0..15 -> [..., m] bytes, even index in the low nibble."""
    return np.ascontiguousarray((codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8))


def _f16(raw: U8) -> F32:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _blocks(ref: TensorRef, block_bytes: int) -> U8:
    n = ref.shape[0]
    raw = np.asarray(ref.data, dtype=np.uint8)
    return raw.reshape(n, -1, block_bytes)


def _q4_0(ref: TensorRef) -> NBitsWeight:
    blk = _blocks(ref, 18)
    d = _f16(blk[..., 0:2])
    qs = blk[..., 2:18]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j low, j+16 high
    n, nb = d.shape
    return NBitsWeight(
        4, 32, n, nb * 32, pack_nibbles(codes), d, np.full((n, nb), 8, np.uint8), None
    )


def _q5_0(ref: TensorRef) -> NBitsWeight:
    blk = _blocks(ref, 22)
    d = _f16(blk[..., 0:2])
    qh = np.ascontiguousarray(blk[..., 2:6]).view("<u4")[..., 0]
    qs = blk[..., 6:22]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    bits = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    codes = (low | (bits.astype(np.uint8) << 4)).astype(np.uint8)
    n, nb = d.shape
    return NBitsWeight(8, 32, n, nb * 32, codes, d, np.full((n, nb), 16, np.uint8), None)


def _q8_0(ref: TensorRef) -> NBitsWeight:
    blk = _blocks(ref, 34)
    d = _f16(blk[..., 0:2])
    codes = np.bitwise_xor(blk[..., 2:34], np.uint8(0x80))  # int8 q + 128, as uint8
    n, nb = d.shape
    return NBitsWeight(8, 32, n, nb * 32, codes, d, np.full((n, nb), 128, np.uint8), None)


def _q4_k(ref: TensorRef) -> NBitsWeight:
    blk = _blocks(ref, 144)
    d = _f16(blk[..., 0:2])[..., None]
    dmin = _f16(blk[..., 2:4])[..., None]
    s = blk[..., 4:16].astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blk[..., 16:144].reshape(blk.shape[0], blk.shape[1], 4, 32)
    # chunk c of 64 values: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(blk.shape[0], blk.shape[1], 8, 32)
    n = blk.shape[0]
    nb = blk.shape[1] * 8
    scales = (d * sc.astype(np.float32)).reshape(n, nb)
    offsets = (dmin * mn.astype(np.float32)).reshape(n, nb)
    return NBitsWeight(
        4,
        32,
        n,
        nb * 32,
        pack_nibbles(codes.reshape(n, nb, 32)),
        scales.astype(np.float32),
        np.zeros((n, nb), np.uint8),
        offsets.astype(np.float32),
    )


def _q6_k(ref: TensorRef) -> NBitsWeight:
    blk = _blocks(ref, 210)
    n, nsb = blk.shape[:2]
    ql = blk[..., 0:128].reshape(n, nsb, 2, 64)
    qh = blk[..., 128:192].reshape(n, nsb, 2, 32)
    sc = np.ascontiguousarray(blk[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(blk[..., 208:210])[..., None]
    codes = np.empty((n, nsb, 2, 128), np.uint8)
    codes[..., 0:32] = (ql[..., 0:32] & 0x0F) | (((qh >> 0) & 3) << 4)
    codes[..., 32:64] = (ql[..., 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
    codes[..., 64:96] = (ql[..., 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    codes[..., 96:128] = (ql[..., 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    nb = nsb * 16
    return NBitsWeight(
        8,
        16,
        n,
        nb * 16,
        codes.reshape(n, nb, 16),
        (d * sc).reshape(n, nb).astype(np.float32),
        np.full((n, nb), 32, np.uint8),
        None,
    )


_CONVERTERS: dict[Q, Any] = {
    Q.Q4_0: _q4_0,
    Q.Q5_0: _q5_0,
    Q.Q8_0: _q8_0,
    Q.Q4_K: _q4_k,
    Q.Q6_K: _q6_k,
}


def to_nbits(ref: TensorRef) -> NBitsWeight | None:
    """The MatMulNBits form of a quantized 2-D tensor; None for F32/F16 (kept as floats)."""
    if ref.qtype in (Q.F32, Q.F16):
        return None
    if len(ref.shape) != 2:
        raise UnsupportedModelError(f"{ref.name}: quantized tensors must be matrices")
    conv = _CONVERTERS.get(ref.qtype)
    if conv is None:
        raise UnsupportedModelError(f"{ref.name}: no MatMulNBits mapping for {ref.qtype.name}")
    w: NBitsWeight = conv(ref)
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
