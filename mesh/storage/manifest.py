"""Object manifests and chunking: what an object *is*, independent of where it is stored.

A **manifest** is canonical JSON ``{"v": 1, "size": N, "chunks": [[sha, size], ...], "name":
..., "format": "raw" | "jsonl" | "gguf"}``; the object id is the SHA-256 of its bytes.
``jsonl`` objects are cut at line boundaries (a chunk holds whole records); ``gguf`` objects
are model shards, which the store keeps packed (:mod:`mesh.storage.store`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeGuard

from mesh.errors import Error

__all__ = [
    "Manifest",
    "StoreError",
    "QuotaExceeded",
    "CHUNK_MAX",
    "CHUNK_SIZE",
    "MAX_MANIFEST",
    "FORMATS",
    "PACKED",
    "build_manifest",
    "parse_manifest",
    "iter_chunks",
    "is_id",
    "sha256",
]

CHUNK_MAX = 2 << 20  # IPFS bitswap's block cap; every chunk from the network is <= this
CHUNK_SIZE = 2 << 20
MAX_MANIFEST = 1 << 20  # about 14,000 chunks: objects up to ~28 GiB
MAX_NAME = 200
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
FORMATS = ("raw", "jsonl", "gguf")
PACKED = "gguf"  # objects of this format are kept as one data file


class StoreError(Error):
    """An object or chunk is missing, malformed, or fails its hash."""


class QuotaExceeded(StoreError):
    """Storing more would exceed the store's quota even after garbage collection."""


def is_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(_HEX64.match(value))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    id: str
    size: int
    chunks: tuple[tuple[str, int], ...]
    name: str
    format: str
    raw: bytes

    @property
    def shas(self) -> list[str]:
        return [c[0] for c in self.chunks]

    def offsets(self) -> list[int]:
        out, pos = [], 0
        for _, n in self.chunks:
            out.append(pos)
            pos += n
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": self.size,
            "chunks": len(self.chunks),
            "name": self.name,
            "format": self.format,
        }


def build_manifest(chunks: list[tuple[str, int]], name: str = "", fmt: str = "raw") -> Manifest:
    doc = {
        "v": 1,
        "size": sum(n for _, n in chunks),
        "chunks": [[s, n] for s, n in chunks],
        "name": name[:MAX_NAME],
        "format": fmt,
    }
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return parse_manifest(raw, sha256(raw), repeats=True)


def parse_manifest(
    raw: bytes, expected_id: str | None = None, *, repeats: bool = False
) -> Manifest:
    """Validate manifest bytes (pure; the id is their hash). Raises StoreError.

    A manifest that names one chunk twice is refused unless ``repeats`` (the store's own
    manifests, built from files it chunked): from a peer, 1 MiB of manifest naming one 2 MiB
    chunk 13,500 times would be a 27 GiB object backed by 2 MiB of served bytes."""
    if not isinstance(raw, bytes) or len(raw) > MAX_MANIFEST:
        raise StoreError("manifest missing or over its size cap")
    mid = sha256(raw)
    if expected_id is not None and mid != expected_id:
        raise StoreError(f"manifest hashes to {mid[:12]}, not {str(expected_id)[:12]}")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise StoreError("manifest is not JSON") from None
    except RecursionError:  # "[" nested 200,000 deep is valid-looking JSON to the decoder
        raise StoreError("manifest is nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise StoreError("unknown manifest version")
    chunks, size = doc.get("chunks"), doc.get("size")
    name, fmt = doc.get("name", ""), doc.get("format", "raw")
    if not isinstance(chunks, list) or type(size) is not int or size < 0:
        raise StoreError("manifest fields have wrong types")
    if not isinstance(name, str) or len(name) > MAX_NAME or fmt not in FORMATS:
        raise StoreError("manifest name or format invalid")
    out: list[tuple[str, int]] = []
    for c in chunks:
        if (
            not isinstance(c, list)
            or len(c) != 2
            or not is_id(c[0])
            or type(c[1]) is not int
            or not 0 < c[1] <= CHUNK_MAX
        ):
            raise StoreError("manifest chunk entry invalid")
        out.append((c[0], c[1]))
    if sum(n for _, n in out) != size:
        raise StoreError("manifest size does not match its chunks")
    if not repeats and len({sha for sha, _ in out}) != len(out):
        raise StoreError("manifest names a chunk more than once")
    return Manifest(mid, size, tuple(out), name, fmt, raw)


def iter_chunks(fh: BinaryIO, fmt: str = "raw", chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Cut a stream into chunks; ``jsonl`` chunks end at a newline (a record never straddles
    two chunks; a single record longer than ``CHUNK_MAX`` is refused)."""
    if not 0 < chunk_size <= CHUNK_MAX:
        raise StoreError(f"chunk size must be in 1..{CHUNK_MAX}")
    carry = b""
    while True:
        block = fh.read(chunk_size - len(carry))
        data = carry + block
        if not block:
            if data:
                yield data
            return
        if fmt == "jsonl" and len(data) == chunk_size:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                raise StoreError(f"a record is longer than a chunk ({chunk_size} bytes)")
            data, carry = data[:cut], data[cut:]
        else:
            carry = b""
        if data:
            yield data
