"""Replayed and reordered messages, and per-peer caps (issue 8), in one process.

Each test fails if its protection is removed. The cross-process ones are in
tests/test_slowloris.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mesh.discovery import mdns as disc_mod
from mesh.discovery.mdns import Announcement, MdnsDiscovery, make_properties
from mesh.errors import HandshakeError, PeerUnavailable, RemoteError
from mesh.inference.compute import CapacityError, ComputeConfig, ComputeService
from mesh.inference.stages import StageSession as _StageSession
from mesh.net.handshake import HandshakeState
from mesh.net.identity import Identity
from mesh.net.rpc import CallContext, Link, Reply, handlers_of
from mesh.net.wire import Encoder, Reassembler
from mesh.storage.service import (
    ObjectService,
    PeerQuotaExceeded,
    ReplicationBusy,
    StorageConfig,
)
from runtimes.batching import AsyncShard
from runtimes.errors import ModelError
from runtimes.fake import fake_shard

from .memchannel import pair, until

pytestmark = pytest.mark.badinput
A, B = Identity.generate(), Identity.generate()


# -- RPC: replayed responses, duplicated request ids ------------------------------------------
class _Svc:
    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def rpc_echo(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        return Reply({"echo": params.get("v")}, payload)

    async def rpc_block(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        self.started += 1
        await self.release.wait()
        return Reply({"done": True})


def _links() -> tuple[Link, Link, _Svc, Any, Any]:
    ca, cb = pair()
    svc = _Svc()
    la = Link(ca, B.peer_id, b"", {})
    lb = Link(cb, A.peer_id, b"", handlers_of(svc))
    ca.link, cb.link = la, lb
    return la, lb, svc, ca, cb


async def test_replayed_rpc_response_is_not_taken_for_a_later_call() -> None:
    la, lb, svc, ca, cb = _links()
    first = await la.call("echo", {"v": 1})
    assert first.result == {"echo": 1}
    enc = Encoder()
    # the peer replays its reply to call 1, and sends an unsolicited reply for call 2
    for frame in enc.encode({"t": "res", "id": 1, "r": {"echo": "replayed"}}, b""):
        la.feed(frame)
    for frame in enc.encode({"t": "res", "id": 2, "r": {"echo": "forged"}}, b""):
        la.feed(frame)
    second = await la.call("echo", {"v": 2})  # id 2: must get the real answer
    assert second.result == {"echo": 2}
    assert la.is_open


async def test_duplicated_request_id_in_flight_is_refused() -> None:
    la, lb, svc, ca, cb = _links()
    seen: list[dict[str, Any]] = []
    reasm = Reassembler()
    send = cb.send

    def spy(data: bytes, copy: bool = True) -> None:
        msg = reasm.feed(data)
        if msg is not None:
            seen.append(msg.header)
        send(data, copy)

    cb.send = spy  # type: ignore[method-assign]
    enc = Encoder()
    req = {"t": "req", "id": 7, "m": "block", "d": 5000, "p": {}}
    for frame in enc.encode(req, b""):
        lb.feed(frame)
    await until(lambda: svc.started == 1)
    for frame in enc.encode(req, b""):  # the same id again while the first runs
        lb.feed(frame)
    await until(lambda: any(h.get("t") == "err" for h in seen))
    err = next(h for h in seen if h.get("t") == "err")
    assert err["id"] == 7 and "duplicate" in err["e"]
    assert svc.started == 1  # the duplicate never ran
    svc.release.set()
    await until(lambda: any(h.get("t") == "res" and h.get("id") == 7 for h in seen))
    la.close(notify=False)
    lb.close(notify=False)


# -- the identity handshake: replayed and reordered messages --------------------------------
FP = [":".join([f"{i:02X}"] * 32) for i in range(4)]


def _session(fp_off: str, fp_ans: str) -> tuple[HandshakeState, HandshakeState]:
    off = HandshakeState(A, offerer=True, local_fp=fp_off, remote_fp=fp_ans)
    ans = HandshakeState(B, offerer=False, local_fp=fp_ans, remote_fp=fp_off)
    return off, ans


def test_proof_replayed_from_an_earlier_connection_is_refused() -> None:
    old_off, old_ans = _session(FP[0], FP[1])
    old_proof = old_ans.receive_hello(old_off.hello())
    old_off.receive_hello(old_ans.hello())
    assert old_off.receive_proof(old_proof).peer_id == B.peer_id  # honest, once
    # A new connection between the same peers: same keys, fresh nonces and fingerprints.
    off, ans = _session(FP[2], FP[3])
    off.receive_hello(ans.hello())
    with pytest.raises(HandshakeError, match="did not sign"):
        off.receive_proof(old_proof)
    # the same fingerprints but fresh nonces: still refused
    off2, ans2 = _session(FP[0], FP[1])
    off2.receive_hello(ans2.hello())
    with pytest.raises(HandshakeError):
        off2.receive_proof(old_proof)


def test_reordered_handshake_messages_are_refused() -> None:
    off, ans = _session(FP[0], FP[1])
    proof = ans.receive_hello(off.hello())
    with pytest.raises(HandshakeError, match="proof before hello"):
        off.receive_proof(proof)  # proof first
    off2, ans2 = _session(FP[0], FP[1])
    with pytest.raises(HandshakeError, match="expected hello"):
        off2.receive_hello(proof)
    off2.receive_hello(ans2.hello())
    with pytest.raises(HandshakeError, match="expected proof"):
        off2.receive_proof(ans2.hello())  # the hello again where the proof belongs


# -- mDNS: an older announcement replayed after a newer one ---------------------------------
async def test_mdns_announcement_older_than_one_seen_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found: list[Announcement] = []
    served: dict[str, dict[bytes, bytes]] = {}

    class FakeInfo:
        def __init__(self, type_: str, name: str) -> None:
            self.properties = served[name]

        async def async_request(self, zc: Any, timeout: float) -> bool:
            return True

    monkeypatch.setattr(disc_mod, "AsyncServiceInfo", FakeInfo)
    d = MdnsDiscovery(
        A,
        port=1,
        addresses=["127.0.0.1"],
        name="a",
        interfaces=["127.0.0.1"],
        on_found=found.append,
        on_lost=lambda pid: None,
    )
    d._zc = SimpleNamespace(zeroconf=None)  # type: ignore[assignment]
    name = f"{B.peer_id}.{disc_mod.SERVICE_TYPE}"

    def props(seq: int, addr: str) -> dict[bytes, bytes]:
        p = make_properties(B, 4000, [addr], "b", "default", seq=seq)
        return {k.encode(): v.encode() for k, v in p.items()}

    served[name] = props(200, "10.0.0.2")
    await d._resolve(name, False)
    served[name] = props(100, "10.6.6.6")  # a captured older record, replayed
    await d._resolve(name, False)
    assert [a.seq for a in found] == [200]
    assert d.rejected == 1


# -- compute: repeated and skipped steps ------------------------------------------------------
class _Caller:
    me = A.peer_id

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def connected_peer_ids(self) -> list[str]:
        return []

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        await self.gate.wait()  # a manifest fetch that takes its time
        raise PeerUnavailable("test")

    async def notify(self, peer: str, method: str, *a: Any, **k: Any) -> None:
        return None


async def _stage(tmp_path: Path) -> tuple[ComputeService, str, Any]:
    svc = ComputeService(_Caller(), A.peer_id, tmp_path, ComputeConfig(runtime="fake"))
    shard = await AsyncShard.load("fake", fake_shard(0, 6))
    key = ("m" * 64, 0, 6, "fake")
    from mesh.inference.memory import Loaded as _Loaded

    svc.loaded[key] = _Loaded(shard, 0, sessions=1)
    session = await shard.open_session(64)
    sid = os.urandom(8).hex()
    svc.sessions[sid] = _StageSession(key, session, None, None, B.peer_id)
    return svc, sid, session


def _step(svc: ComputeService, sid: str, tokens: list[int], pos: int) -> Any:
    ctx = CallContext(None, "stage_forward", 1e18, B.peer_id)
    body = np.asarray(tokens, dtype="<i4").tobytes()
    return svc.rpc_stage_forward(ctx, {"sid": sid, "n": len(tokens), "pos": pos}, body)


async def test_repeated_stage_step_is_refused_and_cache_untouched(tmp_path: Path) -> None:
    svc, sid, session = await _stage(tmp_path)
    await _step(svc, sid, [1, 2, 3], pos=3)  # the prompt: positions 0..2, next token at 3
    await _step(svc, sid, [7], pos=4)
    assert session.n_past == 4
    with pytest.raises(ModelError):
        await _step(svc, sid, [7], pos=4)  # the same step replayed
    assert session.n_past == 4


async def test_skipped_stage_step_is_refused(tmp_path: Path) -> None:
    svc, sid, session = await _stage(tmp_path)
    await _step(svc, sid, [1, 2, 3], pos=3)
    with pytest.raises(ModelError):
        await _step(svc, sid, [7], pos=6)  # positions 4 and 5 never sent
    assert session.n_past == 3


async def test_concurrent_duplicate_steps_run_once(tmp_path: Path) -> None:
    svc, sid, session = await _stage(tmp_path)
    await _step(svc, sid, [1, 2, 3], pos=3)
    results = await asyncio.gather(
        _step(svc, sid, [7], pos=4), _step(svc, sid, [7], pos=4), return_exceptions=True
    )
    assert sum(isinstance(r, ModelError) for r in results) == 1
    assert session.n_past == 4


# -- per-peer caps ------------------------------------------------------------------------------
async def test_sessions_per_peer_cap_holds_through_rpc(tmp_path: Path) -> None:
    """Opens from one peer over a link: the cap (here 3) refuses the 4th while three are
    still opening; another peer still gets a slot."""
    caller = _Caller()
    svc = ComputeService(
        caller, A.peer_id, tmp_path, ComputeConfig(runtime="fake", max_sessions_per_peer=3)
    )
    links = []
    for peer in (B, Identity.generate()):
        ca, cb = pair()
        client = Link(ca, A.peer_id, b"", {})
        server = Link(cb, peer.peer_id, b"", handlers_of(svc))
        ca.link, cb.link = client, server
        links.append((client, server))
    (b_client, _), (c_client, _) = links

    def open_(link: Link) -> Any:
        sid = os.urandom(8).hex()
        params = {"sid": sid, "model_id": "ab" * 32, "units": [0, 2], "runtime": "fake"}
        return asyncio.ensure_future(link.call("compute.stage_open", params, timeout=10))

    held = [open_(b_client) for _ in range(3)]
    await until(lambda: len(svc._opening) == 3)
    with pytest.raises(RemoteError) as refused:
        await open_(b_client)
    assert refused.value.code == CapacityError.__name__ and "3 sessions" in refused.value.message
    other = open_(c_client)  # another peer is not blocked by this one
    await until(lambda: len(svc._opening) == 4)
    caller.gate.set()
    for fut in [*held, other]:
        with pytest.raises(RemoteError):  # the manifest fetch fails: slots are given back
            await fut
    assert svc._opening == {}
    for client, server in links:
        client.close(notify=False)
        server.close(notify=False)


class _ObjNode:
    identity = A
    me = A.peer_id
    dht = None
    banned: dict[str, str] = {}
    config = SimpleNamespace(signaling_host="127.0.0.1", api_host="127.0.0.1")

    def connected_peer_ids(self) -> list[str]:
        return []

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        raise PeerUnavailable("test")


async def test_per_peer_replica_quota(tmp_path: Path) -> None:
    svc = ObjectService(
        _ObjNode(),  # type: ignore[arg-type]
        StorageConfig(fast_path=False, peer_quota=5000),
        tmp_path,
    )
    objs = [svc.store.put_bytes(os.urandom(3000), f"o{i}", "raw") for i in range(3)]
    for m in objs:  # held here, but not kept by anyone: a peer may ask us to keep them
        svc.store.unpin(m.id)
    b_ctx = CallContext(None, "obj_replicate", 1e18, B.peer_id)
    c_ctx = CallContext(None, "obj_replicate", 1e18, "c" * 64)
    ok = await svc.rpc_obj_replicate(b_ctx, {"id": objs[0].id, "replicas": 2}, b"")
    assert ok == {"accepted": True, "held": True}
    assert svc.peer_bytes(B.peer_id) == 3000
    with pytest.raises(PeerQuotaExceeded, match="peer quota"):
        await svc.rpc_obj_replicate(b_ctx, {"id": objs[1].id, "replicas": 2}, b"")
    assert objs[1].id not in svc.store.pins
    # another peer has its own quota
    assert (await svc.rpc_obj_replicate(c_ctx, {"id": objs[1].id, "replicas": 2}, b""))["held"]
    # an object B does not know the size of yet: refused once B is at its quota
    svc.config.peer_quota = 3000
    with pytest.raises(PeerQuotaExceeded):
        await svc.rpc_obj_replicate(b_ctx, {"id": "cd" * 32, "replicas": 2}, b"")
    # the node's own pin takes the charge off the peer
    svc.store.pin(objs[0].id)
    assert svc.peer_bytes(B.peer_id) == 0
    assert svc.quota_refused == 2


async def test_a_step_carrying_too_many_rows_is_refused_before_running(tmp_path: Path) -> None:
    """Any peer may send a step: its rows are capped (attention temporaries are rows x
    context) whatever the coordinator's prefill chunk; the session is untouched."""
    from mesh.inference.compute import MAX_STEP_ROWS

    svc, sid, session = await _stage(tmp_path)
    session.max_tokens = 4 * MAX_STEP_ROWS
    with pytest.raises(ModelError, match="rows of one step"):
        await _step(svc, sid, [1] * (MAX_STEP_ROWS + 1), pos=MAX_STEP_ROWS + 1)
    assert session.n_past == 0
    await _step(svc, sid, [1] * MAX_STEP_ROWS, pos=MAX_STEP_ROWS)
    assert session.n_past == MAX_STEP_ROWS


async def test_replica_pulls_are_bounded_per_peer_and_in_all(tmp_path: Path) -> None:
    svc = ObjectService(
        _ObjNode(),  # type: ignore[arg-type]
        StorageConfig(fast_path=False, max_pulls_per_peer=3, max_pulls=5),
        tmp_path,
    )
    hold = asyncio.Event()

    async def slow_holders(oid: str) -> list[str]:
        await hold.wait()  # a DHT lookup or a holder that takes its time
        return []

    svc.find_holders = slow_holders  # type: ignore[method-assign]
    peers = [CallContext(None, "obj_replicate", 1e18, f"{c}" * 32) for c in "bcd"]

    async def ask(ctx: CallContext, oid: str) -> str:
        try:
            await svc.rpc_obj_replicate(ctx, {"id": oid, "replicas": 2}, b"")
        except ReplicationBusy:
            return "busy"
        return "ok"

    flood = [await ask(peers[0], os.urandom(32).hex()) for _ in range(50)]
    assert flood.count("ok") == 3 and svc.replicas_refused == 47
    first = next(iter(svc._pulls))
    assert await ask(peers[0], first) == "ok"  # the same object again: no new pull
    assert [await ask(peers[1], os.urandom(32).hex()) for _ in range(3)] == ["ok", "ok", "busy"]
    assert await ask(peers[2], os.urandom(32).hex()) == "busy"  # 5 in all
    assert len(svc._pulls) == 5 and svc.status()["replica_pulls"] == 5
    hold.set()  # the pulls end (no holder found): their slots are given back
    await until(lambda: not svc._pulls)
    assert await ask(peers[2], os.urandom(32).hex()) == "ok"
    await svc.stop()
