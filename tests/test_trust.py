"""Membership units: certificates, revocations, the policy, invites, the trust service."""

from __future__ import annotations

import asyncio
import base64
import os
import stat

import msgpack
import pytest

from mesh.errors import Error, IdentityError, InviteError, NotAMember
from mesh.net.identity import Identity
from mesh.trust.cert import (
    CLOCK_SKEW,
    MAX_CERT,
    cert_bytes,
    issue_cert,
    issue_revocation,
    parse_cert,
    parse_revocation,
    verify_cert,
)
from mesh.trust.invite import InviteStore, create_invite, parse_invite
from mesh.trust.keys import OWNER_KEY_FILE, Anchor, OwnerKey, mesh_id_from_key
from mesh.trust.policy import MembershipPolicy, Revocations, load_policy
from mesh.trust.provision import create_mesh, provision_member, revoke
from mesh.trust.service import TrustService

NOW = 1_800_000_000.0


@pytest.fixture
def owner(tmp_path):
    return OwnerKey.create(tmp_path / "owner")


def _policy(owner, **kw):
    return MembershipPolicy(
        Anchor(owner.public_key, kw.pop("open", False)), clock=lambda: NOW, **kw
    )


def test_owner_key_file_is_private_and_names_the_mesh(tmp_path):
    key = OwnerKey.create(tmp_path)
    assert stat.S_IMODE((tmp_path / OWNER_KEY_FILE).stat().st_mode) == 0o600
    assert OwnerKey.load(tmp_path).public_key == key.public_key
    assert key.mesh_id == mesh_id_from_key(key.public_key) and len(key.mesh_id) == 16
    assert OwnerKey.create(tmp_path / "b").mesh_id != key.mesh_id
    with pytest.raises(IdentityError, match="already owns"):
        OwnerKey.create(tmp_path)
    os.chmod(tmp_path / OWNER_KEY_FILE, 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        OwnerKey.load(tmp_path)


def test_certificate_is_compact_and_verifies(owner):
    peer = Identity.generate()
    cert = issue_cert(owner, owner.mesh_id, peer.peer_id, ttl=3600, roles=("gpu",), now=NOW)
    assert len(cert.raw) < 130 and len(cert.text) < 180  # fits an mDNS TXT value
    got = _policy(owner).admit(peer.peer_id, cert.text)
    assert (got.peer_id, got.mesh_id, got.roles) == (peer.peer_id, owner.mesh_id, ("gpu",))
    assert got.expires == int(NOW) + 3600 and not got.stranger
    assert _policy(owner).admit(peer.peer_id, cert.raw).serial == cert.serial


def test_refusals_name_their_reason_and_are_counted(owner, tmp_path):
    peer = Identity.generate()
    other_owner = OwnerKey.create(tmp_path / "other")
    policy = _policy(owner)
    good = issue_cert(owner, owner.mesh_id, peer.peer_id, ttl=3600, now=NOW)
    cases = {
        "missing": None,
        "forged": issue_cert(Identity.generate(), owner.mesh_id, peer.peer_id, ttl=60, now=NOW).raw,
        "foreign_mesh": issue_cert(
            other_owner, other_owner.mesh_id, peer.peer_id, ttl=60, now=NOW
        ).raw,
        "wrong_peer": issue_cert(
            owner, owner.mesh_id, Identity.generate().peer_id, ttl=60, now=NOW
        ).raw,
        "expired": issue_cert(
            owner, owner.mesh_id, peer.peer_id, ttl=60, now=NOW - 60 - CLOCK_SKEW - 1
        ).raw,
        "oversized": good.raw + b"\x00" * MAX_CERT,
        "malformed": good.raw[:-1],
    }
    for reason, cert in cases.items():
        with pytest.raises(NotAMember) as info:
            policy.admit(peer.peer_id, cert)
        assert info.value.reason == reason, reason
        assert isinstance(info.value, Error)
    counters = policy.counters()
    assert counters["not_member_refused"] == len(cases)
    assert all(counters[f"not_member_{r}"] == 1 for r in cases)
    assert not policy.is_member(peer.peer_id)
    policy.admit(peer.peer_id, good.raw)
    assert policy.is_member(peer.peer_id)


def test_expiry_tolerates_the_clock_skew_bound_only(owner):
    peer = Identity.generate()
    cert = issue_cert(owner, owner.mesh_id, peer.peer_id, ttl=60, now=NOW)
    verify_cert(
        cert.raw, owner.public_key, owner.mesh_id, peer.peer_id, now=NOW + 60 + CLOCK_SKEW - 1
    )
    with pytest.raises(NotAMember, match="expired"):
        verify_cert(
            cert.raw, owner.public_key, owner.mesh_id, peer.peer_id, now=NOW + 61 + CLOCK_SKEW
        )
    with pytest.raises(NotAMember, match="not valid yet"):
        verify_cert(
            cert.raw, owner.public_key, owner.mesh_id, peer.peer_id, now=NOW - CLOCK_SKEW - 1
        )


def test_every_tampered_byte_is_refused(owner):
    peer = Identity.generate()
    raw = issue_cert(owner, owner.mesh_id, peer.peer_id, ttl=3600, now=NOW).raw
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(NotAMember):
            verify_cert(bytes(bad), owner.public_key, owner.mesh_id, peer.peer_id, now=NOW)


def test_text_form_is_capped_before_decoding():
    with pytest.raises(NotAMember) as info:
        cert_bytes("A" * 100_000)
    assert info.value.reason == "oversized"
    with pytest.raises(NotAMember, match="base64url"):
        cert_bytes("not base64 at all!")
    with pytest.raises(NotAMember, match="malformed"):
        parse_cert(msgpack.packb([1, b"x" * 10, b"y" * 20, 1, 2, 3, ["A B"], b"s" * 64]))


def test_revocations_only_from_the_owner(owner, tmp_path):
    peer = Identity.generate()
    cert = issue_cert(owner, owner.mesh_id, peer.peer_id, ttl=3600, now=NOW)
    policy = _policy(owner)
    policy.admit(peer.peer_id, cert.raw)
    forged = issue_revocation(Identity.generate(), owner.mesh_id, peer.peer_id)
    with pytest.raises(NotAMember, match="forged"):
        parse_revocation(forged.raw, owner.public_key, owner.mesh_id)
    assert policy.revocations.add_raw([forged.raw, b"junk"]) == []
    assert policy.is_member(peer.peer_id)
    real = issue_revocation(owner, owner.mesh_id, peer.peer_id)
    assert [r.peer_id for r in policy.revocations.add_raw([real.raw, real.raw])] == [peer.peer_id]
    assert not policy.is_member(peer.peer_id)
    with pytest.raises(NotAMember) as info:
        policy.admit(peer.peer_id, cert.raw)
    assert info.value.reason == "revoked"


def test_open_mesh_admits_strangers_but_marks_them(owner):
    policy = _policy(owner, open=True)
    stranger = Identity.generate().peer_id
    got = policy.admit(stranger, None)
    assert got.stranger and not policy.is_member(stranger)
    member = Identity.generate().peer_id
    policy.admit(member, issue_cert(owner, owner.mesh_id, member, ttl=60, now=NOW).raw)
    assert policy.is_member(member) and policy.counters()["strangers_admitted"] == 1
    policy.revocations.add_raw([issue_revocation(owner, owner.mesh_id, stranger).raw])
    with pytest.raises(NotAMember, match="revoked"):
        policy.admit(stranger, None)


def test_a_node_of_no_mesh_admits_nobody(tmp_path):
    policy = load_policy(tmp_path)
    with pytest.raises(NotAMember) as info:
        policy.admit(Identity.generate().peer_id, None)
    assert info.value.reason == "no_mesh"


def test_provisioned_member_loads_its_certificate_and_revocations(tmp_path):
    anchor = create_mesh(tmp_path / "owner")
    cert = provision_member(tmp_path / "owner", tmp_path / "a")
    policy = load_policy(tmp_path / "a")
    assert policy.anchor == anchor and policy.own_cert is not None
    assert (
        policy.own_cert.peer_id == Identity.load_or_create(tmp_path / "a").peer_id == cert.peer_id
    )
    victim = Identity.generate().peer_id
    revoke(tmp_path / "owner", victim, into=tmp_path / "a")
    assert victim in load_policy(tmp_path / "a").revocations
    assert victim in load_policy(tmp_path / "owner").revocations
    with pytest.raises(IdentityError, match="already a member"):
        create_mesh(tmp_path / "a")
    other = tmp_path / "other"
    create_mesh(other)
    with pytest.raises(IdentityError, match="is a member of mesh"):
        provision_member(other, tmp_path / "a")


# -- invites ---------------------------------------------------------------------------------


def test_invite_round_trip_and_tampering(owner):
    inv = create_invite(owner, ttl=600, uses=2, addresses=["127.0.0.1:4000"], now=NOW)
    assert len(inv.text) < 400
    got = parse_invite(inv.text, now=NOW)
    assert (got.owner_key, got.uses, got.addresses, got.secret) == (
        owner.public_key,
        2,
        ("127.0.0.1:4000",),
        inv.secret,
    )
    # Change the address (a phishing edit): the owner's signature no longer verifies.
    body = base64.urlsafe_b64decode(inv.text[5:] + "=" * (-len(inv.text[5:]) % 4))
    items = msgpack.unpackb(body)
    items[6] = ["10.6.6.6:4000"]
    edited = "emi1." + base64.urlsafe_b64encode(msgpack.packb(items)).decode().rstrip("=")
    with pytest.raises(InviteError, match="altered"):
        parse_invite(edited, now=NOW)
    for bad in ("", "emi1.", "emi1.!!!", "x" * 5000, inv.text[:-4], "emi2." + inv.text[5:]):
        with pytest.raises(InviteError):
            parse_invite(bad, now=NOW)
    with pytest.raises(InviteError, match="expired"):
        parse_invite(inv.text, now=NOW + 601)


def test_invite_store_counts_uses(owner, tmp_path):
    store = InviteStore(tmp_path / "owner")
    inv = create_invite(owner, ttl=600, uses=2, addresses=["127.0.0.1:1"], now=NOW)
    store.record(inv, now=NOW)
    a, b, c = (Identity.generate().peer_id for _ in range(3))
    store.consume(inv.invite_id, a, now=NOW)
    store.consume(inv.invite_id, a, now=NOW)  # a retry spends nothing
    store.consume(inv.invite_id, b, now=NOW)
    with pytest.raises(InviteError, match="used up"):
        store.consume(inv.invite_id, c, now=NOW)
    # Persisted: a second store (a restarted node, the CLI) sees the same counts.
    with pytest.raises(InviteError, match="used up"):
        InviteStore(tmp_path / "owner").consume(inv.invite_id, c, now=NOW)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert inv.secret.hex() not in store.path.read_text()  # only the public half is kept
    late = create_invite(owner, ttl=10, uses=1, addresses=["127.0.0.1:1"], now=NOW)
    store.record(late, now=NOW)
    with pytest.raises(InviteError, match="expired"):
        store.consume(late.invite_id, c, now=NOW + 11)
    with pytest.raises(InviteError, match="unknown"):
        store.consume(os.urandom(12), c, now=NOW)


def test_looking_an_invite_up_does_not_rewrite_the_store(owner, tmp_path):
    """Every join request, unsigned and well-formed, looks its invite up: that rewrote
    invites.json each time (a file write and a worker thread per request). Now only a
    change writes."""
    store = InviteStore(tmp_path / "owner")
    inv = create_invite(owner, ttl=600, uses=1, addresses=["127.0.0.1:1"], now=NOW)
    store.record(inv, now=NOW)
    before = store.path.stat().st_mtime_ns
    os.utime(store.path, ns=(before - 10**9, before - 10**9))  # so a rewrite would show
    stamped = store.path.stat().st_mtime_ns
    for _ in range(3):
        store.invite_key(inv.invite_id)
    with pytest.raises(InviteError, match="unknown"):
        store.invite_key(os.urandom(12))
    assert store.path.stat().st_mtime_ns == stamped


def test_forged_revocations_log_one_line_a_message(owner, caplog):
    """1024 forged revocation records in one message made 1024 warning lines (the log grew
    with the attacker's bandwidth); now one line says how many were ignored."""
    import logging

    from mesh.trust.cert import issue_revocation

    forger = Identity.generate()  # not the owner: every record fails its signature
    forged = [
        issue_revocation(forger, owner.mesh_id, Identity.generate().peer_id).raw for _ in range(50)
    ]
    revs = Revocations(Anchor(owner.public_key, False))
    with caplog.at_level(logging.WARNING, logger="mesh.trust.policy"):
        assert revs.add_raw(forged) == []
    lines = [r for r in caplog.records if "revocation" in r.getMessage()]
    assert len(lines) == 1 and "ignored 50" in lines[0].getMessage()


# -- the trust service -----------------------------------------------------------------------


class FakeNode:
    def __init__(self, peers):
        self.linked = list(peers)
        self.banned: dict[str, str] = {}
        self.sent: list[tuple[str, str, bytes]] = []

    def connected_peer_ids(self):
        return list(self.linked)

    def ban(self, peer_id, reason):
        self.banned[peer_id] = reason
        if peer_id in self.linked:
            self.linked.remove(peer_id)

    async def notify(self, peer_id, method, params=None, payload=b"", timeout=None):
        self.sent.append((peer_id, method, payload))


class Ctx:
    def __init__(self, peer_id):
        self.peer_id = peer_id


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)  # let the send tasks run (no timing involved)


async def test_trust_service_enforces_persists_and_forwards(owner, tmp_path):
    anchor = Anchor(owner.public_key)
    path = tmp_path / "m" / "revocations.json"
    policy = MembershipPolicy(anchor, revocations=Revocations(anchor, path))
    node = FakeNode(["a", "b", "victim"])
    service = TrustService(node, policy)
    victim = Identity.generate().peer_id
    node.linked[2] = victim
    forged = issue_revocation(Identity.generate(), owner.mesh_id, victim).raw
    real = issue_revocation(owner, owner.mesh_id, victim).raw
    out = await service.rpc_revocations(Ctx("a"), {}, msgpack.packb([forged]))
    assert out == {"new": 0} and node.banned == {} and node.sent == []
    out = await service.rpc_revocations(Ctx("a"), {}, msgpack.packb([real]))
    await _settle()
    assert out == {"new": 1} and victim in node.banned
    assert [(p, m) for p, m, _ in node.sent] == [
        ("b", "trust.revocations")
    ]  # not to a, not to victim
    assert victim in load_policy_revocations(anchor, path)
    # Known already: no second flood.
    await service.rpc_revocations(Ctx("b"), {}, msgpack.packb([real]))
    await _settle()
    assert len(node.sent) == 1


def load_policy_revocations(anchor, path):
    store = Revocations(anchor, path)
    store.reload()
    return store


async def test_trust_service_syncs_new_links_and_the_cli_file(owner, tmp_path):
    (tmp_path / "o").mkdir()
    anchor = Anchor(owner.public_key)
    anchor.save(tmp_path / "o")
    (tmp_path / "o" / OWNER_KEY_FILE).write_bytes(bytes(owner._key))
    os.chmod(tmp_path / "o" / OWNER_KEY_FILE, 0o600)
    policy = MembershipPolicy(
        anchor, revocations=Revocations(anchor, tmp_path / "o" / "revocations.json")
    )
    node = FakeNode(["a"])
    service = TrustService(node, policy)
    service.tick([])
    await _settle()
    assert node.sent == []  # nothing to hand over yet
    victim = Identity.generate().peer_id
    node.linked.append(victim)
    revoke(tmp_path / "o", victim)  # what `edgemesh mesh revoke` does
    service.tick(policy.revocations.reload())
    await _settle()
    assert victim in node.banned
    assert sorted(p for p, _, _ in node.sent) == ["a"]
    node.linked.append("late")
    service.tick([])
    await _settle()
    assert sorted(p for p, _, _ in node.sent) == ["a", "late"]
    with pytest.raises(Error):
        await service.rpc_revocations(Ctx("a"), {}, b"\xc1" * 10)


# -- the reduced surface and the handshake gate ----------------------------------------------


class LinkCtx:
    def __init__(self, peer_id):
        self.peer_id = peer_id
        self.link = object()  # a call from a peer, not from this node


async def test_strangers_of_an_open_mesh_get_no_jobs_or_replicas(owner):
    from mesh.trust.service import MEMBERS_ONLY, members_only

    policy = _policy(owner, open=True)
    calls = []

    async def handler(ctx, params, payload):
        calls.append(ctx.peer_id)
        return {}

    handlers = {name: handler for name in (*MEMBERS_ONLY, "info")}
    members_only(policy, handlers)
    stranger, member = Identity.generate().peer_id, Identity.generate().peer_id
    policy.admit(stranger, None)
    policy.admit(member, issue_cert(owner, owner.mesh_id, member, ttl=60, now=NOW).raw)
    for name in MEMBERS_ONLY:
        with pytest.raises(NotAMember, match="members of this mesh only"):
            await handlers[name](LinkCtx(stranger), {}, b"")
        await handlers[name](LinkCtx(member), {}, b"")
    await handlers["info"](LinkCtx(stranger), {}, b"")
    assert calls == [member] * len(MEMBERS_ONLY) + [stranger]
    assert policy.counters()["not_member_stranger_call"] == len(MEMBERS_ONLY)


def test_handshake_refuses_a_hello_without_a_valid_certificate(owner):
    from mesh.errors import HandshakeError
    from mesh.net.handshake import HandshakeState

    a, b = Identity.generate(), Identity.generate()
    cert_a = issue_cert(owner, owner.mesh_id, a.peer_id, ttl=3600, now=NOW)
    cert_b = issue_cert(owner, owner.mesh_id, b.peer_id, ttl=3600, now=NOW)
    fa, fb = "AA:" * 31 + "AA", "BB:" * 31 + "BB"
    gate_a = MembershipPolicy(Anchor(owner.public_key), own_cert=cert_a, clock=lambda: NOW)
    gate_b = MembershipPolicy(Anchor(owner.public_key), own_cert=cert_b, clock=lambda: NOW)
    sa = HandshakeState(a, offerer=True, local_fp=fa, remote_fp=fb, gate=gate_a)
    sb = HandshakeState(b, offerer=False, local_fp=fb, remote_fp=fa, gate=gate_b)
    proof_b = sb.receive_hello(sa.hello())
    proof_a = sa.receive_hello(sb.hello())
    assert sa.receive_proof(proof_b).peer_id == b.peer_id
    assert sb.receive_proof(proof_a).peer_id == a.peer_id
    # The same exchange without b's certificate: a refuses the hello, signs nothing.
    bare = HandshakeState(b, offerer=False, local_fp=fb, remote_fp=fa)
    sa2 = HandshakeState(a, offerer=True, local_fp=fa, remote_fp=fb, gate=gate_a)
    with pytest.raises(HandshakeError, match="missing"):
        sa2.receive_hello(bare.hello())
    assert gate_a.counters()["not_member_missing"] == 1


def test_a_certificate_that_lapses_no_longer_admits_a_live_peer(owner):
    clock = [NOW]
    policy = MembershipPolicy(Anchor(owner.public_key, False), clock=lambda: clock[0])
    pid = Identity.generate().peer_id
    long_cert = issue_cert(owner, owner.mesh_id, pid, ttl=3600, now=NOW)
    short_cert = issue_cert(owner, owner.mesh_id, pid, ttl=60, now=NOW)
    policy.admit(pid, long_cert.raw)
    policy.admit(pid, short_cert.raw)  # an older certificate replayed (they are public)
    assert policy.still_admits(pid)
    clock[0] = NOW + 60 + CLOCK_SKEW + 1
    assert policy.still_admits(pid)  # the longest-lasting certificate counts
    clock[0] = NOW + 3600 + CLOCK_SKEW + 1
    assert not policy.still_admits(pid)
    assert not policy.still_admits(Identity.generate().peer_id)  # never admitted
    opened = MembershipPolicy(Anchor(owner.public_key, True), clock=lambda: clock[0])
    opened.admit(pid, long_cert.raw)
    assert opened.still_admits(pid)  # an open mesh keeps it, as a stranger
    assert not opened.is_member(pid)
