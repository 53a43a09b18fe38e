"""Token sampling at the last stage: greedy, temperature, top-k, top-p, reproducible by seed.

The random stream of step ``pos`` is seeded by ``(seed, pos)``, so a replay after a failover
draws exactly the numbers the original run drew: sampled output survives re-routing too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_DRAFT",
    "MAX_LOGPROBS",
    "MAX_TOP",
    "SamplingParams",
    "logprobs",
    "sample",
    "sample_rows",
    "target_probs",
    "top_logits",
]

MAX_DRAFT = 16  # drafted tokens one verify step may carry (speculative decoding)
MAX_TOP = 64  # top logits a step may return (the ``top`` request field)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError("temperature must be in [0, 10]")
        if not 0 <= self.top_k <= 1_000_000:
            raise ValueError("top_k must be in [0, 1e6]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be a non-negative 63-bit integer")

    @classmethod
    def from_wire(cls, d: Any) -> SamplingParams:
        if not isinstance(d, dict):
            raise ValueError("sampling parameters must be a map")
        try:
            return cls(
                float(d.get("temperature", 0.0)),
                int(d.get("top_k", 0)),
                float(d.get("top_p", 1.0)),
                int(d.get("seed", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad sampling parameters: {exc}") from None

    def to_wire(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
        }


def sample(logits: npt.NDArray[np.float32], params: SamplingParams, pos: int) -> int:
    """One token id from a 1-D logits vector."""
    if params.temperature == 0.0:
        # argmax of the float32 logits: widening is exact, so it picks what float64 would,
        # without copying 262k logits for every greedy token
        return int(np.argmax(np.asarray(logits).reshape(-1)))
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    probs = target_probs(x, params)
    rng = np.random.default_rng([params.seed, pos])
    return int(rng.choice(probs.size, p=probs))


def sample_rows(rows: npt.NDArray[np.float32], params: SamplingParams, first_pos: int) -> list[int]:
    """The token after each row of a verify step's logits, row ``j`` drawn exactly as a
    one-token step ending at ``first_pos + j`` would draw it.

    Against a point-mass draft (prompt lookup proposes one token, q = 1 there) this is the
    speculative sampling rule of Leviathan et al. and Chen et al.: a draft ``d`` is kept when
    the target's own draw equals it, which happens with probability p(d) = min(1, p(d)/q(d));
    on a rejection the draw is distributed as p restricted to tokens other than d,
    renormalised, which is norm(max(0, p - q)). So the output has the target's distribution,
    and since each position uses its own step's random stream, the tokens are those of the
    run without speculation under the same seed (failover replays and spot checks agree)."""
    return [sample(row, params, first_pos + j) for j, row in enumerate(rows)]


def target_probs(x: npt.NDArray[np.float64], params: SamplingParams) -> npt.NDArray[np.float64]:
    """The distribution a sampled step draws from: temperature, then top-k, then top-p."""
    x = x / params.temperature
    if params.top_k and params.top_k < x.size:
        cutoff = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x >= cutoff, x, -np.inf)
    probs = np.exp(x - np.max(x))
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < params.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def top_logits(logits: npt.NDArray[np.float32], k: int = 8) -> list[tuple[int, float]]:
    """The k largest logits as (token, value), largest first (for margin checks)."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    k = min(k, x.size)
    idx = np.argpartition(-x, k - 1)[:k]
    idx = idx[np.argsort(-x[idx])]
    return [(int(i), float(x[i])) for i in idx]


MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs bound)


def logprobs(logits: npt.NDArray[np.float32], token: int, k: int) -> list[Any]:
    """``[logprob of token, [[alternative, logprob], ...]]``: the model's log-softmax (at
    temperature 1), the k likeliest alternatives first."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    top = [[t, v - lse] for t, v in top_logits(logits, k)] if k else []
    return [float(x[token]) - lse, top]
