"""MQTT rendezvous signaling (aiomqtt): presence and offer/answer exchange through a broker.

Topics under ``edgemesh/v1/<mesh>/``:

* ``presence/<peer_id>``: retained, a signed ``presence`` envelope (signaling endpoints, name),
  re-published every ``presence_interval``, carrying a random id of this broker session; the
  last will (and the goodbye) is a signed ``absent`` envelope naming that session id. An
  absence counts only when its signer is the topic's peer and its session is the one of the
  presence we last accepted: an empty payload or an old session's will marks nobody absent.
* ``inbox/<peer_id>``: signed ``offer`` / ``answer`` envelopes addressed to that peer.

The broker is never trusted: every envelope is verified (and offers are checked for
freshness and replay by the node); a forged or altered offer fails the signature or, signed
by another key, the transport handshake. An answer is taken only when signed by the peer its
offer went to: anyone else's, first or not, is refused and the offer waits on. With a mesh
key every payload is sealed (XSalsa20-Poly1305), so the broker learns nothing but topic names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import aiomqtt
import nacl.exceptions
import nacl.secret
import nacl.utils
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mesh.errors import Error, SignalingError
from mesh.net.identity import Identity
from mesh.net.signaling import (
    MAX_ENVELOPE,
    MAX_SKEW,
    Envelope,
    ReplayGuard,
    accept_envelope,
    parse_envelope,
    seal,
)
from mesh.net.signed import check_fresh

__all__ = ["MqttConfig", "MqttSignaling", "load_mesh_key", "parse_mqtt_url"]

log = logging.getLogger(__name__)
_MAX_PAYLOAD = MAX_ENVELOPE + 64  # sealing adds 40 bytes
_MAX_WAITING = 64  # offers of ours awaiting an answer
_MAX_SESSIONS = 4096  # peers whose presence session we remember (for their absence)
# Ids a message names: an offer's (os.urandom(16) in ConnectionManager._dial; the answerer
# takes up to 32) and a broker session's (8 bytes, new_session). Anything else is refused
# before it is hashed, compared or kept.
_MAX_ID = 32


class _ConnectionLost(logging.Filter):
    """paho logs a broker going away (its socket's error or timeout) at ERROR; that is an
    expected event, which the reconnect loop reports itself as a warning: demoted to INFO.
    Every other paho error (an exception in a callback of ours) stays an error."""

    LOST = ("failed to receive on socket", "timeout on socket")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(self.LOST):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def quiet_closed_sockets(loop: asyncio.AbstractEventLoop) -> None:
    """aiomqtt asks the loop, from paho's thread, to watch the socket (``call_soon_threadsafe
    (loop.add_writer, fd, ...)``); when the broker goes away in between, the socket is closed
    by then and the loop logs the failed callback at ERROR (uvloop: "the handler is closed").
    That is a broker going away, which the reconnect loop reports: demoted to INFO. Every
    other callback error reaches the handler the loop had."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_closed_sockets", False):
        return  # installed already (a loop with several brokers' signaling)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        callback = f"{context.get('message', '')} {context.get('handle', '')!r}"
        lost = isinstance(context.get("exception"), RuntimeError | OSError | ValueError)
        if lost and ("add_writer" in callback or "add_reader" in callback):
            log.info("broker socket closed before it was watched: %s", context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiets_closed_sockets = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


def _paho_logger() -> logging.Logger:
    """The logger paho (through aiomqtt) writes to, with its connection losses demoted."""
    paho = logging.getLogger(f"{__name__}.paho")
    if not any(isinstance(f, _ConnectionLost) for f in paho.filters):
        paho.addFilter(_ConnectionLost())
    return paho


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must be mqtt://HOST[:PORT] or mqtts://..., got {url!r}")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def load_mesh_key(path: Path) -> bytes:
    """A private mesh key: 32 raw bytes or 64 hex characters in a file."""
    data = Path(path).read_bytes().strip()
    if len(data) == 64:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(data.decode())
    if len(data) != 32:
        raise ValueError(f"{path}: a mesh key is 32 bytes (or 64 hex characters)")
    return data


@dataclass(frozen=True)
class MqttConfig:
    url: str
    mesh: str = "default"
    mesh_key: bytes | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    keepalive: int = 10
    presence_interval: float = 30.0
    presence_max_age: float = 300.0
    answer_timeout: float = 10.0

    def __post_init__(self) -> None:
        parse_mqtt_url(self.url)
        if not self.mesh or any(c in self.mesh for c in "/+#") or len(self.mesh) > 64:
            raise ValueError("mesh name: 1-64 characters, without / + #")
        if self.mesh_key is not None and len(self.mesh_key) != 32:
            raise ValueError("mesh key must be 32 bytes")


PresenceHandler = Callable[[str, dict[str, Any]], None]


class MqttSignaling:
    def __init__(
        self,
        identity: Identity,
        config: MqttConfig,
        *,
        on_offer: Callable[[Envelope], Awaitable[bytes]],
        on_presence: PresenceHandler,
        on_absence: Callable[[str], None],
        presence_body: Callable[[], dict[str, Any]],
        guard: ReplayGuard,
    ) -> None:
        self.identity = identity
        self.config = config
        self.on_offer = on_offer
        self.on_presence = on_presence
        self.on_absence = on_absence
        self.presence_body = presence_body
        self.guard = guard
        self.prefix = f"edgemesh/v1/{config.mesh}"
        self._box = nacl.secret.SecretBox(config.mesh_key) if config.mesh_key else None
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # offers of ours awaiting an answer: oid -> (the peer it went to, its answer)
        self._waiting: dict[bytes, tuple[str, asyncio.Future[bytes]]] = {}
        # offers awaiting answers, (to, sealed offer): published again on a new connection
        # (one published as the old one broke, in a network outage, was lost with it)
        self._outbox: dict[bytes, tuple[str, bytes]] = {}
        # offers of ours no longer waiting (answered by another route, or given up), oid ->
        # the peer it went to: that peer's late answers are dropped quietly (insertion-
        # ordered, bounded)
        self._finished: dict[bytes, str] = {}
        # answers our broken connection did not send, (to, answer, until): published on the
        # next one while the dialer still waits (its offer, republished, is a replay to us)
        self._unsent: list[tuple[str, bytes, float]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.rejected = 0
        self._session = os.urandom(8)  # ours, renewed per broker connection
        self._sessions: dict[str, bytes] = {}  # peer -> session of its last accepted presence

    @property
    def presence_topic(self) -> str:
        return f"{self.prefix}/presence/{self.identity.peer_id}"

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, wait: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        quiet_closed_sockets(loop)
        self._task = loop.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), wait)
        except TimeoutError:
            log.warning("broker %s not reachable yet; retrying in the background", self.config.url)

    async def stop(self) -> None:
        client = self._client
        if client is not None and self._connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    client.publish(self.presence_topic, self.absence_payload(), qos=1, retain=True),
                    2,
                )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._handlers):
            task.cancel()

    def _client_args(self) -> dict[str, Any]:
        host, port, tls = parse_mqtt_url(self.config.url)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = _MAX_PAYLOAD + 1024  # the broker drops larger packets for us
        args: dict[str, Any] = dict(
            hostname=host,
            port=port,
            identifier=f"em-{self.identity.peer_id}",
            username=self.config.username,
            password=self.config.password,
            keepalive=self.config.keepalive,
            protocol=aiomqtt.ProtocolVersion.V5,
            properties=props,
            will=aiomqtt.Will(self.presence_topic, self.absence_payload(), qos=1, retain=True),
            logger=_paho_logger(),
        )
        if tls:
            args["tls_params"] = aiomqtt.TLSParameters(ca_certs=self.config.ca_file)
        return args

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                self.new_session()
                async with aiomqtt.Client(**self._client_args()) as client:
                    self._client = client
                    await client.subscribe(f"{self.prefix}/presence/+", qos=1)
                    await client.subscribe(f"{self.prefix}/inbox/{self.identity.peer_id}", qos=1)
                    await self._publish_presence()
                    self._on_connected()
                    self._connected.set()
                    delay = 0.5
                    log.info("joined mesh %r on broker %s", self.config.mesh, self.config.url)
                    refresher = asyncio.get_running_loop().create_task(self._refresh())
                    try:
                        async for message in client.messages:
                            self._handle(message)
                    finally:
                        refresher.cancel()
            except aiomqtt.MqttError as exc:
                log.warning("broker %s: %s (reconnecting in %.1f s)", self.config.url, exc, delay)
            except Exception:
                # A bug: without this the task ended and the node lost the broker for good
                # (presence, offers, answers); it reconnects like after a broker error.
                log.exception("broker %s: unexpected error (reconnecting)", self.config.url)
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 30.0)

    def _on_connected(self) -> None:
        """A new broker connection: what the last one may have lost goes out again, our
        offers still awaiting answers and our answers still awaited."""
        self._republish(list(self._outbox.values()))
        now, unsent, self._unsent = time.time(), self._unsent, []
        self._republish([(to, answer) for to, answer, until in unsent if until > now])

    def _republish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish (to, message) pairs again, each on its own task: not awaited, see
        ``exchange``."""
        for to, data in messages:
            task = asyncio.get_running_loop().create_task(self._publish_soon(to, data))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.presence_interval)  # re-announce period
            await self._publish_presence()

    async def _publish_presence(self) -> None:
        if self._client is None:
            return
        await self._client.publish(self.presence_topic, self.presence_payload(), qos=1, retain=True)

    def new_session(self) -> None:
        """A new broker connection: a new session id, so its will cannot be replayed later."""
        self._session = os.urandom(8)

    def presence_payload(self) -> bytes:
        body = dict(self.presence_body(), s=self._session)
        return self._seal(seal(self.identity, "presence", "*", body))

    def absence_payload(self) -> bytes:
        """Our signed (and, with a mesh key, sealed) absence: the will and the goodbye."""
        return self._seal(seal(self.identity, "absent", "*", {"s": self._session}))

    # -- sealing ---------------------------------------------------------------------------
    def _seal(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data)) if self._box is not None else data

    def _unseal(self, data: bytes) -> bytes:
        if len(data) > _MAX_PAYLOAD:
            raise SignalingError(f"MQTT payload of {len(data)} bytes exceeds {_MAX_PAYLOAD}")
        if self._box is None:
            return data
        try:
            return bytes(self._box.decrypt(data))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise SignalingError("payload not sealed with this mesh's key") from None

    # -- receiving -------------------------------------------------------------------------
    def _handle(self, message: aiomqtt.Message) -> None:
        """One message from the broker. Whatever it holds, it is refused or dropped alone:
        one message that raised here used to end the connection's loop for good."""
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        sender = "?"  # the signer, once known (a presence names its peer in the topic)
        try:
            if topic.startswith(f"{self.prefix}/presence/"):
                sender = topic.rsplit("/", 1)[-1]
                self._handle_presence(sender, payload)
            elif topic == f"{self.prefix}/inbox/{self.identity.peer_id}":
                raw = self._unseal(payload)
                env = parse_envelope(raw)
                sender = env.sender
                self._on_inbox(raw, env)
        except Error as exc:
            self.rejected += 1
            log.warning("refused MQTT message on %s from %s: %s", topic, sender[:12], exc)
        except Exception as exc:
            # A bug, or an input no check foresaw: that message is dropped, not the broker
            # connection; the traceback stays in the log for whoever fixes it.
            self.rejected += 1
            log.warning(
                "dropped MQTT message on %s from %s: unexpected %s",
                topic,
                sender[:12],
                type(exc).__name__,
                exc_info=True,
            )

    def _handle_presence(self, peer_id: str, payload: bytes) -> None:
        if peer_id == self.identity.peer_id:
            return
        if not payload:
            return  # a cleared topic is not a signed absence: anyone may publish it
        env = parse_envelope(self._unseal(payload))
        if env.kind not in ("presence", "absent") or env.sender != peer_id:
            raise SignalingError(f"presence for {peer_id[:12]} signed by {env.sender[:12]}")
        if env.kind == "absent":
            self._handle_absence(peer_id, env)
            return
        check_fresh(
            env.time,
            time.time(),
            max_age=self.config.presence_max_age,
            max_ahead=MAX_SKEW,
            error=SignalingError,
            what=f"presence of {peer_id[:12]}",
        )
        session = env.body.get("s")
        if session is not None and not _is_id(session):
            raise SignalingError(f"presence of {peer_id[:12]} has a malformed session id")
        if session is not None:
            before = self._sessions.pop(peer_id, None)
            self._sessions[peer_id] = session
            if before is not None and before != session:
                # It reconnected to the broker: an offer we published while it was away was
                # lost with its old session (the broker keeps none for it).
                self._republish([(to, o) for to, o in self._outbox.values() if to == peer_id])
            while len(self._sessions) > _MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
        self.on_presence(peer_id, env.body)

    def _handle_absence(self, peer_id: str, env: Envelope) -> None:
        # A will is signed when its connection opens, so it is not checked for freshness; the
        # session id ties it to that connection: an old will replayed later does not match.
        if peer_id not in self._sessions:
            return  # a retained absence of a peer we never saw present: nothing to do
        if env.body.get("s") != self._sessions[peer_id]:
            raise SignalingError(f"absence of {peer_id[:12]} is for another session")
        del self._sessions[peer_id]
        self.on_absence(peer_id)

    def _handle_inbox(self, payload: bytes) -> None:
        raw = self._unseal(payload)
        self._on_inbox(raw, parse_envelope(raw))

    def _on_inbox(self, raw: bytes, env: Envelope) -> None:
        if env.to != self.identity.peer_id:
            raise SignalingError("inbox message addressed to another peer")
        if env.kind == "offer":
            # freshness and replay: the same checks as the direct endpoint
            accept_envelope(env, me=self.identity.peer_id, kind="offer", guard=self.guard)
        if env.kind == "answer":
            self._on_answer(raw, env)
        elif env.kind == "offer":
            if len(self._handlers) >= _MAX_WAITING:
                raise SignalingError("too many offers in progress")
            task = asyncio.get_running_loop().create_task(self._answer(raw, env))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        else:
            raise SignalingError(f"unexpected {env.kind!r} in inbox")

    def _on_answer(self, raw: bytes, env: Envelope) -> None:
        """Resolve the offer an answer names, if its peer signed it. Freshness and replay
        are the dialer's checks, once it has the answer."""
        re = env.body.get("re")
        if not _is_id(re):
            raise SignalingError("answer names no offer id")
        waiting = self._waiting.get(re)
        if waiting is not None and not waiting[1].done():
            to, fut = waiting
            if env.sender != to:
                # Anyone on the broker may answer (without a mesh key anyone reads the offer
                # and its id): the first answer used to win, and the peer's, later, was
                # dropped as late, failing the dial. Refused; the offer waits for its peer.
                raise SignalingError(f"answer to our offer to {to[:12]} signed by another key")
            fut.set_result(raw)
            return
        # answered already, or given up
        peer = waiting[0] if waiting is not None else self._finished.get(re)
        if peer == env.sender:
            # our offer went by another route too, and that answer came first
            log.debug("late answer from %s via the broker", env.sender[:12])
            return
        raise SignalingError("answer to no offer of ours")

    async def _answer(self, raw: bytes, env: Envelope) -> None:
        try:
            answer = await self.on_offer(env)
        except SignalingError as exc:
            self.rejected += 1
            log.warning("refused MQTT offer from %s: %s", env.sender[:12], exc)
            return
        try:
            await self._publish(env.sender, answer)
        except SignalingError as exc:  # e.g. the broker dropped us (a network outage)
            log.warning("answer to %s not sent yet: %s", env.sender[:12], exc)
            until = env.time + self.config.answer_timeout  # when the dialer stops waiting
            self._unsent = [*self._unsent, (env.sender, answer, until)][-_MAX_WAITING:]

    async def _publish(self, to: str, data: bytes) -> None:
        client = self._client
        if client is None:
            raise SignalingError("not connected to the broker")
        try:
            await client.publish(f"{self.prefix}/inbox/{to}", self._seal(data), qos=1)
        except aiomqtt.MqttError as exc:
            raise SignalingError(f"broker: {exc}") from None

    async def _publish_soon(self, to: str, data: bytes) -> None:
        try:
            await self._publish(to, data)
        except SignalingError as exc:  # an offer: the next connection publishes it, in time
            log.info("message to %s waits for the broker: %s", to[:12], exc)

    # -- sending ---------------------------------------------------------------------------
    async def exchange(self, to: str, offer: bytes, oid: bytes) -> bytes:
        """Send a sealed offer to ``to``'s inbox; return the raw answer envelope."""
        if len(self._waiting) >= _MAX_WAITING:
            raise SignalingError("too many offers awaiting answers")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[oid] = (to, fut)  # only `to` may answer it
        self._outbox[oid] = (to, offer)
        # Not awaited before the answer: a publish on a connection broken by an outage
        # hangs for aiomqtt's 10 s timeout, while the next connection republishes the offer
        # (and the answer to that copy arrives).
        publish = asyncio.ensure_future(self._publish_soon(to, offer))
        try:
            return await asyncio.wait_for(fut, self.config.answer_timeout)
        except TimeoutError:
            raise SignalingError(f"no answer from {to[:12]} via the broker") from None
        finally:
            publish.cancel()
            self._waiting.pop(oid, None)
            self._outbox.pop(oid, None)
            self._finished[oid] = to
            while len(self._finished) > _MAX_WAITING:
                self._finished.pop(next(iter(self._finished)))


def _is_id(value: object) -> TypeGuard[bytes]:
    """An offer or session id as we make them: bytes, at most ``_MAX_ID`` long."""
    return isinstance(value, bytes) and 0 < len(value) <= _MAX_ID
