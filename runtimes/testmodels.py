"""Tiny random-weight GGUF models for tests: no downloads, loadable by llama.cpp.

Each architecture gets a small but complete model (valid tokenizer metadata, every tensor its
graph needs) and a mix of tensor types (F32, F16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K);
:func:`uniform_spec` gives every matrix one type instead, any of ``gguf_io.SUPPORTED_TYPES``.
Types gguf can quantize are quantized from Gaussian values; for the others (K-quants, IQ)
random block bytes are written with finite scales, rescaled so the weights have the wanted
RMS. K-quant and IQ rows need multiples of 256 values, hence d_model 256.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .arch import ARCHITECTURES
from .testvocab import bpe_vocab, spm_vocab

__all__ = [
    "TestModelSpec",
    "DEFAULT_SPECS",
    "write_test_model",
    "uniform_spec",
    "random_blocks",
    "QUANTIZABLE",
]

log = logging.getLogger(__name__)

import gguf  # noqa: E402  (after the module docstring and __all__ on purpose)
from gguf import GGMLQuantizationType as Q  # noqa: E402

_FloatArray = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class TestModelSpec:
    """Shape and tensor types of one generated model."""

    __test__ = False  # not a pytest class

    arch: str
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    d_ff: int = 512
    sliding_window: int = 0
    tied: bool = True
    rope_base: float = 10000.0
    context_length: int = 256
    attn_softcap: float = 0.0  # gemma2: written as attn_logit_softcapping when set
    final_softcap: float = 0.0  # gemma2: written as final_logit_softcapping when set
    n_experts: int = 0  # MoE archs: experts per layer, experts per token, expert FFN width
    n_experts_used: int = 0
    d_ff_expert: int = 0
    rope_freqs: bool = False  # llama3-style RoPE scaling: a rope_freqs.weight tensor
    # tensor suffix -> type; anything not named is F32 (1-D) or Q8_0 (2-D)
    types: Mapping[str, Q] = field(default_factory=dict)
    seed: int = 0
    chat_template: str = ""  # tokenizer.chat_template, where one is wanted


DEFAULT_SPECS: dict[str, TestModelSpec] = {
    "llama": TestModelSpec(
        arch="llama",
        n_layers=2,
        tied=False,
        types={
            "token_embd.weight": Q.Q4_0,
            "attn_q.weight": Q.Q4_K,
            "attn_k.weight": Q.Q5_0,
            "attn_v.weight": Q.Q8_0,
            "attn_output.weight": Q.F16,
            "ffn_gate.weight": Q.Q4_K,
            "ffn_up.weight": Q.Q4_0,
            "ffn_down.weight": Q.Q6_K,
            "output.weight": Q.Q6_K,
        },
    ),
    "qwen2": TestModelSpec(
        arch="qwen2",
        n_layers=2,
        n_kv_heads=1,
        tied=True,
        rope_base=1000000.0,
        types={
            "token_embd.weight": Q.Q8_0,
            "attn_q.weight": Q.Q5_0,
            "attn_k.weight": Q.Q4_K,
            "attn_v.weight": Q.Q6_K,
            "attn_output.weight": Q.Q4_0,
            "ffn_gate.weight": Q.F16,
            "ffn_up.weight": Q.Q4_K,
            "ffn_down.weight": Q.Q6_K,
        },
    ),
    "gemma3": TestModelSpec(
        arch="gemma3",
        n_layers=6,  # llama.cpp's default pattern: layers 0-4 local, layer 5 global
        n_heads=4,
        n_kv_heads=1,
        head_dim=128,  # q width 512 != d_model, as in the real 270M model
        sliding_window=5,
        tied=True,
        rope_base=1000000.0,
        types={
            "token_embd.weight": Q.Q8_0,
            "attn_q.weight": Q.Q5_0,
            "attn_k.weight": Q.Q5_0,
            "attn_v.weight": Q.Q8_0,
            "attn_output.weight": Q.Q4_K,
            "ffn_gate.weight": Q.Q5_0,
            "ffn_up.weight": Q.Q4_0,
            "ffn_down.weight": Q.Q6_K,
        },
    ),
    "qwen3": TestModelSpec(
        arch="qwen3",
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=128,  # q width 512 != d_model, as in Qwen 3 0.6B
        tied=True,
        rope_base=1000000.0,
        types={
            "token_embd.weight": Q.Q8_0,
            "attn_q.weight": Q.Q4_K,
            "attn_k.weight": Q.Q5_0,
            "attn_v.weight": Q.Q8_0,
            "attn_output.weight": Q.Q4_0,
            "ffn_gate.weight": Q.Q4_K,
            "ffn_up.weight": Q.Q4_K,
            "ffn_down.weight": Q.Q6_K,
        },
    ),
    "gemma2": TestModelSpec(
        arch="gemma2",
        n_layers=4,  # llama.cpp's default pattern: layers 0 and 2 local, 1 and 3 global
        n_heads=4,
        n_kv_heads=2,
        head_dim=128,
        sliding_window=5,
        tied=True,
        # caps that bend these models' scores and logits (Gemma 2's are 50 and 30)
        attn_softcap=3.0,
        final_softcap=20.0,
        types={
            "token_embd.weight": Q.Q8_0,
            "attn_q.weight": Q.Q5_0,
            "attn_k.weight": Q.Q4_K,
            "attn_v.weight": Q.Q8_0,
            "attn_output.weight": Q.Q4_0,
            "ffn_gate.weight": Q.Q5_0,
            "ffn_up.weight": Q.Q4_0,
            "ffn_down.weight": Q.Q6_K,
        },
    ),
    "phi3": TestModelSpec(
        arch="phi3",
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,  # Phi 3 mini has no GQA; attn_output is d x d in llama.cpp
        head_dim=64,
        tied=False,
        types={
            "token_embd.weight": Q.Q4_0,
            "attn_qkv.weight": Q.Q5_0,
            "attn_output.weight": Q.Q4_K,
            "ffn_up.weight": Q.Q4_K,
            "ffn_down.weight": Q.Q6_K,
            "output.weight": Q.Q6_K,
        },
    ),
    "qwen3moe": TestModelSpec(
        arch="qwen3moe",
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        tied=True,
        rope_base=1000000.0,
        n_experts=4,
        n_experts_used=2,
        d_ff_expert=256,
        types={
            "token_embd.weight": Q.Q8_0,
            "attn_q.weight": Q.Q4_K,
            "attn_k.weight": Q.Q5_0,
            "attn_v.weight": Q.Q8_0,
            "attn_output.weight": Q.Q4_0,
            "ffn_gate_exps.weight": Q.Q4_K,
            "ffn_up_exps.weight": Q.Q5_0,
            "ffn_down_exps.weight": Q.Q6_K,
        },
    ),
    # the llama arch with llama3's RoPE scaling (rope_freqs.weight divides the frequencies)
    "llama3": TestModelSpec(
        arch="llama",
        n_layers=2,
        tied=False,
        rope_base=500000.0,
        rope_freqs=True,
        types={
            "token_embd.weight": Q.Q8_0,
            "attn_q.weight": Q.Q4_K,
            "attn_k.weight": Q.Q4_K,
            "attn_v.weight": Q.Q6_K,
            "attn_output.weight": Q.Q4_0,
            "ffn_gate.weight": Q.Q4_K,
            "ffn_up.weight": Q.Q4_K,
            "ffn_down.weight": Q.Q6_K,
            "output.weight": Q.Q6_K,
        },
    ),
}


def _random_k_quant(rng: np.random.Generator, rows: int, cols: int, qtype: Q, std: float) -> Any:
    """Random but well-formed Q4_K / Q6_K blocks (gguf-py cannot quantize K types)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    nb = cols // block_elems
    raw = rng.integers(0, 256, size=(rows, nb, block_bytes), dtype=np.uint8)
    if qtype == Q.Q4_K:
        d = np.float16(std / 140.0)
        raw[:, :, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
        raw[:, :, 2:4] = np.frombuffer(np.float16(std * 7.5 / 140.0).tobytes(), np.uint8)
    elif qtype == Q.Q6_K:
        raw[:, :, 192:208] = (
            rng.integers(-40, 41, size=(rows, nb, 16)).astype(np.int8).view(np.uint8)
        )
        raw[:, :, 208:210] = np.frombuffer(np.float16(std / 500.0).tobytes(), np.uint8)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, nb * block_bytes)


# Types gguf.quants.quantize implements (gguf 0.19); the rest are written as random blocks.
QUANTIZABLE = frozenset(
    {Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0}
    | ({Q.MXFP4} if hasattr(Q, "MXFP4") else set())
)

# Byte offsets of each block's f16 scales; the second of a pair is the min's scale (dmin)
_F16_AT: dict[Q, tuple[int, ...]] = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
    Q.IQ2_XXS: (0,),
    Q.IQ2_XS: (0,),
    Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,),
    Q.IQ3_S: (0,),
    Q.IQ1_S: (0,),
    Q.TQ1_0: (52,),
    Q.TQ2_0: (64,),
}
# dmin / d that centres d*sc*q - dmin*m on zero for random sub-scales and codes
_MIN_RATIO = {Q.Q2_K: 1.5, Q.Q4_K: 7.5, Q.Q5_K: 15.5}


def _finite_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
    """Random f16 bit patterns, any sign and exponent (subnormals too) but never inf/NaN."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= 0xBFFF  # clear the top exponent bit: a finite value
    return bits


def _get_f16(raw: Any, qtype: Q) -> list[Any]:
    if qtype == Q.IQ1_M:
        words = np.ascontiguousarray(raw[:, 48:56]).view("<u2")
        d = np.bitwise_or.reduce((words >> 12) << np.array([0, 4, 8, 12], np.uint16), axis=-1)
        return [d.astype(np.uint16)]
    return [np.ascontiguousarray(raw[:, a : a + 2]).view("<u2")[:, 0] for a in _F16_AT[qtype]]


def _set_f16(raw: Any, qtype: Q, fields: list[Any]) -> None:
    if qtype == Q.IQ1_M:
        words = np.ascontiguousarray(raw[:, 48:56]).view("<u2") & 0x0FFF
        d = fields[0].astype(np.uint16)
        words |= ((d[:, None] >> np.array([0, 4, 8, 12], np.uint16)) & 0xF) << 12
        raw[:, 48:56] = words.view(np.uint8)
        return
    for a, f in zip(_F16_AT[qtype], fields, strict=True):
        raw[:, a : a + 2] = np.ascontiguousarray(f.astype(np.uint16)).view(np.uint8).reshape(-1, 2)


def random_blocks(
    rng: np.random.Generator, qtype: Q, n_blocks: int, scale: float | None = None
) -> Any:
    """``n_blocks`` random, valid blocks of ``qtype`` as uint8 [n_blocks, type_size].

    Every code and grid index pattern is valid in these formats, so the bytes are random
    except the f16 scales: any finite value when ``scale`` is None, else ``scale`` times a
    random factor in [0.5, 1] (mins by their centring ratio)."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    if qtype == Q.MXFP4:
        # the e8m0 exponent: 2^(e - 128) near 1, or anywhere that keeps 12 * 2^(e-128) finite
        lo, hi = (0, 241) if scale is None else (127, 129)
        raw[:, 0] = rng.integers(lo, hi, size=n_blocks)
        return raw
    n_fields = len(_get_f16(raw, qtype))
    if scale is None:
        fields = [_finite_f16(rng, (n_blocks,)) for _ in range(n_fields)]
    else:
        ratios = [1.0, _MIN_RATIO.get(qtype, 1.0)][:n_fields]
        u = rng.uniform(0.5, 1.0, n_blocks)  # one factor for d and dmin: mins stay centring
        fields = [(scale * r * u).astype(np.float16).view(np.uint16) for r in ratios]
    _set_f16(raw, qtype, fields)
    if scale is not None:
        _centre_mins(raw, qtype)
    return raw


def _centre_mins(raw: Any, qtype: Q) -> None:
    """Each sub-block's min equal to its scale code (times the dmin/d ratio, half the code
    range), so sub-blocks centre on zero as a quantizer's do on zero-mean weights; random
    independent mins put most of a weight's value in its block offset."""
    if qtype == Q.Q2_K:
        sc = raw[:, 0:16] & 0x0F
        raw[:, 0:16] = sc | (sc << 4)
    elif qtype == Q.Q5_K:
        # the 12 scale bytes at 4: mins 0-3 (and the top bits of 4-7) in bytes 4-7 copy the
        # scales' bytes 0-3; bytes 8-11 hold scale | min << 4 low nibbles for sub-blocks 4-7
        raw[:, 8:12] = raw[:, 4:8]
        low = raw[:, 12:16] & 0x0F
        raw[:, 12:16] = low | (low << 4)


def _random_raw(rng: np.random.Generator, rows: int, cols: int, qtype: Q, std: float) -> Any:
    """Random blocks rescaled so that the dequantized weights have RMS ``std``."""
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(rng, qtype, rows * cols // per_block, scale=1.0)
    vals = gguf.quants.dequantize(raw, qtype)
    rms = float(np.sqrt(np.mean(np.square(vals, dtype=np.float64))))
    if qtype != Q.MXFP4 and rms > 0:
        factor = std / rms
        fields = [f.view(np.float16).astype(np.float32) * factor for f in _get_f16(raw, qtype)]
        _set_f16(raw, qtype, [f.astype(np.float16).view(np.uint16) for f in fields])
    return raw.reshape(rows, cols // per_block * size)


def _encode(rng: np.random.Generator, values: _FloatArray, qtype: Q, std: float) -> Any:
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):  # kept as before: the default models stay the same
        return _random_k_quant(rng, values.shape[0], values.shape[1], qtype, std)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(values, qtype)
    return _random_raw(rng, values.shape[0], values.shape[1], qtype, std)


_MATRICES = (
    "token_embd.weight",
    "output.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "attn_qkv.weight",
    "ffn_gate_exps.weight",
    "ffn_up_exps.weight",
    "ffn_down_exps.weight",
)


def uniform_spec(arch: str, qtype: Q, **changes: Any) -> TestModelSpec:
    """DEFAULT_SPECS[arch] (a model name: an arch, or "llama3") with every matrix of type
    ``qtype`` (vectors stay F32, and so does a MoE router, as llama.cpp's quantizer keeps it)."""
    base = DEFAULT_SPECS[arch]
    return replace(base, types={m: qtype for m in _MATRICES}, **changes)


def write_test_model(path: str | os.PathLike[str], spec: TestModelSpec | str) -> Path:
    """Write a random-weight GGUF for ``spec`` (or a DEFAULT_SPECS key); returns the path."""
    if isinstance(spec, str):
        spec = DEFAULT_SPECS[spec]
    out = Path(path)
    rng = np.random.default_rng(spec.seed)
    w = gguf.GGUFWriter(str(out), spec.arch)
    _write_hparams(w, spec)
    vocab = _write_vocab(w, spec)
    _write_tensors(w, spec, rng, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.debug("wrote test model %s (%s)", out, spec.arch)
    return out


def _write_hparams(w: Any, spec: TestModelSpec) -> None:
    w.add_name(f"edgemesh-test-{spec.arch}")
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.d_model)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.d_ff)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(spec.rope_base)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    if spec.attn_softcap:
        w.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap:
        w.add_final_logit_softcapping(spec.final_softcap)
    if spec.n_experts:
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
        w.add_expert_feed_forward_length(spec.d_ff_expert)
    w.add_file_type(1)


def _write_vocab(w: Any, spec: TestModelSpec) -> int:
    """Qwen archs get a byte-level BPE vocab, the others a SentencePiece one; its size."""
    if spec.arch.startswith("qwen"):
        tokens, types, merges = bpe_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        eos = len(tokens) - 1
        w.add_bos_token_id(eos)
        w.add_eos_token_id(eos)
        w.add_add_bos_token(False)
    else:
        tokens, scores, types = spm_vocab()
        if spec.arch == "phi3":  # llama.cpp's vocab loader looks these up by name for Phi 3
            tokens += ["<|endoftext|>", "<|end|>"]
            scores += [0.0, 0.0]
            types += [int(gguf.TokenType.CONTROL)] * 2
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)
    return len(tokens)


def _block_shapes(spec: TestModelSpec) -> dict[str, tuple[int, ...]]:
    d, hd, ff = spec.d_model, spec.head_dim, spec.d_ff
    qd, kvd = spec.n_heads * hd, spec.n_kv_heads * hd
    e, fe = spec.n_experts, spec.d_ff_expert
    return {
        "attn_q.weight": (qd, d),
        "attn_k.weight": (kvd, d),
        "attn_v.weight": (kvd, d),
        "attn_qkv.weight": (qd + 2 * kvd, d),
        "attn_output.weight": (d, qd),
        "ffn_gate.weight": (ff, d),
        "ffn_up.weight": (2 * ff if ARCHITECTURES[spec.arch].fused_gate_up else ff, d),
        "ffn_down.weight": (d, ff),
        "ffn_gate_inp.weight": (e, d),
        "ffn_gate_exps.weight": (e, fe, d),
        "ffn_up_exps.weight": (e, fe, d),
        "ffn_down_exps.weight": (e, d, fe),
        "attn_q.bias": (qd,),
        "attn_k.bias": (kvd,),
        "attn_v.bias": (kvd,),
        "attn_q_norm.weight": (hd,),
        "attn_k_norm.weight": (hd,),
    }


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, ctx: int = 64) -> Any:
    """llama3's rope_freqs (as convert_hf_to_gguf computes them, low/high factors 1 and 4),
    over an original context of ``ctx`` so that a test model's dims span all three regimes."""
    freqs = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wl, high_wl = ctx / 1.0, ctx / 4.0
    smooth = (ctx / wavelen - 1.0) / (4.0 - 1.0)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, mid))
    return out.astype(np.float32)


def _write_tensors(w: Any, spec: TestModelSpec, rng: np.random.Generator, vocab: int) -> None:
    d = spec.d_model

    def mat(name: str, suffix: str, shape: tuple[int, ...], std: float) -> None:
        default = Q.F32 if suffix == "ffn_gate_inp.weight" else Q.Q8_0
        qtype = spec.types.get(suffix, default)
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        values = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        data = _encode(rng, values, qtype, std)
        data = data.reshape(shape[:-1] + (data.shape[-1],))  # 3-D expert tensors
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype  # BF16 data is raw bytes too
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    def vec(name: str, n: int, center: float, std: float) -> None:
        w.add_tensor(name, (center + rng.standard_normal(n) * std).astype(np.float32))

    # tied tables also produce the logits: keep them small so that logits stay in a few units
    mat("token_embd.weight", "token_embd.weight", (vocab, d), 0.15 if spec.tied else 1.0)
    vec("output_norm.weight", d, 1.0, 0.1)
    if not spec.tied:
        mat("output.weight", "output.weight", (vocab, d), 3.0 / np.sqrt(d))  # a few units
    if spec.rope_freqs:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(spec.head_dim, spec.rope_base))
    shapes = _block_shapes(spec)
    for i in range(spec.n_layers):
        for suffix in ARCHITECTURES[spec.arch].block_tensors:
            name = f"blk.{i}.{suffix}"
            shape = shapes.get(suffix, (d,))
            if suffix == "ffn_gate_inp.weight":  # router logits a few units apart
                mat(name, suffix, shape, 2.0 / np.sqrt(shape[-1]))
            elif len(shape) >= 2:
                mat(name, suffix, shape, 1.0 / np.sqrt(shape[-1]))
            elif suffix.endswith(".bias"):
                vec(name, shape[0], 0.0, 0.5)
            else:
                vec(name, shape[0], 1.0, 0.2)
