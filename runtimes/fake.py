"""A deterministic, tiny runtime that needs no model file, for mesh tests.

It behaves like a real layer range where it matters to the mesh: blocks depend on every earlier
position of the session (a running mean stands in for attention over the KV cache), so a stage
that lost its session must replay the history to give the same output; and results depend only
on (config, unit range, inputs), so two peers holding the same range agree bit for bit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arch import ModelConfig
from .base import Runtime, Session
from .errors import SessionError
from .shards import ShardSpec

__all__ = ["FakeRuntime", "fake_config", "fake_shard", "ROLLBACK_WINDOW"]

# Positions a session can roll back (speculative decoding drops at most a draft's worth):
# the running sums of the last this many positions are kept to restore them exactly.
ROLLBACK_WINDOW = 64


@dataclass
class _State:
    acc: dict[int, np.ndarray[Any, Any]]  # per layer: running sum of the block's inputs
    # (n_past, sums) before each of the last ROLLBACK_WINDOW positions, oldest first
    snaps: deque[tuple[int, dict[int, np.ndarray[Any, Any]]]] = field(
        default_factory=lambda: deque(maxlen=ROLLBACK_WINDOW)
    )


def fake_config(
    n_layers: int = 4, d_model: int = 16, vocab_size: int = 64, context_length: int = 4096
) -> ModelConfig:
    return ModelConfig(
        arch="fake",
        name=f"fake-{n_layers}x{d_model}",
        n_layers=n_layers,
        d_model=d_model,
        n_heads=1,
        n_kv_heads=1,
        head_dim=d_model,
        d_ff=d_model,
        vocab_size=vocab_size,
        rms_eps=1e-6,
        rope_base=10000.0,
        rope_base_swa=10000.0,
        rope_freq_scale=1.0,
        context_length=context_length,
        sliding_window=0,
        swa_layers=(False,) * n_layers,
        attn_scale=1.0,
        tied_embeddings=True,
        has_rope_freqs=False,
        final_logit_softcap=0.0,
    )


def fake_shard(start: int, end: int, config: ModelConfig | None = None) -> ShardSpec:
    """A virtual shard of units [start, end) of a fake model."""
    return ShardSpec.virtual(config or fake_config(), start, end)


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self, shard: ShardSpec, delay_s: float = 0.0) -> None:
        super().__init__(shard)
        cfg = shard.config
        d = cfg.d_model
        # weights from fixed seeds: identical on every peer for the same config
        rng = np.random.default_rng(cfg.vocab_size * 1_000_003 + d)
        self._embed = rng.standard_normal((cfg.vocab_size, d)).astype(np.float32)
        self._mats = {
            layer: np.random.default_rng(10_000 + layer).standard_normal((d, d)).astype(np.float32)
            / np.float32(np.sqrt(d))
            for layer in shard.layers
        }
        self._delay_s = delay_s

    @classmethod
    def estimate_memory(cls, shard: ShardSpec, max_tokens: int = 2048) -> int:
        d = shard.config.d_model
        return 4 * (shard.config.vocab_size * d + len(shard.layers) * (d * d + d))

    @classmethod
    def kv_bytes(cls, shard: ShardSpec, positions: int) -> int:
        # a running sum, not per position, and the rollback window's copies of it
        return 8 * shard.config.d_model * len(shard.layers) * (1 + ROLLBACK_WINDOW)

    def _open(self, session: Session) -> None:
        # per layer: running sum of the block's inputs over all cached positions
        zeros = {layer: np.zeros(self.config.d_model, np.float64) for layer in self._mats}
        session.state = _State(zeros)

    def _truncate(self, session: Session, n_past: int) -> None:
        state: _State = session.state
        if not state.snaps or state.snaps[0][0] > n_past:  # checked first: nothing changes
            raise SessionError(f"the fake runtime rolls back at most {ROLLBACK_WINDOW} positions")
        while state.snaps[-1][0] > n_past:
            state.snaps.pop()
        _, sums = state.snaps.pop()
        state.acc = sums

    def _forward(self, session: Session, inputs: np.ndarray[Any, Any], all_logits: bool) -> Any:
        if self._delay_s:
            import time

            time.sleep(self._delay_s)
        h = self._embed[inputs] if self.shard.is_first else inputs.astype(np.float32)
        state: _State = session.state
        # the sums before each position, per layer: a rollback restores them exactly
        snaps: list[dict[int, np.ndarray[Any, Any]]] = [{} for _ in range(h.shape[0])]
        for layer, w in self._mats.items():
            out = np.empty_like(h)
            acc = state.acc[layer]
            for t in range(h.shape[0]):
                snaps[t][layer] = acc.copy()
                acc += h[t]
                mean = (acc / (session.n_past + t + 1)).astype(np.float32)
                out[t] = np.tanh(h[t] @ w + mean)
            h = out
        state.snaps.extend((session.n_past + t, snap) for t, snap in enumerate(snaps))
        if not self.shard.is_last:
            return h
        if not all_logits:
            h = h[-1:]
        return h @ self._embed.T
