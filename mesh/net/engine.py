"""The WebRTC engine interface: what :mod:`mesh.net.transport` needs from a WebRTC stack.

Two implementations: :mod:`mesh.net.engine_aiortc` (aiortc, pure Python, everywhere) and
:mod:`mesh.net.engine_wrtc` (``wrtc``: libwebrtc, Chrome's engine, where its wheels exist).
Both speak standard WebRTC (ICE, DTLS, SCTP data channels), so meshes mixing them interoperate.

An engine builds :class:`RtcPeer` objects: one peer connection with one data channel, whose
SDP carries every candidate (no trickle: the signaling layer moves one offer and one answer).
The identity binding (:mod:`mesh.net.handshake`) reads both DTLS certificate fingerprints from
the live DTLS transport through :meth:`RtcPeer.dtls_fingerprints`, with either engine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

import ifaddr

from mesh.net.ice import IceServer

__all__ = [
    "IceStats",
    "PeerOptions",
    "RtcChannel",
    "RtcPeer",
    "Engine",
    "sha256_fingerprint",
]

log = logging.getLogger(__name__)


class IceStats:
    """What ICE gathering went wrong with, for /v1/info: shared by every connection built
    with one config (one node's)."""

    def __init__(self) -> None:
        self.relay_failures = 0
        self.last_relay_error: str | None = None

    def relay_failed(self, why: str) -> None:
        self.relay_failures += 1
        self.last_relay_error = why
        log.warning("no relay candidate: %s", why)


class PeerOptions(Protocol):
    """How a peer connection is built (a :class:`~mesh.net.transport.TransportConfig`)."""

    @property
    def servers(self) -> tuple[IceServer, ...]: ...

    @property
    def relay_only(self) -> bool: ...

    @property
    def candidate_addresses(self) -> tuple[str, ...] | None: ...

    @property
    def stats(self) -> IceStats: ...


_OWN_TTL = 10.0  # seconds this machine's interface addresses are cached
_own: tuple[float, frozenset[str]] = (-_OWN_TTL, frozenset())


def interface_addresses() -> list[str]:
    """Every address of this machine's interfaces, IPv4 and IPv6, loopback included."""
    return [
        ip.ip if isinstance(ip.ip, str) else ip.ip[0]  # IPv6: (address, flow, scope)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
    ]


def _own_addresses() -> frozenset[str]:
    global _own
    now = time.monotonic()
    if now - _own[0] >= _OWN_TTL:
        _own = (now, frozenset(interface_addresses()))
    return _own[1]


def same_host(local: str | None, remote: str | None) -> bool:
    """Whether a candidate pair (our address, the peer's) stays within this machine: either
    end on loopback (packets from or to 127.0.0.1 never leave), or the peer's address one of
    our own interfaces'. Such a path loses no packets. (libwebrtc hides the address of a
    peer-reflexive remote: None.)"""
    for address in (local, remote):
        try:
            if address is not None and ipaddress.ip_address(address).is_loopback:
                return True
        except ValueError:  # a hostname (an mDNS candidate)
            pass
    return remote is not None and remote in _own_addresses()


def sha256_fingerprint(der: bytes) -> str:
    """The SDP form of a certificate's sha-256 fingerprint: ``AB:CD:...`` (upper case)."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class RtcChannel(ABC):
    """One reliable, ordered data channel (satisfies :class:`mesh.net.rpc.Channel`).

    ``send`` queues a message without blocking and raises :class:`~mesh.errors.TransportError`
    when the channel is closed or the engine's queue is full; callers keep the queue short by
    waiting on ``bufferedAmount`` (the RPC link's high/low water marks)."""

    label: str
    # Bytes that one ``send`` puts on the wire at once, when the congestion window allows, or
    # None when the stack sends all it may: the rest of a longer message waits for the peer's
    # acknowledgements, a round trip per step (see mesh.net.rpc.LinkParams.long_path_ms).
    burst: int | None = None

    @abstractmethod
    def send(self, data: bytes) -> None: ...

    @property
    @abstractmethod
    def bufferedAmount(self) -> int: ...  # noqa: N802 - the WebRTC name

    @property
    @abstractmethod
    def readyState(self) -> str: ...  # noqa: N802 - "connecting", "open", "closing", "closed"

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def bind(
        self,
        *,
        on_message: Callable[[bytes], None],
        on_open: Callable[[], None],
        on_close: Callable[[], None],
        on_low: Callable[[], None],
        low_water: int,
    ) -> None:
        """Deliver the channel's events to these callbacks (on the event loop's thread);
        ``on_low`` fires when ``bufferedAmount`` falls to ``low_water``."""


class RtcPeer(ABC):
    """One peer connection. ``on_state`` hears "failed" and "closed"; ``on_channel`` the
    data channel the remote side opened (answerer)."""

    engine: str = ""

    def __init__(self) -> None:
        self.on_state: Callable[[str], None] | None = None
        self.on_channel: Callable[[RtcChannel], None] | None = None
        # The negotiated, unordered, unretransmitted channel for copies of small frames
        # (mesh.net.copies), made with the offer or the answer.
        self.spare: RtcChannel | None = None
        # What our SDP lacked of what the ICE servers give (srflx, relay) when gathering was
        # cut off by its timeout: a sign that the network is down (mesh.net.netwatch).
        # Empty when gathering completed or got what the servers give.
        self.gather_short: list[str] = []

    def _state(self, state: str) -> None:
        log.debug("pc %s (%s): %s", id(self), self.engine, state)
        if self.on_state is not None and state in ("failed", "closed"):
            self.on_state(state)

    @abstractmethod
    async def offer(self, label: str) -> tuple[RtcChannel, str]:
        """Create our data channel and the offer; returns it and the offer SDP (every
        candidate gathered)."""

    @abstractmethod
    async def answer(self, offer_sdp: str) -> str:
        """Apply a remote offer; returns the answer SDP (every candidate gathered)."""

    @abstractmethod
    async def complete(self, answer_sdp: str) -> None:
        """Apply the remote answer (offering side)."""

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def local_sdp(self) -> str: ...

    @property
    @abstractmethod
    def remote_sdp(self) -> str: ...

    @abstractmethod
    def dtls_fingerprints(self) -> tuple[str, str]:
        """(ours, theirs): sha-256 fingerprints of the certificates the live DTLS session
        runs with: our own and the one the peer presented. Raises
        :class:`~mesh.errors.HandshakeError` before DTLS completed."""

    @abstractmethod
    def candidate_pair(self) -> dict[str, Any] | None:
        """The ICE candidate pair in use: ``{"local", "remote", "protocol"}`` types (host,
        srflx, prflx, relay) and, for a relay, ``relay_protocol``; None when unknown."""


class Engine(ABC):
    """A WebRTC stack. ``max_message``: the largest data channel message it sends."""

    name: str = ""
    max_message: int = 64 * 1024

    @abstractmethod
    def peer(self, options: PeerOptions) -> RtcPeer: ...
