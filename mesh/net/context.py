"""What services above the network room may ask of the node: calls, links, identity.

Services are built with an object of this shape (the node implements it; unit tests pass
fakes), never with the node itself, so no service reaches into another through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from mesh.net.callers import MeshCaller
from mesh.net.identity import Identity
from mesh.net.peers import PeerTable
from mesh.net.rpc import Link

__all__ = ["PeerContext"]


class PeerContext(MeshCaller, Protocol):
    @property
    def identity(self) -> Identity: ...

    @property
    def peers(self) -> PeerTable:
        """Every peer this node knows, proven or hinted."""
        ...

    @property
    def banned(self) -> Mapping[str, str]:
        """Banned peer ids and why (read-only)."""
        ...

    def link(self, peer_id: str) -> Link:
        """The open link to ``peer_id``; raises PeerUnavailable without one."""
        ...
