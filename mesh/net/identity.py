"""Ed25519 peer identities.

A peer id is the lowercase RFC 4648 base32 encoding, without padding, of the first 20 bytes of
SHA-256 over the raw 32-byte Ed25519 public key: 32 characters such as
``k5x3...``. Twenty bytes match the 160-bit id space of Kademlia, so the DHT can use the same
id. Anyone can recompute the id from a public key; nobody can choose a key for a given id.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing

from mesh.errors import IdentityError

__all__ = ["Identity", "peer_id_from_key", "verify", "KEY_FILE_NAME", "PEER_ID_LEN"]

log = logging.getLogger(__name__)

KEY_FILE_NAME = "identity.key"
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
PEER_ID_LEN = 32  # base32 characters of a 20-byte digest


def peer_id_from_key(public_key: bytes) -> str:
    """Derive the peer id from a raw Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise IdentityError(f"public key must be {PUBLIC_KEY_LEN} bytes, got {len(public_key)}")
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`IdentityError` unless ``signature`` is ``public_key``'s over ``message``."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise IdentityError("malformed public key")
    if len(signature) != SIGNATURE_LEN:
        raise IdentityError("malformed signature")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise IdentityError("bad signature") from exc


class Identity:
    """A peer's signing key. Create with :meth:`generate` or :meth:`load_or_create`."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.peer_id: str = peer_id_from_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> Identity:
        """Load ``DATA_DIR/identity.key``; create it (mode 0600) on first start."""
        path = Path(data_dir) / KEY_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two processes starting on one data dir cannot both write a key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls._load(path)
        key = nacl.signing.SigningKey.generate()
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(key))
        log.info("created identity %s in %s", peer_id_from_key(bytes(key.verify_key)), path)
        return cls(key)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
        seed = path.read_bytes()
        if len(seed) != 32:
            raise IdentityError(f"{path} does not hold a 32-byte Ed25519 seed")
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte signature over ``message``."""
        return bytes(self._key.sign(message).signature)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
