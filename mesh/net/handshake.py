"""The identity handshake that runs first on every data channel.

Each connection runs DTLS with a fresh certificate (aiortc makes one; the wrtc engine generates
one and hands it to libwebrtc), so DTLS alone proves nothing about who is on the other end.
Each side therefore signs a transcript that binds both DTLS fingerprints, both fresh nonces
and both public keys with its Ed25519 key (libp2p's webrtc-direct binds the same values into
its Noise prologue). A man in the middle terminates
DTLS with its own certificates, so the fingerprints each side sees differ and no signature
verifies; a relayed or reflected signature fails because the role is signed too.

Messages (msgpack headers, see :mod:`mesh.net.wire`):
``{"t": "hello", "v": 1, "id": str, "pk": bytes, "nonce": bytes, "cert": bytes}`` then
``{"t": "proof", "sig": bytes}``. ``cert`` is the sender's mesh member certificate; a
:class:`Gate` (the node's membership policy) refuses a hello whose certificate does not admit
its peer id, before any proof is signed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Protocol

from mesh.errors import HandshakeError, NotAMember
from mesh.net.identity import Identity
from mesh.net.signed import Field, check_binding, check_fields, signed_bytes, verify_signature
from mesh.net.wire import brief

__all__ = [
    "Gate",
    "Hello",
    "HandshakeState",
    "parse_hello",
    "parse_proof",
    "fingerprint_from_sdp",
    "NONCE_LEN",
]

NONCE_LEN = 32
_CONTEXT = b"edgemesh/handshake/v1\x00"
_FP_RE = re.compile(r"^a=fingerprint:sha-256 ([0-9A-Fa-f:]{95})\s*$", re.MULTILINE)


def fingerprint_from_sdp(sdp: str) -> str:
    """The sha-256 DTLS fingerprint an SDP declares, upper-case; HandshakeError if none or two."""
    found = {m.upper() for m in _FP_RE.findall(sdp)}
    if len(found) != 1:
        raise HandshakeError(
            f"SDP must declare exactly one sha-256 fingerprint, found {len(found)}"
        )
    return str(found.pop())


class Gate(Protocol):
    """Who may connect: the node's membership policy (mesh.trust), seen from the network room.

    ``admit`` raises :class:`~mesh.errors.NotAMember` unless ``cert`` (bytes, text or None,
    straight off the wire) admits ``peer_id``; ``still_admits`` is asked on live links (a
    certificate that expired drops its link); ``credential`` is our own certificate, which
    we attach to what we send (None: we have none)."""

    @property
    def credential(self) -> bytes | None: ...

    def admit(self, peer_id: str, cert: Any) -> object: ...

    def still_admits(self, peer_id: str) -> bool:
        """Whether ``peer_id``, admitted earlier, is still in (its certificate not expired)."""
        ...


@dataclass(frozen=True)
class Hello:
    peer_id: str
    public_key: bytes
    nonce: bytes


_HELLO = (Field("id", str), Field("pk", bytes, size=32), Field("nonce", bytes, size=NONCE_LEN))
_PROOF = (Field("sig", bytes, size=64),)


def parse_hello(header: dict[str, Any]) -> Hello:
    if header.get("t") != "hello":
        raise HandshakeError(f"expected hello, got {brief(header.get('t'))}")
    if header.get("v") != 1:
        raise HandshakeError(f"unsupported handshake version {brief(header.get('v'))}")
    f = check_fields(_HELLO, [header.get(f.name) for f in _HELLO], HandshakeError, "hello")
    check_binding(f["pk"], f["id"], HandshakeError, "hello")
    return Hello(f["id"], f["pk"], f["nonce"])


def parse_proof(header: dict[str, Any]) -> bytes:
    if header.get("t") != "proof":
        raise HandshakeError(f"expected proof, got {brief(header.get('t'))}")
    sig: bytes = check_fields(_PROOF, [header.get("sig")], HandshakeError, "proof")["sig"]
    return sig


class HandshakeState:
    """One side of the handshake. Validates its parameters in the constructor.

    ``local_fp`` is the fingerprint of our own DTLS certificate, ``remote_fp`` that of the
    certificate the peer presented, both read from the live DTLS session by the transport
    (mesh.net.transport, which also checks each against its SDP).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        offerer: bool,
        local_fp: str,
        remote_fp: str,
        expected_peer: str | None = None,
        nonce: bytes | None = None,
        gate: Gate | None = None,
    ) -> None:
        if local_fp == remote_fp:
            raise HandshakeError("local and remote DTLS fingerprints are equal")
        self.identity = identity
        self.offerer = offerer
        self.local_fp = local_fp.upper()
        self.remote_fp = remote_fp.upper()
        self.expected_peer = expected_peer
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        if len(self.nonce) != NONCE_LEN:
            raise ValueError("nonce must be 32 bytes")
        self.remote: Hello | None = None
        self.gate = gate

    def hello(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "t": "hello",
            "v": 1,
            "id": self.identity.peer_id,
            "pk": self.identity.public_key,
            "nonce": self.nonce,
        }
        if self.gate is not None and self.gate.credential:
            msg["cert"] = self.gate.credential
        return msg

    def _transcript(self, remote: Hello, signer_is_offerer: bool) -> bytes:
        mine = (self.local_fp, self.nonce, self.identity.public_key)
        theirs = (self.remote_fp, remote.nonce, remote.public_key)
        off, ans = (mine, theirs) if self.offerer else (theirs, mine)
        role = b"offerer" if signer_is_offerer else b"answerer"
        values = [off[0], ans[0], off[1], ans[1], off[2], ans[2]]
        return signed_bytes(_CONTEXT + role + b"\x00", values)

    def receive_hello(self, header: dict[str, Any]) -> dict[str, Any]:
        """Check the peer's hello; return our proof message."""
        remote = parse_hello(header)
        if self.expected_peer is not None and remote.peer_id != self.expected_peer:
            raise HandshakeError(
                f"expected peer {self.expected_peer[:12]}, the connection proved "
                f"{remote.peer_id[:12]}"
            )
        if remote.nonce == self.nonce:
            raise HandshakeError("peer echoed our nonce")
        if self.gate is not None:
            try:
                self.gate.admit(remote.peer_id, header.get("cert"))
            except NotAMember as exc:
                raise HandshakeError(f"peer {remote.peer_id[:12]}: {exc}") from None
        self.remote = remote
        sig = self.identity.sign(self._transcript(remote, signer_is_offerer=self.offerer))
        return {"t": "proof", "sig": sig}

    def receive_proof(self, header: dict[str, Any]) -> Hello:
        """Verify the peer's proof; return its proven identity."""
        if self.remote is None:
            raise HandshakeError("proof before hello")
        sig = parse_proof(header)
        transcript = self._transcript(self.remote, signer_is_offerer=not self.offerer)
        verify_signature(
            self.remote.public_key,
            transcript,
            sig,
            HandshakeError,
            "proof",
            f"peer {self.remote.peer_id[:12]} did not sign this connection's DTLS "
            "fingerprints (man in the middle, or a forged key)",
        )
        return self.remote
