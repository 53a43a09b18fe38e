"""Every GGUF weight type's MatMulNBits layout, block by block against gguf's dequantizer.

Random blocks: random bytes (every code and grid-index pattern is valid in these formats) with
the f16 scales replaced by random finite values, subnormals and negatives included; and, for
the types gguf can quantize, gguf's own quantization of Gaussian values. The claim tested is
"exact": ``(code - zero_point) * scale - offset`` equals gguf's float32 values bit for bit.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

gguf = importlib.import_module("gguf")

from runtimes.errors import UnsupportedModelError  # noqa: E402
from runtimes.gguf_io import SUPPORTED_TYPES, TensorRef, open_gguf  # noqa: E402
from runtimes.nbits import CONVERTERS  # noqa: E402
from runtimes.quant import (  # noqa: E402
    FLOAT_TYPES,
    dequantize_nbits,
    nbits_layout,
    onnx_weight_bytes,
    to_nbits,
    type_support,
)
from runtimes.testmodels import QUANTIZABLE, random_blocks, uniform_spec, write_test_model  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANT_TYPES = sorted(CONVERTERS, key=lambda q: q.name)
# the issue's list: every one must be read and mapped
ISSUE_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
    "IQ1_S", "IQ1_M",
}  # fmt: skip


def _ref(raw: np.ndarray, qtype: object, rows: int) -> TensorRef:
    per_block, _ = gguf.GGML_QUANT_SIZES[qtype]
    data = raw.reshape(rows, -1)
    n_blocks = raw.shape[0] // rows
    return TensorRef("w", qtype, (rows, n_blocks * per_block), data)  # type: ignore[arg-type]


def _check(raw: np.ndarray, qtype: object, rows: int) -> None:
    ref = _ref(raw, qtype, rows)
    w = to_nbits(ref)
    assert w is not None
    want = np.asarray(gguf.quants.dequantize(ref.data, qtype), np.float32).reshape(ref.shape)
    got = dequantize_nbits(w)
    assert np.isfinite(want).all()  # the random scales are finite, so the values must be
    np.testing.assert_array_equal(got, want, err_msg=qtype.name)  # type: ignore[attr-defined]
    # the layout MatMulNBits accepts: 4- or 8-bit codes, 16- or 32-value blocks
    assert w.bits in (4, 8) and w.block in (16, 32) and w.k % w.block == 0
    assert int(w.codes().max()) < (1 << w.bits)
    assert w.scales.shape == w.zero_points.shape == (w.n, w.n_blocks)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_match_gguf(qtype: object, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = 4
    _check(random_blocks(rng, qtype, rows * 8), qtype, rows)  # type: ignore[arg-type]
    _check(random_blocks(rng, qtype, rows * 2, scale=0.01), qtype, rows)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "qtype", sorted(QUANTIZABLE - FLOAT_TYPES, key=lambda q: q.name), ids=lambda q: q.name
)
def test_gguf_quantized_blocks_match_gguf(qtype: object) -> None:
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((3, 512)) * 0.05).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    _check(raw.reshape(-1, size), qtype, 3)


def test_float_types_stay_floats() -> None:
    rng = np.random.default_rng(0)
    vals = rng.standard_normal((2, 64)).astype(np.float32)
    bf = gguf.quants.quantize(vals, Q.BF16)
    ref = TensorRef("w", Q.BF16, (2, 64), bf)
    assert to_nbits(ref) is None
    np.testing.assert_allclose(ref.dequantize(), vals, rtol=1 / 128)  # bf16: 8-bit mantissa
    assert to_nbits(TensorRef("w", Q.F16, (2, 64), vals.astype(np.float16))) is None


def test_every_issue_type_is_read_and_mapped() -> None:
    names = {q.name for q in SUPPORTED_TYPES}
    assert ISSUE_TYPES <= names
    # one table for the reader and the converters: nothing read that cannot be run
    assert SUPPORTED_TYPES - FLOAT_TYPES == set(CONVERTERS)


def test_type_support() -> None:
    assert type_support(Q.Q4_K) == {"llamacpp": "exact", "onnx": "exact", "tinygrad": "dequantized"}
    assert type_support("iq2_xxs")["onnx"] == "exact"
    assert type_support(int(Q.BF16))["onnx"] == "dequantized"
    assert type_support("F32") == {"llamacpp": "exact", "onnx": "exact", "tinygrad": "exact"}
    for bad in (Q.Q8_1, Q.I32, "Q9_9", 9999):
        assert set(type_support(bad).values()) == {"unsupported"}
    # every supported type says something other than "unsupported" for every runtime
    for q in SUPPORTED_TYPES:
        assert "unsupported" not in type_support(q).values(), q.name


def test_nbits_layout() -> None:
    assert nbits_layout(Q.Q4_K) == (4, 32, True)
    assert nbits_layout(Q.Q6_K) == (8, 16, False)
    assert nbits_layout(Q.IQ2_XXS) == (8, 32, False)
    assert nbits_layout(Q.F16) is None and nbits_layout(Q.Q8_1) is None


def test_corrupt_grid_values_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grid codes come from gguf's dequantizer; values that are not the format's integers
    (a changed table) raise instead of running wrong weights."""
    raw = random_blocks(np.random.default_rng(0), Q.IQ2_XXS, 2, scale=1.0)

    def fake(data: np.ndarray, qtype: object) -> np.ndarray:
        return np.full(data.shape[0] * 256, 0.3, np.float32)

    monkeypatch.setattr(gguf.quants, "dequantize", fake)
    with pytest.raises(UnsupportedModelError, match="integers"):
        to_nbits(_ref(raw, Q.IQ2_XXS, 1))

    def below(data: np.ndarray, qtype: object) -> np.ndarray:
        return np.full(data.shape[0] * 256, -17.0, np.float32)  # code -8: out of range

    monkeypatch.setattr(gguf.quants, "dequantize", below)
    with pytest.raises(UnsupportedModelError, match="integers"):
        to_nbits(_ref(raw, Q.IQ2_XXS, 1))


def test_unsupported_type_refused_by_reader(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("x", np.zeros((2, 40), np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        open_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("qtype", [Q.IQ1_M, Q.Q5_K, Q.BF16], ids=lambda q: q.name)
def test_uniform_models_are_all_one_type(tmp_path: Path, qtype: object) -> None:
    m = open_gguf(write_test_model(tmp_path / "m.gguf", uniform_spec("llama", qtype)))  # type: ignore[arg-type]
    types = {t.qtype for t in m.tensors.values() if len(t.shape) == 2}
    assert types == {qtype}
    for t in m.tensors.values():
        vals = t.dequantize()
        assert np.isfinite(vals).all(), t.name
        if t.name.startswith("blk.") and len(t.shape) == 2:
            rms = float(np.sqrt(np.mean(vals.astype(np.float64) ** 2)))
            # the generator's target RMS for block matrices is 1/sqrt(fan_in)
            assert 0.7 < rms * np.sqrt(t.shape[1]) < 1.4, (t.name, rms)


def test_onnx_weight_bytes_counts_the_relayout() -> None:
    rng = np.random.default_rng(0)
    rows = 4
    for qtype in (Q.Q4_K, Q.IQ2_XXS, Q.Q6_K):
        ref = _ref(random_blocks(rng, qtype, rows * 2), qtype, rows)
        w = to_nbits(ref)
        assert w is not None
        held = w.b.nbytes + w.scales.nbytes + w.zero_points.nbytes
        held += 0 if w.offsets is None else w.offsets.nbytes
        assert onnx_weight_bytes(ref) == held, qtype.name
    # IQ2_XXS: 2.06 bits a weight in the GGUF, 8 + 5 * 8 / 32 once re-laid out
    iq2 = _ref(random_blocks(rng, Q.IQ2_XXS, 2), Q.IQ2_XXS, 1)
    assert iq2.nbytes * 4 < onnx_weight_bytes(iq2) < iq2.nbytes * 5
