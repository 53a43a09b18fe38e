"""WebRTC links: aiortc peer connections, one data channel, the identity handshake.

``open_offer`` / ``accept_offer`` build the two halves of a connection; how the SDP travels is
the signaling layer's business (:mod:`mesh.net.signaling`). Once the channel opens, both sides run
the handshake of :mod:`mesh.net.handshake`; only then is a :class:`~mesh.net.rpc.Link` handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
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

from mesh.errors import EXPECTED, HandshakeError, TransportError, WireError
from mesh.net.handshake import Gate, HandshakeState, fingerprint_from_sdp
from mesh.net.ice import IceConfigError, IceServer, check_servers
from mesh.net.identity import Identity
from mesh.net.rpc import Handler, Link, LinkParams
from mesh.net.wire import Encoder, Limits, Reassembler

__all__ = [
    "TransportConfig",
    "IceStats",
    "PendingConnection",
    "open_offer",
    "accept_offer",
    "complete_offer",
    "peer_connection",
    "candidate_pair",
    "Teardowns",
    "CHANNEL_LABEL",
]

log = logging.getLogger(__name__)
CHANNEL_LABEL = "edgemesh"
# Handshake messages are a few hundred bytes: nothing bigger is accepted before it completes.
HANDSHAKE_LIMITS = Limits(
    max_header=1024, max_frame=4096, max_message=4096, max_partial=1, max_partial_bytes=4096
)


class Teardowns:
    """Peer connections being closed after their link closed, held until they have: their
    owner (one node's Connections) waits for its own, never for another node's."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self, pc: RTCPeerConnection) -> None:
        task = asyncio.get_running_loop().create_task(pc.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait until every peer connection handed to :meth:`close` has finished closing."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


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


@dataclass(frozen=True)
class TransportConfig:
    """How links are built. ``ice_servers`` are STUN/TURN servers (a bare string is a URL
    without credentials), checked when the config is built (IceConfigError); empty means none
    are contacted. ``relay_only``: gather and use relay (TURN) candidates only.

    ``candidate_addresses``: the only local addresses our peer connections gather ICE host
    candidates on (None: aioice's choice, every interface but loopback). A loopback mesh needs
    127.0.0.1, which aioice leaves out. It applies to the connections built with this config
    only, never to other aiortc users in the process.
    """

    ice_servers: tuple[IceServer | str, ...] = ()
    relay_only: bool = False
    stats: IceStats = field(default_factory=lambda: IceStats(), compare=False)
    candidate_addresses: tuple[str, ...] | None = None
    handshake_timeout: float = 10.0
    connect_timeout: float = 20.0
    link: LinkParams = field(default_factory=LinkParams)

    def __post_init__(self) -> None:
        check_servers(self.servers)
        if self.relay_only and not any(s.is_turn for s in self.servers):
            raise IceConfigError("relay-only ICE needs a TURN server")

    @property
    def servers(self) -> tuple[IceServer, ...]:
        return tuple(s if isinstance(s, IceServer) else IceServer(s) for s in self.ice_servers)

    def rtc_configuration(self) -> RTCConfiguration:
        # Explicit empty list: aiortc otherwise contacts a public STUN server.
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(
            iceServers=[s.rtc() for s in self.servers], iceTransportPolicy=policy
        )


class PendingConnection:
    """A peer connection whose data channel and handshake are still to complete."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        identity: Identity,
        config: TransportConfig,
        *,
        offerer: bool,
        expected_peer: str | None,
        gate: Gate | None = None,
    ) -> None:
        self.pc = pc
        self.gate = gate
        self.identity = identity
        self.config = config
        self.offerer = offerer
        self.expected_peer = expected_peer
        self._channel_ready: asyncio.Future[RTCDataChannel] = (
            asyncio.get_running_loop().create_future()
        )
        # Retrieved even when nobody awaits it (a dial abandoned early), so no warning is logged.
        self._channel_ready.add_done_callback(
            lambda f: f.exception() if not f.cancelled() else None
        )
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)
        self._link: Link | None = None
        self._failed = asyncio.Event()

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            state = pc.connectionState
            log.debug("pc %s: %s", id(pc), state)
            if state in ("failed", "closed"):
                self._failed.set()
                if self._link is not None:
                    self._link.close(f"connection {state}", notify=False)
                if not self._channel_ready.done():
                    self._channel_ready.set_exception(TransportError(f"connection {state}"))

    def attach_channel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL:
            channel.close()
            return

        @channel.on("message")
        def _on_message(data: bytes | str) -> None:
            if isinstance(data, str):
                data = data.encode()
            if self._link is not None:
                try:
                    self._link.feed(data)
                except Exception as exc:  # never let a peer's message kill aiortc's loop
                    log.exception("link to %s failed on a message", self._link.peer_id[:12])
                    self._link.close(f"internal error: {type(exc).__name__}")
            elif self._inbox.full():
                # A peer flooding before the handshake completes is misbehaving.
                self._fail_now("too many messages before the handshake completed")
            else:
                self._inbox.put_nowait(data)

        @channel.on("close")
        def _on_close() -> None:
            if self._link is not None:
                self._link.close("data channel closed", notify=False)
            self._failed.set()

        @channel.on("bufferedamountlow")
        def _on_low() -> None:
            if self._link is not None:
                self._link.buffer_low()

        channel.bufferedAmountLowThreshold = self.config.link.low_water

        def _opened() -> None:
            if not self._channel_ready.done():
                self._channel_ready.set_result(channel)

        if channel.readyState == "open":
            _opened()
        else:
            channel.on("open", _opened)

    def _fail_now(self, reason: str) -> None:
        log.warning("dropping connection: %s", reason)
        self._failed.set()
        asyncio.get_running_loop().create_task(self.pc.close())

    async def establish(
        self,
        handlers: Mapping[str, Handler],
        on_close: Callable[[Link], None] | None = None,
        teardowns: Teardowns | None = None,
    ) -> Link:
        """Wait for the channel, run the handshake, return the authenticated link.

        Closes the peer connection on any failure and raises HandshakeError / TransportError.
        Once the link closes, its peer connection closes through ``teardowns`` (default: this
        connection's own).
        """
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                channel = await self._channel_ready
            async with asyncio.timeout(self.config.handshake_timeout):
                hello = await self._handshake(channel)
        except TimeoutError:
            await self.pc.close()
            raise TransportError("connection or handshake timed out") from None
        except EXPECTED:
            await self.pc.close()
            raise
        pc = self.pc
        closer = teardowns if teardowns is not None else Teardowns()

        def _closed(closed: Link) -> None:
            closer.close(pc)
            if on_close is not None:
                on_close(closed)

        # The pc closes whenever the link closes, from the first message on.
        link = Link(channel, hello.peer_id, hello.public_key, handlers, self.config.link, _closed)
        link.offerer = self.offerer
        link.path = lambda: candidate_pair(pc)
        self._link = link
        # Messages that raced the end of the handshake belong to the link.
        while not self._inbox.empty() and link.is_open:
            link.feed(self._inbox.get_nowait())
        link.start()
        if self._failed.is_set():
            link.close("connection lost during handshake", notify=False)
        return link

    async def _handshake(self, channel: RTCDataChannel) -> Any:
        local_sdp = self.pc.localDescription.sdp if self.pc.localDescription else ""
        remote_sdp = self.pc.remoteDescription.sdp if self.pc.remoteDescription else ""
        state = HandshakeState(
            self.identity,
            offerer=self.offerer,
            local_fp=fingerprint_from_sdp(local_sdp),
            remote_fp=fingerprint_from_sdp(remote_sdp),
            expected_peer=self.expected_peer,
            gate=self.gate,
        )
        encoder = Encoder(HANDSHAKE_LIMITS)
        reassembler = Reassembler(HANDSHAKE_LIMITS)

        def send(header: dict[str, Any]) -> None:
            if channel.readyState != "open":
                # e.g. a dialer frozen past the peer's deadline: the peer closed the channel
                raise TransportError("connection closed during the handshake")
            for frame in encoder.encode(header, compress=False):
                channel.send(frame)

        async def receive() -> dict[str, Any]:
            while True:
                get = asyncio.ensure_future(self._inbox.get())
                failed = asyncio.ensure_future(self._failed.wait())
                done, _ = await asyncio.wait({get, failed}, return_when=asyncio.FIRST_COMPLETED)
                failed.cancel()
                if get not in done:
                    get.cancel()
                    raise TransportError("connection closed during the handshake")
                try:
                    msg = reassembler.feed(get.result())
                except WireError as exc:
                    raise HandshakeError(f"malformed handshake message: {exc}") from None
                if msg is not None:
                    return msg.header

        send(state.hello())
        try:
            send(state.receive_hello(await receive()))
            proven = state.receive_proof(await receive())
        except HandshakeError as exc:
            with contextlib.suppress(Exception):
                send({"t": "bye", "why": f"handshake failed: {exc}"[:200]})
            raise
        return proven


MAX_CANDIDATES = 16


def check_sdp(sdp: str) -> None:
    """Bound what a remote SDP can make us do: every candidate costs STUN checks."""
    if len(sdp) > 32 * 1024:
        raise TransportError("SDP too large")
    count = sum(1 for line in sdp.splitlines() if line.startswith("a=candidate:"))
    if count > MAX_CANDIDATES:
        raise TransportError(f"SDP lists {count} ICE candidates (at most {MAX_CANDIDATES})")


class _ScopedPeerConnection(RTCPeerConnection):
    """A peer connection that gathers host candidates on its config's addresses only, and
    says why a TURN server gave no relay candidate.

    aioice picks host addresses through a module function (``aioice.ice.get_host_addresses``)
    and has no option for them; replacing that function would change every connection in the
    process. Instead, just before this connection gathers (only ``setLocalDescription`` does),
    each of its own ICE connections gets its gathering wrapped (:func:`_scope_candidates`).
    """

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(configuration=config.rtc_configuration())
        self._candidate_addresses = config.candidate_addresses
        self._stats = config.stats

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
    }
    if local.type == "relay":
        out["relay_protocol"] = ("tls/" if ice.turn_ssl else "") + str(ice.turn_transport)
    return out


def peer_connection(config: TransportConfig) -> RTCPeerConnection:
    """A bare aiortc peer connection built as ``config`` says (ICE servers, candidates)."""
    return _ScopedPeerConnection(config)


async def open_offer(
    identity: Identity,
    config: TransportConfig,
    expected_peer: str | None,
    gate: Gate | None = None,
) -> tuple[PendingConnection, str]:
    """Create the offering side; returns it and the offer SDP (candidates included)."""
    pc = peer_connection(config)
    pending = PendingConnection(
        pc, identity, config, offerer=True, expected_peer=expected_peer, gate=gate
    )
    channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True)
    pending.attach_channel(channel)
    await pc.setLocalDescription(await pc.createOffer())
    return pending, pc.localDescription.sdp


async def complete_offer(pending: PendingConnection, answer_sdp: str) -> None:
    """Apply the answer SDP on the offering side."""
    try:
        check_sdp(answer_sdp)
        await pending.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
    except Exception as exc:  # aiortc raises ValueError and others on bad SDP
        await pending.pc.close()
        raise TransportError(f"bad answer SDP: {exc}") from None


async def accept_offer(
    identity: Identity,
    config: TransportConfig,
    offer_sdp: str,
    expected_peer: str,
    gate: Gate | None = None,
) -> tuple[PendingConnection, str]:
    """Create the answering side for ``offer_sdp``; returns it and the answer SDP."""
    check_sdp(offer_sdp)
    pc = peer_connection(config)
    pending = PendingConnection(
        pc, identity, config, offerer=False, expected_peer=expected_peer, gate=gate
    )
    pc.on("datachannel", pending.attach_channel)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:
        await pc.close()
        raise TransportError(f"bad offer SDP: {exc}") from None
    return pending, pc.localDescription.sdp


EstablishFn = Callable[[PendingConnection], Awaitable[Link]]
