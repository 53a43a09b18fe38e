"""A direct, encrypted TCP path for bulk chunks between peers that can reach each other.

WebRTC (pure-Python SCTP and DTLS in aiortc) moves about 15 MB/s per link here; a chunk pull
over plain TCP with libsodium doing the crypto is limited by hashing and disk instead. WebRTC
stays the path that always works: a peer without a reachable fast address, or whose fast
connection fails to set up, is read over its link (``chunk_read``).

**Handshake** (both sides already know each other's Ed25519 key from the WebRTC link; the
server only accepts peers it has a link with)::

    C -> S   C_pk (32) | C_eph (32, X25519) | nonce (16)
    S -> C   S_eph (32) | sig_S(T)                    T = ctx | C_pk | S_pk | C_eph | S_eph | nonce
    C -> S   sig_C(T | "client")

C checks ``sig_S`` with the key of the peer it meant to reach; S checks ``sig_C`` with
``C_pk`` and that ``C_pk`` belongs to a connected peer. Keys for each direction are BLAKE2b of
the X25519 shared secret and the transcript; frames are libsodium secretstream
(XChaCha20-Poly1305) messages, each prefixed by its 4-byte length, capped before reading.

**Requests**: ``{"sha": hex}`` (msgpack) -> ``0x00 | chunk bytes`` or ``0x01 | error text``.

**Bounds** (slowloris): at most ``max_connections`` connections served at once, of which at
most ``max_handshaking`` not yet authenticated (each must finish its handshake within
``HANDSHAKE_TIMEOUT``) and at most ``max_per_peer`` per authenticated peer; a connection with
no complete request for ``idle_timeout`` seconds is closed. Refused connections are closed at
once: the peer's client falls back to its WebRTC link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import nacl.bindings as sodium
import nacl.public
from nacl.exceptions import CryptoError

from mesh.errors import EXPECTED, Error, IdentityError, PeerUnavailable
from mesh.net.identity import verify
from mesh.net.signaling import format_endpoint, parse_endpoint
from mesh.net.wire import check_depth
from mesh.storage.store import CHUNK_MAX, StoreError

if TYPE_CHECKING:
    from mesh.net.context import PeerContext
    from mesh.net.view import NetView

__all__ = ["FastPath", "FastPathError", "FastLimits", "parse_request"]

log = logging.getLogger(__name__)
_CTX = b"edgemesh/fast/v1\x00"
_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_HBYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
MAX_FRAME = CHUNK_MAX + 4096
HANDSHAKE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 60.0
POOL_PER_PEER = 4
# A TCP connect takes one round trip (and one SYN retransmission at 1 s under loss); a
# firewall that drops SYNs, or a private address seen from another network, never answers:
# waiting longer only delays the fallback to the link.
CONNECT_TIMEOUT = 1.5
RETRY_UNREACHABLE = 300.0  # a peer whose fast path failed is tried again after this long


@dataclass(frozen=True)
class FastLimits:
    max_connections: int = 256  # connections served at once, all peers together
    max_handshaking: int = 32  # of them, not yet authenticated
    max_per_peer: int = 8  # authenticated connections per peer (a client pools 4)
    idle_timeout: float = 30.0  # no complete request for this long: closed
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_handshaking, self.max_per_peer) < 1:
            raise ValueError("fast-path caps must be >= 1")
        if self.idle_timeout <= 0 or self.handshake_timeout <= 0:
            raise ValueError("fast-path deadlines must be positive")


def fast_endpoint(address: Any) -> tuple[str, int]:
    """The (IP, port) to dial for a peer's advertised fast address. Only an IP literal with
    a port in 1..65535 (not an unspecified or multicast address): a host name would be
    looked up and dialed wherever it resolves, so it is refused like junk."""
    parsed = parse_endpoint(address)
    if parsed is None:
        raise FastPathError(f"fast address {str(address)[:80]!r} is not IP:PORT")
    ip = ipaddress.ip_address(parsed[0])
    if ip.is_unspecified or ip.is_multicast:
        raise FastPathError(f"fast address {parsed[0]} cannot be dialed")
    return parsed


def parse_request(data: bytes) -> dict[str, Any]:
    """A fast-path request from a peer: ``{"sha": str}`` (a chunk of any object, model
    shards included). Raises :class:`FastPathError` only."""
    try:
        req = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=128,
            max_map_len=1,  # {"sha"}
            max_array_len=0,
            max_bin_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types on bad input
        raise FastPathError(f"malformed request: {type(exc).__name__}") from None
    check_depth(req, FastPathError, "request")
    if not isinstance(req, dict):
        raise FastPathError("a request must be a map")
    sha = req.get("sha")
    if not isinstance(sha, str):
        raise FastPathError("a chunk request needs sha (str)")
    return {"sha": sha}


class FastPathError(Error):
    """The fast path could not be set up or a peer broke its protocol."""


class _Conn:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tx_key: bytes,
        rx_key: bytes,
    ) -> None:
        self.reader, self.writer = reader, writer
        self._tx = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._rx = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._tx_key, self._rx_key = tx_key, rx_key
        self._rx_ready = False
        self.last_used = time.monotonic()
        header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._tx, tx_key)
        writer.write(header)

    async def send(self, data: bytes) -> None:
        ct = sodium.crypto_secretstream_xchacha20poly1305_push(self._tx, data)
        self.writer.write(struct.pack(">I", len(ct)) + ct)
        await self.writer.drain()

    async def recv(self) -> bytes:
        if not self._rx_ready:
            header = await self.reader.readexactly(_HBYTES)
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._rx, header, self._rx_key)
            self._rx_ready = True
        (n,) = struct.unpack(">I", await self.reader.readexactly(4))
        if not _ABYTES <= n <= MAX_FRAME + _ABYTES:  # capped before reading
            raise FastPathError(f"frame of {n} bytes")
        ct = await self.reader.readexactly(n)
        try:
            msg, _tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._rx, ct)
        except CryptoError:
            raise FastPathError("frame failed authentication") from None
        return bytes(msg)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _close_unclaimed(probe: asyncio.Future[_Conn]) -> None:
    if not probe.cancelled() and probe.exception() is None:
        probe.result().close()


def _keys(shared: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    base = hashlib.blake2b(shared + transcript, digest_size=32).digest()
    c2s = hashlib.blake2b(base, digest_size=32, person=b"edgemesh-c2s").digest()
    s2c = hashlib.blake2b(base, digest_size=32, person=b"edgemesh-s2c").digest()
    return c2s, s2c


class ChunkHost(Protocol):
    """What the fast path needs from the object service: chunks to serve, the net view."""

    @property
    def node(self) -> PeerContext: ...

    @property
    def net(self) -> NetView: ...

    async def serve_chunk(self, peer: str, sha: str) -> bytes: ...


class FastPath:
    def __init__(self, svc: ChunkHost, limits: FastLimits | None = None) -> None:
        self.svc = svc
        self.limits = limits or FastLimits()
        self._open = 0  # connections being served
        self._handshaking = 0
        self._per_peer: dict[str, int] = {}
        self.refused = 0  # connections closed at once by a cap
        self.node = svc.node
        self.server: asyncio.Server | None = None
        self.address: str | None = None
        self._pool: dict[str, list[_Conn]] = {}
        # peer -> when to try its fast path again; peers whose fast path worked; the first
        # dial to a peer not known reachable, which its other requests wait for
        self._unreachable: dict[str, tuple[float, str]] = {}  # (retry time, its address)
        self._reachable: set[str] = set()
        self._probes: dict[str, asyncio.Future[_Conn]] = {}
        self.served = 0
        self.fetched = 0

    async def start(self, bind: str, announce: str) -> None:
        """Listen on ``bind`` (any port) and tell peers to dial ``announce`` at that port."""
        self.server = await asyncio.start_server(self._serve, bind, 0, limit=1 << 16)
        port = self.server.sockets[0].getsockname()[1]
        self.address = format_endpoint(announce, port)
        self.svc.net.config.extra["fast"] = self.address

    async def stop(self) -> None:
        for conns in self._pool.values():
            for c in conns:
                c.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    # -- server ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        if self._open >= lim.max_connections or self._handshaking >= lim.max_handshaking:
            self.refused += 1
            writer.close()
            return
        self._open += 1
        self._handshaking += 1
        peer = "?"
        counted = False
        try:
            try:
                conn, peer = await asyncio.wait_for(
                    self._accept(reader, writer), lim.handshake_timeout
                )
            finally:
                self._handshaking -= 1
            if self._per_peer.get(peer, 0) >= lim.max_per_peer:
                self.refused += 1
                raise FastPathError(f"more than {lim.max_per_peer} connections from this peer")
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            counted = True
            while True:
                # A peer that sends nothing (or a frame byte by byte) is closed: slowloris.
                req = parse_request(await asyncio.wait_for(conn.recv(), lim.idle_timeout))
                try:
                    data = await self.svc.serve_chunk(peer, req["sha"])
                except EXPECTED as exc:  # StoreError is an Error
                    await conn.send(b"\x01" + str(exc).encode()[:500])
                    continue
                self.served += len(data)
                await conn.send(b"\x00" + data)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except (FastPathError, IdentityError, ValueError) as exc:
            log.info("fast path from %s closed: %s", peer[:12], exc)
        finally:
            self._open -= 1
            if counted:
                left = self._per_peer.get(peer, 1) - 1
                if left > 0:
                    self._per_peer[peer] = left
                else:
                    self._per_peer.pop(peer, None)
            writer.close()

    def stats(self) -> dict[str, int]:
        """Connections served now, of them unauthenticated, and those refused by a cap."""
        return {"open": self._open, "handshaking": self._handshaking, "refused": self.refused}

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[_Conn, str]:
        hello = await reader.readexactly(80)
        c_pk, c_eph, nonce = hello[:32], hello[32:64], hello[64:]
        peer = None
        for link in self.node.peers.links():
            if link.public_key == c_pk:
                peer = link.peer_id
        if peer is None:
            raise FastPathError("fast path is for connected peers only")
        eph = nacl.public.PrivateKey.generate()
        s_eph = bytes(eph.public_key)
        me = self.node.identity
        transcript = _CTX + c_pk + me.public_key + c_eph + s_eph + nonce
        writer.write(s_eph + me.sign(transcript))
        sig_c = await reader.readexactly(64)
        verify(c_pk, transcript + b"client", sig_c)
        shared = sodium.crypto_scalarmult(bytes(eph), c_eph)
        c2s, s2c = _keys(shared, transcript)
        return _Conn(reader, writer, s2c, c2s), peer

    # -- client ----------------------------------------------------------------------------
    async def _dial(self, peer: str) -> _Conn:
        info = self.svc.net.peers.get(peer)
        address = info.fast if info is not None else None
        if not address:
            raise FastPathError("peer offers no fast path")
        host, port = fast_endpoint(address)  # before any lookup or dial
        link = self.node.link(peer)  # the key we expect is the one the link proved
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 16), CONNECT_TIMEOUT
        )
        try:
            me = self.node.identity
            eph = nacl.public.PrivateKey.generate()
            c_eph, nonce = bytes(eph.public_key), os.urandom(16)
            writer.write(me.public_key + c_eph + nonce)
            reply = await asyncio.wait_for(reader.readexactly(96), HANDSHAKE_TIMEOUT)
            s_eph, sig_s = reply[:32], reply[32:]
            transcript = _CTX + me.public_key + link.public_key + c_eph + s_eph + nonce
            verify(link.public_key, transcript, sig_s)
            writer.write(me.sign(transcript + b"client"))
            shared = sodium.crypto_scalarmult(bytes(eph), s_eph)
            c2s, s2c = _keys(shared, transcript)
            return _Conn(reader, writer, c2s, s2c)
        except BaseException:
            writer.close()
            raise

    async def _connect(self, peer: str) -> _Conn:
        """A new connection to ``peer``'s fast path. The first to a peer not known reachable
        is a probe: requests meanwhile wait for it rather than each waiting out its own
        connect timeout, and fail with it."""
        if peer in self._reachable:
            return await self._dial(peer)
        probe = self._probes.get(peer)
        if probe is not None:
            await asyncio.shield(probe)  # raises as the probe did
            return await self._dial(peer)
        probe = self._probes[peer] = asyncio.ensure_future(self._dial(peer))
        probe.add_done_callback(lambda f: self._probes.pop(peer, None))
        try:
            conn = await asyncio.shield(probe)
        except asyncio.CancelledError:  # we gave up: nobody else takes its connection
            probe.add_done_callback(_close_unclaimed)
            raise
        self._reachable.add(peer)
        return conn

    def _usable(self, peer: str) -> bool:
        """Whether to try ``peer``'s fast path: it has one, and it did not fail lately."""
        info = self.svc.net.peers.get(peer)
        if info is None or not info.fast:
            return False
        failed = self._unreachable.get(peer)
        # a new address (the peer restarted, or moved) is tried at once
        if failed is not None and time.monotonic() < failed[0] and failed[1] == info.fast:
            return False
        self._unreachable.pop(peer, None)
        return True

    async def _request(self, peer: str, request: dict[str, Any]) -> bytes | None:
        """One request over the fast path; None when there is none to this peer."""
        if not self._usable(peer):
            return None
        pool = self._pool.setdefault(peer, [])
        stale = time.monotonic() - self.limits.idle_timeout / 2
        while pool and pool[-1].last_used < stale:  # the server may have closed it by now
            pool.pop().close()
        for attempt in range(2):
            pooled = bool(pool)
            try:
                conn = pool.pop() if pool else await self._connect(peer)
            except Exception as exc:  # a bad advertised address included: use the link
                if peer not in self._unreachable:  # once per peer, not once per request
                    log.info("no fast path to %s (%r): using the link", peer[:12], exc)
                address = getattr(self.svc.net.peers.get(peer), "fast", None) or ""
                self._unreachable[peer] = (time.monotonic() + RETRY_UNREACHABLE, address)
                self._reachable.discard(peer)
                return None
            try:
                await conn.send(msgpack.packb(request))
                reply = await asyncio.wait_for(conn.recv(), REQUEST_TIMEOUT)
                conn.last_used = time.monotonic()
                break
            except (OSError, TimeoutError, FastPathError, asyncio.IncompleteReadError) as e:
                conn.close()
                if pooled and attempt == 0 and not isinstance(e, TimeoutError):
                    continue  # a pooled connection the server closed (idle): dial afresh
                raise PeerUnavailable(f"fast path to {peer[:12]} failed: {e}") from None
        if reply[:1] != b"\x00":
            pool.append(conn)
            raise StoreError(reply[1:].decode(errors="replace"))
        if len(pool) < POOL_PER_PEER:
            pool.append(conn)
        else:
            conn.close()
        self.fetched += len(reply) - 1
        return reply[1:]

    async def read_chunk(self, peer: str, sha: str, size: int) -> bytes:
        """A chunk from ``peer``: over the fast path when it has one, else over the link."""
        data = await self._request(peer, {"sha": sha})
        if data is not None:
            return data
        reply = await self.node.call(
            peer, "storage.chunk_read", {"sha": sha}, timeout=REQUEST_TIMEOUT
        )
        return reply.payload

    def forget(self, peer: str) -> None:
        for c in self._pool.pop(peer, []):
            c.close()
        self._unreachable.pop(peer, None)
        self._reachable.discard(peer)

    def as_dict(self) -> dict[str, Any]:
        """Bytes served and fetched over the fast path, and the peers read over their link
        instead for now (their fast path failed)."""
        now = time.monotonic()
        return {
            "address": self.address,
            "served": self.served,
            "fetched": self.fetched,
            "unreachable": sorted(p for p, (t, _) in self._unreachable.items() if t > now),
        }
