"""Every weight type on every architecture: the onnx runtime against llama.cpp on one GGUF.

Each model has all its matrices in one type (``testmodels.uniform_spec``; vectors F32) and is
split into two shard blobs through the ShardStore, as a mesh would; the rule is
test_runtime_onnx's: max |logit difference| <= 4% of llama.cpp's logit range over the prompt
and 8 decode steps, and the same argmax wherever llama.cpp's top-2 margin exceeds 0.25.
Measured: 0.3-3.6% (F16/BF16 0.02-0.2%), all of it how each side rounds activations to int8
(llama.cpp per 256 values for K-quant and IQ matrices, onnxruntime per 16 or 32); the types
with per-block mins are the 2-3.6% ones, 0.7-2.1% with GraphOptions.round_block_sums. Over
seeds 0-2 of the generator (207 models) one decided position disagreed (see KNOWN).

The rows for qwen3, gemma2, phi3, qwen3moe (all experts used, see SPEC_CHANGES) and llama3
(the llama arch with rope_freqs) measure 0.03-3.3% at seed 0 where they pass, again mostly
activation rounding; KNOWN lists the four that break the rule (qwen3, phi3 and qwen3moe on
Q4_K, llama3 on IQ4_XS), each measured against float32 activations too.
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
# Known, measured disagreements (seed 0 of the generator); strict, so that a change shows.
KNOWN = {
    # Prompt position 11: llama.cpp's top-2 margin is 0.251, and onnx ranks the pair the
    # other way by 0.10 with int8 activations and by 0.05 with float32 ones, so the flip is
    # llama.cpp's rounding (IQ4_XS dot products take activations in int8 per 256 values).
    ("qwen2", Q.IQ4_XS): "llama.cpp margin 0.251 at a position onnx's float32 path also flips",
    # Position 7: llama.cpp's margin 0.285; onnx ranks the pair -0.012 with int8 activations,
    # +0.123 with float32 ones: the same IQ4_XS rounding as qwen2's.
    ("llama3", Q.IQ4_XS): "llama.cpp margin 0.285, onnx -0.012 (int8) / +0.123 (float32)",
    # Q4_K's generated blocks have uncentred random mins (testmodels._random_k_quant), the
    # case where rounding activations to int8 costs most (see GraphOptions.round_block_sums):
    # float32 activations (accuracy_level=0) measure 2.03% and 0.67%, rounded block sums
    # 1.80% and 0.84%, with every decided position agreeing.
    ("qwen3", Q.Q4_K): "4.12% of the range with int8 activations (0-level: 2.03%)",
    ("phi3", Q.Q4_K): "position 5 flips (llama.cpp margin 1.160, onnx -0.081; float32 1.175)",
    # With every expert used there is no routing left to flip (below): what remains is the
    # Q4_K rounding above, two decided positions flip (3.30%).
    ("qwen3moe", Q.Q4_K): "Q4_K's int8-activation rounding, as qwen3/phi3 (3.30%, 2 flips)",
}
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
    """test_runtime_onnx's llama.cpp settings (float32 KV cache, all logits), one thread."""
    return LlamaCppRuntime(
        ShardSpec.open(path), n_ctx=64, logits_all=True, kv_f32=True, threads=threads
    )


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
    spec = uniform_spec(arch, qtype, **SPEC_CHANGES.get(arch, {}))  # type: ignore[arg-type]
    path = write_test_model(tmp_path / "m.gguf", spec)
    store = ShardStore(tmp_path / "store")
    manifest = store.add_model(path)
    n = len(manifest.units)
    chain = Chain(
        [
            OnnxRuntime(store.open_range(manifest, 0, n // 2), threads=THREADS),
            OnnxRuntime(store.open_range(manifest, n // 2, n), threads=THREADS),
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
            rt = OnnxRuntime(ShardSpec.open(path), threads=THREADS, round_block_sums=rounded)
            chain = Chain([rt])
            c = compare_chain(ref, chain, PROMPT, decode_steps=4, max_tokens=64)
            gaps.append(c.relative_diff)
    finally:
        ref.close()
    print("Q4_1 gap to llama.cpp, float sums / rounded sums:", gaps)
    assert gaps[1] < gaps[0] / 2 and gaps[1] <= REL_BOUND, gaps
