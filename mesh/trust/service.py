"""The trust service on every member: revocations spread, and revoked peers are dropped.

A revocation reaches a node three ways: ``edgemesh mesh revoke`` writes it to the owner's
``revocations.json`` (the owner's node notices within ``poll`` seconds), a linked peer sends it
(``trust.revocations``), or a newly linked peer hands over everything it knows (so a member
that was offline catches up). Each new, owner-signed revocation is persisted, the revoked
peer is banned (its link closed at once), and it is forwarded to every linked peer but the
sender; records already known stop there, so the flood ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgpack

from mesh.errors import EXPECTED, NotAMember, WireError
from mesh.net.context import PeerContext
from mesh.net.rpc import CallContext, Handler
from mesh.net.wire import check_depth
from mesh.trust.cert import MAX_REVOCATION, Revocation
from mesh.trust.policy import MAX_REVOCATIONS, MembershipPolicy

__all__ = ["TrustService", "members_only", "MEMBERS_ONLY"]

log = logging.getLogger(__name__)
MAX_BATCH = 1024  # revocations in one message
_MAX_PAYLOAD = MAX_BATCH * (MAX_REVOCATION + 3) + 8


def _encode(items: list[bytes]) -> bytes:
    return bytes(msgpack.packb(items[:MAX_BATCH], use_bin_type=True))


def _decode(payload: bytes) -> list[bytes]:
    if len(payload) > _MAX_PAYLOAD:
        raise WireError(f"revocations payload of {len(payload)} bytes")
    try:
        items = msgpack.unpackb(
            payload,
            raw=False,
            max_bin_len=MAX_REVOCATION,
            max_str_len=0,
            max_array_len=MAX_BATCH,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception:  # msgpack raises several unrelated types on bad input
        raise WireError("malformed revocations payload") from None
    check_depth(items, WireError, "revocations payload")
    if not isinstance(items, list):
        raise WireError("revocations payload is not a list")
    return [x for x in items if isinstance(x, bytes)]


class TrustService:
    name = "trust"  # RPC namespace: peers call "trust.<method>"

    def __init__(self, ctx: PeerContext, policy: MembershipPolicy, *, poll: float = 1.0) -> None:
        self._ctx = ctx
        self.policy = policy
        self.poll = poll
        self._synced: set[str] = set()  # linked peers that got our revocations
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._sends):
            task.cancel()

    def status(self) -> dict[str, Any]:
        """This node's membership, for /v1/info (the refusal counters are in ``counters``)."""
        policy = self.policy
        own = policy.own_cert
        return {
            "mesh_id": policy.mesh_id or None,
            "open": policy.open,
            "member": own is not None,
            "expires": own.expires if own else None,
            "revoked": len(policy.revocations or ()),
        }

    async def rpc_revocations(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        new = self.apply(_decode(payload), sender=ctx.peer_id)
        return {"new": len(new)}

    def apply(self, items: list[bytes], sender: str | None = None) -> list[Revocation]:
        """Keep, enforce and forward the new owner-signed revocations among ``items``."""
        store = self.policy.revocations
        if store is None or not items:
            return []
        new = store.add_raw(items[:MAX_REVOCATIONS])
        if not new:
            return []
        try:
            store.save()
        except OSError as exc:
            log.warning("cannot persist revocations: %s", exc)
        for rev in new:
            log.warning("peer %s revoked by the mesh owner", rev.peer_id[:12])
            self._ctx.ban(rev.peer_id, "revoked by the mesh owner")
        self._forward([r.raw for r in new], exclude=sender)
        return new

    def _forward(self, items: list[bytes], exclude: str | None = None) -> None:
        for pid in self._ctx.connected_peer_ids():
            if pid != exclude:
                self._send(pid, items)

    def _send(self, peer_id: str, items: list[bytes]) -> None:
        async def send() -> None:
            try:
                await self._ctx.notify(peer_id, "trust.revocations", {}, _encode(items))
            except EXPECTED as exc:
                log.info("revocations to %s not delivered: %s", peer_id[:12], exc)

        task = asyncio.get_running_loop().create_task(send())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def tick(self, new: list[Revocation] | None = None) -> None:
        """Enforce revocations the CLI wrote (``new``, from :meth:`Revocations.reload`);
        hand ours to newly linked peers."""
        store = self.policy.revocations
        if store is None:
            return
        if new:
            self._synced.clear()  # everyone gets the new ones below
            for rev in new:
                log.warning("peer %s revoked by the mesh owner", rev.peer_id[:12])
                self._ctx.ban(rev.peer_id, "revoked by the mesh owner")
        linked = set(self._ctx.connected_peer_ids())
        self._synced &= linked  # a peer that reconnects is synced again
        if len(store):
            for pid in linked - self._synced:
                self._send(pid, store.raw())
        self._synced |= linked

    async def _run(self) -> None:
        store = self.policy.revocations
        while True:
            try:
                # A stat a round, a read when the file changed: off the loop all the same.
                new = await asyncio.to_thread(store.reload) if store is not None else []
                self.tick(new)
            except Exception:  # the watcher must outlive one bad round
                log.exception("trust service round failed")
            await asyncio.sleep(self.poll)  # the period of the file watch and peer sync


# What a stranger of an open mesh may not ask for: running its batch jobs, storing its
# replicas, what this node runs and for whom (the topology page's node.info). (In a private
# mesh every linked peer is a member, so nothing changes there.)
MEMBERS_ONLY = ("jobs.job_task", "llmjobs.llm_task", "storage.obj_replicate", "node.info")


def members_only(policy: MembershipPolicy, handlers: dict[str, Handler]) -> None:
    """Wrap the :data:`MEMBERS_ONLY` handlers so a stranger's call is refused (NotAMember)."""
    for name in MEMBERS_ONLY:
        inner = handlers.get(name)
        if inner is not None:
            handlers[name] = _guarded(policy, name, inner)


def _guarded(policy: MembershipPolicy, name: str, inner: Handler) -> Handler:
    async def handler(ctx: CallContext, params: dict[str, Any], payload: bytes) -> Any:
        if ctx.link is not None and not policy.is_member(ctx.peer_id):
            policy.refused["stranger_call"] += 1
            raise NotAMember("stranger", f"{name} is for members of this mesh only")
        return await inner(ctx, params, payload)

    return handler
