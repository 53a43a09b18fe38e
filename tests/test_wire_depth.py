"""Values nested deeper than Python can print, from a peer (in one process).

msgpack decodes up to 1024 nested containers, but ``repr``/``str`` of a value about 990
deep raise RecursionError, which no caller expects: a hello ``{"t": [[[...]]]}`` made the
handshake raise it and leak its peer connection, and an ``err`` reply with such a code
killed the caller and the NetView loop. Every decoder of peer msgpack now refuses values
nested deeper than ``MAX_DEPTH`` with its own error; the cleanup paths close on any error.
The same attacks against real node processes: tests/test_wire_depth_mesh.py.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import msgpack
import pytest

from mesh.discovery.dhtwire import MAX_VALUE, REQUEST, open_datagram, seal_datagram
from mesh.errors import (
    DiscoveryError,
    HandshakeError,
    InviteError,
    NotAMember,
    PeerUnavailable,
    RemoteError,
    SignalingError,
    WireError,
)
from mesh.inference.audit import AuditError, unpack_entries
from mesh.inference.models import models_of
from mesh.net import wire
from mesh.net.connections import ConnectionParams, Connections
from mesh.net.engine import RtcChannel, RtcPeer
from mesh.net.handshake import parse_hello
from mesh.net.identity import Identity
from mesh.net.rpc import Link, Reply
from mesh.net.signaling import ReplayGuard, parse_envelope, seal
from mesh.net.transport import HANDSHAKE_LIMITS, PendingConnection, TransportConfig
from mesh.net.view import NetConfig, NetView
from mesh.net.wire import Limits, Reassembler, parse_frame
from mesh.storage.fastpath import FastPathError
from mesh.storage.fastpath import parse_request as fast_request
from mesh.storage.providers import Providers
from mesh.trust.cert import parse_cert
from mesh.trust.invite import PREFIX, parse_invite
from mesh.trust.join import Redeemer, _parse_reply
from mesh.trust.service import _decode as revocations

from .memchannel import until
from .test_copies import Sink

FP1, FP2 = ":".join(["AA"] * 32), ":".join(["BB"] * 32)
DEEP = 1015  # lists in the attack's hello: its frame (1029 bytes) fits the handshake's caps


def nested(levels: int) -> bytes:
    """msgpack of ``levels`` lists one inside the other around a nil (msgpack.packb
    refuses to build them past 511)."""
    return b"\x91" * levels + b"\xc0"


def key(text: str) -> bytes:
    return bytes(msgpack.packb(text))


def frame(header: bytes) -> bytes:
    """A whole frame around a hand-built msgpack header."""
    return struct.pack(">2sBBHI", b"EM", 1, 0, len(header), 0) + header


def deep_value(levels: int) -> Any:
    value: Any = None
    for _ in range(levels):
        value = [value]
    return value


# -- the bound -----------------------------------------------------------------------------
def test_a_header_nested_past_what_python_prints_is_a_wire_error() -> None:
    raw = frame(b"\x81" + key("t") + nested(DEEP))
    assert len(raw) <= HANDSHAKE_LIMITS.max_frame
    with pytest.raises(WireError, match="nest"):
        parse_frame(raw, HANDSHAKE_LIMITS)


def test_the_depth_bound_is_exact() -> None:
    # the map is one level, so MAX_DEPTH - 1 lists in it make MAX_DEPTH levels
    at_bound = frame(b"\x81" + key("t") + nested(wire.MAX_DEPTH - 1))
    assert parse_frame(at_bound, Limits()).header["t"] == deep_value(wire.MAX_DEPTH - 1)
    with pytest.raises(WireError, match=f"deeper than {wire.MAX_DEPTH}"):
        parse_frame(frame(b"\x81" + key("t") + nested(wire.MAX_DEPTH)), Limits())
    # maps count as levels too
    maps = b"\x81" + key("k")
    parse_frame(frame(maps * (wire.MAX_DEPTH - 1) + b"\x80"), Limits())
    with pytest.raises(WireError):
        parse_frame(frame(maps * wire.MAX_DEPTH + b"\x80"), Limits())


def test_a_flat_big_header_is_fine() -> None:
    wide = {"t": "x", "l": list(range(900)), "m": {str(i): [i] for i in range(150)}}
    (raw,) = wire.Encoder().encode(wide)
    assert Reassembler().feed(raw) == wire.Message(wide, b"")


def test_a_chunked_message_with_a_deep_inner_header_is_refused() -> None:
    # the first chunk carries the user's header as _h: the bound applies to it too
    inner = b"\x82" + key("t") + key("x") + key("p") + nested(DEEP)
    meta = b"\x85" + key("_m") + b"\x00" + key("_i") + b"\x00" + key("_n") + b"\x02"
    meta += key("_l") + msgpack.packb(2048) + key("_h") + inner
    raw = struct.pack(">2sBBHI", b"EM", 1, wire.FLAG_CHUNK, len(meta), 1024) + meta
    with pytest.raises(WireError, match="nest"):
        Reassembler().feed(raw + bytes(1024))


# -- the handshake -------------------------------------------------------------------------
class Channel(Sink, RtcChannel):
    """The copies tests' open channel that keeps what is sent, bound as a transport's."""

    def bind(self, *, on_message: Any, on_open: Any, **_: Any) -> None:
        self.on_message = on_message
        on_open()


class Peer(RtcPeer):
    """The DTLS side of a connection, enough for the handshake; counts its closes."""

    local_sdp = f"a=fingerprint:sha-256 {FP1}\r\n"
    remote_sdp = f"a=fingerprint:sha-256 {FP2}\r\n"

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def offer(self, label: str) -> Any: ...
    async def answer(self, offer_sdp: str) -> Any: ...
    async def complete(self, answer_sdp: str) -> None: ...

    async def close(self) -> None:
        self.closed += 1

    def dtls_fingerprints(self) -> tuple[str, str]:
        return FP1, FP2

    def candidate_pair(self) -> None:
        return None


def pending_connection() -> tuple[PendingConnection, Peer, Channel]:
    pc = Peer()
    cfg = TransportConfig(engine="aiortc", handshake_timeout=5)
    pending = PendingConnection(pc, Identity.generate(), cfg, offerer=False, expected_peer=None)
    channel = Channel()
    pending.attach_channel(channel)
    return pending, pc, channel


async def test_a_deep_hello_fails_the_handshake_and_closes_the_connection() -> None:
    pending, pc, channel = pending_connection()
    channel.on_message(frame(b"\x81" + key("t") + nested(DEEP)))
    with pytest.raises(HandshakeError, match="malformed handshake message"):
        await pending.establish({})
    assert pc.closed == 1
    bye = Reassembler(HANDSHAKE_LIMITS).feed(channel.sent[-1])
    assert bye is not None and bye.header["t"] == "bye"


async def test_any_error_in_the_handshake_closes_the_connection(monkeypatch: Any) -> None:
    async def broken(self: PendingConnection, channel: RtcChannel) -> Any:
        raise RuntimeError("a bug")

    pending, pc, _ = pending_connection()
    monkeypatch.setattr(PendingConnection, "_handshake", broken)
    with pytest.raises(RuntimeError):
        await pending.establish({})
    assert pc.closed == 1


async def test_a_handshake_cancelled_midway_closes_the_connection() -> None:
    pending, pc, channel = pending_connection()
    task = asyncio.ensure_future(pending.establish({}))
    await until(lambda: channel.sent)  # our hello is out: waiting for the peer's
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pc.closed == 1


async def test_an_inbound_handshake_failing_unexpectedly_is_logged_not_raised() -> None:
    # (a bug of ours, not a failed proof: the task ends, logged, and its slot is free)
    class Failing:
        async def establish(self, *args: Any) -> Any:
            raise RuntimeError("a bug")

    conns = Connections(
        Identity.generate(),
        TransportConfig(engine="aiortc"),
        {},
        ReplayGuard(),
        ConnectionParams(),
        my_endpoints=lambda: [],
        my_name="me",
    )
    pid = "p" * 32
    failing = Failing()
    conns._pending_inbound[pid] = failing  # type: ignore[assignment]
    await conns._finish_inbound(pid, failing)  # type: ignore[arg-type]
    assert pid not in conns._pending_inbound
    await conns.stop()


def test_a_peer_value_in_a_handshake_error_is_shown_bounded() -> None:
    with pytest.raises(HandshakeError) as info:
        parse_hello({"t": ["x" * 100] * 40})
    assert len(str(info.value)) < 200


# -- RPC replies and the NetView loop ------------------------------------------------------
class Wire:
    """A link's channel that keeps what the link sends."""

    bufferedAmount = 0  # noqa: N815 - the WebRTC name
    burst = None

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def send(self, data: bytes, copy: bool = True) -> None:
        self.out.append(data)


def err_frame(call_id: int, code: bytes) -> bytes:
    header = b"\x84" + key("t") + key("err") + key("id") + msgpack.packb(call_id)
    return frame(header + key("c") + code + key("e") + key(""))


async def answer_with(link: Link, chan: Wire, code: bytes) -> Any:
    call = asyncio.ensure_future(link.call("net.net_info", {}))
    await until(lambda: chan.out)
    request = Reassembler().feed(chan.out[-1])
    assert request is not None
    link.feed(err_frame(request.header["id"], code))
    return await asyncio.gather(call, return_exceptions=True)


async def test_a_deep_error_reply_is_a_protocol_error() -> None:
    chan = Wire()
    link = Link(chan, "x" * 32, b"", {})
    (result,) = await answer_with(link, chan, nested(1020))
    assert isinstance(result, PeerUnavailable), repr(result)
    assert link.close_reason.startswith("protocol error")


async def test_an_error_code_that_is_not_text_is_shown_bounded() -> None:
    chan = Wire()
    link = Link(chan, "x" * 32, b"", {})
    (result,) = await answer_with(link, chan, msgpack.packb([["y" * 200] * 10]))
    assert isinstance(result, RemoteError) and len(str(result)) < 200, repr(result)


async def test_the_netview_loop_outlives_an_unexpected_error() -> None:
    calls: list[str] = []

    class Peers:
        def links(self) -> list[Any]:
            return [type("L", (), {"peer_id": "x" * 32, "on_rtt": None})()]

    class Node:
        me = "v" * 32
        peers = Peers()

        async def call(self, pid: str, method: str, *args: Any, **kw: Any) -> Any:
            calls.append(pid)
            raise RuntimeError("a bug")

    view = NetView(Node(), NetConfig(refresh=0.01))  # type: ignore[arg-type]
    view.start()
    try:
        await until(lambda: len(calls) >= 3)
        assert view._task is not None and not view._task.done()
    finally:
        await view.stop()


# -- the other decoders of peer msgpack ----------------------------------------------------
def test_a_deep_signaling_body_is_refused() -> None:
    a, b = Identity.generate(), Identity.generate()
    raw = seal(a, "offer", b.peer_id, {"sdp": deep_value(100)})
    with pytest.raises(SignalingError, match="nest"):
        parse_envelope(raw)
    parse_envelope(seal(a, "offer", b.peer_id, {"sdp": "v=0", "addrs": ["1.2.3.4:5"]}))


def test_a_deep_dht_datagram_is_refused() -> None:
    a = Identity.generate()
    raw = seal_datagram(a, REQUEST, b"m" * 20, ["ping", deep_value(100)])
    with pytest.raises(DiscoveryError, match="nest"):
        open_datagram(raw, MAX_VALUE)


async def _provider_sync(payload: bytes) -> Any:
    return await Providers(None, "z").rpc_obj_sync(None, {}, payload)  # type: ignore[arg-type]


def _invite(items: list[Any]) -> Any:
    body = base64.urlsafe_b64encode(msgpack.packb(items)).decode().rstrip("=")
    return parse_invite(PREFIX + body)


DEEP_LIST = deep_value(100)
DECODERS = [
    ("revocations", lambda: revocations(msgpack.packb([DEEP_LIST])), WireError),
    ("provider sync", lambda: asyncio.run(_provider_sync(msgpack.packb([DEEP_LIST]))), None),
    ("fast path", lambda: fast_request(b"\x81\xa3sha" * 100 + b"\xc0"), FastPathError),
    ("audit", lambda: unpack_entries(msgpack.packb({"entries": [], "x": DEEP_LIST})), AuditError),
    ("invite", lambda: _invite([deep_value(40)] * 8), InviteError),
    ("join request", lambda: Redeemer._redeem(None, msgpack.packb([DEEP_LIST]), 0), InviteError),  # type: ignore[arg-type]
    ("join reply", lambda: _parse_reply(b"\x81\xa1k" * 40 + b"\xc0", None, None), InviteError),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("call", "error"), [d[1:] for d in DECODERS], ids=[d[0] for d in DECODERS])
def test_every_decoder_of_peer_msgpack_refuses_deep_values(call: Any, error: Any) -> None:
    with pytest.raises(error or DiscoveryError, match="nest"):
        call()


def test_a_models_listing_nested_deep_is_dropped() -> None:
    # (a peer's listing is filtered, not refused: the route planner asks every peer)
    listing = [{"model_id": "m", "name": DEEP_LIST}]
    assert models_of(Reply({}, msgpack.packb(listing))) == []
    assert models_of(Reply({}, msgpack.packb([{"model_id": "m", "name": "n"}]))) == [
        {"model_id": "m", "name": "n"}
    ]


def test_a_certificate_nested_deep_is_malformed() -> None:
    # (a certificate is 200 bytes at most: too few to nest past what repr takes, but a
    # peer's version field is still not echoed whole)
    with pytest.raises(NotAMember, match="not a list of 8 fields") as info:
        parse_cert(msgpack.packb([deep_value(40), *[b""] * 7]))
    assert info.value.reason == "malformed"
