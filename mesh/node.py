"""The running peer: identity, signaling endpoint, discovery, links, peer table, HTTP API.

Who dials: any side may. When both dial at once, the offer from the lower peer id wins (the
other side refuses it and abandons its own). For mDNS hints the higher id waits ``dial_grace``
before dialing, so two LAN peers rarely collide. A link that drops is redialled with
exponential backoff while the peer is still announced or was configured with ``--peer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import ifaddr

from .dht import MeshDHT, Record, RecordStore
from .discovery import Announcement, MdnsDiscovery
from .errors import Error, HandshakeError, PeerUnavailable, SignalingError
from .identity import Identity
from .membership import DhtMembership, record_addresses
from .mqtt import MqttConfig, MqttSignaling
from .peers import PeerEntry, PeerTable
from .rpc import CallContext, Handler, Link, Reply, handlers_of
from .signaling import (
    Envelope,
    ReplayGuard,
    SignalingServer,
    fetch_info,
    open_envelope,
    seal,
    send_offer,
)
from .transport import (
    PendingConnection,
    TransportConfig,
    accept_offer,
    complete_offer,
    open_offer,
    use_candidate_addresses,
    wait_closed,
)

__all__ = ["NodeConfig", "Node", "CoreService", "local_addresses"]

log = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    data_dir: Path
    name: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 0
    signaling_host: str | None = None  # None: 127.0.0.1 for a loopback mesh, else 0.0.0.0
    signaling_port: int = 0
    mdns: bool = True
    mdns_interfaces: list[str] | None = None  # None: all interfaces
    static_peers: list[str] = field(default_factory=list)  # "host:port" signaling endpoints
    ice_addresses: list[str] | None = None  # None: loopback for a loopback mesh, else default
    ready_file: Path | None = None
    transport: TransportConfig = field(default_factory=TransportConfig)
    mesh: str = "default"  # mesh name on the broker and in the DHT
    mqtt: MqttConfig | None = None
    dht_port: int | None = None  # None: no DHT (unless bootstrap addresses are given)
    dht_host: str | None = None  # None: like the signaling host
    bootstrap: list[tuple[str, int]] = field(default_factory=list)
    dht_quota: int = 256  # stores per minute one sender may make before it is cut off
    # Timing: tests shrink these.
    tick: float = 0.25
    dial_grace: float = 1.5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    peer_expiry: float = 10.0
    give_up_after: int = 8  # failed dials before an unannounced, non-static peer is forgotten
    max_pending_inbound: int = 16  # handshakes in progress (slowloris bound)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.name:
            self.name = os.uname().nodename


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (for the mDNS announcement)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append(ip.ip)
    return out or ["127.0.0.1"]


class CoreService:
    """RPCs every node serves: liveness, echo and sink for transport benchmarks."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def rpc_info(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        return {"peer_id": self._node.identity.peer_id, "name": self._node.config.name}

    async def rpc_echo(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        return Reply({"n": len(payload)}, payload)

    async def rpc_sink(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        return {"n": len(payload)}


class Node:
    def __init__(self, config: NodeConfig, services: list[object] | None = None) -> None:
        self.config = config
        self.identity = Identity.load_or_create(config.data_dir)
        self.peers = PeerTable(config.peer_expiry)
        self.handlers: dict[str, Handler] = handlers_of(CoreService(self), *(services or []))
        self.guard = ReplayGuard()
        self.counters = {"handshake_failures": 0, "signaling_rejected": 0, "dial_failures": 0}
        self.signaling: SignalingServer | None = None
        self.discovery: MdnsDiscovery | None = None
        self.mqtt: MqttSignaling | None = None
        self.dht: MeshDHT | None = None
        self.membership: DhtMembership | None = None
        self.api_url = ""
        self._api_runner: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_inbound = 0
        self._stopped = asyncio.Event()
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def _loopback_mesh(self) -> bool:
        ifs = self.config.mdns_interfaces
        return bool(ifs) and all(ipaddress.ip_address(i).is_loopback for i in ifs or [])

    def announced_addresses(self) -> list[str]:
        if self.config.mdns_interfaces:
            return list(self.config.mdns_interfaces)
        host = self.config.signaling_host
        if host and host not in ("0.0.0.0", "::"):
            return [host]
        return local_addresses()

    async def start(self) -> dict[str, Any]:
        cfg = self.config
        ice = cfg.ice_addresses
        if ice is None and (self._loopback_mesh or cfg.signaling_host == "127.0.0.1"):
            ice = ["127.0.0.1"]
        use_candidate_addresses(ice)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        sig_host = cfg.signaling_host or ("127.0.0.1" if self._loopback_mesh else "0.0.0.0")
        self.signaling = SignalingServer(self.identity, self._on_offer, self._info, self.guard)
        await self.signaling.start(sig_host, cfg.signaling_port)
        from .api import start_api  # the API sits on top of the node

        self._api_runner, self.api_url = await start_api(self, cfg.api_host, cfg.api_port)
        if cfg.mdns:
            self.discovery = MdnsDiscovery(
                self.identity,
                port=self.signaling.port,
                addresses=self.announced_addresses(),
                name=cfg.name,
                interfaces=cfg.mdns_interfaces,
                on_found=self._on_announcement,
                on_lost=self._on_unannounced,
            )
            await self.discovery.start()
        if cfg.mqtt is not None:
            self.mqtt = MqttSignaling(
                self.identity,
                cfg.mqtt,
                on_offer=self._on_offer,
                on_presence=self._on_presence,
                on_absence=lambda pid: self.unhint(pid, "mqtt"),
                presence_body=self._info,
                guard=self.guard,
            )
            await self.mqtt.start()
        if cfg.dht_port is not None or cfg.bootstrap:
            await self._start_dht(sig_host)
        for address in cfg.static_peers:
            self._spawn(self._static_peer(address))
        self._spawn(self._maintain())
        ready = {
            "peer_id": self.identity.peer_id,
            "name": cfg.name,
            "api": self.api_url,
            "signaling": self._signaling_endpoints()[0],
            "pid": os.getpid(),
        }
        if self.dht is not None:
            ready["dht"] = f"{self.dht.host}:{self.dht.port}"
        _write_json(cfg.data_dir / "node.json", ready)
        if cfg.ready_file is not None:
            _write_json(Path(cfg.ready_file), ready)
        log.info(
            "node %s ready: api %s, signaling %s",
            self.identity.peer_id,
            self.api_url,
            ready["signaling"],
        )
        return ready

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for task in list(self._tasks):
            task.cancel()
        for entry in self.peers:
            if entry.link is not None:
                entry.link.close("node shutting down")
        await wait_closed()
        if self.membership is not None:
            await self.membership.stop()
        if self.dht is not None:
            self.dht.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.signaling is not None:
            await self.signaling.stop()
        if self._api_runner is not None:
            await self._api_runner.cleanup()
        if self._http is not None:
            await self._http.close()
        with contextlib.suppress(FileNotFoundError):
            (self.config.data_dir / "node.json").unlink()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "addrs": self._signaling_endpoints(),
            "mesh": self.config.mesh,
        }

    async def _start_dht(self, sig_host: str) -> None:
        cfg = self.config
        host = cfg.dht_host or sig_host
        self.dht = MeshDHT(self.identity, RecordStore(quota=cfg.dht_quota))
        await self.dht.start(host, cfg.dht_port or 0, cfg.bootstrap)
        self.membership = DhtMembership(
            self.identity,
            self.dht,
            cfg.mesh,
            peer_body=self._info,
            on_member=self._on_dht_member,
            on_gone=lambda pid: self.unhint(pid, "dht"),
        )
        await self.membership.publish()
        self.membership.start()

    def _signaling_endpoints(self) -> list[str]:
        port = self.signaling.port if self.signaling else 0
        return [f"{a}:{port}" for a in self.announced_addresses()]

    # -- discovery hints -------------------------------------------------------------------
    def hint(
        self,
        peer_id: str,
        source: str,
        addresses: list[str] | None = None,
        name: str | None = None,
        *,
        via_mqtt: bool = False,
        expires: float | None = None,
    ) -> None:
        """A discovery source names ``peer_id``: remember how to reach it, dial if needed."""
        if peer_id == self.identity.peer_id:
            return
        entry = self.peers.ensure(peer_id, source)
        if entry is None:
            return
        fresh = source not in entry.announced_by
        entry.announced_by.add(source)
        entry.last_seen = time.time()
        entry.expires = expires
        if addresses:
            entry.addresses = list(dict.fromkeys(addresses))[:8]
        entry.name = name[:63] if name else entry.name
        entry.via_mqtt = entry.via_mqtt or via_mqtt
        if fresh and not entry.connected and (entry.dialing is None or entry.dialing.done()):
            grace = 0.0 if self.identity.peer_id < peer_id else self.config.dial_grace
            entry.failures = 0
            entry.next_attempt = time.monotonic() + grace

    def unhint(self, peer_id: str, source: str) -> None:
        """A discovery source no longer names ``peer_id`` (goodbye, will, expiry)."""
        entry = self.peers.get(peer_id)
        if entry is None:
            return
        entry.announced_by.discard(source)
        if source == "mqtt":
            entry.via_mqtt = False
        if not entry.announced and not entry.connected and not entry.static:
            self.peers.remove(peer_id)

    def _on_announcement(self, ann: Announcement) -> None:
        self.hint(ann.peer_id, "mdns", [f"{a}:{ann.port}" for a in ann.addresses], ann.name)

    def _on_unannounced(self, peer_id: str) -> None:
        self.unhint(peer_id, "mdns")

    def _on_presence(self, peer_id: str, body: dict[str, Any]) -> None:
        addrs = body.get("addrs")
        addresses = [a for a in addrs[:8] if isinstance(a, str)] if isinstance(addrs, list) else []
        name = body.get("name")
        self.hint(
            peer_id, "mqtt", addresses, name if isinstance(name, str) else None, via_mqtt=True
        )

    def _on_dht_member(self, rec: Record) -> None:
        name = rec.body.get("name")
        self.hint(
            rec.peer_id,
            "dht",
            record_addresses(rec),
            name if isinstance(name, str) else None,
            expires=rec.expires,
        )

    async def _static_peer(self, address: str) -> None:
        """Learn who listens at ``address`` and keep it in the table as a static peer."""
        assert self._http is not None
        delay = self.config.backoff_base
        while True:
            try:
                env = await fetch_info(self._http, address, self.identity.peer_id)
                break
            except SignalingError as exc:
                log.info("static peer %s: %s (retrying in %.1f s)", address, exc, delay)
                await asyncio.sleep(delay)  # backoff between attempts
                delay = min(delay * 2, self.config.backoff_max)
        if env.sender == self.identity.peer_id:
            return
        entry = self.peers.ensure(env.sender, "static")
        if entry is None:
            return
        entry.static = True
        entry.source = "static"
        if address not in entry.addresses:
            entry.addresses.insert(0, address)
        entry.next_attempt = time.monotonic()

    # -- maintenance -----------------------------------------------------------------------
    async def _maintain(self) -> None:
        while True:
            now = time.monotonic()
            for entry in self.peers:
                if entry.connected or (entry.dialing is not None and not entry.dialing.done()):
                    continue
                if not entry.announced and not entry.static:
                    if (
                        not entry.proven
                        or entry.failures >= self.config.give_up_after
                        or (
                            entry.disconnected_at is not None
                            and now - entry.disconnected_at > self.config.peer_expiry
                        )
                    ):
                        self.peers.remove(entry.peer_id)
                        continue
                if (entry.addresses or entry.via_mqtt) and now >= entry.next_attempt:
                    entry.dialing = self._spawn(self._dial(entry))
            await asyncio.sleep(self.config.tick)  # the maintenance period

    def _backoff(self, entry: PeerEntry) -> None:
        delay = min(self.config.backoff_base * 2**entry.failures, self.config.backoff_max)
        entry.failures += 1
        entry.next_attempt = time.monotonic() + delay * (0.75 + 0.5 * random.random())

    async def _dial(self, entry: PeerEntry) -> None:
        assert self._http is not None
        pid = entry.peer_id
        pending: PendingConnection | None = None
        try:
            pending, offer_sdp = await open_offer(self.identity, self.config.transport, pid)
            oid = os.urandom(16)
            offer = seal(
                self.identity,
                "offer",
                pid,
                {
                    "sdp": offer_sdp,
                    "oid": oid,
                    "name": self.config.name,
                    "addrs": self._signaling_endpoints(),
                },
            )
            raw = await self._exchange(entry, offer, oid)
            answer = open_envelope(raw, me=self.identity.peer_id, kind="answer", guard=self.guard)
            if answer.sender != pid or answer.body.get("re") != oid:
                raise SignalingError("answer is not from the dialed peer or not for our offer")
            sdp = answer.body.get("sdp")
            if not isinstance(sdp, str):
                raise SignalingError("answer carries no SDP")
            await complete_offer(pending, sdp)
            link = await pending.establish(self.handlers, self._on_link_closed)
        except asyncio.CancelledError:
            if pending is not None:
                await pending.pc.close()
            raise
        except Error as exc:
            if pending is not None:
                await pending.pc.close()
            self.counters["dial_failures"] += 1
            if isinstance(exc, HandshakeError):
                self.counters["handshake_failures"] += 1
            entry.last_error = str(exc)
            log.warning("dial %s failed: %s", pid[:12], exc)
            self._backoff(entry)
            return
        self._adopt(entry, link)

    async def _exchange(self, entry: PeerEntry, offer: bytes, oid: bytes) -> bytes:
        """Deliver a sealed offer by the first route that answers: direct, then the broker."""
        assert self._http is not None
        errors = []
        for address in list(entry.addresses):
            try:
                return await send_offer(self._http, address, offer)
            except SignalingError as exc:
                errors.append(str(exc))
        if entry.via_mqtt and self.mqtt is not None:
            try:
                return await self.mqtt.exchange(entry.peer_id, offer, oid)
            except SignalingError as exc:
                errors.append(str(exc))
        raise SignalingError("; ".join(errors) or "no route to the peer")

    # -- inbound ---------------------------------------------------------------------------
    async def _on_offer(self, env: Envelope) -> bytes:
        pid = env.sender
        sdp, oid = env.body.get("sdp"), env.body.get("oid")
        if not isinstance(sdp, str) or not isinstance(oid, bytes):
            raise SignalingError("offer carries no SDP or offer id")
        if self._pending_inbound >= self.config.max_pending_inbound:
            raise SignalingError("too many handshakes in progress")
        entry = self.peers.ensure(pid, "inbound")
        if entry is None:
            raise SignalingError("peer table full")
        if entry.dialing is not None and not entry.dialing.done():
            if self.identity.peer_id < pid:
                raise SignalingError("simultaneous dial: the lower peer id dials")
            entry.dialing.cancel()
        addrs = env.body.get("addrs")
        if isinstance(addrs, list) and not entry.addresses:
            entry.addresses = [a for a in addrs[:8] if isinstance(a, str)]
        name = env.body.get("name")
        if isinstance(name, str) and not entry.name:
            entry.name = name[:63]
        try:
            pending, answer_sdp = await accept_offer(self.identity, self.config.transport, sdp, pid)
        except Error as exc:
            raise SignalingError(str(exc)) from None
        self._pending_inbound += 1
        self._spawn(self._finish_inbound(entry, pending))
        return seal(self.identity, "answer", pid, {"sdp": answer_sdp, "re": oid})

    async def _finish_inbound(self, entry: PeerEntry, pending: PendingConnection) -> None:
        try:
            link = await pending.establish(self.handlers, self._on_link_closed)
        except Error as exc:
            if isinstance(exc, HandshakeError):
                self.counters["handshake_failures"] += 1
            entry.last_error = str(exc)
            log.warning("inbound connection from %s failed: %s", entry.peer_id[:12], exc)
            return
        finally:
            self._pending_inbound -= 1
        if self.peers.get(entry.peer_id) is not entry:  # forgotten meanwhile
            entry = self.peers.ensure(entry.peer_id, "inbound") or entry
        self._adopt(entry, link)

    # -- links -----------------------------------------------------------------------------
    def _adopt(self, entry: PeerEntry, link: Link) -> None:
        old = entry.link
        entry.link = link
        entry.proven = True
        entry.failures = 0
        entry.last_error = None
        entry.connected_since = time.time()
        entry.disconnected_at = None
        if old is not None and old is not link:
            old.close("replaced by a newer connection", notify=False)
        log.info("connected to %s (%s)", entry.peer_id[:12], entry.name)

    def _on_link_closed(self, link: Link) -> None:
        entry = self.peers.get(link.peer_id)
        if entry is None or entry.link is not link:
            return
        entry.disconnected_at = time.monotonic()
        entry.last_error = link.close_reason
        log.info("link to %s closed: %s", link.peer_id[:12], link.close_reason)
        grace = 0.0 if self.identity.peer_id < link.peer_id else self.config.dial_grace
        entry.next_attempt = time.monotonic() + grace

    def link(self, peer_id: str) -> Link:
        entry = self.peers.get(peer_id)
        if entry is None or entry.link is None or not entry.connected:
            raise PeerUnavailable(f"no link to {peer_id[:12]}")
        return entry.link

    async def call(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        return await self.link(peer_id).call(method, params, payload, timeout)

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.identity.peer_id,
            "name": self.config.name,
            "api": self.api_url,
            "signaling": self._signaling_endpoints(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "counters": {
                **self.counters,
                "signaling_rejected": self.signaling.rejected if self.signaling else 0,
                "mdns_rejected": self.discovery.rejected if self.discovery else 0,
                "mqtt_rejected": self.mqtt.rejected if self.mqtt else 0,
                "dht_refused": self.dht.store.refused if self.dht else 0,
            },
        }

    async def run_until_stopped(self) -> None:
        await self._stopped.wait()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file
