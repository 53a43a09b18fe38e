"""Only members get in: real node processes, over mDNS, ``--peer``, MQTT and the DHT.

Members are made by the local mesh (offline certificates). Intruders run
tests/fixtures/intruder_node.py: the real node whose own policy admits everyone, so it dials
and answers anyone, showing what its data dir holds: no certificate, a forged one (signed by
a key that is not the owner's), an expired one, a revoked one. A control intruder holding a
valid certificate runs the same code and must connect, so each test can fail.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for
from mesh.net.identity import Identity
from mesh.trust.cert import CLOCK_SKEW, issue_cert
from mesh.trust.keys import CERT_FILE, OwnerKey, write_private
from mesh.trust.provision import owner_of, provision_member, revoke

pytestmark = pytest.mark.network

INTRUDER = "tests.fixtures.intruder_node"
KINDS = ("missing", "forged", "expired", "revoked")


def _prepare(mesh: LocalMesh, name: str, kind: str, members: list[NodeProcess]) -> None:
    data_dir = mesh.base_dir / name
    if kind == "missing":
        Identity.load_or_create(data_dir)
        return
    if kind == "expired":
        provision_member(mesh.owner_dir, data_dir, ttl=60, now=1_000_000_000)
        return
    provision_member(mesh.owner_dir, data_dir)  # the mesh's anchor, a valid certificate
    if kind == "forged":
        _, anchor = owner_of(mesh.owner_dir)
        rogue = OwnerKey.create(mesh.base_dir / f"{name}-rogue")
        pid = Identity.load_or_create(data_dir).peer_id
        cert = issue_cert(rogue, anchor.mesh_id, pid, ttl=3600)
        write_private(data_dir / CERT_FILE, (cert.text + "\n").encode())
    elif kind == "revoked":
        pid = Identity.load_or_create(data_dir).peer_id
        for m in members:  # as if the revocation had spread to them already
            revoke(mesh.owner_dir, pid, into=m.data_dir)


async def _revocation_known(mesh: LocalMesh, members: list[NodeProcess]) -> None:
    """Wait until every member read the revocation _prepare wrote to its data dir (its trust
    service polls the file): the revoked intruder starts only then, as if the revocation had
    spread before. (A member that admits a peer its revocation list does not name yet dials
    it like any member, and the handshake's check refuses it: a failed handshake, which is
    not what these tests ask about.)"""

    async def known() -> bool | None:
        for m in members:
            if (await mesh.get(m, "/v1/info"))["trust"]["revoked"] < 1:
                return None
        return True

    await wait_for(known, 20, "members to read the revocation")


async def _intruders(
    mesh: LocalMesh, members: list[NodeProcess], args: list[str]
) -> tuple[list[NodeProcess], NodeProcess]:
    out = []
    for kind in KINDS:
        await asyncio.to_thread(_prepare, mesh, f"x-{kind}", kind, members)
        if kind == "revoked":
            await _revocation_known(mesh, members)
        out.append(await mesh.start_node(f"x-{kind}", args, module=INTRUDER, member=False))
    control = await mesh.start_node("x-valid", args, module=INTRUDER)
    return out, control


async def _check_refused(
    mesh: LocalMesh, members: list[NodeProcess], intruders: list[NodeProcess], control: NodeProcess
) -> None:
    # The control (same code, valid certificate) connects: the path works.
    await mesh.wait_connected(40, members + [control])

    async def refused_all() -> dict[str, int] | None:
        total: dict[str, int] = {}
        for m in members:
            for k, v in (await mesh.get(m, "/v1/info"))["counters"].items():
                total[k] = total.get(k, 0) + v
        # A revocation the member's trust service already enforced is a ban: counted too.
        total["not_member_revoked"] = total.get("not_member_revoked", 0) + total["banned_refused"]
        mesh.last_counters = total  # type: ignore[attr-defined]
        return total if all(total.get(f"not_member_{k}", 0) >= 1 for k in KINDS) else None

    try:
        counters = await wait_for(refused_all, 40, "refusals of every kind")
    except Exception:
        print(mesh.last_counters)  # type: ignore[attr-defined]
        raise
    assert counters["not_member_refused"] >= len(KINDS)
    bad = {x.peer_id for x in intruders}
    for m in members:  # (the control admits anyone: it runs the intruder's code)
        assert not bad & await mesh.connected_ids(m)
    ids = {m.peer_id for m in members}
    for x in intruders:
        assert not ids & await mesh.connected_ids(x)
        # Refused before any WebRTC work: no handshake with a member ever failed. (Intruders
        # link with each other and the control, and those handshakes are not the question.)
        heard = await mesh.get(x, "/v1/peers?all=1")
        failed = {
            p["name"]: (p["handshake_failures"], p["last_error"])
            for p in heard
            if p["peer_id"] in ids and p["handshake_failures"]
        }
        assert not failed, (x.data_dir.name, failed)
        assert all(p["state"] != "connected" for p in heard if p["peer_id"] in ids)


async def test_non_members_never_connect_over_mdns(local_mesh):
    members = await local_mesh.start_nodes([f"m{i}" for i in range(2)])
    intruders, control = await _intruders(local_mesh, members, [])
    await _check_refused(local_mesh, members, intruders, control)


async def test_non_members_never_connect_over_peer(local_mesh):
    a = await local_mesh.start_node("m0", ["--no-mdns"])
    b = await local_mesh.start_node("m1", ["--no-mdns", "--peer", a.signaling])
    intruders, control = await _intruders(local_mesh, [a, b], ["--no-mdns", "--peer", a.signaling])
    await _check_refused(local_mesh, [a], intruders, control)
    info = await local_mesh.get(a, "/v1/info")
    assert info["counters"].get("not_member_from_offer", 0) >= len(KINDS)


async def test_non_members_never_connect_over_mqtt(local_mesh, broker):
    args = ["--no-mdns", "--mqtt", broker.url]
    members = await local_mesh.start_nodes([f"m{i}" for i in range(2)], args)
    intruders, control = await _intruders(local_mesh, members, args)
    await _check_refused(local_mesh, members, intruders, control)


async def test_non_members_never_connect_over_the_dht(local_mesh):
    first = await local_mesh.start_node(
        "m0", ["--no-mdns", "--dht-port", "0", "--signaling", "127.0.0.1:0"]
    )
    args = ["--no-mdns", "--bootstrap", first.ready["dht"], "--signaling", "127.0.0.1:0"]
    second = await local_mesh.start_node("m1", args)
    intruders, control = await _intruders(local_mesh, [first, second], args)
    await _check_refused(local_mesh, [first, second], intruders, control)
    info = await local_mesh.get(first, "/v1/info")
    # Refused at the DHT's datagrams (a non-member is not answered) or at its records.
    counted = info["counters"]
    refused = counted.get("not_member_from_dht_datagram", 0) + counted.get("not_member_from_dht", 0)
    assert refused >= 1


async def test_revoked_member_is_dropped_within_seconds(local_mesh):
    a, b, c = await local_mesh.start_nodes(["a", "b", "c"])
    await local_mesh.wait_connected(40)
    # `edgemesh mesh revoke` on the owner's machine; here a's node plays the owner's node,
    # which picks the revocation up from its data dir and spreads it.
    await asyncio.to_thread(revoke, local_mesh.owner_dir, c.peer_id, into=a.data_dir)

    async def dropped() -> bool:
        return all([c.peer_id not in await local_mesh.connected_ids(n) for n in (a, b)])

    await wait_for(dropped, 10, "the revoked member to be dropped")
    # b learned it from a (not from a file): it persisted it and refuses c from now on.
    saved = json.loads((b.data_dir / "revocations.json").read_text())["revocations"]
    assert len(saved) == 1
    info = await local_mesh.get(b, "/v1/info")
    assert info["trust"]["revoked"] == 1 and c.peer_id in info["banned"]
    await local_mesh.wait_connected(20, [a, b])


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_invite_redeemed_at_the_owner_node_then_connects(local_mesh):
    owner_dir = local_mesh.base_dir / "owner"
    rc, _, err = await _cli("mesh", "create", "--data-dir", str(owner_dir))
    assert rc == 0, err
    owner = await local_mesh.start_node("owner", ["--no-mdns"], member=False)
    rc, out, err = await _cli("mesh", "invite", "--data-dir", str(owner_dir), "--json")
    assert rc == 0, err
    invite = json.loads(out)["invite"]
    joiner = await local_mesh.start_node("joiner", ["--no-mdns", "--join", invite], member=False)
    await local_mesh.wait_connected(40, [owner, joiner])
    info = await local_mesh.get(joiner, "/v1/info")
    assert (
        info["trust"]["member"]
        and info["trust"]["mesh_id"]
        == ((await local_mesh.get(owner, "/v1/info"))["trust"]["mesh_id"])
    )
    # The invite had one use: a second node is refused by the owner's node.
    late = local_mesh.base_dir / "late"
    rc, _, err = await _cli("node", "--data-dir", str(late), "--no-mdns", "--join", invite)
    assert rc == 1 and "used up" in err
    # Revoking the joiner at the owner's machine drops it within seconds.
    rc, _, err = await _cli("mesh", "revoke", "--data-dir", str(owner_dir), joiner.peer_id)
    assert rc == 0, err

    async def dropped() -> bool:
        return joiner.peer_id not in await local_mesh.connected_ids(owner)

    await wait_for(dropped, 10, "the revoked joiner to be dropped")


async def test_a_certificate_that_expires_while_linked_drops_the_link(local_mesh):
    a = await local_mesh.start_node("a")
    # b's certificate was issued in the past: it lapses (expiry + the skew bound) LIFETIME s
    # from now, while its link to a is up.
    lifetime = 15.0
    now = time.time()
    issued = now - CLOCK_SKEW - 100
    await asyncio.to_thread(
        provision_member,
        local_mesh.owner_dir,
        local_mesh.base_dir / "b",
        ttl=100 + lifetime,
        now=issued,
    )
    b = await local_mesh.start_node("b", member=False)
    await local_mesh.wait_connected(lifetime - (time.time() - now) - 1, [a, b])
    assert time.time() < now + lifetime  # linked before the certificate lapsed

    async def dropped() -> bool:
        return b.peer_id not in await local_mesh.connected_ids(a)

    await wait_for(dropped, lifetime + 5, "the expired member to be dropped")
    assert time.time() >= now + lifetime - 1  # not before its certificate lapsed

    async def refused_again() -> int:
        info = await local_mesh.get(a, "/v1/info")
        return int(info["counters"].get("not_member_expired", 0))

    await wait_for(refused_again, 20, "b's reconnection to be refused as expired")
    assert b.peer_id not in await local_mesh.connected_ids(a)
    assert a.peer_id not in await local_mesh.connected_ids(b)

    # With a valid certificate again (renewed, node restarted), b is back in.
    local_mesh.kill(b, signal.SIGTERM)
    await b.proc.wait()
    b2 = await local_mesh.start_node("b")
    await local_mesh.wait_connected(40, [a, b2])
