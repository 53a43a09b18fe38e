"""Provider records: who holds which object, signed and expiring, in the DHT and among peers.

A holder of object ``id`` signs a ``prov`` record under ``prov:obj:<id>`` (see
:mod:`mesh.discovery.dht`) with body ``{"d": durable, "z": zone}`` (``durable``: it pinned the
object as a replica, as opposed to a cached copy) or ``{"gone": true}`` when it dropped the
object. It puts the record in the DHT when the node runs one, and sends it to its connected
peers (``obj_announce``; on a new link, ``obj_sync`` sends all of ours at once). Receivers
verify signatures and expiry with :func:`mesh.discovery.dht.parse_record`; a record is only a
hint, and the bytes are verified by hash anyway.

Bounds: a record that comes over a link must be the sender's own (we send only ours), so
a peer cannot relay records of minted keys; an object keeps at most ``MAX_HOLDERS`` holders
(a full list drops an expired or unlinked holder for a new one; linked holders stay); a key
is the holder of at most ``MAX_OBJECTS_PER_SIGNER`` objects, and ``MAX_OBJECTS_TRACKED``
objects are tracked in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from mesh.discovery.dht import MAX_RECORD, MeshDHT, Record, make_record, parse_record
from mesh.errors import EXPECTED, DiscoveryError, RPCError
from mesh.net.rpc import CallContext
from mesh.net.wire import check_depth

if TYPE_CHECKING:
    from mesh.net.context import PeerContext

    class ProviderContext(PeerContext, Protocol):
        """A peer context with the DHT, when this node runs one (records go there too)."""

        @property
        def dht(self) -> MeshDHT | None: ...


__all__ = ["Providers", "Provider", "PROVIDER_TTL"]

log = logging.getLogger(__name__)
PROVIDER_TTL = 600.0
MAX_SYNC = 256  # records in one obj_sync message
MAX_OBJECTS_TRACKED = 65536
MAX_HOLDERS = 64  # holders kept per object; a full list makes room by dropping unlinked ones
MAX_OBJECTS_PER_SIGNER = MAX_OBJECTS_TRACKED // 16  # objects one key may be a holder of here


@dataclass
class Provider:
    peer_id: str
    durable: bool
    zone: str
    expires: float


def object_key(oid: str) -> str:
    return f"prov:obj:{oid}"


class Providers:
    name = "providers"  # RPC namespace: peers call "providers.<method>"

    def status(self) -> dict[str, Any]:
        return {
            "objects": len(self.table),
            "announced": len(self._mine),
            "holders": sum(len(h) for h in self.table.values()),
            "most_holders": max((len(h) for h in self.table.values()), default=0),
            "refused": self.refused,
        }

    def __init__(self, node: ProviderContext, zone: str) -> None:
        self.node = node
        self.zone = zone
        self.table: dict[str, dict[str, Provider]] = {}
        self._mine: dict[str, bytes] = {}  # oid -> our current raw record
        self._synced: set[str] = set()  # peers that have our records
        self._signer_objects: dict[str, int] = {}  # peer id -> objects it is a holder of
        self.refused = 0  # records refused by the bounds (foreign over a link, full lists)

    # -- our records -----------------------------------------------------------------------
    async def announce(self, oid: str, durable: bool, gone: bool = False) -> None:
        body: dict[str, Any] = {"gone": True} if gone else {"d": durable, "z": self.zone}
        raw = make_record(self.node.identity, "prov", object_key(oid), body, PROVIDER_TTL)
        self.accept(raw)
        if gone:
            self._mine.pop(oid, None)
        else:
            self._mine[oid] = raw
        peers = self.node.connected_peer_ids()
        await asyncio.gather(*(self._send(p, raw) for p in peers))
        dht = self.node.dht
        if dht is not None:
            with contextlib.suppress(DiscoveryError, OSError, TimeoutError):
                await asyncio.wait_for(dht.put(raw), 5)

    async def _send(self, peer: str, raw: bytes) -> None:
        with contextlib.suppress(RPCError):
            await self.node.call(peer, "providers.obj_announce", {}, raw, timeout=5)

    async def sync_new_peers(self) -> None:
        """Send our records to peers that connected since the last call; refresh old ones."""
        peers = set(self.node.connected_peer_ids())
        new = peers - self._synced
        self._synced &= peers
        now = time.time()
        for oid, raw in list(self._mine.items()):
            with contextlib.suppress(DiscoveryError):
                if parse_record(raw).expires - now < PROVIDER_TTL / 3:
                    self._mine[oid] = raw = make_record(
                        self.node.identity,
                        "prov",
                        object_key(oid),
                        parse_record(raw).body,
                        PROVIDER_TTL,
                    )
                    new = peers  # everyone needs the refreshed records
        if not new or not self._mine:
            self._synced |= new
            return
        records = list(self._mine.values())
        for peer in new:
            for i in range(0, len(records), MAX_SYNC):
                payload = msgpack.packb(records[i : i + MAX_SYNC], use_bin_type=True)
                with contextlib.suppress(RPCError):
                    await self.node.call(peer, "providers.obj_sync", {}, payload, timeout=5)
            self._synced.add(peer)

    # -- others' records -------------------------------------------------------------------
    def accept(self, raw: bytes, sender: str | None = None) -> Record | None:
        """Keep a valid provider record; ``sender``: the linked peer it came from, which
        may only send its own."""
        try:
            rec = parse_record(raw)
        except DiscoveryError as exc:
            log.info("refused provider record: %s", exc)
            return None
        if not rec.key.startswith("prov:obj:"):
            return None
        if rec.peer_id in self.node.banned:  # a banned peer's records are ignored
            return None
        if sender is not None and rec.peer_id != sender:
            self.refused += 1  # a peer sends only its own records: no relaying minted keys
            return None
        oid = rec.key.removeprefix("prov:obj:")
        holders = self.table.get(oid)
        if rec.body.get("gone"):
            if holders is not None and rec.peer_id in holders:
                self._drop(oid, rec.peer_id)
            return rec
        if not self._room_for(oid, rec.peer_id):
            self.refused += 1
            return None
        holders = self.table.setdefault(oid, {})
        if rec.peer_id not in holders:
            self._signer_objects[rec.peer_id] = self._signer_objects.get(rec.peer_id, 0) + 1
        zone = rec.body.get("z")
        holders[rec.peer_id] = Provider(
            rec.peer_id,
            bool(rec.body.get("d")),
            zone if isinstance(zone, str) else "?",
            rec.expires,
        )
        return rec

    def _room_for(self, oid: str, peer_id: str) -> bool:
        """Whether a record of ``peer_id`` for ``oid`` fits, making room where it may."""
        holders = self.table.get(oid)
        if holders is None:
            if len(self.table) >= MAX_OBJECTS_TRACKED:
                return False
        elif peer_id in holders:
            return True
        mine = peer_id == self.node.me  # our own records are never refused
        if not mine and self._signer_objects.get(peer_id, 0) >= MAX_OBJECTS_PER_SIGNER:
            return False
        if holders is None or len(holders) < MAX_HOLDERS:
            return True
        now = time.time()
        linked = set(self.node.connected_peer_ids()) | {self.node.me}
        unlinked = [p for p in holders.values() if p.expires <= now or p.peer_id not in linked]
        if not unlinked:
            return mine  # every holder is a linked peer (or us): they stay, but we go in
        self._drop(oid, min(unlinked, key=lambda p: p.expires).peer_id)
        return True

    def _drop(self, oid: str, peer_id: str) -> None:
        holders = self.table.get(oid, {})
        if holders.pop(peer_id, None) is not None:
            left = self._signer_objects.get(peer_id, 1) - 1
            if left > 0:
                self._signer_objects[peer_id] = left
            else:
                self._signer_objects.pop(peer_id, None)
        if not holders:
            self.table.pop(oid, None)

    async def rpc_obj_announce(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        return {"ok": self.accept(payload, sender=ctx.peer_id) is not None}

    async def rpc_obj_sync(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        try:
            raws = msgpack.unpackb(
                payload,
                raw=False,
                max_bin_len=MAX_RECORD,
                max_array_len=MAX_SYNC,
                max_str_len=0,
                max_map_len=0,
                max_ext_len=0,
            )
        except Exception:
            raise DiscoveryError("malformed provider sync") from None
        check_depth(raws, DiscoveryError, "provider sync")
        if not isinstance(raws, list):
            raise DiscoveryError("provider sync must be a list")
        n = sum(1 for r in raws if isinstance(r, bytes) and self.accept(r, sender=ctx.peer_id))
        return {"accepted": n}

    def holders(self, oid: str, *, live_only: bool = True) -> list[Provider]:
        now = time.time()
        connected = set(self.node.connected_peer_ids()) | {self.node.me}
        banned = self.node.banned
        out = []
        for p in list(self.table.get(oid, {}).values()):
            if p.expires <= now or p.peer_id in banned:
                self._drop(oid, p.peer_id)
            elif not live_only or p.peer_id in connected:
                out.append(p)
        return out

    def forget_peer(self, peer_id: str) -> None:
        """Drop every record of ``peer_id`` (it was banned)."""
        for oid in [o for o, holders in self.table.items() if peer_id in holders]:
            self._drop(oid, peer_id)

    async def lookup_dht(self, oid: str) -> list[Provider]:
        dht = self.node.dht
        if dht is None:
            return []
        try:
            records = await asyncio.wait_for(dht.lookup(object_key(oid)), 10)
        except EXPECTED + (OSError, TimeoutError) as exc:
            log.info("DHT lookup of %s: %s", oid[:12], exc)
            return []
        for rec in records:
            self.accept(rec.raw)
        return self.holders(oid)
