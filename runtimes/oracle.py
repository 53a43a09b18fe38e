"""Comparing a chain of shards against a reference runtime (llama.cpp), for tests and benches.

The rule of issue 3: logits must be close relative to the logit range, and greedy tokens must
agree wherever the reference's top-2 margin exceeds ``margin`` (below it, rounding decides).
Decoding follows the reference's greedy tokens, so one near-tie cannot derail the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Runtime, Session

__all__ = ["Chain", "Comparison", "compare_chain", "greedy_continuation"]

log = logging.getLogger(__name__)


class Chain:
    """Shards run in order in one process: stage i's output is stage i+1's input."""

    def __init__(self, stages: Sequence[Runtime]) -> None:
        if not stages or not stages[0].shard.is_first or not stages[-1].shard.is_last:
            raise ValueError("a chain must start with the first stage and end with the last")
        for a, b in zip(stages, stages[1:], strict=False):
            if a.shard.end != b.shard.start:
                raise ValueError("chain stages must be contiguous")
        self.stages = list(stages)

    def open(self, max_tokens: int) -> list[Session]:
        return [s.open_session(max_tokens) for s in self.stages]

    def close(self, sessions: list[Session]) -> None:
        for st, se in zip(self.stages, sessions, strict=True):
            st.close_session(se)

    def forward(self, sessions: list[Session], tokens: Any, all_logits: bool = False) -> Any:
        x: Any = np.asarray(tokens, dtype=np.int64)
        n = len(self.stages)
        for i, (st, se) in enumerate(zip(self.stages, sessions, strict=True)):
            x = st.forward(se, x, all_logits=all_logits and i == n - 1)
        return x


@dataclass
class Comparison:
    max_abs_diff: float = 0.0
    logit_range: float = 0.0
    steps: int = 0  # positions compared
    decided: int = 0  # positions whose reference top-2 margin exceeds the threshold
    agreed: int = 0  # of those, positions where the argmax agrees
    mismatches: list[int] = field(default_factory=list)  # step indices of decided disagreements
    ref_tokens: list[int] = field(default_factory=list)
    test_tokens: list[int] = field(default_factory=list)

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.logit_range if self.logit_range else float("inf")

    def summary(self) -> str:
        return (
            f"max|diff| {self.max_abs_diff:.4f} over logit range {self.logit_range:.2f} "
            f"({100 * self.relative_diff:.2f}%), argmax agreed {self.agreed}/{self.decided} "
            f"decided positions of {self.steps}"
        )


def _margin(row: Any) -> float:
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])


def compare_chain(
    reference: Runtime,
    chain: Chain,
    prompt: Sequence[int],
    decode_steps: int = 16,
    margin: float = 0.25,
    max_tokens: int = 256,
) -> Comparison:
    """Prompt (all positions' logits) then ``decode_steps`` greedy steps on both."""
    c = Comparison()
    rs = reference.open_session(max_tokens)
    cs = chain.open(max_tokens)
    try:
        ref = reference.forward(rs, np.asarray(prompt, np.int64), all_logits=True)
        got = chain.forward(cs, prompt, all_logits=True)
        _account(c, ref, got, margin)
        tok = int(ref[-1].argmax())
        for _ in range(decode_steps):
            c.ref_tokens.append(tok)
            r = reference.forward(rs, [tok], all_logits=True)
            g = chain.forward(cs, [tok], all_logits=True)
            c.test_tokens.append(int(g[-1].argmax()))
            _account(c, r, g, margin)
            tok = int(r[-1].argmax())
    finally:
        reference.close_session(rs)
        chain.close(cs)
    log.info("oracle comparison: %s", c.summary())
    return c


def _account(c: Comparison, ref: Any, got: Any, margin: float) -> None:
    if ref.shape != got.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, tested {got.shape}")
    c.max_abs_diff = max(c.max_abs_diff, float(np.abs(ref - got).max()))
    c.logit_range = max(c.logit_range, float(ref.max() - ref.min()))
    for r, g in zip(ref, got, strict=True):
        if _margin(r) > margin:
            c.decided += 1
            if int(r.argmax()) == int(g.argmax()):
                c.agreed += 1
            else:
                c.mismatches.append(c.steps)
        c.steps += 1


def greedy_continuation(
    run: Chain | Runtime, prompt: Sequence[int], n: int, max_tokens: int = 512
) -> tuple[list[int], list[float]]:
    """n greedy tokens after ``prompt``, and each step's top-2 margin (on this runtime)."""
    chain = run if isinstance(run, Chain) else Chain([run])
    sessions = chain.open(max_tokens)
    toks: list[int] = []
    margins: list[float] = []
    try:
        logits = chain.forward(sessions, prompt)[-1]
        for _ in range(n):
            t = int(logits.argmax())
            toks.append(t)
            margins.append(_margin(logits))
            logits = chain.forward(sessions, [t])[-1]
    finally:
        chain.close(sessions)
    return toks, margins
