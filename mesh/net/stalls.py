"""Telling a stalled link from a slow one: what a lost packet does to a reliable, ordered
channel is hold everything behind it until the retransmission, so one ping comes back far
slower than the link's fastest. :class:`StallWatch` decides which slow pings were stalls.

A slow ping is not a stall when something else explains it: a bulk transfer moved or queued
meanwhile (it was behind the bytes, not lost), or either end's event loop woke late (a busy
loop reads a ping or a pong late whatever the network did). The second is decided at the next
pong, which carries the peer's worst recent lateness.

"The link's fastest" is the fastest ping of a sliding window, not of the link's life: after a
move to a slower path for good (a laptop from its LAN to a far relay) every ping would
otherwise be a stall, and copies would stay on as long as the link lives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["LATE", "RttFloor", "StallWatch"]

LATE = 0.05  # seconds: a keepalive woken this late means a busy event loop
_LAG_SPAN = 3.0  # seconds of keepalive wake-ups the reported lateness covers


class RttFloor:
    """The smallest sample added in the last ``window`` seconds."""

    def __init__(self, window: float, cap: int = 1024) -> None:
        if window <= 0 or cap < 1:
            raise ValueError("the window and the cap must be positive")
        self._window = window
        # (at, sample), samples strictly increasing from left to right: a sample behind a
        # smaller, newer one can never be the minimum again. The pings are ours, one per
        # interval, so the window holds a bounded count; the cap bounds it whatever happens.
        self._q: deque[tuple[float, float]] = deque(maxlen=cap)

    def add(self, at: float, sample: float) -> None:
        q = self._q
        while q and q[-1][1] >= sample:
            q.pop()
        q.append((at, sample))
        while q[0][0] < at - self._window:
            q.popleft()

    @property
    def value(self) -> float | None:
        return self._q[0][1] if self._q else None

    def __len__(self) -> int:
        return len(self._q)


class StallWatch:
    """One link's pings: a ping >= ``stall_ms`` and >= ``factor`` x the window's fastest,
    quiet meanwhile, and with neither loop late, is a stall (``on_stall(sample_ms)``)."""

    def __init__(
        self, stall_ms: float, factor: float, window: float, path_window: float = 10.0
    ) -> None:
        self._stall_ms = stall_ms
        self._factor = factor
        self.floor = RttFloor(window)
        # The fastest quiet ping of the last seconds: the path as it is now (not a path the
        # link left a minute ago, nor the queue behind a bulk transfer).
        self.path = RttFloor(path_window)
        self._slow: tuple[float, float] | None = None  # (RTT ms, sent at) of a slow ping
        self._lagged_at = -1.0  # when our keepalive last woke late (a busy event loop)
        self._wakes: deque[tuple[float, float]] = deque(maxlen=4)  # (when, s late)
        self.stalls = 0
        # Called with the sample (ms) of each stall.
        self.on_stall: Callable[[float], None] | None = None

    def woke(self, at: float, late: float) -> None:
        """Our keepalive woke at ``at``, ``late`` seconds after it asked to."""
        self._wakes.append((at, late))
        if late > LATE:
            self._lagged_at = at

    def recent_lag_ms(self, now: float) -> int:
        """How late (ms) our keepalive woke at worst in the last seconds: the peer reads it
        from our pongs, to tell its stalls from our busy spells."""
        lags = (late for at, late in self._wakes if now - at < _LAG_SPAN)
        return round(max(lags, default=0.0) * 1000)

    def pong(self, at: float, sample: float, quiet: bool, peer_lag_ms: int) -> None:
        """The pong of a ping sent at ``at`` took ``sample`` ms; ``quiet``: nothing else moved
        meanwhile. It settles the slow ping before it, and may be slow itself."""
        self._confirm(at, peer_lag_ms)
        low = self.floor.value
        if quiet and low is not None and sample >= max(self._stall_ms, self._factor * low):
            self._slow = (sample, at)  # confirmed unless a loop was late meanwhile
        self.floor.add(at, sample)
        if quiet:
            self.path.add(at, sample)

    def _confirm(self, later: float, peer_lag_ms: int) -> None:
        slow = self._slow
        if slow is None or later <= slow[1]:
            return
        self._slow = None
        if self._lagged_at >= slow[1] or peer_lag_ms > LATE * 1000:
            return
        self.stalls += 1
        if self.on_stall is not None:
            self.on_stall(slow[0])
