"""Proof that a peer holds a shard's bytes, before it is preferred as a spot-check verifier.

The coordinator asks for the SHA-256 of a fresh nonce followed by a random byte range of one
of the stage's shard objects and compares it with the same digest over its own copy: a peer
that only *claims* the blob (a minted Sybil) cannot answer, and is caught lying. A holder can
still relay the question to another holder; that costs it the range's bytes each time. Where
the coordinator holds none of a stage's shards it can prove nothing; claims then count for
nothing either (:mod:`mesh.inference.verify` orders such peers as non-holders).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

from mesh.errors import RPCError
from mesh.net.callers import MeshCaller
from runtimes.errors import ModelError

__all__ = ["MAX_CHALLENGE_BYTES", "challenge_digest", "check_challenge", "prove_holds"]

log = logging.getLogger(__name__)

MAX_CHALLENGE_BYTES = 1 << 16  # one range: cheap to hash, too many ranges to precompute
_MAX_NONCE_HEX = 64


def challenge_digest(path: Path, nonce: bytes, offset: int, length: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ModelError("challenge range past the end of the shard")
    return hashlib.sha256(nonce + data).hexdigest()


def check_challenge(params: dict[str, Any]) -> tuple[str, int, int, bytes]:
    """A ``shard_challenge`` request's (object, offset, length, nonce), type- and
    range-checked before any file is touched."""
    oid, offset, length = params.get("object"), params.get("offset"), params.get("length")
    nonce = params.get("nonce")
    if not isinstance(oid, str) or type(offset) is not int or type(length) is not int:
        raise ModelError("shard_challenge needs object, offset and length")
    if not isinstance(nonce, str) or len(nonce) > _MAX_NONCE_HEX:
        raise ModelError("shard_challenge needs a short hex nonce")
    if offset < 0 or not 0 < length <= MAX_CHALLENGE_BYTES:
        raise ModelError(f"a challenge range is 1 to {MAX_CHALLENGE_BYTES} bytes")
    try:
        return oid, offset, length, bytes.fromhex(nonce)
    except ValueError:
        raise ModelError("shard_challenge nonce is not hex") from None


async def prove_holds(
    mesh: MeshCaller, peer: str, oid: str, path: Path, rng: random.Random
) -> bool:
    """Whether ``peer`` answers a challenge on a random range of object ``oid``, whose data
    file this node holds at ``path``."""
    size = (await asyncio.to_thread(path.stat)).st_size
    if size <= 0:
        return False
    length = min(size, MAX_CHALLENGE_BYTES)
    offset = rng.randrange(0, size - length + 1)
    nonce = os.urandom(16)
    want = await asyncio.to_thread(challenge_digest, path, nonce, offset, length)
    params = {"object": oid, "offset": offset, "length": length, "nonce": nonce.hex()}
    try:
        reply = await mesh.call(peer, "compute.shard_challenge", params, timeout=10)
    except RPCError as exc:
        log.info("%s did not answer a shard challenge: %s", peer[:12], exc)
        return False
    return reply.result.get("digest") == want
