"""The architecture table: how each supported GGUF architecture computes, and the model
configuration read from GGUF metadata.

The numbers here follow llama.cpp's graphs (the oracle): RoPE layout per architecture, Gemma's
embedding scale, per-head q/k norms (Gemma 3, Qwen 3), post-norms, GELU(tanh) FFN,
sliding-window layers, Gemma 2's tanh soft-capping of attention scores and logits, Phi 3's fused
q|k|v and gate|up matrices, and Qwen 3 MoE's routed experts (softmax over all experts, top-k,
the k weights renormalised to sum 1, as llama.cpp's build_moe_ffn with norm_w).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import MalformedModelError, UnsupportedModelError

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "ModelConfig",
    "config_from_metadata",
    "extra_tensor_shapes",
    "unit_count",
    "unit_kind",
    "unit_tensor_names",
]

RopeType = Literal["norm", "neox"]
FfnAct = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the decoder-only architectures we run."""

    name: str
    rope_type: RopeType  # "norm": adjacent pairs rotate (llama); "neox": halves rotate
    ffn_act: FfnAct
    qkv_bias: bool  # qwen2 has biases on q, k and v
    qk_norm: bool  # gemma3 RMS-normalises each q and k head before RoPE
    post_norms: bool  # gemma3 normalises attention and FFN outputs before the residual add
    embed_scale_sqrt_d: bool  # gemma3 multiplies embeddings by sqrt(d_model)
    default_swa_pattern: int  # every n-th layer is global, others local; 0: no sliding window
    default_rope_base: float
    block_tensors: tuple[str, ...]  # per-block tensor suffixes, "blk.{i}." prefixed
    attn_softcap: bool = False  # gemma2: scores = cap * tanh(scores / cap) before the softmax
    default_final_softcap: float = 0.0  # gemma2 caps the logits (30) unless metadata says
    default_sliding_window: int = 0  # gemma2: 4096 when the metadata has no window
    swa_base_is_global: bool = False  # gemma2: local layers use rope_base unless told
    fused_qkv: bool = False  # phi3: one attn_qkv matrix, rows q then k then v
    fused_gate_up: bool = False  # phi3: ffn_up holds the gate rows then the up rows
    moe: bool = False  # qwen3moe: a router and 3-D expert tensors instead of one FFN


_COMMON_BLOCK = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)

_QK_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")
_POST_NORMS = ("post_attention_norm.weight", "post_ffw_norm.weight")
_MOE_BLOCK = (
    _COMMON_BLOCK[:6]
    + _QK_NORMS
    + (
        "ffn_gate_inp.weight",
        "ffn_gate_exps.weight",
        "ffn_up_exps.weight",
        "ffn_down_exps.weight",
    )
)
_PHI3_BLOCK = (
    "attn_norm.weight",
    "attn_qkv.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        name="llama",
        rope_type="norm",
        ffn_act="silu",
        qkv_bias=False,
        qk_norm=False,
        post_norms=False,
        embed_scale_sqrt_d=False,
        default_swa_pattern=0,
        default_rope_base=10000.0,
        block_tensors=_COMMON_BLOCK,
    ),
    "qwen2": ArchSpec(
        name="qwen2",
        rope_type="neox",
        ffn_act="silu",
        qkv_bias=True,
        qk_norm=False,
        post_norms=False,
        embed_scale_sqrt_d=False,
        default_swa_pattern=0,
        default_rope_base=10000.0,
        block_tensors=_COMMON_BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    ),
    "gemma3": ArchSpec(
        name="gemma3",
        rope_type="neox",
        ffn_act="gelu_tanh",
        qkv_bias=False,
        qk_norm=True,
        post_norms=True,
        embed_scale_sqrt_d=True,
        default_swa_pattern=6,
        default_rope_base=10000.0,
        block_tensors=_COMMON_BLOCK + _QK_NORMS + _POST_NORMS,
    ),
    "qwen3": ArchSpec(
        name="qwen3",
        rope_type="neox",
        ffn_act="silu",
        qkv_bias=False,
        qk_norm=True,
        post_norms=False,
        embed_scale_sqrt_d=False,
        default_swa_pattern=0,
        default_rope_base=10000.0,
        block_tensors=_COMMON_BLOCK + _QK_NORMS,
    ),
    "gemma2": ArchSpec(
        name="gemma2",
        rope_type="neox",
        ffn_act="gelu_tanh",
        qkv_bias=False,
        qk_norm=False,
        post_norms=True,
        embed_scale_sqrt_d=True,
        default_swa_pattern=2,  # llama.cpp: even layers local, odd layers global
        default_rope_base=10000.0,
        block_tensors=_COMMON_BLOCK + _POST_NORMS,
        attn_softcap=True,
        default_final_softcap=30.0,
        default_sliding_window=4096,
        swa_base_is_global=True,
    ),
    "phi3": ArchSpec(
        name="phi3",
        rope_type="neox",
        ffn_act="silu",
        qkv_bias=False,
        qk_norm=False,
        post_norms=False,
        embed_scale_sqrt_d=False,
        default_swa_pattern=0,  # llama.cpp ignores Phi 3's sliding window (its PR 13676)
        default_rope_base=10000.0,
        block_tensors=_PHI3_BLOCK,
        fused_qkv=True,
        fused_gate_up=True,
    ),
    "qwen3moe": ArchSpec(
        name="qwen3moe",
        rope_type="neox",
        ffn_act="silu",
        qkv_bias=False,
        qk_norm=True,
        post_norms=False,
        embed_scale_sqrt_d=False,
        default_swa_pattern=0,
        default_rope_base=10000.0,
        block_tensors=_MOE_BLOCK,
        moe=True,
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one model, enough to build any layer range's graph."""

    arch: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    rms_eps: float
    rope_base: float
    rope_base_swa: float
    rope_freq_scale: float
    context_length: int
    sliding_window: int  # 0: none
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window (and rope_base_swa)
    attn_scale: float
    tied_embeddings: bool
    has_rope_freqs: bool  # llama3's rope_freqs.weight divides the RoPE frequencies
    final_logit_softcap: float  # 0: none
    attn_logit_softcap: float = 0.0  # 0: none (gemma2: 50)
    n_experts: int = 0  # MoE: experts per layer (0: a dense FFN)
    n_experts_used: int = 0  # MoE: experts each token is routed to
    d_ff_expert: int = 0  # MoE: rows of each expert's gate and up matrices

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.arch]

    @property
    def n_units(self) -> int:
        return unit_count(self.n_layers)

    @property
    def embed_scale(self) -> float:
        # llama.cpp computes sqrtf(n_embd) in float32
        return math.sqrt(self.d_model) if self.spec.embed_scale_sqrt_d else 1.0

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base_swa if self.swa_layers[layer] else self.rope_base

    def window_for(self, layer: int) -> int:
        return self.sliding_window if self.swa_layers[layer] else 0


def unit_count(n_layers: int) -> int:
    """Units are: 0 = token embedding, 1..n = blocks 0..n-1, n+1 = final norm + output head."""
    return n_layers + 2


def unit_kind(index: int, n_layers: int) -> tuple[str, int | None]:
    """("embed", None), ("block", layer) or ("head", None) for a unit index."""
    if index == 0:
        return "embed", None
    if 1 <= index <= n_layers:
        return "block", index - 1
    if index == n_layers + 1:
        return "head", None
    raise ValueError(f"unit {index} out of range for {n_layers} layers")


def unit_tensor_names(config: ModelConfig, index: int) -> list[str]:
    """The tensors one unit needs. Tied embeddings serve both the embed and the head unit,
    and rope_freqs (llama3) is needed by every block."""
    kind, layer = unit_kind(index, config.n_layers)
    if kind == "embed":
        return ["token_embd.weight"]
    if kind == "head":
        out = "token_embd.weight" if config.tied_embeddings else "output.weight"
        return ["output_norm.weight", out]
    names = [f"blk.{layer}.{suffix}" for suffix in config.spec.block_tensors]
    if config.has_rope_freqs:
        names.append("rope_freqs.weight")
    return names


def _get(meta: Mapping[str, Any], key: str, kind: Callable[[Any], Any], default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise MalformedModelError(f"GGUF metadata lacks required key {key!r}")
        return default
    try:
        value = kind(meta[key])
    except (TypeError, ValueError, OverflowError) as exc:  # int(inf), int([..]), int("x")
        raise MalformedModelError(f"GGUF metadata key {key!r} has a bad value: {exc}") from exc
    if kind is float and not math.isfinite(value):
        raise MalformedModelError(f"GGUF metadata key {key!r} is not finite: {value}")
    return value


def _positive(key: str, value: int, cap: int = 1 << 24) -> int:
    if value <= 0 or value > cap:
        raise MalformedModelError(f"GGUF metadata {key!r} = {value} is out of range")
    return value


def _positive_float(key: str, value: float) -> float:
    if not value > 0:  # _get already refused inf and NaN
        raise MalformedModelError(f"GGUF metadata {key!r} = {value} must be positive")
    return value


def _vocab_size(meta: Mapping[str, Any], p: str, vocab_rows: int | None) -> int:
    if "tokenizer.ggml.tokens" in meta:
        tokens = meta["tokenizer.ggml.tokens"]
        if isinstance(tokens, str) or not hasattr(tokens, "__len__"):
            raise MalformedModelError("tokenizer.ggml.tokens is not an array")
        vocab = len(tokens)
    elif p + "vocab_size" in meta:
        vocab = _get(meta, p + "vocab_size", int)
    elif vocab_rows is not None:
        vocab = vocab_rows
    else:
        raise MalformedModelError("cannot tell the vocabulary size")
    if vocab_rows is not None and vocab_rows != vocab:
        raise MalformedModelError(f"vocabulary has {vocab} tokens but embeddings {vocab_rows} rows")
    return int(vocab)


def config_from_metadata(
    meta: Mapping[str, Any], tensor_names: set[str], vocab_rows: int | None
) -> ModelConfig:
    """Build a ModelConfig from decoded GGUF metadata.

    ``tensor_names`` tells whether embeddings are tied and whether rope_freqs exists;
    ``vocab_rows`` is the row count of the embedding or output tensor, if present.
    """
    arch = _get(meta, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    spec = ARCHITECTURES[arch]
    p = arch + "."
    if any(n.startswith("rope_factors_") for n in tensor_names):
        # Phi 3's longrope: llama.cpp picks long or short factors by context length
        raise UnsupportedModelError("rope_factors_long/short (longrope) are not supported")
    dims = _dims(meta, p)
    n_layers, d_model, n_heads, head_dim = (
        dims["n_layers"],
        dims["d_model"],
        dims["n_heads"],
        dims["head_dim"],
    )
    window, swa = _sliding_window(meta, p, spec, n_layers)
    rope_base = _positive_float(
        "rope.freq_base", _get(meta, p + "rope.freq_base", float, spec.default_rope_base)
    )
    swa_base_default = rope_base if spec.swa_base_is_global else 10000.0
    # llama.cpp (gemma2, gemma3): the 27B models scale by d_model / n_heads
    big = {"gemma2": 46, "gemma3": 62}.get(arch) == n_layers
    attn_scale = 1.0 / math.sqrt(d_model / n_heads if big else head_dim)
    softcap = (
        _nonnegative("attn_softcap", _get(meta, p + "attn_logit_softcapping", float, 50.0))
        if spec.attn_softcap
        else 0.0
    )
    return ModelConfig(
        arch=arch,
        name=str(meta.get("general.name", arch)),
        vocab_size=_positive("vocab", _vocab_size(meta, p, vocab_rows)),
        rms_eps=_nonnegative(
            "rms_epsilon", _get(meta, p + "attention.layer_norm_rms_epsilon", float, 1e-5)
        ),
        rope_base=rope_base,
        rope_base_swa=_positive_float(
            "freq_base_swa", _get(meta, p + "rope.freq_base_swa", float, swa_base_default)
        ),
        rope_freq_scale=_rope_freq_scale(meta, p),
        context_length=_positive("context_length", _get(meta, p + "context_length", int, 4096)),
        sliding_window=window,
        swa_layers=swa,
        attn_scale=attn_scale,
        tied_embeddings="output.weight" not in tensor_names,
        has_rope_freqs="rope_freqs.weight" in tensor_names,
        final_logit_softcap=_nonnegative(
            "final_logit_softcapping",
            _get(meta, p + "final_logit_softcapping", float, spec.default_final_softcap),
        ),
        attn_logit_softcap=softcap,
        **dims,
        **_experts(meta, p, spec, dims["d_ff"]),
    )


def _dims(meta: Mapping[str, Any], p: str) -> dict[str, int]:
    """Layer count and the widths of one block."""
    # a manifest holds fewer than 2**16 layers; the cap also bounds per-layer tables
    n_layers = _positive("block_count", _get(meta, p + "block_count", int), (1 << 16) - 1)
    d_model = _positive("embedding_length", _get(meta, p + "embedding_length", int))
    n_heads = _positive("head_count", _get(meta, p + "attention.head_count", int))
    n_kv = _positive("head_count_kv", _get(meta, p + "attention.head_count_kv", int, n_heads))
    if n_heads % n_kv:
        raise MalformedModelError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    if p + "attention.key_length" not in meta and d_model % n_heads:
        raise MalformedModelError(f"embedding_length {d_model} is not a multiple of {n_heads}")
    head_dim = _positive(
        "key_length", _get(meta, p + "attention.key_length", int, d_model // n_heads)
    )
    v_dim = _get(meta, p + "attention.value_length", int, head_dim)
    if v_dim != head_dim:
        raise UnsupportedModelError("key_length != value_length is not supported")
    rope_dims = _get(meta, p + "rope.dimension_count", int, head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    if head_dim % 2:
        raise MalformedModelError(f"head dim {head_dim} is odd")
    d_ff = _positive("feed_forward_length", _get(meta, p + "feed_forward_length", int))
    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "d_ff": d_ff,
    }


def _sliding_window(
    meta: Mapping[str, Any], p: str, spec: ArchSpec, n_layers: int
) -> tuple[int, tuple[bool, ...]]:
    """The window and, per layer, whether it is a local (sliding-window) layer."""
    if not spec.default_swa_pattern:
        return 0, (False,) * n_layers
    window = _get(meta, p + "attention.sliding_window", int, spec.default_sliding_window)
    if window <= 0:
        return 0, (False,) * n_layers
    pattern = meta.get(p + "attention.sliding_window_pattern", spec.default_swa_pattern)
    if isinstance(pattern, list | tuple):
        if len(pattern) != n_layers:
            raise MalformedModelError("sliding_window_pattern length differs from block_count")
        return window, tuple(bool(x) for x in pattern)
    n = _get(meta, p + "attention.sliding_window_pattern", int, spec.default_swa_pattern)
    # llama.cpp: layer il is local unless il % n == n - 1
    return window, tuple(n == 0 or (il % n < n - 1) for il in range(n_layers))


def _rope_freq_scale(meta: Mapping[str, Any], p: str) -> float:
    """Linear RoPE scaling; llama3's scaling comes as the rope_freqs tensor instead (as
    llama.cpp reads it), so a "llama3" type with that tensor needs nothing here."""
    scale_type = meta.get(p + "rope.scaling.type", "none")
    factor = _get(meta, p + "rope.scaling.factor", float, 1.0)
    if scale_type not in ("none", "linear", "llama3") and factor != 1.0:
        raise UnsupportedModelError(f"rope scaling {scale_type!r} is not supported")
    return 1.0 / factor if scale_type == "linear" and factor > 0 else 1.0


def _experts(meta: Mapping[str, Any], p: str, spec: ArchSpec, d_ff: int) -> dict[str, int]:
    """Expert count, experts used per token and each expert's FFN width (MoE archs)."""
    if not spec.moe:
        return {}
    n_exp = _positive("expert_count", _get(meta, p + "expert_count", int))
    n_used = _positive("expert_used_count", _get(meta, p + "expert_used_count", int))
    if n_used > n_exp:
        raise MalformedModelError(f"expert_used_count {n_used} exceeds expert_count {n_exp}")
    ff_exp = meta.get(p + "expert_feed_forward_length", 0)
    if isinstance(ff_exp, list | tuple):  # llama.cpp reads a key or a per-layer array
        if not ff_exp or not all(type(x) is int for x in ff_exp):
            raise MalformedModelError("expert_feed_forward_length is not a list of integers")
        if len(set(ff_exp)) != 1:
            raise UnsupportedModelError("per-layer expert widths are not supported")
        ff_exp = ff_exp[0]
    else:
        ff_exp = _get(meta, p + "expert_feed_forward_length", int, 0)
    ff = ff_exp if ff_exp else d_ff // n_used  # llama.cpp's default
    return {"n_experts": n_exp, "n_experts_used": n_used, "d_ff_expert": _positive("ff_exp", ff)}


def extra_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Logical shapes of the tensors only some architectures have (by block suffix), and of
    those whose shape differs by architecture (Phi 3's fused ffn_up)."""
    d, hd, ff = config.d_model, config.head_dim, config.d_ff
    out: dict[str, tuple[int, ...]] = {}
    if config.spec.fused_qkv:
        out["attn_qkv.weight"] = ((config.n_heads + 2 * config.n_kv_heads) * hd, d)
    if config.spec.fused_gate_up:
        out["ffn_up.weight"] = (2 * ff, d)
    if config.spec.moe:
        e, fe = config.n_experts, config.d_ff_expert
        out["ffn_gate_inp.weight"] = (e, d)
        out["ffn_gate_exps.weight"] = (e, fe, d)
        out["ffn_up_exps.weight"] = (e, fe, d)
        out["ffn_down_exps.weight"] = (e, d, fe)
    return out


def _nonnegative(key: str, value: float) -> float:
    if value < 0:
        raise MalformedModelError(f"GGUF metadata {key!r} = {value} is negative")
    return value
