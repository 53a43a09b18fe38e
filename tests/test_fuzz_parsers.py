"""Every parser that takes bytes from the network, fuzzed: nothing escapes but its own error.

(The frame parser, signaling envelopes and DHT values have their own fuzz tests in
test_wire.py, test_signaling.py and test_dht.py.) Regression inputs live in tests/corpus/.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.discovery.mdns import make_properties, parse_announcement
from mesh.errors import DiscoveryError, Error, HandshakeError
from mesh.net.handshake import parse_hello, parse_proof
from mesh.net.identity import Identity
from mesh.storage.store import StoreError, build_manifest, parse_manifest, sha256
from runtimes.errors import ModelError
from runtimes.gguf_io import LargeArray, open_gguf
from runtimes.shards import Manifest

from . import ggufcraft as gc
from .strategies import ANY

pytestmark = pytest.mark.badinput
CORPUS = Path(__file__).parent / "corpus"


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["t", "v", "id", "pk", "nonce", "sig", "x"]), ANY, max_size=6)
)
def test_fuzz_handshake_messages(header):
    for parse in (parse_hello, parse_proof):
        try:
            parse(header)
        except HandshakeError:
            pass


ME = Identity.generate()
GOOD_TXT = {
    k.encode(): v.encode() for k, v in make_properties(ME, 4000, ["10.0.0.2"], "n", "m").items()
}


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"id", b"pk", b"sp", b"a", b"n", b"m", b"t", b"sig"]),
        st.one_of(st.none(), st.binary(max_size=120)),
        max_size=8,
    ),
    st.booleans(),
)
def test_fuzz_mdns_txt(props, merge):
    txt = {**GOOD_TXT, **props} if merge else props
    try:
        parse_announcement(txt, f"{ME.peer_id}._edgemesh._tcp.local.")
    except DiscoveryError:
        pass


def _manifest_inputs():
    good = build_manifest([(sha256(b"a" * 10), 10), (sha256(b"b" * 5), 5)], "x").raw
    return st.one_of(
        st.binary(max_size=400),
        st.integers(0, len(good)).map(lambda n: good[:n]),
        st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(
            lambda t: good[: t[0]] + bytes([t[1]]) + good[t[0] + 1 :]
        ),
        ANY.map(lambda obj: msgpack.packb(obj)),
        ANY.map(lambda obj: json.dumps(obj, default=str).encode()),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_manifest_inputs())
def test_fuzz_object_manifests(raw):
    try:
        parse_manifest(raw)
    except StoreError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), ANY.map(lambda o: json.dumps(o, default=str).encode())))
def test_fuzz_model_manifests(raw):
    try:
        Manifest.from_json(raw)
    except ModelError:
        pass


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    from runtimes.testmodels import write_test_model

    path = write_test_model(tmp_path_factory.mktemp("fz") / "m.gguf", "llama")
    return path.read_bytes()[:4096]  # the header and metadata region


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_gguf_headers(gguf_bytes, tmp_path_factory, data):
    """A shard blob from a peer is hash-checked first, but the parser must hold up anyway."""
    cut = data.draw(st.integers(0, len(gguf_bytes)))
    pos = data.draw(st.integers(0, len(gguf_bytes) - 1))
    val = data.draw(st.integers(0, 255))
    raw = bytearray(gguf_bytes[:cut] if data.draw(st.booleans()) else gguf_bytes)
    if pos < len(raw):
        raw[pos] = val
    path = tmp_path_factory.mktemp("g") / "x.gguf"
    path.write_bytes(bytes(raw))
    try:
        open_gguf(path)
    except (ModelError, Error):
        pass


# --- GGUF headers, field by field -------------------------------------------------------------
# A hostile peer controls a blob's every byte and the manifest naming its hash, so the hash
# check proves nothing about the header. The mutations below edit the parsed parts (any key
# given any value type, keys dropped, tensor dims, types, offsets, lying counts) and serialize
# them again, rather than flipping random bytes, which mostly just truncates a string.

_EDGE_INTS = [0, 1, 2, 3, 5, 7, 9, 31, 32, 33, 63, 64, 255, 256, 257, 4095, 65535, 65536]
_EDGE_INTS += [2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**40 + 1, 2**62, 2**63]
_EDGE_INTS += [2**63 + 1, 2**64 - 2, 2**64 - 1]
_EDGE_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 3e38]
_MORE_KEYS = ["general.alignment", "edgemesh.shard.unit_start", "edgemesh.shard.unit_end"]
_MORE_KEYS += ["edgemesh.shard.tied_embeddings"] + [
    "{}." + k
    for k in (
        "vocab_size",
        "attention.sliding_window",
        "attention.sliding_window_pattern",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.freq_base_swa",
        "final_logit_softcapping",
    )
]


def _uint(draw: Callable[[Any], Any], bits: int) -> int:
    return int(draw(st.sampled_from(_EDGE_INTS) | st.integers(0, 300))) % (1 << bits)


def _any_value(draw: Callable[[Any], Any]) -> tuple[int, bytes]:
    """Any GGUF value: (value type, its bytes)."""
    kind = draw(st.sampled_from(["u32", "i32", "u64", "f32", "bool", "str", "au32", "astr"]))
    if kind == "u32":
        return gc.UINT32, gc.scalar(gc.UINT32, _uint(draw, 32))
    if kind == "i32":
        return gc.INT32, gc.scalar(gc.INT32, draw(st.integers(-(2**31), 2**31 - 1)))
    if kind == "u64":
        return gc.UINT64, gc.scalar(gc.UINT64, _uint(draw, 64))
    if kind == "f32":
        return gc.FLOAT32, gc.scalar(gc.FLOAT32, draw(st.sampled_from(_EDGE_FLOATS)))
    if kind == "bool":
        return 7, gc.scalar(7, draw(st.booleans()))
    if kind == "str":
        return gc.STRING, gc.s(draw(st.text(max_size=6)))
    n = draw(st.integers(0, 4))
    lie = draw(st.sampled_from([None, None, None, None, None, 2**62, 2**40]))
    if kind == "au32":
        items = [gc.scalar(gc.UINT32, _uint(draw, 32)) for _ in range(n)]
        return gc.ARRAY, gc.array(gc.UINT32, items, lie)
    return gc.ARRAY, gc.array(gc.STRING, [gc.s("ab") for _ in range(n)], lie)


def _mutate_once(draw: Callable[[Any], Any], p: gc.Parts) -> None:
    arch_kv = p.get("general.architecture")
    arch = arch_kv[1][8:].decode(errors="replace") if arch_kv else "llama"
    op = draw(
        st.sampled_from(
            ["value", "value", "number", "head_dim", "drop", "tensor"] * 2 + ["count", "version"]
        )
    )
    keys = [k for k, _, _ in p.kvs]
    if op == "value":
        key = draw(st.sampled_from(keys + [k.format(arch) for k in _MORE_KEYS]))
        p.set(key, *_any_value(draw))
    elif op == "number":  # same key, same type, another number: the file stays well framed
        numeric = [(k, t) for k, t, _ in p.kvs if t in gc.SCALAR_FMT and t not in (6, 7, 12)]
        key, vtype = draw(st.sampled_from(numeric))
        bits = 8 * struct.calcsize(gc.SCALAR_FMT[vtype])
        u = _uint(draw, bits)
        if gc.SCALAR_FMT[vtype].islower() and u >= 1 << (bits - 1):
            u -= 1 << bits
        p.set(key, vtype, gc.scalar(vtype, u))
    elif op == "head_dim":  # key/value/rope dims agree, so the value itself is what is tested
        v = gc.scalar(gc.UINT32, _uint(draw, 32))
        for k in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            p.set(f"{arch}.{k}", gc.UINT32, v)
    elif op == "drop":
        p.drop(draw(st.sampled_from(keys)))
    elif op == "tensor":
        t = draw(st.sampled_from(p.tensors))
        what = draw(st.sampled_from(["dim", "dim", "ndims", "type", "offset"]))
        if what == "dim" and t.dims:
            t.dims[draw(st.integers(0, len(t.dims) - 1))] = _uint(draw, 64)
        elif what in ("ndims", "dim"):
            t.dims = t.dims + [_uint(draw, 40)] if draw(st.booleans()) else t.dims[:-1]
        elif what == "type":
            t.type_id = _uint(draw, 32)
        else:
            t.offset = _uint(draw, 64)
    elif op == "count":
        if draw(st.booleans()):
            p.n_kv = _uint(draw, 64)
        else:
            p.n_tensors = _uint(draw, 64)
    else:
        p.version = _uint(draw, 32)


def gguf_mutation(draw: Callable[[Any], Any], data: bytes) -> bytes:
    """``data`` with 1-3 crafted edits (now and then also cut short); ``draw`` is
    ``st.data().draw`` (a composite strategy would print the whole file)."""
    parts = gc.split(data)
    for _ in range(draw(st.integers(1, 3))):
        _mutate_once(draw, parts)
    raw = gc.join(parts)
    if draw(st.integers(0, 15)) == 0:  # cut, mostly inside the header
        header_end = len(raw) - len(parts.data)
        raw = raw[: draw(st.integers(24, min(len(raw), header_end + 64)))]
    return raw


@pytest.fixture(scope="module")
def gguf_targets(tmp_path_factory):
    """A whole test model and one shard blob of it (the embedding: it carries the tokenizer)."""
    from runtimes.shards import ShardStore
    from runtimes.testmodels import write_test_model

    d = tmp_path_factory.mktemp("fzg")
    whole = write_test_model(d / "m.gguf", "qwen2")
    store = ShardStore(d / "store")
    manifest = store.add_model(whole, [(0, 1), (1, open_gguf(whole).config.n_units)])
    blob = store.blob_path(manifest.blobs[0].sha256).read_bytes()
    return {"whole": whole.read_bytes(), "blob": blob}, manifest


def _peer_blob_entry_points(path: Path, manifest: Manifest, work: Path) -> None:
    """What a node does with a shard blob a peer served (the hash matches: the peer chose
    both): the storage-backed open of mesh/inference/memory.py, and what runs on the result."""
    from dataclasses import replace as dc_replace

    from runtimes.shards import BlobInfo, ShardStore, sha256_file

    sha, size = sha256_file(path), path.stat().st_size
    first = manifest.blobs[0]
    blobs = (BlobInfo(sha, size, first.unit_start, first.unit_end),) + manifest.blobs[1:]
    units = tuple(
        dc_replace(u, blob=sha) if u.index < first.unit_end else u for u in manifest.units
    )
    crafted = dc_replace(manifest, blobs=blobs, units=units)
    store = ShardStore(work, locate=lambda b: path if b.sha256 == sha else work / "none")
    spec = store.open_range(crafted, first.unit_start, first.unit_end)
    spec.nbytes()


def _check_gguf_entry_points(path: Path, manifest: Manifest, work: Path, whole: bool) -> None:
    from mesh.cli.model import inspect_model
    from runtimes.shards import ShardSpec, ShardStore
    from runtimes.tokenizer import Tokenizer
    from runtimes.vocab import read_vocab

    calls = [
        lambda: open_gguf(path),
        lambda: ShardSpec.open(path),
        lambda: inspect_model(str(path)),
        lambda: _peer_blob_entry_points(path, manifest, work),
        lambda: read_vocab(path),
        lambda: Tokenizer(path),  # llama.cpp loads only what read_vocab let through
    ]
    if whole:  # POST /v1/models, `edgemesh model shard`: a user's file, packed into blobs
        calls.append(lambda: ShardStore(work / "packed").add_model(path))
    for call in calls:
        try:
            call()
        except ModelError:
            pass


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_gguf_fields(gguf_targets, tmp_path_factory, data):
    """Only ModelError, whatever a crafted header says (blob or whole model)."""
    targets, manifest = gguf_targets
    which = data.draw(st.sampled_from(sorted(targets)))
    raw = gguf_mutation(data.draw, targets[which])
    work = tmp_path_factory.mktemp("gf")
    path = work / "x.gguf"
    path.write_bytes(raw)
    _check_gguf_entry_points(path, manifest, work, which == "whole")


_OPTIONAL_KEYS = [
    f"{a}.{k}"
    for a in ("llama", "qwen2", "gemma3")
    for k in (
        "vocab_size",
        "attention.sliding_window",
        "attention.sliding_window_pattern",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.freq_base_swa",
        "final_logit_softcapping",
    )
]
_META_VALUES = st.one_of(
    st.none(),  # the key removed
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.sampled_from(_EDGE_INTS),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(-3, 2**40), max_size=4),
    st.builds(LargeArray, st.integers(0, 2**64)),
)


@pytest.fixture(scope="module")
def gguf_models_meta(tmp_path_factory):
    """(decoded metadata, tensor names, embedding rows) of each architecture's test model."""
    from runtimes.testmodels import DEFAULT_SPECS, write_test_model

    d = tmp_path_factory.mktemp("fzm")
    out = []
    for arch in sorted(DEFAULT_SPECS):
        f = open_gguf(write_test_model(d / f"{arch}.gguf", arch))
        out.append((f.metadata, set(f.tensors), f.tensors["token_embd.weight"].shape[0]))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_config_from_metadata(gguf_models_meta, data):
    """Decoded metadata with any key given any value: a config or a ModelError."""
    from runtimes.arch import config_from_metadata

    meta, names, rows = data.draw(st.sampled_from(gguf_models_meta))
    meta = dict(meta)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(meta) + _OPTIONAL_KEYS))
        value = data.draw(_META_VALUES)
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    try:
        config_from_metadata(meta, names, rows)
    except ModelError:
        pass


@pytest.mark.parametrize("path", sorted(CORPUS.glob("frame-*.bin")), ids=lambda p: p.name)
def test_regression_corpus(path):
    """Inputs that once mattered; each must be refused with the parser's own error."""
    from mesh.errors import WireError
    from mesh.net.wire import Reassembler

    data = path.read_bytes()
    with pytest.raises(WireError):
        Reassembler().feed(data)
