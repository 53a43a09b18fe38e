"""The one exception root of edgemesh and its precise subclasses.

Everything in mesh/ that fails because of the network, a peer, or bad input raises a subclass
of :class:`Error`, so embedding applications can catch one type. The layers below (runtimes/,
scheduler/) never import mesh/ and keep roots of their own, :class:`ModelError` and
:class:`SchedulingError`; :data:`EXPECTED` names all three, and mesh/ catches that wherever a
lower layer's error may arrive (an RPC turns any of them into a coded error reply).
"""

from __future__ import annotations

from runtimes.errors import ModelError
from scheduler.errors import SchedulingError

__all__ = [
    "EXPECTED",
    "ModelError",
    "SchedulingError",
    "Error",
    "IdentityError",
    "WireError",
    "SignalingError",
    "DiscoveryError",
    "HandshakeError",
    "TransportError",
    "RPCError",
    "RemoteError",
    "DeadlineExceeded",
    "TooManyRequests",
    "PeerUnavailable",
    "NotAMember",
    "InviteError",
]


class Error(Exception):
    """Root of every edgemesh error."""


class IdentityError(Error):
    """A key file is unreadable or a signature / peer id does not verify."""


class WireError(Error, ValueError):
    """A frame or message from the network is malformed or exceeds a cap."""


class SignalingError(Error):
    """A signaling message is forged, stale, replayed, misaddressed or malformed."""


class DiscoveryError(Error):
    """A discovery record (mDNS announcement, DHT record) is malformed or does not verify."""


class HandshakeError(Error):
    """The identity handshake failed: the peer did not prove the key it claims,
    or its signature does not bind the DTLS fingerprints of this connection."""


class TransportError(Error):
    """The WebRTC connection could not be set up or was lost."""


class RPCError(Error):
    """An RPC failed."""


class RemoteError(RPCError):
    """The remote handler raised; ``code`` names the error class on the remote side."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DeadlineExceeded(RPCError, TimeoutError):
    """An RPC (or handshake) did not complete before its deadline."""


class TooManyRequests(RPCError):
    """The per-peer cap on in-flight requests was reached."""


class PeerUnavailable(RPCError):
    """No open link to the requested peer."""


class NotAMember(Error):
    """A peer is not admitted to this mesh. ``reason`` is one short word (``missing``,
    ``malformed``, ``forged``, ``foreign_mesh``, ``wrong_peer``, ``expired``, ``revoked``,
    ``no_mesh``): the refusal counters are keyed by it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"not a member ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


class InviteError(Error):
    """An invite is malformed, forged, expired or used up, or its redemption failed."""


# Every error edgemesh raises on purpose; anything else is a bug.
EXPECTED: tuple[type[Exception], ...] = (Error, ModelError, SchedulingError)
