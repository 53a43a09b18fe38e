"""The architectures beyond llama/qwen2/gemma3: what their configs read from GGUF metadata,
that their shards count every tensor (MoE experts included), and that their test models'
tokenizers work from the shard blobs as from the whole model."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

gguf = importlib.import_module("gguf")

from runtimes.arch import ARCHITECTURES, config_from_metadata, unit_tensor_names  # noqa: E402
from runtimes.errors import MalformedModelError, UnsupportedModelError  # noqa: E402
from runtimes.gguf_io import open_gguf  # noqa: E402
from runtimes.shards import ShardStore  # noqa: E402
from runtimes.testmodels import DEFAULT_SPECS, llama3_rope_factors, write_test_model  # noqa: E402

NEW = ["qwen3", "gemma2", "phi3", "qwen3moe", "llama3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("archs")
    return {a: write_test_model(d / f"{a}.gguf", a) for a in NEW}


def test_configs(models: dict[str, Path]) -> None:
    q3 = open_gguf(models["qwen3"]).config
    assert q3.spec.qk_norm and not q3.spec.qkv_bias and q3.spec.rope_type == "neox"
    g2 = open_gguf(models["gemma2"]).config
    # llama.cpp's gemma2 pattern of 2: even layers use the sliding window, odd layers global
    assert g2.swa_layers == (True, False, True, False)
    assert g2.sliding_window == DEFAULT_SPECS["gemma2"].sliding_window
    assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (3.0, 20.0)
    assert g2.rope_base_swa == g2.rope_base  # gemma2: no separate local base
    assert g2.embed_scale == pytest.approx(16.0)
    p3 = open_gguf(models["phi3"])
    assert p3.config.spec.fused_qkv and p3.config.spec.fused_gate_up
    assert p3.tensors["blk.0.attn_qkv.weight"].shape == (3 * 256, 256)
    assert p3.tensors["blk.0.ffn_up.weight"].shape == (2 * 512, 256)
    moe = open_gguf(models["qwen3moe"])
    c = moe.config
    assert (c.n_experts, c.n_experts_used, c.d_ff_expert) == (4, 2, 256)
    assert moe.tensors["blk.1.ffn_down_exps.weight"].shape == (4, 256, 256)
    l3 = open_gguf(models["llama3"])
    assert l3.config.has_rope_freqs and l3.config.arch == "llama"
    factors = l3.tensors["rope_freqs.weight"].dequantize()
    np.testing.assert_array_equal(factors, llama3_rope_factors(64, 500000.0))
    assert factors.min() == 1.0 and factors.max() == 8.0  # all three regimes present


def test_metadata_defaults_and_refusals() -> None:
    """Without the keys llama.cpp uses Gemma 2's own values (window 4096, caps 50 and 30); a
    MoE without an expert count and Phi 3's longrope factors are refused, not guessed."""
    meta = {
        "general.architecture": "gemma2",
        "gemma2.block_count": 4,
        "gemma2.embedding_length": 256,
        "gemma2.attention.head_count": 4,
        "gemma2.feed_forward_length": 512,
        "gemma2.vocab_size": 100,
    }
    c = config_from_metadata(meta, {"token_embd.weight"}, 100)
    assert (c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap) == (4096, 50.0, 30.0)
    bad = dict(meta, **{"general.architecture": "qwen3moe"})
    bad = {k.replace("gemma2.", "qwen3moe."): v for k, v in bad.items()}
    with pytest.raises(MalformedModelError, match="expert_count"):
        config_from_metadata(bad, {"token_embd.weight"}, 100)
    phi3 = {k.replace("gemma2.", "phi3."): v for k, v in meta.items()}
    phi3["general.architecture"] = "phi3"
    assert config_from_metadata(phi3, {"token_embd.weight"}, 100).sliding_window == 0
    with pytest.raises(UnsupportedModelError, match="longrope"):
        config_from_metadata(phi3, {"token_embd.weight", "rope_factors_long.weight"}, 100)


def test_moe_units_count_expert_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    """The planner sizes stages by the manifest's unit bytes: a MoE block's are mostly its
    experts, and every expert tensor travels in the block's blob."""
    m = open_gguf(models["qwen3moe"])
    manifest = ShardStore(tmp_path / "store").add_model(models["qwen3moe"])
    for unit in manifest.units:
        if unit.kind != "block":
            continue
        names = unit_tensor_names(m.config, unit.index)
        experts = [n for n in names if "_exps." in n]
        assert len(experts) == 3 and set(experts) <= set(unit.tensors)
        assert unit.nbytes == sum(m.tensors[n].nbytes for n in names)
        assert sum(m.tensors[n].nbytes for n in experts) > unit.nbytes / 2


def test_rope_freqs_reach_every_stage(models: dict[str, Path], tmp_path: Path) -> None:
    """A first stage whose first blob holds only the embedding still knows the blocks' RoPE
    factors (it ran without them once: 28.7% of llama.cpp's logit range on llama3)."""
    store = ShardStore(tmp_path / "store")
    manifest = store.add_model(models["llama3"])
    n = len(manifest.units)
    for a, b in [(0, n // 2), (n // 2, n), (0, n)]:
        shard = store.open_range(manifest, a, b)
        assert shard.config.has_rope_freqs and "rope_freqs.weight" in shard.tensors


@pytest.mark.parametrize("arch", NEW)
def test_tokenizer_from_blobs(models: dict[str, Path], arch: str, tmp_path: Path) -> None:
    """llama.cpp loads each test model's vocabulary (Phi 3's loader looks up <|endoftext|>
    by name), from the whole model and from the first and last blobs alike."""
    from runtimes.tokenizer import Tokenizer

    store = ShardStore(tmp_path / "store")
    manifest = store.add_model(models[arch])
    text = "the cat sat on the mat"
    want = Tokenizer(models[arch]).encode(text)
    assert want
    for blob in (manifest.blobs[0], manifest.blobs[-1]):
        assert Tokenizer(store.verify_blob(blob)).encode(text) == want


def test_every_arch_has_a_test_model() -> None:
    assert {s.arch for s in DEFAULT_SPECS.values()} == set(ARCHITECTURES)
