"""Disk room for pulled shards: least recently used blobs go, kept ones never; a pull that
cannot fit is refused before a byte is fetched."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mesh.inference.compute import CapacityError, ComputeConfig, ComputeService
from mesh.net.rpc import Reply
from mesh.storage.quota import disk_shortfall
from runtimes.shards import ShardStore
from runtimes.testmodels import write_test_model


def _blobs(d: Path, names: str, size: int = 1000) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        p = d / f"{n * 64}.gguf"
        p.write_bytes(b"x" * size)
        os.utime(p, (1000 + i, 1000 + i))  # a is the least recently used


def test_evicts_least_recently_used_and_never_kept(tmp_path: Path) -> None:
    _blobs(tmp_path, "abcd")
    assert disk_shortfall(tmp_path, 1500, 3000, keep={"a" * 64}) == 0
    assert sorted(p.name[0] for p in tmp_path.iterdir()) == ["a"]  # b, c, d went, oldest first


def test_stops_evicting_once_it_fits(tmp_path: Path) -> None:
    _blobs(tmp_path, "abcd")
    assert disk_shortfall(tmp_path, 500, 4000, keep=set()) == 0
    assert sorted(p.name[0] for p in tmp_path.iterdir()) == ["b", "c", "d"]


def test_shortfall_when_everything_is_kept(tmp_path: Path) -> None:
    _blobs(tmp_path, "ab")
    assert disk_shortfall(tmp_path, 1500, 2500, keep={"a" * 64, "b" * 64}) == 1000
    assert len(list(tmp_path.iterdir())) == 2


class _Caller:
    me = "me"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connected_peer_ids(self) -> list[str]:
        return ["holder"]

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        self.calls.append(method)
        raise AssertionError("nothing may be fetched")


async def test_a_peer_cannot_make_us_pull_past_the_disk_limit(tmp_path: Path) -> None:
    model = write_test_model(tmp_path / "m.gguf", "llama")
    manifest = ShardStore(tmp_path / "elsewhere").add_model(model)
    caller = _Caller()
    svc = ComputeService(
        caller,  # type: ignore[arg-type]
        "me",
        tmp_path / "store",
        ComputeConfig(runtime="fake", disk_limit=1000),
    )
    svc.manifests[manifest.model_id] = manifest  # as a peer's stage_open would make us learn it
    with pytest.raises(CapacityError, match="no disk room"):
        await svc.ensure_blobs(manifest, 0, len(manifest.units), {"x" * 64: ["holder"]})
    assert caller.calls == []
