"""Model names are self-reported by peers: one claimed for two models is refused, not
resolved to whichever peer answered first."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mesh.inference.coordinator import Coordinator
from mesh.net.rpc import Reply
from runtimes.errors import ModelError

REAL, FAKE = "a" * 64, "b" * 64


class _Compute:
    def resolve(self, model: str) -> str:
        raise ModelError("not here")


class _Mesh:
    me = "me"

    def __init__(self, listings: dict[str, list[dict[str, Any]]]) -> None:
        self.listings = listings

    def connected_peer_ids(self) -> list[str]:
        return list(self.listings)

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        assert method == "compute.models"
        return Reply({}, msgpack.packb(self.listings[peer]))


def coordinator(listings: dict[str, list[dict[str, Any]]]) -> Coordinator:
    return Coordinator(_Mesh(listings), _Compute())  # type: ignore[arg-type]


async def test_a_name_two_peers_give_to_different_models_is_refused() -> None:
    c = coordinator(
        {
            "honest": [{"model_id": REAL, "name": "gemma3"}],
            "hijacker": [{"model_id": FAKE, "name": "gemma3"}],
        }
    )
    with pytest.raises(ModelError, match="different models"):
        await c.resolve("gemma3")
    assert await c.resolve(REAL) == REAL  # by id it is unambiguous


async def test_a_name_every_peer_agrees_on_resolves() -> None:
    c = coordinator(
        {
            "p1": [{"model_id": REAL, "name": "gemma3"}, "junk"],  # type: ignore[list-item]
            "p2": [{"model_id": REAL, "name": "gemma3"}],
            "p3": [],
        }
    )
    assert await c.resolve("gemma3") == REAL
    with pytest.raises(ModelError, match="no peer knows"):
        await c.resolve("llama")
