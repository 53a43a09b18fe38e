"""Several sessions' steps in one call of a shard's ONNX graph (continuous batching).

The graph knows nothing of sessions: it takes rows ``[T, d]`` with a RoPE table per row, an
additive mask ``[T, K]`` over the keys, and ``past_*`` caches that it concatenates with the new
keys and values. So a batch is fed as one sequence: the sessions' rows one after another, their
caches concatenated, and a mask that lets each row see only its own session's keys
(:func:`runtimes.positions.batch_masks`). Every weight is then read once for all of the
batch's rows, which is most of a decode step's cost on a CPU. The ``present_*`` outputs are
cut back into one cache per session afterwards.

A row's result does not depend on the other rows beyond floating-point summation order in the
attention (masked keys contribute exact zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BatchLayout", "concat_pasts", "split_presents", "output_rows"]

# the axis of a cached K ([hk, hd, P]) and V ([hk, P, hd]) along which positions grow
_K_AXIS, _V_AXIS = 2, 1


@dataclass(frozen=True)
class BatchLayout:
    """Where each session's rows and cached positions sit in the batched call."""

    pasts: tuple[int, ...]  # cached positions per session
    news: tuple[int, ...]  # new rows per session

    @property
    def total_past(self) -> int:
        return sum(self.pasts)

    def row_offsets(self) -> list[int]:
        return [0, *np.cumsum(self.news).tolist()]

    def past_offsets(self) -> list[int]:
        return [0, *np.cumsum(self.pasts).tolist()]


def _axis(name: str) -> int:
    return _K_AXIS if name.startswith(("past_k_", "present_k_")) else _V_AXIS


def concat_pasts(caches: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """name -> numpy array of every session's cache along the position axis, in order."""
    return {
        n: np.ascontiguousarray(np.concatenate([_np(c[n]) for c in caches], axis=_axis(n)))
        for n in names
    }


def split_presents(
    layout: BatchLayout, presents: dict[str, Any]
) -> list[dict[str, np.ndarray[Any, Any]]]:
    """One ``past_*`` dict per session from the batched ``present_*`` outputs."""
    po, ro, tp = layout.past_offsets(), layout.row_offsets(), layout.total_past
    per: list[dict[str, np.ndarray[Any, Any]]] = [{} for _ in layout.news]
    for name, val in presents.items():
        arr = _np(val)
        ax = _axis(name)
        past_name = name.replace("present_", "past_")
        for j in range(len(layout.news)):
            old = arr[_cut(ax, po[j], po[j + 1])]
            new = arr[_cut(ax, tp + ro[j], tp + ro[j + 1])]
            per[j][past_name] = np.ascontiguousarray(np.concatenate([old, new], axis=ax))
    return per


def output_rows(layout: BatchLayout, all_logits: Sequence[bool]) -> list[tuple[int, int]]:
    """The [start, stop) rows of the batched rows each session needs from the last stage:
    all its rows with ``all_logits``, else its last row."""
    ro = layout.row_offsets()
    return [
        (ro[j], ro[j + 1]) if everything else (ro[j + 1] - 1, ro[j + 1])
        for j, everything in enumerate(all_logits)
    ]


def _cut(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def _np(val: Any) -> np.ndarray[Any, Any]:
    return val if isinstance(val, np.ndarray) else np.asarray(val.numpy())
