"""Batch jobs over stored datasets: one task per chunk, placed next to its data.

A dataset is a ``jsonl`` object (see :mod:`mesh.storage.store`: chunks end at record boundaries),
one record per line: ``{"x": [float, ...]}``. A model is an object too: an ONNX graph with one
float input of shape ``(batch, d)``; a task runs it on every record of its chunk with
onnxruntime and yields ``{"y": [...], "label": argmax}`` per record. A peer's model is checked
and runs only in a sandboxed child process (:mod:`mesh.jobs.sandbox`).

The coordinator (the node whose API got the job) asks its peers which chunks they hold
(``chunk_has``) and which can compute (``net_info``), then places the tasks with
:func:`scheduler.plan_placement` (``ours``: a capable holder when there is one, else the
nearest capable peer, where "near" includes the egress price of crossing zones; network from
our Vivaldi estimates) or uniformly at random (``random``, the baseline). Each task goes to its
peer as ``job_task``; the peer pulls its chunk from the planned source (verified by hash,
other holders as fallback) unless it holds it, pulls the model once (nearest holder, cached),
and returns its results. The results, in dataset order, become a new object. Every run reports
the bytes it moved, measured where they moved, and how many crossed zones.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mesh.errors import RemoteError, RPCError
from mesh.jobs.sandbox import BadInput, JobError, Limits, ModelRefused, check_model, run_model
from mesh.net.rpc import CallContext, Reply
from mesh.storage.fetch import FetchState, fetch_chunks
from mesh.storage.store import CHUNK_MAX, StoreError, is_id
from scheduler import CostParams, MatrixNetwork, Peer, Task, plan_placement

if TYPE_CHECKING:
    from mesh.net.context import PeerContext
    from mesh.storage.service import ObjectService

__all__ = ["JobService", "JobError", "ModelRefused", "format_results", "POLICIES"]

log = logging.getLogger(__name__)
POLICIES = ("ours", "random")
MAX_RESULT = 8 << 20
MAX_JOB_RESULT = 256 << 20  # all of a job's results, joined here into one object
PER_PEER = 2  # tasks in flight per peer (a worker refuses a peer's next)
MAX_RUNNING = 4  # tasks a worker runs at once for all peers (each a sandboxed child of ~1 GiB)
MAX_QUEUED = 4 * PER_PEER  # tasks of one peer a worker holds, running or waiting
MAX_COUNT = 1 << 53  # a task reply's counters (bytes, records, tokens)
# A task reply's counters: each an int in 0..MAX_COUNT where present, or the reply is refused
# (and the task redone elsewhere) before a total adds it.
COUNTERS = (
    "pulled_bytes", "model_bytes", "model_cross_zone_bytes", "shard_bytes", "records",
    "tokens", "local_records",
)  # fmt: skip
MAX_TRIES = 3
MAX_CHECKED = 256  # model ids remembered as checked (then forgotten, and checked again)


def onnx_available() -> bool:
    # onnx checks a peer's graph before onnxruntime (in the sandbox) may run it
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def task_chunk(params: dict[str, Any]) -> tuple[str, int, list[str]]:
    """A task's chunk (sha, size) and its sources, type-checked (a peer sent them)."""
    sha, size, sources = params.get("sha"), params.get("size"), params.get("sources")
    if not is_id(sha) or type(size) is not int or not 0 < size <= CHUNK_MAX:
        raise JobError("a task needs the chunk's sha and size")
    if (
        not isinstance(sources, list)
        or len(sources) > 64
        or not all(isinstance(s, str) and len(s) < 64 for s in sources)
    ):
        raise JobError("sources must be a list of peer ids")
    return sha, size, sources


def parse_records(data: bytes) -> np.ndarray:
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise JobError("a record is not JSON") from None
        x = rec.get("x") if isinstance(rec, dict) else None
        if not isinstance(x, list) or not x or len(x) > 65536:
            raise JobError("each record needs a non-empty list x")
        rows.append(x)
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    try:
        with np.errstate(over="ignore"):  # checked just below
            out = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise JobError("records must have equal-length numeric x") from None
    if out.ndim != 2:
        raise JobError("each x must be a flat list of numbers")
    if not np.all(np.isfinite(out)):
        raise JobError("record values must be finite float32 numbers (no NaN, inf or 1e300)")
    return out


def format_results(y: np.ndarray, rows: int) -> bytes:
    """One ``{"y": [...], "label": argmax}`` line per record of a model's output."""
    if y.size == 0 or y.size % rows:
        raise JobError(f"the model's output ({y.shape}) does not have one row per record")
    y = y.reshape(rows, -1)
    labels = y.argmax(axis=1)
    lines = [
        json.dumps({"y": [float(v) for v in row], "label": int(lab)})
        for row, lab in zip(y, labels, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class _Run:
    policy: str
    placement: dict[str, int] = field(default_factory=dict)
    local_tasks: int = 0
    bytes_moved: int = 0
    cross_zone_bytes: int = 0
    input_cross_zone_bytes: int = 0
    result_cross_zone_bytes: int = 0
    model_cross_zone_bytes: int = 0
    planned_cross_zone_bytes: int = 0
    retries: int = 0
    seconds: float = 0.0
    records: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


class TaskSlots:
    """The tasks a worker runs for its peers. One peer runs at most ``PER_PEER`` at once
    here (what one of its job runs sends) and may queue up to ``MAX_QUEUED`` in all (two
    runs at once, a retry racing a cancel), refused beyond; all peers together run at most
    ``running`` at once. Without these a peer could start 64 sandboxed children at once
    (the link's cap on calls), tens of GiB."""

    def __init__(self, running: int) -> None:
        self._running = asyncio.Semaphore(running)
        # only peers with a task here (freed at zero): (tasks here, its own semaphore)
        self._by_peer: dict[str, tuple[int, asyncio.Semaphore]] = {}

    def in_flight(self, peer: str) -> int:
        return self._by_peer.get(peer, (0, None))[0]

    @contextlib.asynccontextmanager
    async def slot(self, peer: str) -> AsyncIterator[None]:
        n, own = self._by_peer.get(peer, (0, asyncio.Semaphore(PER_PEER)))
        if n >= MAX_QUEUED:
            raise JobError(f"{MAX_QUEUED} tasks of this peer are here already")
        self._by_peer[peer] = (n + 1, own)
        try:
            async with own, self._running:
                yield
        finally:
            left = self._by_peer[peer][0] - 1
            if left:
                self._by_peer[peer] = (left, own)
            else:
                del self._by_peer[peer]


def check_counters(result: dict[str, Any]) -> None:
    """A task reply's counters are a peer's word: ints in range, or :class:`JobError`."""
    for key in COUNTERS:
        value = result.get(key, 0)
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            raise JobError(f"a task reply's {key} is not a count")


class JobService:
    name = "jobs"  # RPC namespace: peers call "jobs.<method>"

    def status(self) -> dict[str, Any]:
        return {"capable": self.capable, "models_checked": len(self._checked)}

    def __init__(self, node: PeerContext, objects: ObjectService) -> None:
        self.node = node
        self.objects = objects
        self.limits = Limits()
        self._checked: set[str] = set()  # models that passed check_model
        self.capable = objects.config.jobs and onnx_available()
        objects.net.config.compute = self.capable
        self.slots = TaskSlots(max(1, min(MAX_RUNNING, os.cpu_count() or 1)))

    # -- worker side -----------------------------------------------------------------------
    async def _model(self, model: str) -> tuple[int, FetchState]:
        """Fetch a job's model (nearest holder; cached, unpinned) and check it once: a
        peer's graph runs only after :func:`check_model` and only in the sandbox."""
        size = (await self.objects.manifest_of(model)).size
        if size > self.limits.max_model:  # from its manifest: before a chunk is pulled
            raise ModelRefused(f"model of {size} bytes is over {self.limits.max_model}")
        state = await self.objects.fetch(model)
        m = self.objects.store.manifest(model)
        if m is None:
            raise JobError(f"model {model[:12]} vanished from the store")
        if model not in self._checked:
            store = self.objects.store
            with store.hold(model):
                data = await asyncio.to_thread(lambda: b"".join(store.iter_object(model)))
            try:
                await asyncio.to_thread(check_model, data)
            except ModelRefused as exc:
                log.warning("refused job model %s: %s", model[:12], exc)
                raise
            if len(self._checked) >= MAX_CHECKED:
                self._checked.clear()
            self._checked.add(model)
        return m.size, state

    async def _run_task(self, model: str, size: int, data: bytes) -> bytes:
        x = await asyncio.to_thread(parse_records, data)
        if not len(x):
            return b""
        store = self.objects.store
        store.acquire(model)  # not collected while the child reads it
        try:
            y = await run_model(store.iter_object(model), size, x, self.limits)
        finally:
            store.release(model)
        return await asyncio.to_thread(format_results, y, len(x))

    async def pull_chunk(self, sha: str, size: int, sources: list[str]) -> tuple[bytes, str | None]:
        """A task's chunk: ours when we hold it, else pulled from the planned source (the
        first of ``sources``; the rest only if it fails), verified by hash and accounted.
        Returns the bytes and the peer they came from (None: held here)."""
        if self.objects.store.has_chunk(sha):
            return await asyncio.to_thread(self.objects.store.read_chunk, sha), None
        me = self.node.me
        got: dict[str, bytes] = {}

        async def sink(i: int, chunk: bytes, src: str) -> None:
            got["data"], got["src"] = chunk, src.encode()

        state = FetchState(sha, size, chunks_total=1)
        order = [s for s in sources if s != me]
        if not order:
            raise JobError(f"no peer to pull chunk {sha[:12]} from")
        # The planned source first: the planner chose it; the rest only if it fails.
        await fetch_chunks(
            self.node,
            [(sha, size)],
            [0],
            order,
            lambda s, n: 0.0 if s == order[0] else self.objects.net.cost_ms(s, n) + 1e6,
            sink,
            state,
            penalize=self.objects.net.penalize,
            per_source=1,
            near_factor=1.0,
            near_slack_ms=0.0,
            read=self.objects.read_chunk_from,
        )
        data, pulled_from = got["data"], got["src"].decode()
        self.objects.net.account(pulled_from, me, len(data), "job-input")
        return data, pulled_from

    async def rpc_job_task(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        if not self.capable:
            raise JobError("this node runs no batch tasks")
        model = params.get("model")
        if not is_id(model):
            raise JobError("job_task needs model, sha and size")
        async with self.slots.slot(ctx.peer_id):
            return await self._job_task(model, params)

    async def _job_task(self, model: str, params: dict[str, Any]) -> Reply:
        sha, size, sources = task_chunk(params)
        model_size, model_state = await self._model(model)
        me = self.node.me
        data, pulled_from = await self.pull_chunk(sha, size, sources)
        out = await self._run_task(model, model_size, data)
        if len(out) > MAX_RESULT:
            raise JobError("task result too large")
        net = self.objects.net
        model_cross = sum(
            n for s, n in model_state.sources.items() if net.zone_of(s) != net.zone_of(me)
        )
        return Reply(
            {
                "pulled_from": pulled_from,
                "pulled_bytes": len(data) if pulled_from else 0,
                "cross_zone": bool(pulled_from and net.zone_of(pulled_from) != net.zone_of(me)),
                "model_bytes": sum(model_state.sources.values()),
                "model_cross_zone_bytes": model_cross,
                "records": out.count(b"\n"),
            },
            out,
        )

    # -- coordinator side ------------------------------------------------------------------
    async def run_job(
        self, model: str, input_id: str, policies: list[str], seed: int = 0
    ) -> dict[str, Any]:
        if not is_id(model) or not is_id(input_id):
            raise JobError("model and input must be object ids")
        if not policies or any(p not in POLICIES for p in policies):
            raise JobError(f"policies must be among {POLICIES}")
        objs = self.objects
        m, chunk_holders = await self.dataset(input_id, "input")
        runs, results = [], []
        for policy in policies:
            run, data = await self._run(policy, model, m.chunks, chunk_holders, seed)
            runs.append(run.as_dict())
            results.append(data)
        result = await objs.put_bytes(results[0], name=f"job-{input_id[:12]}", fmt="jsonl")
        for summary in runs:
            log.info(
                "job %s policy %s: %d cross-zone bytes, %d moved, placement %s",
                result.id[:12],
                summary["policy"],
                summary["cross_zone_bytes"],
                summary["bytes_moved"],
                {p[:8]: n for p, n in summary["placement"].items()},
            )
        return {
            "id": result.id,
            "model": model,
            "input": input_id,
            "tasks": len(m.chunks),
            "records": runs[0]["records"],
            "policies": runs,
            "same_results": all(r == results[0] for r in results),
        }

    async def dataset(self, input_id: str, what: str) -> tuple[Any, list[set[str]]]:
        """A job's jsonl dataset (``what``: how the error names it): its manifest and the live
        holders of each chunk; JobError unless every chunk has one."""
        objs = self.objects
        m = await objs.get_manifest(input_id, await objs.find_holders(input_id))
        if m.format != "jsonl":
            raise JobError(f"the {what} must be a jsonl dataset (edgemesh put --format jsonl)")
        holders = await self.chunk_holders(m.shas)
        for i, hs in enumerate(holders):
            if not hs:
                raise JobError(f"no live peer holds chunk {i} of {input_id[:12]}")
        return m, holders

    async def chunk_holders(self, shas: list[str]) -> list[set[str]]:
        out: list[set[str]] = [set() for _ in shas]
        me = self.node.me

        async def ask(peer: str) -> None:
            try:
                reply = await self.node.call(peer, "storage.chunk_has", {"shas": shas}, timeout=10)
            except RPCError:
                return
            has = set(reply.result.get("has", []))
            for i, s in enumerate(shas):
                if s in has:
                    out[i].add(peer)

        await asyncio.gather(*(ask(p) for p in [me, *self.node.connected_peer_ids()]))
        return out

    def capable_peers(self) -> list[str]:
        net = self.objects.net
        peers = [
            p
            for p in self.node.connected_peer_ids()
            if (info := net.peers.get(p)) is not None and info.compute
        ]
        return ([self.node.me] if self.capable else []) + sorted(peers)

    def _plan(
        self, policy: str, chunks: tuple[tuple[str, int], ...], holders: list[set[str]], seed: int
    ) -> list[tuple[str, list[str]]]:
        """Per task: the peer that runs it and its sources (planned first)."""
        net = self.objects.net
        capable = self.capable_peers()
        if not capable:
            raise JobError("no capable peer is connected")
        everyone = sorted(set(capable) | set().union(*holders))

        def sources_for(peer: str, hs: set[str]) -> list[str]:
            return sorted(hs, key=lambda h: net.cost_ms(h, CHUNK_MAX, dst=peer))

        if policy == "random":
            rng = random.Random(seed)
            out = []
            for hs in holders:
                peer = rng.choice(capable)
                out.append((peer, sources_for(peer, hs)))
            return out
        speed = {
            p: (net.config.speed if p == self.node.me else net.peers[p].speed) for p in capable
        }
        peers = [
            Peer(
                p, net.zone_of(p), 1 << 40, speed.get(p, 0.0), egress_price=net.egress_of(p) / 1e9
            )  # per byte, as CostParams expects
            for p in everyone
        ]
        n = len(everyone)
        rtt = np.array([[net.rtt_between(a, b) for b in everyone] for a in everyone])
        network = MatrixNetwork.build(rtt, np.full((n, n), 15e6), np.ones(n), np.full(n, 15e6))
        tasks = [
            Task(str(i), size, frozenset(hs), float(size))
            for i, ((_, size), hs) in enumerate(zip(chunks, holders, strict=True))
        ]
        plan = plan_placement(
            tasks, peers, network, CostParams(locality_weight=net.config.price_weight_ms)
        )
        out = []
        for a, hs in zip(plan, holders, strict=True):
            rest = [h for h in sources_for(a.peer_id, hs) if h != a.source_id]
            out.append((a.peer_id, ([a.source_id] if a.source_id else []) + rest))
        return out

    async def _run(
        self,
        policy: str,
        model: str,
        chunks: tuple[tuple[str, int], ...],
        holders: list[set[str]],
        seed: int,
    ) -> tuple[_Run, bytes]:
        net = self.objects.net
        run = _Run(policy)
        t0 = time.monotonic()
        # Peers connected since the last net_info round count too: learn their zone, price,
        # speed and whether they run jobs before placing anything.
        await net.ensure(self.node.connected_peer_ids())
        plan = self._plan(policy, chunks, holders, seed)
        for i, ((peer, srcs), hs) in enumerate(zip(plan, holders, strict=True)):
            run.placement[peer] = run.placement.get(peer, 0) + 1
            if peer in hs:
                run.local_tasks += 1
            elif srcs and net.zone_of(srcs[0]) != net.zone_of(peer):
                run.planned_cross_zone_bytes += chunks[i][1]
        slots: dict[str, asyncio.Semaphore] = {}
        outputs: list[bytes] = [b""] * len(chunks)
        total = [0]  # result bytes received so far
        model_seen: set[str] = set()

        def nearest(i: int, others: list[str]) -> str:
            return min(
                others,
                key=lambda p: min(
                    (net.cost_ms(h, chunks[i][1], dst=p) for h in holders[i]), default=0
                ),
            )

        async def one(i: int) -> None:
            peer, srcs = plan[i]
            params = {"model": model, "sha": chunks[i][0], "size": chunks[i][1], "sources": srcs}
            peer, reply = await self.call_task(
                i, peer, "jobs.job_task", lambda p: params, slots, run, lambda o: nearest(i, o)
            )
            self._account_task(run, peer, reply, first_task=peer not in model_seen)
            model_seen.add(peer)
            total[0] += len(reply.payload)
            if total[0] > MAX_JOB_RESULT:  # before the results are joined in memory
                raise JobError(f"the job's results are over {MAX_JOB_RESULT} bytes")
            outputs[i] = reply.payload

        await asyncio.gather(*(one(i) for i in range(len(chunks))))
        run.cross_zone_bytes = (
            run.input_cross_zone_bytes + run.result_cross_zone_bytes + run.model_cross_zone_bytes
        )
        run.seconds = time.monotonic() - t0
        return run, b"".join(outputs)

    async def call_task(
        self,
        i: int,
        peer: str,
        method: str,
        params: Callable[[str], dict[str, Any]],
        slots: dict[str, asyncio.Semaphore],
        run: Any,
        next_peer: Callable[[list[str]], str],
        timeout: float = 300,
        check: Callable[[Reply], None] | None = None,
    ) -> tuple[str, Reply]:
        """Task ``i`` (``params(peer)``) on ``peer`` (at most PER_PEER in flight there), or,
        when it fails there (the peer died, its reply failed ``check``), on ``next_peer`` of
        the capable peers not tried yet, up to MAX_TRIES. A :class:`BadInput` error (the
        dataset's fault) is not retried: every peer would refuse it. Returns the peer that
        did it, and its reply."""
        tried: list[str] = []
        while True:
            sem = slots.setdefault(peer, asyncio.Semaphore(PER_PEER))
            try:
                async with sem:
                    reply = await self.node.call(peer, method, params(peer), timeout=timeout)
                check_counters(reply.result)
                if check is not None:
                    check(reply)
                return peer, reply
            except BadInput:
                raise
            except RemoteError as exc:
                if exc.code == BadInput.__name__:
                    raise BadInput(exc.message) from None
                err: Exception = exc
            except (RPCError, StoreError, JobError) as exc:
                err = exc
            tried.append(peer)
            run.retries += 1
            others = [p for p in self.capable_peers() if p not in tried]
            if len(tried) >= MAX_TRIES or not others:
                raise JobError(f"task {i} failed on {[t[:12] for t in tried]}: {err}") from None
            peer = next_peer(others)
            log.info("task %d: retrying on %s (%s)", i, peer[:12], err)

    def _account_task(self, run: _Run, peer: str, reply: Reply, *, first_task: bool) -> None:
        """Add one finished task's bytes (input pull, model pull on a peer's first task,
        result back to us) and records to the run's totals."""
        net, me = self.objects.net, self.node.me
        r = reply.result
        pulled = int(r.get("pulled_bytes", 0))
        src = r.get("pulled_from")
        run.bytes_moved += pulled
        if pulled and isinstance(src, str) and net.zone_of(src) != net.zone_of(peer):
            run.input_cross_zone_bytes += pulled
        if first_task:
            run.bytes_moved += int(r.get("model_bytes", 0))
            run.model_cross_zone_bytes += int(r.get("model_cross_zone_bytes", 0))
        if peer != me:
            run.bytes_moved += len(reply.payload)
            net.account(peer, me, len(reply.payload), "job-result")
            if net.zone_of(peer) != net.zone_of(me):
                run.result_cross_zone_bytes += len(reply.payload)
        run.records += int(r.get("records", 0))
