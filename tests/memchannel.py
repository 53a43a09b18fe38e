"""An in-memory channel pair for RPC unit tests (the network tests use real aiortc)."""

from __future__ import annotations

import asyncio

from mesh.net.rpc import Link


class MemChannel:
    """Delivers on the next loop iteration; ``bufferedAmount`` counts undelivered bytes.
    ``paused`` holds delivery back, to exercise backpressure."""

    def __init__(self) -> None:
        self.peer: MemChannel | None = None
        self.link: Link | None = None
        self.bufferedAmount = 0
        self.queue: list[bytes] = []
        self.paused = False
        self.sent_frames = 0
        self.burst: int | None = None  # set to cut messages as on a long path
        self.uncopied = 0  # frames sent with copy=False (bulk)
        self.sizes: list[int] = []  # of every frame sent

    def send(self, data: bytes, copy: bool = True) -> None:
        self.uncopied += not copy
        self.sizes.append(len(data))
        self.bufferedAmount += len(data)
        self.queue.append(bytes(data))
        self.sent_frames += 1
        if not self.paused:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        while self.queue and not self.paused:
            data = self.queue.pop(0)
            self.bufferedAmount -= len(data)
            if self.peer is not None and self.peer.link is not None:
                self.peer.link.feed(data)
        if self.link is not None and self.bufferedAmount <= self.link.params.low_water:
            self.link.buffer_low()


def pair() -> tuple[MemChannel, MemChannel]:
    a, b = MemChannel(), MemChannel()
    a.peer, b.peer = b, a
    return a, b


async def until(predicate, timeout: float = 5.0) -> None:
    """Poll a condition with a deadline (tests never sleep to synchronize)."""
    from mesh.launch.localmesh import wait_for

    await wait_for(predicate, timeout, "condition", interval=0.005)
