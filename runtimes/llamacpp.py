"""llama.cpp (llama-cpp-python) for a peer that holds the whole model; also the tests' oracle.

llama.cpp has no API to run a layer range from hidden states, so this runtime only accepts a
shard covering every unit, stored as one GGUF file. One llama.cpp context holds one KV cache:
sessions take turns on it, and switching sessions replays the incoming session's tokens.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .base import Runtime, Session
from .errors import ModelError, RuntimeUnavailableError
from .llamaload import load_llama
from .shards import ShardSpec

__all__ = ["LlamaCppRuntime"]

log = logging.getLogger(__name__)

try:
    import llama_cpp  # noqa: F401 - this runtime is unavailable without it
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise RuntimeUnavailableError(
        "the llamacpp runtime needs llama-cpp-python (pip install 'edgemesh[llamacpp]')"
    ) from exc

_GGML_TYPE_F32 = 0


class LlamaCppRuntime(Runtime):
    name = "llamacpp"

    def __init__(
        self,
        shard: ShardSpec,
        *,
        n_ctx: int = 2048,
        threads: int | None = None,
        logits_all: bool = False,
        kv_f32: bool = False,
        n_batch: int = 512,
    ) -> None:
        super().__init__(shard)
        if not (shard.is_first and shard.is_last) or shard.whole_model_path is None:
            raise ModelError(
                "llama.cpp runs whole models only: give it a one-file shard of all units"
            )
        _check_vocab(shard)
        self._logits_all = logits_all
        kwargs: dict[str, Any] = {}
        if kv_f32:  # float32 KV cache: tighter agreement in oracle comparisons
            kwargs.update(type_k=_GGML_TYPE_F32, type_v=_GGML_TYPE_F32)
        self._n_ctx = n_ctx
        try:
            self._llm = load_llama(
                model_path=os.fspath(shard.whole_model_path),
                n_ctx=n_ctx,
                n_batch=min(n_batch, n_ctx),
                n_threads=threads or min(os.cpu_count() or 1, 4),
                logits_all=logits_all,
                verbose=False,
                **kwargs,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {shard.whole_model_path}: {exc}") from exc
        self._active: int | None = None

    @classmethod
    def estimate_memory(cls, shard: ShardSpec, max_tokens: int = 2048) -> int:
        # One f16 cache of n_ctx (2048 by default) positions is allocated at load, whatever
        # the sessions: it is part of the load, not of each session (kv_bytes is 0).
        c = shard.config
        kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * max(max_tokens, 2048) * 2
        return shard.nbytes() + kv + 4 * c.vocab_size * 512 + (64 << 20)

    @classmethod
    def kv_bytes(cls, shard: ShardSpec, positions: int) -> int:
        return 0  # the shared cache is counted by estimate_memory

    @property
    def llama(self) -> Any:
        """The underlying ``llama_cpp.Llama`` (tests read its tokenizer)."""
        return self._llm

    def open_session(self, max_tokens: int = 2048) -> Session:
        if max_tokens > self._n_ctx:
            from .errors import SessionError

            raise SessionError(
                f"max_tokens {max_tokens} exceeds this context's n_ctx {self._n_ctx}"
            )
        return super().open_session(max_tokens)

    def _open(self, session: Session) -> None:
        session.state = []  # the session's token history, replayed on a switch

    def _forward(self, session: Session, inputs: np.ndarray[Any, Any], all_logits: bool) -> Any:
        if all_logits and not self._logits_all:
            raise ModelError("all_logits needs the runtime built with logits_all=True")
        llm = self._llm
        history: list[int] = session.state
        if self._active != session.id or llm.n_tokens != len(history):
            llm.reset()  # type: ignore[no-untyped-call]
            if history:
                llm.eval(history)
            self._active = session.id
        toks = [int(t) for t in inputs]
        start = llm.n_tokens
        llm.eval(toks)
        history.extend(toks)
        if self._logits_all:
            rows = (
                llm.scores[start : start + len(toks)]
                if all_logits
                else llm.scores[llm.n_tokens - 1 : llm.n_tokens]
            )
            return np.array(rows, dtype=np.float32)
        ptr = llm._ctx.get_logits()  # type: ignore[no-untyped-call]  # the last position's logits (only output of the batch)
        return np.ctypeslib.as_array(ptr, shape=(1, llm.n_vocab())).copy()

    def _truncate(self, session: Session, n_past: int) -> None:
        history: list[int] = session.state
        del history[n_past:]
        if self._active == session.id and self._llm.n_tokens > n_past:
            # eval() starts by removing the cache's positions from n_tokens on
            self._llm.n_tokens = n_past

    def close_session(self, session: Session) -> None:
        if self._active == session.id:
            self._active = None
        super().close_session(session)

    def close(self) -> None:
        super().close()
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()


def _check_vocab(shard: ShardSpec) -> None:
    """llama.cpp aborts the whole process (GGML_ASSERT) on a vocabulary with duplicate tokens;
    refuse such a file with an error instead."""
    for f in shard.files:
        for kv in f.raw:
            if kv.key == "tokenizer.ggml.tokens" and isinstance(kv.value, list):
                if len(set(kv.value)) != len(kv.value):
                    raise ModelError(f"{f.path}: the tokenizer lists a token twice")
