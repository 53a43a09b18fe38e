"""WebRTC links: a peer connection, one data channel, the identity handshake.

``open_offer`` / ``accept_offer`` build the two halves of a connection; how the SDP travels is
the signaling layer's business (:mod:`mesh.net.signaling`). Once the channel opens, both sides run
the handshake of :mod:`mesh.net.handshake`; only then is a :class:`~mesh.net.rpc.Link` handed out.

The WebRTC stack is an :class:`~mesh.net.engine.Engine` chosen by ``TransportConfig.engine``:
``wrtc`` (libwebrtc), ``aiortc``, or ``auto`` (wrtc when it can be imported, else aiortc).
The two interoperate, so a mesh may mix them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

from mesh.errors import HandshakeError, TransportError, WireError
from mesh.net import engine_aiortc
from mesh.net.copies import COPY_MODES, CopySender, Resequencer
from mesh.net.engine import Engine, IceStats, RtcChannel, RtcPeer
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
    "ENGINE_CHOICES",
    "get_engine",
    "wrtc_available",
]

log = logging.getLogger(__name__)
CHANNEL_LABEL = "edgemesh"
ENGINE_CHOICES = ("auto", "wrtc", "aiortc")
# Handshake messages are a few hundred bytes: nothing bigger is accepted before it completes.
HANDSHAKE_LIMITS = Limits(
    max_header=1024, max_frame=4096, max_message=4096, max_partial=1, max_partial_bytes=4096
)


def wrtc_available() -> bool:
    """Whether the wrtc engine can run here (its package installed: wheels exist for
    x86_64/aarch64 Linux, macOS and Windows)."""
    try:
        return importlib.util.find_spec("webrtc") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


@functools.cache
def get_engine(name: str) -> Engine:
    """The engine called ``name`` (one of ENGINE_CHOICES); TransportError when it is not
    installed. ``auto``: wrtc when installed, else aiortc."""
    if name not in ENGINE_CHOICES:
        raise TransportError(f"unknown WebRTC engine {name!r} (choose {', '.join(ENGINE_CHOICES)})")
    if name == "auto":
        name = "wrtc" if wrtc_available() else "aiortc"
    if name == "aiortc":
        return engine_aiortc.AiortcEngine()
    try:
        from mesh.net import engine_wrtc
    except ImportError as exc:
        raise TransportError(f"the wrtc engine is not installed here ({exc})") from None
    return engine_wrtc.WrtcEngine()


class Teardowns:
    """Peer connections being closed after their link closed, held until they have: their
    owner (one node's Connections) waits for its own, never for another node's."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self, pc: RtcPeer) -> None:
        task = asyncio.get_running_loop().create_task(pc.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait until every peer connection handed to :meth:`close` has finished closing."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


@dataclass(frozen=True)
class TransportConfig:
    """How links are built. ``ice_servers`` are STUN/TURN servers (a bare string is a URL
    without credentials), checked when the config is built (IceConfigError); empty means none
    are contacted. ``relay_only``: gather and use relay (TURN) candidates only.

    ``candidate_addresses``: the only local addresses our peer connections offer ICE host
    candidates on (None: every interface but loopback). A loopback mesh needs 127.0.0.1. It
    applies to the connections built with this config only, never to other WebRTC users in
    the process (aiortc: gathering is scoped; wrtc: our SDP is filtered).

    ``engine``: the WebRTC stack (ENGINE_CHOICES); checked when the config is built.
    """

    ice_servers: tuple[IceServer | str, ...] = ()
    relay_only: bool = False
    stats: IceStats = field(default_factory=lambda: IceStats(), compare=False)
    candidate_addresses: tuple[str, ...] | None = None
    handshake_timeout: float = 10.0
    connect_timeout: float = 20.0
    link: LinkParams = field(default_factory=LinkParams)
    engine: str = "auto"
    copies: str = "auto"  # small frames copied on a second channel (mesh.net.copies)

    def __post_init__(self) -> None:
        check_servers(self.servers)
        if self.relay_only and not any(s.is_turn for s in self.servers):
            raise IceConfigError("relay-only ICE needs a TURN server")
        get_engine(self.engine)  # TransportError now, not at the first dial
        if self.copies not in COPY_MODES:
            raise TransportError(f"copies {self.copies!r}: one of {', '.join(COPY_MODES)}")

    @property
    def servers(self) -> tuple[IceServer, ...]:
        return tuple(s if isinstance(s, IceServer) else IceServer(s) for s in self.ice_servers)

    @property
    def engine_name(self) -> str:
        """The engine in use: ``wrtc`` or ``aiortc`` (``auto`` resolved)."""
        return get_engine(self.engine).name

    def rtc_configuration(self) -> RTCConfiguration:
        """The aiortc configuration for this config's ICE servers and policy."""
        return engine_aiortc.rtc_configuration(self)

    def new_peer(self) -> RtcPeer:
        return get_engine(self.engine).peer(self)


class PendingConnection:
    """A peer connection whose data channel and handshake are still to complete."""

    def __init__(
        self,
        pc: RtcPeer,
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
        self.started = time.monotonic()
        self._channel_ready: asyncio.Future[RtcChannel] = asyncio.get_running_loop().create_future()
        # Retrieved even when nobody awaits it (a dial abandoned early), so no warning is logged.
        self._channel_ready.add_done_callback(
            lambda f: f.exception() if not f.cancelled() else None
        )
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)
        self._link: Link | None = None
        self._copies = Resequencer()  # frames from the main channel and the spare, in order
        self._spare: RtcChannel | None = None
        self._failed = asyncio.Event()
        pc.on_state = self._on_state
        pc.on_channel = self.attach_channel

    def _on_state(self, state: str) -> None:
        self._failed.set()
        if self._link is not None:
            self._link.close(f"connection {state}", notify=False)
        if not self._channel_ready.done():
            self._channel_ready.set_exception(TransportError(f"connection {state}"))

    def attach_channel(self, channel: RtcChannel) -> None:
        if channel.label != CHANNEL_LABEL:
            channel.close()
            return

        def _on_message(data: bytes) -> None:
            if self._link is not None:
                self._guarded(self._copies.main, data)
            elif self._inbox.full():
                # A peer flooding before the handshake completes is misbehaving.
                self._fail_now("too many messages before the handshake completed")
            else:
                self._inbox.put_nowait(data)

        def _on_close() -> None:
            if self._link is not None:
                self._link.close("data channel closed", notify=False)
            self._failed.set()

        def _on_low() -> None:
            if self._link is not None:
                self._link.buffer_low()

        def _opened() -> None:
            if not self._channel_ready.done():
                self._channel_ready.set_result(channel)

        channel.bind(
            on_message=_on_message,
            on_open=_opened,
            on_close=_on_close,
            on_low=_on_low,
            low_water=self.config.link.low_water,
        )

    def _guarded(self, take: Callable[[bytes], None], data: bytes) -> None:
        try:
            take(data)
        except Exception as exc:  # never let a peer's message kill the engine's loop
            if self._link is None:
                log.exception("connection failed on a message before its handshake")
                self._fail_now(f"internal error: {type(exc).__name__}")
                return
            log.exception("link to %s failed on a message", self._link.peer_id[:12])
            self._link.close(f"internal error: {type(exc).__name__}")

    def attach_spare(self, channel: RtcChannel) -> None:
        """The channel copies of small frames arrive on (mesh.net.copies)."""
        self._spare = channel
        channel.bind(
            on_message=lambda data: self._guarded(self._copies.copy, data),
            on_open=lambda: None,
            on_close=lambda: None,
            on_low=lambda: None,
            low_water=0,
        )

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

        Closes the peer connection on any failure, and raises HandshakeError / TransportError
        (a bug or a cancel: what it was, re-raised once closed). Once the link closes, its
        peer connection closes through ``teardowns`` (default: this connection's own).
        """
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                channel = await self._channel_ready
            async with asyncio.timeout(self.config.handshake_timeout):
                hello = await self._handshake(channel)
        except BaseException as exc:
            # Whatever failed, a bug or a cancel too: left open, the connection would hold
            # its sockets and DTLS state while the peer's side stays up.
            await self.pc.close()
            if isinstance(exc, TimeoutError):
                raise TransportError("connection or handshake timed out") from None
            raise
        pc = self.pc
        closer = teardowns if teardowns is not None else Teardowns()

        def _closed(closed: Link) -> None:
            closer.close(pc)
            if on_close is not None:
                on_close(closed)

        # The pc closes whenever the link closes, from the first message on.
        sender = CopySender(channel, self._spare, self.config.copies, pc.candidate_pair)
        link = Link(sender, hello.peer_id, hello.public_key, handlers, self.config.link, _closed)
        link.offerer = self.offerer
        link.path = pc.candidate_pair
        link.copies = (sender, self._copies)
        link.stall_watch.on_stall = sender.stalled
        self._link = link
        self._copies.attach(link.feed)
        # Messages that raced the end of the handshake belong to the link.
        while not self._inbox.empty() and link.is_open:
            self._copies.main(self._inbox.get_nowait())
        link.start()
        if self._failed.is_set():
            link.close("connection lost during handshake", notify=False)
        return link

    def _fingerprints(self) -> tuple[str, str]:
        """(ours, theirs): the fingerprints of the certificates the live DTLS session runs
        with, read from the engine's transport, each also checked against what its SDP
        declared. The signed transcript binds these, so an engine that failed to verify the
        peer's certificate against the SDP still cannot be fooled into binding another."""
        local, remote = self.pc.dtls_fingerprints()
        if local != fingerprint_from_sdp(self.pc.local_sdp):
            raise HandshakeError("our DTLS certificate is not the one our SDP declares")
        if remote != fingerprint_from_sdp(self.pc.remote_sdp):
            raise HandshakeError(
                "the peer's DTLS certificate does not match the fingerprint its SDP declares"
            )
        return local, remote

    async def _handshake(self, channel: RtcChannel) -> Any:
        try:
            local_fp, remote_fp = self._fingerprints()
        except HandshakeError:
            if self._failed.is_set() or channel.readyState != "open":
                # closed under us (the peer gave this dial up for its own): no certificate
                # left to read is not a failed proof
                raise TransportError("connection closed during the handshake") from None
            raise
        state = HandshakeState(
            self.identity,
            offerer=self.offerer,
            local_fp=local_fp,
            remote_fp=remote_fp,
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


def peer_connection(config: TransportConfig) -> RTCPeerConnection:
    """A bare aiortc peer connection built as ``config`` says (ICE servers, candidates);
    tests use it to stand in for a peer at the SDP level."""
    return engine_aiortc.ScopedPeerConnection(config)


def candidate_pair(pc: RTCPeerConnection) -> dict[str, Any] | None:
    """The candidate pair of a bare aiortc peer connection (see engine_aiortc)."""
    return engine_aiortc.candidate_pair(pc)


async def open_offer(
    identity: Identity,
    config: TransportConfig,
    expected_peer: str | None,
    gate: Gate | None = None,
) -> tuple[PendingConnection, str]:
    """Create the offering side; returns it and the offer SDP (candidates included)."""
    pc = config.new_peer()
    pending = PendingConnection(
        pc, identity, config, offerer=True, expected_peer=expected_peer, gate=gate
    )
    try:
        channel, sdp = await pc.offer(CHANNEL_LABEL)
    except BaseException:
        await pc.close()
        raise
    pending.attach_channel(channel)
    if pc.spare is not None:
        pending.attach_spare(pc.spare)
    return pending, sdp


async def complete_offer(pending: PendingConnection, answer_sdp: str) -> None:
    """Apply the answer SDP on the offering side."""
    try:
        check_sdp(answer_sdp)
        await pending.pc.complete(answer_sdp)
    except Exception as exc:  # the engines raise ValueError and others on bad SDP
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
    pc = config.new_peer()
    pending = PendingConnection(
        pc, identity, config, offerer=False, expected_peer=expected_peer, gate=gate
    )
    try:
        sdp = await pc.answer(offer_sdp)
    except Exception as exc:
        await pc.close()
        raise TransportError(f"bad offer SDP: {exc}") from None
    if pc.spare is not None:
        pending.attach_spare(pc.spare)
    return pending, sdp


EstablishFn = Callable[[PendingConnection], Awaitable[Link]]
