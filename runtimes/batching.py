"""Continuous batching for one loaded shard: steps queued together run as one forward.

A stage's worker thread runs one call at a time. While it runs, the steps that arrive for the
shard (other sessions' decode tokens, prompt chunks) wait in a queue; when it frees, all that
are waiting join the next call, up to a row budget and at most one step per session (a
session's steps must run in order, each after the last). Sessions join and leave between
calls; nothing about one session's step depends on which others share its call.

A batch holds steps of one size (as many rows each: decode steps together, equal prompt
chunks together), which onnx_batch.py needs to give each session the same arithmetic as
alone. A batch is checked step by step before it runs, so one bad step (a closed session, wrong
inputs) fails alone; if the engine fails on the whole batch, each step is retried alone, so a
step that breaks the engine fails only itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .base import Runtime, Session, Step, load_runtime
from .errors import ModelError
from .shards import ShardSpec

__all__ = ["AsyncShard", "Batcher", "Pending", "run_batch", "BATCH_ROWS", "BATCH_AREA"]

log = logging.getLogger(__name__)

# Rows of one batched call: enough for 16 decode streams beside a prompt chunk, few enough that
# a long prompt chunk does not hold everyone else's token for long.
BATCH_ROWS = 512
# The longest a worker waits for the sessions of its last decode batch (Batcher); a lone
# session never waits (it is the whole batch). Measured with 16 Gemma streams on this 2-core
# machine: 4 ms / 2 ms gave 101 tok/s on 3 peers, 6 ms / 3 ms 108-114.
GATHER_MAX = 0.006
# ... and it stops waiting once no step has arrived for this long: the rest of a burst of steps
# (one upstream batch's outputs, a coordinator's replies) comes within it; a session that is
# still elsewhere on the route is not worth more.
GATHER_GAP = 0.003
# Rows x keys of one batched call: the batch's attention scores and masks are that large (per
# head), and a batch's keys are all its sessions' caches. 4 Mi entries: 16 MiB per mask, about
# what one session's 512-row chunk over a 2k context takes alone (a first step always runs).
BATCH_AREA = 1 << 22


@dataclass
class Pending:
    """One queued step and the future its caller awaits."""

    session: Session
    inputs: Any
    all_logits: bool
    future: asyncio.Future[npt.NDArray[np.float32]]
    rows: int = field(default=1)


def run_batch(runtime: Runtime, pending: list[Pending]) -> list[Any]:
    """On the shard's worker thread: one output or exception per pending step, in order."""
    results: list[Any] = [None] * len(pending)
    steps: list[Step] = []
    where: list[int] = []
    for i, p in enumerate(pending):
        try:
            steps.append(runtime.check_step(p.session, p.inputs, p.all_logits))
            where.append(i)
        except Exception as exc:  # this step's own error: the others still run
            results[i] = exc
    if not steps:
        return results
    outs: list[Any] = []
    if runtime.batches and len(steps) > 1:
        try:
            outs = list(runtime.forward_steps(steps))
        except Exception as exc:
            log.warning("a batch of %d steps failed (%s); running each alone", len(steps), exc)
    if not outs:  # an engine without a batched path, one step, or a failed batch
        for st in steps:
            try:
                outs.append(runtime.forward_steps([st])[0])
            except Exception as one:
                outs.append(one)
    for i, out in zip(where, outs, strict=True):
        results[i] = out
    return results


class Batcher:
    """The queue in front of one shard's worker; ``call`` runs a blocking function there.

    ``gather_max`` / ``gather_gap``: before a decode batch, the worker waits for the sessions
    of the previous decode batch that have not sent their next step yet: ``gather_max`` at
    most, and no longer than ``gather_gap`` after the last step that arrived (or after the
    wait began). Their next steps do not
    arrive together: each token goes back to its coordinator, which streams it, checks its
    stops and sends the next step, one session after another (over the network, one message
    each). Without the wait the worker starts on the first to arrive and the rest wait for the
    next call, so one group of sessions runs as several small batches, each paying for every
    weight again (measured: 16 Gemma streams ran in batches of 2-4 on a 3-stage route). A
    session that does not come back in time is not waited for again until it runs again.

    The price: on a route whose sessions travel as several groups (each at another stage), a
    stage waits up to ``gather_gap`` for a group that is elsewhere before it runs the one it
    has. Measured on one 2-core machine (three peers sharing its cores), the groups merge
    and the route gains (86 -> 108 tok/s for 16 streams); stages on machines of their own
    lose at most ``gather_gap`` a batch.
    """

    def __init__(
        self,
        runtime: Runtime,
        call: Callable[..., Any],
        *,
        max_rows: int = BATCH_ROWS,
        max_area: int = BATCH_AREA,
        gather_max: float = GATHER_MAX,
        gather_gap: float = GATHER_GAP,
    ) -> None:
        self._runtime = runtime
        self._call = call
        self._max_rows = max(1, int(max_rows))
        self._max_area = max(1, int(max_area))
        self._gather_max = max(0.0, float(gather_max))
        self._gather_gap = max(0.0, float(gather_gap))
        self._queue: list[Pending] = []
        self._worker: asyncio.Task[None] | None = None
        self._expected: set[int] = set()  # sessions of the last decode batch
        self._arrival: asyncio.Future[None] | None = None  # wakes a gathering worker
        self._arrived_at = 0.0  # when the last step was queued
        self._batches = 0
        self._batched_steps = 0
        self._largest = 0
        self._waits = 0
        self._wait_s = 0.0

    @property
    def stats(self) -> dict[str, int]:
        """Calls run, the steps they ran (steps / calls = the mean batch size), the largest;
        how often the worker waited for a batch's missing sessions, and for how long."""
        return {
            "batches": self._batches,
            "steps": self._batched_steps,
            "largest": self._largest,
            "gather_waits": self._waits,
            "gather_ms": round(self._wait_s * 1000),
        }

    async def forward(
        self, session: Session, inputs: Any, all_logits: bool
    ) -> npt.NDArray[np.float32]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[npt.NDArray[np.float32]] = loop.create_future()
        rows = int(np.shape(inputs)[0]) if np.ndim(inputs) else 1
        self._queue.append(Pending(session, inputs, all_logits, fut, rows))
        self._arrived_at = loop.time()
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await fut

    def forget(self, session: Session) -> None:
        """A closed session is not waited for."""
        self._expected.discard(session.id)

    def _missing(self) -> set[int]:
        queued = {p.session.id for p in self._queue if not p.future.done()}
        return self._expected - queued

    async def _gather(self) -> None:
        """Wait (briefly, see the class) for the last decode batch's sessions to be queued."""
        live = [p for p in self._queue if not p.future.done()]
        if not live or live[0].rows != 1 or not self._missing():
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + self._gather_max
        self._waits += 1
        try:
            while self._missing():
                now = loop.time()
                # the gap runs from the last arrival, or from the wait's start when the
                # queued steps arrived while the last batch ran
                quiet_until = max(start, self._arrived_at) + self._gather_gap
                left = min(end, quiet_until) - now
                if left <= 0:
                    self._expected -= self._missing()
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._arrival = fut
                timer = loop.call_later(left, _settle, fut)
                try:
                    await fut
                finally:
                    timer.cancel()
                    self._arrival = None
        finally:
            self._wait_s += loop.time() - start

    def _take(self) -> list[Pending]:
        """The next batch: the oldest step of each session, oldest first, of the oldest step's
        size, within the budgets (rows, and rows x keys); the first always runs."""
        batch: list[Pending] = []
        rest: list[Pending] = []
        seen: set[int] = set()
        rows = keys = 0
        for p in self._queue:
            if p.future.done():  # its caller gave up before it ran: never run it
                continue
            # n_past is settled: no step runs while the next batch is chosen
            k = keys + p.session.n_past + p.rows
            fits = not batch or (
                p.rows == batch[0].rows
                and rows + p.rows <= self._max_rows
                and (rows + p.rows) * k <= self._max_area
            )
            if p.session.id in seen or not fits:
                seen.add(p.session.id)  # a later step of this session waits for this one
                rest.append(p)
                continue
            seen.add(p.session.id)
            batch.append(p)
            rows, keys = rows + p.rows, k
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        while self._queue:
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self._call(run_batch, self._runtime, batch)
            except BaseException as exc:  # the shard closed under us, or we were cancelled
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(
                            exc if isinstance(exc, Exception) else asyncio.CancelledError()
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            if batch[0].rows == 1:
                self._expected = {p.session.id for p in batch}
            self._batches += 1
            self._batched_steps += len(batch)
            self._largest = max(self._largest, len(batch))
            for p, r in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)

    def fail_all(self, exc: Exception) -> None:
        """The shard is closing: every queued step fails with ``exc``."""
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(exc)
        self._queue.clear()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncShard:
    """A loaded shard whose blocking calls run on its own single worker thread.

    ``prefill_delay``: fault injection, off by default (0): seconds every multi-row forward
    (a prompt chunk) waits before it runs, so a fault test can kill or stop a stage in its
    prefill. It reaches :meth:`load` as a runtime option (tests/fixtures/fault_node.py sets
    it); never from the command line or the environment.
    """

    def __init__(
        self,
        runtime: Runtime,
        executor: ThreadPoolExecutor,
        *,
        prefill_delay: float = 0.0,
        batch_rows: int = BATCH_ROWS,
        batch_area: int = BATCH_AREA,
        **gather: float,
    ) -> None:
        self.runtime = runtime
        self._executor = executor
        self._closed = False
        self._prefill_delay = max(0.0, float(prefill_delay))
        self._batcher = Batcher(
            runtime, self._call, max_rows=batch_rows, max_area=batch_area, **gather
        )

    @property
    def batching(self) -> dict[str, int]:
        """Batched calls run so far and the steps they held."""
        return self._batcher.stats

    @classmethod
    async def load(
        cls, name: str, shard: ShardSpec, *, prefill_delay: float = 0.0, **options: Any
    ) -> AsyncShard:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rt-{name}")
        loop = asyncio.get_running_loop()
        try:
            rt = await loop.run_in_executor(executor, lambda: load_runtime(name, shard, **options))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(rt, executor, prefill_delay=prefill_delay)

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise ModelError("shard is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def open_session(self, max_tokens: int = 2048) -> Session:
        s: Session = await self._call(self.runtime.open_session, max_tokens)
        return s

    async def close_session(self, session: Session) -> None:
        self._batcher.forget(session)
        await self._call(self.runtime.close_session, session)

    async def forward(
        self, session: Session, inputs: npt.ArrayLike, *, all_logits: bool = False
    ) -> npt.NDArray[np.float32]:
        delay = self._prefill_delay
        if delay and np.shape(inputs)[0] > 1:  # several rows: a prompt chunk, not one token
            log.warning("fault injection: prefill held for %.1f s", delay)
            await asyncio.sleep(delay)  # fault injection only: a window for a fault to land
        return await self._batcher.forward(session, inputs, all_logits)

    async def truncate(self, session: Session, n_past: int) -> None:
        """Roll the session back (speculative decoding). A stage rolls back only between a
        session's steps, so none of its steps is queued meanwhile."""
        await self._call(self.runtime.truncate, session, n_past)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._batcher.fail_all(ModelError("shard is closed"))
        self._closed = True  # steps sent from now on fail at once (see _call)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.runtime.close)
        self._executor.shutdown(wait=True)
