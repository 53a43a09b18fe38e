"""GGUF reading, the architecture table, the test-model generator and the quant re-layout."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = importlib.import_module("gguf")

from runtimes.arch import ARCHITECTURES, unit_count, unit_kind, unit_tensor_names  # noqa: E402
from runtimes.errors import MalformedModelError, ModelError, UnsupportedModelError  # noqa: E402
from runtimes.gguf_io import open_gguf  # noqa: E402
from runtimes.quant import dequantize_nbits, to_nbits  # noqa: E402
from runtimes.testmodels import DEFAULT_SPECS, write_test_model  # noqa: E402

# DEFAULT_SPECS names: the architectures, and llama3 (the llama arch with rope_freqs)
ARCHS = ["llama", "qwen2", "gemma3", "qwen3", "gemma2", "phi3", "qwen3moe", "llama3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    return {a: write_test_model(d / f"{a}.gguf", a) for a in ARCHS}


def test_architecture_table_covers_issue_archs() -> None:
    assert {"llama", "qwen2", "gemma3"} <= set(ARCHITECTURES)
    assert ARCHITECTURES["llama"].rope_type == "norm"
    assert ARCHITECTURES["qwen2"].qkv_bias
    assert ARCHITECTURES["gemma3"].qk_norm and ARCHITECTURES["gemma3"].post_norms


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_generated_model(models: dict[str, Path], arch: str) -> None:
    spec = DEFAULT_SPECS[arch]
    m = open_gguf(models[arch])
    c = m.config
    assert (c.arch, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (
        spec.arch,
        spec.n_layers,
        spec.d_model,
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
        spec.d_ff,
    )
    assert c.tied_embeddings == spec.tied
    assert m.is_whole_model and (m.unit_start, m.unit_end) == (0, c.n_units)
    if arch == "gemma3":
        # llama.cpp's pattern of 6: layers 0-4 use the sliding window, layer 5 is global
        assert c.swa_layers == (True,) * 5 + (False,)
        assert c.sliding_window == spec.sliding_window
        assert c.embed_scale == pytest.approx(16.0)
    elif arch == "gemma2":
        assert c.swa_layers == (True, False) * 2  # llama.cpp's pattern of 2
    else:
        assert not any(c.swa_layers)


def test_units_and_tied_embeddings(models: dict[str, Path]) -> None:
    c = open_gguf(models["gemma3"]).config
    assert unit_count(c.n_layers) == c.n_units == c.n_layers + 2
    assert unit_kind(0, c.n_layers) == ("embed", None)
    assert unit_kind(3, c.n_layers) == ("block", 2)
    assert unit_kind(c.n_units - 1, c.n_layers) == ("head", None)
    # tied: the embedding serves both ends
    assert "token_embd.weight" in unit_tensor_names(c, c.n_units - 1)
    c2 = open_gguf(models["llama"]).config
    assert unit_tensor_names(c2, c2.n_units - 1) == ["output_norm.weight", "output.weight"]


def test_every_issue_tensor_type_is_generated(models: dict[str, Path]) -> None:
    Q = gguf.GGMLQuantizationType
    seen = {t.qtype for a in ARCHS for t in open_gguf(models[a]).tensors.values()}
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q6_K} <= seen


@pytest.mark.parametrize("arch", ARCHS)
def test_nbits_relayout_is_lossless(models: dict[str, Path], arch: str) -> None:
    """MatMulNBits codes/scales/zero points/offsets rebuild gguf's dequantized values exactly."""
    m = open_gguf(models[arch])
    checked = 0
    for ref in m.tensors.values():
        nb = to_nbits(ref) if len(ref.shape) == 2 else None
        if nb is None:
            continue
        np.testing.assert_array_equal(dequantize_nbits(nb), ref.dequantize(), err_msg=ref.name)
        checked += 1
    assert checked >= 5


def test_llama_cpp_loads_generated_models(models: dict[str, Path]) -> None:
    llama_cpp = importlib.import_module("llama_cpp")
    for arch in ARCHS:
        llm = llama_cpp.Llama(str(models[arch]), n_ctx=32, n_threads=2, verbose=False)
        assert llm.n_vocab() == open_gguf(models[arch]).config.vocab_size
        assert llm.tokenize(b"the cat")  # the tokenizer metadata is usable
        llm.close()


# --- malformed input: clear errors, never a crash or a hang ---------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        open_gguf(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(MalformedModelError, match="not a GGUF"):
        open_gguf(p)


@pytest.mark.parametrize("keep", [0, 10, 23, 100, 5000, -1000, -1])
def test_truncated(models: dict[str, Path], tmp_path: Path, keep: int) -> None:
    data = models["llama"].read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(MalformedModelError, match="truncated|past the end|not a GGUF"):
        open_gguf(p)


def test_huge_counts_rejected_before_allocation(tmp_path: Path) -> None:
    import struct

    p = tmp_path / "huge.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1) + b"\0" * 64)
    with pytest.raises(MalformedModelError, match="implausible"):
        open_gguf(p)


def test_huge_string_length_rejected(tmp_path: Path) -> None:
    import struct

    p = tmp_path / "str.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"k")
    with pytest.raises(MalformedModelError, match="truncated"):
        open_gguf(p)


def test_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="mamba"):
        open_gguf(tmp_path / "m.gguf")


def test_random_corruption_never_crashes(models: dict[str, Path], tmp_path: Path) -> None:
    """Flipping header bytes gives a ModelError or a model, never another exception."""
    data = bytearray(models["qwen2"].read_bytes())
    rng = np.random.default_rng(7)
    p = tmp_path / "c.gguf"
    header_end = 4096  # metadata and tensor infos live in the first few KB
    for _ in range(60):
        d = bytearray(data)
        for i in rng.integers(4, header_end, size=3):
            d[i] = int(rng.integers(0, 256))
        p.write_bytes(bytes(d))
        try:
            open_gguf(p)
        except ModelError:
            pass


# --- crafted headers (issue 13): each raised a non-ModelError before --------------------------


def _crafted(models: dict[str, Path], tmp_path: Path, edit: Any) -> Path:
    from tests import ggufcraft as gc

    parts = gc.split(models["llama"].read_bytes())
    edit(gc, parts)
    p = tmp_path / "crafted.gguf"
    p.write_bytes(gc.join(parts))
    return p


def test_zero_head_dim_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """key_length = value_length = rope dims = 0 was a ZeroDivisionError (1 / sqrt(0))."""

    def edit(gc: Any, p: Any) -> None:
        for k in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            p.set(f"llama.{k}", gc.UINT32, gc.scalar(gc.UINT32, 0))

    with pytest.raises(MalformedModelError, match="key_length"):
        open_gguf(_crafted(models, tmp_path, edit))


def test_string_alignment_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """general.alignment as a string was a ValueError from int()."""
    path = _crafted(
        models, tmp_path, lambda gc, p: p.set("general.alignment", gc.STRING, gc.s("x"))
    )
    with pytest.raises(MalformedModelError, match="alignment"):
        open_gguf(path)


def test_dims_whose_product_wraps_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """Four dims of 2**40 multiply to 0 in int64: the size check passed, reshape raised."""

    def edit(gc: Any, p: Any) -> None:
        t = next(t for t in p.tensors if t.name == b"output_norm.weight")
        t.dims = [256, 2**40, 2**40, 2**40]

    with pytest.raises(MalformedModelError, match="past the end"):
        open_gguf(_crafted(models, tmp_path, edit))


def test_infinite_float_for_an_int_key_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """block_count as float32 inf was an OverflowError from int()."""
    path = _crafted(
        models,
        tmp_path,
        lambda gc, p: p.set("llama.block_count", gc.FLOAT32, gc.scalar(gc.FLOAT32, float("inf"))),
    )
    with pytest.raises(MalformedModelError, match="block_count"):
        open_gguf(path)
