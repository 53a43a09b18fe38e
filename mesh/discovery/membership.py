"""Mesh membership through the DHT: publish our records, find the other members.

Each member keeps two signed records alive: its peer record under ``peer:<id>`` (how to reach
it: signaling endpoints, mesh name, node name, a hardware summary) and a provider record under
``prov:mesh:<mesh>`` (that it is a member). Finding members is a lookup of the latter, then of
each member's peer record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from mesh.discovery.dht import MeshDHT, Record, make_record
from mesh.errors import DiscoveryError
from mesh.net.identity import Identity

__all__ = ["DhtMembership"]

log = logging.getLogger(__name__)
MAX_ADDRS = 8


def record_addresses(rec: Record) -> list[str]:
    addrs = rec.body.get("addrs")
    if not isinstance(addrs, list):
        return []
    return [a for a in addrs[:MAX_ADDRS] if isinstance(a, str) and len(a) < 64]


class DhtMembership:
    def __init__(
        self,
        identity: Identity,
        dht: MeshDHT,
        mesh: str,
        *,
        peer_body: Callable[[], dict[str, Any]],
        on_member: Callable[[Record], None],
        on_gone: Callable[[str], None],
        ttl: float = 600.0,
        poll_fast: float = 1.0,
        poll_slow: float = 10.0,
    ) -> None:
        self.identity = identity
        self.dht = dht
        self.mesh = mesh
        self.peer_body = peer_body
        self.on_member = on_member
        self.on_gone = on_gone
        self.ttl = ttl
        self.poll_fast = poll_fast
        self.poll_slow = poll_slow
        self.members: dict[str, float] = {}  # peer id -> record expiry
        self._task: asyncio.Task[None] | None = None

    @property
    def mesh_key(self) -> str:
        return f"prov:mesh:{self.mesh}"

    async def publish(self) -> None:
        me = self.identity
        await self.dht.put(
            make_record(me, "peer", f"peer:{me.peer_id}", self.peer_body(), self.ttl)
        )
        await self.dht.put(make_record(me, "prov", self.mesh_key, {}, self.ttl))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop polling and tell the mesh we left (a newer record saying so), briefly."""
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(DiscoveryError, OSError, TimeoutError):
            left = make_record(self.identity, "prov", self.mesh_key, {"left": True}, 60.0)
            await asyncio.wait_for(self.dht.put(left), 1.0)

    async def _run(self) -> None:
        last_publish = 0.0
        loop = asyncio.get_running_loop()
        quiet_rounds = 0
        while True:
            try:
                if loop.time() - last_publish > self.ttl / 3:
                    await self.publish()
                    last_publish = loop.time()
                found = await self.poll()
                quiet_rounds = 0 if found else quiet_rounds + 1
            except (DiscoveryError, OSError) as exc:
                log.warning("DHT membership: %s", exc)
            # Poll fast while the mesh is forming, slowly once it is quiet.
            await asyncio.sleep(self.poll_fast if quiet_rounds < 10 else self.poll_slow)

    async def poll(self) -> int:
        """Look up the members; report new ones and those whose records lapsed."""
        new = 0
        seen: set[str] = set()
        for prov in await self.dht.lookup(self.mesh_key):
            pid = prov.peer_id
            if pid == self.identity.peer_id or prov.body.get("left"):
                continue
            rec = await self.dht.peer_record(pid)
            if rec is None or rec.body.get("mesh") != self.mesh:
                continue
            seen.add(pid)
            if pid not in self.members:
                new += 1
            self.members[pid] = rec.expires
            self.on_member(rec)
        for pid in list(self.members):
            if pid not in seen:
                del self.members[pid]
                self.on_gone(pid)
        return new
