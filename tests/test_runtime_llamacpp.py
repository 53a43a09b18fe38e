"""The llama.cpp runtime: whole models only, sessions take turns on one context."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

importlib.import_module("llama_cpp")

from runtimes.errors import ModelError  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402
from runtimes.testmodels import write_test_model  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("lc") / "llama.gguf", "llama")


def test_rejects_partial_shard(model: Path) -> None:
    with pytest.raises(ModelError, match="whole models"):
        LlamaCppRuntime(ShardSpec.open(model, 0, 2))


def test_sessions_interleave(model: Path) -> None:
    rt = LlamaCppRuntime(ShardSpec.open(model), n_ctx=64, threads=2)
    a = rt.open_session(32)
    b = rt.open_session(32)
    la = rt.forward(a, [1, 5, 9])
    lb = rt.forward(b, [1, 7])
    la2 = rt.forward(a, [11])  # switching back replays a's history
    lb2 = rt.forward(b, [11])
    assert la.shape == (1, rt.config.vocab_size)
    fresh = rt.open_session(32)
    np.testing.assert_allclose(rt.forward(fresh, [1, 5, 9, 11]), la2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(la2, lb2)
    assert not np.allclose(la, lb)
    with pytest.raises(ModelError, match="logits_all"):
        rt.forward(a, [3], all_logits=True)
    rt.close()


def test_duplicate_tokens_refused_not_aborted(tmp_path: Path) -> None:
    """llama.cpp would abort the process (GGML_ASSERT) on this file."""
    import gguf

    from runtimes.gguf_io import open_gguf

    src = open_gguf(write_test_model(tmp_path / "src.gguf", "llama"))
    w = gguf.GGUFWriter(str(tmp_path / "dup.gguf"), "llama")
    for kv in src.raw:
        if kv.key == "general.architecture":
            continue
        val = kv.value
        if kv.key == "tokenizer.ggml.tokens":
            val = [*val[:-1], val[0]]  # the last token repeats the first
        elif kv.vtype == gguf.GGUFValueType.ARRAY and kv.sub_type != gguf.GGUFValueType.STRING:
            val = val.tolist()
        w.add_key_value(kv.key, val, kv.vtype, sub_type=kv.sub_type)
    for t in src.tensors.values():
        raw = None if t.qtype.name in ("F32", "F16") else t.qtype
        w.add_tensor(t.name, t.data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="twice"):
        LlamaCppRuntime(ShardSpec.open(tmp_path / "dup.gguf"))
