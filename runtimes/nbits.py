"""Per-type converters from GGUF blocks to MatMulNBits' layout (see quant.py for the table).

Each converter takes a matrix's blocks as ``uint8 [rows, blocks_per_row, type_size]`` and
returns an :class:`NBitsWeight` whose ``(code - zero_point) * scale - offset`` is, value for
value, what ``gguf.quants.dequantize`` (and llama.cpp) computes for those blocks.

The affine types (Q*, K-quants, IQ4) are unpacked here bit by bit. The grid types (IQ1, IQ2,
IQ3, TQ) store indices into lattice tables; rather than copy those tables, their codes are read
back from gguf's own dequantizer run on a copy of the blocks whose scales are set to known
units (d = 1, sub-block scale 0), and checked to be the small integers the formats promise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q

from .errors import UnsupportedModelError

__all__ = ["NBitsWeight", "CONVERTERS", "pack_nibbles", "unpack_nibbles"]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
Converter = Callable[[U8], "NBitsWeight"]

_F16_ONE = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
_CHUNK_ROWS = 1024  # rows dequantized at a time for the grid types: bounds the float copy
# IQ4_NL / IQ4_XS codebook (ggml's kvalues_iq4nl), small integers: 8-bit codes with zero point
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])


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
    offsets: F32 | None  # [N, nb] subtracted per block (K-quant mins, Q4_1 m), or None

    @property
    def n_blocks(self) -> int:
        return self.k // self.block

    def codes(self) -> U8:
        """Unpacked codes [N, nb, block] (one byte each)."""
        if self.bits == 8:
            return self.b
        return unpack_nibbles(self.b)

    def first_values(self) -> F32:
        """The code part ``(code - zero_point) * scale`` of each block's first value, [N, nb]
        (without the block's offset): what onnx_acts' pinned activations correct for."""
        first = self.b[..., 0] if self.bits == 8 else self.b[..., 0] & 0x0F
        vals = (first.astype(np.float32) - self.zero_points.astype(np.float32)) * self.scales
        return np.ascontiguousarray(vals, dtype=np.float32)

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


def unpack_nibbles(b: U8) -> U8:
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.uint8)
    out[..., 0::2] = b & 0x0F
    out[..., 1::2] = b >> 4
    return out


def _weight(
    bits: int,
    block: int,
    codes: npt.NDArray[np.integer] | F32,
    scales: F32,
    zp: int,
    offsets: F32 | None = None,
) -> NBitsWeight:
    n = codes.shape[0]
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, -1, block)
    nb = c.shape[1]
    return NBitsWeight(
        bits,
        block,
        n,
        nb * block,
        pack_nibbles(c) if bits == 4 else c,
        np.ascontiguousarray(scales, dtype=np.float32).reshape(n, nb),
        np.full((n, nb), zp, np.uint8),
        None if offsets is None else np.ascontiguousarray(offsets, np.float32).reshape(n, nb),
    )


def _f16(raw: U8) -> F32:
    """[..., 2] bytes -> [...] float32."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _low_high(qs: U8) -> U8:
    """16 bytes per block -> 32 values: element j in the low nibble of byte j, j+16 high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: U8) -> U8:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] bits, bit j for element j."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


# -- the affine block types -------------------------------------------------------------------


def _q4_0(blk: U8) -> NBitsWeight:
    return _weight(4, 32, _low_high(blk[..., 2:18]), _f16(blk[..., 0:2]), 8)


def _q4_1(blk: U8) -> NBitsWeight:
    # d*q + m: zero point 0 and the offset -m (the graph subtracts offsets)
    m = _f16(blk[..., 2:4])
    return _weight(4, 32, _low_high(blk[..., 4:20]), _f16(blk[..., 0:2]), 0, -m)


def _q5_0(blk: U8) -> NBitsWeight:
    codes = _low_high(blk[..., 6:22]) | (_high_bits(blk[..., 2:6]) << 4)
    return _weight(8, 32, codes, _f16(blk[..., 0:2]), 16)


def _q5_1(blk: U8) -> NBitsWeight:
    codes = _low_high(blk[..., 8:24]) | (_high_bits(blk[..., 4:8]) << 4)
    return _weight(8, 32, codes, _f16(blk[..., 0:2]), 0, -_f16(blk[..., 2:4]))


def _q8_0(blk: U8) -> NBitsWeight:
    codes = np.bitwise_xor(blk[..., 2:34], np.uint8(0x80))  # int8 q + 128, as uint8
    return _weight(8, 32, codes, _f16(blk[..., 0:2]), 128)


def _k_scale_min(s: U8) -> tuple[U8, U8]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q2_k(blk: U8) -> NBitsWeight:
    n, nsb = blk.shape[:2]
    sc = blk[..., 0:16]
    d = _f16(blk[..., 80:82])[..., None]
    dmin = _f16(blk[..., 82:84])[..., None]
    shift = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    q = (blk[..., 16:80].reshape(n, nsb, 2, 1, 32) >> shift) & 3  # [n, nsb, 2, 4, 32]
    scales = d * (sc & 0x0F).astype(np.float32)
    offsets = dmin * (sc >> 4).astype(np.float32)
    return _weight(4, 16, q.reshape(n, -1), scales, 0, offsets)


def _q3_k(blk: U8) -> NBitsWeight:
    n, nsb = blk.shape[:2]
    hmask, qs, s = blk[..., 0:32], blk[..., 32:96], blk[..., 96:108]
    d = _f16(blk[..., 108:110])[..., None]
    low = (s[..., None, 0:8] >> np.array([0, 4], np.uint8)[:, None]).reshape(n, nsb, 16) & 0x0F
    high = (s[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)).swapaxes(-1, -2)
    sc = low | ((high.reshape(n, nsb, 16) & 3) << 4)
    scales = d * (sc.astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = (qs.reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    hb = (hmask.reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    # value d*sc*(ql - 4*(1-h)) = d*sc*(code - 4) with code = ql + 4h in 0..7
    codes = ql.reshape(n, nsb, 256) | (hb.reshape(n, nsb, 256) << 2)
    return _weight(4, 16, codes, scales, 4)


def _q4_k(blk: U8) -> NBitsWeight:
    n, nsb = blk.shape[:2]
    d = _f16(blk[..., 0:2])[..., None]
    dmin = _f16(blk[..., 2:4])[..., None]
    sc, mn = _k_scale_min(blk[..., 4:16])
    qs = blk[..., 16:144].reshape(n, nsb, 4, 32)
    # chunk c of 64 values: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)
    scales = d * sc.astype(np.float32)
    return _weight(4, 32, codes.reshape(n, -1), scales, 0, dmin * mn.astype(np.float32))


def _q5_k(blk: U8) -> NBitsWeight:
    n, nsb = blk.shape[:2]
    d = _f16(blk[..., 0:2])[..., None]
    dmin = _f16(blk[..., 2:4])[..., None]
    sc, mn = _k_scale_min(blk[..., 4:16])
    qh, qs = blk[..., 16:48], blk[..., 48:176].reshape(n, nsb, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nsb, 8, 32)
    high = (qh.reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    codes = low | (high << 4)
    scales = d * sc.astype(np.float32)
    return _weight(8, 32, codes.reshape(n, -1), scales, 0, dmin * mn.astype(np.float32))


def _q6_k(blk: U8) -> NBitsWeight:
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
    return _weight(8, 16, codes.reshape(n, -1), d * sc, 32)


def _iq4_nl(blk: U8) -> NBitsWeight:
    codes = IQ4_VALUES[_low_high(blk[..., 2:18])] + 128
    return _weight(8, 32, codes, _f16(blk[..., 0:2]), 128)


def _iq4_xs(blk: U8) -> NBitsWeight:
    n, nsb = blk.shape[:2]
    d = _f16(blk[..., 0:2])[..., None]
    sh = np.ascontiguousarray(blk[..., 2:4]).view("<u2")  # [n, nsb, 1]
    low = (blk[..., 4:8, None] >> np.array([0, 4], np.uint8)).reshape(n, nsb, 8) & 0x0F
    high = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scales = d * ls.astype(np.float32)
    codes = IQ4_VALUES[_low_high(blk[..., 8:136].reshape(n, nsb, 8, 16))] + 128
    return _weight(8, 32, codes.reshape(n, -1), scales, 128)


# -- the grid types: codes read back from gguf's dequantizer at unit scales -------------------


def _unit_values(blk: U8, qtype: Q, patch: Callable[[U8], None]) -> F32:
    """gguf's values [n, K] for a copy of the blocks after ``patch`` set the scales to units."""
    n, nsb, size = blk.shape
    per_block = gguf.GGML_QUANT_SIZES[qtype][0]
    out = np.empty((n, nsb * per_block), np.float32)
    for r in range(0, n, _CHUNK_ROWS):
        part = np.array(blk[r : r + _CHUNK_ROWS])
        patch(part)
        vals = gguf.quants.dequantize(part.reshape(-1, size), qtype)
        out[r : r + _CHUNK_ROWS] = np.asarray(vals, np.float32).reshape(part.shape[0], -1)
    return out


def _codes(values: F32, mul: float, add: float, top: int, qtype: Q) -> npt.NDArray[np.int64]:
    c = values * np.float32(mul) + np.float32(add)
    ci = np.rint(c)
    if not np.array_equal(c, ci) or (ci.size and (ci.min() < 0 or ci.max() > top)):
        # cannot happen with gguf's tables as published; refuse rather than run wrong values
        raise UnsupportedModelError(f"{qtype.name}: grid values are not the expected integers")
    out: npt.NDArray[np.int64] = ci.astype(np.int64)
    return out


def _set_d(part: U8, at: int = 0) -> None:
    part[..., at : at + 2] = _F16_ONE


def _iq2_db(d: F32, s: npt.NDArray[np.integer[Any]]) -> F32:
    """IQ2's sub-block scale, in gguf's (and ggml's) order of float operations."""
    return d * (np.float32(0.5) + s.astype(np.float32)) * np.float32(0.25)


def _nibbles(b: U8) -> U8:
    """[..., m] bytes -> [..., 2m] nibbles, low one first."""
    return unpack_nibbles(b)


def _iq2_xxs(blk: U8) -> NBitsWeight:
    d = _f16(blk[..., 0:2])[..., None]
    s = blk[..., 2:66].reshape(blk.shape[0], blk.shape[1], 8, 8)[..., 7] >> 4

    def patch(p: U8) -> None:
        _set_d(p)
        p[..., 9:66:8] &= 0x0F  # the top nibble of each group's second word is its scale

    # unit values are 0.125 * grid * sign with grid in {8, 25, 43}
    codes = _codes(_unit_values(blk, Q.IQ2_XXS, patch), 8, 128, 255, Q.IQ2_XXS)
    return _weight(8, 32, codes, _iq2_db(d, s), 128)


def _iq2_16(blk: U8, qtype: Q, at: int) -> NBitsWeight:
    """IQ2_XS / IQ2_S: a 4-bit scale per 16 values in 8 bytes at ``at``."""
    d = _f16(blk[..., 0:2])[..., None]
    s = _nibbles(blk[..., at : at + 8])

    def patch(p: U8) -> None:
        _set_d(p)
        p[..., at : at + 8] = 0

    codes = _codes(_unit_values(blk, qtype, patch), 8, 128, 255, qtype)
    return _weight(8, 16, codes, _iq2_db(d, s), 128)


def _iq3_xxs(blk: U8) -> NBitsWeight:
    d = _f16(blk[..., 0:2])[..., None]
    s = blk[..., 66:98].reshape(blk.shape[0], blk.shape[1], 8, 4)[..., 3] >> 4
    db = d * (np.float32(0.5) + s.astype(np.float32)) * np.float32(0.5)

    def patch(p: U8) -> None:
        _set_d(p)
        p[..., 69:98:4] &= 0x0F

    # unit values 0.25 * grid * sign, grid in {4, 12, ..., 52, 62}: not affine, 8-bit codes
    codes = _codes(_unit_values(blk, Q.IQ3_XXS, patch), 4, 128, 255, Q.IQ3_XXS)
    return _weight(8, 32, codes, db, 128)


def _iq3_s(blk: U8) -> NBitsWeight:
    d = _f16(blk[..., 0:2])[..., None]
    s = _nibbles(blk[..., 106:110])
    db = d * (1 + 2 * s).astype(np.float32)

    def patch(p: U8) -> None:
        _set_d(p)
        p[..., 106:110] = 0

    # values db * v with v odd in -15..15: v = 2c - 15 for a 4-bit c, so
    # db*v = (c - 8) * 2db + db: zero point 8, scale 2db, offset -db (all exact in float32)
    codes = _codes(_unit_values(blk, Q.IQ3_S, patch), 0.5, 7.5, 15, Q.IQ3_S)
    return _weight(4, 32, codes, 2 * db, 8, -db)


def _iq1_s(blk: U8) -> NBitsWeight:
    d = _f16(blk[..., 0:2])[..., None]
    qh = np.ascontiguousarray(blk[..., 34:50]).view("<u2")  # [n, nsb, 8]
    dl = d * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    delta = np.where(qh & 0x8000, np.float32(-0.125), np.float32(0.125))

    def patch(p: U8) -> None:
        _set_d(p)
        p[..., 35:50:2] &= 0x0F  # scale bits 12-14 and the delta sign (bit 15) of each word

    # values dl * (g + delta), g in {-1, 0, 1}: code g + 1, zero point 1, offset -dl*delta
    codes = _codes(_unit_values(blk, Q.IQ1_S, patch), 1, 1 - 0.125, 2, Q.IQ1_S)
    return _weight(4, 32, codes, dl, 1, -dl * delta)


def _iq1_m(blk: U8) -> NBitsWeight:
    n, nsb = blk.shape[:2]
    sw = np.ascontiguousarray(blk[..., 48:56]).view("<u2")  # [n, nsb, 4]
    d_bits = (sw >> 12) << np.array([0, 4, 8, 12], np.uint16)  # the f16 scale, a nibble a word
    d = np.bitwise_or.reduce(d_bits, axis=-1).astype(np.uint16).view(np.float16)
    sub = ((sw[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & 7).reshape(n, nsb, 16)
    dl = d.astype(np.float32)[..., None] * (2 * sub + 1).astype(np.float32)

    def patch(p: U8) -> None:
        # d = 1.0 (0x3C00, split over the top nibbles) and every 3-bit sub-scale 0
        p[..., 48:56] = np.frombuffer(np.array([0, 0, 0xC000, 0x3000], "<u2").tobytes(), np.uint8)

    # values dl * (g + delta), delta = +-1/8 per 8 values: 8g + 8delta in -9..9 are the
    # codes (8-bit, zero point 128) and dl/8 the scale; exact, dl/8 is a power-of-two step
    codes = _codes(_unit_values(blk, Q.IQ1_M, patch), 8, 128, 255, Q.IQ1_M)
    return _weight(8, 16, codes, dl / np.float32(8), 128)


def _tq(qtype: Q, d_at: int) -> Converter:
    def conv(blk: U8) -> NBitsWeight:
        d = _f16(blk[..., d_at : d_at + 2])

        def patch(p: U8) -> None:
            _set_d(p, d_at)

        # ternary (TQ2_0 also allows 2): d * (c - 1), one scale per 256 repeated per 32
        codes = _codes(_unit_values(blk, qtype, patch), 1, 1, 3, qtype)
        return _weight(4, 32, codes, np.repeat(d, 8, axis=-1), 1)

    return conv


def _mxfp4(blk: U8) -> NBitsWeight:
    e = blk[..., 0].astype(np.uint32)
    # ggml_e8m0_to_fp32_half: 2^(e - 128), with e < 2 in the subnormal range
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    d = bits.astype(np.uint32).view(np.float32)

    def patch(p: U8) -> None:
        p[..., 0] = 128  # half-scale 1.0

    codes = _codes(_unit_values(blk, Q.MXFP4, patch), 1, 128, 255, Q.MXFP4)
    return _weight(8, 32, codes, d, 128)


CONVERTERS: dict[Q, Converter] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
    Q.IQ4_NL: _iq4_nl,
    Q.IQ4_XS: _iq4_xs,
    Q.IQ2_XXS: _iq2_xxs,
    Q.IQ2_XS: lambda blk: _iq2_16(blk, Q.IQ2_XS, 66),
    Q.IQ2_S: lambda blk: _iq2_16(blk, Q.IQ2_S, 74),
    Q.IQ3_XXS: _iq3_xxs,
    Q.IQ3_S: _iq3_s,
    Q.IQ1_S: _iq1_s,
    Q.IQ1_M: _iq1_m,
    Q.TQ1_0: _tq(Q.TQ1_0, 52),
    Q.TQ2_0: _tq(Q.TQ2_0, 64),
}
if hasattr(Q, "MXFP4"):  # gguf >= 0.18
    CONVERTERS[Q.MXFP4] = _mxfp4
