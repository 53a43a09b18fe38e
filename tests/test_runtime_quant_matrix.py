"""Every weight type on every architecture: the onnx runtime against llama.cpp on one GGUF.

Each model has all its matrices in one type (``testmodels.uniform_spec``; vectors F32) and is
split into two shard blobs through the ShardStore, as a mesh would; the rule is
test_runtime_onnx's: max |logit difference| <= 4% of llama.cpp's logit range over the prompt
and 8 decode steps, and the same argmax wherever llama.cpp's top-2 margin exceeds 0.25.
Measured: 0.2-2.1% (F16/BF16 0.02-0.2%); the rest is how each side rounds activations to
int8 (llama.cpp per 256 values for K-quant and IQ matrices, onnxruntime per 16 or 32).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

importlib.import_module("onnxruntime")
importlib.import_module("llama_cpp")
gguf = importlib.import_module("gguf")

from runtimes.gguf_io import SUPPORTED_TYPES  # noqa: E402
from runtimes.onnx_rt import OnnxRuntime  # noqa: E402
from runtimes.oracle import Chain, compare_chain  # noqa: E402
from runtimes.quant import type_support  # noqa: E402
from runtimes.shards import ShardStore  # noqa: E402
from runtimes.testmodels import uniform_spec, write_test_model  # noqa: E402
from tests.test_runtime_onnx import PROMPT, REL_BOUND, _oracle  # noqa: E402

Q = gguf.GGMLQuantizationType
ARCHS = ["llama", "qwen2", "gemma3"]
TYPES = sorted((q for q in SUPPORTED_TYPES if q != Q.F32), key=lambda q: q.name)
DECODE_STEPS = 8
# Known, measured disagreements (seed 0 of the generator); strict, so that a change shows.
KNOWN = {
    # Prompt position 11: llama.cpp's top-2 margin is 0.251, and onnx ranks the pair the
    # other way by 0.10 with int8 activations and by 0.05 with float32 ones, so the flip is
    # llama.cpp's rounding (IQ4_XS dot products take activations in int8 per 256 values).
    ("qwen2", Q.IQ4_XS): "llama.cpp margin 0.251 at a position onnx's float32 path also flips",
}


def _cases() -> list[object]:
    out: list[object] = []
    for arch in ARCHS:
        for q in TYPES:
            reason = KNOWN.get((arch, q))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(arch, q, marks=marks, id=f"{arch}-{q.name}"))
    return out


@pytest.mark.parametrize(("arch", "qtype"), _cases())
def test_onnx_agrees_with_llama_cpp(tmp_path: Path, arch: str, qtype: object) -> None:
    path = write_test_model(tmp_path / "m.gguf", uniform_spec(arch, qtype))  # type: ignore[arg-type]
    store = ShardStore(tmp_path / "store")
    manifest = store.add_model(path)
    n = len(manifest.units)
    chain = Chain(
        [
            OnnxRuntime(store.open_range(manifest, 0, n // 2), threads=2),
            OnnxRuntime(store.open_range(manifest, n // 2, n), threads=2),
        ]
    )
    ref = _oracle(path)
    try:
        c = compare_chain(ref, chain, PROMPT, decode_steps=DECODE_STEPS, max_tokens=64)
    finally:
        ref.close()
    support = type_support(qtype)  # type: ignore[arg-type]
    print(f"{arch} {qtype.name} onnx={support['onnx']}: {c.summary()}")  # type: ignore[attr-defined]
    assert c.steps == len(PROMPT) + DECODE_STEPS
    assert c.relative_diff <= REL_BOUND, c.summary()
    assert c.decided >= c.steps // 2  # the rule must have teeth
    assert c.agreed == c.decided, (c.summary(), c.mismatches)
