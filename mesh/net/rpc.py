"""Request/response RPC over one authenticated, ordered message channel.

A :class:`Link` multiplexes calls with ids over a channel (an aiortc data channel after the
identity handshake). It enforces deadlines (the remaining time travels with the request and
bounds the handler), cancellation (a cancelled caller tells the peer to stop), backpressure
(senders wait while the channel's ``bufferedAmount`` is above a high-water mark), per-peer caps
on in-flight calls in both directions, and liveness (pings measure RTT; a silent peer is
closed).

Message headers (``t`` = type)::

    req    {id, m, d, p}   method, deadline in ms, params; payload = request bytes
    res    {id, r}         result; payload = reply bytes
    err    {id, c, e}      error class name and message
    cancel {id}
    ping   {n} / pong {n}
    bye    {why}
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh.errors import (
    EXPECTED,
    DeadlineExceeded,
    Error,
    PeerUnavailable,
    RemoteError,
    TooManyRequests,
    WireError,
)
from mesh.net.stalls import StallWatch
from mesh.net.wire import Encoder, Limits, Message, Reassembler, SendBudget, brief

__all__ = [
    "Channel",
    "LinkParams",
    "Link",
    "Reply",
    "CallContext",
    "Handler",
    "handlers_of",
    "Service",
]

log = logging.getLogger(__name__)
# Characters of an error reply's code or text that we keep (we send at most 500 of the text).
_MAX_ERROR_TEXT = 500


def _text(value: Any) -> str:
    """An error reply's code or text, from the peer: a string (cut), else shown briefly."""
    return value[:_MAX_ERROR_TEXT] if isinstance(value, str) else brief(value)


class Channel(Protocol):
    """A reliable, ordered message channel (:class:`mesh.net.copies.CopySender`).

    ``send`` queues one message without blocking; ``copy=False`` says it is bulk, never worth
    a second copy. ``bufferedAmount`` is the number of bytes queued but not yet handed to the
    network; ``burst`` the bytes one ``send`` puts on the wire at once (None: no limit).
    """

    def send(self, data: bytes, copy: bool = True) -> None: ...

    @property
    def bufferedAmount(self) -> int: ...  # noqa: N802 - the WebRTC name

    @property
    def burst(self) -> int | None: ...


@dataclass(frozen=True)
class LinkParams:
    call_timeout: float = 30.0
    max_inflight_out: int = 64
    max_inflight_in: int = 64
    high_water: int = 1 << 20
    low_water: int = 256 << 10
    ping_interval: float = 1.0
    dead_after: float = 6.0
    stall_ms: float = 200.0  # a ping this slow (and stall_factor x the fastest) is a stall
    stall_factor: float = 4.0
    stall_quiet: int = 64 << 10  # ... if no more than this moved, or was queued, meanwhile
    rtt_floor_window: float = 120.0  # s: "the fastest" is the fastest ping of this long
    # A path whose fastest quiet ping of ``path_window`` s is this slow (ms) gets frames of
    # the channel's burst, each on the wire at once; one large frame goes out a burst per
    # round trip (libwebrtc: 4 packets, 8, 16 ...). Faster paths ack before it matters.
    long_path_ms: float = 2.0
    path_window: float = 10.0
    # Messages copied (mesh.net.copies) are up to this size: not a prompt's activations, which
    # at 1 % loss the congestion window bounds (copies would double their bytes).
    copy_up_to: int = 16 << 10
    partial_max_age: float = 60.0
    max_serving_bytes: int = 64 << 20  # request payloads held by running handlers
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.low_water >= self.high_water:
            raise ValueError("low_water must be below high_water")
        if self.dead_after <= self.ping_interval:
            raise ValueError("dead_after must exceed ping_interval")
        if self.max_inflight_in < 1 or self.max_inflight_out < 1:
            raise ValueError("in-flight caps must be >= 1")


@dataclass
class Reply:
    result: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


@dataclass(frozen=True)
class CallContext:
    link: Link | None  # None for a call a node makes to its own services
    method: str
    deadline: float  # monotonic time by which the caller stops waiting
    peer_id: str


Handler = Callable[[CallContext, dict[str, Any], bytes], Awaitable["Reply | dict[str, Any] | None"]]


class Service(Protocol):
    """A node service. Its ``rpc_<method>`` coroutines are served as ``<name>.<method>``
    (hivemind's namespaced RPCs), so two services never collide and a call says whom it is
    for; its ``status()`` is its part of the node's ``/v1/info``."""

    name: str

    def status(self) -> dict[str, Any]: ...


def handlers_of(*services: object) -> dict[str, Handler]:
    """RPC handlers discovered from ``rpc_<method>`` methods: ``<name>.<method>`` for a
    service with a ``name`` (every node service), the bare method for an unnamed one (the
    test services of a single link)."""
    table: dict[str, Handler] = {}
    for service in services:
        ns = getattr(service, "name", None)
        prefix = f"{ns}." if isinstance(ns, str) and ns else ""
        for attr in dir(service):
            if attr.startswith("rpc_"):
                name = prefix + attr[4:]
                if name in table:
                    raise ValueError(f"two services serve {name}")
                table[name] = getattr(service, attr)
    return table


class Link:
    """An authenticated connection to one peer, carrying RPC. Create after the handshake."""

    def __init__(
        self,
        channel: Channel,
        peer_id: str,
        public_key: bytes,
        handlers: Mapping[str, Handler],
        params: LinkParams | None = None,
        on_close: Callable[[Link], None] | None = None,
    ) -> None:
        self.channel = channel
        self.peer_id = peer_id
        self.public_key = public_key
        self.params = params or LinkParams()
        self._handlers = handlers
        self._on_close = on_close
        self._encoder = Encoder(self.params.limits)
        self._budget = SendBudget(self.params.limits)
        self._reassembler = Reassembler(self.params.limits)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._out_slots = asyncio.Semaphore(self.params.max_inflight_out)
        self._drained = asyncio.Event()
        self._drained.set()
        # ping id -> (sent at, bytes moved until then, bytes queued then)
        self._pings: dict[int, tuple[float, int, int]] = {}
        self._ping_ids = itertools.count(1)
        self._keepalive: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.rtt_ms: float | None = None
        # Called with (peer id, sample in ms) on every ping RTT sample (network coordinates).
        self.on_rtt: Callable[[str, float], None] | None = None
        p = self.params
        self.stall_watch = StallWatch(p.stall_ms, p.stall_factor, p.rtt_floor_window, p.path_window)
        self.last_rx = time.monotonic()
        self._serving_bytes = 0
        self._congested_since: float | None = None
        self.offerer = False  # set by the transport: whether we sent the offer
        # Set by the transport: the ICE candidate pair in use (types, protocol), None if unknown.
        self.path: Callable[[], dict[str, Any] | None] = lambda: None
        # Set by the transport: (CopySender, Resequencer) of mesh.net.copies, for /v1/peers.
        self.copies: tuple[Any, Any] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened_at = time.time()

    @property
    def rtt_min_ms(self) -> float | None:
        """The fastest ping of the last ``rtt_floor_window`` seconds."""
        return self.stall_watch.floor.value

    @property
    def stalls(self) -> int:
        return self.stall_watch.stalls

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._keepalive is None:
            self._keepalive = asyncio.get_running_loop().create_task(self._keepalive_loop())

    def close(self, reason: str = "closed", *, notify: bool = True) -> None:
        if self.closed.is_set():
            return
        if notify:
            with contextlib.suppress(Exception):
                self._send_now({"t": "bye", "why": reason[:200]})
        self.close_reason = reason
        self.closed.set()
        self._drained.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable(f"link to {self.peer_id[:12]} closed: {reason}"))
        self._pending.clear()
        for task in self._serving.values():
            task.cancel()
        self._serving.clear()
        if self._on_close is not None:
            self._on_close(self)

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    # -- sending ---------------------------------------------------------------------------
    def buffer_low(self) -> None:
        """Called when the channel's buffered amount fell to its low-water threshold."""
        self._drained.set()

    async def _writable(self) -> None:
        while self.channel.bufferedAmount > self.params.high_water and self.is_open:
            self._drained.clear()
            await self._drained.wait()
        if not self.is_open:
            raise PeerUnavailable(f"link to {self.peer_id[:12]} closed: {self.close_reason}")

    @property
    def path_ms(self) -> float | None:
        """The fastest quiet ping of the last ``path_window`` seconds: the path as it is (or,
        after seconds of bulk with no quiet ping, the fastest of ``rtt_floor_window``)."""
        path = self.stall_watch.path.value
        return path if path is not None else self.rtt_min_ms

    @property
    def frame_size(self) -> int | None:
        """The size messages are cut to now: the channel's burst on a long path, else None
        (frames of the wire's cap)."""
        burst, path = self.channel.burst, self.path_ms
        long_path = burst is not None and path is not None and path >= self.params.long_path_ms
        return burst if long_path else None

    def _frames(self, header: dict[str, Any], payload: bytes) -> list[bytes]:
        return self._encoder.encode(header, payload, frame_size=self.frame_size)

    def _send_now(self, header: dict[str, Any], payload: bytes = b"") -> None:
        for frame in self._frames(header, payload):
            self.channel.send(frame)
            self.bytes_sent += len(frame)

    async def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        frames = self._frames(header, payload)
        copy = len(payload) <= self.params.copy_up_to
        if len(frames) == 1:
            await self._send_frames(frames, copy)
            return
        async with self._budget.hold(sum(len(f) for f in frames)):
            await self._send_frames(frames, copy)

    async def _send_frames(self, frames: list[bytes], copy: bool) -> None:
        sent = 0
        try:
            for frame in frames:
                await self._writable()
                self.channel.send(frame, copy)
                self.bytes_sent += len(frame)
                sent += 1
        except BaseException:
            # Cut off mid-message (deadline, cancel): let the receiver free the partial bytes.
            if 0 < sent < len(frames) and self.is_open:
                abort = self._encoder.abort_frame(frames[0])
                if abort is not None:
                    with contextlib.suppress(Exception):
                        self.channel.send(abort)
            raise

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        """Call ``method`` on the peer. Raises DeadlineExceeded, RemoteError, PeerUnavailable."""
        if not self.is_open:
            raise PeerUnavailable(f"link to {self.peer_id[:12]} closed: {self.close_reason}")
        timeout = self.params.call_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                async with self._out_slots:
                    return await self._call(method, params or {}, payload, deadline)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{method} to {self.peer_id[:12]} exceeded {timeout:.3g} s"
            ) from None

    async def notify(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> None:
        """One-way: the peer runs ``method`` and sends nothing back (no reply on the wire).
        Returns once the message is queued; delivery is as reliable as the channel."""
        if not self.is_open:
            raise PeerUnavailable(f"link to {self.peer_id[:12]} closed: {self.close_reason}")
        budget = self.params.call_timeout if timeout is None else timeout
        header = {
            "t": "req",
            "id": next(self._ids),
            "m": method,
            "d": int(budget * 1000),
            "p": params or {},
            "o": 1,
        }
        await self._send(header, payload)

    async def _call(
        self, method: str, params: dict[str, Any], payload: bytes, deadline: float
    ) -> Reply:
        call_id = next(self._ids)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        sent = False
        try:
            await self._send(
                {"t": "req", "id": call_id, "m": method, "d": remaining_ms, "p": params}, payload
            )
            sent = True
            msg = await fut
        except asyncio.CancelledError:
            if sent and self.is_open:
                with contextlib.suppress(Error):
                    self._send_now({"t": "cancel", "id": call_id})
            raise
        finally:
            self._pending.pop(call_id, None)
        if msg.header.get("t") == "err":
            code, text = _text(msg.header.get("c", "Error")), _text(msg.header.get("e", ""))
            if code == "DeadlineExceeded":  # the remote side ran out of our budget first
                raise DeadlineExceeded(f"{method} to {self.peer_id[:12]}: {text}")
            if code == "TooManyRequests":
                raise TooManyRequests(f"{method} to {self.peer_id[:12]}: {text}")
            raise RemoteError(code, text)
        result = msg.header.get("r")
        return Reply(result if isinstance(result, dict) else {}, msg.payload)

    # -- receiving -------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Hand one channel message to the link (synchronous, from the channel callback)."""
        if not self.is_open:
            return
        self.last_rx = time.monotonic()
        self.bytes_received += len(data)
        try:
            msg = self._reassembler.feed(data)
        except WireError as exc:
            log.warning("closing link to %s: %s", self.peer_id[:12], exc)
            self.close(f"protocol error: {exc}")
            return
        if msg is not None:
            self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        h = msg.header
        kind = h.get("t")
        ident = h.get("id", h.get("n"))
        if kind in ("res", "err", "cancel", "ping", "pong") and type(ident) is not int:
            self.close(f"protocol error: {kind} without an integer id")
            return
        if kind in ("res", "err"):
            fut = self._pending.get(ident)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif kind == "req":
            self._serve(msg)
        elif kind == "cancel":
            task = self._serving.get(ident)  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif kind == "ping":
            # A peer that does not read its pongs must not grow our send queue.
            if self.channel.bufferedAmount <= self.params.high_water:
                with contextlib.suppress(Error):
                    self._send_now({"t": "pong", "n": ident, "l": self._lag_ms()})
        elif kind == "pong":
            sent = self._pings.pop(ident, None)  # type: ignore[arg-type]
            if sent is not None:
                at, moved, queued = sent
                sample = (time.monotonic() - at) * 1000
                self.rtt_ms = sample if self.rtt_ms is None else 0.8 * self.rtt_ms + 0.2 * sample
                # Behind a bulk transfer a ping is slow for reasons other than a lost
                # packet: not a stall.
                busy = self.bytes_sent + self.bytes_received - moved + queued
                lag = h.get("l")
                quiet = busy <= self.params.stall_quiet
                self.stall_watch.pong(at, sample, quiet, lag if type(lag) is int else 0)
                if self.on_rtt is not None:
                    self.on_rtt(self.peer_id, sample)
        elif kind == "bye":
            self.close(f"peer said bye: {h.get('why')}", notify=False)
        else:
            log.debug("ignoring message of type %r from %s", kind, self.peer_id[:12])

    def _serve(self, msg: Message) -> None:
        h = msg.header
        call_id, method, budget, params = h.get("id"), h.get("m"), h.get("d"), h.get("p", {})
        if type(call_id) is not int or not isinstance(method, str) or type(budget) is not int:
            self.close("protocol error: malformed request")
            return
        if not isinstance(params, dict) or call_id in self._serving:
            self._reply_error(call_id, "WireError", "malformed or duplicate request")
            return
        if len(self._serving) >= self.params.max_inflight_in:
            self._reply_error(
                call_id,
                "TooManyRequests",
                f"more than {self.params.max_inflight_in} requests in flight",
            )
            return
        if self._serving_bytes + len(msg.payload) > self.params.max_serving_bytes:
            self._reply_error(
                call_id,
                "TooManyRequests",
                f"more than {self.params.max_serving_bytes} request bytes in flight",
            )
            return
        handler = self._handlers.get(method)
        if handler is None:
            self._reply_error(call_id, "NotFound", f"no method {method!r}")
            return
        timeout = min(budget / 1000, self.params.call_timeout * 10)
        ctx = CallContext(self, method, time.monotonic() + timeout, self.peer_id)
        task = asyncio.get_running_loop().create_task(
            self._run_handler(
                ctx, call_id, handler, params, msg.payload, timeout, oneway=h.get("o") == 1
            )
        )
        self._serving[call_id] = task
        self._serving_bytes += len(msg.payload)
        size = len(msg.payload)

        def _done(_: asyncio.Task[None]) -> None:
            self._serving_bytes -= size

        task.add_done_callback(_done)

    async def _run_handler(
        self,
        ctx: CallContext,
        call_id: int,
        handler: Handler,
        params: dict[str, Any],
        payload: bytes,
        timeout: float,
        oneway: bool = False,
    ) -> None:
        try:
            # The reply is sent under the deadline too: a peer that stops reading must not
            # make us hold its request and our reply forever.
            async with asyncio.timeout(timeout):
                out = await handler(ctx, params, payload)
                if oneway:
                    return
                reply = out if isinstance(out, Reply) else Reply(out or {})
                await self._send({"t": "res", "id": call_id, "r": reply.result}, reply.payload)
        except asyncio.CancelledError:
            pass  # the caller cancelled or the link closed: nobody waits for an answer
        except TimeoutError:
            self._fail(call_id, oneway, "DeadlineExceeded", f"{ctx.method} ran past its deadline")
        except RemoteError as exc:  # relayed from a further hop: keep its code
            self._fail(call_id, oneway, exc.code, exc.message)
        except EXPECTED as exc:
            self._fail(call_id, oneway, type(exc).__name__, str(exc))
        except Exception as exc:  # a handler bug must not kill the link
            log.exception("handler %s failed", ctx.method)
            self._fail(call_id, oneway, "InternalError", f"{type(exc).__name__}: {exc}")
        finally:
            self._serving.pop(call_id, None)

    def _fail(self, call_id: Any, oneway: bool, code: str, text: str) -> None:
        if oneway:  # nobody waits for an answer: the handler reports failures its own way
            log.info("one-way call from %s failed: %s: %s", self.peer_id[:12], code, text)
        else:
            self._reply_error(call_id, code, text)

    def _reply_error(self, call_id: Any, code: str, text: str) -> None:
        if self.channel.bufferedAmount > self.params.high_water:
            return  # the peer is not reading; its caller will hit its own deadline
        with contextlib.suppress(Error):
            self._send_now({"t": "err", "id": call_id, "c": code, "e": text[:500]})

    @property
    def inflight_in(self) -> int:
        return len(self._serving)

    # -- liveness --------------------------------------------------------------------------
    async def _keepalive_loop(self) -> None:
        p = self.params
        while self.is_open:
            now = time.monotonic()
            if now - self.last_rx > p.dead_after:
                self.close(f"peer silent for {now - self.last_rx:.1f} s")
                return
            if self.channel.bufferedAmount > p.high_water:
                self._congested_since = self._congested_since or now
                if now - self._congested_since > p.dead_after:
                    self.close(f"peer has not read for {now - self._congested_since:.1f} s")
                    return
            else:
                self._congested_since = None
            self._reassembler.purge(p.partial_max_age)
            n = next(self._ping_ids)
            self._pings = {k: v for k, v in self._pings.items() if now - v[0] < p.dead_after}
            moved = self.bytes_sent + self.bytes_received
            self._pings[n] = (now, moved, self.channel.bufferedAmount)
            with contextlib.suppress(Error):
                self._send_now({"t": "ping", "n": n})
            await asyncio.sleep(p.ping_interval)  # a period, not synchronization
            woke = time.monotonic()
            self.stall_watch.woke(woke, woke - now - p.ping_interval)

    def _lag_ms(self) -> int:
        return self.stall_watch.recent_lag_ms(time.monotonic())

    def __repr__(self) -> str:
        state = "open" if self.is_open else f"closed ({self.close_reason})"
        return f"Link({self.peer_id[:12]}, {state})"
