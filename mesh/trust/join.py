"""Redeeming an invite: one HTTP exchange with the owner's node (``POST /edgemesh/join`` on
its signaling server).

The joiner sends ``[1, invite id, its public key, time, nonce, invite sig, identity sig]``:
both signatures cover ``[invite id, mesh id, public key, time, nonce]``, the first with the
invite's secret key (it holds the invite), the second with its identity key (it holds the key
the certificate will name). The owner's node checks the time window, looks the invite up,
verifies both, spends a use and answers ``{cert, owner, open}``. The joiner checks that the
certificate is the owner's (the invite named the owner key) and names it.

Replaying a captured request gets the same peer the same kind of certificate, which only that
peer's key can use; the request is bound to the mesh, so an invite of one mesh cannot be
turned into a certificate of another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from mesh.errors import IdentityError, InviteError, NotAMember
from mesh.net.identity import Identity, peer_id_from_key, verify
from mesh.net.wire import check_depth
from mesh.trust.cert import CLOCK_SKEW, MemberCert, issue_cert, verify_cert
from mesh.trust.invite import Invite, InviteStore
from mesh.trust.keys import Anchor, OwnerKey, mesh_id_bytes

__all__ = ["Redeemer", "join_request", "redeem_invite", "JOIN_PATH", "DEFAULT_CERT_TTL"]

log = logging.getLogger(__name__)
JOIN_PATH = "/edgemesh/join"
MAX_JOIN_REQUEST = 512
MAX_JOIN_REPLY = 1024
DEFAULT_CERT_TTL = 365 * 86400.0
_CONTEXT = b"edgemesh/join/v1\x00"


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _transcript(invite_id: bytes, mesh_id: str, public_key: bytes, ts: int, nonce: bytes) -> bytes:
    return _CONTEXT + _pack([invite_id, mesh_id_bytes(mesh_id), public_key, ts, nonce])


def join_request(invite: Invite, identity: Identity, now: float | None = None) -> bytes:
    ts, nonce = int(time.time() if now is None else now), os.urandom(16)
    msg = _transcript(invite.invite_id, invite.mesh_id, identity.public_key, ts, nonce)
    sig_invite = bytes(invite.key.sign(msg).signature)
    return _pack(
        [1, invite.invite_id, identity.public_key, ts, nonce, sig_invite, identity.sign(msg)]
    )


class Redeemer:
    """The owner's side: turns a valid join request into a certificate."""

    def __init__(
        self,
        owner: OwnerKey,
        anchor: Anchor,
        store: InviteStore,
        *,
        cert_ttl: float = DEFAULT_CERT_TTL,
    ) -> None:
        if anchor.owner_key != owner.public_key:
            raise IdentityError("the mesh anchor does not name this owner key")
        self.owner = owner
        self.anchor = anchor
        self.store = store
        self.cert_ttl = cert_ttl
        self.refused: Counter[str] = Counter()
        self.issued = 0

    def redeem(self, body: bytes, now: float | None = None) -> bytes:
        """Blocking (file lock): call from a thread. Raises InviteError, counted."""
        try:
            reply = self._redeem(body, time.time() if now is None else now)
        except InviteError as exc:
            self.refused[str(exc).split(":")[0]] += 1
            raise
        self.issued += 1
        return reply

    def _redeem(self, body: bytes, now: float) -> bytes:
        if len(body) > MAX_JOIN_REQUEST:
            raise InviteError("join request too large")
        try:
            items = msgpack.unpackb(
                body,
                raw=False,
                max_str_len=0,
                max_bin_len=64,
                max_array_len=8,
                max_map_len=0,
                max_ext_len=0,
            )
        except Exception:  # msgpack raises several unrelated types on bad input
            raise InviteError("malformed join request") from None
        check_depth(items, InviteError, "join request")
        if not isinstance(items, list) or len(items) != 7 or items[0] != 1:
            raise InviteError("malformed join request")
        _, iid, pk, ts, nonce, sig_invite, sig_peer = items
        if not all(isinstance(x, bytes) for x in (iid, pk, nonce, sig_invite, sig_peer)):
            raise InviteError("malformed join request")
        if type(ts) is not int or abs(now - ts) > CLOCK_SKEW:
            raise InviteError("stale join request: check this machine's clock")
        try:
            peer_id = peer_id_from_key(pk)
            msg = _transcript(iid, self.anchor.mesh_id, pk, ts, nonce)
            invite_key = self.store.invite_key(iid)
            try:
                verify(invite_key, msg, sig_invite)
            except IdentityError:
                raise InviteError(
                    "forged: the request does not prove the invite's secret"
                ) from None
            verify(pk, msg, sig_peer)
        except IdentityError as exc:
            raise InviteError(f"forged: {exc}") from None
        self.store.consume(iid, peer_id, now)
        cert = issue_cert(self.owner, self.anchor.mesh_id, peer_id, ttl=self.cert_ttl, now=now)
        log.info("invite %s redeemed by %s", iid.hex()[:8], peer_id[:12])
        return _pack({"cert": cert.raw, "owner": self.anchor.owner_key, "open": self.anchor.open})

    def routes(self) -> list[web.RouteDef]:
        """The route to add to the owner node's signaling server."""
        return [web.post(JOIN_PATH, self._handle)]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.content.read(MAX_JOIN_REQUEST + 1)
        try:
            reply = await asyncio.to_thread(self.redeem, body)
        except InviteError as exc:
            log.warning("refused a join from %s: %s", request.remote, exc)
            return web.Response(status=403, text=str(exc))
        return web.Response(body=reply, content_type="application/msgpack")


def _parse_reply(data: bytes, invite: Invite, identity: Identity) -> tuple[Anchor, MemberCert]:
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=16,
            max_bin_len=256,
            max_array_len=0,
            max_map_len=4,
            max_ext_len=0,
        )
    except Exception:  # msgpack raises several unrelated types on bad input
        raise InviteError("the owner's node sent a malformed reply") from None
    check_depth(obj, InviteError, "the owner's node's reply")
    if not isinstance(obj, dict) or obj.get("owner") != invite.owner_key:
        raise InviteError("the reply does not come from the invite's mesh owner")
    anchor = Anchor(invite.owner_key, obj.get("open") is True)
    cert = obj.get("cert")
    try:
        member = verify_cert(
            cert if isinstance(cert, bytes) else b"",
            anchor.owner_key,
            anchor.mesh_id,
            identity.peer_id,
        )
    except NotAMember as exc:
        raise InviteError(f"the owner's node sent an unusable certificate: {exc}") from None
    return anchor, member


async def redeem_invite(
    invite: Invite, identity: Identity, *, timeout: float = 15.0
) -> tuple[Anchor, MemberCert]:
    """Redeem at the first of the invite's addresses that answers."""
    errors = []
    body = join_request(invite, identity)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        for address in invite.addresses:
            try:
                async with http.post(
                    f"http://{address}{JOIN_PATH}",
                    data=body,
                    headers={"Content-Type": "application/msgpack"},
                ) as resp:
                    data = await resp.content.read(MAX_JOIN_REPLY + 1)
                    if resp.status != 200:
                        text = data[:300].decode("utf-8", "replace")
                        raise InviteError(f"{address} refused the invite: {text}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"cannot reach {address}: {exc or type(exc).__name__}")
                continue
            if len(data) > MAX_JOIN_REPLY:
                raise InviteError("the owner's node sent an oversized reply")
            return _parse_reply(data, invite, identity)
    raise InviteError("; ".join(errors) or "the invite names no address")
