"""The llama.cpp runtime: whole models only, sessions take turns on one context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

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
