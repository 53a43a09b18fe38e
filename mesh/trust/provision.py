"""Offline steps on data dirs: create a mesh, make a node a member, revoke one.

``edgemesh mesh create|revoke`` and the local meshes of the demo and tests use these; a node
far away joins with an invite instead (:mod:`mesh.trust.join`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mesh.errors import IdentityError
from mesh.net.identity import Identity
from mesh.trust.cert import MemberCert, Revocation, issue_cert, issue_revocation
from mesh.trust.join import DEFAULT_CERT_TTL
from mesh.trust.keys import CERT_FILE, REVOCATIONS_FILE, Anchor, OwnerKey, write_private
from mesh.trust.policy import Revocations

__all__ = ["create_mesh", "save_membership", "provision_member", "revoke", "owner_of"]

log = logging.getLogger(__name__)


def owner_of(data_dir: Path) -> tuple[OwnerKey, Anchor]:
    """The owner key and anchor of the mesh ``data_dir`` owns; IdentityError if none."""
    owner = OwnerKey.load(Path(data_dir))
    anchor = Anchor.load(Path(data_dir))
    if owner is None or anchor is None:
        raise IdentityError(f"{data_dir} owns no mesh: run `edgemesh mesh create` there")
    if anchor.owner_key != owner.public_key:
        raise IdentityError(f"{data_dir}: the mesh anchor does not match its owner key")
    return owner, anchor


def save_membership(data_dir: Path, anchor: Anchor, cert: MemberCert) -> None:
    """Make ``data_dir`` a member: the anchor and the node's certificate."""
    existing = Anchor.load(Path(data_dir))
    if existing is not None and existing.owner_key != anchor.owner_key:
        raise IdentityError(
            f"{data_dir} is a member of mesh {existing.mesh_id}, not {anchor.mesh_id}"
        )
    anchor.save(Path(data_dir))
    write_private(Path(data_dir) / CERT_FILE, (cert.text + "\n").encode())


def create_mesh(
    data_dir: Path, *, open_mesh: bool = False, ttl: float = 10 * 365 * 86400.0
) -> Anchor:
    """A new mesh owned by ``data_dir``; the node of that data dir becomes its first member."""
    data_dir = Path(data_dir)
    if Anchor.load(data_dir) is not None:
        raise IdentityError(f"{data_dir} is already a member of a mesh")
    owner = OwnerKey.create(data_dir)
    anchor = Anchor(owner.public_key, open_mesh)
    me = Identity.load_or_create(data_dir)
    cert = issue_cert(owner, anchor.mesh_id, me.peer_id, ttl=ttl, roles=("owner",))
    save_membership(data_dir, anchor, cert)
    return anchor


def provision_member(
    owner_dir: Path,
    data_dir: Path,
    *,
    ttl: float = DEFAULT_CERT_TTL,
    roles: tuple[str, ...] = (),
    now: float | None = None,
) -> MemberCert:
    """Issue a certificate for the node of ``data_dir`` (its identity is created if needed)
    with the owner key in ``owner_dir``, and store it there: no invite round trip."""
    owner, anchor = owner_of(owner_dir)
    me = Identity.load_or_create(data_dir)
    cert = issue_cert(owner, anchor.mesh_id, me.peer_id, ttl=ttl, roles=roles, now=now)
    save_membership(data_dir, anchor, cert)
    return cert


def revoke(owner_dir: Path, peer_id: str, *, into: Path | None = None) -> Revocation:
    """Sign a revocation of ``peer_id`` and add it to ``revocations.json`` of ``owner_dir``
    (and of ``into``, a member's data dir): the node running there spreads it."""
    owner, anchor = owner_of(owner_dir)
    rev = issue_revocation(owner, anchor.mesh_id, peer_id)
    for target in [Path(owner_dir)] + ([Path(into)] if into else []):
        store = Revocations(anchor, target / REVOCATIONS_FILE)
        store.reload()
        store.add_raw([rev.raw])
        store.save()
    log.info("revoked %s in mesh %s", peer_id[:12], anchor.mesh_id)
    return rev
