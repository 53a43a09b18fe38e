"""The tinygrad runtime against llama.cpp on generated models (CPU with clang here).

Same rule as the onnx runtime: two shards chained, prompt + 16 decode steps, max |logit diff|
<= 4% of llama.cpp's logit range (measured 0.5-1.5%: float32 activations here, int8 in
llama.cpp's quantized dot products) and the same argmax wherever llama.cpp's top-2 margin
exceeds 0.25. Kept to the small generated models: tinygrad is slow on this CPU.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

importlib.import_module("tinygrad")
importlib.import_module("llama_cpp")
if shutil.which("clang") is None:  # tinygrad's CPU device compiles kernels with clang
    pytest.fail("tinygrad on CPU needs the clang binary (make test installs it)", pytrace=False)

from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from runtimes.oracle import Chain, compare_chain  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402
from runtimes.testmodels import write_test_model  # noqa: E402
from runtimes.tinygrad_rt import TinygradRuntime  # noqa: E402

REL_BOUND = 0.04
PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7, 7, 7, 12, 30]


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "gemma3", "qwen3", "gemma2", "phi3", "qwen3moe", "llama3"]
)
def test_two_shards_agree_with_llama_cpp(tmp_path: Path, arch: str) -> None:
    p = write_test_model(tmp_path / f"{arch}.gguf", arch)
    n = ShardSpec.open(p).config.n_units
    chain = Chain(
        [
            TinygradRuntime(ShardSpec.open(p, 0, n // 2)),
            TinygradRuntime(ShardSpec.open(p, n // 2, n)),
        ]
    )
    ref = LlamaCppRuntime(ShardSpec.open(p), n_ctx=64, logits_all=True, kv_f32=True, threads=2)
    c = compare_chain(ref, chain, PROMPT, decode_steps=16, max_tokens=64)
    print(arch, c.summary())
    assert c.relative_diff <= REL_BOUND, c.summary()
    assert c.decided >= c.steps // 2
    assert c.agreed == c.decided, c.summary()
    ref.close()
