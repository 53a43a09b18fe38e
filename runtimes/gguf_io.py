"""Reading GGUF files (whole models or shard blobs) with the ``gguf`` package, defensively.

A GGUF from a peer is untrusted input: the header counts are capped before the parser sees
them, any parser failure becomes :class:`MalformedModelError`, every tensor must lie wholly
inside the file, and the tensors a unit needs must have the shapes its config implies.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .arch import (
    ModelConfig,
    config_from_metadata,
    extra_tensor_shapes,
    unit_count,
    unit_kind,
    unit_tensor_names,
)
from .errors import MalformedModelError, ModelError, UnsupportedModelError

__all__ = [
    "GGUFFile",
    "RawKV",
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
# Strings in all string arrays together (each a Python bytes object, ~40 bytes even when
# empty: a file of 8-byte empty strings would grow ~5x in memory). Gemma 3 has 262,144
# tokens, Llama 3 280,147 merges.
_MAX_ARRAY_STRINGS = 1 << 22
_MAX_ALIGNMENT = 1 << 16
_LARGE_ARRAY = 1 << 16  # arrays longer than this are not decoded eagerly (tokenizer tables)

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType
except ImportError as exc:  # pragma: no cover - gguf is a dependency of every runtime extra
    raise ImportError("runtimes.gguf_io needs the 'gguf' package (pip install gguf)") from exc

T = GGMLQuantizationType
_INT_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
# Every weight type llama.cpp's quantizer writes; runtimes.quant maps each onto MatMulNBits
# and gguf.quants dequantizes each (tinygrad).
SUPPORTED_TYPES = frozenset(
    {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
    | {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS}
    | {T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0}
    | ({T.MXFP4} if hasattr(T, "MXFP4") else set())
)


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


@dataclass(frozen=True)
class RawKV:
    """One metadata entry as stored: strings stay bytes, so that copies are byte-exact."""

    key: str
    vtype: GGUFValueType
    value: Any  # scalar, bytes, list[bytes] or numpy array
    sub_type: GGUFValueType | None = None


class GGUFFile:
    """A parsed, validated GGUF file: metadata, config, tensors, and the unit range it holds."""

    def __init__(
        self,
        path: Path,
        raw: list[RawKV],
        infos: list[tuple[str, list[int], int, int]],
        data: np.memmap[Any, Any],
        data_start: int,
    ) -> None:
        self.path = path
        self._data = data
        self.raw = raw
        self.metadata: dict[str, Any] = {kv.key: _decode(kv) for kv in raw}
        self.tensors: dict[str, TensorRef] = {}
        file_size = data.shape[0]
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                raise MalformedModelError(f"{path}: duplicate tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise MalformedModelError(
                    f"{path}: tensor {name} has unknown type {type_id}"
                ) from None
            if qtype not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{path}: tensor {name} has type {qtype.name}; supported: "
                    + ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
                )
            shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            if not shape or any(n <= 0 for n in shape) or shape[-1] % block:
                raise MalformedModelError(f"{path}: tensor {name} has a bad shape {shape}")
            rows = 1
            for n in shape[:-1]:  # Python ints: np.prod(int64) wraps for crafted dims
                rows *= n
            row_bytes = shape[-1] // block * block_bytes
            start = data_start + offset
            if offset % 32 or start + rows * row_bytes > file_size:
                raise MalformedModelError(f"{path}: tensor {name} runs past the end of the file")
            view = data[start : start + rows * row_bytes]
            arr: np.ndarray[Any, Any]
            if qtype == T.F32:
                arr = view.view(np.float32).reshape(shape)
            elif qtype == T.F16:
                arr = view.view(np.float16).reshape(shape)
            else:
                arr = view.reshape(shape[:-1] + (row_bytes,))
            self.tensors[name] = TensorRef(name, qtype, shape, arr)
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
        start_u = self.metadata.get(SHARD_START_KEY, 0)
        end_u = self.metadata.get(SHARD_END_KEY, n_units)
        if not (
            isinstance(start_u, int) and isinstance(end_u, int) and 0 <= start_u < end_u <= n_units
        ):
            raise MalformedModelError(f"{path}: bad shard unit range [{start_u}, {end_u})")
        self.unit_start: int = start_u
        self.unit_end: int = end_u
        for index in range(start_u, end_u):
            for name in unit_tensor_names(self.config, index):
                self._check_tensor(name, index)

    def _check_tensor(self, name: str, unit: int) -> None:
        kind, _ = unit_kind(unit, self.config.n_layers)
        ref = self.tensors.get(name)
        if ref is None:
            raise MalformedModelError(
                f"{self.path}: {kind} unit {unit} needs missing tensor {name}"
            )
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

    def release_pages(self) -> None:
        """Drop this file's mapped pages from the resident set (they are clean and re-read from
        the page cache if touched again): a runtime that has re-laid out the weights calls this
        so that the raw bytes and its own copy are not both counted."""
        mm = getattr(self._data, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                log.debug("madvise failed for %s", self.path)

    def unit_nbytes(self, index: int) -> int:
        return sum(self.tensors[n].nbytes for n in unit_tensor_names(self.config, index))


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
        **extra_tensor_shapes(config),
    }
    return table.get(suffix)


def _decode(kv: RawKV) -> Any:
    v = kv.value
    if kv.vtype == GGUFValueType.STRING:
        return v.decode("utf-8", errors="replace")
    if kv.vtype == GGUFValueType.ARRAY:
        if len(v) > _LARGE_ARRAY:
            return LargeArray(len(v))
        if kv.sub_type == GGUFValueType.STRING:
            return [b.decode("utf-8", errors="replace") for b in v]
        return v.tolist()
    return v


_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class _Cursor:
    """Bounds-checked little-endian reads from a memory map (never past the end)."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.strings = 0  # strings read in arrays so far (capped: _MAX_ARRAY_STRINGS)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise MalformedModelError(
                f"{self.path}: truncated GGUF (wanted {n} bytes at {self.pos})"
            )

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> bytes:
        n = self.unpack("<Q")
        self.need(n)
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def value(self, vtype: int, key: str) -> tuple[Any, GGUFValueType | None]:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype]), None
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype != GGUFValueType.ARRAY:
            raise MalformedModelError(f"{self.path}: key {key!r} has unknown type {vtype}")
        sub = self.unpack("<I")
        count = self.unpack("<Q")
        if sub == GGUFValueType.STRING:
            self.need(8 * count)  # every string takes at least its 8-byte length
            self.strings += count
            if self.strings > _MAX_ARRAY_STRINGS:
                raise MalformedModelError(
                    f"{self.path}: over {_MAX_ARRAY_STRINGS} strings in arrays (key {key!r})"
                )
            buf, pos, out = self.buf, self.pos, []
            end = len(buf)
            for _ in range(count):
                if pos + 8 > end:
                    raise MalformedModelError(f"{self.path}: truncated string array {key!r}")
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8
                if pos + n > end:
                    raise MalformedModelError(f"{self.path}: truncated string array {key!r}")
                out.append(bytes(buf[pos : pos + n]))
                pos += n
            self.pos = pos
            return out, GGUFValueType.STRING
        if sub not in _SCALARS:
            raise UnsupportedModelError(f"{self.path}: key {key!r} is an array of type {sub}")
        dt = np.dtype(_SCALARS[sub])
        self.need(count * dt.itemsize)
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
        self.pos += count * dt.itemsize
        return arr, GGUFValueType(sub)


def _parse(path: Path, data: np.memmap[Any, Any]) -> GGUFFile:
    cur = _Cursor(memoryview(data), path)  # type: ignore[arg-type]  # memmap is a buffer
    magic = bytes(cur.buf[:4]) if len(cur.buf) >= 4 else b""
    if len(cur.buf) < 24:
        raise MalformedModelError(f"{path}: truncated GGUF header ({len(cur.buf)} bytes)")
    if magic != b"GGUF":
        raise MalformedModelError(f"{path}: not a GGUF file (magic {magic!r})")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise MalformedModelError(f"{path}: implausible counts ({n_tensors} tensors, {n_kv} keys)")
    raw: list[RawKV] = []
    seen: set[str] = set()
    for _ in range(n_kv):
        key = cur.string().decode("utf-8", errors="replace")
        if key in seen:
            raise MalformedModelError(f"{path}: duplicate metadata key {key!r}")
        seen.add(key)
        vtype = cur.unpack("<I")
        value, sub = cur.value(vtype, key)
        raw.append(RawKV(key, GGUFValueType(vtype), value, sub))
    infos: list[tuple[str, list[int], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8", errors="replace")
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise MalformedModelError(f"{path}: tensor {name} has {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        if any(d > 1 << 40 for d in dims):
            raise MalformedModelError(f"{path}: tensor {name} has absurd dimensions {dims}")
        type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, dims, type_id, offset))
    align = 32
    for kv in raw:
        if kv.key == "general.alignment":
            if kv.vtype not in _INT_TYPES:
                raise MalformedModelError(f"{path}: general.alignment is not an integer")
            align = int(kv.value)
    if not 0 < align <= _MAX_ALIGNMENT or align & (align - 1):
        raise MalformedModelError(f"{path}: bad alignment {align}")
    data_start = (cur.pos + align - 1) // align * align
    return GGUFFile(path, raw, infos, data, data_start)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF file; raises a ModelError subclass on any problem.

    gguf's own GGUFReader builds numpy views for every tokenizer string (18 s for Gemma 3's
    262144 tokens here), so headers are parsed with struct; tensor data is memory-mapped.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"no such model file: {p}")
    if p.stat().st_size < 24:
        raise MalformedModelError(f"{p}: truncated GGUF header ({p.stat().st_size} bytes)")
    try:
        data = np.memmap(p, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot map {p}: {exc}") from exc
    return _parse(p, data)
