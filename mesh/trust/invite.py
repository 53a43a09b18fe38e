"""Invites: what ``edgemesh mesh invite`` prints and ``edgemesh node --join`` redeems.

An invite string is ``emi1.`` + base64url of the msgpack list ``[1, owner key, invite id,
secret, expires, uses, addresses, sig]``. The secret is the seed of a one-off Ed25519 key: the
owner keeps only its public half (``invites.json``), so a copy of the owner's files redeems
nothing, and the joiner proves it holds the secret by signing its redemption with it. The
owner signs the invite (with the invite key's public half in place of the secret), so a
changed address, expiry or use count does not verify.

The owner's node counts uses in ``invites.json`` under a file lock (the CLI writes the same
file), refusing unknown, expired and used-up invites; a peer that redeemed an invite may
redeem it again (a retry after a lost reply) without spending a use.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing

from mesh.errors import IdentityError, InviteError
from mesh.net.identity import verify
from mesh.net.wire import brief, check_depth
from mesh.trust.keys import INVITES_FILE, OwnerKey, mesh_id_from_key, read_capped, write_private

__all__ = ["Invite", "InviteStore", "create_invite", "parse_invite", "MAX_INVITE_TEXT"]

PREFIX = "emi1."
MAX_INVITE_TEXT = 1024
MAX_ADDRESSES = 4
MAX_INVITES = 1024  # open invites an owner keeps; expired ones are purged first
_MAX_STORE_FILE = MAX_INVITES * 400 + 1024
_CONTEXT = b"edgemesh/invite/v1\x00"
_B64_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


@dataclass(frozen=True)
class Invite:
    owner_key: bytes
    invite_id: bytes
    secret: bytes
    expires: int
    uses: int
    addresses: tuple[str, ...]
    signature: bytes

    @property
    def mesh_id(self) -> str:
        return mesh_id_from_key(self.owner_key)

    @property
    def key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.secret)

    @property
    def invite_key(self) -> bytes:
        return bytes(self.key.verify_key)

    def _signed(self) -> bytes:
        fields = [1, self.owner_key, self.invite_id, self.invite_key, self.expires, self.uses]
        return _CONTEXT + _pack(fields + [list(self.addresses)])

    @property
    def text(self) -> str:
        body = _pack(
            [
                1,
                self.owner_key,
                self.invite_id,
                self.secret,
                self.expires,
                self.uses,
                list(self.addresses),
                self.signature,
            ]
        )
        return PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def create_invite(
    owner: OwnerKey,
    *,
    ttl: float,
    uses: int,
    addresses: list[str],
    now: float | None = None,
) -> Invite:
    if uses < 1:
        raise InviteError("an invite needs at least one use")
    if not addresses or len(addresses) > MAX_ADDRESSES:
        raise InviteError(f"an invite names 1 to {MAX_ADDRESSES} signaling addresses")
    expires = int((time.time() if now is None else now) + ttl)
    draft = Invite(
        owner.public_key, os.urandom(12), os.urandom(32), expires, uses, tuple(addresses), b""
    )
    return dataclasses.replace(draft, signature=owner.sign(draft._signed()))


def _decode(text: str) -> list[Any]:
    if not isinstance(text, str) or len(text) > MAX_INVITE_TEXT:
        raise InviteError(f"an invite is a string of at most {MAX_INVITE_TEXT} characters")
    text = text.strip()
    if not text.startswith(PREFIX) or not _B64_RE.match(text[len(PREFIX) :]):
        raise InviteError(f"not an edgemesh invite (they start with {PREFIX!r})")
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        items = msgpack.unpackb(
            raw,
            raw=False,
            max_str_len=128,
            max_bin_len=64,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
    except (binascii.Error, ValueError, Exception):  # msgpack raises several unrelated types
        raise InviteError("invite is corrupt (not base64url msgpack)") from None
    check_depth(items, InviteError, "invite")
    if not isinstance(items, list) or len(items) != 8:
        raise InviteError("invite is corrupt (wrong number of fields)")
    return items


def parse_invite(text: str, *, now: float | None = None) -> Invite:
    """Decode an invite and check the owner's signature and the expiry."""
    v, owner, iid, secret, expires, uses, addrs, sig = _decode(text)
    if v != 1:
        raise InviteError(f"unsupported invite version {brief(v)}")
    for value, size in ((owner, 32), (iid, 12), (secret, 32), (sig, 64)):
        if not isinstance(value, bytes) or len(value) != size:
            raise InviteError("invite is corrupt (bad key, id, secret or signature)")
    if type(expires) is not int or type(uses) is not int or not 0 < uses < 1 << 20:
        raise InviteError("invite is corrupt (bad expiry or uses)")
    if not isinstance(addrs, list) or not 0 < len(addrs) <= MAX_ADDRESSES:
        raise InviteError("invite names no signaling address")
    if not all(isinstance(a, str) and len(a) <= 64 for a in addrs):
        raise InviteError("invite is corrupt (bad address)")
    invite = Invite(owner, iid, secret, expires, uses, tuple(addrs), sig)
    try:
        verify(owner, invite._signed(), sig)
    except IdentityError:
        raise InviteError(
            "invite was altered: the mesh owner's signature does not verify"
        ) from None
    if (time.time() if now is None else now) > expires:
        raise InviteError("invite has expired")
    return invite


class InviteStore:
    """The owner's open invites in ``invites.json``: invite key, expiry, uses left, who
    redeemed. Blocking file work under an flock: call from a thread, not the event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / INVITES_FILE
        self._lock_path = Path(data_dir) / (INVITES_FILE + ".lock")

    @contextmanager
    def _locked(self, write: bool = True) -> Iterator[dict[str, Any]]:
        """The invites under the file's lock; written back after unless ``write`` is False
        (a lookup: an unsigned join request must not make us rewrite the file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = json.loads(read_capped(self.path, _MAX_STORE_FILE) or b"{}")
                invites = data.get("invites", {}) if isinstance(data, dict) else {}
            except (IdentityError, ValueError) as exc:
                raise InviteError(f"{self.path} is unreadable: {exc}") from None
            yield invites
            if write:
                body = json.dumps({"invites": invites}, indent=1) + "\n"
                write_private(self.path, body.encode())
        finally:
            os.close(fd)  # releases the lock

    def record(self, invite: Invite, now: float | None = None) -> None:
        t = time.time() if now is None else now
        with self._locked() as invites:
            for key in [k for k, v in invites.items() if v.get("expires", 0) < t]:
                del invites[key]
            if len(invites) >= MAX_INVITES:
                raise InviteError(f"{MAX_INVITES} invites are open; let some expire first")
            invites[invite.invite_id.hex()] = {
                "key": invite.invite_key.hex(),
                "expires": invite.expires,
                "uses": invite.uses,
                "redeemed": [],
            }

    def invite_key(self, invite_id: bytes) -> bytes:
        with self._locked(write=False) as invites:
            entry = invites.get(invite_id.hex())
        if not isinstance(entry, dict):
            raise InviteError("unknown invite")
        return bytes.fromhex(entry["key"])

    def consume(self, invite_id: bytes, peer_id: str, now: float | None = None) -> None:
        """Spend one use for ``peer_id`` (free when it redeemed this invite before)."""
        t = time.time() if now is None else now
        with self._locked() as invites:
            entry = invites.get(invite_id.hex())
            if not isinstance(entry, dict):
                raise InviteError("unknown invite")
            redeemed = entry.setdefault("redeemed", [])
            if peer_id in redeemed:
                return
            if t > entry.get("expires", 0):
                raise InviteError("invite has expired")
            if len(redeemed) >= entry.get("uses", 0):
                raise InviteError("invite is used up")
            redeemed.append(peer_id)
