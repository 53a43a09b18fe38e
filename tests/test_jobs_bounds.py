"""What a worker runs for its peers, and what a coordinator takes from their replies.

Before: one peer could start 64 sandboxed job tasks on a worker at once (the link's cap on
calls in flight; each child may use 1 GiB), and a task reply whose counters were not counts
(``"tokens": "x"``) ended the whole job with a ValueError instead of the task being redone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.jobs.sandbox import JobError
from mesh.jobs.service import MAX_QUEUED, PER_PEER, JobService, TaskSlots, check_counters
from mesh.net.rpc import Reply

pytestmark = pytest.mark.badinput


async def test_a_peer_runs_its_share_queues_a_few_more_and_is_refused_beyond() -> None:
    slots = TaskSlots(running=3)
    entered, release = asyncio.Queue[str](), asyncio.Event()

    async def task(peer: str) -> None:
        async with slots.slot(peer):
            await entered.put(peer)
            await release.wait()

    mine = [asyncio.create_task(task("a")) for _ in range(MAX_QUEUED)]
    other = asyncio.create_task(task("b"))
    for _ in range(PER_PEER + 1):
        await asyncio.wait_for(entered.get(), 5)
    assert entered.empty()  # a's others wait for a's own slots, b got the third
    assert slots.in_flight("a") == MAX_QUEUED
    with pytest.raises(JobError, match="here already"):
        async with slots.slot("a"):
            pass  # pragma: no cover (refused before)
    release.set()
    await asyncio.wait_for(asyncio.gather(*mine, other), 5)
    assert slots.in_flight("a") == slots.in_flight("b") == 0
    assert not slots._by_peer  # nothing kept for peers with no task here


async def test_a_worker_holds_a_peers_tasks_to_its_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``rpc_job_task`` itself, with the task's work held: of a peer's calls, PER_PEER run,
    the next queue and the rest are refused at once; the running count never passes the
    node's bound."""
    running, peak, hold = [0], [0], asyncio.Event()
    by_peer: dict[str, int] = {}
    peak_by_peer: dict[str, int] = {}

    async def held(self: JobService, model: str, params: dict[str, Any]) -> Reply:
        peer = params["peer"]
        running[0] += 1
        by_peer[peer] = by_peer.get(peer, 0) + 1
        peak[0] = max(peak[0], running[0])
        peak_by_peer[peer] = max(peak_by_peer.get(peer, 0), by_peer[peer])
        await hold.wait()
        running[0] -= 1
        by_peer[peer] -= 1
        return Reply({})

    monkeypatch.setattr(JobService, "_job_task", held)
    jobs = object.__new__(JobService)
    jobs.capable, jobs.slots = True, TaskSlots(running=3)

    class Ctx:
        def __init__(self, peer: str) -> None:
            self.peer_id = peer

    peers = ["hostile"] * 20 + ["x", "y", "z"]
    calls = [
        asyncio.create_task(jobs.rpc_job_task(Ctx(p), {"model": "ab" * 32, "peer": p}, b""))  # type: ignore[arg-type]
        for p in peers
    ]
    await asyncio.sleep(0.05)
    refused = [c for c in calls if c.done() and isinstance(c.exception(), JobError)]
    assert len(refused) == 20 - MAX_QUEUED
    assert peak[0] <= 3 and peak_by_peer["hostile"] <= PER_PEER
    hold.set()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(d, Reply) for d in done) == MAX_QUEUED + 3
    assert peak[0] == 3 and peak_by_peer["hostile"] == PER_PEER


@pytest.mark.parametrize(
    "result",
    [{"tokens": "x"}, {"records": None}, {"pulled_bytes": -1}, {"shard_bytes": 2**60},
     {"records": True}, {"model_bytes": 1.5}],
)  # fmt: skip
def test_a_task_reply_s_counters_must_be_counts(result: dict[str, Any]) -> None:
    with pytest.raises(JobError, match="not a count"):
        check_counters(result)
    check_counters({"tokens": 5, "records": 0, "pulled_bytes": 2**40})
