"""Builds the ONNX graph of one shard (a unit range) with ``onnx.helper``.

Inputs: ``embeds`` [S, d] (first stage: the step's embedding rows, read outside the graph) or
``hidden_in`` [S, d]; RoPE tables ``cos_g``/``sin_g`` (``_l`` for sliding-window layers)
[S, 1, hd]; masks ``mask_g``/``mask_l`` [B, 1, 1, Q, C] and the layout indices ``kv_idx``,
``q_idx``, ``row_idx`` (one call may run several sessions: runtimes/onnx_batch.py); per layer
the pooled caches ``past_k_i``/``past_v_i`` [P, Hkv, hd]; ``out_idx`` [M] (last stage).
Outputs: ``hidden_out`` [S, d] or ``logits`` [M, vocab], and the step's new rows
``present_k_i``/``present_v_i`` [S, Hkv, hd].

Weights stay quantized (MatMulNBits, see quant.py); F16/F32 matrices become float32 MatMul.
RoPE is always computed in "neox" form (rotate halves): for llama's adjacent-pair layout the
rows of Wq and Wk are permuted within each head, which leaves q.k unchanged. The attention
scale is folded into Wq (or Gemma's q-norm weight).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .arch import ModelConfig
from .gguf_io import TensorRef
from .onnx_acts import LlamaActs, MatmulPlan, fp16_round, ggml_gelu, plan
from .onnx_parts import moe_ffn, rope, row_range, row_slice
from .quant import NBitsWeight, to_nbits
from .shards import ShardSpec

__all__ = ["GraphOptions", "build_shard_graph", "OPSET"]

log = logging.getLogger(__name__)

OPSET = 21
_F = TensorProto.FLOAT


@dataclass(frozen=True)
class GraphOptions:
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast); 0 = float32
    fuse_linears: bool = True  # one MatMulNBits for q|k|v and for gate|up when layouts match
    # Per-block mins (K-quants, Q4_1, Q5_1, IQ3_S, IQ1_S) subtracted with the activations
    # rounded as MatMulNBits rounds them (level 4 only): see _Builder._block_sums. Off by
    # default: on Gemma 3 270M it lowers the gap to llama.cpp on every prompt tried (3.7-4.6%
    # of the logit range -> 2.7-3.7%) but turns one near-tie the other way (llama.cpp's margin
    # 0.277, float32 activations 0.011), which test_runtime_gemma's rule counts as a mismatch.
    round_block_sums: bool = False
    # Round activations as llama.cpp does where MatMulNBits' own int8 rounding differs from
    # it (Q8_K-family weights: K-quants, IQ, TQ; Q4_1/Q5_1's min terms), see onnx_acts.py
    llama_acts: bool = True
    # The output head as several matmuls over row ranges of this many rows (0: one matmul):
    # each range is converted, written and prepacked on its own, so that building the graph
    # and onnxruntime's prepacking never hold a whole second copy of a large head (Gemma 3:
    # 262144 rows, 170 MiB). Costs one Concat of the logits per step.
    head_chunk_rows: int = 32768
    # The KV cache in float16 (llama.cpp's default): keys and values rounded as stored, and
    # read back widened to float32. Half the bytes: 36 -> 18 KB a position on Gemma 3 270M.
    kv_float16: bool = True


@dataclass
class _Builder:
    cfg: ModelConfig
    opts: GraphOptions
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    external: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    # where large weights go: returns their external_data entries (see onnx_weights.py);
    # None keeps them in ``external`` for add_external_initializers
    sink: Callable[[np.ndarray[Any, Any]], list[tuple[str, str]]] | None = None
    _n: int = 0
    # activations rounded as llama.cpp rounds them, once per input and format (onnx_acts.py)
    acts: LlamaActs = field(init=False)

    def __post_init__(self) -> None:
        self.acts = LlamaActs(self)

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        hint: str = "",
        n_out: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> Any:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type,
                list(inputs),
                outs,
                domain=domain or None,
                name=self.name("n_" + op_type),
                **attrs,
            )
        )
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, hint: str) -> str:
        if isinstance(value, np.ndarray):
            arr = value
        else:
            arr = np.asarray(value, dtype=np.int64 if isinstance(value, int | list) else np.float32)
        n = self.name(hint)
        self.inits[n] = numpy_helper.from_array(np.ascontiguousarray(arr), n)
        return n

    def init(self, name: str, arr: np.ndarray[Any, Any]) -> str:
        """A weight: large ones are handed to onnxruntime as external initializers, so the
        bytes are neither copied into the protobuf nor serialized."""
        if name in self.inits:
            return name
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < 4096:
            self.inits[name] = numpy_helper.from_array(arr, name)
            return name
        t = onnx.TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        if self.sink is None:
            entries = [("location", "edgemesh-external"), ("offset", "0")]
            entries.append(("length", str(arr.nbytes)))
            self.external[name] = arr
        else:
            entries = self.sink(arr)
        for k, v in entries:
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits[name] = t
        return name

    # -- building blocks ---------------------------------------------------------------
    def rms_norm(self, x: str, weight: np.ndarray[Any, Any], wname: str) -> str:
        w = self.init(wname, weight.astype(np.float32))
        return str(
            self.op(
                "SimplifiedLayerNormalization",
                [x, w],
                "rms",
                axis=-1,
                epsilon=float(self.cfg.rms_eps),
            )
        )

    def linear(
        self,
        x: str,
        weights: list[tuple[str, TensorRef, np.ndarray[Any, Any] | None]],
        row_scale: dict[str, float] | None = None,
        perm: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> list[str]:
        """y_i = x @ W_i.T (+ b_i) for each (name, weight, bias); fused when layouts match."""
        row_scale = row_scale or {}
        perm = perm or {}
        prepared: list[_Item] = []
        for name, ref, bias in weights:
            nb = to_nbits(ref)
            s = row_scale.get(name, 1.0)
            p = perm.get(name)
            if nb is None:
                w = ref.dequantize()
                if p is not None:
                    w = w[p]
                w = (w * np.float32(s)).astype(np.float32)
                prepared.append((name, w, bias, MatmulPlan(0)))
            else:
                if p is not None:
                    nb = _permute_rows(nb, p)
                if s != 1.0:
                    nb.scales = (nb.scales * np.float32(s)).astype(np.float32)
                    if nb.offsets is not None:
                        nb.offsets = (nb.offsets * np.float32(s)).astype(np.float32)
                o = self.opts
                prepared.append((name, nb, bias, plan(ref.qtype, o.accuracy_level, o.llama_acts)))
        groups: list[list[_Item]] = []
        for item in prepared:
            g = groups[-1] if groups else None
            if (
                self.opts.fuse_linears
                and g is not None
                and _fusable(g[0][1], item[1])
                and g[0][3] == item[3]
            ):
                g.append(item)
            else:
                groups.append([item])
        outs: list[str] = []
        for g in groups:
            y = self._linear_group(x, g)
            if len(g) == 1:
                outs.append(y)
                continue
            sizes = [_rows(w) for _, w, _, _ in g]
            outs.extend(
                self.op("Split", [y, self.const(sizes, "split")], "part", n_out=len(g), axis=-1)
            )
        return outs

    def _linear_group(self, x: str, g: list[_Item]) -> str:
        key = "+".join(n for n, _, _, _ in g)
        first, mplan = g[0][1], g[0][3]
        if isinstance(first, np.ndarray):
            w = np.concatenate([w for _, w, _, _ in g], axis=0)
            y = self.op("MatMul", [x, self.init(key + ".T", np.ascontiguousarray(w.T))], "mm")
        else:
            nbs: list[NBitsWeight] = [w for _, w, _, _ in g]
            b = np.concatenate([w.b for w in nbs], axis=0)
            sc = np.concatenate([w.scales for w in nbs], axis=0)
            zp = np.concatenate([w.zero_points for w in nbs], axis=0)
            n_total = b.shape[0]
            # terms subtracted after the MatMulNBits: (activation side [S, m], weights [m, N])
            minus: list[tuple[str, np.ndarray[Any, Any]]] = []
            xin, rounded = x, None
            if mplan.acts != "none":
                rounded = self.acts.rounded(x, first.k, mplan.acts)
                if mplan.pin:
                    xin, added = self.acts.pinned(rounded, first.block)
                    w0 = np.concatenate([w.first_values() for w in nbs], axis=0)
                    minus.append((added, np.ascontiguousarray(w0.T)))
                else:
                    xin = self.acts.values(rounded)
            ins = [xin, self.init(key + ".qb", b), self.init(key + ".qs", sc.reshape(-1))]
            default_zp = 1 << (first.bits - 1)
            if not np.all(zp == default_zp):
                packed = NBitsWeight(
                    first.bits, first.block, n_total, first.k, b, sc, zp, None
                ).packed_zero_points()
                ins.append(self.init(key + ".qz", packed))
            y = self.op(
                "MatMulNBits",
                ins,
                "mmq",
                domain="com.microsoft",
                K=first.k,
                N=n_total,
                bits=first.bits,
                block_size=first.block,
                accuracy_level=mplan.level,
            )
            if first.offsets is not None:
                # per-block mins (K-quants, Q4_1, ...): subtract blocksum(x) @ offsets.T
                off = np.concatenate([w.offsets for w in nbs if w.offsets is not None], axis=0)
                if rounded is not None:
                    bs = self.acts.block_sums(rounded, first.block)
                else:
                    bs = self._block_sums(x, first.n_blocks, first.block, mplan.level)
                minus.append((bs, np.ascontiguousarray(off.T)))
            if minus:  # one MatMul for the pin's and the mins' corrections
                lhs = [m[0] for m in minus]
                a = lhs[0] if len(lhs) == 1 else self.op("Concat", lhs, "corr_in", axis=-1)
                w_c = np.concatenate([m[1] for m in minus], axis=0)
                corr = self.op("MatMul", [a, self.init(key + ".qo", w_c)], "corr")
                y = self.op("Sub", [y, corr])
        biases = [bias for _, _, bias, _ in g]
        if any(bias is not None for bias in biases):
            full = np.concatenate(
                [
                    bias if bias is not None else np.zeros(_rows(w), np.float32)
                    for (_, w, _, _), bias in zip(g, biases, strict=True)
                ]
            )
            y = self.op("Add", [y, self.init(key + ".bias", full.astype(np.float32))])
        return str(y)

    def _block_sums(self, x: str, n_blocks: int, block: int, level: int = 4) -> str:
        """Sums of x [S, K] per block of K, [S, n_blocks].

        With int8 activations (accuracy level 4) MatMulNBits multiplies the codes by x rounded
        per block (amax/127 steps, as onnxruntime's kernel does); the sums are taken of the
        same rounded x, so that code part and min part see one x, as in llama.cpp (whose
        activation block sums come from its int8 copy). Summing the float x instead leaves
        (x_q - x) . offsets in the result: 4% of the logit range on weights with large mins.
        The rounding here matches onnxruntime 1.32's kernel to 1e-6 (measured with unit codes).
        """
        xb = self.op("Reshape", [x, self.const([-1, n_blocks, block], "shp")])
        ax = self.const([2], "ax")
        if level != 4 or not self.opts.round_block_sums:
            return str(self.op("ReduceSum", [xb, ax], "bsum", keepdims=0))
        amax = self.op("ReduceMax", [self.op("Abs", [xb]), ax], "amax", keepdims=1)
        amax = self.op("Max", [amax, self.const(np.array(1e-30, np.float32), "tiny")])
        inv = self.op("Div", [self.const(np.array(127.0, np.float32), "c127"), amax])
        q = self.op("Round", [self.op("Mul", [xb, inv])], "xq")
        qsum = self.op("ReduceSum", [q, ax], "qsum", keepdims=0)
        step = self.op("Div", [amax, self.const(np.array(127.0, np.float32), "c127")])
        return str(self.op("Mul", [qsum, self.op("Squeeze", [step, ax])], "bsum"))


# one linear of a group: (weight name, its NBitsWeight or float matrix, bias, how it multiplies)
_Item = tuple[str, Any, Any, MatmulPlan]


def _rows(w: Any) -> int:
    return int(w.shape[0]) if isinstance(w, np.ndarray) else int(w.n)


def _fusable(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    return bool(
        a.bits == b.bits
        and a.block == b.block
        and a.k == b.k
        and (a.offsets is None) == (b.offsets is None)
    )


def _permute_rows(w: NBitsWeight, p: np.ndarray[Any, Any]) -> NBitsWeight:
    return NBitsWeight(
        w.bits,
        w.block,
        w.n,
        w.k,
        w.b[p],
        w.scales[p],
        w.zero_points[p],
        None if w.offsets is None else w.offsets[p],
    )


def _neox_perm(n_heads: int, hd: int) -> np.ndarray[Any, Any]:
    """Row order turning adjacent-pair RoPE into rotate-halves RoPE within each head."""
    within = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
    out: np.ndarray[Any, Any] = (np.arange(n_heads)[:, None] * hd + within[None, :]).reshape(-1)
    return out


def _vec(shard: ShardSpec, name: str) -> np.ndarray[Any, Any]:
    return shard.tensor(name).dequantize().reshape(-1)


def build_shard_graph(
    shard: ShardSpec,
    opts: GraphOptions | None = None,
    sink: Callable[[np.ndarray[Any, Any]], list[tuple[str, str]]] | None = None,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray[Any, Any]]]:
    """The graph and its external initializers (name -> array, kept alive by the caller);
    with ``sink`` each large weight goes there as it is made and the dict stays empty."""
    cfg = shard.config
    b = _Builder(cfg, opts or GraphOptions(), sink=sink)
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    x = _stage_input(b, shard, inputs)
    inputs += _position_inputs(shard)
    for i in shard.layers:
        x = _layer(b, shard, i, x, inputs, outputs)
        if sink is not None:  # this layer's GGUF bytes are re-laid out and written: drop them
            for f in shard.files:
                f.release_pages()
    if shard.is_last:
        inputs.append(helper.make_tensor_value_info("out_idx", TensorProto.INT64, ["M"]))
        logits = _head(b, shard, x)
        b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        outputs.insert(0, helper.make_tensor_value_info("logits", _F, ["M", cfg.vocab_size]))
    else:
        b.nodes.append(helper.make_node("Identity", [x], ["hidden_out"]))
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", _F, ["S", cfg.d_model]))
    graph = helper.make_graph(
        b.nodes,
        f"edgemesh_{cfg.arch}_{shard.start}_{shard.end}",
        inputs,
        outputs,
        list(b.inits.values()),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10
    return model, b.external


def _stage_input(b: _Builder, shard: ShardSpec, inputs: list[onnx.ValueInfoProto]) -> str:
    """The token embeddings (first stage: ``embeds``, the table's rows of the step's tokens,
    which the runtime reads from the GGUF, see onnx_weights.embedding_rows) or the previous
    stage's hidden states."""
    cfg = shard.config
    name = "embeds" if shard.is_first else "hidden_in"
    inputs.append(helper.make_tensor_value_info(name, _F, ["S", cfg.d_model]))
    x = name
    if shard.is_first and cfg.embed_scale != 1.0:
        x = b.op("Mul", [x, b.const(np.array(cfg.embed_scale, np.float32), "escale")])
    return str(x)


def _position_inputs(shard: ShardSpec) -> list[onnx.ValueInfoProto]:
    """RoPE tables per row and masks, one set for global layers (g), one for sliding-window
    ones (l); and the indices that lay the step's rows and every session's keys out per
    session for attention (runtimes/onnx_batch.py)."""
    cfg = shard.config
    hd = cfg.head_dim
    layers = list(shard.layers)
    out: list[onnx.ValueInfoProto] = []
    for tag, local in (("g", False), ("l", True)):
        if any(cfg.swa_layers[i] == local for i in layers):
            out += [
                helper.make_tensor_value_info(f"cos_{tag}", _F, ["S", 1, hd]),
                helper.make_tensor_value_info(f"sin_{tag}", _F, ["S", 1, hd]),
                helper.make_tensor_value_info(f"mask_{tag}", _F, ["B", 1, 1, "Q", "C"]),
            ]
    if layers:
        out += [
            helper.make_tensor_value_info("kv_idx", TensorProto.INT64, ["B", "C"]),
            helper.make_tensor_value_info("q_idx", TensorProto.INT64, ["B", "Q"]),
            helper.make_tensor_value_info("row_idx", TensorProto.INT64, ["S"]),
        ]
    return out


def _layer(
    b: _Builder,
    shard: ShardSpec,
    i: int,
    x: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
) -> str:
    cfg = shard.config
    spec = cfg.spec
    hk, hd = cfg.n_kv_heads, cfg.head_dim
    p = f"blk.{i}."
    # past: every session's cached keys (values) of the step, one pool [P, hk, hd] whose row
    # 0 is zeros; present: the step's own new rows [S, hk, hd], which the runtime appends
    kv = TensorProto.FLOAT16 if b.opts.kv_float16 else _F
    inputs += [
        helper.make_tensor_value_info(f"past_k_{i}", kv, ["P", hk, hd]),
        helper.make_tensor_value_info(f"past_v_{i}", kv, ["P", hk, hd]),
    ]
    outputs += [
        helper.make_tensor_value_info(f"present_k_{i}", kv, ["S", hk, hd]),
        helper.make_tensor_value_info(f"present_v_{i}", kv, ["S", hk, hd]),
    ]
    h = b.rms_norm(x, _vec(shard, p + "attn_norm.weight"), p + "attn_norm")
    o = _attention(b, shard, i, h)
    if spec.post_norms:
        o = b.rms_norm(o, _vec(shard, p + "post_attention_norm.weight"), p + "post_attn_norm")
    x = b.op("Add", [x, o], "resid")
    h = b.rms_norm(x, _vec(shard, p + "ffn_norm.weight"), p + "ffn_norm")
    f = _ffn(b, shard, i, h)
    if spec.post_norms:
        f = b.rms_norm(f, _vec(shard, p + "post_ffw_norm.weight"), p + "post_ffw_norm")
    return str(b.op("Add", [x, f], "resid"))


def _qkv(b: _Builder, shard: ShardSpec, i: int, h: str) -> tuple[str, str, str]:
    """q [S, hq, hd] (scaled, normed), k [S, hk, hd] (normed), v [S, hk * hd]; before RoPE."""
    cfg = shard.config
    spec = cfg.spec
    hd, hq, hk = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    p = f"blk.{i}."
    bias = {
        n: (_vec(shard, p + n + ".bias") if spec.qkv_bias else None)
        for n in ("attn_q", "attn_k", "attn_v")
    }
    qscale = 1.0 if spec.qk_norm else cfg.attn_scale
    perms: dict[str, np.ndarray[Any, Any]] = {}
    if spec.rope_type == "norm":
        pq, pk = _neox_perm(hq, hd), _neox_perm(hk, hd)
        perms = {p + "attn_q.weight": pq, p + "attn_k.weight": pk}
        for n, pp in (("attn_q", pq), ("attn_k", pk)):
            bn = bias[n]
            if bn is not None:
                bias[n] = bn[pp]
    bq = bias["attn_q"]
    if bq is not None and qscale != 1.0:
        bias["attn_q"] = bq * np.float32(qscale)
    q, k, v = b.linear(
        h,
        [(p + n + ".weight", w, bias[n]) for n, w in _qkv_weights(shard, i).items()],
        row_scale={p + "attn_q.weight": qscale},
        perm=perms,
    )
    q = b.op("Reshape", [q, b.const([-1, hq, hd], "shp")])
    k = b.op("Reshape", [k, b.const([-1, hk, hd], "shp")])
    if spec.qk_norm:
        qn = _vec(shard, p + "attn_q_norm.weight") * np.float32(cfg.attn_scale)
        q = b.rms_norm(q, qn, p + "attn_q_norm")
        k = b.rms_norm(k, _vec(shard, p + "attn_k_norm.weight"), p + "attn_k_norm")
    return q, k, v


def _qkv_weights(shard: ShardSpec, i: int) -> dict[str, TensorRef]:
    """attn_q, attn_k and attn_v of layer i; Phi 3's fused attn_qkv is split by rows."""
    cfg = shard.config
    p = f"blk.{i}."
    if not cfg.spec.fused_qkv:
        return {n: shard.tensor(p + n + ".weight") for n in ("attn_q", "attn_k", "attn_v")}
    qkv = shard.tensor(p + "attn_qkv.weight")
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    cuts = {"attn_q": (0, qd), "attn_k": (qd, qd + kvd), "attn_v": (qd + kvd, qd + 2 * kvd)}
    return {n: row_slice(qkv, a, z, p + n + ".weight") for n, (a, z) in cuts.items()}


def _attention(b: _Builder, shard: ShardSpec, i: int, h: str) -> str:
    """Self-attention of layer i, [S, d] in and out, per session ``[B, ...]``: each session's
    keys are gathered from the pool (its cache, then its new rows) into its own row from key
    0, padded with masked zeros to C, its queries into ``[B, Q]`` slots: the same arithmetic
    alone or batched (onnx_batch.py says on which conditions)."""
    cfg = shard.config
    hd, hq, hk = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    g = hq // hk
    tag = "l" if cfg.swa_layers[i] else "g"
    q, k, v = _qkv(b, shard, i, h)
    q = rope(b, q, tag)
    k = rope(b, k, tag)  # [S, hk, hd]
    v = b.op("Reshape", [v, b.const([-1, hk, hd], "shp")])
    if b.opts.kv_float16:  # rounded as stored (GraphOptions.kv_float16)
        k = b.op("Cast", [k], to=TensorProto.FLOAT16)
        v = b.op("Cast", [v], to=TensorProto.FLOAT16)
    b.nodes.append(helper.make_node("Identity", [k], [f"present_k_{i}"]))
    b.nodes.append(helper.make_node("Identity", [v], [f"present_v_{i}"]))
    keys = b.op("Gather", [b.op("Concat", [f"past_k_{i}", k], axis=0), "kv_idx"], axis=0)
    vals = b.op("Gather", [b.op("Concat", [f"past_v_{i}", v], axis=0), "kv_idx"], axis=0)
    if b.opts.kv_float16:
        keys = b.op("Cast", [keys], to=_F)
        vals = b.op("Cast", [vals], to=_F)
    kt = b.op("Transpose", [keys], perm=[0, 2, 3, 1])  # [B, hk, hd, C]
    vt = b.op("Transpose", [vals], perm=[0, 2, 1, 3])  # [B, hk, C, hd]
    ax = b.const([2], "ax")
    qs = b.op("Gather", [b.op("Reshape", [q, b.const([-1, hk, g, hd], "shp")]), "q_idx"], axis=0)
    qh = b.op("Transpose", [qs], perm=[0, 2, 3, 1, 4])  # [B, hk, g, Q, hd]
    if b.opts.kv_float16:  # llama.cpp multiplies a float16 cache by float16 queries
        qh = fp16_round(b, qh)
    scores = b.op("MatMul", [qh, b.op("Unsqueeze", [kt, ax])])  # [B, hk, g, Q, C]
    if cfg.attn_logit_softcap:  # gemma2: cap * tanh(scores / cap), before the mask
        c = cfg.attn_logit_softcap
        inner = b.op("Mul", [scores, b.const(np.array(1.0 / c, np.float32), "c")])
        scores = b.op("Mul", [b.op("Tanh", [inner]), b.const(np.array(c, np.float32), "c")])
    scores = b.op("Add", [scores, f"mask_{tag}"])
    probs = b.op("Softmax", [scores], axis=-1)
    if b.opts.kv_float16:  # ... and float16 values by float16 probabilities
        probs = fp16_round(b, probs)
    att = b.op("MatMul", [probs, b.op("Unsqueeze", [vt, ax])])  # [B, hk, g, Q, hd]
    att = b.op(
        "Reshape", [b.op("Transpose", [att], perm=[0, 3, 1, 2, 4]), b.const([-1, hq * hd], "shp")]
    )  # [B * Q, hq * hd]
    att = b.op("Gather", [att, "row_idx"], axis=0)  # [S, hq * hd]: each row from its slot
    p = f"blk.{i}."
    (o,) = b.linear(att, [(p + "attn_output.weight", shard.tensor(p + "attn_output.weight"), None)])
    return o


def _ffn(b: _Builder, shard: ShardSpec, i: int, h: str) -> str:
    p = f"blk.{i}."
    cfg = shard.config
    if cfg.spec.moe:
        return moe_ffn(b, shard, i, h)
    if cfg.spec.fused_gate_up:  # phi3: ffn_up is gate rows then up rows (llama.cpp's swiglu)
        fused, ff = shard.tensor(p + "ffn_up.weight"), cfg.d_ff
        g_ref = row_slice(fused, 0, ff, p + "ffn_gate.weight")
        u_ref = row_slice(fused, ff, 2 * ff, p + "ffn_up.weight")
    else:
        g_ref, u_ref = shard.tensor(p + "ffn_gate.weight"), shard.tensor(p + "ffn_up.weight")
    gate, up = b.linear(h, [(g_ref.name, g_ref, None), (u_ref.name, u_ref, None)])
    if shard.config.spec.ffn_act == "silu":
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    elif b.opts.llama_acts and b.opts.accuracy_level:  # level 0: nothing rounded
        act = ggml_gelu(b, gate)
    else:
        act = b.op("Gelu", [gate], approximate="tanh")
    (f,) = b.linear(
        b.op("Mul", [act, up]),
        [(p + "ffn_down.weight", shard.tensor(p + "ffn_down.weight"), None)],
    )
    return f


def _head(b: _Builder, shard: ShardSpec, x: str) -> str:
    """Logits [M, vocab] of the positions out_idx picks."""
    cfg = shard.config
    x = b.op("Gather", [x, "out_idx"], axis=0)
    x = b.rms_norm(x, _vec(shard, "output_norm.weight"), "output_norm")
    out_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    ref = shard.tensor(out_name)
    step = b.opts.head_chunk_rows or ref.shape[0]
    parts: list[str] = []
    for r in range(0, ref.shape[0], step):
        parts += b.linear(x, [(f"{out_name}.rows{r}", row_range(ref, r, r + step), None)])
        if b.sink is not None:  # these rows are written out: drop their GGUF pages
            for f in shard.files:
                f.release_pages()
    logits = parts[0] if len(parts) == 1 else b.op("Concat", parts, "logits", axis=-1)
    if cfg.final_logit_softcap:
        c = cfg.final_logit_softcap
        inner = b.op("Mul", [logits, b.const(np.array(1.0 / c, np.float32), "c")])
        logits = b.op("Mul", [b.op("Tanh", [inner]), b.const(np.array(c, np.float32), "c")])
    return logits
