"""Taking a well-formed GGUF apart and putting a crafted one together, for the attack tests.

A hostile peer controls a shard blob's every byte (and the manifest naming its hash), so the
tests build what it could send: any key with any value type, counts and lengths that lie,
tensor dims, types and offsets of its choosing. :func:`split` gives a file's parts,
:func:`join` serializes (possibly edited) parts again, keeping the tensor data after the
header at the same relative offsets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
SCALAR_FMT |= {10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
UINT32, INT32, FLOAT32, UINT64 = 4, 5, 6, 10


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    type_id: int
    offset: int


@dataclass
class Parts:
    version: int
    kvs: list[tuple[str, int, bytes]]  # key, value type, the value's bytes as stored
    tensors: list[Tensor]
    data: bytes  # everything from the (32-aligned) start of the tensor data
    n_kv: int | None = None  # set to lie about the counts
    n_tensors: int | None = None
    extra: dict[str, int] = field(default_factory=dict)

    def get(self, key: str) -> tuple[int, bytes] | None:
        for k, t, v in self.kvs:
            if k == key:
                return t, v
        return None

    def set(self, key: str, vtype: int, payload: bytes) -> None:
        for i, (k, _, _) in enumerate(self.kvs):
            if k == key:
                self.kvs[i] = (key, vtype, payload)
                return
        self.kvs.append((key, vtype, payload))

    def drop(self, key: str) -> None:
        self.kvs = [kv for kv in self.kvs if kv[0] != key]


def s(b: bytes | str) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    raw = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(raw)) + raw


def scalar(vtype: int, value: object) -> bytes:
    return struct.pack(SCALAR_FMT[vtype], value)


def array(sub: int, items: list[bytes], count: int | None = None) -> bytes:
    """An array value's bytes (each item already serialized); ``count`` may lie."""
    n = len(items) if count is None else count
    return struct.pack("<IQ", sub, n) + b"".join(items)


def _value_len(data: bytes, pos: int, vtype: int) -> int:
    if vtype == STRING:
        return 8 + struct.unpack_from("<Q", data, pos)[0]
    if vtype == ARRAY:
        sub, count = struct.unpack_from("<IQ", data, pos)
        at = pos + 12
        if sub == STRING:
            for _ in range(count):
                at += 8 + struct.unpack_from("<Q", data, at)[0]
        else:
            at += count * struct.calcsize(SCALAR_FMT[sub])
        return at - pos
    return struct.calcsize(SCALAR_FMT[vtype])


def split(data: bytes) -> Parts:
    """The parts of a well-formed GGUF (as gguf.GGUFWriter writes them: alignment 32)."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24
    kvs = []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        size = _value_len(data, pos, vtype)
        kvs.append((key, vtype, data[pos : pos + size]))
        pos += size
    tensors = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8 : pos + 8 + n]
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos + 4))
        pos += 4 + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", data, pos)
        pos += 12
        tensors.append(Tensor(name, dims, type_id, offset))
    start = (pos + 31) // 32 * 32
    return Parts(version, kvs, tensors, data[start:])


def join(p: Parts) -> bytes:
    out = bytearray(b"GGUF")
    n_tensors = len(p.tensors) if p.n_tensors is None else p.n_tensors
    n_kv = len(p.kvs) if p.n_kv is None else p.n_kv
    out += struct.pack("<IQQ", p.version, n_tensors, n_kv)
    for key, vtype, payload in p.kvs:
        out += s(key) + struct.pack("<I", vtype) + payload
    for t in p.tensors:
        out += s(t.name) + struct.pack("<I", len(t.dims))
        out += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.type_id, t.offset)
    out += b"\0" * (-len(out) % 32)
    return bytes(out) + p.data
