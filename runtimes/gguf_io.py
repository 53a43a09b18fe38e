"""Reading GGUF files (whole models or shard blobs) with the ``gguf`` package, defensively.

A GGUF from a peer is untrusted input: the header counts are capped before the parser sees
them, any parser failure becomes :class:`MalformedModelError`, every tensor must lie wholly
inside the file, and the tensors a unit needs must have the shapes its config implies.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .arch import ModelConfig, config_from_metadata, unit_count, unit_kind, unit_tensor_names
from .errors import MalformedModelError, ModelError, UnsupportedModelError

__all__ = [
    "GGUFFile",
    "TensorRef",
    "open_gguf",
    "SHARD_START_KEY",
    "SHARD_END_KEY",
    "TIED_KEY",
    "SUPPORTED_TYPES",
    "expected_shape",
]

log = logging.getLogger(__name__)

SHARD_START_KEY = "edgemesh.shard.unit_start"
SHARD_END_KEY = "edgemesh.shard.unit_end"
TIED_KEY = "edgemesh.shard.tied_embeddings"  # a block-only blob cannot tell from its tensors

_MAX_COUNT = 1 << 20  # tensors or metadata keys: far above any real model
_LARGE_ARRAY = 1 << 16  # arrays longer than this are not decoded eagerly (tokenizer tables)

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
except ImportError as exc:  # pragma: no cover - gguf is a dependency of every runtime extra
    raise ImportError("runtimes.gguf_io needs the 'gguf' package (pip install gguf)") from exc

T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K})


@dataclass(frozen=True)
class LargeArray:
    """Stands in for a long metadata array that was not decoded; only its length is known."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a GGUF file: raw bytes (or floats) as stored, no copy made."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical, numpy order: (rows, cols) for a matrix
    data: np.ndarray[Any, Any]  # uint8 (rows, row_bytes) for quantized types, else floats

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Float32 values with the logical shape."""
        if self.qtype == T.F32:
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.qtype == T.F16:
            return np.asarray(self.data, dtype=np.float16).astype(np.float32).reshape(self.shape)
        out = gguf.quants.dequantize(np.asarray(self.data), self.qtype)
        return np.asarray(out, dtype=np.float32).reshape(self.shape)


class GGUFFile:
    """A parsed, validated GGUF file: metadata, config, tensors, and the unit range it holds."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self.reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = _decode_field(key, field)
        self.tensors: dict[str, TensorRef] = {}
        file_size = path.stat().st_size
        for t in reader.tensors:
            if t.name in self.tensors:
                raise MalformedModelError(f"{path}: duplicate tensor {t.name!r}")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported: "
                    + ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
                )
            if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
                raise MalformedModelError(f"{path}: tensor {t.name} runs past the end of the file")
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorRef(t.name, t.tensor_type, shape, t.data)
        vocab_rows = None
        for name in ("token_embd.weight", "output.weight"):
            if name in self.tensors:
                vocab_rows = self.tensors[name].shape[0]
                break
        self.config: ModelConfig = config_from_metadata(
            self.metadata, set(self.tensors), vocab_rows
        )
        tied = self.metadata.get(TIED_KEY)
        if isinstance(tied, bool) and tied != self.config.tied_embeddings:
            self.config = replace(self.config, tied_embeddings=tied)
        n_units = unit_count(self.config.n_layers)
        start = self.metadata.get(SHARD_START_KEY, 0)
        end = self.metadata.get(SHARD_END_KEY, n_units)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n_units):
            raise MalformedModelError(f"{path}: bad shard unit range [{start}, {end})")
        self.unit_start: int = start
        self.unit_end: int = end
        for index in range(start, end):
            for name in unit_tensor_names(self.config, index):
                self._check_tensor(name, index)

    def _check_tensor(self, name: str, unit: int) -> None:
        kind, _ = unit_kind(unit, self.config.n_layers)
        ref = self.tensors.get(name)
        if ref is None:
            raise MalformedModelError(f"{self.path}: {kind} unit {unit} needs missing tensor {name}")
        want = expected_shape(self.config, name)
        if want is not None and ref.shape != want:
            raise MalformedModelError(
                f"{self.path}: tensor {name} has shape {ref.shape}, expected {want}"
            )

    @property
    def is_whole_model(self) -> bool:
        return self.unit_start == 0 and self.unit_end == unit_count(self.config.n_layers)

    def tensor(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor {name!r}") from None

    def unit_nbytes(self, index: int) -> int:
        return sum(self.tensors[n].nbytes for n in unit_tensor_names(self.config, index))

    def raw_fields(self) -> Iterable[tuple[str, Any]]:
        """(key, ReaderField) for every metadata key, in file order."""
        for key, field in self.reader.fields.items():
            if not key.startswith("GGUF."):
                yield key, field


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The logical (numpy-order) shape a tensor must have, or None if not constrained."""
    d, hd = config.d_model, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
    table: Mapping[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, d),
        "output.weight": (config.vocab_size, d),
        "output_norm.weight": (d,),
        "rope_freqs.weight": (hd // 2,),
        "attn_norm.weight": (d,),
        "attn_q.weight": (q, d),
        "attn_k.weight": (kv, d),
        "attn_v.weight": (kv, d),
        "attn_q.bias": (q,),
        "attn_k.bias": (kv,),
        "attn_v.bias": (kv,),
        "attn_output.weight": (d, q),
        "attn_q_norm.weight": (hd,),
        "attn_k_norm.weight": (hd,),
        "post_attention_norm.weight": (d,),
        "post_ffw_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "ffn_gate.weight": (config.d_ff, d),
        "ffn_up.weight": (config.d_ff, d),
        "ffn_down.weight": (d, config.d_ff),
    }
    return table.get(suffix)


def _decode_field(key: str, field: Any) -> Any:
    types = field.types
    if not types:
        raise MalformedModelError(f"metadata key {key!r} has no type")
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:
            raise UnsupportedModelError(f"metadata key {key!r} is a nested array")
        n = len(field.data)
        if n > _LARGE_ARRAY:
            return LargeArray(n)
    return field.contents()


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if len(head) < 24:
        raise MalformedModelError(f"{path}: truncated GGUF header ({len(head)} bytes)")
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
    if magic != b"GGUF":
        raise MalformedModelError(f"{path}: not a GGUF file (magic {magic!r})")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise MalformedModelError(f"{path}: implausible counts ({n_tensors} tensors, {n_kv} keys)")


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF file; raises a ModelError subclass on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"no such model file: {p}")
    _check_header(p)
    try:
        reader = GGUFReader(p, "r")
    except ModelError:
        raise
    except Exception as exc:
        # the gguf parser raises whatever numpy or struct raise on a cut or corrupt file
        raise MalformedModelError(f"{p}: malformed GGUF ({type(exc).__name__}: {exc})") from exc
    try:
        return GGUFFile(p, reader)
    except ModelError:
        raise
    except Exception as exc:
        raise MalformedModelError(f"{p}: malformed GGUF ({type(exc).__name__}: {exc})") from exc
