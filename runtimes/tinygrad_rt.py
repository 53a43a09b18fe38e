"""The tinygrad runtime: the same layer ranges as the onnx runtime, in tinygrad tensors.

tinygrad picks its device (CUDA on Jetsons, Metal on Macs, CPU with clang otherwise). Weights
are dequantized to float32 at load by ``gguf.quants.dequantize`` (through TensorRef), which
reads every type in ``gguf_io.SUPPORTED_TYPES``, IQ and K-quants included; tinygrad's own GGUF
loader knows only a few of them and has no quantized matmul to keep them packed. So this
runtime needs about 8x the GGUF's bytes for 4-bit weights: its value is GPUs, not this CPU.
The KV cache is kept per layer and session as host arrays, padded to a multiple of
``_BUCKET`` positions (masked): tinygrad compiles a kernel per new shape, and without buckets
every decode step would compile the attention kernels afresh (18 s instead of a few for 30
steps of a 2-layer test model on this CPU).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import Runtime, Session
from .errors import RuntimeUnavailableError
from .positions import attention_masks, rope_tables
from .shards import ShardSpec

__all__ = ["TinygradRuntime"]

_BUCKET = 64

log = logging.getLogger(__name__)

try:
    from tinygrad.dtype import dtypes
    from tinygrad.tensor import Tensor
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise RuntimeUnavailableError(
        "the tinygrad runtime needs tinygrad (pip install 'edgemesh[tinygrad]')"
    ) from exc


def _neox_rows(n_heads: int, hd: int) -> np.ndarray[Any, Any]:
    """Row order turning adjacent-pair RoPE (llama) into rotate-halves RoPE within each head."""
    within = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
    out: np.ndarray[Any, Any] = (np.arange(n_heads)[:, None] * hd + within[None, :]).reshape(-1)
    return out


class _Layer:
    def __init__(self, shard: ShardSpec, i: int) -> None:
        cfg = shard.config
        spec = cfg.spec
        p = f"blk.{i}."

        def f32(name: str) -> np.ndarray[Any, Any]:
            return shard.tensor(p + name).dequantize()

        if spec.fused_qkv:  # phi3: rows q, then k, then v
            qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            wq, wk, wv = np.split(f32("attn_qkv.weight"), [qd, qd + kvd])
        else:
            wq, wk, wv = f32("attn_q.weight"), f32("attn_k.weight"), f32("attn_v.weight")
        bq = f32("attn_q.bias") if spec.qkv_bias else None
        bk = f32("attn_k.bias") if spec.qkv_bias else None
        bv = f32("attn_v.bias") if spec.qkv_bias else None
        if spec.rope_type == "norm":
            pq, pk = _neox_rows(cfg.n_heads, cfg.head_dim), _neox_rows(cfg.n_kv_heads, cfg.head_dim)
            wq, wk = wq[pq], wk[pk]
            bq = None if bq is None else bq[pq]
            bk = None if bk is None else bk[pk]
        # q, k and v in one matmul: fewer kernels per step
        self.wqkv = Tensor(np.ascontiguousarray(np.concatenate([wq, wk, wv]).T)).realize()
        self.bqkv = (
            Tensor(np.concatenate([bq, bk, bv]).astype(np.float32)).realize()
            if bq is not None and bk is not None and bv is not None
            else None
        )
        self.splits = (wq.shape[0], wk.shape[0], wv.shape[0])
        self.wo = Tensor(np.ascontiguousarray(f32("attn_output.weight").T)).realize()
        self.moe = _Experts(shard, i) if spec.moe else None
        if self.moe is None:
            if spec.fused_gate_up:  # phi3: ffn_up is gate rows then up rows
                gate_up = f32("ffn_up.weight")
            else:
                gate_up = np.concatenate([f32("ffn_gate.weight"), f32("ffn_up.weight")])
            self.wgu = Tensor(np.ascontiguousarray(gate_up.T)).realize()
            self.wd = Tensor(np.ascontiguousarray(f32("ffn_down.weight").T)).realize()
        self.attn_norm = Tensor(f32("attn_norm.weight")).realize()
        self.ffn_norm = Tensor(f32("ffn_norm.weight")).realize()
        self.q_norm = Tensor(f32("attn_q_norm.weight")).realize() if spec.qk_norm else None
        self.k_norm = Tensor(f32("attn_k_norm.weight")).realize() if spec.qk_norm else None
        self.post_attn = (
            Tensor(f32("post_attention_norm.weight")).realize() if spec.post_norms else None
        )
        self.post_ffw = Tensor(f32("post_ffw_norm.weight")).realize() if spec.post_norms else None
        self.local = cfg.swa_layers[i]


class _Experts:
    """Qwen 3 MoE's routed FFN (llama.cpp's build_moe_ffn: softmax over the experts, top-k,
    the k weights renormalised). Routing is decided on the host from the router's
    probabilities; each expert that any token of the step uses runs on all the step's tokens
    and is weighted by 0 where not routed (exact, and one kernel shape per step length,
    which tinygrad's kernel cache needs), so a step costs up to min(S * k, n_expert)
    experts."""

    def __init__(self, shard: ShardSpec, i: int) -> None:
        cfg = shard.config
        p = f"blk.{i}."
        self.k = cfg.n_experts_used
        self.router = Tensor(
            np.ascontiguousarray(shard.tensor(p + "ffn_gate_inp.weight").dequantize().T)
        ).realize()
        gate = shard.tensor(p + "ffn_gate_exps.weight").dequantize()
        up = shard.tensor(p + "ffn_up_exps.weight").dequantize()
        down = shard.tensor(p + "ffn_down_exps.weight").dequantize()
        self.wgu = [
            Tensor(np.ascontiguousarray(np.concatenate([g, u]).T)).realize()
            for g, u in zip(gate, up, strict=True)
        ]
        self.wd = [Tensor(np.ascontiguousarray(d.T)).realize() for d in down]
        self.ff = gate.shape[1]

    def __call__(self, h: Any) -> Any:
        probs = h.matmul(self.router).softmax(-1).numpy()  # [S, n_expert]
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : self.k]
        w = np.take_along_axis(probs, top, axis=-1)
        w = w / np.maximum(w.sum(-1, keepdims=True), np.float32(6.103515625e-5))
        dense = np.zeros_like(probs)
        np.put_along_axis(dense, top, w, axis=-1)
        out: Any = None
        for e in sorted({int(x) for x in top.reshape(-1)}):
            gate, up = h.matmul(self.wgu[e]).split([self.ff, self.ff], dim=-1)
            f = (gate.silu() * up).matmul(self.wd[e]) * Tensor(
                np.ascontiguousarray(dense[:, e : e + 1])
            )
            out = f if out is None else out + f
        return out


class TinygradRuntime(Runtime):
    name = "tinygrad"

    def __init__(self, shard: ShardSpec, *, threads: int | None = None) -> None:
        super().__init__(shard)
        cfg = self.config
        # threads: tinygrad's CPU backend picks its own parallelism; accepted for symmetry
        self._embed = shard.tensor("token_embd.weight").dequantize() if shard.is_first else None
        self._layers = {i: _Layer(shard, i) for i in shard.layers}
        self._head: Any = None
        if shard.is_last:
            name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
            w = self._embed if (self._embed is not None and cfg.tied_embeddings) else None
            w = shard.tensor(name).dequantize() if w is None else w
            self._head = Tensor(np.ascontiguousarray(w.T)).realize()
            self._out_norm = Tensor(shard.tensor("output_norm.weight").dequantize()).realize()
        self._freq_factors = (
            shard.tensor("rope_freqs.weight").dequantize().reshape(-1)
            if cfg.has_rope_freqs and self._layers
            else None
        )

    @classmethod
    def estimate_memory(cls, shard: ShardSpec, max_tokens: int = 2048) -> int:
        c = shard.config
        n_weights = sum(int(np.prod(t.shape)) for t in shard.tensors.values())
        kv = 2 * len(shard.layers) * c.n_kv_heads * c.head_dim * max_tokens * 4
        return 4 * n_weights + kv + (64 << 20)

    def _open(self, session: Session) -> None:
        session.state = {}  # layer -> (K [hk, T, hd], V [hk, T, hd]) as numpy arrays

    def _truncate(self, session: Session, n_past: int) -> None:
        cache: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = session.state
        for i, (k, v) in list(cache.items()):  # K and V are [hk, T, hd]
            cache[i] = (k[:, :n_past].copy(), v[:, :n_past].copy())

    def _norm(self, x: Any, w: Any) -> Any:
        return x * (x.square().mean(-1, keepdim=True) + self.config.rms_eps).rsqrt() * w

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        half = self.config.head_dim // 2
        swapped = x[..., half:].cat(x[..., :half], dim=-1)
        return x * cos + swapped * sin

    def _forward(self, session: Session, inputs: np.ndarray[Any, Any], all_logits: bool) -> Any:
        cfg = self.config
        n = inputs.shape[0]
        if self.shard.is_first:
            assert self._embed is not None  # set for first stages in __init__
            h = self._embed[inputs] * np.float32(cfg.embed_scale)
            x = Tensor(np.ascontiguousarray(h, dtype=np.float32))
        else:
            x = Tensor(inputs)
        pos = session.n_past + np.arange(n)
        tables = {}
        for local in {layer.local for layer in self._layers.values()}:
            base = cfg.rope_base_swa if local else cfg.rope_base
            c, s = rope_tables(pos, cfg.head_dim, base, cfg.rope_freq_scale, self._freq_factors)
            m = attention_masks(session.n_past, n, cfg.sliding_window if local else 0)
            total = session.n_past + n
            padded = -(-total // _BUCKET) * _BUCKET
            m = np.pad(m, ((0, 0), (0, padded - total)), constant_values=-np.inf)
            tables[local] = (Tensor(c), Tensor(s), Tensor(m))
        hd, hq, hk = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        g = hq // hk
        cache: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = session.state
        for i, L in self._layers.items():
            cos, sin, mask = tables[L.local]
            h = self._norm(x, L.attn_norm)
            qkv = h.matmul(L.wqkv)
            if L.bqkv is not None:
                qkv = qkv + L.bqkv
            q, k, v = qkv.split(list(L.splits), dim=-1)
            q, k = q.reshape(n, hq, hd), k.reshape(n, hk, hd)
            if L.q_norm is not None:
                q, k = self._norm(q, L.q_norm), self._norm(k, L.k_norm)
            q = self._rope(q, cos, sin) * cfg.attn_scale
            k = self._rope(k, cos, sin).permute(1, 0, 2)  # [hk, S, hd]
            v = v.reshape(n, hk, hd).permute(1, 0, 2)
            kn, vn = k.numpy(), v.numpy()
            if i in cache:
                kn = np.concatenate([cache[i][0], kn], axis=1)
                vn = np.concatenate([cache[i][1], vn], axis=1)
            cache[i] = (kn, vn)
            pad = ((0, 0), (0, mask.shape[1] - kn.shape[1]), (0, 0))
            k, v = Tensor(np.pad(kn, pad)), Tensor(np.pad(vn, pad))
            qh = q.reshape(n, hk, g, hd).permute(1, 2, 0, 3)  # [hk, g, S, hd]
            scores = qh.matmul(k.unsqueeze(1).transpose(-1, -2))
            if cfg.attn_logit_softcap:  # gemma2
                cap = cfg.attn_logit_softcap
                scores = (scores / cap).tanh() * cap
            scores = scores + mask
            att = scores.softmax(-1).matmul(v.unsqueeze(1))  # [hk, g, S, hd]
            o = att.permute(2, 0, 1, 3).reshape(n, hq * hd).matmul(L.wo)
            if L.post_attn is not None:
                o = self._norm(o, L.post_attn)
            x = x + o
            h = self._norm(x, L.ffn_norm)
            if L.moe is not None:
                f = L.moe(h)
            else:
                gate, up = h.matmul(L.wgu).split([cfg.d_ff, cfg.d_ff], dim=-1)
                act = gate.gelu() if cfg.spec.ffn_act == "gelu_tanh" else gate.silu()
                f = (act * up).matmul(L.wd)
            if L.post_ffw is not None:
                f = self._norm(f, L.post_ffw)
            x = (x + f).realize()
        if not self.shard.is_last:
            return x.numpy()
        if not all_logits:
            x = x[n - 1 :]
        logits = self._norm(x, self._out_norm).matmul(self._head)
        if cfg.final_logit_softcap:
            cap = cfg.final_logit_softcap
            logits = (logits / cap).tanh() * cap
        return logits.cast(dtypes.float32).numpy()
