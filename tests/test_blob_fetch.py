"""Shard pulls through the one fetch path: a holder serving wrong bytes cannot spoil the pull,
a stalled one is left behind (unit, no network; the packed store object a shard becomes)."""

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from mesh.storage.fetch import FetchState, fetch_chunks
from mesh.storage.store import CHUNK_SIZE, PACKED, BlobStore, Manifest, StoreError, build_manifest

CHUNK = CHUNK_SIZE
DATA = os.urandom(3 * CHUNK + 123)


def packed(tmp_path: Path, data: bytes) -> tuple[BlobStore, Manifest, dict[str, bytes]]:
    parts = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    by_sha = {hashlib.sha256(p).hexdigest(): p for p in parts}
    m = build_manifest([(hashlib.sha256(p).hexdigest(), len(p)) for p in parts], "s", PACKED)
    store = BlobStore(tmp_path / "store")
    store.add_manifest(m.raw, m.id)
    store.begin_packed(m)
    return store, m, by_sha


async def pull(store: BlobStore, m: Manifest, holders: list[str], read, penalized=None):  # type: ignore[no-untyped-def]
    """What ObjectService does for a packed object: fetch into its .part, drop it on failure."""
    state = FetchState(m.id, m.size)

    async def sink(i: int, data: bytes, src: str) -> None:
        store.write_packed(m, i, data)

    try:
        await fetch_chunks(
            None,  # type: ignore[arg-type]
            list(m.chunks),
            store.missing(m),
            holders,
            lambda s, n: 1.0,
            sink,
            state,
            penalize=(lambda s, why: penalized.add(s)) if penalized is not None else None,
            read=read,
        )
    except BaseException:
        store.abort_packed(m.id)
        raise
    return state


def reader(by_sha: dict[str, bytes], bad: set[str], calls: list[str]):  # type: ignore[no-untyped-def]
    async def read(holder: str, sha: str, size: int) -> bytes:
        calls.append(holder)
        chunk = by_sha[sha]
        return bytes(len(chunk)) if holder in bad else chunk

    return read


async def test_poisoning_holder_is_singled_out(tmp_path: Path) -> None:
    store, m, by_sha = packed(tmp_path, DATA)
    calls: list[str] = []
    penalized: set[str] = set()
    t = await pull(store, m, ["evil", "good"], reader(by_sha, {"evil"}, calls), penalized)
    path = store.data_path(m.id)
    assert path is not None and path.read_bytes() == DATA
    assert "evil" in penalized and "good" not in penalized
    assert set(t.sources) == {"good"}
    assert not list(store.packed_dir.glob("*.part"))


async def test_all_holders_bad_fails_cleanly(tmp_path: Path) -> None:
    store, m, by_sha = packed(tmp_path, DATA)
    with pytest.raises(StoreError, match="intact"):
        await pull(store, m, ["a", "b"], reader(by_sha, {"a", "b"}, []))
    assert not list(store.packed_dir.iterdir())
    assert store.used == 0 and not store.complete(m.id)


async def test_a_stalled_holder_is_left_behind_without_waiting_out_the_rpc_deadline(
    tmp_path: Path,
) -> None:
    """The stalled holder answers two chunks, then never again: its chunk goes to the other
    holder after a few times the usual chunk time, not after the 60 s RPC deadline."""
    data = os.urandom(12 * CHUNK)
    store, m, by_sha = packed(tmp_path, data)
    served = {"stall": 0}
    forever = asyncio.Event()

    async def read(holder: str, sha: str, size: int) -> bytes:
        if holder == "stall":
            served["stall"] += 1
            if served["stall"] > 2:
                await forever.wait()  # a holder that died without closing its link
        await asyncio.sleep(0.01)
        return by_sha[sha]

    async with asyncio.timeout(15):  # the RPC deadline would be 60 s
        t = await pull(store, m, ["stall", "good"], read)
    path = store.data_path(m.id)
    assert path is not None and path.read_bytes() == data
    assert "stall" in t.failed and t.sources["good"] >= 10 * CHUNK
