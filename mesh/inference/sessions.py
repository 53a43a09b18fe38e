"""The open route of one generation: a stage session per stage, opened last stage first so
each knows where to push, and closed together (a dead stage has nothing left to free)."""

from __future__ import annotations

import os

from mesh.errors import RPCError
from mesh.inference.host import SessionHost
from mesh.inference.routes import Stage

__all__ = ["RouteSessions"]


class RouteSessions:
    """The route's stages and their session ids. ``max_tokens``: the prompt and the output,
    which each stage reserves KV cache for (capped at its context)."""

    def __init__(self, host: SessionHost, mid: str, max_tokens: int, audit: bool) -> None:
        self.host = host
        self.mid = mid
        self.max_tokens = max_tokens
        self.audit = audit  # stages keep their signed inputs for spot checks
        self.stages: list[Stage] = []
        self.sids: list[str] = []
        self.warm = 0  # steps since the route was (re)opened
        self.bytes_pulled = 0  # shard bytes the stages pulled to open
        self.last_opened = ""  # the stage asked last: the one to blame if opening failed

    async def open(self, stages: list[Stage]) -> None:
        """Open sessions on ``stages``; on any failure those already opened are closed."""
        self.stages = list(stages)
        # Independent random ids: a stage cannot derive the other stages' sessions.
        self.sids = [os.urandom(12).hex() for _ in self.stages]
        self.warm = 0
        try:
            await self._open_stages()
        except BaseException:
            await self.close()  # the stages already opened must not wait for their TTL
            raise

    async def _open_stages(self) -> None:
        mesh = self.host.mesh
        for i in reversed(range(len(self.stages))):
            st = self.stages[i]
            nxt = self.stages[i + 1].peer_id if i + 1 < len(self.stages) else None
            params = {
                "sid": self.sids[i],
                "model_id": self.mid,
                "units": list(st.units),
                "runtime": st.runtime,
                "next": nxt,
                "next_sid": self.sids[i + 1] if nxt else None,
                "prev": self.stages[i - 1].peer_id if i > 0 else None,
                "max_tokens": self.max_tokens,
                "source": mesh.me if self.host.holds_manifest(self.mid) else None,
                "audit": self.audit,
            }
            self.last_opened = st.peer_id
            reply = await mesh.call(st.peer_id, "compute.stage_open", params, timeout=600)
            self.bytes_pulled += int(reply.result.get("pulled", 0))

    async def close(self) -> None:
        for st, sid in zip(self.stages, self.sids, strict=False):
            try:
                await self.host.mesh.call(
                    st.peer_id, "compute.stage_close", {"sid": sid}, timeout=5
                )
            except RPCError:
                pass  # a dead stage has nothing left to free
