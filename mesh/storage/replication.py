"""Keeping each pinned object at its replication factor (repair when holders leave).

An object pinned with ``replicas = R`` should have R *durable* holders (peers that pinned it)
among the live peers. Every durable holder checks its objects each maintenance round; the
live durable holder with the lowest peer id (a leader every holder agrees on without talking)
asks ``R - live`` more peers to replicate. Candidates are connected peers that are not durable
holders, ordered by: a zone no durable holder is in yet (a zone outage must not take every
copy), then peers that already hold a cached copy (repair costs no transfer), then the lowest
estimated cost of moving the object to them. A request that has not turned into a durable
provider record within ``pending_for`` seconds is retried with the next candidate.

Liveness is the link: a durable holder counts while its link is open (or it is us). Records of
peers we cannot reach are only hints (see :mod:`mesh.storage.providers`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from mesh.errors import RPCError

if TYPE_CHECKING:
    from mesh.net.context import PeerContext
    from mesh.net.view import NetView
    from mesh.storage.providers import Providers
    from mesh.storage.store import BlobStore


class ReplicaHost(Protocol):
    """What replication needs from the object service: its store, holders and views."""

    @property
    def me(self) -> str: ...

    @property
    def node(self) -> PeerContext: ...

    @property
    def store(self) -> BlobStore: ...

    @property
    def providers(self) -> Providers: ...

    @property
    def net(self) -> NetView: ...


__all__ = ["Replicator"]

log = logging.getLogger(__name__)


class Replicator:
    def __init__(self, svc: ReplicaHost, pending_for: float = 30.0) -> None:
        self.svc = svc
        self.pending_for = pending_for
        self._asked: dict[tuple[str, str], float] = {}  # (oid, peer) -> when
        self.repairs = 0

    async def repair_once(self) -> None:
        for oid, pin in list(self.svc.store.pins.items()):
            replicas = pin.get("replicas", 1)
            if isinstance(replicas, int) and replicas > 1:
                await self.repair_object(oid)

    def durable_holders(self, oid: str) -> list[str]:
        live = [p.peer_id for p in self.svc.providers.holders(oid) if p.durable]
        if oid in self.svc.store.pins and self.svc.me not in live:
            live.append(self.svc.me)
        return sorted(set(live))

    async def repair_object(self, oid: str) -> int:
        """Ask peers to replicate ``oid`` if it is below its factor and we lead; returns the
        number of requests sent."""
        svc = self.svc
        pin = svc.store.pins.get(oid)
        m = svc.store.manifest(oid)
        if pin is None or m is None:
            return 0
        want = int(pin.get("replicas", 1))
        durable = self.durable_holders(oid)
        if len(durable) >= want or durable[0] != svc.me:
            return 0
        now = time.monotonic()
        self._asked = {k: t for k, t in self._asked.items() if now - t < self.pending_for}
        waiting = {p for (o, p) in self._asked if o == oid}
        missing = want - len(durable) - len(waiting)
        if missing <= 0:
            return 0
        await svc.net.ensure(svc.node.connected_peer_ids())  # zones before choosing
        cached = {p.peer_id for p in svc.providers.holders(oid) if not p.durable}
        zones = {svc.net.zone_of(p) for p in durable}
        candidates = [
            p for p in svc.node.connected_peer_ids() if p not in durable and p not in waiting
        ]
        candidates.sort(
            key=lambda p: (
                svc.net.zone_of(p) in zones,
                p not in cached,
                svc.net.cost_ms(svc.me, m.size, dst=p),
                p,
            )
        )
        sent = 0
        for peer in candidates:
            if sent >= missing:
                break
            try:
                await svc.node.call(
                    peer, "storage.obj_replicate", {"id": oid, "replicas": want}, timeout=10
                )
            except RPCError as exc:
                log.info("replica request for %s to %s refused: %s", oid[:12], peer[:12], exc)
                continue
            self._asked[(oid, peer)] = now
            zones.add(svc.net.zone_of(peer))
            sent += 1
            self.repairs += 1
            log.info(
                "asked %s to replicate %s (%d of %d live)", peer[:12], oid[:12], len(durable), want
            )
        return sent
