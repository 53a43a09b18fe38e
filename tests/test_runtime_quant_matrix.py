"""Every weight type on every architecture: the onnx runtime against llama.cpp on one GGUF.

Each model has all its matrices in one type (``testmodels.uniform_spec``; vectors F32) and is
split into two shard blobs through the ShardStore, as a mesh would; the rule is
test_runtime_onnx's: max |logit difference| <= 4% of llama.cpp's logit range over the prompt
and 8 decode steps, and the same argmax wherever llama.cpp's top-2 margin exceeds 0.25.

The graph rounds activations as llama.cpp does where MatMulNBits' own int8 rounding differs
(runtimes/onnx_acts.py: Q8_K-family weights, Q4_1/Q5_1's min terms). Measured at seed 0 over
the 192 rows: 0.00-1.21% of the range (many Q8_K rows 0.00%), every decided position agreeing;
the Q8_0-family rows 0.2-0.96% (MatMulNBits' rounding but for llama.cpp's fp16 step), F16/BF16
0.02-0.34%. Before (MatMulNBits rounding per 16 or 32 values against llama.cpp's per 256):
0.3-4.1%, and five rows broke the rule (qwen2 and llama3 x IQ4_XS, qwen3, phi3 and qwen3moe x
Q4_K; float32 activations fixed three of them).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

ort = importlib.import_module("onnxruntime")
importlib.import_module("llama_cpp")
gguf = importlib.import_module("gguf")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from runtimes.gguf_io import SUPPORTED_TYPES  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from runtimes.onnx_graph import GraphOptions, _Builder  # noqa: E402
from runtimes.onnx_rt import OnnxRuntime  # noqa: E402
from runtimes.oracle import Chain, compare_chain  # noqa: E402
from runtimes.quant import pack_nibbles, type_support  # noqa: E402
from runtimes.shards import ShardSpec, ShardStore  # noqa: E402
from runtimes.testmodels import uniform_spec, write_test_model  # noqa: E402
from tests.test_runtime_onnx import PROMPT, REL_BOUND  # noqa: E402

Q = gguf.GGMLQuantizationType
# model names of testmodels.DEFAULT_SPECS: the archs, and llama3 (llama with rope_freqs)
ARCHS = ["llama", "qwen2", "gemma3", "qwen3", "gemma2", "phi3", "qwen3moe", "llama3"]
TYPES = sorted((q for q in SUPPORTED_TYPES if q != Q.F32), key=lambda q: q.name)
DECODE_STEPS = 8
# One thread each: on these tiny models two threads mostly wait on each other (llama.cpp's
# 9 calls per model took 0.17 s with two, 0.04 s with one, here); results do not change,
# every output row is still one thread's dot product.
THREADS = 1
# Changes to a model's DEFAULT_SPECS entry for its rows. Qwen 3 MoE's rows use all 4 experts
# per token: the router's softmax weights still scale every expert, but no top-k choice is
# left to flip. With top-2 of 4 (the default spec, which test_runtime_onnx runs) 7 of the 24
# types disagree, each where a router near-tie (2nd/3rd expert probabilities 0.001-0.013
# apart) goes the other way under the activation rounding of one side (measured: onnx's own
# choice changes between float32 and int8 activations at exactly the worst positions of
# Q3_K, Q4_1 and Q8_0; IQ2_S, IQ2_XS and IQ3_S flip on llama.cpp's side, whose IQ dot
# products round activations per 256 values). Routing is discontinuous; the expert math is
# what these rows check type by type.
SPEC_CHANGES: dict[str, dict[str, object]] = {"qwen3moe": {"n_experts_used": 4}}


def _oracle(path: Path, threads: int = THREADS) -> LlamaCppRuntime:
    """test_runtime_onnx's llama.cpp settings (float32 KV cache, all logits), one thread.

    Both sides keep float32 caches here (``kv_float16=False`` below): the matrix checks each
    type's mapping, and float16 caches add their own rounding on both sides (median gap
    0.40% of the logit range float32/float32, 0.64% float16/float16 over the 194 cases;
    test_runtime_gemma compares the defaults, float16 on both sides)."""
    return LlamaCppRuntime(
        ShardSpec.open(path), n_ctx=64, logits_all=True, kv_f32=True, threads=threads
    )


def _cases() -> list[object]:
    out: list[object] = []
    for arch in ARCHS:
        for q in TYPES:
            out.append(pytest.param(arch, q, id=f"{arch}-{q.name}"))
    return out


@pytest.mark.parametrize(("arch", "qtype"), _cases())
def test_onnx_agrees_with_llama_cpp(tmp_path: Path, arch: str, qtype: object) -> None:
    spec = uniform_spec(arch, qtype, **SPEC_CHANGES.get(arch, {}))  # type: ignore[arg-type]
    path = write_test_model(tmp_path / "m.gguf", spec)
    store = ShardStore(tmp_path / "store")
    manifest = store.add_model(path)
    n = len(manifest.units)
    chain = Chain(
        [
            OnnxRuntime(store.open_range(manifest, 0, n // 2), threads=THREADS, kv_float16=False),
            OnnxRuntime(store.open_range(manifest, n // 2, n), threads=THREADS, kv_float16=False),
        ]
    )
    ref = _oracle(path, threads=THREADS)
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


def test_rounded_block_sums_match_the_kernel() -> None:
    """GraphOptions.round_block_sums rounds x per block as MatMulNBits does at level 4: with
    unit codes on one block per output row, the kernel's output is that block's rounded sum."""
    k = 256
    for bits, block in ((4, 32), (4, 16), (8, 32), (8, 16)):
        nb = k // block
        codes = np.zeros((nb, nb, block), np.uint8)
        codes[np.arange(nb), np.arange(nb)] = 1  # row j: code 1 over block j, 0 elsewhere
        packed = pack_nibbles(codes) if bits == 4 else codes
        zp = np.zeros(nb * nb // (2 if bits == 4 else 1), np.uint8)
        node = helper.make_node(
            "MatMulNBits",
            ["x", "b", "s", "z"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=nb,
            bits=bits,
            block_size=block,
            accuracy_level=4,
        )
        b = _Builder(None, GraphOptions(round_block_sums=True))  # type: ignore[arg-type]
        sums = b._block_sums("x", nb, block)
        b.nodes.append(helper.make_node("Identity", [sums], ["sums"]))
        inits = [
            numpy_helper.from_array(packed, "b"),
            numpy_helper.from_array(np.ones(nb * nb, np.float32), "s"),
            numpy_helper.from_array(zp, "z"),
            *b.inits.values(),
        ]
        graph = helper.make_graph(
            [node, *b.nodes],
            "t",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", k])],
            [
                helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", nb]),
                helper.make_tensor_value_info("sums", TensorProto.FLOAT, ["S", nb]),
            ],
            inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        )
        model.ir_version = 10
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(bits + block).standard_normal((3, k)).astype(np.float32)
        y, sums_out = sess.run(None, {"x": x})
        float_sums = x.reshape(3, nb, block).sum(-1)
        np.testing.assert_allclose(sums_out, y, atol=1e-5)  # the kernel's rounding, replicated
        assert np.abs(float_sums - y).max() > 1e-3  # and the float sums are not it


def test_rounded_block_sums_close_the_gap_on_mins(tmp_path: Path) -> None:
    """On Q4_1 (gguf-quantized, mins of a Gaussian's blocks) the rounded sums halve the gap
    to llama.cpp at least (measured 3.6% -> 0.7% of the logit range on qwen2)."""
    path = write_test_model(tmp_path / "m.gguf", uniform_spec("qwen2", Q.Q4_1))
    ref = _oracle(path)
    try:
        gaps = []
        for rounded in (False, True):
            # round_block_sums acts on MatMulNBits' own rounding: llama.cpp's is off here
            rt = OnnxRuntime(
                ShardSpec.open(path), threads=THREADS, round_block_sums=rounded, llama_acts=False
            )
            chain = Chain([rt])
            c = compare_chain(ref, chain, PROMPT, decode_steps=4, max_tokens=64)
            gaps.append(c.relative_diff)
    finally:
        ref.close()
    print("Q4_1 gap to llama.cpp, float sums / rounded sums:", gaps)
    assert gaps[1] < gaps[0] / 2 and gaps[1] <= REL_BOUND, gaps
