"""The runtime protocol: load a shard, open/close sessions (each with its KV cache), forward.

A stage's input is token ids (first stage: 1-D int array of length S) or hidden states
(float32 ``[S, d_model]``); its output is hidden states ``[S, d_model]`` or, for the last stage,
logits ``[M, vocab]`` (M = S with ``all_logits``, else 1: the last position only).

Inference blocks, so :class:`runtimes.batching.AsyncShard` runs every call of one loaded shard
on its own single worker thread, never on the event loop; one thread also serialises the
sessions of a shard, which the engines need (none is safe for concurrent calls on one model).

Continuous batching: steps of different sessions that are queued together run as one call of
:meth:`Runtime.forward_steps` (see :mod:`runtimes.batching`). An engine with a batched path
(onnx) reads every weight once for all of them, which is most of a decode step's cost on a CPU;
the others run the steps one after another. Each session keeps its own KV cache and positions.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .errors import ModelError, RuntimeUnavailableError, SessionError
from .shards import ShardSpec

__all__ = [
    "Runtime",
    "Session",
    "Step",
    "RUNTIME_NAMES",
    "get_runtime",
    "load_runtime",
]

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)


@dataclass
class Session:
    """One generation's state on one shard. ``n_past`` counts positions already cached."""

    max_tokens: int
    id: int = field(default_factory=lambda: next(_session_ids))
    n_past: int = 0
    closed: bool = False
    state: Any = None  # the runtime's own KV cache object


@dataclass(frozen=True)
class Step:
    """One session's rows for one forward: validated inputs (see :meth:`Runtime.check_step`)."""

    session: Session
    inputs: np.ndarray[Any, Any]
    all_logits: bool = False


class Runtime(ABC):
    """One loaded shard on one engine."""

    name: ClassVar[str]
    # True where _forward_batch reads the weights once for all of a batch's sessions; the
    # batcher then queues steps that arrive together instead of running them one by one.
    batches: ClassVar[bool] = False

    def __init__(self, shard: ShardSpec) -> None:
        self.shard = shard
        self.config = shard.config
        self._sessions: dict[int, Session] = {}

    @classmethod
    @abstractmethod
    def estimate_memory(cls, shard: ShardSpec, max_tokens: int = 2048) -> int:
        """Bytes this shard needs once loaded, with one session of ``max_tokens``."""

    kv_item_bytes = 4  # float32 keys and values, unless a runtime keeps them smaller

    @classmethod
    def kv_bytes(cls, shard: ShardSpec, positions: int) -> int:
        """Bytes one session of ``positions`` positions adds: the keys and values of every
        layer of the shard (a node reserves this when the session opens)."""
        c = shard.config
        return 2 * len(shard.layers) * c.n_kv_heads * c.head_dim * positions * cls.kv_item_bytes

    @abstractmethod
    def _open(self, session: Session) -> None:
        """Allocate the session's KV cache state."""

    @abstractmethod
    def _forward(self, session: Session, inputs: np.ndarray[Any, Any], all_logits: bool) -> Any:
        """Run positions ``n_past .. n_past + S``; ``n_past`` is advanced by the caller."""

    def close(self) -> None:
        """Release the engine's resources."""
        self._sessions.clear()

    def open_session(self, max_tokens: int = 2048) -> Session:
        limit = self.config.context_length
        if not 0 < max_tokens <= max(limit, 1):
            raise SessionError(f"max_tokens {max_tokens} outside 1..{limit}")
        s = Session(max_tokens=max_tokens)
        self._open(s)
        self._sessions[s.id] = s
        return s

    def close_session(self, session: Session) -> None:
        session.closed = True
        session.state = None
        self._sessions.pop(session.id, None)

    def _forward_batch(self, steps: Sequence[Step]) -> list[Any]:
        """Run several sessions' steps (distinct sessions, each checked); one output each.

        The engine must leave every session's KV state as it was if it raises. This default
        runs them one by one; an engine that can share the weight reads overrides it."""
        return [self._forward(st.session, st.inputs, st.all_logits) for st in steps]

    def check_step(self, session: Session, inputs: npt.ArrayLike, all_logits: bool = False) -> Step:
        """The step, validated: an open session of this shard, inputs of the right kind, and
        room left in the session."""
        if session.closed or self._sessions.get(session.id) is not session:
            raise SessionError(f"session {session.id} is closed or belongs to another shard")
        x = self._check_inputs(inputs)
        n = x.shape[0]
        if session.n_past + n > session.max_tokens:
            raise SessionError(
                f"session {session.id}: {session.n_past} + {n} tokens exceed {session.max_tokens}"
            )
        return Step(session, x, all_logits)

    def forward(
        self, session: Session, inputs: npt.ArrayLike, *, all_logits: bool = False
    ) -> npt.NDArray[np.float32]:
        """Tokens or hidden states in; hidden states or logits out (see the module doc)."""
        st = self.check_step(session, inputs, all_logits)
        out = np.asarray(self._forward(session, st.inputs, all_logits), dtype=np.float32)
        session.n_past += st.inputs.shape[0]
        return out

    def forward_steps(self, steps: Sequence[Step]) -> list[npt.NDArray[np.float32]]:
        """Checked steps of distinct sessions, run together; one output per step, in order."""
        if len({id(st.session) for st in steps}) != len(steps):
            raise SessionError("a batch holds at most one step per session")
        if len(steps) == 1:
            st = steps[0]
            outs = [self._forward(st.session, st.inputs, st.all_logits)]
        else:
            outs = self._forward_batch(steps)
        for st in steps:
            st.session.n_past += st.inputs.shape[0]
        return [np.asarray(o, dtype=np.float32) for o in outs]

    def truncate(self, session: Session, n_past: int) -> None:
        """Roll the session's KV cache back to its first ``n_past`` positions (speculative
        decoding drops the positions of rejected draft tokens); the next forward continues
        at ``n_past`` exactly as if the dropped positions had never run."""
        if session.closed or self._sessions.get(session.id) is not session:
            raise SessionError(f"session {session.id} is closed or belongs to another shard")
        if type(n_past) is not int or not 0 <= n_past <= session.n_past:
            raise SessionError(
                f"session {session.id}: cannot roll back to {n_past!r} of {session.n_past}"
            )
        if n_past < session.n_past:
            self._truncate(session, n_past)
            session.n_past = n_past

    def _truncate(self, session: Session, n_past: int) -> None:
        """Drop cached positions ``n_past ..``; the default: this engine cannot."""
        raise SessionError(f"the {self.name} runtime cannot roll back a KV cache")

    def _check_inputs(self, inputs: npt.ArrayLike) -> np.ndarray[Any, Any]:
        x = np.asarray(inputs)
        if self.shard.is_first:
            if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.integer):
                raise ModelError("the first stage takes a non-empty 1-D array of token ids")
            if x.min() < 0 or x.max() >= self.config.vocab_size:
                raise ModelError(f"token id out of range 0..{self.config.vocab_size - 1}")
            return x.astype(np.int64)
        d = self.config.d_model
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != d:
            raise ModelError(f"a middle or last stage takes hidden states [S, {d}], got {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def output_shape(self, n_inputs: int, all_logits: bool = False) -> tuple[int, int]:
        if self.shard.is_last:
            return (n_inputs if all_logits else 1, self.config.vocab_size)
        return (n_inputs, self.config.d_model)


RUNTIME_NAMES: dict[str, str] = {
    "onnx": "runtimes.onnx_rt:OnnxRuntime",
    "tinygrad": "runtimes.tinygrad_rt:TinygradRuntime",
    "llamacpp": "runtimes.llamacpp:LlamaCppRuntime",
    "fake": "runtimes.fake:FakeRuntime",
}


# The engine packages each runtime imports: found (not imported) to tell at a node's start
# whether its runtime can run on this machine.
RUNTIME_ENGINES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime"),
    "tinygrad": ("tinygrad",),
    "llamacpp": ("llama_cpp",),
    "fake": (),
}


def available_runtimes() -> list[str]:
    """The runtimes whose engines are installed here, without importing any engine."""
    return [
        name
        for name, engines in RUNTIME_ENGINES.items()
        if all(importlib.util.find_spec(e) is not None for e in engines)
    ]


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class for a name; RuntimeUnavailableError if its engine is missing."""
    try:
        target = RUNTIME_NAMES[name]
    except KeyError:
        raise RuntimeUnavailableError(
            f"unknown runtime {name!r} (known: {', '.join(RUNTIME_NAMES)})"
        ) from None
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailableError(f"runtime {name!r} is not installed: {exc}") from exc
    cls: type[Runtime] = getattr(mod, attr)
    return cls


def load_runtime(name: str, shard: ShardSpec, **options: Any) -> Runtime:
    rt: Runtime = get_runtime(name)(shard, **options)
    return rt
