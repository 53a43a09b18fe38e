"""The onnxruntime runtime: one ONNX graph per shard (see onnx_graph.py), CPU by default.

The KV cache lives in the session as onnxruntime values: each step feeds ``present_*`` back as
``past_*`` without a round trip through numpy. RoPE tables and masks are computed here in
numpy for the step's positions (a few KB), which keeps the graph free of position logic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Runtime, Session
from .errors import RuntimeUnavailableError
from .positions import attention_masks, rope_tables
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
    ) -> None:
        super().__init__(shard)
        cfg = self.config
        opts = GraphOptions(accuracy_level, fuse_linears, round_block_sums, llama_acts)
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
        cfg = self.config
        n = inputs.shape[0]
        kv: _KV = session.state
        feeds: dict[str, Any] = dict(kv.values)
        if self._embed is not None:
            feeds["embeds"] = _ov(embedding_rows(self._embed, inputs))
        else:
            feeds["hidden_in"] = _ov(inputs)
        pos = session.n_past + np.arange(n)
        if "cos_g" in self._input_names:
            c, s = rope_tables(
                pos, cfg.head_dim, cfg.rope_base, cfg.rope_freq_scale, self._freq_factors
            )
            feeds["cos_g"], feeds["sin_g"] = _ov(c), _ov(s)
            feeds["mask_g"] = _ov(attention_masks(session.n_past, n, 0))
        if "cos_l" in self._input_names:
            c, s = rope_tables(
                pos, cfg.head_dim, cfg.rope_base_swa, cfg.rope_freq_scale, self._freq_factors
            )
            feeds["cos_l"], feeds["sin_l"] = _ov(c), _ov(s)
            feeds["mask_l"] = _ov(attention_masks(session.n_past, n, cfg.sliding_window))
        if self.shard.is_last:
            idx = np.arange(n, dtype=np.int64) if all_logits else np.array([n - 1], np.int64)
            feeds["out_idx"] = _ov(idx)
        outs = self._sess.run_with_ort_values(self._out_names, feeds)
        result = outs[0].numpy()
        for name, val in zip(self._out_names[1:], outs[1:], strict=True):
            kv.values[name.replace("present_", "past_")] = val
        return result

    def close(self) -> None:
        super().close()
        self._sess = None


def _ov(a: np.ndarray[Any, Any]) -> Any:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
