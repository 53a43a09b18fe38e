"""The compute service every node runs: models it stores, shards it loads, stage sessions.

Its concerns live in layers, each a class extending the one below in a module of its own:

- :mod:`mesh.inference.models`: the registry of model names and manifests (store objects)
- :mod:`mesh.inference.shards`: pulling a stage's shards through the object service, within
  the disk limit
- :mod:`mesh.inference.memory`: loaded shards under the memory limit
- :mod:`mesh.inference.stages`: stage sessions (``stage_open``, ``stage_push``,
  ``stage_forward``, ``stage_close``, ``capacity``)
- :mod:`mesh.inference.recompute`: spot checks (``stage_audit``, ``stage_recompute``)

The node serves the ``rpc_*`` methods of :class:`ComputeService`, which is the top layer.
"""

from __future__ import annotations

from typing import Any

from mesh.inference.models import (
    CapacityError,
    ComputeConfig,
    LocalObjects,
    ShardObjects,
    StageUnavailable,
    models_of,
)
from mesh.inference.recompute import AuditedStages
from mesh.inference.stages import MAX_SESSION_TOKENS, MAX_STEP_ROWS, PREFILL_CHUNK

__all__ = [
    "ComputeConfig",
    "ComputeService",
    "CapacityError",
    "StageUnavailable",
    "ShardObjects",
    "LocalObjects",
    "models_of",
    "MAX_SESSION_TOKENS",
    "MAX_STEP_ROWS",
    "PREFILL_CHUNK",
]

MAX_LISTED = 64  # stage sessions listed in the status


class ComputeService(AuditedStages):
    """Models, shards, memory, stage sessions and their audits, as one RPC service."""

    name = "compute"  # RPC namespace: peers call "compute.<method>"

    def status(self) -> dict[str, Any]:
        """Memory, sessions, loaded shards and models (``compute`` in ``/v1/info``)."""
        named = {mid: name for name, mid in sorted(self.names.items())}
        return {
            "runtime": self.config.runtime,
            "memory_limit": self.config.memory_limit,
            "memory_used": self.memory_used(),
            "sessions": len(self.sessions),
            "shards": [
                {
                    "model_id": k[0],
                    "model": named.get(k[0], ""),
                    "units": [k[1], k[2]],
                    "runtime": k[3],
                    "sessions": v.sessions,
                    # continuous batching: engine calls run and the steps they held
                    "batching": v.shard.batching,
                }
                for k, v in self.loaded.items()
            ],
            "models": sorted(self.names),
            # The stage sessions running here and the rows they ran lately (the page's view).
            "running": [
                {
                    "model_id": st.key[0],
                    "model": named.get(st.key[0], ""),
                    "units": [st.key[1], st.key[2]],
                    "owner": st.owner,
                }
                for st in list(self.sessions.values())[:MAX_LISTED]
            ],
            "tokens_per_s": self.throughput.per_s(),
            "rate_history": self.throughput.history(),  # rows in each of the last 60 s
        }
