"""The running peer: identity, signaling endpoints, discovery sources, links, HTTP API.

The node wires sources of hints (mDNS, the MQTT broker, the DHT, ``--peer``) into one
:class:`~mesh.net.connections.Connections`, which dials, accepts and keeps the links.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hw import load_profile, summary
from mesh.api.generate import parse_generation
from mesh.api.server import start_api
from mesh.discovery.dht import MeshDHT, Record, RecordStore
from mesh.discovery.mdns import Announcement, MdnsDiscovery
from mesh.discovery.membership import DhtMembership, record_addresses
from mesh.discovery.mqtt import MqttConfig, MqttSignaling
from mesh.errors import DeadlineExceeded, RemoteError
from mesh.inference.compute import ComputeConfig, ComputeService
from mesh.inference.coordinator import Coordinator
from mesh.jobs.llmjob import LlmJobService
from mesh.jobs.service import JobService
from mesh.local import DataDirLock
from mesh.meshview import MeshView, own_summary
from mesh.net.connections import ConnectionParams, Connections
from mesh.net.engine import interface_addresses
from mesh.net.identity import Identity
from mesh.net.rpc import CallContext, Handler, Link, Reply, Service, handlers_of
from mesh.net.signaling import ReplayGuard, SignalingServer, format_endpoint
from mesh.net.transport import TransportConfig
from mesh.storage.service import ObjectService, StorageConfig
from mesh.trust.invite import InviteStore
from mesh.trust.join import Redeemer
from mesh.trust.keys import OwnerKey
from mesh.trust.policy import load_policy
from mesh.trust.service import TrustService, members_only

__all__ = ["NodeConfig", "Node", "CoreService", "local_addresses"]

log = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    data_dir: Path
    name: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 0
    api_port_fallback: bool = False  # api_port taken: bind a free port (and say so) instead
    signaling_host: str | None = None  # None: 127.0.0.1 for a loopback mesh, else 0.0.0.0
    signaling_port: int = 0
    mdns: bool = True
    mdns_interfaces: list[str] | None = None  # None: all interfaces
    static_peers: list[str] = field(default_factory=list)  # "host:port" signaling endpoints
    ice_addresses: list[str] | None = None  # None: loopback for a loopback mesh, else default
    ready_file: Path | None = None
    transport: TransportConfig = field(default_factory=TransportConfig)
    connections: ConnectionParams = field(default_factory=ConnectionParams)
    mesh: str = "default"  # mesh name on the LAN, on the broker and in the DHT
    mqtt: MqttConfig | None = None
    dht_port: int | None = None  # None: no DHT (unless bootstrap addresses are given)
    dht_host: str | None = None  # None: like the signaling host
    bootstrap: list[tuple[str, int]] = field(default_factory=list)
    dht_quota: int = 256  # stores per minute one sender may make before it is cut off
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # Longest wait for one generation step's token before the coordinator probes the route.
    step_timeout: float = 45.0
    profile_hardware: bool = True  # detect and benchmark the machine (cached in DATA_DIR)
    # Required when the API listens beyond loopback; from the environment, never argv. Unset,
    # the node generates one at every start (DATA_DIR/api.token, mode 0600).
    api_token: str | None = field(default_factory=lambda: os.environ.get("EDGEMESH_API_TOKEN"))
    storage: StorageConfig = field(default_factory=StorageConfig)  # objects, zone, jobs

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.name:
            self.name = os.uname().nodename


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (for the mDNS announcement)."""
    out = []
    for ip in interface_addresses():
        address = ipaddress.ip_address(ip)
        if address.version == 4 and not address.is_loopback:
            out.append(ip)
    return out or ["127.0.0.1"]


class CoreService:
    """RPCs every node serves: its summary for members' topology pages (``info``), echo and
    sink for transport benchmarks."""

    name = "node"  # RPC namespace: peers call "node.<method>"

    def status(self) -> dict[str, Any]:
        return {}

    def __init__(self, node: Node) -> None:
        self._node = node

    async def rpc_info(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        """This node's summary for a member's topology page (mesh/meshview.py)."""
        return self._node.summary()

    async def rpc_echo(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        return Reply({"n": len(payload)}, payload)

    async def rpc_sink(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        return {"n": len(payload)}

    async def rpc_clock(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        """When the request arrived, on this machine's monotonic clock (one-way latency
        benchmarks between processes of one machine, which share that clock)."""
        return {"t": time.monotonic(), "n": len(payload)}


class Node:
    def __init__(self, config: NodeConfig, services: list[object] | None = None) -> None:
        self.config = config
        self._lock = DataDirLock(config.data_dir)  # taken by start(), for the node's life
        self.identity = Identity.load_or_create(config.data_dir)
        self.me = self.identity.peer_id
        # Who may connect (mesh/trust): every hint, offer, answer and hello is asked first.
        self.policy = load_policy(config.data_dir)
        self.trust = TrustService(self, self.policy)
        # -- storage and jobs (mesh/storage, mesh/jobs): one store, model shards included --
        self.objects = ObjectService(self, config.storage, config.data_dir / "objects")
        self.compute = ComputeService(
            self, self.me, config.data_dir / "store", config.compute, self.objects
        )
        self.jobs = JobService(self, self.objects)
        # -- end storage and jobs --
        stranger = (lambda peer: not self.policy.is_member(peer)) if self.policy.open else None
        self.coordinator = Coordinator(
            self,
            self.compute,
            config.step_timeout,
            pair_rtt=self.objects.net.pair_rtt,
            stranger=stranger,
        )
        # The node's services: their RPCs are served as "<name>.<method>" and their status
        # is their part of /v1/info.
        # LLM batch jobs run their records as generations coordinated where they run; records
        # are parsed as the API parses generation requests (the jobs layer sits below it).
        self.llm_jobs = LlmJobService(self.jobs, self.coordinator, parse_generation)
        self.services: list[Service] = [
            CoreService(self),
            self.compute,
            self.compute.tokenizers,
            *self.objects.services(),
            self.jobs,
            self.llm_jobs,
            self.coordinator,
            self.trust,
        ]
        self.handlers: dict[str, Handler] = handlers_of(*self.services, *(services or []))
        members_only(self.policy, self.handlers)  # strangers of an open mesh: no jobs, replicas
        self.guard = ReplayGuard()
        self.conns = Connections(
            self.identity,
            self._transport_config(),
            self.handlers,
            self.guard,
            config.connections,
            my_endpoints=self._signaling_endpoints,
            my_name=config.name,
            gate=self.policy,
        )
        self.peers = self.conns.peers
        self.meshview = MeshView(self.summary, self.connected_peer_ids, self._ask_info)
        self._bans_file = Path(config.data_dir) / "banned.json"
        self._load_bans()
        self.signaling: SignalingServer | None = None
        self.discovery: MdnsDiscovery | None = None
        self.mqtt: MqttSignaling | None = None
        self.dht: MeshDHT | None = None
        self.membership: DhtMembership | None = None
        self.api_url = ""
        self._api_runner: Any = None
        self._stop_task: asyncio.Task[None] | None = None
        self._local_tasks: set[asyncio.Task[None]] = set()
        self.hw_summary: dict[str, Any] | None = None
        self._hw_task: asyncio.Task[None] | None = None
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

    def _transport_config(self) -> TransportConfig:
        """The transport config with the ICE candidate addresses this node gathers on."""
        cfg = self.config
        ice = cfg.ice_addresses
        if ice is None and cfg.transport.candidate_addresses is not None:
            return cfg.transport
        if ice is None and (self._loopback_mesh or cfg.signaling_host == "127.0.0.1"):
            ice = ["127.0.0.1"]
        if ice is None:
            return cfg.transport
        return dataclasses.replace(cfg.transport, candidate_addresses=tuple(ice))

    async def start(self) -> dict[str, Any]:
        """Start every part; first take the data dir's lock (DataDirInUse when another node
        holds it: then nothing of that node's is touched, and :meth:`stop` touches nothing)."""
        cfg = self.config
        self._lock.acquire()
        if self.policy.own_cert is None:
            log.warning(
                "this node holds no member certificate of a mesh, so no member admits it: "
                "run `edgemesh mesh create` (a new mesh) or `edgemesh node --join INVITE`"
            )
        sig_host = cfg.signaling_host or ("127.0.0.1" if self._loopback_mesh else "0.0.0.0")
        self.signaling = SignalingServer(
            self.identity, self.conns.on_offer, self._info, self.guard, self._owner_routes()
        )
        await self.signaling.start(sig_host, cfg.signaling_port)
        self.conns.start()
        self.trust.start()
        self.compute.start()
        # The fast path is its own listener and listens where it is announced, as signaling
        # does (loopback only for a loopback mesh): tied to the API's host, the default
        # loopback API left it unreachable from other machines, which waited out a connect
        # timeout at every pull before using the link (issue 15). It serves only peers with a
        # link, authenticated by their link's key; the API stays where --api puts it.
        await self.objects.start(sig_host, self.announced_addresses()[0])
        self._api_runner, self.api_url = await start_api(
            self, cfg.api_host, cfg.api_port, cfg.api_token, cfg.data_dir, cfg.api_port_fallback
        )
        if cfg.mdns:
            self.discovery = MdnsDiscovery(
                self.identity,
                port=self.signaling.port,
                addresses=self.announced_addresses(),
                name=cfg.name,
                mesh=cfg.mesh,
                interfaces=cfg.mdns_interfaces,
                on_found=self._on_announcement,
                on_lost=lambda pid: self.conns.unhint(pid, "mdns"),
                cert=self.policy.credential_text,
            )
            await self.discovery.start()
        if cfg.mqtt is not None:
            self.mqtt = MqttSignaling(
                self.identity,
                cfg.mqtt,
                on_offer=self.conns.on_offer,
                on_presence=self._on_presence,
                on_absence=lambda pid: self.conns.unhint(pid, "mqtt"),
                presence_body=self._info,
                guard=self.guard,
            )
            self.conns.mqtt_exchange = self.mqtt.exchange
            await self.mqtt.start()
        if cfg.dht_port is not None or cfg.bootstrap:
            await self._start_dht(sig_host)
        for address in cfg.static_peers:
            self.conns.add_static(address)
        if cfg.profile_hardware:
            self._hw_task = asyncio.get_running_loop().create_task(self._profile_hardware())
        ready = {
            "peer_id": self.identity.peer_id,
            "name": cfg.name,
            "api": self.api_url,
            "signaling": self._signaling_endpoints()[0],
            "pid": os.getpid(),
        }
        if self.dht is not None:
            ready["dht"] = format_endpoint(self.dht.host, self.dht.port)
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

    def stop(self) -> asyncio.Task[None]:
        """Shut down (idempotent): every caller awaits the same shutdown to its end."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop())
        return self._stop_task

    async def _stop(self) -> None:
        if not self._lock.held:  # never started, or another node runs from this data dir
            self._stopped.set()
            return
        # Refuse new connections first, so peers redialing on our bye find nobody.
        self.conns.closing = True
        if self.signaling is not None:
            await self.signaling.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self.membership is not None:
            await self.membership.stop()
        if self.dht is not None:
            self.dht.stop()
        await self.trust.stop()
        await self.coordinator.stop()  # its refreshes call peers over the links going next
        await self.conns.stop()  # says bye on every link, waits for their connections to close
        await self.compute.stop()
        await self.objects.stop()
        if self.discovery is not None:
            await self.discovery.stop()  # the mDNS goodbye
        if self._api_runner is not None:
            await self._api_runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            (self.config.data_dir / "node.json").unlink()
        self._lock.release()
        self._stopped.set()

    def _info(self) -> dict[str, Any]:
        """What we announce (broker presence, DHT peer record, signaling info)."""
        info: dict[str, Any] = {
            "name": self.config.name,
            "addrs": self._signaling_endpoints(),
            "mesh": self.config.mesh,
        }
        if self.policy.credential_text:  # text: the DHT's peer record is served as JSON
            info["cert"] = self.policy.credential_text
        if self.hw_summary is not None:
            info["hw"] = self.hw_summary
        return info

    async def _profile_hardware(self) -> None:
        """Detect and (once, then cached) benchmark this machine, off the start-up path."""
        try:
            profile, _ = await asyncio.to_thread(load_profile, self.config.data_dir)
        except Exception:  # hardware probing must never take the node down
            log.exception("hardware profiling failed")
            return
        self.hw_summary = summary(profile)
        self.compute.mem_gbps = self.hw_summary.get("gbps")
        # Re-announce now rather than at the next refresh, so planners see it soon.
        with contextlib.suppress(Exception):
            if self.membership is not None:
                await self.membership.publish()
            if self.mqtt is not None:
                await self.mqtt._publish_presence()

    async def _start_dht(self, sig_host: str) -> None:
        cfg = self.config
        host = cfg.dht_host or sig_host
        self.dht = MeshDHT(self.identity, RecordStore(quota=cfg.dht_quota), gate=self.policy)
        await self.dht.start(host, cfg.dht_port or 0, cfg.bootstrap)
        self.membership = DhtMembership(
            self.identity,
            self.dht,
            cfg.mesh,
            peer_body=self._info,
            on_member=self._on_dht_member,
            on_gone=lambda pid: self.conns.unhint(pid, "dht"),
        )
        await self.membership.publish()
        self.membership.start()

    def _signaling_endpoints(self) -> list[str]:
        port = self.signaling.port if self.signaling else 0
        return [format_endpoint(a, port) for a in self.announced_addresses()]

    # -- discovery sources -----------------------------------------------------------------
    def _on_announcement(self, ann: Announcement) -> None:
        addrs = [format_endpoint(a, ann.port) for a in ann.addresses]
        self.conns.hint(ann.peer_id, "mdns", addrs, ann.name, cert=ann.cert)

    def _on_presence(self, peer_id: str, body: dict[str, Any]) -> None:
        addrs = body.get("addrs")
        name = body.get("name")
        self.conns.hint(
            peer_id,
            "mqtt",
            addrs if isinstance(addrs, list) else [],
            name if isinstance(name, str) else None,
            via_mqtt=True,
            cert=body.get("cert"),
        )

    def _on_dht_member(self, rec: Record) -> None:
        name = rec.body.get("name")
        self.conns.hint(
            rec.peer_id,
            "dht",
            record_addresses(rec),
            name if isinstance(name, str) else None,
            expires=rec.expires,
            cert=rec.body.get("cert"),
        )

    # -- trust ---------------------------------------------------------------------------
    @property
    def banned(self) -> dict[str, str]:
        """Banned peer ids and why (read-only view for services)."""
        return self.conns.banned

    def sign(self, message: bytes) -> bytes:
        return self.identity.sign(message)

    def peer_key(self, peer_id: str) -> bytes:
        if peer_id == self.me:
            return self.identity.public_key
        return self.link(peer_id).public_key

    def ban(self, peer_id: str, reason: str) -> None:
        """Refuse ``peer_id`` (a failed spot check): its link, its discovery records and its
        provider records are ignored from now on, across restarts (``banned.json``)."""
        if peer_id == self.me:
            return
        self.conns.ban(peer_id, reason)
        self.objects.providers.forget_peer(peer_id)
        with contextlib.suppress(OSError):
            _write_json(self._bans_file, {"banned": self.conns.banned})

    def _load_bans(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            raw = json.loads(self._bans_file.read_text()).get("banned", {})
            for pid, why in list(raw.items())[: self.conns.params.max_banned]:
                if isinstance(pid, str) and isinstance(why, str):
                    self.conns.banned[pid] = why

    @property
    def max_message(self) -> int:
        return self.config.transport.link.limits.max_message

    # -- calls -----------------------------------------------------------------------------
    def link(self, peer_id: str) -> Link:
        return self.conns.link(peer_id)

    def connected_peer_ids(self) -> list[str]:
        return [link.peer_id for link in self.peers.links()]

    async def call(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        """Call a peer's RPC; a call to ourselves runs the handler in place (same contract)."""
        if peer_id != self.identity.peer_id:
            return await self.link(peer_id).call(method, params, payload, timeout)
        try:
            out = await self._local(method, params, payload, timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{method} on this node exceeded its deadline") from None
        return out if isinstance(out, Reply) else Reply(out or {})

    def _local(
        self, method: str, params: dict[str, Any] | None, payload: bytes, timeout: float | None
    ) -> Any:
        """A call to our own handler under its deadline (the contract a link gives a peer)."""
        handler = self.handlers.get(method)
        if handler is None:
            raise RemoteError("NotFound", f"no method {method!r}")
        budget = self.config.transport.link.call_timeout if timeout is None else timeout
        ctx = CallContext(None, method, time.monotonic() + budget, self.identity.peer_id)

        async def run() -> Any:
            async with asyncio.timeout(budget):
                return await handler(ctx, dict(params or {}), payload)

        return run()

    async def notify(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> None:
        """One-way call (no reply); to ourselves it runs as a task of its own."""
        if peer_id != self.identity.peer_id:
            await self.link(peer_id).notify(method, params, payload, timeout)
            return
        call = self._local(method, params, payload, timeout)

        async def run() -> None:
            try:
                await call
            except Exception:  # a one-way handler reports its failures itself
                log.exception("local one-way %s failed", method)

        task = asyncio.get_running_loop().create_task(run())
        self._local_tasks.add(task)
        task.add_done_callback(self._local_tasks.discard)

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.identity.peer_id,
            "name": self.config.name,
            "mesh": self.config.mesh,
            "api": self.api_url,
            "signaling": self._signaling_endpoints(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "hw": self.hw_summary,
            "counters": {
                **self.conns.counters,
                "handshakes_in_progress": self.conns.handshakes_in_progress,
                "signaling_rejected": self.signaling.rejected if self.signaling else 0,
                "mdns_rejected": self.discovery.rejected if self.discovery else 0,
                "mqtt_rejected": self.mqtt.rejected if self.mqtt else 0,
                "dht_refused": self.dht.store.refused if self.dht else 0,
                "dht_ignored": self.dht.ignored if self.dht else 0,
                "not_member_from_dht_datagram": self.dht.not_member if self.dht else 0,
                **self.policy.counters(),
                **{f"not_member_from_{k}": v for k, v in self.conns.not_member.items()},
                "turn_relay_failures": self.conns.transport.stats.relay_failures,
            },
            "last_turn_error": self.conns.transport.stats.last_relay_error,
            "webrtc_engine": self.conns.transport.engine_name,
            "event_loop": _loop_kind(),
            "banned": dict(self.conns.banned),
            # Each service's own part, under its name (compute, storage, net, ...).
            **{svc.name: svc.status() for svc in self.services},
        }

    def summary(self) -> dict[str, Any]:
        """What this node runs and links to: its ``node.info`` answer and its part of
        ``/v1/mesh``."""
        listed = [e.as_dict() for e in self.peers.listed() if e.connected]
        links = [{"peer_id": d["peer_id"], "rtt_ms": d["rtt_ms"]} for d in listed]
        part = {
            "name": self.config.name,
            "zone": self.objects.config.zone,
            "addresses": self._signaling_endpoints(),
            "hw": self.hw_summary,
            "links": links,
        }
        return own_summary(self.me, part, self.compute.status(), self.coordinator.status())

    async def _ask_info(self, peer_id: str) -> Any:
        return (await self.call(peer_id, "node.info", timeout=5)).result

    async def mesh_view(self) -> dict[str, Any]:
        """Every member's summary and the links each reports (``GET /v1/mesh``)."""
        return await self.meshview.view()

    def _owner_routes(self) -> list[Any]:
        """The mesh owner's node redeems invites on its signaling port."""
        owner = OwnerKey.load(self.config.data_dir)
        if owner is None or self.policy.anchor is None:
            return []
        if self.policy.anchor.owner_key != owner.public_key:
            log.warning("mesh.key does not own this node's mesh: not redeeming invites")
            return []
        return Redeemer(owner, self.policy.anchor, InviteStore(self.config.data_dir)).routes()

    async def run_until_stopped(self) -> None:
        await self._stopped.wait()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def _loop_kind() -> str:
    """The running event loop's implementation ("asyncio", "uvloop"); "none" outside one."""
    try:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        return "none"
