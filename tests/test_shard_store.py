"""Shard blobs, manifests and hash verification."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

importlib.import_module("gguf")

from runtimes.errors import MalformedModelError, ModelError, ShardIntegrityError  # noqa: E402
from runtimes.gguf_io import open_gguf  # noqa: E402
from runtimes.shards import Manifest, ShardSpec, ShardStore, layer_units, sha256_file  # noqa: E402
from runtimes.testmodels import write_test_model  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("m") / "gemma3.gguf", "gemma3")


@pytest.fixture
def store(tmp_path: Path) -> ShardStore:
    return ShardStore(tmp_path / "store")


def test_layer_units() -> None:
    assert layer_units(0, 18, 18) == (0, 20)
    assert layer_units(0, 6, 18) == (0, 7)
    assert layer_units(6, 12, 18) == (7, 13)
    assert layer_units(12, 18, 18) == (13, 20)
    with pytest.raises(ValueError):
        layer_units(3, 3, 18)


def test_one_blob_per_unit(model: Path, store: ShardStore) -> None:
    m = store.add_model(model)
    n = open_gguf(model).config.n_units
    assert len(m.units) == n and len(m.blobs) == n
    for b in m.blobs:
        p = store.blob_path(b.sha256)
        assert sha256_file(p) == b.sha256 and p.stat().st_size == b.size
        f = open_gguf(p)  # every blob is a valid GGUF with its range recorded
        assert (f.unit_start, f.unit_end) == (b.unit_start, b.unit_end)
    # units list their byte sizes; blocks are all the same size here
    block_sizes = {u.nbytes for u in m.units if u.kind == "block"}
    assert len(block_sizes) == 1 and block_sizes.pop() > 0
    # tied embeddings: the head unit holds the token embedding too
    assert "token_embd.weight" in m.units[-1].tensors
    # tokenizer tables only travel with the ends
    mid = open_gguf(store.blob_path(m.units[2].blob))
    assert "tokenizer.ggml.tokens" not in mid.metadata
    assert "tokenizer.ggml.tokens" in open_gguf(store.blob_path(m.units[0].blob)).metadata


def test_model_id_is_manifest_hash_and_deterministic(model: Path, tmp_path: Path) -> None:
    a = ShardStore(tmp_path / "a").add_model(model)
    b = ShardStore(tmp_path / "b").add_model(model)
    assert a.model_id == b.model_id  # same bytes in, same blobs and id out
    import hashlib

    assert a.model_id == hashlib.sha256(a.to_json()).hexdigest()
    again = Manifest.from_json(a.to_json(), expected_id=a.model_id)
    assert again == a


def test_partition_and_range_loading(model: Path, store: ShardStore) -> None:
    n = open_gguf(model).config.n_units
    m = store.add_model(model, partition=[(0, 3), (3, 5), (5, n)])
    assert [(b.unit_start, b.unit_end) for b in m.blobs] == [(0, 3), (3, 5), (5, n)]
    spec = store.open_range(m, 2, 6)  # spans three blobs
    assert (spec.start, spec.end) == (2, 6)
    assert list(spec.layers) == [1, 2, 3, 4]
    assert "blk.4.attn_q.weight" in spec.tensors and "blk.5.attn_q.weight" not in spec.tensors
    assert not spec.is_first and not spec.is_last


def test_whole_range_blob_loads_in_llama_cpp(model: Path, store: ShardStore) -> None:
    llama_cpp = importlib.import_module("llama_cpp")
    n = open_gguf(model).config.n_units
    m = store.add_model(model, partition=[(0, n)])
    spec = store.open_range(m, 0, n)
    assert spec.whole_model_path is not None
    llm = llama_cpp.Llama(
        str(spec.whole_model_path), n_ctx=32, n_threads=2, verbose=False, logits_all=True
    )
    ref = llama_cpp.Llama(str(model), n_ctx=32, n_threads=2, verbose=False, logits_all=True)
    toks = [1, 5, 9, 40]
    llm.eval(toks)
    ref.eval(toks)
    np.testing.assert_array_equal(np.array(llm.scores[:4]), np.array(ref.scores[:4]))
    llm.close()
    ref.close()


def test_corrupt_byte_fails_with_hash_error(model: Path, store: ShardStore) -> None:
    m = store.add_model(model)
    blob = m.blobs[3]
    p = store.blob_path(blob.sha256)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="corrupt"):
        store.open_range(m, 2, 5)
    store.open_range(m, 0, 2)  # other blobs are unaffected


def test_truncated_blob_fails_clearly(model: Path, store: ShardStore) -> None:
    m = store.add_model(model)
    p = store.blob_path(m.blobs[1].sha256)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ShardIntegrityError, match="bytes on disk"):
        store.open_range(m, 1, 2)


def test_missing_blob(model: Path, store: ShardStore) -> None:
    m = store.add_model(model)
    store.blob_path(m.blobs[0].sha256).unlink()
    with pytest.raises(ModelError, match="not in"):
        store.open_range(m, 0, 1)


def test_tampered_manifest_rejected(model: Path, store: ShardStore) -> None:
    m = store.add_model(model)
    p = store.manifest_dir / f"{m.model_id}.json"
    doc = json.loads(p.read_bytes())
    doc["units"][1]["nbytes"] += 1
    p.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(ShardIntegrityError, match="model id"):
        store.load_manifest(m.model_id)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"format":"other"}',
        b'{"format":"edgemesh-manifest/1","n_layers":-1}',
        b"\xff\xfe",
    ],
)
def test_malformed_manifest(data: bytes) -> None:
    with pytest.raises(MalformedModelError):
        Manifest.from_json(data)


def test_manifest_with_gap_rejected(model: Path, store: ShardStore) -> None:
    m = store.add_model(model)
    doc = json.loads(m.to_json())
    del doc["blobs"][2]
    with pytest.raises(MalformedModelError, match="contiguous"):
        Manifest.from_json(json.dumps(doc).encode())


def test_blob_of_another_range_rejected(model: Path, store: ShardStore) -> None:
    """A blob whose bytes hash right but holds other units than the manifest says."""
    m = store.add_model(model)
    doc = json.loads(m.to_json())
    # point unit 1's entry at unit 2's blob (hash and size are genuine)
    doc["units"][1]["blob"] = doc["units"][2]["blob"]
    doc["blobs"][1]["sha256"] = doc["blobs"][2]["sha256"]
    doc["blobs"][1]["size"] = doc["blobs"][2]["size"]
    bad = Manifest.from_json(json.dumps(doc).encode())
    with pytest.raises(MalformedModelError, match="other than"):
        store.open_range(bad, 1, 2)


def test_shardspec_range_checks(model: Path) -> None:
    f = open_gguf(model)
    with pytest.raises(ModelError):
        ShardSpec.from_gguf(f, 3, 3)
    s = ShardSpec.from_gguf(f, 0, 2)
    assert s.is_first and list(s.layers) == [0]
