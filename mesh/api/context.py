"""What the HTTP API needs from the node it serves, and nothing more.

The API sits below the node (the composition root) and sees it through this protocol, so the
routes name exactly the services they drive.
"""

from __future__ import annotations

from typing import Any, Protocol

from mesh.discovery.dht import MeshDHT
from mesh.inference.compute import ComputeService
from mesh.inference.coordinator import Coordinator
from mesh.jobs.llmjob import LlmJobService
from mesh.jobs.service import JobService
from mesh.net.peers import PeerTable
from mesh.net.rpc import Link
from mesh.storage.service import ObjectService

__all__ = ["ApiNode"]


class ApiNode(Protocol):
    @property
    def peers(self) -> PeerTable: ...

    @property
    def dht(self) -> MeshDHT | None: ...

    @property
    def compute(self) -> ComputeService: ...

    @property
    def coordinator(self) -> Coordinator: ...

    @property
    def objects(self) -> ObjectService: ...

    @property
    def jobs(self) -> JobService: ...

    @property
    def llm_jobs(self) -> LlmJobService: ...

    @property
    def max_message(self) -> int:
        """The largest message a link carries (the transport benchmark's cap)."""
        ...

    def link(self, peer_id: str) -> Link: ...

    def info(self) -> dict[str, Any]: ...

    async def mesh_view(self) -> dict[str, Any]:
        """Every member's summary and the links each reports (mesh/meshview.py)."""
        ...
