"""Failover and replay of a generation, in one process (issue 12).

A real :class:`Coordinator` runs generations over real :class:`ComputeService` stages, with
the deterministic fake runtime (``runtimes/fake.py``) loaded over a tiny model's shards; a
fake network (:class:`FakeNet`) carries their calls and one-way messages as the RPC layer
does, and kills, freezes or scripts a stage mid-generation. The cross-process versions of
these faults are in tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import EXPECTED, DeadlineExceeded, PeerUnavailable, RemoteError
from mesh.inference import steps
from mesh.inference.compute import CapacityError, ComputeConfig, ComputeService
from mesh.inference.coordinator import Coordinator
from mesh.inference.planning import MAX_FAILOVERS
from mesh.inference.routes import RouteError
from mesh.inference.run import GenerationRequest, GenerationRun
from mesh.net.rpc import CallContext, Handler, Reply, handlers_of
from runtimes.testmodels import write_test_model

log = logging.getLogger(__name__)
PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7]
COORD = "c" * 64  # the coordinator's node: it holds the model but has no memory for stages
# Fault hook: (peer, method, params) -> None (deliver), or how the message is lost.
Fault = Callable[[str, str, dict[str, Any]], str | None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("failover") / "llama.gguf", "llama")


@pytest.fixture(autouse=True)
def fast_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A silent stage is found by probing the route; in one process a probe is instant.
    monkeypatch.setattr(steps, "PROBE_EVERY", 0.05)


class FakeNet:
    """Nodes by peer id; what a message to a dead or frozen node meets, as over real links."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, Handler]] = {}
        self.dead: set[str] = set()  # calls raise PeerUnavailable, one-way messages too
        self.frozen: set[str] = set()  # calls raise DeadlineExceeded, messages are lost
        self.fault: Fault = lambda peer, method, params: None
        self.steps: dict[str, list[tuple[int, int]]] = {}  # (n, pos) of each step a peer ran
        self.tasks: set[asyncio.Task[None]] = set()

    def caller(self, me: str) -> FakeCaller:
        return FakeCaller(self, me)

    def reach(self, sender: str, peer: str) -> dict[str, Handler]:
        if sender in self.dead or peer in self.dead or peer not in self.handlers:
            raise PeerUnavailable(f"no link to {peer[:12]}")
        if sender in self.frozen or peer in self.frozen:
            raise DeadlineExceeded(f"{peer[:12]} did not answer in time")
        return self.handlers[peer]

    def deliver(self, sender: str, peer: str, method: str, params: dict[str, Any]) -> bool:
        """Whether the message arrives: a fault may take the peer away before it does
        ("gone": the sender's link fails now) or while it computes ("kill", "freeze": the
        message is accepted, and lost)."""
        lost = self.fault(peer, method, params)
        if lost in ("gone", "kill"):
            self.dead.add(peer)
        elif lost == "freeze":
            self.frozen.add(peer)
        if lost == "gone":
            self.reach(sender, peer)  # raises PeerUnavailable
        if lost is None and method in ("compute.stage_push", "compute.stage_forward"):
            self.steps.setdefault(peer, []).append((params["n"], params["pos"]))
        return lost is None


class FakeCaller:
    """A node's :class:`MeshCaller` on a :class:`FakeNet`: a remote handler's error arrives
    as a coded :class:`RemoteError`, a call to itself runs in place (as ``Node.call``)."""

    def __init__(self, net: FakeNet, me: str) -> None:
        self.net = net
        self.me = me
        self.banned: list[str] = []

    def connected_peer_ids(self) -> list[str]:
        net = self.net
        return [p for p in net.handlers if p != self.me and p not in net.dead | net.frozen]

    async def call(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        handler = self.net.reach(self.me, peer_id)[method]
        params = dict(params or {})
        if not self.net.deliver(self.me, peer_id, method, params):
            self.net.reach(self.me, peer_id)  # raises: the link drops, or the call times out
        ctx = CallContext(None, method, time.monotonic() + (timeout or 30.0), self.me)
        if peer_id == self.me:
            out = await handler(ctx, params, payload)
        else:
            try:
                out = await handler(ctx, params, payload)
            except RemoteError:
                raise  # relayed from a further hop: its code names the culprit
            except EXPECTED as exc:
                raise RemoteError(type(exc).__name__, str(exc)) from None
        return out if isinstance(out, Reply) else Reply(out or {})

    async def notify(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> None:
        handler = self.net.reach(self.me, peer_id)[method]
        params = dict(params or {})
        if not self.net.deliver(self.me, peer_id, method, params):
            return  # accepted, then lost: the peer died (or froze) computing it
        ctx = CallContext(None, method, time.monotonic() + (timeout or 30.0), self.me)

        async def run() -> None:
            try:
                await handler(ctx, params, payload)
            except Exception:  # a one-way handler reports its failures itself
                log.exception("one-way %s on %s failed", method, peer_id[:12])

        task = asyncio.get_running_loop().create_task(run())
        self.net.tasks.add(task)
        task.add_done_callback(self.net.tasks.discard)

    def sign(self, message: bytes) -> bytes:
        return b""

    def peer_key(self, peer_id: str) -> bytes:
        return b""

    def ban(self, peer_id: str, reason: str) -> None:
        self.banned.append(peer_id)


class Mesh:
    """The coordinator's node and ``n`` stage peers, each holding the model."""

    def __init__(self, net: FakeNet, coord: Coordinator, computes: dict[str, ComputeService]):
        self.net = net
        self.coord = coord
        self.computes = computes
        self.peers = [p for p in computes if p != COORD]

    @classmethod
    async def start(cls, root: Path, tiny: Path, n: int = 4) -> Mesh:
        net = FakeNet()
        computes: dict[str, ComputeService] = {}
        coord: Coordinator | None = None
        for i, pid in enumerate([COORD, *(f"{i:x}" * 64 for i in range(1, n + 1))]):
            limit = 1 if pid == COORD else None  # the coordinator is never a stage
            config = ComputeConfig(runtime="fake", memory_limit=limit)
            compute = ComputeService(net.caller(pid), pid, root / str(i), config)
            await compute.add_model(str(tiny), "tiny")
            computes[pid] = compute
            services: list[object] = [compute, compute.tokenizers]
            if pid == COORD:
                coord = Coordinator(net.caller(pid), compute, forward_timeout=10.0)
                services.append(coord)
            net.handlers[pid] = handlers_of(*services)
        assert coord is not None
        return cls(net, coord, computes)

    async def generate(self, run: GenerationRun) -> list[dict[str, Any]]:
        events = [event async for event in run.run()]
        assert events[-1].get("done"), events[-1]
        return events

    def request(self, **kw: Any) -> GenerationRequest:
        return GenerationRequest(model="tiny", **{"tokens": PROMPT, "max_tokens": 12, **kw})

    async def finish(self, run: GenerationRun) -> dict[str, Any]:
        """The run's summary (its last event); the mesh is stopped either way."""
        try:
            return (await self.generate(run))[-1]
        finally:
            await self.stop()

    async def stop(self) -> None:
        for task in list(self.net.tasks):
            task.cancel()
        await asyncio.gather(*self.net.tasks, return_exceptions=True)

    def sessions_left(self) -> dict[str, int]:
        live = [p for p in self.computes if p not in self.net.dead | self.net.frozen]
        return {p[:8]: len(self.computes[p].sessions) for p in live if self.computes[p].sessions}


async def clean_run(root: Path, tiny: Path, **kw: Any) -> tuple[dict[str, Any], FakeNet]:
    """The fault-free run of the same request, on a mesh of its own."""
    mesh = await Mesh.start(root / "clean", tiny)
    summary = await mesh.finish(GenerationRun(mesh.coord, mesh.request(**kw)))
    return summary, mesh.net


def nth_step_at(position: int, nth: int, how: str) -> Callable[[GenerationRun], Fault]:
    """A fault for ``run``: the stage at route ``position`` is lost (``how``) on receiving
    its ``nth`` step (prompt chunks count), once."""

    def make(run: GenerationRun) -> Fault:
        seen: dict[str, int] = {}
        fired: list[str] = []

        def fault(peer: str, method: str, params: dict[str, Any]) -> str | None:
            if (
                fired
                or method not in ("compute.stage_push", "compute.stage_forward")
                or run.parts is None
            ):
                return None
            if peer != run.parts.route.stages[position].peer_id:
                return None
            seen[peer] = seen.get(peer, 0) + 1
            if seen[peer] < nth:
                return None
            fired.append(peer)
            return how

        return fault

    return make


CASES = [
    # (how the stage is lost, its route position, on its nth step, mode, prefill chunk)
    # gone: the first stage's push fails, it reports stage_failed naming the middle one
    pytest.param("gone", 1, 6, "push", 512, id="middle-gone-decode-push"),
    # gone: the coordinator's own push raises PeerUnavailable
    pytest.param("gone", 0, 6, "push", 512, id="first-gone-decode-push"),
    # killed or frozen computing: no token comes; a probe finds it (PeerUnavailable, deadline)
    pytest.param("kill", 1, 6, "push", 512, id="middle-killed-decode-push"),
    pytest.param("freeze", 1, 6, "push", 512, id="middle-frozen-decode-push"),
    pytest.param("kill", 2, 4, "push", 512, id="last-killed-decode-push"),
    # chain: the first stage's call fails, its StageUnavailable reply names the middle one
    pytest.param("gone", 1, 6, "chain", 512, id="middle-gone-decode-chain"),
    # the 10-token prompt in chunks of 4, 4 and 2: lost during the second chunk
    pytest.param("gone", 1, 2, "push", 4, id="middle-gone-prompt-chunk-2-of-3-push"),
    pytest.param("kill", 1, 2, "push", 4, id="middle-killed-prompt-chunk-2-of-3-push"),
    pytest.param("freeze", 1, 2, "chain", 4, id="middle-frozen-prompt-chunk-2-of-3-chain"),
]


@pytest.mark.parametrize(("how", "position", "nth", "mode", "chunk"), CASES)
async def test_lost_stage_is_replaced_and_replayed_in_the_original_chunks(
    tmp_path: Path, tiny: Path, how: str, position: int, nth: int, mode: str, chunk: int
) -> None:
    """A stage lost mid-generation: its units move to the spare peer, which is fed the
    history in the chunks of the original run (so it ran exactly the steps the lost stage
    would have), and the tokens are those of the fault-free run."""
    kw = {"split": 3, "mode": mode, "prefill_chunk": chunk}
    clean, clean_net = await clean_run(tmp_path, tiny, **kw)
    assert len(clean["tokens"]) == 12  # the tiny model runs to max_tokens: every step counts
    mesh = await Mesh.start(tmp_path / "faulty", tiny)
    run = GenerationRun(mesh.coord, mesh.request(**kw))
    mesh.net.fault = nth_step_at(position, nth, how)(run)
    summary = await mesh.finish(run)

    assert summary["tokens"] == clean["tokens"]
    route = [s["peer_id"] for s in clean["stages"]]
    victim = route[position]
    (reroute,) = summary["reroutes"]
    assert reroute["failed"] == victim
    (spare,) = reroute["replacement"]
    assert spare not in route and spare != COORD
    assert reroute["units"] == clean["stages"][position]["units"]
    prompt_steps = -(-len(PROMPT) // chunk)
    assert reroute["after_tokens"] == max(0, nth - prompt_steps)
    assert [s["peer_id"] for s in summary["stages"]] == [
        *route[:position],
        spare,
        *route[position + 1 :],
    ]
    # the replay: the spare ran every step the victim would have, in the same chunks
    assert mesh.net.steps[spare] == clean_net.steps[victim]
    assert mesh.net.steps[victim] == clean_net.steps[victim][: nth - 1]
    assert summary["decode_steps"] == len(summary["tokens"]) - 1  # replays are not counted
    assert run.parts is not None and victim in run.parts.planner.excluded
    assert mesh.sessions_left() == {}  # every live stage freed its session


async def test_failovers_stop_at_the_limit_with_a_clear_error(tmp_path: Path, tiny: Path) -> None:
    """Every peer dies on its first step: the step is re-routed MAX_FAILOVERS times, then the
    run fails naming the limit (one more peer is left, never tried)."""
    mesh = await Mesh.start(tmp_path / "m", tiny, n=MAX_FAILOVERS + 2)
    run = GenerationRun(mesh.coord, mesh.request(split=1))
    mesh.net.fault = lambda peer, method, params: "kill" if method == "compute.stage_push" else None
    try:
        with pytest.raises(RouteError, match=f"after {MAX_FAILOVERS} failovers"):
            await mesh.generate(run)
    finally:
        await mesh.stop()
    assert run.parts is not None
    reroutes = run.parts.planner.reroutes
    assert len(reroutes) == MAX_FAILOVERS
    assert len(mesh.net.dead) == MAX_FAILOVERS + 1  # the first route and each replacement
    assert len(set(mesh.peers) - mesh.net.dead) == 1
    assert mesh.sessions_left() == {}


async def test_fault_during_the_replay_counts_and_is_routed_around(
    tmp_path: Path, tiny: Path
) -> None:
    """The first replacement dies while the history is replayed to it: a second re-route
    follows within the same step, and the tokens are still the fault-free ones."""
    kw = {"split": 3, "prefill_chunk": 4}
    clean, _ = await clean_run(tmp_path, tiny, **kw)
    mesh = await Mesh.start(tmp_path / "m", tiny, n=5)
    run = GenerationRun(mesh.coord, mesh.request(**kw))
    route: list[str] = []
    deaths: list[str] = []

    def fault(peer: str, method: str, params: dict[str, Any]) -> str | None:
        if method != "compute.stage_push" or run.parts is None:
            return None
        if not route:
            route[:] = [s.peer_id for s in run.parts.route.stages]
        middle = run.parts.route.stages[1].peer_id
        if not deaths and peer == middle and params["pos"] == 14:  # a decode step
            deaths.append(peer)
            return "kill"
        if len(deaths) == 1 and peer not in route and params["pos"] == 8:  # replaying
            deaths.append(peer)
            return "kill"
        return None

    mesh.net.fault = fault
    summary = await mesh.finish(run)
    assert len(deaths) == 2
    assert summary["tokens"] == clean["tokens"]
    assert [r["failed"] for r in summary["reroutes"]] == deaths
    assert mesh.sessions_left() == {}


def report_failed(
    mesh: Mesh, run: GenerationRun, reporter: int, blamed: Callable[[list[Any]], str]
) -> list[str]:
    """From position 12 the route's stage ``reporter`` does not compute: it reports the
    peer ``blamed(stages)`` as failed. Returns the peers it named, as it names them."""
    reported: list[str] = []

    def scripted(me: str, real: Handler) -> Handler:
        async def stage_push(ctx: CallContext, params: dict[str, Any], payload: bytes) -> None:
            assert run.parts is not None
            stages = run.parts.route.stages
            if me != stages[reporter].peer_id or params["pos"] < 12:
                await real(ctx, params, payload)
                return
            reported.append(blamed(stages))
            report = {"rid": params["rid"], "pos": params["pos"], "failed": reported[-1]}
            await mesh.net.caller(me).notify(COORD, "coordinator.stage_failed", report)

        return stage_push

    for peer in mesh.peers:
        handlers = mesh.net.handlers[peer]
        handlers["compute.stage_push"] = scripted(peer, handlers["compute.stage_push"])
    return reported


async def test_stage_failed_naming_a_peer_off_the_route_excludes_nobody(
    tmp_path: Path, tiny: Path
) -> None:
    """The middle stage reports that a peer off the route failed: a stage may only blame
    stages of the route, so the run fails with the reporter's error and nobody is excluded."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    run = GenerationRun(mesh.coord, mesh.request(split=3))

    def outsider(stages: list[Any]) -> str:
        return next(p for p in mesh.peers if p not in {s.peer_id for s in stages})

    reported = report_failed(mesh, run, 1, outsider)
    try:
        with pytest.raises(RemoteError) as failed:
            await mesh.generate(run)
    finally:
        await mesh.stop()
    assert reported, "the scripted report was never sent"
    assert failed.value.code == "StageError"
    assert run.parts is not None
    assert run.parts.planner.excluded == set()
    assert run.parts.planner.reroutes == []
    assert mesh.sessions_left() == {}


async def test_stage_short_of_memory_at_open_is_replaced(tmp_path: Path, tiny: Path) -> None:
    """A stage refuses its session for want of memory: the route is re-planned without it
    before any step, and the tokens are the fault-free ones."""
    clean, _ = await clean_run(tmp_path, tiny, split=3)
    mesh = await Mesh.start(tmp_path / "m", tiny)
    short = clean["stages"][1]["peer_id"]

    async def full(ctx: CallContext, params: dict[str, Any], payload: bytes) -> None:
        raise CapacityError("a session of 22 positions needs 1 MiB; 0 MiB are free")

    mesh.net.handlers[short]["compute.stage_open"] = full
    run = GenerationRun(mesh.coord, mesh.request(split=3))
    summary = await mesh.finish(run)
    assert summary["tokens"] == clean["tokens"]
    assert short not in {s["peer_id"] for s in summary["stages"]}
    assert len(summary["stages"]) == 3
    assert run.parts is not None and run.parts.planner.excluded == {short}
    # The route's first step went out with the opens: it reached the short stage, waited
    # there for a session that never opened, and ran nothing.
    assert mesh.net.steps.get(short, []) in ([], [(len(PROMPT), len(PROMPT))])
    assert sum(mesh.computes[short].throughput.history()) == 0
    assert mesh.sessions_left() == {}


async def test_stage_failed_may_name_only_the_reporters_next_hop(
    tmp_path: Path, tiny: Path
) -> None:
    """The last stage reports that the first stage failed (it is on the route, but not the
    reporter's next hop): before, the coordinator excluded the first stage and re-routed
    around it, so any stage could push any honest peer off its route. Now the report is the
    reporter's own error and nobody is excluded."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    run = GenerationRun(mesh.coord, mesh.request(split=3))
    reported = report_failed(mesh, run, -1, lambda stages: stages[0].peer_id)
    try:
        with pytest.raises(RemoteError) as failed:
            await mesh.generate(run)
    finally:
        await mesh.stop()
    assert reported, "the scripted report was never sent"
    assert failed.value.code == "StageError"
    assert run.parts is not None
    assert run.parts.planner.excluded == set()
    assert run.parts.planner.reroutes == []


async def test_a_two_peer_route_losing_a_stage_goes_on_on_the_survivor(
    tmp_path: Path, tiny: Path
) -> None:
    """Both peers of a mesh are stages and one is lost: no spare peer is left for its
    units alone, so the route is planned again over the peers left, the split given up (the
    survivor has the memory for the whole model). The tokens are the fault-free ones."""
    clean, _ = await clean_run(tmp_path, tiny, split=2)
    mesh = await Mesh.start(tmp_path / "faulty", tiny, n=2)
    run = GenerationRun(mesh.coord, mesh.request(split=2))
    mesh.net.fault = nth_step_at(1, 6, "kill")(run)
    summary = await mesh.finish(run)
    assert summary["tokens"] == clean["tokens"]
    (victim,) = mesh.net.dead
    (survivor,) = set(mesh.peers) - {victim}
    (reroute,) = summary["reroutes"]
    assert reroute["failed"] == victim and reroute["replacement"] == [survivor]
    assert [s["peer_id"] for s in summary["stages"]] == [survivor]
    assert mesh.sessions_left() == {}
