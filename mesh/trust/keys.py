"""The mesh owner key, the mesh id derived from it, and the trust files in a data dir.

Files (all in the node's data dir, written atomically, private ones mode 0600):
``mesh.key`` (the owner's 32-byte Ed25519 seed, only on the owner's machine), ``mesh.json``
(the anchor every member keeps: mesh id, owner public key, open or not), ``member.cert``
(this node's certificate), ``invites.json`` (the owner's open invites), ``revocations.json``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing

from mesh.errors import IdentityError
from mesh.net.identity import Identity

__all__ = [
    "OWNER_KEY_FILE",
    "ANCHOR_FILE",
    "CERT_FILE",
    "INVITES_FILE",
    "REVOCATIONS_FILE",
    "MESH_ID_LEN",
    "Anchor",
    "OwnerKey",
    "mesh_id_from_key",
    "mesh_id_bytes",
    "peer_id_bytes",
    "peer_id_text",
    "write_private",
    "read_capped",
]

log = logging.getLogger(__name__)

OWNER_KEY_FILE = "mesh.key"
ANCHOR_FILE = "mesh.json"
CERT_FILE = "member.cert"
INVITES_FILE = "invites.json"
REVOCATIONS_FILE = "revocations.json"
MESH_ID_LEN = 16  # base32 characters of a 10-byte digest
_MESH_CONTEXT = b"edgemesh/mesh/v1\x00"
_MAX_ANCHOR = 4096


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def _unb32(text: str, size: int) -> bytes:
    try:
        raw = base64.b32decode(text.upper())
    except (binascii.Error, ValueError):
        raise IdentityError(f"{text[:20]!r} is not base32") from None
    if len(raw) != size:
        raise IdentityError(f"{text[:20]!r} is not a {size}-byte id")
    return raw


def mesh_id_from_key(public_key: bytes) -> str:
    """A mesh's id: 80 bits of a hash of its owner's key, so nobody picks another's id."""
    if len(public_key) != 32:
        raise IdentityError("owner key must be 32 bytes")
    return _b32(hashlib.sha256(_MESH_CONTEXT + public_key).digest()[:10])


def mesh_id_bytes(mesh_id: str) -> bytes:
    return _unb32(mesh_id, 10)


def peer_id_bytes(peer_id: str) -> bytes:
    """The 20-byte digest a 32-character peer id spells (certificates carry it raw)."""
    return _unb32(peer_id, 20)


def peer_id_text(raw: bytes) -> str:
    return _b32(raw)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically with mode 0600 (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def read_capped(path: Path, cap: int) -> bytes | None:
    """The file's bytes, None if it does not exist; IdentityError if it exceeds ``cap``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except FileNotFoundError:
        return None
    if len(data) > cap:
        raise IdentityError(f"{path} exceeds {cap} bytes")
    return data


class OwnerKey(Identity):
    """The mesh owner's signing key: an Ed25519 key like a peer's, kept in ``mesh.key``."""

    @property
    def mesh_id(self) -> str:
        return mesh_id_from_key(self.public_key)

    @classmethod
    def create(cls, data_dir: Path) -> OwnerKey:
        """Create ``DATA_DIR/mesh.key`` (mode 0600); refuse if one exists."""
        path = Path(data_dir) / OWNER_KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"{path} exists: this data dir already owns a mesh") from None
        key = nacl.signing.SigningKey.generate()
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(key))
        owner = cls(key)
        log.info("created mesh %s (owner key %s)", owner.mesh_id, path)
        return owner

    @classmethod
    def load(cls, data_dir: Path) -> OwnerKey | None:
        """The owner key in ``data_dir``, or None when this node does not own a mesh."""
        path = Path(data_dir) / OWNER_KEY_FILE
        if not path.exists():
            return None
        # Same checks as a peer key: mode 0600, a 32-byte seed.
        return cls(Identity._load(path)._key)


@dataclass(frozen=True)
class Anchor:
    """What a member knows of its mesh: the owner's key (the root of trust) and the mode."""

    owner_key: bytes
    open: bool = False

    @property
    def mesh_id(self) -> str:
        return mesh_id_from_key(self.owner_key)

    def to_json(self) -> dict[str, Any]:
        return {"mesh_id": self.mesh_id, "owner_key": self.owner_key.hex(), "open": self.open}

    def save(self, data_dir: Path) -> None:
        write_private(Path(data_dir) / ANCHOR_FILE, (json.dumps(self.to_json()) + "\n").encode())

    @classmethod
    def load(cls, data_dir: Path) -> Anchor | None:
        raw = read_capped(Path(data_dir) / ANCHOR_FILE, _MAX_ANCHOR)
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
            key = bytes.fromhex(obj["owner_key"])
            anchor = cls(key, bool(obj.get("open", False)))
            if anchor.mesh_id != obj.get("mesh_id", anchor.mesh_id):
                raise ValueError("mesh id does not match the owner key")
            mesh_id_from_key(key)  # checks the length
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IdentityError(f"{data_dir}/{ANCHOR_FILE} is malformed: {exc}") from None
        return anchor
