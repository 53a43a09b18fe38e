"""Redeeming invites over real HTTP: an aiohttp server with the owner's join route, the
joiner's client, and ``edgemesh node --join`` as a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys

import pytest
from aiohttp import web

from mesh.errors import InviteError
from mesh.net.identity import Identity
from mesh.trust.invite import InviteStore, create_invite
from mesh.trust.join import JOIN_PATH, Redeemer, join_request, redeem_invite
from mesh.trust.keys import Anchor
from mesh.trust.policy import load_policy
from mesh.trust.provision import create_mesh, owner_of


@pytest.fixture
async def owner_server(tmp_path):
    create_mesh(tmp_path / "owner")
    owner, anchor = owner_of(tmp_path / "owner")
    redeemer = Redeemer(owner, anchor, InviteStore(tmp_path / "owner"))
    app = web.Application()
    app.add_routes(redeemer.routes())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield redeemer, f"127.0.0.1:{port}"
    await runner.cleanup()


def _invite(redeemer, address, **kw):
    inv = create_invite(
        redeemer.owner, ttl=kw.pop("ttl", 600), uses=kw.pop("uses", 1), addresses=[address], **kw
    )
    redeemer.store.record(inv)
    return inv


async def test_redeem_over_http_then_used_up(owner_server, tmp_path):
    redeemer, address = owner_server
    inv = _invite(redeemer, address, uses=1)
    joiner = Identity.load_or_create(tmp_path / "j")
    anchor, cert = await redeem_invite(inv, joiner)
    assert anchor == redeemer.anchor and cert.peer_id == joiner.peer_id
    # The certificate admits the joiner to the owner's policy.
    assert load_policy(tmp_path / "owner").admit(joiner.peer_id, cert.raw).peer_id == joiner.peer_id
    again = await redeem_invite(inv, joiner)  # a retry by the same peer spends nothing
    assert again[1].peer_id == joiner.peer_id
    with pytest.raises(InviteError, match="used up"):
        await redeem_invite(inv, Identity.generate())
    assert redeemer.issued == 2 and redeemer.refused["invite is used up"] == 1


async def test_forged_expired_and_unknown_invites_are_refused(owner_server):
    redeemer, address = owner_server
    inv = _invite(redeemer, address)
    wrong_secret = dataclasses.replace(inv, secret=os.urandom(32))
    with pytest.raises(InviteError, match="forged"):
        await redeem_invite(wrong_secret, Identity.generate())
    unknown = dataclasses.replace(inv, invite_id=os.urandom(12))
    with pytest.raises(InviteError, match="unknown"):
        await redeem_invite(unknown, Identity.generate())
    short = _invite(redeemer, address, ttl=-1)
    with pytest.raises(InviteError, match="expired"):
        await redeem_invite(short, Identity.generate())
    # Another mesh's invite for the same id: the request is bound to the mesh, so it fails.
    other = create_invite(Identity.generate(), ttl=60, uses=1, addresses=[address])
    foreign = dataclasses.replace(inv, owner_key=other.owner_key)
    with pytest.raises(InviteError, match="forged"):
        await redeem_invite(foreign, Identity.generate())
    assert redeemer.issued == 0


def test_join_request_checks(tmp_path):
    create_mesh(tmp_path / "o")
    owner, anchor = owner_of(tmp_path / "o")
    redeemer = Redeemer(owner, anchor, InviteStore(tmp_path / "o"))
    inv = create_invite(owner, ttl=600, uses=1, addresses=["127.0.0.1:1"])
    redeemer.store.record(inv)
    joiner = Identity.generate()
    for body, match in (
        (b"\x00" * 4096, "too large"),
        (b"\xc1\xc1", "malformed"),
        (join_request(inv, joiner, now=0), "stale"),
    ):
        with pytest.raises(InviteError, match=match):
            redeemer.redeem(body)
    # A signature by another identity than the key it names.
    req = bytearray(join_request(inv, joiner))
    req[-1] ^= 1
    with pytest.raises(InviteError, match="forged"):
        redeemer.redeem(bytes(req))


@pytest.mark.network
async def test_node_join_redeems_before_starting(owner_server, tmp_path):
    redeemer, address = owner_server
    inv = _invite(redeemer, address)
    data_dir = tmp_path / "joiner"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        "node",
        "--data-dir",
        str(data_dir),
        "--no-mdns",
        "--api",
        "127.0.0.1:0",
        "--join",
        inv.text,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        ready = json.loads(line)
    finally:
        proc.terminate()
        await proc.wait()
    policy = load_policy(data_dir)
    assert Anchor.load(data_dir) == redeemer.anchor
    assert policy.own_cert is not None and policy.own_cert.peer_id == ready["peer_id"]
    assert redeemer.issued == 1
    # A used-up invite: the node does not start, and says why.
    other = tmp_path / "late"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        "node",
        "--data-dir",
        str(other),
        "--no-mdns",
        "--api",
        "127.0.0.1:0",
        "--join",
        inv.text,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and out == b"" and b"used up" in err
    assert JOIN_PATH == "/edgemesh/join"
