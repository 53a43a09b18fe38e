"""Continuous batching on a stage: batched steps give each session what it gets alone.

The onnx runtime runs several sessions' steps as one graph call (runtimes/onnx_batch.py); the
batcher in front of a shard (runtimes/batching.py) forms those batches from whatever steps are
queued when the worker frees. Oracle: the same sessions run one by one on the same shards.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from typing import Any

import numpy as np
import pytest

from runtimes.base import Session, Step
from runtimes.batching import AsyncShard, Batcher, run_batch
from runtimes.errors import SessionError
from runtimes.fake import FakeRuntime, fake_shard

ARCHS = ["llama", "gemma3", "qwen3moe", "phi3"]  # plain, sliding window + 2 masks, MoE, fused


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 200, size=k).tolist() for k in (6, 11, 3, 9)]


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    importlib.import_module("onnxruntime")
    from runtimes.onnx_rt import OnnxRuntime
    from runtimes.shards import ShardStore
    from runtimes.testmodels import write_test_model

    d = tmp_path_factory.mktemp("batch")
    out = {}
    for arch in ARCHS:
        store = ShardStore(d / f"store-{arch}")
        m = store.add_model(write_test_model(d / f"{arch}.gguf", arch))
        n = len(m.units)
        out[arch] = [
            OnnxRuntime(store.open_range(m, 0, n // 2), threads=2),
            OnnxRuntime(store.open_range(m, n // 2, n), threads=2),
        ]
    return out


def _alone(rts: list[Any], prompt: list[int], steps: int) -> tuple[list[int], list[Any]]:
    ss = [rt.open_session(64) for rt in rts]
    x, toks, logits = np.asarray(prompt), [], []
    for _ in range(steps):
        lg = rts[1].forward(ss[1], rts[0].forward(ss[0], x))[-1]
        toks.append(int(lg.argmax()))
        logits.append(lg)
        x = np.asarray([toks[-1]])
    for rt, s in zip(rts, ss, strict=True):
        rt.close_session(s)
    return toks, logits


def _batched_step(rts: list[Any], sessions: list[list[Session]], xs: list[Any]) -> list[Any]:
    h = rts[0].forward_steps(
        [rts[0].check_step(s[0], x) for s, x in zip(sessions, xs, strict=True)]
    )
    return rts[1].forward_steps(
        [rts[1].check_step(s[1], y) for s, y in zip(sessions, h, strict=True)]
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_steps_give_each_session_its_own_tokens(chains, arch: str) -> None:
    """Four sessions in one call per step; a fifth joins with its prompt while the others
    decode (a prefill beside decode rows), and one leaves half way. Once every step of a call
    has one row, each session's logits are bit for bit its own alone."""
    rts = chains[arch]
    prompts = _prompts() + [[9, 8, 7, 6, 5]]
    steps = 8
    alone = [_alone(rts, p, steps) for p in prompts]
    sessions = [[rt.open_session(64) for rt in rts] for _ in prompts]
    xs: list[Any] = [np.asarray(p) for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    logits: list[list[Any]] = [[] for _ in prompts]
    for step in range(steps + 3):
        live = [j for j in range(4) if not (j == 2 and step >= 4) and len(got[j]) < steps]
        if 3 <= step and len(got[4]) < steps:
            live.append(4)  # joins at step 3: its prompt rows share a call with decode rows
        if not live:
            break
        outs = _batched_step(rts, [sessions[j] for j in live], [xs[j] for j in live])
        for j, lg in zip(live, outs, strict=True):
            got[j].append(int(lg[-1].argmax()))
            logits[j].append(lg[-1])
            xs[j] = np.asarray([got[j][-1]])
        if step == 4:  # session 2 leaves: closing it disturbs nobody
            for rt, s in zip(rts, sessions[2], strict=True):
                rt.close_session(s)
    for j, (toks, ref_logits) in enumerate(alone):
        n = len(got[j])
        assert n == (4 if j == 2 else steps)
        assert got[j] == toks[:n], (arch, j)
        # these calls mixed step sizes (the batcher never does): right up to the last bits
        for a, b in zip(logits[j], ref_logits, strict=False):
            assert float(np.abs(a - b).max()) <= 0.01 * float(np.ptp(b)), (arch, j)


@pytest.mark.parametrize("arch", ARCHS)
def test_steps_of_one_size_give_each_session_its_alone_logits_bit_for_bit(chains, arch) -> None:
    """As the batcher forms batches: prompts alone (sizes differ), decode steps together.
    A session joins after the others' third step and one leaves after their fifth."""
    rts = chains[arch]
    prompts = _prompts() + [[9, 8, 7, 6, 5]]
    steps = 8
    alone = [_alone(rts, p, steps) for p in prompts]
    sessions = [[rt.open_session(64) for rt in rts] for _ in prompts]
    got: list[list[Any]] = [[] for _ in prompts]
    for j in range(4):
        got[j].append(_batched_step(rts, [sessions[j]], [np.asarray(prompts[j])])[0][-1])
    for step in range(1, steps + 3):
        if step == 3:
            got[4].append(_batched_step(rts, [sessions[4]], [np.asarray(prompts[4])])[0][-1])
        live = [j for j in range(5) if 0 < len(got[j]) < steps and not (j == 2 and step > 5)]
        if not live:
            break
        xs = [np.asarray([int(got[j][-1].argmax())]) for j in live]
        for j, lg in zip(live, _batched_step(rts, [sessions[j] for j in live], xs), strict=True):
            got[j].append(lg[-1])
    for j, (toks, ref_logits) in enumerate(alone):
        assert len(got[j]) == (6 if j == 2 else steps)
        assert [int(g.argmax()) for g in got[j]] == toks[: len(got[j])], (arch, j)
        for step, (a, b) in enumerate(zip(got[j], ref_logits, strict=False)):
            np.testing.assert_array_equal(a, b, err_msg=f"{arch} session {j} step {step}")


def test_a_batch_keeps_every_session_at_its_own_position(chains) -> None:
    """After a batched call, each session continues alone exactly as if never batched."""
    rts = chains["gemma3"]
    a, b = _prompts()[:2]
    ref_a, _ = _alone(rts, a, 3)
    sa = [rt.open_session(64) for rt in rts]
    sb = [rt.open_session(64) for rt in rts]
    first = _batched_step(rts, [sa, sb], [np.asarray(a), np.asarray(b)])
    assert [s.n_past for s in sa] == [len(a)] * 2 and [s.n_past for s in sb] == [len(b)] * 2
    toks = [int(first[0][-1].argmax())]
    for _ in range(2):  # alone now: its cache came back from the batch intact
        toks.append(int(rts[1].forward(sa[1], rts[0].forward(sa[0], [toks[-1]]))[-1].argmax()))
    assert toks == ref_a


class _Gated(FakeRuntime):
    """A fake with a batched path that records every call. While ``gate`` is clear, a call
    sets ``entered`` and waits: the worker is busy, so the steps sent meanwhile queue up."""

    batches = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_batches = False

    def _wait(self, ids: list[int]) -> None:
        self.entered.set()
        self.gate.wait(30)
        self.calls.append(ids)

    def _forward(self, session: Session, inputs: Any, all_logits: bool) -> Any:
        self._wait([session.id])
        return super()._forward(session, inputs, all_logits)

    def _forward_batch(self, steps: Any) -> list[Any]:
        self._wait([st.session.id for st in steps])
        if self.fail_batches:
            raise RuntimeError("engine failure on a batch")
        return [FakeRuntime._forward(self, st.session, st.inputs, st.all_logits) for st in steps]


def _sequential(steps_per_session: list[list[int]]) -> list[list[Any]]:
    rt = FakeRuntime(fake_shard(0, 4))
    out = []
    for toks in steps_per_session:
        s = rt.open_session(64)
        out.append([rt.forward(s, [t]) for t in toks])
    return out


async def _shard(rt: Any, n_sessions: int, **kw: Any) -> tuple[AsyncShard, list[Session]]:
    from concurrent.futures import ThreadPoolExecutor

    shard = AsyncShard(rt, ThreadPoolExecutor(max_workers=1), **kw)
    return shard, [await shard.open_session(64) for _ in range(n_sessions)]


async def _hold(rt: _Gated, shard: AsyncShard, s: Session) -> asyncio.Future[Any]:
    """A step of ``s`` that holds the worker until ``rt.gate`` is set."""
    rt.gate.clear()
    rt.entered.clear()
    fut = asyncio.ensure_future(shard.forward(s, [3]))
    assert await asyncio.to_thread(rt.entered.wait, 30)
    return fut


async def _queue() -> None:
    """Lets the tasks just created put their steps in the queue."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_steps_queued_together_run_as_one_call() -> None:
    rt = _Gated(fake_shard(0, 4))
    shard, sessions = await _shard(rt, 9)
    held = await _hold(rt, shard, sessions[0])
    rest = [asyncio.ensure_future(shard.forward(s, [1 + i])) for i, s in enumerate(sessions[1:])]
    await _queue()
    rt.gate.set()
    outs = [await held] + [await f for f in rest]
    assert rt.calls == [[sessions[0].id], [s.id for s in sessions[1:]]]  # one call for eight
    assert {k: shard.batching[k] for k in ("batches", "steps", "largest")} == {
        "batches": 2,
        "steps": 9,
        "largest": 8,
    }
    ref = _sequential([[3]] + [[1 + i] for i in range(8)])
    for got, want in zip(outs, ref, strict=True):
        np.testing.assert_array_equal(got, want[0])
    await shard.aclose()


def test_run_batch_isolates_a_bad_step_and_an_engine_failure() -> None:
    from runtimes.batching import Pending

    rt = _Gated(fake_shard(0, 4))
    a, b, c = (rt.open_session(64) for _ in range(3))
    rt.close_session(b)
    loop = asyncio.new_event_loop()
    try:

        def pend(s: Session, tok: int) -> Pending:
            return Pending(s, [tok], False, loop.create_future())

        res = run_batch(rt, [pend(a, 1), pend(b, 2), pend(c, 3)])
        assert isinstance(res[1], SessionError) and not isinstance(res[0], BaseException)
        assert rt.calls[-1] == [a.id, c.id] and (a.n_past, c.n_past) == (1, 1)
        # the engine fails on the batch: each step is retried alone and still runs
        rt.fail_batches = True
        res = run_batch(rt, [pend(a, 4), pend(c, 5)])
        assert all(not isinstance(r, BaseException) for r in res)
        assert rt.calls[-3:] == [[a.id, c.id], [a.id], [c.id]] and (a.n_past, c.n_past) == (2, 2)
    finally:
        loop.close()


async def test_a_session_s_steps_keep_their_order_and_a_cancelled_step_never_runs() -> None:
    rt = _Gated(fake_shard(0, 4))
    shard, (holder, s, gone) = await _shard(rt, 3)
    held = await _hold(rt, shard, holder)
    one = asyncio.ensure_future(shard.forward(s, [5]))
    two = asyncio.ensure_future(shard.forward(s, [6]))  # the same session's next step
    dropped = asyncio.ensure_future(shard.forward(gone, [7]))
    await _queue()
    dropped.cancel()  # its caller gave up while it was queued
    rt.gate.set()
    await held
    out1, out2 = await one, await two
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert gone.n_past == 0 and s.n_past == 2
    assert [c for c in rt.calls if s.id in c] == [[s.id], [s.id]]  # two calls, in order
    ref = _sequential([[5, 6]])[0]
    np.testing.assert_array_equal(out1, ref[0])
    np.testing.assert_array_equal(out2, ref[1])
    await shard.aclose()


async def test_a_batch_holds_steps_of_one_size_within_the_row_budget() -> None:
    rt = _Gated(fake_shard(0, 4))
    shard, (holder, long_s, *short) = await _shard(rt, 8, batch_rows=4)
    held = await _hold(rt, shard, holder)
    futs = [asyncio.ensure_future(shard.forward(short[0], [1]))]
    futs.append(asyncio.ensure_future(shard.forward(long_s, list(range(12)))))
    futs += [asyncio.ensure_future(shard.forward(s, [1])) for s in short[1:]]
    await _queue()
    rt.gate.set()
    await held
    for f in futs:
        await f
    ids = [s.id for s in short]
    # one-row steps together, four rows at most; the 12-row chunk alone (over the budget,
    # it runs: a first step always does)
    assert rt.calls[1:] == [ids[:4], [long_s.id], ids[4:]]
    await shard.aclose()


async def test_the_attention_area_bounds_a_batch() -> None:
    """Rows x keys (every session's cache is a key of the batch): long contexts batch less."""
    rt = _Gated(fake_shard(0, 4))
    shard, (holder, *deep) = await _shard(rt, 5, batch_area=3 * 40)
    for s in deep:
        await shard.forward(s, list(range(19)))  # 19 cached positions each
    held = await _hold(rt, shard, holder)
    futs = [asyncio.ensure_future(shard.forward(s, [1])) for s in deep]
    await _queue()
    rt.gate.set()
    await held
    for f in futs:
        await f
    # two steps: 2 rows x 40 keys = 80 fits; a third: 3 x 60 = 180 > 120
    assert rt.calls[-2:] == [[deep[0].id, deep[1].id], [deep[2].id, deep[3].id]]
    await shard.aclose()


async def test_closing_the_shard_fails_queued_steps() -> None:
    rt = _Gated(fake_shard(0, 4))
    shard, (holder, s) = await _shard(rt, 2)
    held = await _hold(rt, shard, holder)
    queued = asyncio.ensure_future(shard.forward(s, [1]))
    await _queue()
    closing = asyncio.ensure_future(shard.aclose())
    await _queue()
    rt.gate.set()
    await closing
    with pytest.raises(Exception, match="closed"):
        await queued
    assert s.n_past == 0
    await asyncio.gather(held, return_exceptions=True)
    with pytest.raises(Exception, match="closed"):
        await shard.forward(s, [1])


def test_step_dataclass_is_what_check_step_returns() -> None:
    rt = FakeRuntime(fake_shard(0, 4))
    s = rt.open_session(8)
    st = rt.check_step(s, [1, 2])
    assert isinstance(st, Step) and st.inputs.dtype == np.int64
    with pytest.raises(SessionError):
        rt.check_step(s, list(range(9)))  # beyond the session's room
    with pytest.raises(SessionError):
        rt.forward_steps([st, st])  # one step per session in a batch
    assert Batcher  # the queue class is public for the stage's status


async def _step_all(shard: AsyncShard, sessions: list[Session], token: int) -> None:
    await asyncio.gather(*(shard.forward(s, [token]) for s in sessions))


async def test_a_decode_batch_waits_for_the_last_batch_s_sessions_that_come_back_late() -> None:
    """A group of sessions sends its next steps one after another (each token goes back to
    its coordinator first): the worker waits for the late ones instead of running the early
    ones alone and the late ones in a call of their own. Without the wait: [early], [late]."""
    rt = _Gated(fake_shard(0, 4))
    shard, sessions = await _shard(rt, 4, gather_max=5.0, gather_gap=5.0)
    held = await _hold(rt, shard, sessions[0])
    first = asyncio.ensure_future(_step_all(shard, sessions[1:], 1))
    await _queue()
    rt.gate.set()
    await held
    await first  # the last decode batch was sessions[1:]
    early = asyncio.ensure_future(_step_all(shard, sessions[1:3], 2))
    await _queue()
    assert rt.calls[-1] == [s.id for s in sessions[1:]]  # nothing ran yet: it waits
    await _step_all(shard, sessions[3:], 2)
    await early
    assert rt.calls[-1] == [s.id for s in sessions[1:]]  # one call for the group again
    assert shard.batching["gather_waits"] >= 1
    await shard.aclose()


async def test_a_lone_session_never_waits_and_a_missing_one_is_waited_for_once() -> None:
    rt = _Gated(fake_shard(0, 4))
    shard, (a, b) = await _shard(rt, 2, gather_max=0.05, gather_gap=0.05)
    for t in range(3):
        await shard.forward(a, [t])
    assert shard.batching["gather_waits"] == 0  # the whole last batch is back each time
    await _step_all(shard, [a, b], 5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await shard.forward(a, [6])  # b does not come back: one wait, bounded by the window
    assert 0.04 <= loop.time() - t0 < 2.0
    waits = shard.batching["gather_waits"]
    await shard.forward(a, [7])  # b is no longer expected
    await shard.forward(a, [8])
    assert shard.batching["gather_waits"] == waits
    await shard.close_session(b)
    await shard.aclose()


async def test_a_closed_session_is_not_waited_for() -> None:
    rt = _Gated(fake_shard(0, 4))
    shard, (a, b) = await _shard(rt, 2, gather_max=30.0, gather_gap=30.0)
    await _step_all(shard, [a, b], 1)
    await shard.close_session(b)
    await asyncio.wait_for(shard.forward(a, [2]), 5)  # would wait 30 s for b
    assert shard.batching["gather_waits"] == 0
    await shard.aclose()
