"""Steps that arrive before their session is open.

A route's first step goes out with its opens (:meth:`mesh.inference.failover.Failover.open`),
so a generation's first token pays no round trip for them. A stage therefore may get a step
whose session is still opening (pulling or loading its shard), or, when the step came by a
faster path than the coordinator's open, not yet asked for at all. It holds such a step
until the open is done, or for ``wait_s`` when no open has arrived; then the step goes on
and fails as any step of an unknown session does. The waiting steps are bounded, in all and
per sending peer: each holds its payload meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal

__all__ = ["EarlySteps", "EARLY_WAIT_S", "MAX_EARLY", "MAX_EARLY_PER_PEER"]

log = logging.getLogger(__name__)

EARLY_WAIT_S = 2.0  # for an open not yet arrived: it was sent with the step, so it is close
MAX_EARLY = 64  # steps waiting for their sessions, from all peers (a stage's sessions)
MAX_EARLY_PER_PEER = 16  # from one peer (the sessions one peer may hold on a stage)

State = Literal["open", "opening", "unknown"]


class EarlySteps:
    """Steps held until their session's open is done (see the module's docstring)."""

    def __init__(
        self,
        wait_s: float = EARLY_WAIT_S,
        max_waiting: int = MAX_EARLY,
        per_peer: int = MAX_EARLY_PER_PEER,
    ) -> None:
        if wait_s < 0 or max_waiting < 0 or per_peer < 0:
            raise ValueError("EarlySteps bounds must not be negative")
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self.per_peer = per_peer
        self._events: dict[str, asyncio.Event] = {}  # session id -> set when its open ends
        self._count: dict[str, int] = {}  # steps waiting on each session id
        self._by_peer: dict[str, int] = {}  # steps waiting, by the peer that sent them
        self.held = 0  # steps that waited and then found their session open
        self.refused = 0  # steps not held: the bounds were reached

    @property
    def waiting(self) -> int:
        return sum(self._by_peer.values())

    def ended(self, sid: str) -> None:
        """The open of ``sid`` ended (opened or failed): the steps waiting on it go on."""
        event = self._events.get(sid)
        if event is not None:
            event.set()

    async def until_open(self, sid: str, sender: str, state: Callable[[], State]) -> None:
        """Return once ``sid``'s session is open, its open failed, no open came within
        ``wait_s``, or at once when the bounds are reached. ``state`` reads the session's."""
        if state() == "open":
            return
        if self.waiting >= self.max_waiting or self._by_peer.get(sender, 0) >= self.per_peer:
            self.refused += 1
            log.info("a step of unopened session %s from %s not held", sid[:8], sender[:12])
            return
        event = self._events.setdefault(sid, asyncio.Event())
        self._count[sid] = self._count.get(sid, 0) + 1
        self._by_peer[sender] = self._by_peer.get(sender, 0) + 1
        try:
            if state() == "unknown":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), self.wait_s)
            if not event.is_set() and state() == "opening":
                await event.wait()  # as long as the open takes: its pulls have their deadlines
            self.held += state() == "open"
        finally:
            self._release(sid, sender)

    def _release(self, sid: str, sender: str) -> None:
        left = self._count[sid] - 1
        if left:
            self._count[sid] = left
        else:
            del self._count[sid], self._events[sid]
        mine = self._by_peer[sender] - 1
        if mine:
            self._by_peer[sender] = mine
        else:
            del self._by_peer[sender]
