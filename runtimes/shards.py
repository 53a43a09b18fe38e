"""Shards: a model split into units, contiguous unit ranges packed into content-addressed blobs.

Units are 0 = token embedding, 1..n = blocks, n+1 = final norm + head. A blob is a valid GGUF
file holding a unit range's tensors, the model's hyperparameters and its range (keys
``edgemesh.shard.*``); tokenizer tables travel only in blobs holding the embedding or the head,
since block-only blobs have no use for them (Gemma 3's tables are several MB). A blob is named
by the sha256 of its bytes; the manifest lists units, their byte sizes and blob hashes, and the
model id is the sha256 of the manifest's canonical JSON. Everything loaded is hash-verified.

A blob may also name the content-addressed store object that carries it (``object``; the
mesh stores each shard as one): whoever stores blobs elsewhere than ``blobs/`` gives
:class:`ShardStore` a ``locate`` function from blob to file path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .arch import ModelConfig, unit_count, unit_kind, unit_tensor_names
from .errors import MalformedModelError, ModelError, ShardIntegrityError
from .gguf_io import SHARD_END_KEY, SHARD_START_KEY, TIED_KEY, GGUFFile, TensorRef, open_gguf

__all__ = [
    "ShardSpec",
    "BlobInfo",
    "UnitInfo",
    "Manifest",
    "ShardStore",
    "pack_range",
    "sha256_file",
    "layer_units",
    "MANIFEST_FORMAT",
    "MODEL_MANIFEST_MAX",
    "ChatInfo",
    "chat_info",
    "MAX_CHAT_TEMPLATE",
]

log = logging.getLogger(__name__)

import gguf  # noqa: E402
from gguf import GGMLQuantizationType, GGUFValueType  # noqa: E402

MANIFEST_FORMAT = "edgemesh-manifest/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MODEL_MANIFEST_MAX = 4 << 20  # bytes of a model manifest's JSON
MAX_CHAT_TEMPLATE = 64 << 10  # llama.cpp's largest templates are about 10 KiB
_SKIP_KEYS = {"general.architecture", "general.alignment", SHARD_START_KEY, SHARD_END_KEY, TIED_KEY}


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def layer_units(start_layer: int, end_layer: int, n_layers: int) -> tuple[int, int]:
    """Unit range for a stage running layers [a, b): the first stage also embeds, the last
    also applies the final norm and head."""
    if not 0 <= start_layer < end_layer <= n_layers:
        raise ValueError(f"bad layer range [{start_layer}, {end_layer}) of {n_layers}")
    u0 = 0 if start_layer == 0 else start_layer + 1
    u1 = n_layers + 2 if end_layer == n_layers else end_layer + 1
    return u0, u1


@dataclass
class ShardSpec:
    """What a runtime loads: a model config, a unit range and that range's tensors."""

    config: ModelConfig
    start: int
    end: int
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    files: list[GGUFFile] = field(default_factory=list)  # keeps the memory maps alive
    whole_model_path: Path | None = None  # one GGUF holding every unit (llama.cpp loads it)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.config.n_units:
            raise ValueError(f"bad unit range [{self.start}, {self.end})")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.config.n_units

    @property
    def layers(self) -> range:
        """Block indices in this shard."""
        return range(max(self.start, 1) - 1, min(self.end, self.config.n_layers + 1) - 1)

    def tensor(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"shard [{self.start}, {self.end}) lacks tensor {name}") from None

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def from_gguf(
        cls, model: GGUFFile, start: int | None = None, end: int | None = None
    ) -> ShardSpec:
        s = model.unit_start if start is None else start
        e = model.unit_end if end is None else end
        if not model.unit_start <= s < e <= model.unit_end:
            raise ModelError(
                f"{model.path} holds units [{model.unit_start}, {model.unit_end}), not [{s}, {e})"
            )
        names = {n for i in range(s, e) for n in unit_tensor_names(model.config, i)}
        whole = model.path if model.is_whole_model else None
        return cls(model.config, s, e, {n: model.tensors[n] for n in names}, [model], whole)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], start: int | None = None, end: int | None = None
    ) -> ShardSpec:
        """A plain GGUF file (whole model or a blob), without hash verification."""
        return cls.from_gguf(open_gguf(path), start, end)

    @classmethod
    def virtual(cls, config: ModelConfig, start: int, end: int) -> ShardSpec:
        """A shard without tensors, for the fake runtime."""
        return cls(config, start, end)


@dataclass(frozen=True)
class UnitInfo:
    index: int
    kind: str
    layer: int | None
    tensors: tuple[str, ...]
    nbytes: int
    blob: str


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int
    unit_start: int
    unit_end: int
    object: str = ""  # the store object carrying this blob, where one does


@dataclass(frozen=True)
class ChatInfo:
    """What a chat endpoint needs of the GGUF, carried in the manifest (whose hash is the
    model id, so no peer can swap it): the Jinja chat template and the BOS/EOS texts it
    refers to, and the context length a prompt must fit."""

    context_length: int = 0  # 0: not recorded
    template: str = ""  # "": the GGUF has no chat template
    bos_token: str = ""
    eos_token: str = ""

    def to_doc(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length,
            "template": self.template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }

    @classmethod
    def from_doc(cls, doc: Any) -> ChatInfo:
        if not isinstance(doc, dict):
            raise ValueError("chat is not an object")
        n = doc.get("context_length", 0)
        if type(n) is not int or not 0 <= n <= 1 << 24:
            raise ValueError("bad context_length")
        texts = [doc.get(k, "") for k in ("template", "bos_token", "eos_token")]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("chat texts must be strings")
        if len(texts[0]) > MAX_CHAT_TEMPLATE or max(len(texts[1]), len(texts[2])) > 256:
            raise ValueError("chat template or special token text too long")
        return cls(n, *texts)


def chat_info(meta: dict[str, Any], context_length: int) -> ChatInfo:
    """The chat part of a whole model's GGUF metadata (bounded: an over-long template is
    left out, and the chat endpoint then says the model has none)."""
    template = meta.get("tokenizer.chat_template", "")
    if not isinstance(template, str) or len(template) > MAX_CHAT_TEMPLATE:
        template = ""
    tokens = meta.get("tokenizer.ggml.tokens")

    def text(key: str) -> str:
        i = meta.get(key)
        if type(i) is not int or not isinstance(tokens, list | tuple) or not 0 <= i < len(tokens):
            return ""
        t = tokens[i]
        return t if isinstance(t, str) and len(t) <= 256 else ""

    return ChatInfo(
        max(0, min(int(context_length), 1 << 24)),
        template,
        text("tokenizer.ggml.bos_token_id"),
        text("tokenizer.ggml.eos_token_id"),
    )


@dataclass(frozen=True)
class Manifest:
    architecture: str
    name: str
    n_layers: int
    units: tuple[UnitInfo, ...]
    blobs: tuple[BlobInfo, ...]
    chat: ChatInfo | None = None  # only when recorded: older manifests keep their ids

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "architecture": self.architecture,
            "name": self.name,
            "n_layers": self.n_layers,
            "units": [
                {
                    "index": u.index,
                    "kind": u.kind,
                    "layer": u.layer,
                    "tensors": list(u.tensors),
                    "nbytes": u.nbytes,
                    "blob": u.blob,
                }
                for u in self.units
            ],
            "blobs": [_blob_doc(b) for b in self.blobs],
        }
        if self.chat is not None:
            doc["chat"] = self.chat.to_doc()
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def model_id(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    def blobs_for(self, start: int, end: int) -> list[BlobInfo]:
        """Blobs that together hold units [start, end)."""
        if not 0 <= start < end <= len(self.units):
            raise ValueError(f"bad unit range [{start}, {end})")
        return [b for b in self.blobs if b.unit_start < end and b.unit_end > start]

    @classmethod
    def from_json(cls, data: bytes, expected_id: str | None = None) -> Manifest:
        if len(data) > MODEL_MANIFEST_MAX:
            raise MalformedModelError(f"manifest of {len(data)} bytes exceeds the cap")
        if expected_id is not None and hashlib.sha256(data).hexdigest() != expected_id:
            raise ShardIntegrityError(f"manifest does not hash to model id {expected_id}")
        try:
            doc = json.loads(data)
            m = _parse_manifest(doc)
        except (ValueError, TypeError, KeyError) as exc:
            raise MalformedModelError(f"malformed manifest: {exc}") from exc
        except RecursionError:  # "[" nested 200,000 deep decodes into a RecursionError
            raise MalformedModelError("malformed manifest: nested too deeply") from None
        if m.to_json() != data and expected_id is not None:
            raise MalformedModelError("manifest is not in canonical form")
        return m


def _blob_doc(b: BlobInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {"sha256": b.sha256, "size": b.size, "units": [b.unit_start, b.unit_end]}
    if b.object:  # only when named: manifests without objects keep their ids
        doc["object"] = b.object
    return doc


def _parse_manifest(doc: Any) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"format is not {MANIFEST_FORMAT}")
    n_layers = doc["n_layers"]
    if not isinstance(n_layers, int) or not 0 < n_layers < 1 << 16:
        raise ValueError("bad n_layers")
    units: list[UnitInfo] = []
    for i, u in enumerate(doc["units"]):
        kind, layer = unit_kind(i, n_layers)
        if u["index"] != i or u["kind"] != kind or u["layer"] != layer:
            raise ValueError(f"unit {i} is out of order or of the wrong kind")
        if not isinstance(u["nbytes"], int) or u["nbytes"] < 0 or not _HEX64.match(u["blob"]):
            raise ValueError(f"unit {i} has a bad size or blob hash")
        tensors = tuple(str(t) for t in u["tensors"])
        units.append(UnitInfo(i, kind, layer, tensors, u["nbytes"], u["blob"]))
    if len(units) != unit_count(n_layers):
        raise ValueError(f"{len(units)} units for {n_layers} layers")
    blobs: list[BlobInfo] = []
    expect = 0
    for b in doc["blobs"]:
        s, e = b["units"]
        if not (isinstance(s, int) and isinstance(e, int)) or s != expect or e <= s:
            raise ValueError("blob unit ranges must be contiguous and cover every unit")
        if not _HEX64.match(b["sha256"]) or not isinstance(b["size"], int) or b["size"] <= 0:
            raise ValueError("blob has a bad hash or size")
        if any(units[i].blob != b["sha256"] for i in range(s, min(e, len(units)))):
            raise ValueError("unit and blob hashes disagree")
        obj = b.get("object", "")
        if not isinstance(obj, str) or (obj and not _HEX64.match(obj)):
            raise ValueError("blob has a bad object id")
        blobs.append(BlobInfo(b["sha256"], b["size"], s, e, obj))
        expect = e
    if expect != len(units):
        raise ValueError("blobs do not cover every unit")
    chat = ChatInfo.from_doc(doc["chat"]) if "chat" in doc else None
    return Manifest(
        str(doc["architecture"]), str(doc["name"]), n_layers, tuple(units), tuple(blobs), chat
    )


def _copy_metadata(writer: Any, model: GGUFFile, with_tokenizer: bool) -> None:
    for kv in model.raw:
        if kv.key in _SKIP_KEYS or (kv.key.startswith("tokenizer.") and not with_tokenizer):
            continue
        if kv.vtype == GGUFValueType.ARRAY:
            val = kv.value if kv.sub_type == GGUFValueType.STRING else kv.value.tolist()
            if not len(val):
                continue  # the writer refuses empty arrays
            writer.add_key_value(kv.key, val, kv.vtype, sub_type=kv.sub_type)
        else:
            writer.add_key_value(kv.key, kv.value, kv.vtype)


def pack_range(model: GGUFFile, start: int, end: int, out_dir: str | os.PathLike[str]) -> BlobInfo:
    """Write units [start, end) of ``model`` as a GGUF blob named ``<sha256>.gguf``."""
    cfg = model.config
    if not model.unit_start <= start < end <= model.unit_end:
        raise ModelError(f"{model.path} does not hold units [{start}, {end})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_units = cfg.n_units
    names: list[str] = []
    for i in range(start, end):
        for n in unit_tensor_names(cfg, i):
            if n not in names:
                names.append(n)
    fd, tmp_name = tempfile.mkstemp(prefix=".blob-", suffix=".tmp", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), cfg.arch)
        _copy_metadata(w, model, with_tokenizer=start == 0 or end == n_units)
        if f"{cfg.arch}.vocab_size" not in model.metadata:
            w.add_uint32(f"{cfg.arch}.vocab_size", cfg.vocab_size)
        w.add_uint32(SHARD_START_KEY, start)
        w.add_uint32(SHARD_END_KEY, end)
        w.add_bool(TIED_KEY, cfg.tied_embeddings)
        for n in names:
            t = model.tensors[n]
            raw = (
                None if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else t.qtype
            )
            w.add_tensor(n, t.data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        digest = sha256_file(tmp)
        final = out / f"{digest}.gguf"
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return BlobInfo(digest, final.stat().st_size, start, end)


class ShardStore:
    """A directory of blobs (``blobs/<sha256>.gguf``) and manifests (``manifests/<id>.json``)."""

    def __init__(
        self, root: str | os.PathLike[str], locate: Callable[[BlobInfo], Path] | None = None
    ) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.manifest_dir = self.root / "manifests"
        self.locate = locate  # where a blob's file is, when not under blob_dir

    def blob_path(self, sha256: str) -> Path:
        if not _HEX64.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.blob_dir / f"{sha256}.gguf"

    def add_model(
        self, path: str | os.PathLike[str], partition: Sequence[tuple[int, int]] | None = None
    ) -> Manifest:
        """Split a whole-model GGUF into blobs (one per unit unless ``partition`` gives
        contiguous unit ranges) and store them with their manifest."""
        model = open_gguf(path)
        if not model.is_whole_model:
            raise ModelError(f"{path} is a shard, not a whole model")
        n_units = model.config.n_units
        ranges = list(partition) if partition is not None else [(i, i + 1) for i in range(n_units)]
        if (
            not ranges
            or ranges[0][0] != 0
            or ranges[-1][1] != n_units
            or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            or any(s >= e for s, e in ranges)
        ):
            raise ValueError(f"partition {ranges} does not cover units 0..{n_units} contiguously")
        blobs = [pack_range(model, s, e, self.blob_dir) for s, e in ranges]
        units = []
        for b in blobs:
            for i in range(b.unit_start, b.unit_end):
                kind, layer = unit_kind(i, model.config.n_layers)
                names = tuple(unit_tensor_names(model.config, i))
                units.append(UnitInfo(i, kind, layer, names, model.unit_nbytes(i), b.sha256))
        cfg = model.config
        chat = chat_info(model.metadata, cfg.context_length)
        manifest = Manifest(cfg.arch, cfg.name, cfg.n_layers, tuple(units), tuple(blobs), chat)
        self.save_manifest(manifest)
        log.info("stored %s as %d blobs, model id %s", path, len(blobs), manifest.model_id)
        return manifest

    def save_manifest(self, manifest: Manifest) -> Path:
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        p = self.manifest_dir / f"{manifest.model_id}.json"
        p.write_bytes(manifest.to_json())
        return p

    def load_manifest(self, model_id: str) -> Manifest:
        if not _HEX64.match(model_id):
            raise ValueError(f"not a model id: {model_id!r}")
        p = self.manifest_dir / f"{model_id}.json"
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise ModelError(f"no manifest for model {model_id}") from None
        return Manifest.from_json(data, expected_id=model_id)

    def verify_blob(self, blob: BlobInfo) -> Path:
        p = self.locate(blob) if self.locate is not None else self.blob_path(blob.sha256)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise ModelError(f"blob {blob.sha256} is not in {self.blob_dir}") from None
        if size != blob.size:
            raise ShardIntegrityError(
                f"blob {blob.sha256}: {size} bytes on disk, manifest says {blob.size}"
            )
        got = sha256_file(p)
        if got != blob.sha256:
            raise ShardIntegrityError(f"blob {blob.sha256} is corrupt: its bytes hash to {got}")
        return p

    def open_range(self, manifest: Manifest, start: int, end: int) -> ShardSpec:
        """Verify and open the blobs holding units [start, end)."""
        files: list[GGUFFile] = []
        tensors: dict[str, TensorRef] = {}
        config: ModelConfig | None = None
        for b in manifest.blobs_for(start, end):
            f = open_gguf(self.verify_blob(b))
            if (f.unit_start, f.unit_end) != (b.unit_start, b.unit_end):
                raise MalformedModelError(f"blob {b.sha256} holds units other than the manifest's")
            cfg = f.config
            if config is None:
                config = cfg
            elif _hparams(config) != _hparams(cfg):
                raise MalformedModelError(f"blob {b.sha256} belongs to a different model")
            files.append(f)
            s, e = max(start, f.unit_start), min(end, f.unit_end)
            for i in range(s, e):
                for n in unit_tensor_names(cfg, i):
                    tensors[n] = f.tensors[n]
        if config is None or config.arch != manifest.architecture:
            raise MalformedModelError("manifest and blobs disagree on the architecture")
        # an embedding-only blob cannot tell that the blocks have rope_freqs (llama3)
        config = replace(config, has_rope_freqs=any(f.config.has_rope_freqs for f in files))
        whole = files[0].path if len(files) == 1 and files[0].is_whole_model else None
        return ShardSpec(config, start, end, tensors, files, whole)


def _hparams(c: ModelConfig) -> tuple[Any, ...]:
    return (
        c.arch,
        c.n_layers,
        c.d_model,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.d_ff,
        c.vocab_size,
        c.rope_base,
        c.sliding_window,
        c.swa_layers,
        c.tied_embeddings,
    )
