"""A generation's timings: every step's wall time, split into compute (the stages' own trace)
and hops, the decode rate, and the summary the client gets at the end."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mesh.net.rpc import Reply

__all__ = ["RunStats", "Rate"]


class Rate:
    """Events per second over the last ``window`` seconds, and per second over the last
    ``keep`` seconds (a stage's rows, a generation's tokens: the page's plot)."""

    def __init__(self, window: float = 5.0, keep: int = 60, cap: int = 8192) -> None:
        self.window = window
        self.keep = keep
        self._events: deque[tuple[float, int]] = deque(maxlen=cap)

    def add(self, n: int, now: float | None = None) -> None:
        self._events.append((time.monotonic() if now is None else now, n))

    def _drop(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.keep - 1:
            self._events.popleft()

    def per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._drop(now)
        recent = sum(n for t, n in self._events if t >= now - self.window)
        return round(recent / self.window, 2)

    def history(self, now: float | None = None) -> list[int]:
        """Events in each of the last ``keep`` whole seconds, oldest first."""
        now = time.monotonic() if now is None else now
        self._drop(now)
        end = math.floor(now)
        out = [0] * self.keep
        for t, n in self._events:
            i = self.keep - (end - math.floor(t))
            if 0 <= i < self.keep:
                out[i] += n
        return out


@dataclass
class RunStats:
    t_start: float = field(default_factory=time.perf_counter)
    step_ms: list[float] = field(default_factory=list)  # prompt chunks, decode steps, replays
    decode_ms: list[float] = field(default_factory=list)  # one-token steps of the generation
    hop_ms: list[float] = field(default_factory=list)
    compute_ms: dict[str, list[float]] = field(default_factory=dict)  # by stage peer
    ttft: float | None = None
    rate: Rate = field(default_factory=Rate)  # decode steps, for the page's plot
    extra_tokens: int = 0  # decode steps' tokens beyond one each (accepted drafts)
    # ms from the start at which each phase before the first token ended (where TTFT goes)
    phases: dict[str, float] = field(default_factory=dict)

    def account(self, reply: Reply, ms: float, stages: int, decode: bool) -> None:
        """One step that took ``ms`` over ``stages`` stages; ``decode``: a step of the
        generation itself (no prompt chunk, no replay), which the decode rate counts."""
        if decode:
            self.decode_ms.append(ms)
            self.rate.add(1)
        trace = reply.result.get("trace", [])
        compute = 0.0
        for t in trace if isinstance(trace, list) else []:
            if isinstance(t, dict) and isinstance(t.get("ms"), float | int):
                compute += float(t["ms"])
                self.compute_ms.setdefault(str(t.get("peer")), []).append(float(t["ms"]))
        self.step_ms.append(ms)
        # hops: coordinator -> first, between stages, last -> coordinator
        self.hop_ms.append(max(ms - compute, 0.0) / stages)

    def add_tokens(self, n: int) -> None:
        """The last decode step gave ``n`` tokens more than one (a verify step's drafts)."""
        self.extra_tokens += n
        self.rate.add(n)

    def mark(self, phase: str) -> None:
        """``phase`` ended now (the first time only: a failover's re-open is not TTFT's)."""
        self.phases.setdefault(phase, round((time.perf_counter() - self.t_start) * 1000, 2))

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = (time.perf_counter() - self.t_start) * 1000

    def median_step_ms(self) -> float:
        """Of the last 64 steps: the step deadline follows the route as it is now, and a
        long generation does not sort all its steps again for every token."""
        return float(statistics.median(self.step_ms[-64:])) if self.step_ms else 0.0

    def timings(self) -> dict[str, Any]:
        decode = self.decode_ms
        return {
            "ttft_ms": round(self.ttft or 0.0, 2),
            "phases_ms": dict(self.phases),
            "tokens_per_s": (
                round((len(decode) + self.extra_tokens) / (sum(decode) / 1000), 2)
                if decode
                else 0.0
            ),
            "decode_steps": len(decode),
            "steps": len(self.step_ms),
            "hop_ms": round(float(np.median(self.hop_ms)), 3) if self.hop_ms else 0.0,
            "stage_ms": {p: round(float(np.median(v)), 3) for p, v in self.compute_ms.items()},
        }

    def recent_rate(self, steps: int = 32) -> float:
        """Tokens per second over the last ``steps`` decode steps (a running generation's)."""
        last = self.decode_ms[-steps:]
        return round(len(last) / (sum(last) / 1000), 2) if last and sum(last) > 0 else 0.0

    def total_s(self) -> float:
        return round(time.perf_counter() - self.t_start, 3)
