"""A route's set-up before its first token: the first step goes out with the opens (a stage
holds it until its own session is open), and a new route is planned from the peers' views
kept from the last one (asked again in the background when a generation ends)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh.inference.compute import CapacityError
from mesh.inference.early import EarlySteps
from mesh.inference.routes import PeerView
from mesh.inference.run import GenerationRun
from mesh.inference.viewcache import ViewCache
from mesh.net.rpc import CallContext
from tests.test_run_failover import PROMPT, Mesh, clean_run, tiny  # noqa: F401

SID = "ab" * 12


# -- the steps held for their sessions (units) ------------------------------------------------
async def test_a_step_before_its_open_is_held_until_the_open_ends() -> None:
    early = EarlySteps(wait_s=5.0)
    state = {"now": "unknown"}
    held = asyncio.ensure_future(early.until_open(SID, "prev", lambda: state["now"]))  # type: ignore[arg-type, return-value]
    await asyncio.sleep(0)
    assert not held.done() and early.waiting == 1
    state["now"] = "opening"  # the open arrived: it pulls its shard for longer than wait_s
    await asyncio.sleep(0)
    state["now"] = "open"
    early.ended(SID)
    await asyncio.wait_for(held, 1)
    assert early.held == 1 and early.waiting == 0 and early._events == {} and early._count == {}


async def test_a_step_whose_open_never_comes_goes_on_after_the_wait() -> None:
    early = EarlySteps(wait_s=0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await early.until_open(SID, "prev", lambda: "unknown")
    assert 0.04 <= loop.time() - t0 < 1.0
    assert early.held == 0 and early.waiting == 0 and early._events == {}


async def test_a_session_still_opening_is_waited_for_past_the_wait() -> None:
    """An open that pulls a shard takes seconds: its step waits for it, not for wait_s."""
    early = EarlySteps(wait_s=0.01)
    state = {"now": "opening"}
    held = asyncio.ensure_future(early.until_open(SID, "prev", lambda: state["now"]))  # type: ignore[arg-type, return-value]
    await asyncio.sleep(0.1)
    assert not held.done()
    early.ended(SID)  # it failed: the step goes on, and fails as a step of no session does
    await asyncio.wait_for(held, 1)
    assert early.held == 0


async def test_waiting_steps_are_bounded_per_peer_and_in_all() -> None:
    early = EarlySteps(wait_s=5.0, max_waiting=5, per_peer=2)
    waits = [
        asyncio.ensure_future(early.until_open(f"{i:02x}" * 12, peer, lambda: "unknown"))
        for i, peer in enumerate(["a", "a", "a", "b", "b", "c", "d", "e"])
    ]
    await asyncio.sleep(0)
    # a's third, and everything past five in all, went on at once
    assert [w.done() for w in waits] == [False, False, True, False, False, False, True, True]
    assert early.refused == 3 and early.waiting == 5
    for w in waits:
        w.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    assert early.waiting == 0 and early._events == {} and early._count == {}


def test_early_steps_refuse_negative_bounds() -> None:
    with pytest.raises(ValueError):
        EarlySteps(wait_s=-1)


# -- the views kept (units) -------------------------------------------------------------------
def _view(pid: str) -> PeerView:
    return PeerView(pid, 1e9, set(), "fake")


def test_kept_views_are_used_only_fresh_and_of_the_same_peers() -> None:
    now = [0.0]
    kept = ViewCache(fresh_s=30.0, clock=lambda: now[0])
    manifest: Any = object()
    kept.put("m", ["a", "b"], [_view("a"), _view("b")], manifest)
    hit = kept.get("m", ["b", "a"])
    assert hit is not None and [v.peer_id for v in hit[0]] == ["a", "b"] and hit[1] is manifest
    assert kept.get("m", ["a"]) is None  # b left: ask again
    assert kept.get("m", ["a", "b", "c"]) is None  # c came
    assert kept.get("other", ["a", "b"]) is None
    now[0] = 30.5
    assert kept.get("m", ["a", "b"]) is None  # too old
    assert (kept.hits, kept.misses) == (1, 4)


def test_kept_views_are_bounded_least_recently_used_first() -> None:
    kept = ViewCache(max_models=3)
    for i in range(5):
        kept.put(f"m{i}", ["a"], [_view("a")], object())  # type: ignore[arg-type]
        kept.get("m0", ["a"])  # m0 stays in use
    assert len(kept) == 3
    assert kept.get("m0", ["a"]) is not None and kept.get("m1", ["a"]) is None
    with pytest.raises(ValueError):
        ViewCache(max_models=0)


class _SilentMesh:
    """A mesh whose peers never answer: a refresh of views hangs until it is cancelled."""

    me = "me"

    def connected_peer_ids(self) -> list[str]:
        return ["p1", "p2"]

    async def call(self, pid: str, method: str, **_: Any) -> Any:
        await asyncio.Event().wait()


class _NoModels:
    manifests: dict[str, Any] = {}


async def test_stopping_the_coordinator_cancels_its_view_refreshes() -> None:
    from mesh.inference.coordinator import Coordinator

    c = Coordinator(_SilentMesh(), _NoModels())  # type: ignore[arg-type]
    c.refresh_views("m")
    c.refresh_views("m")  # one refresh per model at a time
    (task,) = c._refreshing.values()
    await asyncio.sleep(0)  # the refresh is now waiting on the peers
    assert not task.done()
    await asyncio.wait_for(c.stop(), 2)
    assert task.cancelled() and not c._refreshing


# -- on a mesh of compute services ------------------------------------------------------------
async def test_the_first_step_reaches_a_stage_before_its_open_and_the_tokens_are_clean(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """A stage whose open is slow to arrive gets the route's first step first: it holds the
    step until the open is done, then runs it; the tokens are the fault-free ones."""
    clean, _ = await clean_run(tmp_path, tiny, split=3)
    mesh = await Mesh.start(tmp_path / "m", tiny)
    slow = clean["stages"][2]["peer_id"]
    real_open = mesh.net.handlers[slow]["compute.stage_open"]
    order: list[str] = []

    async def late_open(ctx: CallContext, params: dict[str, Any], payload: bytes) -> Any:
        await asyncio.sleep(0.3)  # the step comes through the two stages before it
        order.append("open")
        return await real_open(ctx, params, payload)

    real_push = mesh.net.handlers[slow]["compute.stage_push"]

    async def push(ctx: CallContext, params: dict[str, Any], payload: bytes) -> None:
        order.append("step")
        await real_push(ctx, params, payload)

    mesh.net.handlers[slow].update({"compute.stage_open": late_open, "compute.stage_push": push})
    run = GenerationRun(mesh.coord, mesh.request(split=3))
    summary = await mesh.finish(run)
    assert summary["tokens"] == clean["tokens"]
    assert order[:2] == ["step", "open"]
    assert mesh.computes[slow].early.held == 1
    assert summary["reroutes"] == [] and mesh.sessions_left() == {}


async def test_a_later_step_of_an_unknown_session_fails_at_once(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Only a first step is held: one of a session the stage lost fails without a wait, so
    the stage is routed around at once."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    stage = mesh.computes[mesh.peers[0]]
    push = mesh.net.handlers[mesh.peers[0]]["compute.stage_forward"]
    ctx = CallContext(None, "compute.stage_forward", 1e12, mesh.peers[1])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(Exception, match="no such stage session"):
        await push(ctx, {"sid": SID, "n": 1, "pos": 12, "sample": {}}, b"\0" * 4)
    assert loop.time() - t0 < 0.5 and stage.early.refused == 0 and stage.early.held == 0
    await mesh.stop()


async def test_a_second_route_is_planned_from_kept_views(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """The second generation asks no remote peer before its route opens (the views of the
    first, refreshed when it ended); its tokens are the first's."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    asked: list[str] = []
    for pid in mesh.peers:
        real = mesh.net.handlers[pid]["compute.capacity"]

        async def capacity(ctx: CallContext, p: dict[str, Any], b: bytes, real: Any = real) -> Any:
            asked.append(ctx.peer_id)
            return await real(ctx, p, b)

        mesh.net.handlers[pid]["compute.capacity"] = capacity
    try:
        first = (await mesh.generate(GenerationRun(mesh.coord, mesh.request(split=3))))[-1]
        assert len(asked) == len(mesh.peers)
        refreshing = list(mesh.coord._refreshing.values())
        await asyncio.gather(*refreshing)  # asked again when the first ended
        assert len(asked) == 2 * len(mesh.peers)
        run = GenerationRun(mesh.coord, mesh.request(split=3))
        second = (await mesh.generate(run))[-1]
    finally:
        await mesh.stop()
    assert second["tokens"] == first["tokens"] and second["stages"] == first["stages"]
    assert run.parts is not None and run.parts.planner.from_kept
    assert (mesh.coord.kept.hits, mesh.coord.kept.misses) == (1, 1)


async def test_a_route_from_kept_views_that_fails_to_open_is_planned_again_blaming_no_one(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Kept views said a peer had the memory; it has not now (another coordinator's
    sessions): the route is planned from views asked then. The peer is not excluded."""
    clean, _ = await clean_run(tmp_path, tiny, split=3)
    mesh = await Mesh.start(tmp_path / "m", tiny)
    first = (await mesh.generate(GenerationRun(mesh.coord, mesh.request(split=3))))[-1]
    await asyncio.gather(*mesh.coord._refreshing.values())
    short = first["stages"][1]["peer_id"]
    real_open = mesh.net.handlers[short]["compute.stage_open"]
    refused: list[int] = []

    async def once_full(ctx: CallContext, params: dict[str, Any], payload: bytes) -> Any:
        if not refused:
            refused.append(1)
            raise CapacityError("a session of 22 positions needs 1 MiB; 0 MiB are free")
        return await real_open(ctx, params, payload)

    mesh.net.handlers[short]["compute.stage_open"] = once_full
    run = GenerationRun(mesh.coord, mesh.request(split=3))
    summary = await mesh.finish(run)
    assert refused == [1] and summary["tokens"] == clean["tokens"]
    assert run.parts is not None and run.parts.planner.excluded == set()
    assert not run.parts.planner.from_kept  # planned again from views asked then
    assert mesh.sessions_left() == {}


class _OpeningMesh:
    """Opens answered on a signal each (this node's own, then the remote one)."""

    me = "me"

    def __init__(self) -> None:
        self.done = {"me": asyncio.Event(), "p1": asyncio.Event()}
        self.log: list[str] = []

    async def call(self, pid: str, method: str, params: Any, **_: Any) -> Any:
        await self.done[pid].wait()
        self.log.append(f"opened {pid}")
        return type("Reply", (), {"result": {"pulled": 0}})()


class _Host:
    def __init__(self) -> None:
        self.mesh = _OpeningMesh()

    def holds_manifest(self, mid: str) -> bool:
        return True


async def test_with_this_node_first_the_first_step_goes_once_its_own_open_is_done() -> None:
    """This node's own stage first: the first step does not wait for the remote opens, only
    for its own (a call to itself runs in place, and would run through the open's pulls)."""
    from mesh.inference.routes import Stage
    from mesh.inference.sessions import RouteSessions

    host = _Host()
    route = RouteSessions(host, "m", 16, audit=False)  # type: ignore[arg-type]
    stages = [Stage("me", (0, 2), "fake"), Stage("p1", (2, 4), "fake")]

    stepped = asyncio.Event()

    async def first() -> str:
        host.mesh.log.append("step")
        stepped.set()
        return "token"

    opening = asyncio.ensure_future(route.open(stages, first))
    await asyncio.sleep(0)
    assert host.mesh.log == []  # nothing goes before this node's own open
    host.mesh.done["me"].set()
    await asyncio.wait_for(stepped.wait(), 2)  # while the remote open is still under way
    host.mesh.done["p1"].set()
    sent = await asyncio.wait_for(opening, 2)
    assert sent is not None and await sent == "token"
    assert host.mesh.log == ["opened me", "step", "opened p1"]
