"""The graph's rounding of activations against llama.cpp's own quantizers (onnx_acts.py).

The oracle is ggml itself: ``quantize_row_q8_K``, ``quantize_row_q8_0`` and
``quantize_row_q8_1`` of the libggml-cpu that llama-cpp-python built (the functions its CPU
matmuls call on the activations), through ctypes.
"""

from __future__ import annotations

import ctypes
import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = importlib.import_module("onnxruntime")
llama_cpp = importlib.import_module("llama_cpp")
gguf = importlib.import_module("gguf")

from onnx import TensorProto, helper  # noqa: E402

from runtimes.gguf_io import TensorRef  # noqa: E402
from runtimes.onnx_graph import OPSET, GraphOptions, _Builder  # noqa: E402
from runtimes.testmodels import random_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ggml() -> Any:
    libdir = Path(llama_cpp.__file__).parent / "lib"
    ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(libdir / "libggml-cpu.so"))
    for fn in ("quantize_row_q8_K", "quantize_row_q8_0", "quantize_row_q8_1"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, fn).restype = None
    return lib


def _ggml_q8(lib: Any, fmt: str, x: np.ndarray[Any, Any]) -> tuple[Any, Any, Any]:
    """(q, d, s) of ggml's quantizer for each row of x: q int [S, nb, block], d float32
    [S, nb] (fp16 ones widened), s the Q8_1 sums (float32) or None."""
    rows, k = x.shape
    block, dt = {
        "q8_K": (256, np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])),
        "q8_0": (32, np.dtype([("d", "<f2"), ("qs", "i1", 32)])),
        "q8_1": (32, np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])),
    }[fmt]
    out = np.zeros((rows, k // block), dt)
    fn = getattr(lib, f"quantize_row_{fmt}")
    for r in range(rows):
        row = np.ascontiguousarray(x[r], np.float32)
        fn(row.ctypes.data, out[r].ctypes.data, k)
    s = out["s"].astype(np.float32) if fmt == "q8_1" else None
    return out["qs"].astype(np.float32), out["d"].astype(np.float32), s


def _run(nodes: list[Any], inits: list[Any], k: int, outs: dict[str, str], x: Any) -> list[Any]:
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", k])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in outs.values()],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    res: list[Any] = sess.run(list(outs.values()), {"x": x})
    return res


def _activations(seed: int, rows: int, k: int) -> Any:
    """Activations with the outliers of real models: per-channel scales over 3 decades."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) * np.exp(1.5 * rng.standard_normal((1, k)))
    x[0, :256] = 0.0  # an all-zero Q8_K block
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", ["q8_K", "q8_0", "q8_1"])
def test_rounding_is_ggmls_bit_for_bit(ggml: Any, fmt: str) -> None:
    k = 1024
    x = _activations(1, 5, k)
    b = _Builder(None, GraphOptions())  # type: ignore[arg-type]
    r = b.acts.rounded("x", k, fmt)  # type: ignore[arg-type]
    outs = {"q": r.q, "d": r.d, "x": b.acts.values(r)}
    if fmt == "q8_1":
        outs["s"] = b.acts.block_sums(r, 32)
    for name in outs:  # graph outputs must not be graph inputs' names: give them their own
        b.nodes.append(helper.make_node("Identity", [outs[name]], [f"out_{name}"]))
        outs[name] = f"out_{name}"
    got = dict(zip(outs, _run(b.nodes, list(b.inits.values()), k, outs, x), strict=True))
    q, d, s = _ggml_q8(ggml, fmt, x)
    # ggml keeps q as int8 and d as stored; the dot products take q * d per block
    np.testing.assert_array_equal(np.abs(got["q"]), np.abs(q))  # Q8_K's sign is -max's
    assert np.array_equal(got["q"] * got["d"], q * d[..., None])
    assert np.array_equal(got["x"], (q * d[..., None]).reshape(x.shape))
    if s is not None:
        np.testing.assert_array_equal(got["s"], s)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.IQ4_XS, Q.Q5_K])
def test_pinned_matmul_is_llama_cpps_dot_product(ggml: Any, qtype: Any) -> None:
    """MatMulNBits on pinned activations, after the correction, is the dot product of
    ggml's rounded x with the exact weights (llama.cpp's integer dot product), where the
    plain int8 path (rounding per 16 or 32 values) is 1000x further off."""
    n, k = 96, 1024
    rng = np.random.default_rng(7)
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(rng, qtype, n * k // per_block, scale=0.02).reshape(n, -1)
    ref = TensorRef("w", qtype, (n, k), raw)
    w = ref.dequantize().astype(np.float64)
    x = _activations(3, 4, k)
    q, d, _ = _ggml_q8(ggml, "q8_K", x)
    exact = (q * d[..., None]).reshape(x.shape).astype(np.float64) @ w.T
    errs = []
    for llama_acts in (True, False):
        b = _Builder(None, GraphOptions(llama_acts=llama_acts))  # type: ignore[arg-type]
        (y,) = b.linear("x", [("w", ref, None)])
        b.nodes.append(helper.make_node("Identity", [y], ["y"]))
        ext = _external(b)
        (got,) = _run(b.nodes, list(b.inits.values()) + ext, k, {"y": "y"}, x)
        errs.append(float(np.abs(got - exact).max() / np.abs(exact).max()))
    assert errs[0] < 2e-5 and errs[1] > 1000 * errs[0], errs


def _external(b: _Builder) -> list[Any]:
    """The builder's external initializers (no sink given) as plain tensors."""
    from onnx import numpy_helper

    out = []
    for name, arr in b.external.items():
        out.append(numpy_helper.from_array(arr, name))
        del b.inits[name]
    return out
