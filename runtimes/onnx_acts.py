"""llama.cpp's rounding of activations, reproduced in the shard graph at int8 speed.

llama.cpp's CPU matmul of a quantized weight first rounds the activations to int8 in the
weight type's "vec_dot_type" (ggml-cpu's type traits), then takes integer dot products:

====== ============================================================ =========================
format how a row of x is rounded (ggml-cpu on x86)                   weight types
====== ============================================================ =========================
Q8_K   per 256: iscale = -127/max (max: the value of largest |x|),   K-quants, IQ1-IQ3, IQ4_XS,
       q = nearest_int(iscale*x) (ties to even), d = 1/iscale (fp32) TQ1_0, TQ2_0
Q8_0   per 32: d = amax/127 stored as fp16, q = round(x * 127/amax)  Q4_0, Q5_0, Q8_0, IQ4_NL,
       (ties to even in the AVX2 code); dot products use the fp16 d  MXFP4
Q8_1   Q8_0's q and d, and s = fp16(d * sum(q)) for the min term     Q4_1, Q5_1
====== ============================================================ =========================

onnxruntime's MatMulNBits at accuracy level 4 also rounds x to int8, per block of the
weight's own block size (16 or 32) in amax/127 steps. For the Q8_0 types that is llama.cpp's
rounding but for the fp16 step. For the Q8_K types it is not: llama.cpp's steps are those of
a 256-value block, up to 8x coarser, and on some models llama.cpp's own rounding decides a
greedy token (measured in tests/test_runtime_quant_matrix.py: 5 of 192 rows broke the rule,
and float32 activations fixed only some).

So the graph rounds x as llama.cpp does, then hands MatMulNBits values it represents exactly.
A rounded block is ``q * d`` with integers ``|q| <= 127``; MatMulNBits re-rounds each of its
blocks in steps of (its largest |value|) / 127, which is ``d`` only when a value of that
block is ``127 * d``. The graph *pins* each MatMulNBits block's first value to ``127 * d``
(its step is then exactly d and every value keeps its q) and subtracts what the pin added,
``(127 - q_0) * d`` times that column of the weight, with one small float MatMul of
[S, K / block] by [K / block, N] (4 bytes per weight block, like the K-quants' mins). The
result is llama.cpp's integer dot product to about 1e-6 of the output's range at the int8
kernel's speed; MatMulNBits at level 0 (float32 activations) would be as exact but runs
2.5x slower for 4-bit codes and, with no float kernel for 8-bit ones, about 100x.

Q8_1 (Q4_1, Q5_1): llama.cpp's blocks are MatMulNBits' 32 and each has a value of 127 * d
(its largest), so the rounded x needs no pin; its min terms take llama.cpp's fp16 ``s``.
Q8_0: left to MatMulNBits' own rounding, which differs from llama.cpp's by the fp16 step
only (2^-11 of a step); rounding here would cost a decode step's worth of small ops for the
Q8_0 head and the Q5_0/Q8_0 layers of Gemma 3 (docs/benchmarks.md) and change nothing the
matrix measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from gguf import GGMLQuantizationType as Q
from onnx import TensorProto

__all__ = [
    "ActFormat",
    "MatmulPlan",
    "plan",
    "llama_format",
    "Rounded",
    "LlamaActs",
    "ggml_gelu",
    "fp16_round",
]

ActFormat = Literal["none", "q8_K", "q8_0", "q8_1"]

_Q8_0_TYPES = frozenset(
    {Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL} | ({Q.MXFP4} if hasattr(Q, "MXFP4") else set())
)
_Q8_1_TYPES = frozenset({Q.Q4_1, Q.Q5_1})
_FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
_TINY = 1e-30  # a floor for amax: an all-zero block gives q = 0, as in llama.cpp


def llama_format(qtype: Q) -> ActFormat:
    """The int8 format llama.cpp's CPU backend rounds activations to for ``qtype``."""
    if qtype in _FLOAT_TYPES:
        return "none"  # F16/BF16 dot products round x to 16 bits: not reproduced (0.02-0.2%)
    if qtype in _Q8_0_TYPES:
        return "q8_0"
    if qtype in _Q8_1_TYPES:
        return "q8_1"
    return "q8_K"


@dataclass(frozen=True)
class MatmulPlan:
    level: int  # MatMulNBits accuracy_level
    acts: ActFormat = "none"  # how x is rounded before it ("none": as it comes)
    pin: bool = False  # pin each MatMulNBits block's first value to 127 * d (module doc)


def plan(qtype: Q, accuracy_level: int, llama_acts: bool) -> MatmulPlan:
    """How the graph multiplies by a quantized weight of ``qtype``.

    ``accuracy_level`` 0 means float32 activations everywhere (nothing rounded);
    ``llama_acts`` False leaves the rounding to MatMulNBits alone.
    """
    if accuracy_level == 0 or not llama_acts:
        return MatmulPlan(accuracy_level)
    fmt = llama_format(qtype)
    if fmt == "q8_K":
        return MatmulPlan(accuracy_level, fmt, pin=True)
    if fmt == "q8_1":
        return MatmulPlan(accuracy_level, fmt)
    return MatmulPlan(accuracy_level)


class GraphOps(Protocol):
    def op(
        self,
        op_type: str,
        inputs: Any,
        hint: str = "",
        n_out: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> Any: ...

    def const(self, value: Any, hint: str) -> str: ...


@dataclass(frozen=True)
class Rounded:
    """x [S, k] rounded to ``fmt``: x = q * d per block of ``block`` values."""

    fmt: ActFormat
    k: int
    block: int
    q: str  # [S, k / block, block] the integers, as float32
    d: str  # [S, k / block, 1] each block's step, as the dot products use it
    d32: str  # the step before Q8_0/Q8_1's fp16 rounding (Q8_K: d)


@dataclass
class LlamaActs:
    """Builds (once per input and format) the graph ops that round activations."""

    b: GraphOps
    _rounded: dict[tuple[str, str], Rounded] = field(default_factory=dict)
    _done: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def _f32(self, v: float) -> str:
        return self.b.const(np.array(v, np.float32), "c")

    def rounded(self, x: str, k: int, fmt: ActFormat) -> Rounded:
        key = (x, fmt)
        if key not in self._rounded:
            self._rounded[key] = self._round(x, k, fmt)
        return self._rounded[key]

    def _round(self, x: str, k: int, fmt: ActFormat) -> Rounded:
        b = self.b
        block = 256 if fmt == "q8_K" else 32
        if k % block:
            raise ValueError(f"{fmt} rounds blocks of {block} values; K = {k}")
        xb = b.op("Reshape", [x, b.const([-1, k // block, block], "shp")], "xb")
        amax = b.op("ReduceMax", [b.op("Abs", [xb]), b.const([2], "ax")], "amax", keepdims=1)
        inv = b.op("Div", [self._f32(127.0), b.op("Max", [amax, self._f32(_TINY)])], "iscale")
        q = b.op("Round", [b.op("Mul", [xb, inv])], "q")  # ties to even, as nearest_int
        if fmt == "q8_K":
            d = d32 = b.op("Div", [self._f32(1.0), inv], "d")  # ggml: d = 1/iscale
        else:
            d32 = b.op("Div", [amax, self._f32(127.0)], "d32")  # ggml: amax/127, kept as fp16
            d = fp16_round(b, d32)
        return Rounded(fmt, k, block, str(q), str(d), str(d32))

    def values(self, r: Rounded) -> str:
        """The rounded x, q * d, [S, k]."""
        key = ("x", r.q)
        if key not in self._done:
            b = self.b
            xq = b.op("Mul", [r.q, r.d])
            self._done[key] = str(b.op("Reshape", [xq, b.const([-1, r.k], "shp")], "xq"))
        out: str = self._done[key]
        return out

    def _split(self, r: Rounded, block: int) -> tuple[str, str]:
        """q as [S, k / r.block, r.block / block, block] and d as [S, k / r.block, 1, 1]."""
        key = ("split", r.q, block)
        if key not in self._done:
            b = self.b
            shape = [-1, r.k // r.block, r.block // block, block]
            q4 = b.op("Reshape", [r.q, b.const(shape, "shp")], "q4")
            d4 = b.op("Unsqueeze", [r.d, b.const([3], "ax")], "d4")
            self._done[key] = (str(q4), str(d4))
        q4d4: tuple[str, str] = self._done[key]
        return q4d4

    def pinned(self, r: Rounded, block: int) -> tuple[str, str]:
        """(x', t): x' [S, k] the rounded x with the first value of each ``block`` set to
        127 * d, and t [S, k / block] what that added, (127 - q_0) * d."""
        key = ("pin", r.q, block)
        if key not in self._done:
            b = self.b
            q4, d4 = self._split(r, block)
            gap = b.op("Sub", [self._f32(127.0), q4], "gap")  # exact: small integers
            mask = np.zeros(block, np.float32)
            mask[0] = 1.0
            pinned = b.op("Add", [q4, b.op("Mul", [gap, b.const(mask, "first")])])
            xp = b.op("Reshape", [b.op("Mul", [pinned, d4]), b.const([-1, r.k], "shp")], "xpin")
            g0 = b.op("Slice", [gap, b.const([0], "s0"), b.const([1], "s1"), b.const([3], "ax")])
            t = b.op("Reshape", [b.op("Mul", [g0, d4]), b.const([-1, r.k // block], "shp")], "t")
            self._done[key] = (str(xp), str(t))
        out: tuple[str, str] = self._done[key]
        return out

    def block_sums(self, r: Rounded, block: int) -> str:
        """Sums of the rounded x per ``block`` values [S, k / block], as llama.cpp's min
        terms take them from its int8 copy (Q8_1: s = fp16(d * sum(q)) per 32)."""
        key = ("bsum", r.q, block)
        if key not in self._done:
            b = self.b
            if r.fmt == "q8_1":
                if block != r.block:
                    raise ValueError(f"Q8_1 block sums are per {r.block}, not {block}")
                qs = b.op("ReduceSum", [r.q, b.const([2], "ax")], keepdims=1)
                s = fp16_round(b, b.op("Mul", [qs, r.d32]))
            else:
                q4, d4 = self._split(r, block)
                qs = b.op("ReduceSum", [q4, b.const([3], "ax")], keepdims=1)
                s = b.op("Mul", [qs, d4])
            shape = b.const([-1, r.k // block], "shp")
            self._done[key] = str(b.op("Reshape", [s, shape], "bsum"))
        out: str = self._done[key]
        return out


def ggml_gelu(b: GraphOps, x: str) -> str:
    """GELU (tanh form) as ggml's CPU backend computes it (GGML_GELU_FP16, vec.h): x rounded
    to fp16, looked up in a table of fp16 results; x itself from 10 up, 0 from -10 down."""
    g = fp16_round(b, b.op("Gelu", [fp16_round(b, x)], approximate="tanh"))
    big = b.op("GreaterOrEqual", [x, b.const(np.array(10.0, np.float32), "c")])
    return str(b.op("Where", [big, x, g], "gelu"))


def fp16_round(b: GraphOps, x: str) -> str:
    """x rounded to float16 and back (round to nearest even, as ggml's FP32_TO_FP16)."""
    h = b.op("Cast", [x], to=TensorProto.FLOAT16)
    return str(b.op("Cast", [h], "f16r", to=TensorProto.FLOAT))
