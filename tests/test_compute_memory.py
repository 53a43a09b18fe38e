"""The memory limit holds for sessions too: each stage session reserves its KV cache for every
position it may take, so peers opening long sessions cannot grow a node past its limit."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import PeerUnavailable
from mesh.inference.compute import CapacityError, ComputeConfig, ComputeService
from mesh.net.rpc import CallContext, Reply
from runtimes.onnx_rt import OnnxRuntime
from runtimes.testmodels import write_test_model

PEERS = ["p" * 32, "q" * 32]


class _Caller:
    def connected_peer_ids(self) -> list[str]:
        return []

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        raise PeerUnavailable("nothing is fetched in this test")

    async def notify(self, peer: str, method: str, *a: Any, **k: Any) -> None:
        return None


def ctx(peer: str, method: str = "stage_open") -> CallContext:
    return CallContext(None, method, 1e18, peer)


async def test_sessions_reserve_their_kv_cache_against_the_memory_limit(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "tiny.gguf", "llama")  # context 256
    probe = ComputeService(_Caller(), "me", tmp_path / "probe", ComputeConfig())  # type: ignore[arg-type]
    manifest = await probe.add_model(str(path))
    spec = probe.store.open_range(manifest, 0, len(manifest.units))
    weights = OnnxRuntime.estimate_memory(spec, 0)
    kv = OnnxRuntime.kv_bytes(spec, 256)
    assert kv == 2 * 2 * 2 * 64 * 256 * 2  # K and V, 2 layers, 2 KV heads of 64, float16

    limit = weights + 3 * kv + kv // 2  # the shard and three full-context sessions
    svc = ComputeService(
        _Caller(),  # type: ignore[arg-type]
        "me",
        tmp_path / "node",
        ComputeConfig(memory_limit=limit, max_sessions_per_peer=64),
    )
    await svc.add_model(str(path))
    mid, units = manifest.model_id, [0, len(manifest.units)]

    def open_(peer: str, positions: int) -> Any:
        sid = os.urandom(8).hex()
        params = {"sid": sid, "model_id": mid, "units": units, "max_tokens": positions}
        return sid, svc.rpc_stage_open(ctx(peer), params, b"")

    opened = []
    for i in range(3):
        sid, call = open_(PEERS[i % 2], 8192)  # asked for more than the context: capped at 256
        await call
        opened.append(sid)
    assert svc.kv_reserved == 3 * kv
    cap = await svc.rpc_capacity(ctx(PEERS[0], "capacity"), {}, b"")
    assert cap["memory_used"] == weights + 3 * kv
    with pytest.raises(CapacityError, match="a session of 256 positions"):
        await open_(PEERS[1], 256)[1]
    assert svc.kv_reserved == 3 * kv  # the refused open reserved nothing
    _, short = open_(PEERS[1], 64)  # a short session still fits in what is left
    await short
    assert svc.kv_reserved == 3 * kv + kv // 4

    # closing gives the reservation back (a second close changes nothing)
    owner = svc.sessions[opened[0]].owner
    for _ in range(2):
        await svc.rpc_stage_close(ctx(owner, "stage_close"), {"sid": opened[0]}, b"")
    assert svc.kv_reserved == 2 * kv + kv // 4
    await open_(PEERS[0], 256)[1]
    await svc.stop()
    await probe.stop()


class _Links(_Caller):
    def __init__(self) -> None:
        self.up: list[str] = []

    def connected_peer_ids(self) -> list[str]:
        return list(self.up)


async def test_sessions_of_a_coordinator_without_a_link_are_freed_after_the_grace(
    tmp_path: Path,
) -> None:
    """Issue 15: a stage kept a lost coordinator's session (and its memory) until the 300 s
    idle eviction, and the mesh refused generations meanwhile ("no peer left with memory").
    Now a session whose owner has had no link for ``owner_grace`` is freed; one whose owner
    came back in time, or that is its own node's, stays."""
    path = write_test_model(tmp_path / "tiny.gguf", "llama")
    links = _Links()
    svc = ComputeService(links, "me", tmp_path / "node", ComputeConfig(owner_grace=15.0))  # type: ignore[arg-type]
    manifest = await svc.add_model(str(path))
    mid, units = manifest.model_id, [0, len(manifest.units)]
    sids = {}
    for owner in (PEERS[0], PEERS[1], "me"):
        sids[owner] = os.urandom(8).hex()
        params = {"sid": sids[owner], "model_id": mid, "units": units, "max_tokens": 64}
        await svc.rpc_stage_open(ctx(owner), params, b"")
    reserved = svc.kv_reserved
    t0 = time.monotonic()  # the sessions were used just now: none is idle in what follows
    links.up = [PEERS[1]]
    await svc.evict_once(t0)  # PEERS[0]'s link is gone: its grace starts
    assert set(svc.sessions) == set(sids.values())
    links.up = []
    await svc.evict_once(t0 + 10)  # PEERS[1] gone now too
    links.up = [PEERS[1]]
    await svc.evict_once(t0 + 14)  # ... and back within its grace
    await svc.evict_once(t0 + 15)  # PEERS[0]: 15 s without a link
    assert set(svc.sessions) == {sids[PEERS[1]], sids["me"]}
    assert svc.kv_reserved == reserved * 2 // 3  # its KV reservation went back
    await svc.evict_once(t0 + 100)
    assert set(svc.sessions) == {sids[PEERS[1]], sids["me"]}
