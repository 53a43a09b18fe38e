"""The aiortc engine: pure-Python WebRTC (aioice, DTLS through pyOpenSSL, SCTP in Python).

The fallback wherever ``wrtc`` has no wheel, and the engine of the tests that need to reach
inside a connection (aioice's candidate gathering). Host candidates are scoped to a config's
addresses per connection (:class:`ScopedPeerConnection`), and a TURN server that gave no
relay candidate is asked again to learn why (aioice drops it without a word).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aioice import TransportPolicy
from aioice import ice as aioice_ice
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.errors import HandshakeError, TransportError
from mesh.net.copies import SPARE_ID, SPARE_LABEL
from mesh.net.engine import (
    Engine,
    IceStats,
    PeerOptions,
    RtcChannel,
    RtcPeer,
    same_host,
    sha256_fingerprint,
)

__all__ = [
    "AiortcEngine",
    "AiortcPeer",
    "ScopedPeerConnection",
    "rtc_configuration",
    "candidate_pair",
]

log = logging.getLogger(__name__)


def rtc_configuration(options: PeerOptions) -> RTCConfiguration:
    # Explicit empty list: aiortc otherwise contacts a public STUN server.
    policy = RTCIceTransportPolicy.RELAY if options.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(
        iceServers=[s.rtc() for s in options.servers], iceTransportPolicy=policy
    )


class ScopedPeerConnection(RTCPeerConnection):
    """A peer connection that gathers host candidates on its config's addresses only, and
    says why a TURN server gave no relay candidate.

    aioice picks host addresses through a module function (``aioice.ice.get_host_addresses``)
    and has no option for them; replacing that function would change every connection in the
    process. Instead, just before this connection gathers (only ``setLocalDescription`` does),
    each of its own ICE connections gets its gathering wrapped (:func:`_scope_candidates`).
    """

    def __init__(self, options: PeerOptions) -> None:
        super().__init__(configuration=rtc_configuration(options))
        self._candidate_addresses = options.candidate_addresses
        self._stats = options.stats

    async def setLocalDescription(
        self, sessionDescription: RTCSessionDescription | None = None
    ) -> None:
        for ice in self._ice_connections():
            _scope_candidates(ice, self._candidate_addresses, self._stats)
        await super().setLocalDescription(sessionDescription)

    def _ice_connections(self) -> list[Any]:
        transports = [t.receiver.transport for t in self.getTransceivers()]
        if self.sctp is not None:
            transports.append(self.sctp.transport)
        return [dtls.transport.iceGatherer._connection for dtls in transports]


def _scope_candidates(ice: Any, ours: tuple[str, ...] | None, stats: IceStats) -> None:
    """Wrap one aioice connection's gathering (this instance only): host candidates on
    ``ours`` (None: aioice's choice), and a TURN server that gave no relay candidate is asked
    once more, its error logged and counted in ``stats`` (aioice drops it without a word).

    aioice calls ``get_component_candidates(component=, addresses=)`` with the host addresses
    it chose (none with the relay-only policy); the instance attribute set here shadows the
    method for this connection alone.
    """
    if getattr(ice, "_edgemesh_scoped", False):
        return
    gather = ice.get_component_candidates  # bound method: aioice's own gathering
    relay_only = ice._transport_policy != TransportPolicy.ALL

    async def scoped(component: int, addresses: list[str], timeout: int = 5) -> list[Any]:
        hosts = addresses if ours is None or relay_only else list(ours)
        found: list[Any] = await gather(component=component, addresses=hosts, timeout=timeout)
        if ice.turn_server is not None and not any(c.type == "relay" for c in found):
            found += await _relay_again(ice, component, timeout, relay_only, stats)
        return found

    ice.get_component_candidates = scoped
    ice._edgemesh_scoped = True


async def _relay_again(
    ice: Any, component: int, timeout: float, relay_only: bool, stats: IceStats
) -> list[Any]:
    """A second TURN allocation after aioice's failed one, to learn (and log) why."""
    host, port = ice.turn_server
    try:
        async with asyncio.timeout(timeout):
            candidate, protocol = await aioice_ice.relayed_candidate(
                component=component,
                hide_related_address=relay_only,
                protocol_factory=lambda: aioice_ice.StunProtocol(ice),
                turn_server=ice.turn_server,
                turn_username=ice.turn_username,
                turn_password=ice.turn_password,
                turn_ssl=ice.turn_ssl,
                turn_transport=ice.turn_transport,
            )
    except Exception as exc:  # aioice raises TransactionFailed, ConnectionError, OSError...
        why = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        stats.relay_failed(f"TURN {host}:{port} ({ice.turn_transport}): {why}")
        return []
    ice._protocols.append(protocol)  # as aioice does with the relay candidates it gathers
    return [candidate]


def candidate_pair(pc: RTCPeerConnection) -> dict[str, Any] | None:
    """The ICE candidate pair the data channel runs over, read from the live aioice
    connection: candidate types (host, srflx, prflx, relay) and protocol; None before ICE
    nominated a pair or after it closed. ``relay_protocol``: how we reach the TURN server."""
    sctp = pc.sctp
    if sctp is None:
        return None
    ice = sctp.transport.transport.iceGatherer._connection
    pair = ice._nominated.get(1)
    if pair is None:
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    out: dict[str, Any] = {
        "local": local.type,
        "remote": remote.type,
        "protocol": local.transport.lower(),
        "same_host": same_host(local.host, remote.host),
    }
    if local.type == "relay":
        out["relay_protocol"] = ("tls/" if ice.turn_ssl else "") + str(ice.turn_transport)
    return out


class AiortcChannel(RtcChannel):
    def __init__(self, channel: RTCDataChannel) -> None:
        self._ch = channel
        self.label = channel.label

    def send(self, data: bytes) -> None:
        if self._ch.readyState != "open":
            raise TransportError(f"data channel is {self._ch.readyState}")
        self._ch.send(data)

    @property
    def bufferedAmount(self) -> int:  # noqa: N802
        return int(self._ch.bufferedAmount)

    @property
    def readyState(self) -> str:  # noqa: N802
        return str(self._ch.readyState)

    def close(self) -> None:
        self._ch.close()

    def bind(
        self,
        *,
        on_message: Callable[[bytes], None],
        on_open: Callable[[], None],
        on_close: Callable[[], None],
        on_low: Callable[[], None],
        low_water: int,
    ) -> None:
        ch = self._ch

        def _message(data: bytes | str) -> None:
            on_message(data.encode() if isinstance(data, str) else data)

        ch.on("message", _message)
        ch.on("close", on_close)
        ch.on("bufferedamountlow", on_low)
        ch.bufferedAmountLowThreshold = low_water
        if ch.readyState == "open":
            on_open()
        else:
            ch.on("open", on_open)


class AiortcPeer(RtcPeer):
    engine = "aiortc"

    def __init__(self, options: PeerOptions) -> None:
        super().__init__()
        self.pc = ScopedPeerConnection(options)
        pc = self.pc

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            self._state(pc.connectionState)

        @pc.on("datachannel")
        def _on_channel(channel: RTCDataChannel) -> None:
            if self.on_channel is not None:
                self.on_channel(AiortcChannel(channel))
            else:
                channel.close()

    def _add_spare(self) -> None:
        self.spare = AiortcChannel(
            self.pc.createDataChannel(
                SPARE_LABEL, ordered=False, maxRetransmits=0, negotiated=True, id=SPARE_ID
            )
        )

    async def offer(self, label: str) -> tuple[RtcChannel, str]:
        channel = AiortcChannel(self.pc.createDataChannel(label, ordered=True))
        self._add_spare()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return channel, self.local_sdp

    async def answer(self, offer_sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        self._add_spare()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.local_sdp

    async def complete(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    async def close(self) -> None:
        await self.pc.close()

    @property
    def local_sdp(self) -> str:
        desc = self.pc.localDescription
        return desc.sdp if desc is not None else ""

    @property
    def remote_sdp(self) -> str:
        desc = self.pc.remoteDescription
        return desc.sdp if desc is not None else ""

    def dtls_fingerprints(self) -> tuple[str, str]:
        # aiortc makes a fresh certificate per connection; the peer's is the one pyOpenSSL
        # verified in this DTLS session (against the SDP fingerprint).
        dtls = self.pc.sctp.transport if self.pc.sctp is not None else None
        ssl = getattr(dtls, "_ssl", None)
        peer = None
        if ssl is not None:
            with contextlib.suppress(Exception):
                peer = ssl.get_peer_certificate(as_cryptography=True)
        if dtls is None or peer is None:
            raise HandshakeError("DTLS has not completed: no remote certificate")
        ours = [f.value for f in dtls.getLocalParameters().fingerprints if f.algorithm == "sha-256"]
        return ours[0].upper(), sha256_fingerprint(peer.public_bytes(Encoding.DER))

    def candidate_pair(self) -> dict[str, Any] | None:
        return candidate_pair(self.pc)


class AiortcEngine(Engine):
    name = "aiortc"
    max_message = 64 * 1024  # aiortc's SCTP announces a 64 KiB max-message-size

    def peer(self, options: PeerOptions) -> RtcPeer:
        return AiortcPeer(options)
