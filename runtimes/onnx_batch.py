"""How one call of a shard's ONNX graph runs the steps of one or several sessions.

The linear layers take the step's rows ``[S, d]`` of every session one after another: every
weight is read once for all of them (continuous batching), and a row's result depends on that
row alone (MatMulNBits quantizes and multiplies each row by itself, measured bit-exact for any
number of rows). Attention runs per session (onnx_graph._attention): the graph gathers each
session's keys and values, its cache then its new rows, into its own row of ``[B, C]`` from
key 0, and its queries into ``[B, Q]`` slots. Keys past a session's own are zeros, masked.

That makes a session's attention the same arithmetic alone and in any batch, bit for bit, on
conditions measured on onnxruntime 1.32's CPU kernels:
- the session's keys start at 0 in its row (reductions group elements from the row start);
- the row is longer than 256 keys every time (the kernels switch methods at 128 and 256 keys;
  above that, masked zeros added at the end change nothing): C >= :data:`MIN_KEYS`;
- every call has at least two session slots (with one, MatMul folds the heads into one
  matrix product, whose rows differ in the last bits from the per-slot products): a lone
  session gets an idle second slot;
- the sessions of a call have the same number of rows (a slot's rows go through one matrix
  product, whose per-row result depends on its row count): the batcher groups steps so.

Bit-exactness matters more than it seems: the int8 activation quantization in MatMulNBits
turns a last-bit difference into a rounding step, which on Gemma 3 moved logits by ~1.0 and
changed greedy tokens.

Each session's cache lives here as numpy arrays ``[capacity, hk, hd]`` per layer that grow by
doubling; the graph returns only the step's new rows, which are appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .positions import attention_masks

__all__ = ["MIN_KEYS", "BatchLayout", "KVCache"]

MIN_KEYS = 257


@dataclass(frozen=True)
class BatchLayout:
    """Where each session's rows and keys sit in one call."""

    pasts: tuple[int, ...]  # cached positions per session
    news: tuple[int, ...]  # new rows per session

    @property
    def keys(self) -> int:
        """C: every session's key row, padded."""
        return max(MIN_KEYS, max(p + n for p, n in zip(self.pasts, self.news, strict=True)))

    @property
    def slots(self) -> int:
        """Q: query slots per session."""
        return max(self.news)

    def row_offsets(self) -> list[int]:
        return [0, *np.cumsum(self.news).tolist()]

    def positions(self) -> np.ndarray[Any, Any]:
        """The position of every row of the call."""
        return np.concatenate(
            [p + np.arange(n) for p, n in zip(self.pasts, self.news, strict=True)]
        )

    @property
    def sessions(self) -> int:
        """B: session slots, at least two (the second of a lone session's call stays idle)."""
        return max(2, len(self.news))

    def indices(self) -> dict[str, np.ndarray[Any, Any]]:
        """kv_idx [B, C] into the pool (row 0 zeros, then each session's cache, then the new
        rows), q_idx [B, Q] into the rows, row_idx [S] into the B x Q slots. An idle slot
        reads the zero row and row 0."""
        b_n, c_n, q_n = self.sessions, self.keys, self.slots
        n_pool = 1 + sum(self.pasts)
        ro = self.row_offsets()
        kv = np.zeros((b_n, c_n), np.int64)
        q = np.zeros((b_n, q_n), np.int64)
        rows = np.zeros(ro[-1], np.int64)
        off = 1
        for b, (p, n) in enumerate(zip(self.pasts, self.news, strict=True)):
            kv[b, :p] = off + np.arange(p)
            kv[b, p : p + n] = n_pool + ro[b] + np.arange(n)
            off += p
            q[b, :n] = ro[b] + np.arange(n)
            q[b, n:] = ro[b]  # padding slots: any row; their outputs are never read
            rows[ro[b] : ro[b + 1]] = b * q_n + np.arange(n)
        return {"kv_idx": kv, "q_idx": q, "row_idx": rows}

    def mask(self, window: int) -> np.ndarray[Any, Any]:
        """Additive [B, 1, 1, Q, C]: each session's own mask (runtimes.positions) over its
        keys 0..p+n, every key past those masked."""
        b_n, c_n, q_n = self.sessions, self.keys, self.slots
        out = np.full((b_n, 1, 1, q_n, c_n), -np.inf, np.float32)
        out[:, 0, 0, :, 0] = 0.0  # idle slots see one key: no all-masked row (NaN)
        for b, (p, n) in enumerate(zip(self.pasts, self.news, strict=True)):
            out[b, 0, 0, :n, : p + n] = attention_masks(p, n, window)
        return out


@dataclass
class KVCache:
    """One session's keys and values per layer, ``[1 + capacity, hk, hd]``: row 0 zeros,
    then the positions, the first ``Session.n_past`` valid. A lone session's call feeds a
    prefix of these arrays as its pool, without a copy (the layout BatchLayout.indices
    points into: the zero row, then the cache)."""

    kv_heads: int
    head_dim: int
    dtype: type[np.floating[Any]] = np.float16  # GraphOptions.kv_float16
    keys: dict[int, np.ndarray[Any, Any]] = field(default_factory=dict)
    values: dict[int, np.ndarray[Any, Any]] = field(default_factory=dict)

    def pool(self, layer: int, n: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The zero row and the first ``n`` positions (views)."""
        k, v = self.keys.get(layer), self.values.get(layer)
        if k is None or v is None:
            zero = np.zeros((1, self.kv_heads, self.head_dim), self.dtype)
            return zero, zero
        return k[: 1 + n], v[: 1 + n]

    def append(self, layer: int, at: int, k: np.ndarray[Any, Any], v: np.ndarray[Any, Any]) -> None:
        """Write positions ``at .. at + len(k)`` (overwriting any rolled-back ones there)."""
        need = 1 + at + k.shape[0]
        old = self.keys.get(layer)
        if old is None or old.shape[0] < need:
            cap = max(17, need, 2 * (old.shape[0] if old is not None else 0))
            for store in (self.keys, self.values):
                grown = np.zeros((cap, self.kv_heads, self.head_dim), self.dtype)
                prev = store.get(layer)
                if prev is not None:
                    grown[: 1 + at] = prev[: 1 + at]
                store[layer] = grown
        self.keys[layer][1 + at : need] = k
        self.values[layer][1 + at : need] = v

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys.values()) + sum(
            a.nbytes for a in self.values.values()
        )


def pool(caches: Sequence[KVCache], pasts: Sequence[int], layer: int) -> tuple[Any, Any]:
    """The pooled keys and values of one layer for a call: a zero row, then every session's
    cached rows in order (the layout ``BatchLayout.indices`` points into); a lone session's
    own arrays, uncopied."""
    if len(caches) == 1:
        return caches[0].pool(layer, pasts[0])
    parts = [c.pool(layer, p) for c, p in zip(caches, pasts, strict=True)]
    ks = [parts[0][0]] + [k[1:] for k, _ in parts[1:]]
    vs = [parts[0][1]] + [v[1:] for _, v in parts[1:]]
    return np.concatenate(ks), np.concatenate(vs)
