"""The onnxruntime runtime: one ONNX graph per shard (see onnx_graph.py), CPU by default.

The KV cache lives in the session as numpy arrays (onnx_batch.KVCache); a call feeds the
cached rows of its sessions and gets back only the new ones. A call runs one session's step
or several sessions' steps together (continuous batching), with the same arithmetic for each
session either way (onnx_batch.py). RoPE tables, masks and the per-session layout indices are
computed here in numpy for the step's positions (a few KB), which keeps the graph free of
position logic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Runtime, Session, Step
from .errors import RuntimeUnavailableError
from .onnx_batch import BatchLayout, KVCache, pool
from .positions import attention_masks, rope_tables
from .quant import onnx_weight_bytes
from .shards import ShardSpec

__all__ = ["OnnxRuntime", "rope_tables", "attention_masks"]  # the masks: re-exported for tests

log = logging.getLogger(__name__)

try:
    import onnxruntime as ort

    from .onnx_graph import GraphOptions, build_shard_graph
    from .onnx_weights import WeightFile, default_weight_dir, embedding_rows
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise RuntimeUnavailableError(
        "the onnx runtime needs onnx and onnxruntime (pip install 'edgemesh[onnx]')"
    ) from exc


class OnnxRuntime(Runtime):
    name = "onnx"
    batches = True  # one graph call reads every weight once for a whole batch (onnx_batch.py)
    # float16 keys and values (GraphOptions.kv_float16, the default; an instance built with
    # kv_float16=False, for comparisons, holds twice what this reserves)
    kv_item_bytes = 2

    def __init__(
        self,
        shard: ShardSpec,
        *,
        threads: int | None = None,
        accuracy_level: int = 4,
        fuse_linears: bool = True,
        providers: list[str] | None = None,
        spin: bool = True,
        round_block_sums: bool = False,
        llama_acts: bool = True,
        kv_float16: bool = True,
    ) -> None:
        super().__init__(shard)
        cfg = self.config
        opts = GraphOptions(
            accuracy_level, fuse_linears, round_block_sums, llama_acts, kv_float16=kv_float16
        )
        self._kv_dtype = np.float16 if kv_float16 else np.float32
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:
            # Idle worker threads otherwise busy-wait after every run, taking the cores from
            # the next stage of a pipeline that shares the machine (a local mesh, a laptop
            # serving two stages).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        # Weights go to a temporary external-data file as they are made: onnxruntime maps
        # each from there, prepacks it and unmaps the original (onnx_weights.py)
        with WeightFile(default_weight_dir()) as wf:
            model, _ = build_shard_graph(shard, opts, sink=wf.add)
            for f in shard.files:
                f.release_pages()
            path = wf.write_model(model.SerializeToString())
            del model
            try:
                with wf.releasing_pages():
                    self._sess = ort.InferenceSession(
                        path, so, providers=providers or ["CPUExecutionProvider"]
                    )
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise RuntimeUnavailableError(
                    f"onnxruntime rejected the shard graph: {exc}"
                ) from exc
        self._embed = shard.tensor("token_embd.weight") if shard.is_first else None
        self._input_names = {i.name for i in self._sess.get_inputs()}
        self._layers = list(shard.layers)
        self._freq_factors = (
            shard.tensor("rope_freqs.weight").dequantize().reshape(-1)
            if cfg.has_rope_freqs and self._layers
            else None
        )
        self._out_names = [o.name for o in self._sess.get_outputs()]

    @classmethod
    def estimate_memory(cls, shard: ShardSpec, max_tokens: int = 2048) -> int:
        c = shard.config
        kv = cls.kv_bytes(shard, max_tokens)
        # One copy of each weight: onnxruntime's prepacked one (our re-laid-out bytes are
        # unmapped once packed), measured at 1.2x onnx_weight_bytes on Gemma 3 270M. The
        # embedding table is read row by row from the GGUF, so it counts only as the head.
        head = "token_embd.weight" if c.tied_embeddings else "output.weight"
        held = sum(
            onnx_weight_bytes(t)
            for name, t in shard.tensors.items()
            if name != "token_embd.weight" or (shard.is_last and name == head)
        )
        return int(1.3 * held) + kv + (32 << 20)

    def _open(self, session: Session) -> None:
        session.state = KVCache(self.config.n_kv_heads, self.config.head_dim, self._kv_dtype)

    def _forward(self, session: Session, inputs: np.ndarray[Any, Any], all_logits: bool) -> Any:
        return self._forward_batch([Step(session, inputs, all_logits)])[0]

    def _forward_batch(self, steps: Sequence[Step]) -> list[Any]:
        """One graph call for the steps (one or several sessions, see onnx_batch.py); each
        session's cache grows only once the call has succeeded."""
        layout = BatchLayout(
            tuple(st.session.n_past for st in steps), tuple(st.inputs.shape[0] for st in steps)
        )
        rows = np.concatenate([st.inputs for st in steps], axis=0)
        feeds = self._row_feeds(rows, layout.positions())
        caches: list[KVCache] = [st.session.state for st in steps]
        if self._layers:
            feeds.update({n: _ov(a) for n, a in layout.indices().items()})
            for tag, window in self._mask_tags():
                feeds[f"mask_{tag}"] = _ov(layout.mask(window))
            for i in self._layers:
                k, v = pool(caches, layout.pasts, i)
                feeds[f"past_k_{i}"], feeds[f"past_v_{i}"] = _ov(k), _ov(v)
        ro = layout.row_offsets()
        spans = [
            (ro[j], ro[j + 1]) if st.all_logits else (ro[j + 1] - 1, ro[j + 1])
            for j, st in enumerate(steps)
        ]
        if self.shard.is_last:
            feeds["out_idx"] = _ov(np.concatenate([np.arange(a, b) for a, b in spans]))
        outs = self._sess.run_with_ort_values(self._out_names, feeds)
        result = outs[0].numpy()
        new = {name: val.numpy() for name, val in zip(self._out_names[1:], outs[1:], strict=True)}
        for i in self._layers:
            k, v = new[f"present_k_{i}"], new[f"present_v_{i}"]
            for j, (c, p) in enumerate(zip(caches, layout.pasts, strict=True)):
                c.append(i, p, k[ro[j] : ro[j + 1]], v[ro[j] : ro[j + 1]])
        if not self.shard.is_last:
            return [result[a:b] for a, b in zip(ro, ro[1:], strict=False)]
        out, start = [], 0
        for a, b in spans:
            out.append(result[start : start + b - a])
            start += b - a
        return out

    def _row_feeds(self, inputs: np.ndarray[Any, Any], pos: np.ndarray[Any, Any]) -> dict[str, Any]:
        """The stage input and the RoPE tables of rows at positions ``pos``."""
        cfg = self.config
        feeds: dict[str, Any] = {}
        if self._embed is not None:
            feeds["embeds"] = _ov(embedding_rows(self._embed, inputs))
        else:
            feeds["hidden_in"] = _ov(inputs)
        for tag, base in (("g", cfg.rope_base), ("l", cfg.rope_base_swa)):
            if f"cos_{tag}" in self._input_names:
                c, s = rope_tables(pos, cfg.head_dim, base, cfg.rope_freq_scale, self._freq_factors)
                feeds[f"cos_{tag}"], feeds[f"sin_{tag}"] = _ov(c), _ov(s)
        return feeds

    def _mask_tags(self) -> list[tuple[str, int]]:
        """The graph's mask inputs: global ("g", no window) and sliding-window ("l")."""
        tags = [("g", 0)] if "mask_g" in self._input_names else []
        if "mask_l" in self._input_names:
            tags.append(("l", self.config.sliding_window))
        return tags

    def _truncate(self, session: Session, n_past: int) -> None:
        # Nothing to drop: the cache's rows past n_past are never read (a call feeds the first
        # n_past) and the next step's rows overwrite them (KVCache.append).
        pass

    def close(self) -> None:
        super().close()
        self._sess = None


def _ov(a: np.ndarray[Any, Any]) -> Any:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
