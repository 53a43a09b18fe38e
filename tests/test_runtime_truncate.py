"""KV rollback (``Runtime.truncate``), the runtime half of speculative decoding: a session that
ran draft positions and rolled them back continues exactly as one that never ran them.

Every runtime runs a prompt, then a chunk of "draft" tokens, rolls back to keep only the
first ``keep`` of them, and continues; a fresh session runs the prompt, the kept drafts (the
same chunk split the same way is not needed: attention is causal) and the continuation. The
outputs agree (bit for bit where the engine's arithmetic does not depend on the chunk's
rows); the control: the same continuation without the rollback gives other outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from runtimes.base import Runtime, load_runtime
from runtimes.errors import SessionError
from runtimes.fake import ROLLBACK_WINDOW, fake_config, fake_shard
from runtimes.shards import ShardSpec
from runtimes.testmodels import write_test_model

PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7]
DRAFTS = [12, 30, 7, 7, 99]  # the verify step: 5 positions, of which KEEP stay
KEEP = 2
NEXT = [41, 42, 43]  # what the generation feeds after the rollback (one by one)


def _run(rt: Runtime, rollback: bool) -> np.ndarray:
    s = rt.open_session(64)
    rt.forward(s, PROMPT)
    if rollback:
        rt.forward(s, DRAFTS, all_logits=True)
        rt.truncate(s, len(PROMPT) + KEEP)
        assert s.n_past == len(PROMPT) + KEEP
    else:  # the session that never saw the rejected drafts
        rt.forward(s, DRAFTS[:KEEP], all_logits=True)
    outs = [rt.forward(s, [t]) for t in NEXT]
    rt.close_session(s)
    return np.concatenate(outs)


def _check(rt: Runtime, exact: bool) -> None:
    rolled, fresh = _run(rt, True), _run(rt, False)
    if exact:
        np.testing.assert_array_equal(rolled, fresh)
    else:
        np.testing.assert_allclose(rolled, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())
    # control: without the rollback the cache still holds the rejected drafts
    s = rt.open_session(64)
    rt.forward(s, PROMPT)
    rt.forward(s, DRAFTS, all_logits=True)
    stale = np.concatenate([rt.forward(s, [t]) for t in NEXT])
    assert np.abs(stale - fresh).max() > 1e-3 * np.abs(fresh).max()


def test_fake_rollback_is_exact() -> None:
    rt = load_runtime("fake", fake_shard(0, 4, fake_config(vocab_size=256)))
    _check(rt, exact=True)


def test_fake_rollback_bounds() -> None:
    rt = load_runtime("fake", fake_shard(0, 4, fake_config(vocab_size=256)))
    s = rt.open_session(512)
    rt.forward(s, [i % 200 for i in range(ROLLBACK_WINDOW + 5)])
    with pytest.raises(SessionError):
        rt.truncate(s, 2)  # older than the window
    with pytest.raises(SessionError):
        rt.truncate(s, s.n_past + 1)  # forward, not back
    rt.truncate(s, s.n_past - 3)
    assert s.n_past == ROLLBACK_WINDOW + 2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("truncate")
    return {a: write_test_model(d / f"{a}.gguf", a) for a in ("llama", "gemma3")}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("split", [False, True])
def test_onnx_rollback(models: dict[str, Path], arch: str, split: bool) -> None:
    p = models[arch]
    n = ShardSpec.open(p).config.n_units
    shard = ShardSpec.open(p, 0, n // 2) if split else ShardSpec.open(p)
    if split:  # a first stage: its hidden states are the output
        rt = load_runtime("onnx", shard, threads=2)
        rolled, fresh = _run(rt, True), _run(rt, False)
        np.testing.assert_allclose(rolled, fresh, rtol=1e-4, atol=1e-4)
        return
    _check(load_runtime("onnx", shard, threads=2), exact=False)


@pytest.mark.skipif(importlib.util.find_spec("tinygrad") is None, reason="no tinygrad")
def test_tinygrad_rollback(models: dict[str, Path]) -> None:
    _check(load_runtime("tinygrad", ShardSpec.open(models["llama"])), exact=False)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="no llama.cpp")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_llamacpp_rollback(models: dict[str, Path], arch: str) -> None:
    rt = load_runtime(
        "llamacpp", ShardSpec.open(models[arch]), n_ctx=64, logits_all=True, threads=2
    )
    _check(rt, exact=False)
