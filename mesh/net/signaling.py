"""Signed signaling envelopes and direct (LAN) signaling over HTTP.

Every signaling message is ``{v, kind, from, pk, to, nonce, time, body}`` plus an Ed25519
signature over the canonical msgpack of those fields in that order. A receiver checks that the
sender's id is the hash of the enclosed key, the signature, that it is the addressee, that the
time is within a window, and that the nonce is new (:class:`ReplayGuard`). Nothing a relay (an
HTTP proxy, an MQTT broker) can do without the sender's key survives these checks; and even a
relay that signs with its own key cannot pass the transport's identity handshake, which binds
the DTLS fingerprints.

Direct signaling: each node serves ``POST /edgemesh/offer`` (an offer envelope in, the answer
envelope out) and ``GET /edgemesh/info`` (a signed self-description) on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from mesh.errors import SignalingError
from mesh.net.identity import Identity
from mesh.net.signed import Field, Format, check_fresh

__all__ = [
    "Envelope",
    "ReplayGuard",
    "seal",
    "open_envelope",
    "accept_envelope",
    "parse_envelope",
    "SignalingServer",
    "fetch_info",
    "send_offer",
    "offer_by_every_route",
    "MAX_ENVELOPE",
    "parse_endpoint",
    "format_endpoint",
]

log = logging.getLogger(__name__)
MAX_ENVELOPE = 64 * 1024
MAX_SKEW = 60.0
# A connection must finish a request within this long, and idle ones close after it: aiohttp
# arms its keep-alive timer at connect, so it doubles as a header deadline (slowloris).
HTTP_IDLE_DEADLINE = 10.0
ENVELOPE = Format(
    what="signaling message",
    context=b"edgemesh/signal/v1\x00",
    fields=(
        Field("v", int, choices=(1,)),
        Field("kind", str),
        Field("from", str),
        Field("pk", bytes),
        Field("to", str),
        Field("nonce", bytes, size=16),
        Field("time", float),
        Field("body", dict),
    ),
    error=SignalingError,
    max_size=MAX_ENVELOPE,
)


def parse_endpoint(text: Any) -> tuple[str, int] | None:
    """``"IP:PORT"`` or ``"[IPv6]:PORT"`` from the network, or None if it is anything else
    (a host name, a path, a bad port): a peer must not choose what URL we request."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    host, sep, port = text.rpartition(":")
    # isascii: str.isdigit() also takes digits int() refuses ("²")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return None
    return str(ip), int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def clean_endpoints(items: Any, limit: int = 8) -> list[str]:
    """Valid, de-duplicated endpoints from an untrusted list."""
    if not isinstance(items, list):
        return []
    out: list[str] = []
    for item in items[: limit * 2]:
        parsed = parse_endpoint(item)
        if parsed is not None:
            text = format_endpoint(*parsed)
            if text not in out:
                out.append(text)
    return out[:limit]


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender: str
    public_key: bytes
    to: str
    nonce: bytes
    time: float
    body: dict[str, Any]


def seal(
    identity: Identity, kind: str, to: str, body: dict[str, Any], now: float | None = None
) -> bytes:
    """Sign and encode one signaling message."""
    now = time.time() if now is None else now
    values = [1, kind, identity.peer_id, identity.public_key, to, os.urandom(16), now, body]
    return ENVELOPE.make(identity, values)


def parse_envelope(data: bytes) -> Envelope:
    """Decode and verify the signature (pure). Raises SignalingError."""
    f = ENVELOPE.parse(data).fields
    return Envelope(f["kind"], f["from"], f["pk"], f["to"], f["nonce"], float(f["time"]), f["body"])


class ReplayGuard:
    """Remembers recent nonces per sender (bounded) and rejects stale or repeated messages.

    Nonces live in one bucket per sender, at most ``per_sender`` each and ``capacity`` in all.
    A sender that fills its own bucket is refused (only it). When all buckets together are
    full, the least recently active sender loses its oldest nonce: identities are free, so
    refusing everyone would let one flooder block every new connection. An evicted nonce could
    be replayed within its window, but only by whoever captured it, and a replayed offer still
    fails the transport handshake, which needs the sender's key.
    """

    def __init__(
        self, window: float = MAX_SKEW, capacity: int = 4096, per_sender: int = 128
    ) -> None:
        self.window = window
        self.capacity = capacity
        self.per_sender = min(per_sender, capacity)
        self.evicted = 0
        self._buckets: OrderedDict[str, OrderedDict[bytes, float]] = OrderedDict()
        self._count = 0

    def check(self, env: Envelope, now: float | None = None) -> None:
        now = time.time() if now is None else now
        check_fresh(
            env.time,
            now,
            max_age=self.window,
            max_ahead=self.window,
            error=SignalingError,
            what="signaling message",
        )
        # A message stays acceptable until its time is a window old, and its time may be up to
        # a window ahead of its arrival: nonces are kept two windows after arrival.
        cutoff = now - 2 * self.window
        self._expire(cutoff)
        bucket = self._buckets.get(env.sender)
        if bucket is None:
            bucket = self._buckets[env.sender] = OrderedDict()
        self._buckets.move_to_end(env.sender)
        if env.nonce in bucket:
            raise SignalingError("replayed signaling message")
        while bucket and next(iter(bucket.values())) < cutoff:
            bucket.popitem(last=False)
            self._count -= 1
        if len(bucket) >= self.per_sender:
            # Fail closed for this sender only: evicting its live nonce would let it replay.
            raise SignalingError("too many signaling messages from this sender")
        while self._count >= self.capacity:
            self._evict_oldest()
        bucket[env.nonce] = now
        self._count += 1

    def _expire(self, cutoff: float) -> None:
        # Buckets are in order of their last message: stop at the first one still live.
        while self._buckets:
            sender, bucket = next(iter(self._buckets.items()))
            if bucket and next(reversed(bucket.values())) >= cutoff:
                return
            self._count -= len(bucket)
            del self._buckets[sender]

    def _evict_oldest(self) -> None:
        sender, bucket = next(iter(self._buckets.items()))
        if bucket:
            bucket.popitem(last=False)
            self._count -= 1
            self.evicted += 1
        if not bucket:
            del self._buckets[sender]

    def __len__(self) -> int:
        return self._count


def open_envelope(
    data: bytes, *, me: str, kind: str, guard: ReplayGuard, now: float | None = None
) -> Envelope:
    """Parse, verify, check addressee, kind, freshness and replay."""
    return accept_envelope(parse_envelope(data), me=me, kind=kind, guard=guard, now=now)


def accept_envelope(
    env: Envelope, *, me: str, kind: str, guard: ReplayGuard, now: float | None = None
) -> Envelope:
    """Check a parsed envelope's addressee, kind, freshness and replay."""
    if env.to != me:
        raise SignalingError(f"message addressed to {env.to[:12]}, not to us")
    if env.kind != kind:
        raise SignalingError(f"expected a {kind}, got {env.kind!r}")
    guard.check(env, now)
    return env


# The handler gets the offer and the address it came from (which bounds its handshake slots).
OfferHandler = Callable[[Envelope, str | None], Awaitable[bytes]]


class SignalingServer:
    """HTTP endpoint for direct signaling. ``on_offer`` returns the sealed answer."""

    def __init__(
        self,
        identity: Identity,
        on_offer: OfferHandler,
        info: Callable[[], dict[str, Any]],
        guard: ReplayGuard | None = None,
        routes: list[web.RouteDef] | None = None,
    ) -> None:
        self.identity = identity
        self.on_offer = on_offer
        self.info = info
        self.guard = guard or ReplayGuard()
        # More endpoints on the same port, e.g. the mesh owner's POST /edgemesh/join.
        self.routes = list(routes or [])
        self.rejected = 0
        self._runner: web.AppRunner | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int = 0) -> None:
        app = web.Application(client_max_size=MAX_ENVELOPE)
        app.router.add_post("/edgemesh/offer", self._offer)
        app.router.add_get("/edgemesh/info", self._info)
        app.add_routes(self.routes)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=HTTP_IDLE_DEADLINE
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.host, self.port = host, sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _info(self, request: web.Request) -> web.Response:
        to = request.query.get("to", "")
        return web.Response(
            body=seal(self.identity, "info", to, self.info()), content_type="application/msgpack"
        )

    async def _offer(self, request: web.Request) -> web.Response:
        try:
            data = await request.read()
            env = open_envelope(data, me=self.identity.peer_id, kind="offer", guard=self.guard)
            answer = await self.on_offer(env, request.remote)
        except SignalingError as exc:
            self.rejected += 1
            log.warning("refused offer from %s: %s", request.remote, exc)
            return web.Response(status=403, text=str(exc))
        except web.HTTPRequestEntityTooLarge:
            self.rejected += 1
            return web.Response(status=413, text="signaling message too large")
        return web.Response(body=answer, content_type="application/msgpack")


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    if (resp.content_length or 0) > MAX_ENVELOPE:
        raise SignalingError("signaling reply too large")
    data = bytearray()
    while chunk := await resp.content.read(MAX_ENVELOPE + 1 - len(data)):
        data += chunk
        if len(data) > MAX_ENVELOPE:
            raise SignalingError("signaling reply too large")
    return bytes(data)


async def fetch_info(session: aiohttp.ClientSession, address: str, me: str) -> Envelope:
    """Ask a node at ``host:port`` who it is (a hint; the handshake proves it)."""
    try:
        async with session.get(f"http://{address}/edgemesh/info", params={"to": me}) as resp:
            if resp.status != 200:
                raise SignalingError(f"{address} answered {resp.status}")
            env = parse_envelope(await _read_capped(resp))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SignalingError(f"cannot reach {address}: {exc}") from None
    if env.kind != "info" or env.to != me:
        raise SignalingError(f"{address} sent a {env.kind} for {env.to[:12]}")
    return env


async def send_offer(session: aiohttp.ClientSession, address: str, offer: bytes) -> bytes:
    """POST a sealed offer; return the raw sealed answer (verify it with open_envelope)."""
    try:
        async with session.post(
            f"http://{address}/edgemesh/offer",
            data=offer,
            headers={"Content-Type": "application/msgpack"},
        ) as resp:
            if resp.status != 200:
                text = (await resp.content.read(500)).decode("utf-8", "replace")
                raise SignalingError(f"{address} refused the offer ({resp.status}): {text}")
            return await _read_capped(resp)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SignalingError(f"cannot reach {address}: {exc}") from None


async def offer_by_every_route(
    http: aiohttp.ClientSession,
    identity: Identity,
    pid: str,
    addresses: list[str],
    mqtt: Callable[[str, bytes, bytes], Awaitable[bytes]] | None,
    body: dict[str, Any],
    oid: bytes,
) -> bytes:
    """Deliver an offer to ``pid`` by every route at once (each direct address, the broker
    when ``mqtt`` is given): the first answer wins, the other attempts are cancelled.

    One after another, a NATed peer's direct address (private, unreachable from here,
    its packets dropped silently) held every dial for the full HTTP timeout before the
    broker was tried: ~10 s to link two homes (issue 15). Each route carries its own
    sealed copy (its own nonce, so no copy is a replay of another); the peer answers
    every copy of one offer (same ``oid``) with the same answer, once."""
    routes: list[Awaitable[bytes]] = [
        send_offer(http, address, seal(identity, "offer", pid, body)) for address in addresses
    ]
    if mqtt is not None:
        routes.append(mqtt(pid, seal(identity, "offer", pid, body), oid))
    if not routes:
        raise SignalingError("no route to the peer")
    tasks = [asyncio.ensure_future(route) for route in routes]
    errors = []
    try:
        for attempt in asyncio.as_completed(tasks):
            try:
                return await attempt
            except SignalingError as exc:
                errors.append(str(exc))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    raise SignalingError("; ".join(errors))
