"""The direct bulk path: authenticated by the links' Ed25519 keys, encrypted, and falling back
to the WebRTC link whenever it cannot be set up (over real loopback TCP, in one process)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh.net.identity import Identity
from mesh.net.rpc import Reply
from mesh.net.view import NetViewError, PeerNet, parse_info
from mesh.storage.fastpath import FastPath


class FakeNode:
    def __init__(self, identity: Identity, known: list[Identity], link_keys: dict[str, bytes]):
        self.identity = identity
        self.me = identity.peer_id
        self.config = SimpleNamespace(signaling_host="127.0.0.1")
        self.peers = SimpleNamespace(
            links=lambda: [
                SimpleNamespace(peer_id=k.peer_id, public_key=k.public_key) for k in known
            ]
        )
        self._link_keys = link_keys
        self.link_calls = 0

    def announced_addresses(self) -> list[str]:
        return ["127.0.0.1"]

    def link(self, peer: str) -> Any:
        return SimpleNamespace(public_key=self._link_keys[peer])

    async def call(
        self,
        peer: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        self.link_calls += 1
        return Reply({}, b"via-link")


def make(identity: Identity, known: list[Identity], link_keys: dict[str, bytes]) -> FastPath:
    node = FakeNode(identity, known, link_keys)
    served: list[str] = []

    async def serve_chunk(peer: str, sha: str) -> bytes:
        served.append(peer)
        return b"chunk:" + sha.encode()

    svc = SimpleNamespace(
        node=node,
        serve_chunk=serve_chunk,
        served=served,
        net=SimpleNamespace(config=SimpleNamespace(extra={}), peers={}),
    )
    return FastPath(svc)  # type: ignore[arg-type]


async def test_fast_path_reads_between_linked_peers_and_refuses_others(tmp_path: Path):
    s_id = Identity.load_or_create(tmp_path / "s")
    c_id = Identity.load_or_create(tmp_path / "c")
    stranger = Identity.load_or_create(tmp_path / "x")
    server = make(s_id, [c_id], {})
    await server.start("127.0.0.1", "127.0.0.1")
    try:
        # A linked peer expecting the server's real key: served over the fast path.
        client = make(c_id, [s_id], {s_id.peer_id: s_id.public_key})
        client.svc.net.peers[s_id.peer_id] = PeerNet(fast=server.address)
        sha = "ab" * 32
        for _ in range(3):  # the connection is reused
            assert await client.read_chunk(s_id.peer_id, sha, 0) == b"chunk:" + sha.encode()
        assert client.node.link_calls == 0 and client.fetched > 0
        assert server.svc.served == [c_id.peer_id] * 3  # accounted to the right peer

        # Someone the server has no link with: refused; the client falls back to its link.
        outsider = make(stranger, [s_id], {s_id.peer_id: s_id.public_key})
        outsider.svc.net.peers[s_id.peer_id] = PeerNet(fast=server.address)
        assert await outsider.read_chunk(s_id.peer_id, sha, 0) == b"via-link"
        assert outsider.node.link_calls == 1

        # A client whose link proved another key (a man in the middle at the fast address):
        # the server's signature does not verify, so nothing is read from it.
        fooled = make(c_id, [s_id], {s_id.peer_id: stranger.public_key})
        fooled.svc.net.peers[s_id.peer_id] = PeerNet(fast=server.address)
        assert await fooled.read_chunk(s_id.peer_id, sha, 0) == b"via-link"
        assert server.svc.served == [c_id.peer_id] * 3
        await client.stop()
        await outsider.stop()
        await fooled.stop()
    finally:
        await server.stop()


async def test_advertised_fast_addresses_must_be_ip_literals(tmp_path: Path, monkeypatch):
    """A peer's net info names its fast address: a hostname (a DNS lookup, and a dial to
    wherever it resolves) or junk is refused before any lookup or connection."""
    s_id = Identity.load_or_create(tmp_path / "s")
    c_id = Identity.load_or_create(tmp_path / "c")
    server = make(s_id, [c_id], {})
    await server.start("127.0.0.1", "127.0.0.1")
    dialed: list[Any] = []
    real_open = asyncio.open_connection

    async def recording_open(host: Any, port: Any, **kw: Any) -> Any:
        dialed.append((host, port))
        return await real_open(host, port, **kw)

    monkeypatch.setattr(asyncio, "open_connection", recording_open)
    port = server.address.rpartition(":")[2]
    bad = [
        f"localhost:{port}",
        "junk",
        f"127.0.0.1:{port}x",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        f"0.0.0.0:{port}",
        f"[::1]:{port}]",
        f" 127.0.0.1:{port}",
    ]
    try:
        for address in bad:
            client = make(c_id, [s_id], {s_id.peer_id: s_id.public_key})
            client.svc.net.peers[s_id.peer_id] = PeerNet(fast=address)
            assert await client.read_chunk(s_id.peer_id, "ab" * 32, 0) == b"via-link", address
            await client.stop()
        assert dialed == []  # nothing was looked up or dialed
        good = make(c_id, [s_id], {s_id.peer_id: s_id.public_key})
        good.svc.net.peers[s_id.peer_id] = PeerNet(fast=server.address)
        assert await good.read_chunk(s_id.peer_id, "ab" * 32, 0) != b"via-link"
        assert dialed == [("127.0.0.1", int(port))]
        await good.stop()
    finally:
        await server.stop()


def test_net_info_refuses_a_fast_address_that_is_no_ip_literal():
    base = {"zone": "z", "price": 0.0, "coord": [0.0, 0.0, 0.1, 1.0, 0.0]}
    for bad in ("localhost:9000", "evil.example:443", "1.2.3.4:0", "1.2.3.4", "x:y"):
        with pytest.raises(NetViewError):
            parse_info({**base, "fast": bad})
    assert parse_info({**base, "fast": "10.0.0.2:9000"}).fast == "10.0.0.2:9000"
    assert parse_info({**base, "fast": "[fe80::1]:9000"}).fast == "[fe80::1]:9000"


async def test_an_unanswering_fast_address_is_probed_once_and_remembered(
    tmp_path: Path, monkeypatch
):
    """A fast address that never accepts (a firewall dropping SYNs, a private address seen
    from another network): concurrent reads wait for one probe, which gives up after the
    short connect timeout, and all of them read over the link; later reads go straight to
    the link until the retry time, or until the peer announces another address."""
    from mesh.storage import fastpath

    s_id = Identity.load_or_create(tmp_path / "s")
    c_id = Identity.load_or_create(tmp_path / "c")
    dials = 0

    async def silent(host: Any, port: Any, **kw: Any) -> Any:
        nonlocal dials
        dials += 1
        await asyncio.Event().wait()  # a SYN nobody answers

    monkeypatch.setattr(asyncio, "open_connection", silent)
    monkeypatch.setattr(fastpath, "CONNECT_TIMEOUT", 0.3)
    client = make(c_id, [s_id], {s_id.peer_id: s_id.public_key})
    client.svc.net.peers[s_id.peer_id] = PeerNet(fast="10.1.2.3:4000")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reads = [client.read_chunk(s_id.peer_id, f"{i:02x}" * 32, 0) for i in range(6)]
        assert await asyncio.gather(*reads) == [b"via-link"] * 6
        assert loop.time() - t0 < 2.0  # one connect timeout, not one per read or 5 s
        assert dials == 1 and client.node.link_calls == 6
        assert await client.read_chunk(s_id.peer_id, "ff" * 32, 0) == b"via-link"
        assert dials == 1  # remembered
        assert client.as_dict()["unreachable"] == [s_id.peer_id]
        client.svc.net.peers[s_id.peer_id] = PeerNet(fast="10.1.2.3:4001")  # it moved
        assert await client.read_chunk(s_id.peer_id, "ee" * 32, 0) == b"via-link"
        assert dials == 2  # a new address is tried at once
        retry, address = client._unreachable[s_id.peer_id]
        client._unreachable[s_id.peer_id] = (loop.time() - 1, address)  # the retry time came
        assert await client.read_chunk(s_id.peer_id, "dd" * 32, 0) == b"via-link"
        assert dials == 3
    finally:
        await client.stop()
