"""The wrtc engine: libwebrtc (Chrome's WebRTC engine, through the ``wrtc`` package, 0.1.0).

Facts this module leans on (measured, see DESIGN.md section 8): ICE, DTLS and SCTP run in
native threads and events arrive on the asyncio loop; a data channel's send queue is capped at
16 MiB (``send`` raises past it: callers wait on ``bufferedAmount``, see mesh.net.rpc's water
marks) and a message at 256 KiB; loopback candidates are gathered only after
``webrtc.allow_loopback()``, which must run before the process's first connection.

We supply each connection's DTLS certificate, so our own fingerprint is known without parsing
our SDP; the peer's certificate is read from the live DTLS transport.

Host candidates: libwebrtc gathers on every interface and has no per-connection address list,
so the config's ``candidate_addresses`` filter what our SDP offers (None: every address but
loopback, as aiortc does). Active-only ICE-TCP host candidates are left out: two peers that
both have only active ones can never pair, and they would count against the remote side's cap
on candidates.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import webrtc

from mesh.errors import HandshakeError, TransportError
from mesh.net.copies import SPARE_ID, SPARE_LABEL
from mesh.net.engine import (
    Engine,
    PeerOptions,
    RtcChannel,
    RtcPeer,
    same_host,
    sha256_fingerprint,
)
from mesh.net.ice import IceConfigError, parse_url

__all__ = ["WrtcEngine", "WrtcPeer", "filter_candidates", "GATHER_TIMEOUT"]

log = logging.getLogger(__name__)

GATHER_TIMEOUT = 5.0  # as aioice's STUN/TURN timeout: past it we offer what we have
MAX_OFFERED = 16  # candidates in our SDP (the remote side refuses more, transport.check_sdp)
_loopback_allowed = False


def _allow_loopback() -> None:
    """Gather loopback candidates in this process (once, before its first connection): a
    loopback mesh needs them; :func:`filter_candidates` hides them from other meshes."""
    global _loopback_allowed
    if _loopback_allowed:
        return
    _loopback_allowed = True
    try:
        webrtc.allow_loopback()
    except webrtc.InvalidStateError:
        log.warning("wrtc connections existed before ours: no loopback candidates")


def _host_allowed(address: str, ours: tuple[str, ...] | None) -> bool:
    if ours is not None:
        return address in ours
    try:
        return not ipaddress.ip_address(address).is_loopback
    except ValueError:  # an mDNS name: not loopback
        return True


def filter_candidates(sdp: str, ours: tuple[str, ...] | None) -> str:
    """``sdp`` with only the candidates we offer: host candidates on ``ours`` (None: any
    but loopback), no active-only TCP host candidates, at most MAX_OFFERED in all."""
    out: list[str] = []
    kept = 0
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            f = line.split()
            # a=candidate:FOUNDATION COMPONENT PROTO PRIORITY ADDRESS PORT typ TYPE ...
            if len(f) < 8 or f[6] != "typ":
                continue
            if f[7] == "host" and (not _host_allowed(f[4], ours) or "tcptype active" in line):
                continue
            if kept >= MAX_OFFERED:
                continue
            kept += 1
        out.append(line)
    return "\r\n".join(out)


def _relay_error(url: str, code: int, text: str) -> str:
    """How a TURN failure reads in /v1/info and the log (the URL never holds a credential:
    mesh.net.ice refuses those)."""
    try:
        parsed = parse_url(url)
        where = f"{parsed['host']}:{parsed['port']} ({parsed.get('transport') or 'udp'})"
    except IceConfigError:
        where = url
    return f"TURN {where}: {f'{code} ' if code else ''}{text}".strip()


class WrtcChannel(RtcChannel):
    # libwebrtc's SCTP (dcsctp) sends at most 4 packets (max_burst) per send call or
    # acknowledgement, each with 1160 bytes of a message (1191-byte packets). A 21 KB message
    # on a 40 ms path took 5 round trips as one frame, 1 as frames of this size.
    burst = 4 * 1160

    def __init__(self, channel: webrtc.RTCDataChannel) -> None:
        self._ch = channel
        self.label = channel.label
        channel.binary_type = "arraybuffer"  # bytes, never Blob

    def send(self, data: bytes) -> None:
        try:
            self._ch.send(data)
        except webrtc.OperationError as exc:  # the 16 MiB send queue is full
            raise TransportError(f"data channel send queue full: {exc}") from None
        except webrtc.InvalidStateError as exc:
            raise TransportError(f"data channel not open: {exc}") from None
        except TypeError as exc:  # over the transport's max-message-size
            raise TransportError(f"message not sent: {exc}") from None

    @property
    def bufferedAmount(self) -> int:  # noqa: N802
        return int(self._ch.buffered_amount)

    @property
    def readyState(self) -> str:  # noqa: N802
        return str(self._ch.ready_state.value)

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

        def _message(event: Any) -> None:
            data = event.data
            on_message(data.encode() if isinstance(data, str) else data)

        ch.on("message", _message)
        ch.on("close", lambda _e: on_close())
        ch.on("bufferedamountlow", lambda _e: on_low())
        ch.buffered_amount_low_threshold = low_water
        if ch.ready_state == webrtc.RTCDataChannelState.open:
            on_open()  # a channel the remote side opened is open when announced
        else:
            ch.on("open", lambda _e: on_open())


class WrtcPeer(RtcPeer):
    engine = "wrtc"

    def __init__(self, options: PeerOptions) -> None:
        super().__init__()
        self._options = options
        self._pc: webrtc.RTCPeerConnection | None = None
        self._cert: webrtc.RTCCertificate | None = None
        self._local_sdp = ""
        self._remote_sdp = ""
        self._turn_errors: dict[str, tuple[int, str]] = {}
        self._closed = False

    async def _build(self) -> webrtc.RTCPeerConnection:
        if self._closed:
            raise TransportError("connection closed")
        _allow_loopback()
        self._cert = await webrtc.RTCPeerConnection.generate_certificate("ECDSA")
        opts = self._options
        config = webrtc.RTCConfiguration(
            ice_servers=[
                webrtc.RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
                for s in opts.servers
            ],
            ice_transport_policy="relay" if opts.relay_only else "all",
            certificates=[self._cert],
        )
        pc = webrtc.RTCPeerConnection(config)
        self._pc = pc
        pc.on("connectionstatechange", lambda _e: self._state(pc.connection_state.value))
        pc.on("datachannel", self._on_datachannel)
        pc.on("icecandidateerror", self._on_candidate_error)
        return pc

    def _on_datachannel(self, event: Any) -> None:
        channel = WrtcChannel(event.channel)
        if self.on_channel is not None:
            self.on_channel(channel)
        else:
            channel.close()

    def _on_candidate_error(self, event: Any) -> None:
        url = str(event.url or "")
        if not url.startswith("turn"):
            log.info("STUN %s: %s %s", url, event.error_code, event.error_text)
            return
        # One error per local network; a STUN error code (401, 403...) says more than 701
        # (unreachable from one of the interfaces).
        old = self._turn_errors.get(url)
        if old is None or old[0] >= 700 > int(event.error_code):
            self._turn_errors[url] = (int(event.error_code), str(event.error_text))

    def _enough(self, sdp: str) -> bool:
        """Whether the SDP holds what the configured servers give: a srflx candidate for
        STUN, a relay for TURN (or its error), host candidates otherwise. libwebrtc may not
        report gathering complete for seconds past that (in the NAT lab: never within the
        timeout, so every link waited 5 s for its offer and 5 s for its answer)."""
        if self._options.relay_only:
            # relay only: wait as before (sent early, the peer's relay address reached us
            # first as a prflx candidate in test_turn_relay)
            return False
        return not self._missing(sdp)

    def _missing(self, sdp: str) -> list[str]:
        """What the SDP lacks of what the configured servers give."""
        missing = [] if " typ host" in sdp else ["host candidates"]
        for server in self._options.servers:
            if server.is_turn:
                if " typ relay" not in sdp and server.url not in self._turn_errors:
                    missing.append(f"a relay from {server.url}")
            elif not self._options.relay_only and " typ srflx" not in sdp:
                missing.append(f"a srflx candidate from {server.url}")
        return missing

    async def _gathered(self, pc: webrtc.RTCPeerConnection) -> str:
        """Wait for ICE gathering to complete, or for the candidates the servers give
        (GATHER_TIMEOUT at most); our SDP with what was gathered."""
        done = asyncio.get_running_loop().create_future()

        def _changed(_e: object) -> None:
            if done.done():
                return
            desc = pc.local_description
            complete = pc.ice_gathering_state == webrtc.RTCIceGatheringState.complete
            if complete or (desc is not None and self._enough(desc.sdp)):
                done.set_result(None)

        pc.on("icegatheringstatechange", _changed)
        pc.on("icecandidate", _changed)
        pc.on("icecandidateerror", _changed)
        _changed(None)
        try:
            async with asyncio.timeout(GATHER_TIMEOUT):
                await done
        except TimeoutError:
            desc = pc.local_description
            self.gather_short = self._missing(desc.sdp if desc is not None else "")
        desc = pc.local_description
        sdp = desc.sdp if desc is not None else ""
        self._report_relay(sdp)
        self._local_sdp = filter_candidates(sdp, self._options.candidate_addresses)
        return self._local_sdp

    def _report_relay(self, sdp: str) -> None:
        """A TURN server that gave no relay candidate is said aloud (counted in /v1/info)."""
        if " typ relay" in sdp:
            return
        for url, (code, text) in self._turn_errors.items():
            self._options.stats.relay_failed(_relay_error(url, code, text))
        for server in self._options.servers:
            if server.is_turn and not self._turn_errors:
                self._options.stats.relay_failed(
                    _relay_error(server.url, 0, "no relay candidate and no error reported")
                )

    def _add_spare(self, pc: webrtc.RTCPeerConnection) -> None:
        init = webrtc.RTCDataChannelInit(
            ordered=False, max_retransmits=0, negotiated=True, id=SPARE_ID
        )
        self.spare = WrtcChannel(pc.create_data_channel(SPARE_LABEL, init))

    async def offer(self, label: str) -> tuple[RtcChannel, str]:
        pc = await self._build()
        channel = WrtcChannel(pc.create_data_channel(label, webrtc.RTCDataChannelInit()))
        self._add_spare(pc)
        await pc.set_local_description(await pc.create_offer())
        return channel, await self._gathered(pc)

    async def answer(self, offer_sdp: str) -> str:
        pc = await self._build()
        await pc.set_remote_description(
            webrtc.RTCSessionDescriptionInit(type="offer", sdp=offer_sdp)
        )
        self._remote_sdp = offer_sdp
        self._add_spare(pc)
        await pc.set_local_description(await pc.create_answer())
        return await self._gathered(pc)

    async def complete(self, answer_sdp: str) -> None:
        if self._pc is None:
            raise TransportError("no offer to complete")
        await self._pc.set_remote_description(
            webrtc.RTCSessionDescriptionInit(type="answer", sdp=answer_sdp)
        )
        self._remote_sdp = answer_sdp

    async def close(self) -> None:
        self._closed = True
        if self._pc is not None:
            self._pc.close()

    @property
    def local_sdp(self) -> str:
        return self._local_sdp

    @property
    def remote_sdp(self) -> str:
        return self._remote_sdp

    def dtls_fingerprints(self) -> tuple[str, str]:
        sctp = self._pc.sctp if self._pc is not None else None
        certs = sctp.transport.get_remote_certificates() if sctp is not None else []
        if self._cert is None or not certs:
            raise HandshakeError("DTLS has not completed: no remote certificate")
        ours = [f.value for f in self._cert.get_fingerprints() if f.algorithm == "sha-256"]
        if not ours or ours[0] is None:
            raise HandshakeError("our DTLS certificate has no sha-256 fingerprint")
        return ours[0].upper(), sha256_fingerprint(certs[0])

    def candidate_pair(self) -> dict[str, Any] | None:
        sctp = self._pc.sctp if self._pc is not None else None
        if sctp is None:
            return None
        pair = sctp.transport.ice_transport.get_selected_candidate_pair()
        if pair is None:
            return None
        local, remote = pair.local, pair.remote
        out: dict[str, Any] = {
            "local": str(local.type.value) if local.type else None,
            "remote": str(remote.type.value) if remote.type else None,
            "protocol": str(local.protocol.value) if local.protocol else None,
            "same_host": same_host(local.address, remote.address),
        }
        if local.relay_protocol is not None:
            proto = str(webrtc.RTCIceServerTransportProtocol(local.relay_protocol).value)
            out["relay_protocol"] = "tls/tcp" if proto == "tls" else proto
        return out


class WrtcEngine(Engine):
    name = "wrtc"
    max_message = 256 * 1024  # wrtc refuses larger messages (we send 64 KiB frames)

    def peer(self, options: PeerOptions) -> RtcPeer:
        return WrtcPeer(options)
