"""Shard blob pulls: a holder serving wrong bytes cannot spoil the pull (unit, no network)."""

import hashlib
import os

import pytest

from mesh.storage.blobs import CHUNK, BlobError, fetch_blob

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


async def test_a_stalled_holder_is_left_behind_without_waiting_out_the_rpc_deadline(tmp_path):
    """The stalled holder answers two ranges, then never again: its range goes to the other
    holder after a few times the usual range time, not after the 60 s RPC deadline."""
    import asyncio

    data = os.urandom(12 * CHUNK)
    served = {"stall": 0}
    forever = asyncio.Event()

    async def read(holder, sha, offset, length):
        if holder == "stall":
            served["stall"] += 1
            if served["stall"] > 2:
                await forever.wait()  # a holder that died without closing its link
        await asyncio.sleep(0.01)
        return data[offset : offset + length]

    async with asyncio.timeout(15):  # the RPC deadline would be 60 s
        t = await fetch_blob(
            None,
            hashlib.sha256(data).hexdigest(),
            len(data),
            ["stall", "good"],
            tmp_path / "blob",
            reader=read,
        )
    assert (tmp_path / "blob").read_bytes() == data
    assert "stall" in t.failed_sources and t.sources["good"] >= 10 * CHUNK
