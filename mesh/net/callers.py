"""Who calls peers: the protocols services are given instead of a whole node (hivemind's
factory style: a service gets only what it uses; tests pass fakes)."""

from __future__ import annotations

from typing import Any, Protocol

from mesh.net.rpc import Reply

__all__ = ["Caller", "MeshCaller"]


class Caller(Protocol):
    """Something that calls a peer's RPC by peer id (a Node; tests pass fakes)."""

    async def call(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Reply: ...


class MeshCaller(Caller, Protocol):
    """A Caller that also knows itself and its links, and can send one-way calls."""

    me: str

    def connected_peer_ids(self) -> list[str]: ...

    async def notify(
        self,
        peer_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> None: ...

    def sign(self, message: bytes) -> bytes:
        """This node's Ed25519 signature over ``message``."""
        ...

    def peer_key(self, peer_id: str) -> bytes:
        """The public key a linked peer proved in its handshake (ours for ``me``); raises
        :class:`PeerUnavailable` without a link."""
        ...

    def ban(self, peer_id: str, reason: str) -> None:
        """Stop trusting ``peer_id``: drop its link, refuse it, ignore its records."""
        ...
