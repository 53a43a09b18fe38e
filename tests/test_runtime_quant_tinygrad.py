"""tinygrad on a weight type beyond the original seven (CPU with clang here; kept tiny).

tinygrad runs every type as float32 dequantized by gguf at load (runtimes.quant.type_support
says "dequantized"), so one type checks the path; the block tests cover the dequantizer.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

importlib.import_module("tinygrad")
importlib.import_module("llama_cpp")
gguf = importlib.import_module("gguf")
if shutil.which("clang") is None:  # tinygrad's CPU device compiles kernels with clang
    pytest.fail("tinygrad on CPU needs the clang binary (make test installs it)", pytrace=False)

from runtimes.oracle import Chain, compare_chain  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402
from runtimes.testmodels import uniform_spec, write_test_model  # noqa: E402
from runtimes.tinygrad_rt import TinygradRuntime  # noqa: E402
from tests.test_runtime_onnx import PROMPT, REL_BOUND, _oracle  # noqa: E402


def test_q5_k_two_shards_agree_with_llama_cpp(tmp_path: Path) -> None:
    p = write_test_model(tmp_path / "m.gguf", uniform_spec("llama", gguf.GGMLQuantizationType.Q5_K))
    n = ShardSpec.open(p).config.n_units
    chain = Chain(
        [
            TinygradRuntime(ShardSpec.open(p, 0, n // 2)),
            TinygradRuntime(ShardSpec.open(p, n // 2, n)),
        ]
    )
    ref = _oracle(p)
    try:
        c = compare_chain(ref, chain, PROMPT, decode_steps=4, max_tokens=64)
    finally:
        ref.close()
    print(c.summary())
    assert c.relative_diff <= REL_BOUND, c.summary()
    assert c.decided >= c.steps // 2
    assert c.agreed == c.decided, c.summary()
