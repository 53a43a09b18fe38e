"""The fake runtime and the protocol's async wrapper (one worker thread per shard)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from runtimes.base import get_runtime, load_runtime
from runtimes.batching import AsyncShard
from runtimes.errors import ModelError, RuntimeUnavailableError, SessionError
from runtimes.fake import FakeRuntime, fake_config, fake_shard
from runtimes.oracle import Chain, greedy_continuation


def _chain(cuts: list[int]) -> Chain:
    n = fake_config().n_units
    bounds = [0, *cuts, n]
    return Chain([FakeRuntime(fake_shard(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)])


def test_split_equals_whole() -> None:
    whole = _chain([])
    split = _chain([2, 4])
    prompt = [1, 2, 3, 4, 5]
    a, _ = greedy_continuation(whole, prompt, 12)
    b, _ = greedy_continuation(split, prompt, 12)
    assert a == b and len(set(a)) > 1


def test_deterministic_across_instances() -> None:
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    outs = []
    for _ in range(2):
        rt = FakeRuntime(fake_shard(2, 4))
        s = rt.open_session(16)
        outs.append(rt.forward(s, x))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_history_matters_and_replay_restores() -> None:
    """Blocks depend on cached positions: a fresh session fed the same history (a replay)
    reproduces the output; without it the output differs."""
    rt = FakeRuntime(fake_shard(0, 6))
    s1 = rt.open_session(64)
    rt.forward(s1, [3, 4, 5])
    out1 = rt.forward(s1, [6])
    cold = rt.open_session(64)
    assert not np.allclose(rt.forward(cold, [6]), out1)
    s2 = rt.open_session(64)
    rt.forward(s2, [3])  # replay token by token: same as the batch
    rt.forward(s2, [4, 5])
    np.testing.assert_allclose(rt.forward(s2, [6]), out1, rtol=1e-6)


def test_shapes_and_input_checks() -> None:
    first = FakeRuntime(fake_shard(0, 2))
    last = FakeRuntime(fake_shard(2, 6))
    s = first.open_session(8)
    h = first.forward(s, [1, 2, 3])
    assert h.shape == (3, 16) and h.dtype == np.float32
    t = last.open_session(8)
    assert last.forward(t, h, all_logits=True).shape == (3, 64)
    with pytest.raises(ModelError):
        first.forward(s, np.zeros((2, 16), np.float32))  # first stage takes tokens
    with pytest.raises(ModelError):
        first.forward(s, [64])  # out of vocabulary
    with pytest.raises(ModelError):
        last.forward(t, np.zeros((1, 15), np.float32))
    with pytest.raises(SessionError):
        first.forward(s, list(range(6)))  # past max_tokens
    first.close_session(s)
    with pytest.raises(SessionError):
        first.forward(s, [1])


def test_registry() -> None:
    assert get_runtime("fake") is FakeRuntime
    assert isinstance(load_runtime("fake", fake_shard(0, 6)), FakeRuntime)
    with pytest.raises(RuntimeUnavailableError):
        get_runtime("nope")


async def test_async_shard_runs_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen: set[int] = set()

    class Probe(FakeRuntime):
        def _forward(self, session, inputs, all_logits):  # type: ignore[no-untyped-def]
            seen.add(threading.get_ident())
            return super()._forward(session, inputs, all_logits)

    rt = Probe(fake_shard(0, 6), delay_s=0.05)
    from concurrent.futures import ThreadPoolExecutor

    shard = AsyncShard(rt, ThreadPoolExecutor(max_workers=1))
    s = await shard.open_session(32)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    outs = await asyncio.gather(*(shard.forward(s, [i]) for i in range(1, 4)))
    t.cancel()
    assert all(o.shape == (1, 64) for o in outs)
    assert loop_thread not in seen and len(seen) == 1  # one worker thread, not the loop
    assert ticks >= 10  # the loop kept running during ~150 ms of blocking work
    await shard.close_session(s)
    await shard.aclose()
    with pytest.raises(ModelError):
        await shard.open_session(8)


async def test_async_load() -> None:
    shard = await AsyncShard.load("fake", fake_shard(0, 6))
    s = await shard.open_session(8)
    out = await shard.forward(s, [1, 2], all_logits=True)
    assert out.shape == (2, 64)
    await shard.aclose()
