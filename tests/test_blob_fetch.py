"""Shard blob pulls: a holder serving wrong bytes cannot spoil the pull (unit, no network)."""

import hashlib
import os

import pytest

from mesh.storage import CHUNK, BlobError, fetch_blob

DATA = os.urandom(3 * CHUNK + 123)
SHA = hashlib.sha256(DATA).hexdigest()


def reader(bad: set[str], calls: list[str]):
    async def read(holder, sha, offset, length):
        calls.append(holder)
        chunk = DATA[offset : offset + length]
        return bytes(len(chunk)) if holder in bad else chunk

    return read


async def test_poisoning_holder_is_singled_out(tmp_path):
    calls: list[str] = []
    penalized: set[str] = set()
    dest = tmp_path / "blob"
    t = await fetch_blob(
        None,
        SHA,
        len(DATA),
        ["evil", "good"],
        dest,
        penalized=penalized,
        reader=reader({"evil"}, calls),
    )
    assert dest.read_bytes() == DATA
    assert "evil" in penalized and "good" not in penalized
    assert set(t.sources) == {"good"}
    assert not list(tmp_path.glob(".*.part"))


async def test_all_holders_bad_fails_cleanly(tmp_path):
    with pytest.raises(BlobError, match="intact"):
        await fetch_blob(
            None, SHA, len(DATA), ["a", "b"], tmp_path / "blob", reader=reader({"a", "b"}, [])
        )
    assert not list(tmp_path.iterdir())
