"""Member certificates and revocations: compact, owner-signed, parsed with caps.

A certificate is the msgpack list ``[1, mesh(10 B), peer(20 B), serial, issued, expires,
roles, sig]``; the owner signs the canonical msgpack of everything before ``sig``. Encoded it
is about 120 bytes (160 as base64url text), so it fits an mDNS TXT value (< 250 bytes). A
revocation is ``[1, mesh, peer, time, sig]``: the owner withdraws every certificate of a peer.

Parsing checks the size before decoding and the signature before anything is used; nothing in
a certificate is trusted until :func:`verify_cert` returned it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh.errors import IdentityError, NotAMember
from mesh.net.identity import Identity, verify
from mesh.net.wire import brief, check_depth
from mesh.trust.keys import mesh_id_bytes, peer_id_bytes, peer_id_text

__all__ = [
    "MemberCert",
    "Revocation",
    "issue_cert",
    "parse_cert",
    "verify_cert",
    "issue_revocation",
    "parse_revocation",
    "cert_bytes",
    "MAX_CERT",
    "MAX_CERT_TEXT",
    "CLOCK_SKEW",
]

MAX_CERT = 200  # encoded bytes; a full certificate is ~120
MAX_CERT_TEXT = 4 * ((MAX_CERT + 2) // 3)
MAX_REVOCATION = 128
MAX_ROLES = 4
MAX_ROLE_LEN = 16
# A certificate is good from ``issued - CLOCK_SKEW`` to ``expires + CLOCK_SKEW``: members'
# clocks disagree by this much at most before a certificate is refused as not yet or no
# longer valid.
CLOCK_SKEW = 120.0
_CERT_CONTEXT = b"edgemesh/member/v1\x00"
_REVOKE_CONTEXT = b"edgemesh/revoke/v1\x00"
_B64_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class MemberCert:
    mesh_id: str
    peer_id: str
    serial: int
    issued: int
    expires: int
    roles: tuple[str, ...]
    raw: bytes  # the signed encoding; b"" for a stranger in an open mesh
    stranger: bool = False

    @property
    def text(self) -> str:
        """base64url without padding: for text records (mDNS TXT, JSON)."""
        return base64.urlsafe_b64encode(self.raw).decode("ascii").rstrip("=")

    def expired(self, now: float, skew: float = CLOCK_SKEW) -> bool:
        return now > self.expires + skew

    @classmethod
    def for_stranger(cls, peer_id: str) -> MemberCert:
        return cls("", peer_id, 0, 0, 0, (), b"", stranger=True)


@dataclass(frozen=True)
class Revocation:
    mesh_id: str
    peer_id: str
    time: int
    raw: bytes


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _unpack(raw: bytes, cap: int) -> Any:
    """The decoded value, None if malformed (nested too deep included)."""
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            max_str_len=cap,
            max_bin_len=cap,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
        check_depth(value, what="certificate")
    except Exception:  # msgpack raises several unrelated types on bad input
        return None
    return value


def _check_roles(roles: Any) -> tuple[str, ...]:
    if not isinstance(roles, list | tuple) or len(roles) > MAX_ROLES:
        raise ValueError(f"at most {MAX_ROLES} roles")
    for role in roles:
        if not isinstance(role, str) or len(role) > MAX_ROLE_LEN or not _ROLE_RE.match(role):
            raise ValueError(f"bad role {role!r}")
    return tuple(roles)


def issue_cert(
    owner: Identity,
    mesh_id: str,
    peer_id: str,
    *,
    ttl: float,
    roles: tuple[str, ...] = (),
    now: float | None = None,
) -> MemberCert:
    """Sign a certificate for ``peer_id`` valid ``ttl`` seconds from ``now``."""
    issued = int(time.time() if now is None else now)
    fields = [
        1,
        mesh_id_bytes(mesh_id),
        peer_id_bytes(peer_id),
        int.from_bytes(os.urandom(4), "big"),
        issued,
        max(0, int(issued + ttl)),
        list(_check_roles(roles)),
    ]
    raw = _pack(fields + [owner.sign(_CERT_CONTEXT + _pack(fields))])
    return parse_cert(raw)


def cert_bytes(cert: bytes | str | None) -> bytes | None:
    """A certificate as raw bytes from its binary or text form (capped before decoding)."""
    if cert is None or isinstance(cert, bytes):
        return cert
    if not isinstance(cert, str):
        raise NotAMember("malformed", f"certificate is a {type(cert).__name__}")
    if len(cert) > MAX_CERT_TEXT:
        raise NotAMember("oversized", f"certificate text of {len(cert)} characters")
    if not _B64_RE.match(cert):
        raise NotAMember("malformed", "certificate text is not base64url")
    try:
        return base64.urlsafe_b64decode(cert + "=" * (-len(cert) % 4))
    except (binascii.Error, ValueError):
        raise NotAMember("malformed", "certificate text is not base64url") from None


def parse_cert(raw: bytes) -> MemberCert:
    """Decode the structure (no signature check: see :func:`verify_cert`)."""
    if len(raw) > MAX_CERT:
        raise NotAMember("oversized", f"certificate of {len(raw)} bytes exceeds {MAX_CERT}")
    items = _unpack(raw, MAX_CERT)
    if not isinstance(items, list) or len(items) != 8:
        raise NotAMember("malformed", "certificate is not a list of 8 fields")
    v, mesh, peer, serial, issued, expires, roles, sig = items
    if v != 1:
        raise NotAMember("malformed", f"unsupported certificate version {brief(v)}")
    if not (isinstance(mesh, bytes) and len(mesh) == 10 and isinstance(peer, bytes)):
        raise NotAMember("malformed", "bad mesh or peer field")
    if len(peer) != 20 or not isinstance(sig, bytes) or len(sig) != 64:
        raise NotAMember("malformed", "bad peer or signature field")
    for value in (serial, issued, expires):
        if type(value) is not int or not 0 <= value < 1 << 40:
            raise NotAMember("malformed", "serial and times must be small integers")
    try:
        role_tuple = _check_roles(roles)
    except ValueError as exc:
        raise NotAMember("malformed", str(exc)) from None
    return MemberCert(
        peer_id_text(mesh), peer_id_text(peer), serial, issued, expires, role_tuple, bytes(raw)
    )


def _signed_part(raw: bytes, n_fields: int, cap: int) -> tuple[list[Any], bytes]:
    items = _unpack(raw, cap)
    if not isinstance(items, list) or len(items) != n_fields:
        raise NotAMember("malformed", "wrong number of fields")
    return items[:-1], items[-1]


def verify_cert(
    raw: bytes,
    owner_key: bytes,
    mesh_id: str,
    peer_id: str,
    *,
    now: float | None = None,
    skew: float = CLOCK_SKEW,
) -> MemberCert:
    """The certificate, if ``owner_key`` signed it for ``peer_id`` in ``mesh_id`` and it is
    valid now; else :class:`NotAMember` with the precise reason."""
    cert = parse_cert(raw)
    if cert.mesh_id != mesh_id:
        raise NotAMember("foreign_mesh", f"certificate of mesh {cert.mesh_id}, not {mesh_id}")
    fields, sig = _signed_part(raw, 8, MAX_CERT)
    try:
        verify(owner_key, _CERT_CONTEXT + _pack(fields), sig)
    except IdentityError:
        raise NotAMember("forged", "the mesh owner did not sign this certificate") from None
    if cert.peer_id != peer_id:
        raise NotAMember("wrong_peer", f"certificate of {cert.peer_id[:12]}, not {peer_id[:12]}")
    t = time.time() if now is None else now
    if cert.expired(t, skew):
        raise NotAMember("expired", f"certificate expired {t - cert.expires:.0f} s ago")
    if t < cert.issued - skew:
        raise NotAMember("expired", "certificate is not valid yet")
    return cert


def issue_revocation(
    owner: Identity, mesh_id: str, peer_id: str, now: float | None = None
) -> Revocation:
    ts = int(time.time() if now is None else now)
    fields = [1, mesh_id_bytes(mesh_id), peer_id_bytes(peer_id), ts]
    raw = _pack(fields + [owner.sign(_REVOKE_CONTEXT + _pack(fields))])
    return Revocation(mesh_id, peer_id, ts, raw)


def parse_revocation(raw: bytes, owner_key: bytes, mesh_id: str) -> Revocation:
    """A revocation the owner of ``mesh_id`` signed; NotAMember("forged"/...) otherwise."""
    if not isinstance(raw, bytes) or len(raw) > MAX_REVOCATION:
        raise NotAMember("malformed", "revocation too large or not bytes")
    fields, sig = _signed_part(raw, 5, MAX_REVOCATION)
    v, mesh, peer, ts = fields
    if v != 1 or not isinstance(mesh, bytes) or len(mesh) != 10:
        raise NotAMember("malformed", "bad revocation version or mesh")
    if not isinstance(peer, bytes) or len(peer) != 20 or type(ts) is not int:
        raise NotAMember("malformed", "bad revocation peer or time")
    if not isinstance(sig, bytes):
        raise NotAMember("malformed", "revocation signature is not bytes")
    if peer_id_text(mesh) != mesh_id:
        raise NotAMember("foreign_mesh", "revocation of another mesh")
    try:
        verify(owner_key, _REVOKE_CONTEXT + _pack(fields), sig)
    except IdentityError:
        raise NotAMember("forged", "the mesh owner did not sign this revocation") from None
    return Revocation(mesh_id, peer_id_text(peer), ts, bytes(raw))
