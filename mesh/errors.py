"""The one exception root of edgemesh and its precise subclasses.

Everything that fails because of the network, a peer, or bad input raises a subclass of
:class:`Error`, so embedding applications can catch one type.
"""

from __future__ import annotations

__all__ = [
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
