"""Shard-graph pieces for weights that are not one matrix per linear: row slices of a fused
matrix (Phi 3's attn_qkv and gate|up ffn_up), one expert of a 3-D expert tensor, and the
routed mixture-of-experts FFN of Qwen 3 MoE; and RoPE on the position tables' inputs.

The MoE FFN follows llama.cpp's ``build_moe_ffn`` for qwen3moe: router logits (the router is
F32, as llama.cpp's quantizer keeps it), softmax over all experts, the top-k probabilities
renormalised to sum 1 (the sum clamped below at 2^-14), each token's output the weighted sum
of its k experts' SwiGLU FFNs. Experts are gathered per token, not computed for every token
and masked: for each expert the graph picks the tokens routed to it (NonZero), runs that
expert's quantized matrices (MatMulNBits, as the dense FFN) on those rows only (often none:
onnxruntime accepts zero rows) and scatter-adds the weighted rows back. The work is the
tokens' k experts, as in llama.cpp; the graph has a few nodes per expert and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .gguf_io import TensorRef
from .shards import ShardSpec

__all__ = ["GraphOps", "row_slice", "row_range", "expert_slice", "moe_ffn", "rope"]


class GraphOps(Protocol):
    """What these functions need of onnx_graph's builder."""

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        hint: str = "",
        n_out: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> Any: ...

    def const(self, value: Any, hint: str) -> str: ...

    def linear(
        self,
        x: str,
        weights: list[tuple[str, TensorRef, np.ndarray[Any, Any] | None]],
        row_scale: dict[str, float] | None = None,
        perm: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> list[str]: ...


def row_slice(ref: TensorRef, start: int, stop: int, name: str) -> TensorRef:
    """Rows [start, stop) of a matrix, as its own tensor (no copy: a view of the bytes)."""
    return TensorRef(name, ref.qtype, (stop - start,) + ref.shape[1:], ref.data[start:stop])


def row_range(ref: TensorRef, start: int, stop: int) -> TensorRef:
    """Rows [start, stop) of a matrix (stop clamped to its rows), named by the range; no
    copy (the head's row ranges, onnx_graph._head)."""
    stop = min(stop, ref.shape[0])
    data = np.asarray(ref.data).reshape(ref.shape[0], -1)[start:stop]
    return TensorRef(f"{ref.name}[{start}:{stop}]", ref.qtype, (stop - start, ref.shape[1]), data)


def expert_slice(ref: TensorRef, e: int) -> TensorRef:
    """Expert e's matrix of a 3-D expert tensor [n_expert, rows, cols]."""
    return TensorRef(f"{ref.name}.{e}", ref.qtype, ref.shape[1:], ref.data[e])


def moe_ffn(b: GraphOps, shard: ShardSpec, i: int, h: str) -> str:
    """The routed FFN of layer i on h [S, d]: [S, d]."""
    cfg = shard.config
    p = f"blk.{i}."
    n_exp, k = cfg.n_experts, cfg.n_experts_used
    router = shard.tensor(p + "ffn_gate_inp.weight")
    (logits,) = b.linear(h, [(router.name, router, None)])  # [S, n_exp]
    probs = b.op("Softmax", [logits], "probs", axis=-1)
    top, idx = b.op("TopK", [probs, b.const([k], "k")], "topk", n_out=2, axis=-1)
    total = b.op("ReduceSum", [top, b.const([1], "ax")], "wsum", keepdims=1)
    total = b.op("Max", [total, b.const(np.array(6.103515625e-5, np.float32), "eps")])
    weights = b.op("Div", [top, total], "w")  # [S, k]
    # the weight of every expert for every token, 0 where not routed: [S, n_exp]
    dense = b.op("ScatterElements", [_zeros(b, probs), idx, weights], "wdense", axis=1)
    out = _zeros(b, h)
    names = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
    gate_t, up_t, down_t = (shard.tensor(p + n) for n in names)
    for e in range(n_exp):
        ce = b.const([e], "e")  # 1-D: the builder's constants are at least 1-D
        # (token, slot) pairs routed to e; a token picks an expert once: distinct tokens
        pairs = b.op("NonZero", [b.op("Equal", [idx, ce])])  # [2, n_e]
        tok_col = b.op("Transpose", [b.op("Gather", [pairs, b.const([0], "c0")], axis=0)])
        tok = b.op("Reshape", [tok_col, b.const([-1], "shp")], "tok")  # [n_e]
        xe = b.op("Gather", [h, tok], "xe", axis=0)  # [n_e, d]
        g, u, dn = (expert_slice(t, e) for t in (gate_t, up_t, down_t))
        gate, up = b.linear(xe, [(g.name, g, None), (u.name, u, None)])
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        (ye,) = b.linear(act, [(dn.name, dn, None)])  # [n_e, d]
        we = b.op("Gather", [b.op("Gather", [dense, tok], axis=0), ce], "we", axis=1)  # [n_e, 1]
        ye = b.op("Mul", [ye, we])
        out = b.op("ScatterND", [out, tok_col, ye], "moe", reduction="add")
    return str(out)


def _zeros(b: GraphOps, like: str) -> str:
    return str(b.op("ConstantOfShape", [b.op("Shape", [like])], "zeros"))


def rope(b: GraphOps, x: str, tag: str) -> str:
    """x * cos + swap_halves(x) * sin_signed, x: [S, H, hd]; the tables ``cos_{tag}`` and
    ``sin_{tag}`` (graph inputs) carry the signs."""
    lo, hi = b.op("Split", [x], "half", n_out=2, axis=-1, num_outputs=2)
    swapped = b.op("Concat", [hi, lo], axis=-1)
    return str(b.op("Add", [b.op("Mul", [x, f"cos_{tag}"]), b.op("Mul", [swapped, f"sin_{tag}"])]))
