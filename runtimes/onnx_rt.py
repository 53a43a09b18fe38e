"""The onnxruntime runtime: one ONNX graph per shard (see onnx_graph.py), CPU by default.

The KV cache lives in the session as onnxruntime values: each step feeds ``present_*`` back as
``past_*`` without a round trip through numpy. RoPE tables and masks are computed here in
numpy for the step's positions (a few KB), which keeps the graph free of position logic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Runtime, Session, Step
from .errors import RuntimeUnavailableError
from .onnx_batch import BatchLayout, concat_pasts, output_rows, split_presents
from .positions import attention_masks, batch_masks, rope_tables
from .quant import onnx_weight_bytes
from .shards import ShardSpec

__all__ = ["OnnxRuntime", "rope_tables", "attention_masks"]

log = logging.getLogger(__name__)

try:
    import onnxruntime as ort

    from .onnx_graph import GraphOptions, build_shard_graph
    from .onnx_weights import WeightFile, default_weight_dir, embedding_rows
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise RuntimeUnavailableError(
        "the onnx runtime needs onnx and onnxruntime (pip install 'edgemesh[onnx]')"
    ) from exc


@dataclass
class _KV:
    values: dict[str, Any]  # input name -> OrtValue


class OnnxRuntime(Runtime):
    name = "onnx"
    batches = True  # one graph call reads every weight once for a whole batch (onnx_batch.py)

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
    ) -> None:
        super().__init__(shard)
        cfg = self.config
        opts = GraphOptions(accuracy_level, fuse_linears, round_block_sums)
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
        hk, hd = cfg.n_kv_heads, cfg.head_dim
        self._empty_k = np.zeros((hk, hd, 0), np.float32)
        self._empty_v = np.zeros((hk, 0, hd), np.float32)

    @classmethod
    def estimate_memory(cls, shard: ShardSpec, max_tokens: int = 2048) -> int:
        c = shard.config
        kv = 2 * len(shard.layers) * c.n_kv_heads * c.head_dim * max_tokens * 4
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
        vals: dict[str, Any] = {}
        for i in self._layers:
            vals[f"past_k_{i}"] = ort.OrtValue.ortvalue_from_numpy(self._empty_k)
            vals[f"past_v_{i}"] = ort.OrtValue.ortvalue_from_numpy(self._empty_v)
        session.state = _KV(vals)

    def _forward(self, session: Session, inputs: np.ndarray[Any, Any], all_logits: bool) -> Any:
        n = inputs.shape[0]
        kv: _KV = session.state
        feeds: dict[str, Any] = dict(kv.values)
        feeds.update(self._row_feeds(inputs, session.n_past + np.arange(n)))
        for tag, window in self._mask_tags():
            feeds[f"mask_{tag}"] = _ov(attention_masks(session.n_past, n, window))
        if self.shard.is_last:
            idx = np.arange(n, dtype=np.int64) if all_logits else np.array([n - 1], np.int64)
            feeds["out_idx"] = _ov(idx)
        outs = self._sess.run_with_ort_values(self._out_names, feeds)
        result = outs[0].numpy()
        for name, val in zip(self._out_names[1:], outs[1:], strict=True):
            kv.values[name.replace("present_", "past_")] = val
        return result

    def _forward_batch(self, steps: Sequence[Step]) -> list[Any]:
        """The steps of several sessions as one call (see onnx_batch.py); each session's
        cache is replaced only once the call has succeeded."""
        layout = BatchLayout(
            tuple(st.session.n_past for st in steps), tuple(st.inputs.shape[0] for st in steps)
        )
        rows = np.concatenate([st.inputs for st in steps], axis=0)
        pos = np.concatenate([st.session.n_past + np.arange(st.inputs.shape[0]) for st in steps])
        caches = [st.session.state.values for st in steps]
        feeds: dict[str, Any] = {
            n: _ov(a) for n, a in concat_pasts(caches, list(caches[0])).items()
        }
        feeds.update(self._row_feeds(rows, pos))
        for tag, window in self._mask_tags():
            feeds[f"mask_{tag}"] = _ov(batch_masks(list(layout.pasts), list(layout.news), window))
        spans = output_rows(layout, [st.all_logits for st in steps])
        if self.shard.is_last:
            feeds["out_idx"] = _ov(np.concatenate([np.arange(a, b) for a, b in spans]))
        outs = self._sess.run_with_ort_values(self._out_names, feeds)
        result = outs[0].numpy()
        presents = dict(zip(self._out_names[1:], outs[1:], strict=True))
        for st, cache in zip(steps, split_presents(layout, presents), strict=True):
            st.session.state.values = {n: _ov(a) for n, a in cache.items()}
        if not self.shard.is_last:
            ro = layout.row_offsets()
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

    def close(self) -> None:
        super().close()
        self._sess = None


def _ov(a: np.ndarray[Any, Any]) -> Any:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
