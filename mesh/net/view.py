"""What this node knows about the network: Vivaldi coordinates, zones, egress prices, costs,
penalties, and the bytes moved per source, destination and zone pair.

**Coordinates.** The node runs one :class:`scheduler.VivaldiNode`. Every RTT sample to a peer
(each ping of the link, and each ``net_info`` round trip) moves our coordinate, given the
peer's latest coordinate learned from ``net_info`` (exchanged both ways every ``refresh``
seconds). So the RTT between peers that never talked can be estimated from coordinates.

**Cost** of pulling ``n`` bytes from peer ``p`` (milliseconds)::

    est_rtt(p) + n / bandwidth + price_weight_ms * price(p -> me) * n / 1e9 + penalty(p)

``price`` is 0 inside a zone and ``p``'s egress price (per GB) across zones; ``penalty`` grows
when ``p`` served bytes that failed their hash, and halves every 10 minutes.

**Accounting.** Every storage or job byte moved through this node is recorded with its source,
destination and their zones (``GET /v1/accounting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh.errors import EXPECTED, Error, RPCError
from mesh.net.rpc import CallContext
from mesh.net.signaling import parse_endpoint
from scheduler import Coordinate, VivaldiNode, estimate_rtt

if TYPE_CHECKING:
    from mesh.net.context import PeerContext

__all__ = ["NetView", "PeerNet", "Accounting", "Penalties"]

log = logging.getLogger(__name__)
MAX_ZONE = 63
# Keys one accounting table keeps (peers, zone pairs, kinds); more go to OTHER. A peer picks
# its zone anew at every net_info, and identities are free in an open mesh: unbounded before.
MAX_ACCOUNTED = 1024
OTHER = "(other)"
MAX_VIEWED = 1024  # peers' net info kept; over it, that of peers no longer linked goes
DEFAULT_BANDWIDTH = 15e6  # bytes/s of one WebRTC link here (docs/benchmarks.md)
PENALTY_MS = 2000.0
CONFIDENT_ERROR = 0.5  # a coordinate's relative error under which its estimates are used


class NetViewError(Error):
    """A peer's network description is malformed."""


class Penalties:
    """Milliseconds added to the cost of pulling from peers that served bytes failing their
    hash. A penalty halves every ``half_life`` seconds, so a peer whose disk was mended is
    used again rather than shunned for the node's lifetime; at most ``capacity`` peers are
    kept (identities are free to mint), the least penalized dropped first."""

    def __init__(
        self,
        half_life: float = 600.0,
        capacity: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if half_life <= 0 or capacity < 1:
            raise ValueError("half_life and capacity must be positive")
        self.half_life = half_life
        self.capacity = capacity
        self._clock = clock
        self._entries: dict[str, tuple[float, float]] = {}  # peer -> (ms, as of)

    def _decayed(self, ms: float, since: float, now: float) -> float:
        return float(ms * 0.5 ** (max(0.0, now - since) / self.half_life))

    def get(self, pid: str, default: float = 0.0) -> float:
        entry = self._entries.get(pid)
        if entry is None:
            return default
        value = self._decayed(*entry, self._clock())
        if value < 1.0:  # under a millisecond: forgiven
            del self._entries[pid]
            return default
        return value

    def add(self, pid: str, ms: float) -> float:
        now = self._clock()
        value = self.get(pid) + ms
        self._entries[pid] = (value, now)
        if len(self._entries) > self.capacity:  # the newest offender is kept
            others = (p for p in self._entries if p != pid)
            weakest = min(others, key=lambda p: self._decayed(*self._entries[p], now))
            del self._entries[weakest]
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def as_dict(self) -> dict[str, float]:
        return {pid: v for pid in list(self._entries) if (v := self.get(pid)) > 0}


def coord_to_list(c: Coordinate) -> list[float]:
    return [c.vec[0], c.vec[1], c.height, c.error, c.adjustment]


def coord_from(value: Any) -> Coordinate:
    if (
        not isinstance(value, list)
        or len(value) != 5
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
    ):
        raise NetViewError("coordinate must be 5 finite numbers")
    try:
        c = Coordinate(
            (float(value[0]), float(value[1])), float(value[2]), float(value[3]), float(value[4])
        )
    except EXPECTED as exc:
        raise NetViewError(str(exc)) from None
    return c


@dataclass
class PeerNet:
    zone: str = "default"
    egress_price: float = 0.0
    coord: Coordinate | None = None
    compute: bool = False
    speed: float = 0.0
    updated: float = 0.0
    samples: int = 0
    fast: str | None = None  # "host:port" of its direct bulk path (mesh.fastpath)


def parse_info(params: dict[str, Any]) -> PeerNet:
    zone, price = params.get("zone"), params.get("price")
    speed = params.get("speed", 0.0)
    if not isinstance(zone, str) or not 0 < len(zone) <= MAX_ZONE:
        raise NetViewError("zone must be a short string")
    if not isinstance(price, int | float) or not 0 <= price < 1e6 or not math.isfinite(price):
        raise NetViewError("price must be a finite non-negative number")
    if not isinstance(speed, int | float) or not 0 <= speed < 1e15 or not math.isfinite(speed):
        raise NetViewError("speed must be a finite non-negative number")
    fast = params.get("fast")
    if fast is not None and parse_endpoint(fast) is None:
        # an IP literal and a port: a peer must not make us look up or dial a host name
        raise NetViewError("fast must be a short IP:PORT string")
    return PeerNet(
        fast=fast,
        zone=zone,
        egress_price=float(price),
        coord=coord_from(params.get("coord")),
        compute=bool(params.get("compute")),
        speed=float(speed),
        updated=time.time(),
    )


class Accounting:
    """Bytes moved, per source, per destination and per zone pair (``"a->b"``)."""

    def __init__(self) -> None:
        self.by_source: dict[str, int] = defaultdict(int)
        self.by_destination: dict[str, int] = defaultdict(int)
        self.by_zone_pair: dict[str, int] = defaultdict(int)
        self.by_kind: dict[str, int] = defaultdict(int)
        self.cross_zone = 0
        self.total = 0

    def record(self, src: str, dst: str, zsrc: str, zdst: str, n: int, kind: str) -> None:
        _add(self.by_source, src, n)
        _add(self.by_destination, dst, n)
        _add(self.by_zone_pair, f"{zsrc}->{zdst}", n)
        _add(self.by_kind, kind, n)
        self.total += n
        if zsrc != zdst:
            self.cross_zone += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "cross_zone_bytes": self.cross_zone,
            "by_source": dict(self.by_source),
            "by_destination": dict(self.by_destination),
            "by_zone_pair": dict(self.by_zone_pair),
            "by_kind": dict(self.by_kind),
        }


def _add(table: dict[str, int], key: str, n: int) -> None:
    """Count ``n`` under ``key``, or under OTHER once the table is full (OTHER included, it
    holds MAX_ACCOUNTED keys)."""
    if key not in table and len(table) >= MAX_ACCOUNTED - 1:
        key = OTHER
    table[key] += n


@dataclass
class NetConfig:
    zone: str = "default"
    egress_price: float = 0.0  # per GB that leaves this peer's zone
    price_weight_ms: float = 1e6  # ms of cost per unit of price (1 $ ~ 1000 s)
    refresh: float = 2.0
    compute: bool = True
    speed: float = 1e8  # job compute units (record bytes) per second
    extra: dict[str, Any] = field(default_factory=dict)


class NetView:
    name = "net"  # RPC namespace: peers call "net.<method>"

    def status(self) -> dict[str, Any]:
        return {"zone": self.config.zone, "peers": len(self.peers)}

    def __init__(self, node: PeerContext, config: NetConfig) -> None:
        self.node = node
        self.config = config
        self.vivaldi = VivaldiNode()
        self.peers: dict[str, PeerNet] = {}
        self.penalties = Penalties()
        self.accounting = Accounting()
        self._task: asyncio.Task[None] | None = None
        self._hooked: set[int] = set()

    @property
    def me(self) -> str:
        return self.node.me

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def my_info(self) -> dict[str, Any]:
        c = self.config
        return {
            "zone": c.zone,
            "price": c.egress_price,
            "coord": coord_to_list(self.vivaldi.coordinate),
            "compute": c.compute,
            "speed": c.speed,
            **c.extra,
        }

    async def _run(self) -> None:
        while True:
            links = list(self.node.peers.links())
            for link in links:
                if id(link) not in self._hooked:  # every ping sample feeds the coordinate
                    self._hooked.add(id(link))
                    link.on_rtt = self.observe_rtt
            await asyncio.gather(*(self._exchange(link.peer_id) for link in links))
            live = {id(link) for link in links}
            self._hooked &= live
            self._forget_gone({link.peer_id for link in links})
            await asyncio.sleep(self.config.refresh)  # refresh period of the peer view

    async def ensure(self, pids: list[str]) -> None:
        """Learn zone, price and coordinate of peers we have not heard from yet."""
        unknown = [p for p in pids if p != self.me and p not in self.peers]
        await asyncio.gather(*(self._exchange(p) for p in unknown))

    async def _exchange(self, pid: str) -> None:
        t0 = time.monotonic()
        try:
            reply = await self.node.call(pid, "net.net_info", self.my_info(), timeout=5)
            info = parse_info(reply.result)
        except (RPCError, NetViewError) as exc:
            log.debug("net_info with %s: %s", pid[:12], exc)
            return
        except Exception:  # a bug in one peer's exchange must not end the view's loop
            log.exception("net_info with %s failed unexpectedly", pid[:12])
            return
        self._learn(pid, info)
        self.observe_rtt(pid, (time.monotonic() - t0) * 1000)

    def _forget_gone(self, linked: set[str]) -> None:
        """Over MAX_VIEWED, the info of peers no longer linked goes, the stalest first (any
        peer that links may call net_info: one entry per identity that ever did, before)."""
        over = len(self.peers) - MAX_VIEWED
        if over <= 0:
            return
        gone = sorted(
            (p for p in self.peers if p not in linked), key=lambda p: self.peers[p].updated
        )
        for pid in gone[:over]:
            del self.peers[pid]

    def _learn(self, pid: str, info: PeerNet) -> None:
        old = self.peers.get(pid)
        if old is not None:
            info.samples = old.samples
        self.peers[pid] = info

    def observe_rtt(self, pid: str, rtt_ms: float) -> None:
        peer = self.peers.get(pid)
        if peer is None or peer.coord is None:
            return
        if self.vivaldi.update(rtt_ms, peer.coord, pid):
            peer.samples += 1

    async def rpc_net_info(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        with contextlib.suppress(NetViewError):
            self._learn(ctx.peer_id, parse_info(params))  # both sides learn from one call
        return self.my_info()

    # -- queries ---------------------------------------------------------------------------
    def zone_of(self, pid: str) -> str:
        if pid == self.me:
            return self.config.zone
        peer = self.peers.get(pid)
        return peer.zone if peer is not None else "?"

    def price_of(self, src: str, dst: str) -> float:
        """Price per GB of moving bytes from ``src`` to ``dst``."""
        if self.zone_of(src) == self.zone_of(dst):
            return 0.0
        if src == self.me:
            return self.config.egress_price
        peer = self.peers.get(src)
        return peer.egress_price if peer is not None else 0.0

    def egress_of(self, pid: str) -> float:
        """``pid``'s egress price per GB (what bytes leaving its zone cost)."""
        if pid == self.me:
            return self.config.egress_price
        peer = self.peers.get(pid)
        return peer.egress_price if peer is not None else 0.0

    def rtt_ms(self, pid: str) -> float:
        if pid == self.me:
            return 0.0
        peer = self.peers.get(pid)
        if peer is not None and peer.coord is not None and peer.samples:
            return estimate_rtt(self.vivaldi.coordinate, peer.coord)
        with contextlib.suppress(Error):
            rtt = self.node.link(pid).rtt_ms
            if rtt is not None:
                return rtt
        return 5.0

    def pair_rtt(self, a: str, b: str) -> float | None:
        """The RTT between two peers where it is known: measured on our own links, else from
        both peers' coordinates once they are confident (relative error <= 0.5); else None."""
        if a == b:
            return 0.0
        if self.me in (a, b):
            other = b if a == self.me else a
            with contextlib.suppress(Error):
                rtt = self.node.link(other).rtt_ms
                if rtt is not None:
                    return float(rtt)
            return None
        pa, pb = self.peers.get(a), self.peers.get(b)
        if pa is None or pb is None or pa.coord is None or pb.coord is None:
            return None
        if max(pa.coord.error, pb.coord.error) > CONFIDENT_ERROR:
            return None
        return estimate_rtt(pa.coord, pb.coord)

    def rtt_between(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        if self.me in (a, b):
            return self.rtt_ms(b if a == self.me else a)
        pa, pb = self.peers.get(a), self.peers.get(b)
        if pa is not None and pb is not None and pa.coord is not None and pb.coord is not None:
            return estimate_rtt(pa.coord, pb.coord)
        return 5.0

    def cost_ms(self, src: str, nbytes: int, dst: str | None = None) -> float:
        dst = dst or self.me
        if src == dst:
            return 0.0
        return (
            self.rtt_between(src, dst)
            + nbytes / DEFAULT_BANDWIDTH * 1000
            + self.config.price_weight_ms * self.price_of(src, dst) * nbytes / 1e9
            + self.penalties.get(src, 0.0)
        )

    def penalize(self, pid: str, reason: str) -> None:
        total = self.penalties.add(pid, PENALTY_MS)
        log.warning("penalized %s: %s (penalty %.0f ms)", pid[:12], reason, total)

    def account(self, src: str, dst: str, n: int, kind: str) -> None:
        self.accounting.record(src, dst, self.zone_of(src), self.zone_of(dst), n, kind)

    def as_dict(self) -> dict[str, Any]:
        c = self.vivaldi.coordinate
        return {
            "peer_id": self.me,
            "zone": self.config.zone,
            "egress_price": self.config.egress_price,
            "coordinate": coord_to_list(c),
            "peers": {
                pid: {
                    "zone": p.zone,
                    "egress_price": p.egress_price,
                    "coordinate": coord_to_list(p.coord) if p.coord else None,
                    "est_rtt_ms": round(self.rtt_ms(pid), 3),
                    "samples": p.samples,
                    "compute": p.compute,
                    "penalty_ms": self.penalties.get(pid, 0.0),
                }
                for pid, p in self.peers.items()
            },
            "penalties": self.penalties.as_dict(),
        }
